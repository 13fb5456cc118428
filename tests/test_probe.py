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
    feats = one_hot_tokens(codes, k).dense()
    assert feats.shape == (800, 2 * k) and torch.equal(feats.sum(1), torch.full((800,), 2.0))
    assert feats[0, int(codes[0, 0])] == 1 and feats[0, k + int(codes[0, 1])] == 1
    onehot = linear_probe(one_hot_tokens(codes[:500], k), y[:500], one_hot_tokens(codes[500:], k), y[500:], steps=100)
    embedded = embed_tokens(codes, table)
    embedded = embedded.round(decimals=3)  # the class differences are below any useful precision
    geometric = linear_probe(embedded[:500], y[:500], embedded[500:], y[500:], steps=100)
    assert onehot["top1"] >= 0.95 and geometric["top1"] < 0.3, (onehot, geometric)
    with pytest.raises(AssertionError):
        one_hot_tokens(torch.full((2, 3), k), k)


def test_gathered_one_hot_probe_fits_the_dense_one_hot_probe():
    """The probe on `OneHot` codes (gathered rows, never a dense matrix) solves the same problem as on the
    dense one-hot matrix: the same standardisation (a constant column and an unseen code included), the
    same loss at the same weights, and, fitted, the same accuracy and loss up to rounding."""
    from modeling.probe import _Standardised

    k, g = 12, torch.Generator().manual_seed(4)
    y = torch.randint(0, C, (900,), generator=g)
    codes = torch.stack([(y + torch.randint(0, 3, (900,), generator=g)) % k,  # noisy class code
                         torch.randint(0, k - 1, (900,), generator=g),  # code k - 1 never appears
                         torch.full((900,), 5)], dim=1)  # a constant token  # fmt: skip
    sparse, dense = _Standardised(one_hot_tokens(codes, k)), _Standardised(one_hot_tokens(codes, k).dense())
    assert torch.allclose(sparse.mean, dense.mean, atol=1e-15) and torch.allclose(sparse.std, dense.std, rtol=1e-12)
    w, b = torch.randn(3 * k, C, generator=g, dtype=torch.float64), torch.randn(C, generator=g, dtype=torch.float64)
    gathered = sparse.logits(sparse.prepare(one_hot_tokens(codes, k)), w, b)
    assert torch.allclose(gathered, dense.logits(dense.prepare(one_hot_tokens(codes, k).dense()), w, b), atol=1e-6)
    train, val = slice(0, 600), slice(600, None)
    fit = {
        "gathered": linear_probe(one_hot_tokens(codes[train], k), y[train], one_hot_tokens(codes[val], k), y[val],
                                 steps=200),
        "dense": linear_probe(one_hot_tokens(codes[train], k).dense(), y[train],
                              one_hot_tokens(codes[val], k).dense(), y[val], steps=200),
    }
    assert fit["gathered"]["features"] == fit["dense"]["features"] == 3 * k
    assert fit["gathered"]["top1"] > 0.3, fit  # chance: 0.1
    assert abs(fit["gathered"]["top1"] - fit["dense"]["top1"]) <= 1 / 300, fit
    assert abs(fit["gathered"]["val_loss"] - fit["dense"]["val_loss"]) < 1e-4, fit
