"""Benchmark: AR training through the DeepSpeed engine vs a plain PyTorch loop, same run.

Workload: the fashion32 AR model (192 wide, 6 layers) on prologue-variant sequences (class + 4
prologue + EOS + 64 visual tokens; ids drawn uniformly: the compute does not depend on them),
batch 64, fp32 on CPU (bf16 on a GPU). The plain loop does what the engine does: AdamW with the same
parameter groups, LR schedule and gradient clipping. The two alternate in rounds so that machine
noise hits both. Prints training tokens/s of each and the engine's overhead.

    python bench/ar_engine.py [--steps 20] [--rounds 3] [--size fashion32] [--batch 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine, report
from modeling.ar_model import ARModel
from modeling.ar_trainer import ARTrainConfig, ARTrainer, model_config
from modeling.optim import decay_groups, lr_lambda
from pipelines.launch import free_port

CODES = {"visual_codebook": 512, "prologue_codebook": 64, "z_len": 4, "num_visual": 64}


def batches(n: int, batch: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, 10, (batch,), generator=g)
        prologue = torch.randint(0, CODES["prologue_codebook"], (batch, CODES["z_len"]), generator=g)
        visual = torch.randint(0, CODES["visual_codebook"], (batch, CODES["num_visual"]), generator=g)
        out.append(tuple(t.to(device) for t in (labels, prologue, visual)))
    return out


class PlainLoop:
    """The same model, optimiser, schedule and clipping, without DeepSpeed (or another model that
    takes (labels, prologue, visual) and returns {"loss": ...}: bench/ar_reference.py)."""

    def __init__(self, cfg: ARTrainConfig, device: torch.device, model: torch.nn.Module | None = None):
        torch.manual_seed(cfg.seed)
        self.cfg = cfg
        self.model = (model if model is not None else ARModel(model_config(cfg, CODES, 10))).to(device)
        self.opt = torch.optim.AdamW(
            decay_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2)
        )
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        )
        self.bf16 = cfg.uses_bf16(device.type == "cuda")

    def train_step(self, micro_batches) -> None:
        self.model.train()
        for labels, prologue, visual in micro_batches:
            with torch.autocast(labels.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                loss = self.model(labels, prologue, visual)["loss"]
            (loss / len(micro_batches)).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)


def timed(trainer, data, sync) -> float:
    sync()
    t0 = time.perf_counter()
    for b in data:
        trainer.train_step([b])
    sync()
    return time.perf_counter() - t0


def measure(size: str = "fashion32", batch: int = 64, steps: int = 20, rounds: int = 3) -> dict:
    """Tokens/s of the DeepSpeed ARTrainer and of the plain loop, alternating rounds."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if cuda else "cpu")
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cfg = ARTrainConfig(size=size, batch_size=batch, steps=10**6, warmup_steps=10)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    engine, plain = ARTrainer(model_config(cfg, CODES, 10), cfg, device), PlainLoop(cfg, device)
    data = batches(steps, batch, device)
    for trainer in (engine, plain):  # warm-up: allocator, kernels
        timed(trainer, data[:3], sync)
    seconds = {"deepspeed": 0.0, "plain": 0.0}
    for _ in range(rounds):
        seconds["deepspeed"] += timed(engine, data, sync)
        seconds["plain"] += timed(plain, data, sync)
    tokens = rounds * steps * batch * engine.model_cfg.seq_len
    rate = {k: tokens / s for k, s in seconds.items()}
    return {
        "workload": f"AR {size} ({engine.model.num_params() / 1e6:.2f}M params), batch {batch} x "
        f"{engine.model_cfg.seq_len} tokens, {rounds} x {steps} steps each, "
        f"{'bf16 on ' + torch.cuda.get_device_name() if engine.bf16 and cuda else 'fp32 on CPU'}",
        "machine": machine(threads=True),
        "deepspeed_tokens_per_s": round(rate["deepspeed"], 1),
        "plain_pytorch_tokens_per_s": round(rate["plain"], 1),
        "deepspeed_overhead": round(1 - rate["deepspeed"] / rate["plain"], 4),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="fashion32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    r = measure(args.size, args.batch, args.steps, args.rounds)
    rates = [("DeepSpeed engine", r["deepspeed_tokens_per_s"]), ("plain PyTorch", r["plain_pytorch_tokens_per_s"])]
    report("tokens/s", rates, f"engine overhead: {100 * r['deepspeed_overhead']:.1f}%", r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
