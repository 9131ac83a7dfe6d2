#!/usr/bin/env bash
# All benchmarks in one command; results land in benchmarks/results/*.json.
# Quick check: benchmarks/run_all.sh --layers 2 --hidden 256
set -euo pipefail
cd "$(dirname "$0")"
for bench in bench_spectrum.py bench_merge.py bench_lora.py bench_gaussian_tsd.py; do
  echo "== $bench"
  python "$bench" "$@"
done
