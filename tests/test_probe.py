"""Linear probe on frozen features and token embeddings (CPU, synthetic data)."""

from __future__ import annotations

import pytest
import torch

from modeling.probe import embed_tokens, linear_probe, one_hot_tokens

C, D = 10, 32  # classes, feature width


def blobs(n: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """n points [n, D] around C fixed class means (drawn with seed 0), labels [n]."""
    means = 3 * torch.randn(C, D, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, C, (n,), generator=g)
    return means[y] + spread * torch.randn(n, D, generator=g), y


def test_separable_data_is_learned():
    (tx, ty), (vx, vy) = blobs(500, 1), blobs(500, 2)
    r = linear_probe(tx, ty, vx, vy, steps=100)
    assert r["top1"] >= 0.95 and r["train_top1"] >= 0.95, r
    assert r["classes"] == C and r["features"] == D and r["train_samples"] == r["val_samples"] == 500
    assert 0 < r["iterations"] <= 100 and r["val_loss"] < 0.3


def test_random_labels_stay_at_chance_and_runs_are_deterministic():
    g = torch.Generator().manual_seed(3)
    tx, vx = torch.randn(400, D, generator=g), torch.randn(2000, D, generator=g)
    ty, vy = torch.randint(0, C, (400,), generator=g), torch.randint(0, C, (2000,), generator=g)
    r = linear_probe(tx, ty, vx, vy, steps=50, seed=7)
    assert 0.05 < r["top1"] < 0.15, r  # chance: 0.1, standard error ~0.007
    assert r["train_top1"] > r["top1"] + 0.1  # it does fit (memorise) the training labels
    assert linear_probe(tx, ty, vx, vy, steps=50, seed=7) == r


def test_embed_tokens_and_probe_on_a_class_carrying_token():
    k, length, width = 16, 4, 8
    table = torch.randn(k, width, generator=torch.Generator().manual_seed(0), requires_grad=True)
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, k, (600, length), generator=g)
    codes[:, 0] = torch.randint(0, C, (600,), generator=g)  # the first token carries the class
    feats = embed_tokens(codes, table)
    assert feats.shape == (600, length * width) and not feats.requires_grad
    assert torch.equal(feats[5, width : 2 * width], table[codes[5, 1]].detach())
    y = codes[:, 0]
    r = linear_probe(feats[:400], y[:400], feats[400:], y[400:], steps=100)
    assert r["top1"] >= 0.95, r
    with pytest.raises(AssertionError):
        embed_tokens(torch.full((2, 3), k), table)


def test_one_hot_probe_reads_a_class_code_that_the_codebook_geometry_hides():
    """A token whose code carries the class through a table that maps all codes to nearly one vector:
    the embedded probe cannot separate the classes, the one-hot probe can."""
    k, g = 16, torch.Generator().manual_seed(2)
    table = torch.ones(k, 4) + 1e-7 * torch.randn(k, 4, generator=g)  # every code embeds (almost) alike
    y = torch.randint(0, C, (800,), generator=g)
    codes = torch.stack([y, torch.randint(0, k, (800,), generator=g)], dim=1)  # [800, 2]: class code, noise
    feats = one_hot_tokens(codes, k)
    assert feats.shape == (800, 2 * k) and torch.equal(feats.sum(1), torch.full((800,), 2.0))
    assert feats[0, int(codes[0, 0])] == 1 and feats[0, k + int(codes[0, 1])] == 1
    onehot = linear_probe(feats[:500], y[:500], feats[500:], y[500:], steps=100)
    embedded = embed_tokens(codes, table)
    embedded = embedded.round(decimals=3)  # the class differences are below any useful precision
    geometric = linear_probe(embedded[:500], y[:500], embedded[500:], y[500:], steps=100)
    assert onehot["top1"] >= 0.95 and geometric["top1"] < 0.3, (onehot, geometric)
    with pytest.raises(AssertionError):
        one_hot_tokens(torch.full((2, 3), k), k)
