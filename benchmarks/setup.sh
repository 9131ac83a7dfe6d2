#!/usr/bin/env bash
# The benchmark environment: weightlab plus its peers (mergekit, WeightWatcher) in .bench/env,
# a virtual environment that reuses this machine's torch (no second multi-GB download).
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch" 2>/dev/null || pip install torch==2.13.0
python -m venv --system-site-packages .bench/env
.bench/env/bin/pip install -q -e '.[bench]'
.bench/env/bin/python -c "import mergekit, weightwatcher; print('benchmark environment ready: .bench/env')"
