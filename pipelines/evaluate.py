"""Evaluation steps: reference statistics, reconstruction and generation metrics, linear probe.

Features come from the evaluator registered with torch-fidelity (`modeling.features`, EfficientNet-
Lite0 by default: metrics are named `*_effnetlite0`, never FID) and are streamed batch by batch, so
no image set is held in memory. The metrics are torch-fidelity's feature-to-metric functions (KID,
precision/recall, IS-style score) and our Fréchet distance (`modeling.fidelity`, checked against
scipy and torch-fidelity). The reference set (the first `evaluation.reference_images` val images)
is embedded once per (val shards, evaluator): its features and `stats.npz` (mu, sigma) are cached in
the store as `reference_stats/<key>/`, with the stats file's sha256 recorded in every metric.

Standalone: `python -m pipelines.evaluate --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from pipelines.profiles import Profile, load_profile
from pipelines.sampling import GUIDANCE, generate_samples, seeded_profiles
from pipelines.shard_reader import image_dataset, image_loader
from pipelines.store import Artifact, StepResult, Store, cache_key
from pipelines.token_export import export_tokens
from pipelines.train_tokenizer import load_tokenizer, train_tokenizer

CODE_VERSION = "1"
log = logging.getLogger(__name__)


def _cached(store: Store, asset: str, config: dict, inputs: dict, on_log) -> tuple[Artifact, dict | None]:
    artifact = store.artifact(asset, cache_key(asset, CODE_VERSION, config, inputs))
    manifest = artifact.manifest()
    if manifest is not None:
        on_log(f"{asset} already materialised at {artifact.uri}")
    return artifact, manifest


def _commit_metrics(
    artifact: Artifact, metrics: dict, config: dict, lineage: dict, profile: Profile, start: float
) -> StepResult:
    """Write metrics.json and the manifest of a metric step."""
    files = {"metrics.json": artifact.put_bytes("metrics.json", json.dumps(metrics, indent=1).encode()).__dict__}
    manifest = artifact.commit(
        files,
        config=config,
        lineage=lineage,
        code_version=CODE_VERSION,
        metrics=metrics,
        profile=f"{profile.name}@{profile.version}",
    )
    return StepResult(artifact, manifest, False, time.perf_counter() - start)


class Embedder:
    """A torch-fidelity feature extractor: uint8 batches -> (pooled features, logits).

    effnetlite0: EfficientNet-Lite0 (registered by modeling.features), 1280-d pool + 1000 logits.
    inception: torch-fidelity's InceptionV3 from a local weights file, 2048-d pool + unbiased logits.
    """

    def __init__(self, evaluator: str, weights_path: str = ""):
        from torch_fidelity.utils import create_feature_extractor

        from modeling.features import register

        self.cuda = torch.cuda.is_available()
        if evaluator == "effnetlite0":
            self.extractor = create_feature_extractor(register(), ["pool", "logits"], cuda=self.cuda, verbose=False)
        elif evaluator == "inception" and weights_path:
            self.extractor = create_feature_extractor(
                "inception-v3-compat",
                ["2048", "logits_unbiased"],
                cuda=self.cuda,
                verbose=False,
                feature_extractor_weights_path=weights_path,
            )
        else:
            raise ValueError(f"evaluator {evaluator!r} needs a local weights file (nothing is downloaded)")

    @torch.no_grad()
    def __call__(self, batches: Iterable[torch.Tensor], limit: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        pools, logits, seen = [], [], 0
        for images in batches:
            if limit:
                images = images[: limit - seen]
            pool, logit = self.extractor(images.cuda() if self.cuda else images)
            pools.append(pool.float().cpu())
            logits.append(logit.float().cpu())
            seen += len(images)
            if limit and seen >= limit:
                break
        return torch.cat(pools), torch.cat(logits)


def evaluators(profile: Profile) -> dict[str, str]:
    """{evaluator: weights path}: EfficientNet-Lite0 always, InceptionV3 when a weights file is configured."""
    ev = profile.evaluation
    return {ev.evaluator: ""} | ({"inception": ev.inception_weights} if ev.inception_weights else {})


def _val_images(val: Artifact, batch: int) -> Iterable[torch.Tensor]:
    return (images for images, _ in image_loader(val, batch, num_workers=0, rank=0, world_size=1))


# -- reference statistics ----------------------------------------------------------------------------
def reference_stats(
    profile: Profile, store: Store, val: Artifact, evaluator: str, weights: str = "", on_log=log.info
) -> StepResult:
    """Features and (mu, sigma) of the reference set under one evaluator, computed once and cached."""
    from modeling.fidelity import feature_stats, save_stats, sha256_file

    start = time.perf_counter()
    ev = profile.evaluation
    config = {"evaluator": evaluator, "images": ev.reference_images}
    if weights:
        config["weights_sha256"] = sha256_file(weights)
    artifact, manifest = _cached(store, "reference_stats", config, {"image_shards/val": val.key}, on_log)
    if manifest is not None:
        return StepResult(artifact, manifest, True, time.perf_counter() - start)
    pool, _ = Embedder(evaluator, weights)(_val_images(val, ev.feature_batch), ev.reference_images)
    mu, sigma = feature_stats(pool.numpy())
    with tempfile.TemporaryDirectory() as tmp:
        save_stats(os.path.join(tmp, "stats.npz"), mu, sigma)
        stats = artifact.put_file(os.path.join(tmp, "stats.npz"), "stats.npz").__dict__
    files = {"stats.npz": stats, "features.npy": artifact.put_bytes("features.npy", _npy(pool.numpy())).__dict__}
    manifest = artifact.commit(
        files,
        config=config,
        lineage={"image_shards/val": val.key},
        code_version=CODE_VERSION,
        counts={"images": len(pool)},
        stats_sha256=files["stats.npz"]["sha256"],
    )
    return StepResult(artifact, manifest, False, time.perf_counter() - start)


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


def set_metrics(pool: torch.Tensor, logits: torch.Tensor, ref: tuple, evaluator: str) -> dict[str, float]:
    """FD, KID, precision/recall against the reference, and the IS-style score, named by evaluator."""
    from torch_fidelity.metric_isc import isc_features_to_metric
    from torch_fidelity.metric_kid import kid_features_to_metric
    from torch_fidelity.metric_prc import prc_features_to_metric

    from modeling.fidelity import fd_from_features

    mu, sigma, ref_pool = ref
    n = min(len(pool), len(ref_pool))
    kid = kid_features_to_metric(pool, ref_pool, kid_subset_size=min(1000, n), verbose=False)
    prc = prc_features_to_metric(pool, ref_pool, save_cpu_ram=True, verbose=False)
    isc = isc_features_to_metric(logits, splits=min(10, len(logits)))
    e = evaluator
    fd = "fid" if e == "inception" else "fd"  # only InceptionV3's Fréchet distance is a FID
    return {
        f"{fd}_{e}": fd_from_features(pool.numpy(), mu, sigma),
        f"kid_{e}_mean": kid["kernel_inception_distance_mean"],
        f"kid_{e}_std": kid["kernel_inception_distance_std"],
        f"precision_{e}": prc["precision"],
        f"recall_{e}": prc["recall"],
        f"is_{e}_mean": isc["inception_score_mean"],
        f"is_{e}_std": isc["inception_score_std"],
    }


# -- reconstruction metrics ---------------------------------------------------------------------------
def reconstruction_metrics(profile: Profile, variant: str, store: Store, on_log=log.info) -> StepResult:
    """rFD (reconstructions of the reference images vs the reference set) and their PSNR."""
    from modeling.tokenizer_eval import psnr

    start = time.perf_counter()
    tok = train_tokenizer(profile, variant, store, on_log=on_log, progress=False)
    val = store.artifact("image_shards", tok.manifest["lineage"]["image_shards/val"])
    refs = {e: reference_stats(profile, store, val, e, w, on_log) for e, w in evaluators(profile).items()}
    ev = profile.evaluation
    inputs = {"tokenizer": tok.artifact.key} | {f"reference_stats/{e}": r.artifact.key for e, r in refs.items()}
    artifact, manifest = _cached(store, "reconstruction_metrics", {}, inputs, on_log)
    if manifest is not None:
        return StepResult(artifact, manifest, True, time.perf_counter() - start)
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
    for i, (e, w) in enumerate(evaluators(profile).items()):
        n = refs[e].manifest["counts"]["images"]
        pool, logits = Embedder(e, w)(reconstructions(i == 0), n)
        for k, v in set_metrics(pool, logits, load_reference(refs[e].artifact), e).items():
            metrics["r" + k if k.startswith(("fd_", "fid_")) else f"recon_{k}"] = v
    main = refs[ev.evaluator].manifest
    metrics |= {
        "psnr_db": float(torch.cat(psnrs)[: main["counts"]["images"]].mean()),
        "images": main["counts"]["images"],
        "reference": "val",
        "reference_images": main["counts"]["images"],
        "reference_sha256": main["stats_sha256"],
        "references": {e: r.manifest["stats_sha256"] for e, r in refs.items()},
    }
    return _commit_metrics(artifact, metrics, {"evaluators": list(refs)}, inputs, profile, start)


# -- generation metrics ------------------------------------------------------------------------------
def generation_metrics(profile: Profile, variant: str, store: Store, on_log=log.info) -> StepResult:
    """gFD, KID, precision/recall and IS-style score of the samples, with and without guidance."""
    start = time.perf_counter()
    runs = seeded_profiles(profile)
    sets = [generate_samples(p, variant, store, on_log=on_log, progress=False) for p in runs]
    samples = sets[0]
    tok_key = samples.manifest["lineage"]["tokenizer"]
    val_key = store.artifact("tokenizer", tok_key).manifest()["lineage"]["image_shards/val"]
    val = store.artifact("image_shards", val_key)
    refs = {e: reference_stats(profile, store, val, e, w, on_log) for e, w in evaluators(profile).items()}
    ev = profile.evaluation
    seeds = [p.sampler.seed for p in runs]
    inputs = {"samples": samples.artifact.key} | {f"reference_stats/{e}": r.artifact.key for e, r in refs.items()}
    inputs |= {f"samples/seed{s}": r.artifact.key for s, r in zip(seeds[1:], sets[1:], strict=True)}
    artifact, manifest = _cached(store, "generation_metrics", {}, inputs, on_log)
    if manifest is not None:
        return StepResult(artifact, manifest, True, time.perf_counter() - start)
    per_seed: dict[int, dict[str, Any]] = {s: {g: {} for g in GUIDANCE} for s in seeds}
    for e, w in evaluators(profile).items():
        reference, embed = load_reference(refs[e].artifact), Embedder(e, w)
        for seed, sample_set in zip(seeds, sets, strict=True):
            for g in GUIDANCE:
                rels = sample_set.manifest["layout"][g]
                sub = {"shards": rels, "files": {r: sample_set.manifest["files"][r] for r in rels}}
                images = image_dataset(sample_set.artifact, sub, rank=0, world_size=1)
                batches = (torch.stack([im for im, _ in chunk]) for chunk in _chunks(images, ev.feature_batch))
                pool, logits = embed(batches)
                per_seed[seed][g] |= set_metrics(pool, logits, reference, e) | {"samples": len(pool)}
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
    main = refs[ev.evaluator].manifest
    metrics |= {
        "reference": "val",
        "reference_images": main["counts"]["images"],
        "reference_sha256": main["stats_sha256"],
        "references": {e: r.manifest["stats_sha256"] for e, r in refs.items()},
        "seed_rule": samples.manifest["seed_rule"],
        "sampler": samples.manifest["config"]["sampler"],
    }
    return _commit_metrics(artifact, metrics, {"evaluators": list(refs)}, inputs, profile, start)


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
def linear_probe(profile: Profile, variant: str, store: Store, on_log=log.info) -> StepResult:
    """Top-1 of a logistic regression on embedded tokens (each code -> its tokenizer codebook vector):
    the prologue tokens (prologue variant), the first z_len visual tokens and all visual tokens."""
    from modeling.probe import embed_tokens
    from modeling.probe import linear_probe as fit

    start = time.perf_counter()
    tokens = export_tokens(profile, variant, store, on_log=on_log, progress=False)
    ev = profile.evaluation
    config = {"steps": ev.probe_steps, "z_len": profile.tokenizer.z_len}
    artifact, manifest = _cached(store, "linear_probe", config, {"token_dataset": tokens.artifact.key}, on_log)
    if manifest is not None:
        return StepResult(artifact, manifest, True, time.perf_counter() - start)
    tokenizer = load_tokenizer(store.artifact("tokenizer", tokens.manifest["lineage"]["tokenizer"]))
    data = {split: _rows(tokens.artifact, split) for split in ("train", "val")}
    z = profile.tokenizer.z_len
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
    return _commit_metrics(artifact, metrics, config, {"token_dataset": tokens.artifact.key}, profile, start)


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


STEPS = {
    "reconstruction_metrics": reconstruction_metrics,
    "generation_metrics": generation_metrics,
    "linear_probe": linear_probe,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default=os.environ.get("PROLOGUE_PROFILE", "fashion32"))
    parser.add_argument("--variant", action="append", help="variant(s) (default: the profile's variants)")
    parser.add_argument("--step", choices=list(STEPS), action="append", help="step(s) (default: all)")
    parser.add_argument("--store", default=None, help="store URL (default: $PROLOGUE_STORE or ./store)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    profile, store = load_profile(args.profile, args.overrides), Store(args.store)
    for variant in args.variant or profile.variants:
        for name in args.step or STEPS:
            r = STEPS[name](profile, variant, store, on_log=print)
            print(f"{name}[{variant}]: {json.dumps(r.manifest['metrics'])[:400]} -> {r.artifact.uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
