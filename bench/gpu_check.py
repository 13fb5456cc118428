"""GPU check: the B-size pieces of the pipeline on one GPU, in one process, under 8 minutes.

Four parts, each timed after a warm-up, each with its peak GPU memory:
  ar_bf16    the AR-B model (768 x 12) through the pipeline's ARTrainer (a DeepSpeed engine, torch AdamW,
             ZeRO 0, bf16) on the ImageNet-256 prologue sequence (class + 16 prologue + EOS + 256 visual
             tokens, codebooks 16384 / 1024), batch 64, random ids: tokens/s, model TFLOP/s and MFU
             (ARModel.flops_per_token x tokens/s / the GPU's dense bf16 peak); the issue's goal: MFU >= 40 %
  zero1      the same model through a ZeRO stage-1 engine (the imagenet256-b profile's setting) on the
             process group DeepSpeed opened (NCCL on a GPU): a few steps, tokens/s and the backend's name
  tokenizer  one imagenet256-b tokenizer training step (the prologue variant: 768 x 12 encoder and
             decoder, joint prior 512 x 7, PatchGAN on, fp32), batch 32 of random 256 x 256 images: img/s
  sampler    the KV-cache sampler at AR-B size (fp32 as the pipeline samples; split CFG, 2 x 64 rows per
             forward), 273 positions: img/s
It writes one JSON (`--json`) and prints a Markdown table; any part that fails is reported in both and
the exit status is 1 ("fails loudly"). `--smoke` runs the same parts at tiny sizes on whatever device
there is (CPU and gloo here): the suite runs it so that the GPU run cannot fail on a typo.

    bash bench/gpu_check.sh            # or: python bench/gpu_check.py [--json PATH] [--smoke]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import save_json
from modeling.ar_model import ARModel
from modeling.ar_trainer import ARTrainConfig, ARTrainer, model_config
from modeling.sampler import SamplerConfig, sample, sample_seeds
from modeling.tokenizer_trainer import TokenizerTrainer
from pipelines.launch import free_port
from pipelines.profiles import load_profile

PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10": 125.0}  # dense
FULL = {"ar_size": "B", "codes": {"visual_codebook": 16384, "prologue_codebook": 1024, "z_len": 16, "num_visual": 256},
        "classes": 1000, "ar_batch": 64, "ar_steps": 30, "zero1_steps": 5, "tokenizer_profile": "imagenet256-b",
        "tokenizer_batch": 32, "tokenizer_steps": 5, "sampler_batch": 64, "sampler_rounds": 2}
SMOKE = {"ar_size": "tiny", "codes": {"visual_codebook": 64, "prologue_codebook": 16, "z_len": 2, "num_visual": 16},
         "classes": 10, "ar_batch": 4, "ar_steps": 2, "zero1_steps": 2, "tokenizer_profile": "tiny",
         "tokenizer_batch": 4, "tokenizer_steps": 2, "sampler_batch": 4, "sampler_rounds": 1}


class Clock:
    """Wall time of GPU work (synchronised) and the peak memory since the last reset."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def timed(self, fn: Callable[[], object], repeats: int) -> float:
        self.sync()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        self.sync()
        return time.perf_counter() - t0

    def peak_gib(self) -> float | None:
        return round(torch.cuda.max_memory_allocated() / 2**30, 2) if self.cuda else None


def ar_batch(s: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, c, B = torch.Generator().manual_seed(0), s["codes"], s["ar_batch"]
    return (torch.randint(0, s["classes"], (B,), generator=g),
            torch.randint(0, c["prologue_codebook"], (B, c["z_len"]), generator=g),
            torch.randint(0, c["visual_codebook"], (B, c["num_visual"]), generator=g))


def ar_part(s: dict, device: torch.device, clock: Clock, zero_stage: int, steps: int) -> dict:
    """tokens/s (and MFU for bf16) of ARTrainer steps at ZeRO `zero_stage`."""
    cfg = ARTrainConfig(size=s["ar_size"], batch_size=s["ar_batch"], steps=10**6, warmup_steps=10,
                        zero_stage=zero_stage)
    trainer = ARTrainer(model_config(cfg, s["codes"], s["classes"]), cfg, device)
    batch = ar_batch(s)
    for _ in range(3):  # warm-up: allocator, kernels
        stats = trainer.train_step([batch])
    seconds = clock.timed(lambda: trainer.train_step([batch]), steps)
    tokens_per_s = steps * s["ar_batch"] * trainer.model_cfg.seq_len / seconds
    flops = trainer.model.flops_per_token()
    name = torch.cuda.get_device_name() if clock.cuda else "cpu"
    peak = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), 0.0)
    out = {"parameters": trainer.model.num_params(), "bf16": trainer.bf16, "zero_stage": zero_stage,
           "backend": torch.distributed.get_backend(), "batch": s["ar_batch"], "seq_len": trainer.model_cfg.seq_len,
           "steps": steps, "tokens_per_s": round(tokens_per_s),
           "model_tflops_per_s": round(tokens_per_s * flops / 1e12, 3),
           "final_loss": round(stats["loss"], 4)}
    if peak and trainer.bf16:
        out |= {"peak_bf16_tflops": peak, "mfu": round(tokens_per_s * flops / (peak * 1e12), 4)}
    return out


def tokenizer_part(s: dict, device: torch.device, clock: Clock) -> dict:
    """img/s of one prologue-tokenizer training step (GAN on) at the profile's size."""
    prof = load_profile(s["tokenizer_profile"])
    train_cfg = replace(prof.tokenizer_train, batch_size=s["tokenizer_batch"], gan_start=0, perceptual_weight=0.0)
    trainer = TokenizerTrainer(prof.tokenizer, train_cfg, device)
    size, B = prof.tokenizer.image_size, s["tokenizer_batch"]
    images = torch.randint(0, 256, (B, prof.tokenizer.channels, size, size), dtype=torch.uint8).to(device)
    trainer.train_step(images)  # warm-up
    seconds = clock.timed(lambda: trainer.train_step(images), s["tokenizer_steps"])
    params = sum(p.numel() for p in trainer.tokenizer.parameters())
    return {"image_size": size, "batch": B, "steps": s["tokenizer_steps"], "tokenizer_parameters": params,
            "images_per_s": round(s["tokenizer_steps"] * B / seconds, 1),
            "seconds_per_step": round(seconds / s["tokenizer_steps"], 3)}


def sampler_part(s: dict, device: torch.device, clock: Clock) -> dict:
    """img/s (token sequences) of the KV-cache sampler with split CFG at the AR size."""
    cfg = ARTrainConfig(size=s["ar_size"])
    model = ARModel(model_config(cfg, s["codes"], s["classes"])).to(device).eval()  # fp32, as the pipeline samples
    B = s["sampler_batch"]
    sampler = SamplerConfig(cfg_schedule="split", batch_size=B)
    classes = torch.arange(B) % s["classes"]
    seeds = sample_seeds(0, classes, torch.arange(B))
    sample(model, classes[:2], seeds[:2], sampler)  # warm-up
    seconds = clock.timed(lambda: sample(model, classes, seeds, sampler), s["sampler_rounds"])
    return {"batch": B, "rows_per_forward": 2 * B, "positions": model.T, "rounds": s["sampler_rounds"],
            "dtype": str(next(model.parameters()).dtype), "images_per_s": round(s["sampler_rounds"] * B / seconds, 2)}


def run_parts(s: dict, device: torch.device) -> tuple[dict, dict]:
    """Every part in turn: its figures or its error (with the traceback's last lines)."""
    clock, results, errors = Clock(device), {}, {}
    parts = {
        "ar_bf16": lambda: ar_part(s, device, clock, 0, s["ar_steps"]),
        "zero1": lambda: ar_part(s, device, clock, 1, s["zero1_steps"]),
        "tokenizer": lambda: tokenizer_part(s, device, clock),
        "sampler": lambda: sampler_part(s, device, clock),
    }
    for name, part in parts.items():
        clock.reset()
        t0 = time.perf_counter()
        print(f"==> {name}", flush=True)
        try:
            results[name] = part() | {"max_memory_gib": clock.peak_gib(), "wall_s": round(time.perf_counter() - t0, 1)}
            print(json.dumps(results[name]), flush=True)
        except Exception as e:  # reported, then the check exits 1
            errors[name] = f"{type(e).__name__}: {e}\n" + "".join(traceback.format_exc().splitlines(True)[-8:])
            print(f"FAILED {name}: {errors[name]}", file=sys.stderr, flush=True)
    return results, errors


def table(results: dict, errors: dict) -> str:
    rows = ["| part | figure | memory (GiB) | wall (s) |", "|---|---|---|---|"]
    for name, r in results.items():
        if "tokens_per_s" in r:
            mfu = f", MFU {r['mfu']:.1%}" if r.get("mfu") is not None else ""
            fig = f"{r['tokens_per_s']:,} tok/s, {r['model_tflops_per_s']} TFLOP/s{mfu} (ZeRO {r['zero_stage']}, " \
                  f"{r['backend']}, bf16 {r['bf16']})"
        else:
            fig = f"{r['images_per_s']} img/s (batch {r['batch']})"
        rows.append(f"| {name} | {fig} | {r['max_memory_gib']} | {r['wall_s']} |")
    rows += [f"| {name} | **FAILED**: {err.splitlines()[0]} | | |" for name, err in errors.items()]
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default="")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on any device (the suite's check)")
    args = ap.parse_args()
    for k, v in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    if not cuda and not args.smoke:
        print("error: no GPU visible to torch (use --smoke for the CPU check)", file=sys.stderr)
        return 1
    results, errors = run_parts(SMOKE if args.smoke else FULL, device)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "smoke": args.smoke, "parts": results, "errors": errors}
    save_json(args.json, out)
    print("\n" + table(results, errors))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
