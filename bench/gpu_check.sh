#!/usr/bin/env bash
# One-command GPU check (< 8 minutes on one GPU): the AR-B model in bf16 through DeepSpeed (tokens/s,
# MFU, memory), a ZeRO-1 step on NCCL, a B-size tokenizer step and the B-size sampler; one JSON in
# bench/results/gpu_check.json and a Markdown table. Exits non-zero if any part fails.
# Run from the repository root on a GPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { bash scripts/setup.sh demo >/dev/null; PY=.venv/bin/python; }
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no GPU visible to torch'; print(torch.cuda.get_device_name())"
mkdir -p bench/results
"$PY" bench/gpu_check.py --json bench/results/gpu_check.json "$@"
