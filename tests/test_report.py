"""The HTML report as a person sees it: rendered by headless Chromium, every image loaded, no
errors, headline numbers equal to the JSON results; plus its Markdown twin."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=10000",
]


@pytest.fixture(scope="module")
def results(zoo, tmp_path_factory):
    """spectrum, angles, gaussian and tsd JSON of a real fine-tune, and a merge record."""
    from weightlab.cli import main

    root = tmp_path_factory.mktemp("report")
    runs = [
        ["spectrum", zoo["llama"], zoo["llama_ft"], "--json", root / "spectrum.json"],
        ["angles", zoo["llama_ft"], zoo["llama"], "-k", "4", "--json", root / "angles.json"],
        [
            "gaussian",
            zoo["llama_ft"],
            "--base",
            zoo["llama"],
            "--min-elements",
            "512",
            "--json",
            root / "gaussian.json",
        ],
        ["tsd", zoo["llama"], zoo["llama_ft"], "--json", root / "tsd.json"],
        ["merge", "--method", "nan", "--base", zoo["llama"], zoo["llama_ft"], zoo["llama_ft"], "-o", root / "merged"],
    ]
    for args in runs:
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            assert not e.code, args
    return root


def chromium(*args: str) -> str:
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=120, check=True).stdout


@pytest.mark.skipif(CHROMIUM is None and not os.environ.get("CI"), reason="Debian's chromium is not installed")
@pytest.mark.slow
def test_report_renders_in_chromium_with_every_image_and_the_json_numbers(results, run_cli, tmp_path):
    assert CHROMIUM, "CI must install Debian's chromium (see .ci/run)"
    out = tmp_path / "report.html"
    code, _, err = run_cli("report", results, "-o", out, "--markdown", tmp_path / "report.md")
    assert code == 0, err
    page = out.read_text()
    assert not re.search(r"""(src|href)=['"]https?:""", page)  # self-contained: no network requests
    dom = chromium("--dump-dom", out.as_uri())
    body = re.search(r"<body([^>]*)>", dom).group(1)
    attrs = dict(re.findall(r'data-(\w+)="([^"]*)"', body))
    loaded, total = map(int, attrs["images"].split("/"))
    assert attrs["ready"] == "1" and attrs["errors"] == "0"
    assert total >= 8 and loaded == total
    spectrum = json.loads((results / "spectrum.json").read_text())
    mean_change = sum(m["relative_change"] for m in spectrum["matrices"]) / len(spectrum["matrices"])
    shown = re.search(r"data-key=\"spectrum.mean_relative_change\" data-v=\"([^\"]+)\"", dom).group(1)
    assert float(shown) == pytest.approx(mean_change, rel=1e-12)
    shown_matrices = re.search(r"data-key=\"spectrum.matrices\" data-v=\"([^\"]+)\"", dom).group(1)
    assert int(shown_matrices) == len(spectrum["matrices"])
    merge = json.loads((results / "merged" / "weightlab_merge.json").read_text())
    assert "0.500, 0.500" in re.search(r"data-key=\"merge.coefficients\" data-v=\"([^\"]+)\"", dom).group(1)
    assert merge["coefficients"] == pytest.approx([0.5, 0.5])
    ARTIFACTS.mkdir(exist_ok=True)
    chromium("--window-size=1280,2000", f"--screenshot={ARTIFACTS / 'report.png'}", out.as_uri())
    assert (ARTIFACTS / "report.png").stat().st_size > 10_000


def test_markdown_twin_has_tables_and_its_images(results, run_cli, tmp_path):
    code, _, err = run_cli(
        "report",
        results / "spectrum.json",
        results / "tsd.json",
        "-o",
        tmp_path / "r.html",
        "--markdown",
        tmp_path / "r.md",
    )
    assert code == 0, err
    text = (tmp_path / "r.md").read_text()
    assert text.startswith("# weightlab report") and "| analysis | quantity | value |" in text
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((tmp_path / i).is_file() for i in images)


def test_report_of_a_file_that_is_not_a_result_is_a_clear_error(run_cli, tmp_path):
    (tmp_path / "x.json").write_text('{"hello": 1}')
    code, _, err = run_cli("report", tmp_path / "x.json", "-o", tmp_path / "r.html")
    assert code == 2 and "not a weightlab result" in err and not (tmp_path / "r.html").exists()


def test_every_analysis_command_writes_its_own_report(zoo, run_cli, tmp_path):
    runs = {
        "spectrum": ["spectrum", zoo["llama"], zoo["llama_ft"]],
        "angles": ["angles", zoo["llama"], zoo["llama_ft"]],
        "gaussian": ["gaussian", zoo["llama_ft"], "--min-elements", "512"],
        "tsd": ["tsd", zoo["llama"], zoo["llama_ft"]],
        "merge": ["merge", "--method", "average", zoo["llama"], zoo["llama_ft"], "-o", tmp_path / "m"],
    }
    for name, args in runs.items():
        code, _, err = run_cli(*args, "--report", tmp_path / f"{name}.html")
        assert code == 0, (name, err)
        page = (tmp_path / f"{name}.html").read_text()
        assert page.startswith("<!doctype html>") and "Summary" in page, name


EVIL = "<script>alert(1)</script>|<img src=x onerror=alert(2)>\n| fake | row | *bold* [link](javascript:x)"


def test_markdown_escapes_every_name_so_nothing_breaks_or_injects(results, run_cli, tmp_path):
    """A tensor name and a title holding HTML, table pipes, a newline and Markdown syntax, rendered
    by a CommonMark renderer that allows raw HTML: no element is injected, every table row keeps
    its cells, and the names read back as the text they are."""
    from html.parser import HTMLParser

    from markdown_it import MarkdownIt

    payload = json.loads((results / "spectrum.json").read_text())
    for m in payload["matrices"][:3]:
        m["name"] = EVIL + m["name"]
        m["relative_change"] = 9.0 + payload["matrices"].index(m)  # first in the table, most changed
    (tmp_path / "evil.json").write_text(json.dumps(payload))
    code, _, err = run_cli(
        "report", tmp_path / "evil.json", "-o", tmp_path / "r.html", "--markdown", tmp_path / "r.md", "--title", EVIL
    )
    assert code == 0, err
    html = MarkdownIt("commonmark", {"html": True}).enable("table").render((tmp_path / "r.md").read_text())

    class Elements(HTMLParser):
        def __init__(self):
            super().__init__()
            self.tags, self.rows, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.tags.append((tag, dict(attrs)))
            if tag == "tr":
                self.rows.append(0)
            if tag in ("td", "th"):
                self.rows[-1] += 1

        def handle_data(self, data):
            self.text.append(data)

    parsed = Elements()
    parsed.feed(html)
    assert all(
        "onerror" not in attrs and not str(attrs.get("href", "")).startswith("javascript") for _, attrs in parsed.tags
    ), parsed.tags
    assert {t for t, _ in parsed.tags} <= {"h1", "h2", "p", "em", "table", "thead", "tbody", "tr", "th", "td", "img"}
    images = [attrs for t, attrs in parsed.tags if t == "img"]
    assert images and all(attrs["src"].startswith("r_assets/") for attrs in images)
    assert len(set(parsed.rows)) <= 2  # the summary table's 3 cells, the matrix table's own count: no row split
    assert "<script>alert(1)</script>|<img src=x onerror=alert(2)>\\n| fake | row" in "".join(parsed.text)
