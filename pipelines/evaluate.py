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

from modeling.domain_classifier import embed
from modeling.fidelity import Embedder, set_metrics
from pipelines.loaders import load_tokenizer
from pipelines.manifests import ReferenceManifest, SamplesManifest, read
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.sampling import GUIDANCE
from pipelines.shard_reader import image_loader, labelled_batches, sample_set_images
from pipelines.store import Artifact, StepResult
from pipelines.token_reader import split_rows

log = logging.getLogger(__name__)


def _commit_metrics(plan: Plan, target: Target, metrics: dict, config: dict, files: dict | None = None) -> dict:
    """Write metrics.json and the manifest of a metric step (with any other files it wrote)."""
    files = {**(files or {}), "metrics.json": target.artifact.put_json("metrics.json", metrics).__dict__}
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
    if hashlib.sha256(raw).hexdigest() != read(artifact, "reference_stats").stats_sha256:
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
    plan.domain().require()
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
    metrics["domain"], files = _domain_reconstructions(plan, target, tokenizer, val)
    return _commit_metrics(plan, target, metrics, {"evaluators": list(refs)}, files)


def _domain_reconstructions(plan: Plan, target: Target, tokenizer, val: Artifact) -> tuple[dict, dict]:
    """The reconstruction ceiling under the domain evaluator: the first N val images (N: samples per
    guidance setting) reconstructed, against the held-out reference; their features are stored for
    the AR-only distance of the samples."""
    from pipelines.domain import features_stats, load_classifier, load_set, npz_bytes, set_figures

    domain = plan.domain()
    n = min(domain.config["ceiling_images"], domain.require().metrics["val_images"])
    classifier = load_classifier(domain.artifact)

    def batches():
        seen = 0
        for images, labels in image_loader(val, plan.profile.evaluation.feature_batch, num_workers=0, rank=0,
                                           world_size=1):  # fmt: skip
            with torch.no_grad():
                recon, _ = tokenizer(images.float().div(127.5).sub(1))
            yield ((recon.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[: n - seen], labels[: n - seen]
            seen += len(labels)
            if seen >= n:
                return

    embedded = embed(classifier, batches())
    figures = set_figures(*embedded, features_stats(load_set(domain.artifact, "reference")[0]))
    record = target.artifact.put_bytes("domain_reconstructions.npz", npz_bytes(*embedded))
    return figures, {"domain_reconstructions.npz": record.__dict__}


# -- generation metrics ------------------------------------------------------------------------------
def generation_metrics(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """gFD, KID, precision/recall and IS-style score of every sampling run's samples, with and
    without guidance; mean and spread over the runs when there are several."""
    target = plan.generation(variant)
    return cached_or_run(target, lambda: _generation(plan, target, variant, on_log), on_log)


def _sample_metrics(
    sets: list[tuple[int, Target, SamplesManifest]], refs: dict, plan: Plan, variant: str
) -> dict[int, dict]:
    """{seed: {guidance: metrics}} of every sample set under every evaluator and the domain evaluator."""
    ev = plan.profile.evaluation
    per_seed: dict[int, dict[str, Any]] = {seed: {g: {} for g in GUIDANCE} for seed, _, _ in sets}
    for e, w in plan.evaluators.items():
        reference, embed_images = load_reference(refs[e][0].artifact), Embedder(e, w)
        for seed, t, manifest in sets:
            for g in GUIDANCE:
                images = sample_set_images(t.artifact, manifest, g, ev.feature_samples_per_class)
                pool, logits = embed_images(im for im, _ in labelled_batches(images, ev.feature_batch))
                per_seed[seed][g] |= set_metrics(pool, logits, reference, e) | {"samples": len(pool)}
    from pipelines.domain import features_stats, load_classifier, load_set

    # the classifier and both reference statistics once per variant, not once per sample set
    domain, recon = plan.domain().artifact, plan.reconstruction(variant).artifact
    classifier = load_classifier(domain)
    reference = features_stats(load_set(domain, "reference")[0])
    own = features_stats(load_set(recon, "domain_reconstructions")[0])
    for seed, t, manifest in sets:
        for g in GUIDANCE:
            images = sample_set_images(t.artifact, manifest, g)
            per_seed[seed][g] |= _domain_figures(classifier, reference, own, images)
    return per_seed


def _domain_figures(classifier, reference: tuple, own: tuple, images: Iterable) -> dict[str, float]:
    """fd_domain against the held-out reference, class consistency (share classified as their
    conditioning class) and fd_domain_ar_only: against the variant's own val reconstructions, what
    the AR adds to the tokenizer's distance."""
    from modeling.fidelity import fd_from_features
    from pipelines.domain import set_figures

    embedded = embed(classifier, labelled_batches(images, 500))
    figures = set_figures(*embedded, reference)
    return {
        "fd_domain": figures["fd_domain"],
        "class_consistency": figures["class_consistency"],
        "fd_domain_ar_only": fd_from_features(embedded[0].double().numpy(), *own),
        "domain_samples": figures["images"],
    }


def _generation(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    sets = [(seed, t, t.require()) for seed, t in zip(plan.sampling_seeds, plan.samples(variant), strict=True)]
    plan.domain().require()
    plan.reconstruction(variant).require()
    refs = _references(plan)
    per_seed = _sample_metrics(sets, refs, plan, variant)
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
    metrics |= {"seed_rule": first.seed_rule, "samplers": first.samplers}
    return _commit_metrics(plan, target, metrics, {"evaluators": list(refs)})


# -- linear probe -------------------------------------------------------------------------------------
def linear_probe(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Top-1 of a logistic regression on tokens, each view read two ways (codebook vectors, one-hot
    codes): the prologue tokens (prologue variants), the first z visual tokens (z: the variant's own
    z_len; the baseline: every z_len of the profile) and all visual tokens (codebook vectors only)."""
    target = plan.probe(variant)
    return cached_or_run(target, lambda: _probe(plan, target, variant, on_log), on_log)


def _probe_views(tokenizer, lengths: list[int]) -> dict[str, Callable]:
    """{view: (prologue, visual) -> features}; one-hot features are dense, so all visual tokens are
    read by codebook vector only."""
    from modeling.probe import embed_tokens, one_hot_tokens

    visual_table, visual_k = tokenizer.visual_quantizer.entries(), tokenizer.cfg.visual_codebook
    views: dict[str, Callable] = {}
    if tokenizer.prologue_quantizer is not None:
        prologue_table, prologue_k = tokenizer.prologue_quantizer.entries(), tokenizer.cfg.prologue_codebook
        views["prologue"] = lambda p, v: embed_tokens(p, prologue_table)
        views["prologue_onehot"] = lambda p, v: one_hot_tokens(p, prologue_k)
    for z in lengths:
        views[f"first_visual_z{z}"] = lambda p, v, z=z: embed_tokens(v[:, :z], visual_table)
        views[f"first_visual_z{z}_onehot"] = lambda p, v, z=z: one_hot_tokens(v[:, :z], visual_k)
    views["all_visual"] = lambda p, v: embed_tokens(v, visual_table)
    return views


def _probe(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    from modeling.probe import linear_probe as fit

    tokens = plan.tokens(variant)
    tokens.require()
    ev = plan.profile.evaluation
    tokenizer = load_tokenizer(plan.tokenizer(variant).artifact)
    data = {split: split_rows(tokens.artifact, split) for split in ("train", "val")}
    metrics: dict[str, Any] = {}
    for name, features in _probe_views(tokenizer, target.config["first_visual"]).items():
        (ty, tp, tv), (vy, vp, vv) = data["train"], data["val"]
        metrics[name] = fit(features(tp, tv), ty, features(vp, vv), vy, steps=ev.probe_steps, seed=0)
        on_log(f"linear probe on {name}: top-1 {metrics[name]['top1']:.4f}")
    metrics["train_rows"], metrics["val_rows"] = len(data["train"][0]), len(data["val"][0])
    return _commit_metrics(plan, target, metrics, target.config)


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
