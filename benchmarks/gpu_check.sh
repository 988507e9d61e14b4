#!/usr/bin/env bash
# The GPU check of benchmarks/gpu_check.py in one command (about 10 minutes on one GPU): installs the package if
# needed, points LTDD_DATA at ../shared/data when unset, records benchmarks/results/gpu_check.md.
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import ltdd" 2>/dev/null || python -m pip install --quiet -e .
export LTDD_DATA="${LTDD_DATA:-$(cd .. && pwd)/shared/data}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python benchmarks/gpu_check.py --device "${DEVICE:-cuda}" "$@"
