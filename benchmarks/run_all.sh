#!/usr/bin/env bash
# Every benchmark in one command, with the peers installed beside it (benchmarks/setup.sh, once);
# every ratio and peak RSS lands in benchmarks/results/*.json and is printed.
# Quick check: benchmarks/run_all.sh --layers 2 --hidden 256 --vocab 4096
set -euo pipefail
cd "$(dirname "$0")"
[ -x ../.bench/env/bin/python ] || ./setup.sh
for bench in bench_spectrum.py bench_esd.py bench_merge.py bench_lora.py bench_gaussian_tsd.py bench_scale.py bench_load.py; do
  echo "== $bench"
  ../.bench/env/bin/python "$bench" "$@"
done
echo "== bench_memory_api.py"  # builds its own model in memory: takes --layers/--hidden only
../.bench/env/bin/python bench_memory_api.py
