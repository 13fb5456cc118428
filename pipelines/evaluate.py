"""Evaluation steps: reference statistics, reconstruction and generation metrics, linear probe.

Features come from the evaluator registered with torch-fidelity (`modeling.features`, EfficientNet-
Lite0 by default: metrics are named `*_effnetlite0`, never FID) and are streamed batch by batch, so
no image set is held in memory; `modeling.fidelity.set_metrics` turns them into FD, KID,
precision/recall and the IS-style score. The reference set (the first `evaluation.reference_images`
val images) is the `reference_stats[evaluator]` asset: its features and `stats.npz` (mu, sigma),
with the stats file's sha256 recorded in every metric.

Standalone: `python -m pipelines.evaluate --profile fashion32 --step generation_metrics --variant prologue`.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import tempfile
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from modeling.fidelity import Embedder, set_metrics
from pipelines.loaders import load_tokenizer
from pipelines.manifests import ReferenceManifest, SamplesManifest
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.sampling import GUIDANCE
from pipelines.shard_reader import image_dataset, image_loader
from pipelines.store import Artifact, StepResult

log = logging.getLogger(__name__)


def _commit_metrics(plan: Plan, target: Target, metrics: dict, config: dict) -> dict:
    """Write metrics.json and the manifest of a metric step."""
    files = {"metrics.json": target.artifact.put_json("metrics.json", metrics).__dict__}
    return target.artifact.commit(
        files,
        config=config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[target.asset],
        metrics=metrics,
        profile=plan.label,
    )


def _val_images(val: Artifact, batch: int) -> Iterable[torch.Tensor]:
    return (images for images, _ in image_loader(val, batch, num_workers=0, rank=0, world_size=1))


# -- reference statistics ----------------------------------------------------------------------------
def reference_stats(plan: Plan, evaluator: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Features and (mu, sigma) of the reference set (the first val images) under one evaluator."""
    target = plan.reference(evaluator)
    return cached_or_run(target, lambda: _reference(plan, target, evaluator), on_log)


def _reference(plan: Plan, target: Target, evaluator: str) -> dict:
    from modeling.fidelity import feature_stats, save_stats

    val = plan.shards("val")
    val.require()
    ev, artifact = plan.profile.evaluation, target.artifact
    embed = Embedder(evaluator, plan.evaluators[evaluator])
    pool, _ = embed(_val_images(val.artifact, ev.feature_batch), ev.reference_images)
    mu, sigma = feature_stats(pool.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        save_stats(os.path.join(tmp, "stats.npz"), mu, sigma)
        stats = artifact.put_file(os.path.join(tmp, "stats.npz"), "stats.npz").__dict__
    files = {"stats.npz": stats, "features.npy": artifact.put_bytes("features.npy", _npy(pool.numpy())).__dict__}
    return artifact.commit(
        files,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[target.asset],
        counts={"images": len(pool)},
        stats_sha256=files["stats.npz"]["sha256"],
    )


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def load_reference(artifact: Artifact) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    """(mu, sigma, features) of a reference_stats artefact, after checking the stats checksum."""
    import hashlib

    raw = artifact.read_bytes("stats.npz")
    if hashlib.sha256(raw).hexdigest() != artifact.manifest()["stats_sha256"]:
        raise ValueError(f"{artifact.uri}: stats.npz does not match its recorded sha256")
    with np.load(io.BytesIO(raw)) as data:
        mu, sigma = data["mu"], data["sigma"]
    return mu, sigma, torch.from_numpy(np.load(io.BytesIO(artifact.read_bytes("features.npy"))))


def _references(plan: Plan) -> dict[str, tuple[Target, ReferenceManifest]]:
    """Every evaluator's reference target and manifest (required: an input of the metric steps)."""
    return {e: (t, t.require()) for e, t in plan.references().items()}


def _reference_fields(refs: dict[str, tuple[Target, ReferenceManifest]], main: str) -> dict[str, Any]:
    m = refs[main][1]
    return {
        "reference": "val",
        "reference_images": m.counts.images,
        "reference_sha256": m.stats_sha256,
        "references": {e: rm.stats_sha256 for e, (_, rm) in refs.items()},
    }


# -- reconstruction metrics ---------------------------------------------------------------------------
def reconstruction_metrics(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """rFD (reconstructions of the reference images vs the reference set) and their PSNR."""
    target = plan.reconstruction(variant)
    return cached_or_run(target, lambda: _reconstruction(plan, target, variant), on_log)


def _reconstruction(plan: Plan, target: Target, variant: str) -> dict:
    from modeling.tokenizer_eval import psnr

    tok = plan.tokenizer(variant)
    tok.require()
    refs = _references(plan)
    val, ev = plan.shards("val").artifact, plan.profile.evaluation
    tokenizer, psnrs = load_tokenizer(tok.artifact), []

    def reconstructions(record_psnr: bool):
        for images in _val_images(val, ev.feature_batch):
            x = images.float().div(127.5).sub(1)
            with torch.no_grad():
                recon, _ = tokenizer(x)
            if record_psnr:
                psnrs.append(psnr(recon, x))
            yield ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)

    metrics: dict[str, Any] = {}
    for i, (e, w) in enumerate(plan.evaluators.items()):
        ref_target, ref_manifest = refs[e]
        pool, logits = Embedder(e, w)(reconstructions(i == 0), ref_manifest.counts.images)
        for k, v in set_metrics(pool, logits, load_reference(ref_target.artifact), e).items():
            metrics["r" + k if k.startswith(("fd_", "fid_")) else f"recon_{k}"] = v
    n = refs[ev.evaluator][1].counts.images
    metrics |= {"psnr_db": float(torch.cat(psnrs)[:n].mean()), "images": n}
    metrics |= _reference_fields(refs, ev.evaluator)
    return _commit_metrics(plan, target, metrics, {"evaluators": list(refs)})


# -- generation metrics ------------------------------------------------------------------------------
def generation_metrics(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """gFD, KID, precision/recall and IS-style score of every sampling run's samples, with and
    without guidance; mean and spread over the runs when there are several."""
    target = plan.generation(variant)
    return cached_or_run(target, lambda: _generation(plan, target, variant, on_log), on_log)


def _sample_metrics(sets: list[tuple[int, Target, SamplesManifest]], refs: dict, plan: Plan) -> dict[int, dict]:
    """{seed: {guidance: metrics}} of every sample set under every evaluator."""
    per_seed: dict[int, dict[str, Any]] = {seed: {g: {} for g in GUIDANCE} for seed, _, _ in sets}
    for e, w in plan.evaluators.items():
        reference, embed = load_reference(refs[e][0].artifact), Embedder(e, w)
        for seed, t, manifest in sets:
            for g in GUIDANCE:
                rels = manifest.layout[g]
                sub = {"shards": rels, "files": {r: {"size": manifest.files[r].size} for r in rels}}
                images = image_dataset(t.artifact, sub, rank=0, world_size=1)
                chunks = _chunks(images, plan.profile.evaluation.feature_batch)
                batches = (torch.stack([im for im, _ in c]) for c in chunks)
                pool, logits = embed(batches)
                per_seed[seed][g] |= set_metrics(pool, logits, reference, e) | {"samples": len(pool)}
    return per_seed


def _generation(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    sets = [(seed, t, t.require()) for seed, t in zip(plan.sampling_seeds, plan.samples(variant), strict=True)]
    refs = _references(plan)
    per_seed = _sample_metrics(sets, refs, plan)
    seeds = list(per_seed)
    for seed in seeds:
        for g in GUIDANCE:
            on_log(f"seed {seed} {g}: " + ", ".join(f"{k}={v:.4g}" for k, v in per_seed[seed][g].items()))
    metrics: dict[str, Any] = dict(per_seed[seeds[0]])  # the first run's figures, as with one run
    if len(seeds) > 1:  # mean and spread (sample std) of every figure over the runs
        metrics["seeds"] = seeds
        metrics["per_seed"] = {str(s): m for s, m in per_seed.items()}
        metrics["over_seeds"] = {
            g: {
                k: {"mean": float(np.mean(v := [per_seed[s][g][k] for s in seeds])), "std": float(np.std(v, ddof=1))}
                for k in per_seed[seeds[0]][g]
            }
            for g in GUIDANCE
        }
    first = sets[0][2]
    metrics |= _reference_fields(refs, plan.profile.evaluation.evaluator)
    metrics |= {"seed_rule": first.seed_rule, "sampler": first.config["sampler"]}
    return _commit_metrics(plan, target, metrics, {"evaluators": list(refs)})


def _chunks(items: Iterable, n: int) -> Iterable[list]:
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# -- linear probe -------------------------------------------------------------------------------------
def linear_probe(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Top-1 of a logistic regression on embedded tokens (each code -> its tokenizer codebook vector):
    the prologue tokens (prologue variant), the first z_len visual tokens and all visual tokens."""
    target = plan.probe(variant)
    return cached_or_run(target, lambda: _probe(plan, target, variant, on_log), on_log)


def _probe(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    from modeling.probe import embed_tokens
    from modeling.probe import linear_probe as fit

    tokens = plan.tokens(variant)
    tokens.require()
    ev = plan.profile.evaluation
    tokenizer = load_tokenizer(plan.tokenizer(variant).artifact)
    data = {split: _rows(tokens.artifact, split) for split in ("train", "val")}
    z = plan.profile.tokenizer.z_len
    visual_table = tokenizer.visual_quantizer.entries()
    views = {
        "first_visual": lambda p, v: embed_tokens(v[:, :z], visual_table),
        "all_visual": lambda p, v: embed_tokens(v, visual_table),
    }
    if tokenizer.prologue_quantizer is not None:
        prologue_table = tokenizer.prologue_quantizer.entries()
        views = {"prologue": lambda p, v: embed_tokens(p, prologue_table), **views}
    metrics: dict[str, Any] = {}
    for name, embed in views.items():
        (ty, tp, tv), (vy, vp, vv) = data["train"], data["val"]
        metrics[name] = fit(embed(tp, tv), ty, embed(vp, vv), vy, steps=ev.probe_steps, seed=0)
        on_log(f"linear probe on {name}: top-1 {metrics[name]['top1']:.4f}")
    metrics["train_rows"], metrics["val_rows"] = len(data["train"][0]), len(data["val"][0])
    return _commit_metrics(plan, target, metrics, target.config)


def _rows(artifact: Artifact, split: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(labels, prologue, visual) of one split, original views only (aug 0), in storage order."""
    import pyarrow.parquet as pq

    parts = []
    for f in artifact.manifest()["layout"]["parquet"][split]:
        with artifact.store.open_url(artifact.file_uri(f["file"])) as stream:
            t = pq.read_table(stream, columns=["label", "aug", "prologue", "visual"], filters=[("aug", "=", 0)])
        n = t.num_rows
        parts.append(
            (
                torch.from_numpy(t.column("label").to_numpy().astype(np.int64)),
                torch.from_numpy(t.column("prologue").combine_chunks().flatten().to_numpy().astype(np.int64)).view(
                    n, -1
                ),
                torch.from_numpy(t.column("visual").combine_chunks().flatten().to_numpy().astype(np.int64)).view(n, -1),
            )
        )
    return tuple(torch.cat(p) for p in zip(*parts, strict=True))


def _numbers(metrics: dict, prefix: str = "") -> str:
    return ", ".join(f"{prefix}{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))


SUMMARIES: dict[str, Callable[[Any], str]] = {
    "reference_stats": lambda m: f"{m.counts.images} images, stats sha256 {m.stats_sha256[:12]}",
    "reconstruction_metrics": lambda m: _numbers(m.metrics),
    "generation_metrics": lambda m: "; ".join(f"{g}: {_numbers(m.metrics[g])}" for g in GUIDANCE)
    + f"; {m.metrics['reference_images']} reference images",
    "linear_probe": lambda m: ", ".join(
        f"top-1 {k} {v['top1']:.3f}" for k, v in m.metrics.items() if isinstance(v, dict)
    )
    + f" ({m.metrics['train_rows']} train_rows)",
}


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--step", choices=list(SUMMARIES), default="generation_metrics")
    args, rest = parser.parse_known_args(argv)
    doc = __doc__ + f"\nStep: {args.step} (choose with --step)."
    return step_main(doc, rest, args.step, summary=SUMMARIES[args.step])


if __name__ == "__main__":
    sys.exit(main())
