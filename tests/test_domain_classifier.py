"""Domain classifier (the evaluator's CNN): shapes, config checks, determinism, and real accuracy on Fashion-MNIST."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling.config import ConfigError, from_dict
from modeling.domain_classifier import (
    DomainClassifier,
    DomainClassifierConfig,
    class_consistency,
    embed,
    train_classifier,
)
from tests.conftest import built_once

TRAIN, VAL = 60_000, 10_000  # the default training (2 epochs on the whole train set), scored on the whole test set


def load_fashion(root: Path, split: str, limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first `limit` IDX images of `split` as the embedded data set has them: uint8 [N, 3, 32, 32] (28x28
    padded with 2 px of zeros, grey repeated to 3 channels) and int64 labels [N]."""
    prefix = "train" if split == "train" else "t10k"
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz") as f:
        raw = f.read()
    assert int.from_bytes(raw[:4], "big") == 2051, "not an IDX image file"
    images = np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28)[:limit]
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)[:limit]
    images = np.pad(images, ((0, 0), (2, 2), (2, 2)))  # [N, 32, 32]
    return torch.from_numpy(np.repeat(images[:, None], 3, axis=1)), torch.from_numpy(labels.astype(np.int64))


def epoch_batches(images: torch.Tensor, labels: torch.Tensor, batch_size: int):
    """batches(epoch): the data shuffled by epoch, the last partial batch dropped; and the step count per epoch."""

    def batches(epoch: int):
        perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(images) - batch_size + 1, batch_size):
            yield images[perm[i : i + batch_size]], labels[perm[i : i + batch_size]]

    return batches, len(images) // batch_size


def chunks(images: torch.Tensor, labels: torch.Tensor, size: int = 500):
    return ((images[i : i + size], labels[i : i + size]) for i in range(0, len(images), size))


@pytest.mark.parametrize(("channels", "size", "classes"), [(3, 32, 10), (1, 16, 4), (2, 24, 7)])
def test_shapes_and_dtypes(channels, size, classes):
    cfg = DomainClassifierConfig(width=8, feature_dim=24)
    model = DomainClassifier(cfg, channels, size, classes)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (6, channels, size, size), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, classes, (6,), generator=g)
    assert model.features(images).shape == (6, 24) and model.features(images).dtype == torch.float32
    assert model(images).shape == (6, classes)
    feats, pred, ys = embed(model, chunks(images, labels, size=4))  # two batches: 4 + 2
    assert not model.training  # BN running statistics: a sample's features do not depend on its batch
    assert feats.shape == (6, 24) and feats.dtype == torch.float32 and (feats >= 0).all()
    assert pred.shape == ys.shape == (6,) and pred.dtype == ys.dtype == torch.int64
    assert torch.equal(ys, labels) and torch.equal(pred, model(images).argmax(1))
    assert torch.allclose(feats, model.features(images), atol=1e-5)
    assert class_consistency(ys, labels) == 1.0 and class_consistency((ys + 1) % classes, labels) == 0.0
    with pytest.raises(AssertionError):
        DomainClassifier(cfg, channels, 20, classes)  # not a multiple of 8


def test_config_rejects_bad_values():
    bad = {"width": 0, "feature_dim": 0, "epochs": 0, "batch_size": 0, "lr": 0.0, "weight_decay": -1.0, "seed": -1}
    for field, value in bad.items():
        with pytest.raises(ConfigError, match=rf"^{field}: "):
            DomainClassifierConfig(**{field: value})
    with pytest.raises(ConfigError, match=r"^widht: unknown field"):
        from_dict(DomainClassifierConfig, {"widht": 16})
    assert from_dict(DomainClassifierConfig, {"width": "8"}).width == 8  # command-line strings are coerced


def test_training_is_deterministic_and_checks_its_step_count(monkeypatch):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (96, 3, 16, 16), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (96,), generator=g)
    batches, steps = epoch_batches(images, labels, 32)

    def run(seed: int) -> dict[str, torch.Tensor]:
        cfg = DomainClassifierConfig(width=8, feature_dim=16, epochs=2, batch_size=32, seed=seed)
        model = DomainClassifier(cfg, 3, 16, 3)
        logs: list[str] = []
        out = train_classifier(model, batches, cfg, 2 * steps, on_log=logs.append)
        assert out["steps"] == 2 * steps == 6 and np.isfinite(out["train_loss"]) and out["seconds"] > 0
        assert logs and "step 6/6" in logs[-1]  # the last step always logs
        return model.state_dict()

    rng = torch.get_rng_state()
    first, again, other = run(0), run(0), run(1)
    assert torch.equal(rng, torch.get_rng_state())  # weights and augmentation come from cfg.seed alone
    assert all(torch.equal(first[k], again[k]) for k in first)  # weights, BN statistics, step counters
    # train_loss is the last epoch's mean however the time-spaced log lines fall: a clock that jumps 31 s per
    # reading logs every step, and the reported loss stays the same number
    cfg = DomainClassifierConfig(width=8, feature_dim=16, epochs=2, batch_size=32)
    quiet = train_classifier(DomainClassifier(cfg, 3, 16, 3), batches, cfg, 2 * steps, on_log=lambda _: None)
    clock, logs = iter(range(0, 10_000, 31)), []
    monkeypatch.setattr("modeling.domain_classifier.time.monotonic", lambda: float(next(clock)))
    busy = train_classifier(DomainClassifier(cfg, 3, 16, 3), batches, cfg, 2 * steps, on_log=logs.append)
    assert len(logs) == 2 * steps and busy["train_loss"] == quiet["train_loss"]
    assert not torch.equal(first["head.weight"], other["head.weight"])
    cfg = DomainClassifierConfig(width=8, feature_dim=16, epochs=2, batch_size=32)
    for wrong in (5, 7):  # the LR schedule must span exactly the batches that come
        with pytest.raises(ValueError, match="total_steps"):
            train_classifier(DomainClassifier(cfg, 3, 16, 3), batches, cfg, wrong, on_log=lambda _: None)


@pytest.fixture(scope="module")
def trained_classifier(tmp_path_factory, fashion_mnist):
    """The default training (2 epochs) on the TRAIN Fashion-MNIST train images, trained once per test run
    (shared by the xdist workers), and the VAL test images."""
    cfg = DomainClassifierConfig()

    def build(folder: Path) -> None:
        train_x, train_y = load_fashion(fashion_mnist, "train", TRAIN)
        model = DomainClassifier(cfg, 3, 32, 10)
        batches, steps = epoch_batches(train_x, train_y, cfg.batch_size)
        train_classifier(model, batches, cfg, cfg.epochs * steps, on_log=lambda _: None)
        torch.save(model.state_dict(), folder / "classifier.pt")

    folder = built_once(tmp_path_factory, "trained_classifier", build)
    model = DomainClassifier(cfg, 3, 32, 10)
    model.load_state_dict(torch.load(folder / "classifier.pt", weights_only=True))
    return model.eval(), load_fashion(fashion_mnist, "test", VAL)


def test_real_val_images_are_classified(trained_classifier):
    model, (val_x, val_y) = trained_classifier
    feats, pred, ys = embed(model, chunks(val_x, val_y))
    assert feats.shape == (VAL, model.embed.out_features) and torch.equal(ys, val_y)
    top1 = class_consistency(pred, val_y)
    assert top1 >= 0.9, top1  # the floor for the evaluator
    assert len(pred.unique()) == 10  # every class is predicted (balanced val labels)


def test_labels_that_do_not_belong_to_the_images_score_chance(trained_classifier):
    model, (val_x, val_y) = trained_classifier
    _, pred, _ = embed(model, chunks(val_x, val_y))
    shuffled = val_y[torch.randperm(VAL, generator=torch.Generator().manual_seed(0))]
    consistency = class_consistency(pred, shuffled)
    assert abs(consistency - 0.1) < 0.05, consistency  # 10 balanced classes: chance 0.1, standard error ~0.003
