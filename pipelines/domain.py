"""The domain evaluator: a small classifier of the data set's own classes (`modeling.domain_classifier`),
trained as the cached asset `domain_classifier` on the train shards minus `evaluation.domain_holdout_shards`.

EfficientNet-Lite0's ImageNet features on 32² grey images cannot resolve what the prologue changes
(class fidelity, global coherence); a classifier of the domain can. It gives `fd_domain` (Fréchet
distance on its penultimate features) and class consistency (the share of images it assigns to the
class they were conditioned on, or labelled with). Reference sets:

- reporting reference: the held-out train shards (never seen by the classifier), `reference.npz`;
- tuning reference and real-image ceiling: the val split, `val.npz` (features, labels, predictions).

The real-image ceiling (`fd_domain` and consistency of the first N val images, N = samples per
guidance setting) is in this artefact's metrics; the reconstruction ceiling is in each variant's
`reconstruction_metrics`. Standalone: `python -m pipelines.domain --profile fashion32`.
"""

from __future__ import annotations

import io
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from modeling.domain_classifier import class_consistency
from pipelines.manifests import read
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.shard_reader import image_dataset, image_loader
from pipelines.store import Artifact, StepResult

ASSET = "domain_classifier"
log = logging.getLogger(__name__)


def domain_classifier(plan: Plan, partition: None = None, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Train (or find) the domain classifier and embed its reference and val sets."""
    target = plan.domain()
    return cached_or_run(target, lambda: _train(plan, target, on_log), on_log)


def _train(plan: Plan, target: Target, on_log: Callable[[str], None]) -> dict:
    from modeling.domain_classifier import DomainClassifier, embed, train_classifier

    train, val = plan.shards("train"), plan.shards("val")
    train_m, val_m = train.require(), val.require()
    held = target.config["holdout_shards"]
    if held >= len(train_m.shards):
        raise ValueError(
            f"evaluation.domain_holdout_shards: {held} of the {len(train_m.shards)} train shards leaves the "
            "domain classifier nothing to train on (lower it, or data.shard_size)"
        )
    cfg, artifact = plan.profile.domain, target.artifact
    torch.manual_seed(cfg.seed)
    model = DomainClassifier(cfg, 3, plan.profile.data.resolution, len(train_m.classes))

    def batches(epoch: int) -> Iterable:
        return image_loader(train.artifact, cfg.batch_size, num_workers=0, rank=0, world_size=1,
                            shuffle=2000, seed=cfg.seed * 7919 + epoch, shards=train_m.shards[held:])  # fmt: skip

    images = sum(1 for _ in image_dataset(train.artifact, rank=0, world_size=1, decode=False,
                                          shards=train_m.shards[held:]))  # fmt: skip
    steps = cfg.epochs * -(-images // cfg.batch_size)
    on_log(f"training the domain classifier on {images} images ({len(train_m.shards) - held} of "
           f"{len(train_m.shards)} train shards), {steps} steps")  # fmt: skip
    fit = train_classifier(model, batches, cfg, steps, on_log=on_log)
    sets = {
        "reference": embed(model, _ordered(train.artifact, train_m.shards[:held])),
        "val": embed(model, _ordered(val.artifact, val_m.shards)),
    }
    n = min(target.config["ceiling_images"], len(sets["val"][0]))
    ref = features_stats(sets["reference"][0])
    metrics = {
        "val_top1": class_consistency(*sets["val"][1:]),
        "reference_top1": class_consistency(*sets["reference"][1:]),
        "reference_images": len(sets["reference"][0]),
        "val_images": len(sets["val"][0]),
        "ceiling": set_figures(sets["val"][0][:n], sets["val"][1][:n], sets["val"][2][:n], ref),
        "parameters": sum(p.numel() for p in model.parameters()),
        "image_size": plan.profile.data.resolution,
        "num_classes": len(train_m.classes),
        "train": fit,
    }
    on_log(f"domain classifier: val top-1 {metrics['val_top1']:.4f}, held-out train top-1 "
           f"{metrics['reference_top1']:.4f}; real val ceiling at N={n}: {metrics['ceiling']}")  # fmt: skip
    files = {name: artifact.put_bytes(f"{name}.npz", npz_bytes(*s)).__dict__ for name, s in sets.items()}
    files["model/classifier.safetensors"] = artifact.put_safetensors(
        "model/classifier.safetensors", model.state_dict()
    ).__dict__
    files["metrics.json"] = artifact.put_json("metrics.json", metrics).__dict__
    return artifact.commit(
        files, config=target.config, lineage=target.inputs, code_version=CODE_VERSIONS[ASSET],
        metrics=metrics, profile=plan.label,
    )  # fmt: skip


def _ordered(artifact: Artifact, shards: list[str]) -> Iterable:
    return image_loader(artifact, 500, num_workers=0, rank=0, world_size=1, shards=shards)


def features_stats(features: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    from modeling.fidelity import feature_stats

    return feature_stats(features.double().numpy())


def set_figures(
    features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor, reference: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """fd_domain of a set against a reference's (mu, sigma), its class consistency and its size."""
    from modeling.fidelity import fd_from_features

    return {
        "fd_domain": fd_from_features(features.double().numpy(), *reference),
        "class_consistency": class_consistency(predicted, labels),
        "images": len(features),
    }


def npz_bytes(features: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, features=features.numpy(), predicted=predicted.numpy(), labels=labels.numpy())
    return buf.getvalue()


def load_set(artifact: Artifact, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(features, predicted, labels) of a stored set: `reference`, `val` (domain_classifier), or
    `domain_reconstructions` (reconstruction_metrics)."""
    with np.load(io.BytesIO(artifact.read_bytes(f"{name}.npz"))) as data:
        return tuple(torch.from_numpy(data[k]) for k in ("features", "predicted", "labels"))


def load_classifier(artifact: Artifact):
    """The trained domain classifier of a domain_classifier artefact, in eval mode."""
    from safetensors.torch import load

    from modeling.config import from_dict
    from modeling.domain_classifier import DomainClassifier, DomainClassifierConfig

    m = read(artifact, ASSET)
    cfg = from_dict(DomainClassifierConfig, m.config["model"])
    model = DomainClassifier(cfg, 3, m.metrics["image_size"], m.metrics["num_classes"])
    model.load_state_dict(load(artifact.read_bytes("model/classifier.safetensors")))
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    return step_main(
        __doc__, argv, ASSET, partitioned=False,
        summary=lambda m: f"val top-1 {m.metrics['val_top1']:.4f} ({m.metrics['val_images']} images)",
    )  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
