"""What a person reads must be true and readable: a report whose sections are siblings, headlines
about the figures their section shows, "not computed" where nothing was computed, plots that show
what their headline counts, model names instead of positions, tables that fit the terminal, one
number format, progress when output is piped, and a CLI that says what it is."""

from __future__ import annotations

import os
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch
from safetensors.torch import save_file

from weightlab.analysis.angles import AnglesOptions, angles
from weightlab.analysis.esd import ESDOptions, esd
from weightlab.analysis.gaussian import GaussianOptions, gaussian
from weightlab.analysis.spectrum import SpectrumOptions, spectrum
from weightlab.cli.progress import PlainProgress, duration
from weightlab.display import fmt, model_names
from weightlab.io import open_checkpoint
from weightlab.report.document import render_html, render_markdown, section


class Structure(HTMLParser):
    """Open elements as a stack: every close tag must close the innermost open one."""

    VOID = frozenset({"meta", "img", "br", "hr", "input", "link"})

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.section_depths: list[int] = []

    def handle_starttag(self, tag, attrs):
        if tag == "section":
            self.section_depths.append(self.stack.count("section"))
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.stack[-1:] or 'nothing'}")
        else:
            self.stack.pop()


def _sections(results, tmp_path) -> list:
    return [section(r, tmp_path / str(i)) for i, r in enumerate(results)]


@pytest.fixture(scope="module")
def analysed(zoo):
    base, ft = open_checkpoint(zoo["llama"]), open_checkpoint(zoo["llama_ft"])
    return {
        "spectrum": spectrum(base, [ft]),
        "esd": esd(ft, base, ESDOptions(traps=False)),
        "gaussian": gaussian(ft, base, GaussianOptions(min_elements=64)),
        "values-only": spectrum(base, [ft], SpectrumOptions(values_only=True)),
    }


def test_the_html_report_is_well_formed_and_its_sections_are_siblings(analysed, tmp_path):
    page = render_html("t", _sections(analysed.values(), tmp_path))
    parsed = Structure()
    parsed.feed(page)
    assert not parsed.errors and parsed.stack == [], (parsed.errors, parsed.stack)
    assert len(parsed.section_depths) == len(analysed) + 1 and set(parsed.section_depths) == {0}


def test_the_update_section_headlines_the_updates_figures(analysed):
    result = analysed["gaussian"]
    share = dict((key, (label, value)) for key, label, value in result.headline())["gaussian.gaussian_share"]
    delta = result.label_counts("delta")
    assert share == ("share of ΔW labelled gaussian", delta["gaussian"] / len(result.tensors))
    assert result.note().startswith("Labels of ΔW")


def test_figures_not_computed_say_so_never_zero(analysed, tmp_path):
    traps = dict((k, v) for k, _, v in analysed["esd"].headline())["esd.traps"]
    intruders = dict((k, v) for k, _, v in analysed["values-only"].headline())["spectrum.intruders"]
    assert traps is None and intruders is None
    assert "correlation traps not looked for" in " ".join(analysed["esd"].lines())
    sections = _sections([analysed["esd"], analysed["values-only"]], tmp_path)
    page = render_html("t", sections)
    assert page.count(">not computed<") == 2
    assert render_markdown("t", sections, "a").count("| not computed |") == 2


def test_values_only_against_a_fine_tune_shows_its_tables(zoo, run_cli):
    code, _out, err = run_cli("spectrum", zoo["llama"], zoo["llama_ft"], "--values-only", "--rows", "3")
    assert code == 0 and "Traceback" not in err, err


def test_intruder_plots_count_what_the_headline_counts(zoo, tmp_path, monkeypatch):
    """An intruder outside the numbered layers (a pooler, a head) is drawn in its own group; a
    result without intruders says so in the figure."""
    from weightlab.report import plots
    from weightlab.surgery.intruders import IntruderOptions, IntruderReport, MitigatedMatrix

    def matrix(name, layer, intruders):
        return MitigatedMatrix(name, layer, "other", [4, 4], intruders, [0.1, 0.9], [1.0] * len(intruders), 1.0, 0.1)

    report = IntruderReport(
        "b",
        "f",
        "o",
        "checkpoint",
        IntruderOptions(),
        [matrix("layers.0.q.weight", 0, []), matrix("pooler.dense.weight", None, [0])],
    )
    drawn, said = [], []
    real_bar = plots.plt.Axes.bar
    monkeypatch.setattr(
        plots.plt.Axes, "bar", lambda ax, x, h, *a, **k: drawn.append(list(h)) or real_bar(ax, x, h, *a, **k)
    )
    monkeypatch.setattr(plots, "_say_empty", lambda ax, text: said.append(text))
    plots.intruder_plots(report, tmp_path / "with")
    assert sum(sum(h) for h in drawn) == dict((k, v) for k, _, v in report.headline())["intruders.count"] == 1
    assert not said
    report.matrices = [matrix("layers.0.q.weight", 0, [])]
    plots.intruder_plots(report, tmp_path / "without")
    assert said and "no intruder dimension" in said[0]


def test_subspaces_that_span_the_whole_space_are_no_finding(tmp_path):
    """A 2×32 matrix with k = 2 spans all of R² on its left side: 0° by construction, so it is
    marked and kept out of the headline and the summaries."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"tiny.weight": torch.randn(2, 32, generator=gen), "big.weight": torch.randn(32, 32, generator=gen)}
    for name, scale in (("a", 0.1), ("b", 0.2)):
        (tmp_path / name).mkdir()
        save_file(
            {k: v + scale * torch.randn(v.shape, generator=gen) for k, v in tensors.items()},
            tmp_path / name / "model.safetensors",
        )
    result = angles(open_checkpoint(tmp_path / "a"), open_checkpoint(tmp_path / "b"), options=AnglesOptions(k=2))
    by_name = {m.name: m for m in result.matrices}
    assert by_name["tiny.weight"].spans_whole_space and not by_name["big.weight"].spans_whole_space
    assert dict((k, v) for k, _, v in result.headline())["angles.most_aligned"] == "big.weight"
    assert all(s["matrices"] == 1 for s in result.to_dict()["summary_by_role"])
    rows = result.tables()[0].rows
    assert rows[-1][0] == "tiny.weight" and "0° by construction" in rows[-1][-1]


def test_models_are_named_not_numbered(zoo, adapters, tmp_path, run_cli):
    base = open_checkpoint(zoo["llama"])
    result = spectrum(base, [open_checkpoint(zoo["llama_ft"]), open_checkpoint(zoo["llama_sharded"])])
    assert {row[1] for row in result.tables()[0].rows} == {"llama_ft", "llama_sharded"}
    assert model_names(["runs/a/model", "runs/b/model", "x/models--org--m/snapshots/" + "a" * 40]) == [
        "a/model",
        "b/model",
        "org/m@aaaaaaa",
    ]
    code, out, _ = run_cli("compare", "--base", zoo["llama"], zoo["llama_ft"], zoo["llama_sharded"])
    assert code == 0 and "llama_ft × llama_sharded" in out


@pytest.mark.slow
def test_tables_fit_a_terminal_of_100_columns(zoo):
    env = {**os.environ, "COLUMNS": "100"}
    for args in (
        ["spectrum", zoo["llama"], zoo["llama_ft"], zoo["llama_sharded"], "--rows", "5"],
        ["esd", zoo["llama_ft"], "--base", zoo["llama"], "--no-traps"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "weightlab", *map(str, args)], capture_output=True, text=True, env=env, timeout=300
        )
        assert done.returncode == 0, done.stderr
        widest = max(len(line) for line in done.stdout.splitlines())
        assert widest <= 100, (args[0], widest)
        assert "more columns in a wider terminal" in " ".join(done.stdout.split())


def test_one_number_format_everywhere():
    assert [fmt(v) for v in (0.5, 1.0, 0.6875, 0.0334, 12345.6, 22713728, 3, None)] == [
        "0.500",
        "1.00",
        "0.688",
        "0.0334",
        "1.23e+04",
        "22,713,728",
        "3",
        "-",
    ]


def test_piped_progress_is_plain_lines_at_a_modest_rate():
    now, lines = [0.0], []
    plain = PlainProgress("spectrum", "matrices", lines.append, clock=lambda: now[0], every=10)
    plain.start(100)
    for _ in range(100):
        now[0] += 0.5
        plain.advance(1)
    plain.finish()
    assert len(lines) == 5  # every 10 s of a 50 s run, and the last line
    assert lines[0] == "spectrum: 20/100 matrices (20%), 2.00 matrices/s, about 40 s left"
    assert lines[-1] == "spectrum: 100/100 matrices in 50 s"
    quiet: list[str] = []
    short = PlainProgress("x", "tensors", quiet.append, clock=lambda: 0.0)
    short.start(3)
    short.advance(3)
    short.finish()
    assert quiet == [] and duration(200) == "3 min 20 s"


def test_progress_that_counts_bytes_follows_the_bytes():
    """At 7B the embedding weighs as much as thousands of norm vectors: the share, the rate and the
    time left follow bytes where the work counts them, and the counts stay in the line."""
    now, lines = [0.0], []
    plain = PlainProgress("merge (ties)", "tensors", lines.append, clock=lambda: now[0], every=10)
    plain.start(4, 4_000_000_000)
    now[0] += 10
    plain.advance(3, 1_000_000_000)  # three tensors, a quarter of the bytes
    now[0] += 30
    plain.advance(1, 3_000_000_000)
    plain.finish()
    assert lines == [
        "merge (ties): 3/4 tensors, 1.0 GB of 4.0 GB (25%), 100.0 MB/s, about 30 s left",
        "merge (ties): 4/4 tensors, 4.0 GB in 40 s",
    ]


def _weightlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "weightlab", *map(str, args)], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_the_cli_says_what_it_is_and_how_to_fix_a_typo(zoo, tmp_path):
    version = _weightlab("--version")
    assert version.returncode == 0 and version.stdout.startswith("weightlab ")
    for command in ("", "spectrum", "merge", "init-lora", "esd"):
        helped = _weightlab(*filter(None, [command, "--help"]))
        assert helped.returncode == 0 and "<bool>" not in helped.stdout, command
    typo = _weightlab("merge", "--method", "tiess", "--base", zoo["llama"], zoo["llama_ft"], "-o", tmp_path / "m")
    assert typo.returncode == 2 and "did you mean ties?" in typo.stderr
    (tmp_path / "nan").mkdir()
    tensors = {n: open_checkpoint(zoo["llama_ft"]).get(n) for n in open_checkpoint(zoo["llama_ft"]).names()}
    tensors["layers.1.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(tensors, tmp_path / "nan" / "model.safetensors")
    failed = _weightlab("spectrum", zoo["llama"], tmp_path / "nan")
    assert failed.returncode == 2 and failed.stderr.startswith("error: ") and failed.stderr.count("\n") == 1, repr(
        failed.stderr
    )  # no blank line, nothing else


def test_cache_entries_take_the_users_file_mode(tmp_path):
    from weightlab.compute.cache import DecompositionCache, content_key
    from weightlab.compute.gram import decompose

    w = torch.randn(6, 4)
    cache = DecompositionCache(tmp_path)
    cache.put(content_key(w), decompose(w))
    mask = os.umask(0)
    os.umask(mask)
    assert cache.path(content_key(w)).stat().st_mode & 0o777 == 0o666 & ~mask


def test_every_options_help_is_shown_as_written(run_cli, monkeypatch):
    """Brackets in help are text: `[default: all]` and `weightlab[ray]` are not eaten as markup."""
    import re

    import typer.main

    import weightlab.cli.commands  # noqa: F401 - registers every command
    from weightlab.cli.app import app

    monkeypatch.setenv("COLUMNS", "400")
    commands = typer.main.get_command(app).commands
    assert len(commands) >= 13
    for name, command in commands.items():
        code, out, _ = run_cli(name, "--help")
        shown = re.sub(r"[│\s]+", " ", out)
        for param in command.params:
            text = (param.help or "").replace("\\[", "[")
            assert code == 0 and re.sub(r"\s+", " ", text) in shown, (name, text)
