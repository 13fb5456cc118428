#!/usr/bin/env bash
# One-command GPU check (< 5 minutes on one GPU): bf16 DeepSpeed steps of the B-size AR model,
# printing tokens/s and model FLOPs utilisation. Run from the repository root on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { bash scripts/setup.sh >/dev/null; PY=.venv/bin/python; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print(torch.cuda.get_device_name())"
mkdir -p bench/results
"$PY" bench/gpu_check.py --size B --batch 64 --steps 30 --json bench/results/gpu_check.json "$@"
