"""The GPU check runs its four parts at tiny sizes on the CPU (so that the GPU run cannot fail on a typo)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_smoke_runs_every_part_and_writes_its_json(tmp_path):
    out = tmp_path / "gpu_check.json"
    run = subprocess.run([sys.executable, "bench/gpu_check.py", "--smoke", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(out.read_text())
    assert figures["smoke"] is True and figures["errors"] == {}
    parts = figures["parts"]
    assert set(parts) == {"ar_bf16", "zero1", "tokenizer", "sampler"}
    assert parts["zero1"]["zero_stage"] == 1 and parts["ar_bf16"]["tokens_per_s"] > 0
    assert parts["tokenizer"]["images_per_s"] > 0 and parts["sampler"]["images_per_s"] > 0
    assert "| zero1 |" in run.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_gpu_check_without_a_gpu_fails_with_a_clear_message():
    run = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "no GPU visible to torch" in run.stderr
