"""Every benchmark in one command: each runs in its own process against a baseline measured in the
same run; the figures are collected into one table of ratios, written to bench/results/ and into
the README between its `<!-- bench -->` markers.

    python bench/run_all.py            # or: make bench
    python bench/run_all.py --only sampler features
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.results import copy_into_readme

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Bench:
    name: str
    what: str  # the comparison, measured vs baseline
    measured: tuple[str, str]  # (label, JSON key)
    baseline: tuple[str, str]
    unit: str
    args: tuple[str, ...] = ()


BENCHES = [
    Bench("sharding", "sharding: parallel vs one process",
          ("2 workers", "parallel_2_workers_images_per_s"), ("1 process", "single_process_images_per_s"), "img/s"),
    Bench("tokenizer_flops", "tokenizer training (prologue, GAN on) vs the sgemm limit (goal >= 50 %)",
          ("train_step", "prologue_gflops_per_s"), ("torch.mm 2048²", "sgemm_gflops_per_s"), "GFLOP/s"),
    Bench("export_rate", "token export: end to end vs the encoder forward alone (goal >= 0.8×)",
          ("write_shard", "end_to_end_rows_per_s"), ("encoder only", "encoder_only_rows_per_s"), "rows/s"),
    Bench("token_reader", "token reader vs AR trainer consumption",
          ("Parquet reader", "parquet_tokens_per_s"), ("DeepSpeed trainer", "trainer_tokens_per_s"), "tok/s"),
    Bench("ar_engine", "DeepSpeed engine vs plain PyTorch loop",
          ("DeepSpeed engine", "deepspeed_tokens_per_s"), ("plain loop", "plain_pytorch_tokens_per_s"), "tok/s"),
    Bench("sampler", "KV-cache vs no-cache sampling",
          ("KV cache", "kv_cache_tokens_per_s"), ("recompute prefix", "no_cache_tokens_per_s"), "tok/s"),
    Bench("ar_reference", "AR training: ours vs plain reference (goal >= 1.0×)",
          ("ARModel", "ours_tokens_per_s"), ("plain reference", "reference_tokens_per_s"), "tok/s"),
    Bench("sampler_reference", "KV-cache sampling: ours vs plain reference (goal >= 1.5×)",
          ("modeling.sampler", "ours_images_per_s"), ("plain reference", "reference_images_per_s"), "img/s"),
    Bench("rematerialise", "cached rematerialisation vs first materialisation (whole graph)",
          ("first run", "first_run_s"), ("cached rerun", "cached_run_s"), "s"),
    Bench("features", "feature extraction: end to end vs network only",
          ("shards -> embed", "end_to_end_images_per_s"), ("network only", "network_only_images_per_s"), "img/s"),
    Bench("evaluator_network", "EfficientNet-Lite0: BatchNorms folded, channels-last vs the pretrained net as loaded",
          ("folded", "folded_images_per_s"), ("as loaded", "pretrained_images_per_s"), "img/s"),
    Bench("domain_features", "domain-classifier embedding: end to end vs network only",
          ("shards -> embed", "end_to_end_images_per_s"), ("network only", "network_only_images_per_s"), "img/s"),
]


def _fmt(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:,.1f}"


def table(rows: list[tuple[Bench, dict, float]], machine: str, total_s: float) -> str:
    lines = [
        "| benchmark | measured | baseline | ratio | workload | wall |",
        "|---|---|---|---|---|---|",
    ]
    for b, fig, wall in rows:
        m, base = fig[b.measured[1]], fig[b.baseline[1]]
        lines.append(
            f"| {b.what} | {b.measured[0]}: {_fmt(m)} {b.unit} | {b.baseline[0]}: {_fmt(base)} {b.unit} "
            f"| **{m / base:.2f}×** | {fig['workload']} | {wall:.0f} s |"
        )
    lines.append(f"\n{machine}; all {len(rows)} benchmarks in {total_s / 60:.1f} min (`make bench`). "
                 "Ratio = measured / baseline, both from the same run.\n")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="run only these benchmarks")
    ap.add_argument("--no-readme", action="store_true", help="do not update the README's table")
    args = ap.parse_args()
    chosen = [b for b in BENCHES if not args.only or b.name in args.only]
    RESULTS.mkdir(parents=True, exist_ok=True)
    rows, start = [], time.perf_counter()
    for b in chosen:
        out = RESULTS / f"{b.name}.json"
        print(f"==> {b.name}: {b.what}", flush=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, str(ROOT / "bench" / f"{b.name}.py"), "--json", str(out), *b.args],
                       cwd=ROOT, check=True)
        rows.append((b, json.loads(out.read_text()), time.perf_counter() - t))
    total = time.perf_counter() - start
    machine = f"{platform.machine()}, {os.cpu_count()} cores, no GPU" if not _gpu() else f"{platform.machine()}, GPU"
    md = table(rows, machine, total)
    print("\n" + md)
    (RESULTS / "summary.md").write_text(md)
    if not args.only and not args.no_readme and copy_into_readme("bench", md):
        print("(copied into README.md)")
    return 0


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
