"""GPU check: a short bf16 DeepSpeed run of the B-size AR model on one GPU; tokens/s and MFU.

Workload: the ImageNet-256 prologue sequence (class + 16 prologue + EOS + 256 visual tokens,
visual codebook 16384, prologue codebook 1024), the AR size given (default B, 768 x 12), batch 64,
token ids drawn uniformly, through the same ARTrainer the pipeline uses (torch AdamW, ZeRO 0,
bf16). MFU = tokens/s x model FLOPs per token (ARModel.flops_per_token) / the GPU's dense bf16 peak.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py [--size B] [--steps 30]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import save_json
from modeling.ar_trainer import ARTrainConfig, ARTrainer, model_config
from pipelines.launch import free_port

CODES = {"visual_codebook": 16384, "prologue_codebook": 1024, "z_len": 16, "num_visual": 256}
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}  # dense


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="B")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--peak-tflops", type=float, default=0.0, help="dense bf16 peak (default: from the GPU name)")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    device = torch.device("cuda:0" if cuda else "cpu")
    cfg = ARTrainConfig(size=args.size, batch_size=args.batch, steps=10**6, warmup_steps=10)
    trainer = ARTrainer(model_config(cfg, CODES, 1000), cfg, device)
    g = torch.Generator().manual_seed(0)
    B, Z, N = args.batch, CODES["z_len"], CODES["num_visual"]
    batch = (
        torch.randint(0, 1000, (B,), generator=g),
        torch.randint(0, CODES["prologue_codebook"], (B, Z), generator=g),
        torch.randint(0, CODES["visual_codebook"], (B, N), generator=g),
    )
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    for _ in range(5):  # warm-up
        trainer.train_step([batch])
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        stats = trainer.train_step([batch])
    sync()
    seconds = time.perf_counter() - t0
    T = trainer.model_cfg.seq_len
    tokens_per_s = args.steps * B * T / seconds
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    flops = trainer.model.flops_per_token()
    result = {
        "device": name,
        "size": args.size,
        "parameters": trainer.model.num_params(),
        "bf16": trainer.bf16,
        "batch": B,
        "seq_len": T,
        "steps": args.steps,
        "tokens_per_s": round(tokens_per_s),
        "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 2),
        "mfu": round(tokens_per_s * flops / (peak * 1e12), 4) if peak else None,
        "peak_bf16_tflops": peak or None,
        "final_loss": round(stats["loss"], 4),
        "max_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
    }
    print(json.dumps(result, indent=1))
    save_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
