"""Benchmark: AR training throughput of our ARModel vs a plain-PyTorch reference of the same
architecture (bench/reference_ar.py), same run.

Workload: width 256, 6 layers, 4 heads (6.59M parameters, 6.44M outside the embeddings in both:
asserted), 10 classes, visual codebook 512, prologue codebook 64, sequences class + 8 prologue + EOS
+ 64 visual tokens (73 positions; ids drawn uniformly: the compute does not depend on them), batch
64, fp32 on CPU (bf16 autocast on a GPU). Both models start from the same weights (the reference's
logits are checked against ours first) and are trained by the same plain step (bench/ar_engine.py's
PlainLoop: forward, backward, clipping, AdamW, LR schedule), alternating in rounds so that machine
noise hits both. Prints training tokens/s and FLOP/s (6 x non-embedding parameters x tokens/s) of
each and the ratio against the goal (ours >= 1.0x the reference); a ratio below the goal is printed
as BELOW GOAL, not an error.

    python bench/ar_reference.py [--steps 2] [--rounds 3] [--batch 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench.ar_engine import PlainLoop, timed
from bench.common import machine, report
from bench.reference_ar import from_ours, non_embedding_params, workload
from modeling.ar_model import ARModel
from modeling.ar_trainer import ARTrainConfig

GOAL = 1.0  # ours / reference, training tokens/s


def batches(cfg, n: int, batch: int, device: torch.device, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        labels = torch.randint(0, cfg.num_classes, (batch,), generator=g)
        prologue = torch.randint(0, cfg.prologue_codebook, (batch, cfg.z_len), generator=g)
        visual = torch.randint(0, cfg.visual_codebook, (batch, cfg.num_visual), generator=g)
        out.append(tuple(t.to(device) for t in (labels, prologue, visual)))
    return out


def measure(batch: int = 64, steps: int = 2, rounds: int = 3) -> dict:
    """Tokens/s and FLOP/s of ours and of the reference under the same training step, alternating rounds."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    model_cfg = workload()
    torch.manual_seed(0)
    ours = ARModel(model_cfg)
    ref = from_ours(ours)
    n_ours, n_ref = ours.num_params(), sum(p.numel() for p in ref.parameters())
    assert n_ours == n_ref, f"parameter counts differ: ours {n_ours}, reference {n_ref}"
    flop_params = non_embedding_params(ours)
    assert flop_params == non_embedding_params(ref) == ours.num_params(exclude_embeddings=True)
    data = batches(model_cfg, steps, batch, device)
    with torch.no_grad():  # the same function: equal logits from equal weights
        few = [t[:8] for t in data[0]]
        a, b = ours.eval()(*few)["logits"], ref.eval()(*few)["logits"]
        assert torch.equal(a.isfinite(), b.isfinite()) and torch.allclose(a.nan_to_num(), b.nan_to_num(), atol=1e-4)
    cfg = ARTrainConfig(batch_size=batch, steps=10**6, warmup_steps=10)
    loops = {"ours": PlainLoop(cfg, device, ours), "reference": PlainLoop(cfg, device, ref)}
    if cuda and cfg.uses_bf16(True):
        precision = "bf16 autocast on " + torch.cuda.get_device_name()
    else:
        precision = "fp32 on CPU"
    for loop in loops.values():  # warm-up: allocator, kernels
        timed(loop, data[:1], sync)
    seconds = dict.fromkeys(loops, 0.0)
    for _ in range(rounds):
        for name, loop in loops.items():
            seconds[name] += timed(loop, data, sync)
    tokens = rounds * steps * batch * model_cfg.seq_len
    rate = {k: tokens / s for k, s in seconds.items()}
    return {
        "workload": f"AR 256x6, 4 heads ({n_ours / 1e6:.2f}M params in both, {flop_params / 1e6:.2f}M non-embedding), "
        f"batch {batch} x {model_cfg.seq_len} tokens, {rounds} x {steps} steps each, {precision}; "
        f"GFLOP/s (6 x non-embedding params x tok/s): ours {6 * flop_params * rate['ours'] / 1e9:.1f}, "
        f"reference {6 * flop_params * rate['reference'] / 1e9:.1f}",
        "machine": machine(threads=True),
        "ours_tokens_per_s": round(rate["ours"], 1),
        "reference_tokens_per_s": round(rate["reference"], 1),
        "ours_flops_per_s": round(6 * flop_params * rate["ours"]),
        "reference_flops_per_s": round(6 * flop_params * rate["reference"]),
        "non_embedding_params": flop_params,
        "params": n_ours,
        "ratio": round(rate["ours"] / rate["reference"], 3),
        "goal": GOAL,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--steps", type=int, default=2, help="training steps per round and model")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    r = measure(args.batch, args.steps, args.rounds)
    rates = [("ours (ARModel)", r["ours_tokens_per_s"]), ("plain reference", r["reference_tokens_per_s"])]
    verdict = "meets goal" if r["ratio"] >= GOAL else "BELOW GOAL"
    summary = (
        f"ours / reference: {r['ratio']:.2f}x (goal >= {GOAL:.1f}x: {verdict}); GFLOP/s ours "
        f"{r['ours_flops_per_s'] / 1e9:.1f}, reference {r['reference_flops_per_s'] / 1e9:.1f}"
    )
    report("tokens/s", rates, summary, r, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
