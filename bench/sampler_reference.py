"""Benchmark: KV-cache sampling throughput of our sampler (`modeling.sampler.sample`) vs a plain
reference sampler on a plain reference of the same model (bench/reference_ar.py), same run.

Workload: the model of bench/ar_reference.py (width 256, 6 layers, 4 heads, 6.59M parameters, random
init: the compute does not depend on the weights; the reference gets our weights), 10 classes,
class + 8 prologue + EOS + 64 visual tokens (73 positions decoded one at a time), a batch of 32
images with constant classifier-free guidance 2.0 (64 rows per forward: conditional and
unconditional), temperature 1, no top-k / top-p, fp32. Ours: preallocated KV cache, per-sample
seeds, inverse-CDF draws (cfg_schedule="global", cfg_global=2.0); the reference: the cache grown by
torch.cat at every step, torch.multinomial. The two alternate in rounds so that machine noise hits
both. Prints images/s of each and the ratio against the goal (ours >= 1.5x the reference); a ratio
below the goal is printed as BELOW GOAL, not an error.

    python bench/sampler_reference.py [--rounds 4] [--images 32] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.common import machine, report
from bench.reference_ar import from_ours, reference_sample, workload
from modeling.ar_model import ARModel
from modeling.sampler import SamplerConfig, sample, sample_seeds

GOAL = 1.5  # ours / reference, images/s
CFG_SCALE = 2.0


def measure(images: int = 32, rounds: int = 4) -> dict:
    """Images/s of sample() and of reference_sample(), alternating rounds."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    ours = ARModel(workload()).to(device).eval()
    ref = from_ours(ours).eval()
    cfg = SamplerConfig(cfg_schedule="global", cfg_global=CFG_SCALE, temperature_prologue=1.0,
                        temperature_visual=1.0, top_k=0, top_p=1.0, batch_size=images)  # fmt: skip
    classes = torch.arange(images) % ours.cfg.num_classes
    seeds = sample_seeds(0, classes, torch.arange(images))
    gen = torch.Generator(device).manual_seed(0)
    run = {
        "ours": lambda n: sample(ours, classes[:n], seeds[:n], cfg),
        "reference": lambda n: reference_sample(ref, classes[:n].to(device), CFG_SCALE, 1.0, gen),
    }
    warm = min(4, images)
    ids = run["reference"](warm)  # warm-up (allocator, kernels) and a check of the reference's output
    V, P = ours.V, ours.P
    assert ids.shape == (warm, ours.T) and bool((ids[:, ours.Z] == ours.eos).all())
    assert bool(((ids[:, : ours.Z] >= V) & (ids[:, : ours.Z] < V + P)).all()) and bool((ids[:, ours.Z + 1 :] < V).all())
    run["ours"](warm)
    seconds = dict.fromkeys(run, 0.0)
    for _ in range(rounds):
        for name, fn in run.items():
            sync()
            t0 = time.perf_counter()
            fn(images)
            sync()
            seconds[name] += time.perf_counter() - t0
    rate = {k: rounds * images / s for k, s in seconds.items()}
    return {
        "workload": f"AR 256x6, 4 heads ({ours.num_params() / 1e6:.2f}M params, random init), {images} images x "
        f"{ours.T} tokens, guidance {CFG_SCALE} ({2 * images} rows per forward), temperature 1, {rounds} rounds "
        f"each, fp32 on {torch.cuda.get_device_name() if cuda else 'CPU'}",
        "machine": machine(threads=True),
        "ours_images_per_s": round(rate["ours"], 2),
        "reference_images_per_s": round(rate["reference"], 2),
        "ratio": round(rate["ours"] / rate["reference"], 3),
        "goal": GOAL,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    r = measure(args.images, args.rounds)
    rates = [("ours (KV cache, modeling.sampler)", r["ours_images_per_s"]),
             ("plain reference (torch.cat cache)", r["reference_images_per_s"])]  # fmt: skip
    verdict = "meets goal" if r["ratio"] >= GOAL else "BELOW GOAL"
    report("images/s", rates, f"ours / reference: {r['ratio']:.2f}x (goal >= {GOAL:.1f}x: {verdict})", r, args.json, 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
