"""Benchmark: AR sampling with the KV cache vs recomputing the whole prefix at every position, same run.

Workload: the fashion32 AR model shape (128 wide, 4 layers; V=512, P=64, Z=4, N=64, 10 classes:
class + 4 prologue + EOS + 64 visual = 69 positions) with random weights (the compute does not depend
on them), batch 64 sequences with the split CFG schedule (128 rows per forward), fp32. The two
samplers alternate in rounds so that machine noise hits both; every round samples the same seeds.
Prints sequences/s and generated tokens/s (T per sequence) of each and the speed-up; exits 1 if the
speed-up is below 5x.

    python bench/sampler.py [--rounds 2] [--size fashion32] [--batch 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine, save_json
from modeling.ar_model import AR_SIZES, ARConfig, ARModel
from modeling.sampler import SamplerConfig, sample, sample_no_cache, sample_seeds

CODES = {"visual_codebook": 512, "prologue_codebook": 64, "z_len": 4, "num_visual": 64}
MIN_SPEEDUP = 5.0


def timed(fn, model, classes, seeds, cfg, sync) -> float:
    sync()
    t0 = time.perf_counter()
    fn(model, classes, seeds, cfg)
    sync()
    return time.perf_counter() - t0


def measure(size: str = "fashion32", batch: int = 64, rounds: int = 2) -> dict:
    """Sequences/s and tokens/s of sample() and sample_no_cache(), alternating rounds."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model = ARModel(ARConfig(**AR_SIZES[size], num_classes=10, **CODES)).to(device).eval()
    cfg = SamplerConfig(cfg_schedule="split", batch_size=batch)
    classes = torch.arange(batch) % 10
    seeds = sample_seeds(0, classes, torch.arange(batch))
    for fn in (sample, sample_no_cache):  # warm-up: allocator, kernels
        timed(fn, model, classes[:4], seeds[:4], cfg, sync)
    seconds = {"kv_cache": 0.0, "no_cache": 0.0}
    for _ in range(rounds):
        seconds["kv_cache"] += timed(sample, model, classes, seeds, cfg, sync)
        seconds["no_cache"] += timed(sample_no_cache, model, classes, seeds, cfg, sync)
    sequences = rounds * batch
    return {
        "workload": f"AR {size} ({model.num_params() / 1e6:.2f}M params, random init), batch {batch} x "
        f"{model.T} tokens, split CFG ({2 * batch} rows per forward), {rounds} rounds each, fp32 on "
        f"{torch.cuda.get_device_name() if cuda else 'CPU'}",
        "machine": machine(threads=True),
        "kv_cache_sequences_per_s": round(sequences / seconds["kv_cache"], 2),
        "no_cache_sequences_per_s": round(sequences / seconds["no_cache"], 2),
        "kv_cache_tokens_per_s": round(sequences * model.T / seconds["kv_cache"], 1),
        "no_cache_tokens_per_s": round(sequences * model.T / seconds["no_cache"], 1),
        "speedup": round(seconds["no_cache"] / seconds["kv_cache"], 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="fashion32")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    r = measure(args.size, args.batch, args.rounds)
    print(f"{'sampler':<24}{'sequences/s':>14}{'tokens/s':>12}")
    print(f"{'KV cache':<24}{r['kv_cache_sequences_per_s']:>14.1f}{r['kv_cache_tokens_per_s']:>12.0f}")
    print(f"{'no cache (recompute)':<24}{r['no_cache_sequences_per_s']:>14.1f}{r['no_cache_tokens_per_s']:>12.0f}")
    print(f"KV-cache speed-up: {r['speedup']:.1f}x  ({r['workload']}; {r['machine']})")
    save_json(args.json, r)
    if r["speedup"] < MIN_SPEEDUP:
        print(f"FAIL: speed-up below {MIN_SPEEDUP}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
