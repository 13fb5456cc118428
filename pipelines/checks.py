"""Integrity checks of stored artefacts: what the asset checks run, usable without Dagster.

Each function returns a list of problems (empty: the artefact passed), phrased so that the
message alone says what is wrong and where. `full=False` is the cheap form the assets run on an
artefact they reused: the manifest is there and every file has its recorded size, without reading
a byte of the files (a weekly retrain with nothing new must not re-read the data set from S3); the
full form (checksums, row counts, weight values) runs on what a step has just written, and on demand
as the `integrity` job's checks.
"""

from __future__ import annotations

import pyarrow.parquet as pq
import torch
from safetensors.torch import load as load_safetensors

from pipelines.manifests import parse
from pipelines.store import Artifact


def shard_problems(art: Artifact, full: bool = True) -> list[str]:
    """image_shards: every file present with its recorded size (and sha256), and the counts add up."""
    raw = art.manifest()
    problems = art.verify(raw, checksums=full)
    if raw is None:
        return problems
    m = parse(raw)
    counts = m.counts
    if len(m.shards) != counts.shards:
        problems.append(f"{len(m.shards)} shards listed, counts say {counts.shards}")
    if counts.samples + counts.corrupt != counts.source_items:
        problems.append(f"{counts.samples} samples + {counts.corrupt} corrupt != {counts.source_items} source items")
    if sum(counts.per_class.values()) != counts.samples:
        problems.append(f"per-class counts sum to {sum(counts.per_class.values())}, not {counts.samples}")
    return problems


def token_problems(art: Artifact, full: bool = True) -> list[str]:
    """token_dataset: files intact (sizes; sha256 and every split's Parquet row count when full)."""
    raw = art.manifest()
    problems = art.verify(raw, checksums=full)
    if problems or raw is None or not full:
        return problems
    m = parse(raw)
    for split, files in m.layout["parquet"].items():
        rows = 0
        for f in files:
            with art.fs.open(art.file_path(f["file"]), "rb") as fh:
                n = pq.ParquetFile(fh).metadata.num_rows
            if n != f["rows"]:
                problems.append(f"{f['file']}: {n} rows, manifest says {f['rows']}")
            rows += n
        if rows != m.counts["rows"][split]:
            problems.append(f"{split}: {rows} Parquet rows, counts say {m.counts['rows'][split]}")
    return problems


def finite_problems(art: Artifact, full: bool = True) -> list[str]:
    """Checkpoints (every `.safetensors` file of the artefact): no NaN or Inf in any tensor (when
    not full: the files are there with their sizes)."""
    raw = art.manifest()
    if raw is None or not full:
        return art.verify(raw)
    files = [rel for rel in parse(raw).files if rel.endswith(".safetensors")]
    if not files:
        return ["no .safetensors weights in the manifest"]
    problems = []
    for rel in files:
        for name, tensor in load_safetensors(art.read_bytes(rel)).items():
            if tensor.is_floating_point():
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    problems.append(f"{rel}: {name} has {bad} NaN/Inf values")
    return problems


def codebook_problems(art: Artifact, floor: float) -> list[str]:
    """Tokenizer: the fraction of each codebook used on val images is at least `floor` (a collapsed
    codebook passes every loss curve but wastes the model)."""
    metrics = parse(art.manifest()).metrics
    problems = []
    for book in ("visual_codes", "prologue_codes"):
        if book in metrics and metrics[book]["fraction_used"] < floor:
            problems.append(f"{book}: {metrics[book]['fraction_used']:.3f} of the codebook used, floor {floor}")
    return problems
