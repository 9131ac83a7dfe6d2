"""Analyse a fine-tune: spectrum, Gaussianity of the update, and a report — with the CLI."""

import subprocess
import sys

from _models import workspace

m = workspace()
for args in (
    ["spectrum", m["base"], m["ft_a"], "--plots", "out/spectrum", "--json", "out/spectrum.json"],
    ["gaussian", m["ft_a"], "--base", m["base"], "--min-elements", "1024", "--json", "out/gaussian.json"],
    ["report", "out/spectrum.json", "out/gaussian.json", "-o", "out/report.html"],
):
    subprocess.run([sys.executable, "-m", "weightlab", *map(str, args), "--force"], check=True)
print("open out/report.html")
