#!/usr/bin/env bash
# Every benchmark in one command, with the peers installed beside it (benchmarks/setup.sh, once);
# every ratio and peak RSS lands in benchmarks/results/*.json and is printed.
# Quick check: benchmarks/run_all.sh --layers 2 --hidden 256 --vocab 4096
# --large (alone) then runs bench_7b.py: a Llama-2-7B shape in bfloat16, ~54 GB of disk, hours on 2 cores.
set -euo pipefail
cd "$(dirname "$0")"
[ -x ../.bench/env/bin/python ] || ./setup.sh
large=0
if [ "${1:-}" = "--large" ]; then large=1; shift; fi
for bench in bench_spectrum.py bench_esd.py bench_merge.py bench_mergekit.py bench_lora.py bench_gaussian_tsd.py bench_scale.py bench_load.py; do
  echo "== $bench"
  ../.bench/env/bin/python "$bench" "$@"
done
echo "== bench_memory_api.py"  # builds its own model in memory: takes --layers/--hidden only
../.bench/env/bin/python bench_memory_api.py
echo "== slim_quality.py"  # trains its own tiny MoE
../.bench/env/bin/python slim_quality.py
if [ "$large" = 1 ]; then
  echo "== bench_7b.py"
  ../.bench/env/bin/python bench_7b.py
  echo "== bench_moe.py"  # 30B-A3B and 7B shapes, two layers each
  ../.bench/env/bin/python bench_moe.py
else
  echo "== bench_moe.py --quick"
  ../.bench/env/bin/python bench_moe.py --quick --out results/moe-quick.json
fi
