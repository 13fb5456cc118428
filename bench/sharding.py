"""Benchmark: parallel sharder vs a single-process loop, same images, same run.

Workload: the first N Fashion-MNIST train images (default 20,000), padded to 32x32 RGB, encoded
as PNG and written as WebDataset shards of 1,000 images into a fresh local store (or --store).
Both variants produce byte-identical shards (checked). Prints images/s and the speed-up ratio.

    python bench/sharding.py [--images 20000] [--workers 2] [--store s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import machine, report
from pipelines.plan import Plan
from pipelines.profiles import load_profile
from pipelines.sharding import shard_split
from pipelines.store import Store


def run(images: int, workers: int, store_url: str) -> tuple[float, dict]:
    profile = load_profile("fashion32", [f"data.train.limit={images}", "data.shard_size=1000",
                                         f"data.workers={workers}", "data.preview=0"])
    result = shard_split(Plan.from_listing(profile, Store(store_url)), "train", progress=False, on_log=lambda _: None)
    assert not result.cached and result.manifest.counts.samples == images
    return images / result.seconds, {rel: f.sha256 for rel, f in result.manifest.files.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=20000)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--store", default="", help="base store URL (default: a temp folder)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.store.rstrip("/") or tmp
        tag = uuid.uuid4().hex[:8]
        single, files1 = run(args.images, 1, f"{base}/bench-{tag}-single")
        parallel, files2 = run(args.images, args.workers, f"{base}/bench-{tag}-parallel")
    assert files1 == files2, "parallel and single-process shards differ"
    rows = {
        "workload": f"{args.images} Fashion-MNIST images -> 32x32 PNG, shards of 1000",
        "machine": machine(),
        "single_process_images_per_s": round(single, 1),
        f"parallel_{args.workers}_workers_images_per_s": round(parallel, 1),
        "speedup": round(parallel / single, 2),
    }
    rates = [("single process", single), (f"parallel, {args.workers} workers", parallel)]
    report("images/s", rates, f"speed-up: {parallel / single:.2f}x", rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
