"""Benchmark: the streaming token reader vs the AR trainer's consumption, same machine, same run.

Workload: a token dataset at fashion32 shapes (120,000 train rows of 4 prologue + 64 visual codes,
drawn uniformly: the worst case for compression), written by the export's own Parquet and
WebDataset writers into 12 files of 10,000 rows (4,096-row groups/blocks), in a local store (or
--store). Each format is read for one shuffled epoch through `token_loader` with one loader worker
(the trainer's default). The consumption rate is the DeepSpeed AR trainer's tokens/s on the
fashion32 model (bench/ar_engine.py). Prints tokens/s and the ratio; the reader must be >= 20x.

    python bench/token_reader.py [--rows 120000] [--store s3://bucket/prefix]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from bench.common import machine, save_json
from pipelines.store import Store
from pipelines.token_reader import token_loader
from pipelines.workers.export import _write_parquet, _write_wds

Z, N, V, P, FILE_ROWS, GROUP = 4, 64, 512, 64, 10_000, 4096


def write_dataset(store: Store, rows: int):
    """A committed token_dataset artefact of `rows` random train rows (and one small val file)."""
    art = store.artifact("token_dataset", f"bench-{uuid.uuid4().hex[:8]}")
    rng = np.random.default_rng(0)
    files, layout = {}, {"parquet": {"train": [], "val": []}, "wds": {"train": [], "val": []}}
    with tempfile.TemporaryDirectory() as tmp:
        for i, start in enumerate(range(0, rows, FILE_ROWS)):
            n = min(FILE_ROWS, rows - start)
            data = {
                "key": [f"train_{(start + j) // 2:06d}" for j in range(n)],
                "label": rng.integers(0, 10, n).astype(np.int16),
                "aug": (np.arange(n) % 2).astype(np.uint8),
                "prologue": rng.integers(0, P, (n, Z)).astype(np.uint16),
                "visual": rng.integers(0, V, (n, N)).astype(np.uint16),
            }
            name = f"train-{i:06d}"
            for fmt, write in (("parquet", _write_parquet), ("wds", _write_wds)):
                rel = f"{fmt}/{name}.{'parquet' if fmt == 'parquet' else 'tar'}"
                args = (data, GROUP, name, tmp, art, rel) if fmt == "wds" else (data, GROUP, tmp, art, rel)
                files[rel], units = write(*args)
                layout[fmt]["train"].append({"file": rel, "rows": n, "units": units})
    codes = {"z_len": Z, "num_visual": N, "visual_codebook": V, "prologue_codebook": P}
    # a complete manifest of the typed shape the reader parses (what the export writes, minus its lineage)
    art.commit(files, layout=layout, codes=codes, counts={"rows": {"train": rows, "val": 0}}, config={},
               lineage={}, code_version="bench", profile="bench", views=["original", "flip"],
               classes=[str(c) for c in range(10)], sanity={})
    return art, {fmt: sum(f["size"] for rel, f in files.items() if rel.startswith(fmt)) for fmt in layout}


def read_rate(art, fmt: str, rows: int) -> float:
    """Tokens/s of one shuffled epoch through the training DataLoader (1 worker, batch 64)."""
    t0 = time.perf_counter()
    seen = 0
    for _, prologue, visual in token_loader(art, 64, num_workers=1, fmt=fmt, epochs=1, rank=0, world_size=1):
        seen += prologue.numel() + visual.numel()
    assert seen == rows * (Z + N), f"{fmt}: read {seen} tokens, expected {rows * (Z + N)}"
    return seen / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=120_000)
    ap.add_argument("--store", default="", help="store URL (default: a temp folder)")
    ap.add_argument("--json", default="", help="also write the figures to this JSON file")
    args = ap.parse_args()
    import ar_engine

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(args.store or tmp)
        art, size = write_dataset(store, args.rows)
        rates = {fmt: read_rate(art, fmt, args.rows) for fmt in ("parquet", "wds")}
    trainer = ar_engine.measure("fashion32", 64, steps=10, rounds=1)["deepspeed_tokens_per_s"]
    r = {
        "workload": f"{args.rows} rows x {Z + N} tokens, uniform random codes (bytes/token: "
        + ", ".join(f"{fmt} {b / args.rows / (Z + N):.2f}" for fmt, b in size.items())
        + "); 1 loader worker, batch 64, shuffled",
        "machine": machine(),
        "parquet_tokens_per_s": round(rates["parquet"]),
        "wds_tokens_per_s": round(rates["wds"]),
        "trainer_tokens_per_s": round(trainer),
        "parquet_ratio": round(rates["parquet"] / trainer, 1),
        "wds_ratio": round(rates["wds"] / trainer, 1),
    }
    print(f"{'':<34}{'tokens/s':>14}{'x trainer':>11}")
    print(f"{'token reader, Parquet':<34}{rates['parquet']:>14,.0f}{r['parquet_ratio']:>10.1f}x")
    print(f"{'token reader, WebDataset':<34}{rates['wds']:>14,.0f}{r['wds_ratio']:>10.1f}x")
    print(f"{'AR trainer (DeepSpeed, fashion32)':<34}{trainer:>14,.0f}{1:>10.1f}x")
    print(f"({r['workload']}; {r['machine']})")
    save_json(args.json, r)
    return 0 if min(r["parquet_ratio"], r["wds_ratio"]) >= 20 else 1


if __name__ == "__main__":
    sys.exit(main())
