"""Stage-3 class-conditional AR model: shapes, logit masks, KV cache, label dropout, causality, fitting (CPU)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from modeling.ar_model import AR_SIZES, ARConfig, ARModel
from modeling.config import ConfigError, field_docs, from_dict

B, C, Z, N, V, P = 4, 5, 3, 6, 16, 8  # batch, classes, prologue tokens, visual tokens, codebook sizes


def tiny(z_len: int = Z, **kw) -> ARConfig:
    return ARConfig(**AR_SIZES["tiny"], num_classes=C, visual_codebook=V, prologue_codebook=P, z_len=z_len,
                    num_visual=N, **kw)  # fmt: skip


def batch(z_len: int = Z, n: int = B, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    classes = torch.randint(0, C, (n,), generator=g)
    prologue = torch.randint(0, P, (n, z_len), generator=g) if z_len else None
    return classes, prologue, torch.randint(0, V, (n, N), generator=g)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cached_logits(model: ARModel, classes: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] from start() + one step() per input token id of inputs [B, T-1]."""
    cache = model.init_cache(classes.shape[0], "cpu", torch.float32)
    cache.k.fill_(float("nan")), cache.v.fill_(float("nan"))  # a read of an unwritten position shows
    out = [model.start(classes, cache)]
    out += [model.step(inputs[:, t], cache) for t in range(inputs.shape[1])]
    return torch.stack(out, dim=1)


def input_ids(model: ARModel, prologue: torch.Tensor | None, visual: torch.Tensor) -> torch.Tensor:
    """The vocabulary ids fed after the class token: [p + V, EOS, v_1..v_{N-1}] or [v_1..v_{N-1}]."""
    if prologue is None:
        return visual[:, :-1]
    eos = torch.full((visual.shape[0], 1), model.eos)
    return torch.cat([prologue + V, eos, visual[:, :-1]], dim=1)


@pytest.mark.parametrize("z_len", [0, Z])
def test_output_shapes(z_len):
    model = ARModel(tiny(z_len))
    out = model(*batch(z_len))
    T, vocab = (Z + 1 + N, V + P + 1) if z_len else (N, V)
    assert model.T == T and model.cfg.vocab_size == vocab
    assert out["logits"].shape == (B, T, vocab)
    scalars = {"loss", "ce_visual", "accuracy_visual"} | ({"ce_prologue", "accuracy_prologue"} if z_len else set())
    assert set(out) == scalars | {"logits"}
    assert all(out[k].shape == () and torch.isfinite(out[k]) for k in scalars)
    # at init the prediction is close to uniform over the allowed ids
    assert abs(out["ce_visual"].item() - math.log(V)) < 0.1
    if z_len:
        assert abs(out["ce_prologue"].item() - Z * math.log(P) / (Z + 1)) < 0.1  # EOS position: CE 0
        mixed = (Z + 1) / T * out["ce_prologue"].item() + N / T * out["ce_visual"].item()
        assert out["loss"].item() == pytest.approx(mixed)


@pytest.mark.parametrize("z_len", [0, Z])
def test_logit_masks(z_len):
    model = ARModel(tiny(z_len))
    probs = model(*batch(z_len))["logits"].softmax(-1)  # [B, T, vocab]
    allowed = torch.zeros(model.T, model.cfg.vocab_size, dtype=torch.bool)
    if z_len:
        allowed[:Z, V : V + P] = True
        allowed[Z, V + P] = True
    allowed[model.T - N :, :V] = True
    assert torch.equal(model.allowed, allowed)
    assert torch.all(probs[:, ~allowed] == 0)
    assert torch.allclose(probs.sum(-1), torch.ones(B, model.T))
    if z_len:
        assert torch.all(probs[:, Z, V + P] == 1)  # EOS is certain


@pytest.mark.parametrize("z_len", [0, Z])
def test_kv_cache_matches_forward(z_len):
    model = ARModel(tiny(z_len)).eval()
    classes, prologue, visual = batch(z_len)
    classes[0] = model.uncond
    with torch.no_grad():
        full = model(classes, prologue, visual)["logits"]
        stepped = cached_logits(model, classes, input_ids(model, prologue, visual))
    finite = torch.isfinite(full)
    assert torch.equal(finite, torch.isfinite(stepped))
    assert torch.allclose(stepped[finite], full[finite], atol=1e-5, rtol=1e-5)


def test_label_dropout():
    model = ARModel(tiny(label_dropout=1.0))
    classes, prologue, visual = batch()
    others = (classes + 1) % C
    with torch.no_grad():
        model.eval()  # no label dropout in eval mode: the class matters
        first, second = model(classes, prologue, visual)["logits"], model(others, prologue, visual)["logits"]
        assert not torch.allclose(first[:, 0], second[:, 0])
        uncond = model(torch.full_like(classes, model.uncond), prologue, visual)["logits"]
        model.train()  # every class becomes the unconditional row
        assert torch.equal(model(classes, prologue, visual)["logits"], uncond)
        assert torch.equal(model(others, prologue, visual)["logits"], uncond)


def test_label_dropout_rate_follows_global_seed():
    model = ARModel(tiny(label_dropout=0.5)).train()
    classes, prologue, visual = batch(n=64)
    with torch.no_grad():
        cond = model.eval()(classes, prologue, visual)["logits"][:, 0]
        model.train()
        torch.manual_seed(1)
        a = model(classes, prologue, visual)["logits"][:, 0]
        torch.manual_seed(1)
        b = model(classes, prologue, visual)["logits"][:, 0]
    assert torch.equal(a, b)
    kept = torch.isclose(a, cond).all(-1).float().mean().item()
    assert 0.25 < kept < 0.75


@pytest.mark.parametrize("z_len", [0, Z])
def test_causal(z_len):
    model = ARModel(tiny(z_len)).eval()
    classes, prologue, visual = batch(z_len)
    changed = visual.clone()
    changed[:, 2] = (changed[:, 2] + 1) % V  # v_3 is the input at position T - N + 3
    with torch.no_grad():
        a, b = model(classes, prologue, visual)["logits"], model(classes, prologue, changed)["logits"]
    first = model.T - N + 3
    assert torch.equal(a[:, :first], b[:, :first])
    assert not torch.allclose(a[:, first:].nan_to_num(), b[:, first:].nan_to_num())
    if z_len:
        changed = prologue.clone()
        changed[:, 1] = (changed[:, 1] + 1) % P  # p_2 is the input at position 2
        with torch.no_grad():
            c = model(classes, changed, visual)["logits"]
        assert torch.equal(a[:, :2], c[:, :2]) and not torch.allclose(a[:, 2:].nan_to_num(), c[:, 2:].nan_to_num())


@pytest.mark.parametrize("z_len", [0, Z])
def test_fits_class_determined_codes(z_len):
    """Codes that are a function of the class: 100 AdamW steps drive the CE far below log(V)."""
    model = ARModel(tiny(z_len))
    g = torch.Generator().manual_seed(0)
    table_v, table_p = torch.randint(0, V, (C, N), generator=g), torch.randint(0, P, (C, Z), generator=g)
    classes = torch.arange(16) % C
    prologue = table_p[classes][:, :z_len] if z_len else None
    visual = table_v[classes]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(100):
        out = model(classes, prologue, visual)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        out = model(classes, prologue, visual)
    assert out["loss"].item() < 0.5 * math.log(V)
    assert out["accuracy_visual"].item() > 0.9


def test_accounting():
    model = ARModel(tiny())
    assert model.num_params() == sum(p.numel() for p in model.parameters())
    embeddings = (C + 1) * 64 + (V + P + 1) * 64
    assert model.num_params(exclude_embeddings=True) == model.num_params() - embeddings
    cfg = model.cfg
    assert model.flops_per_token() == 6 * (model.num_params() - embeddings) + 12 * cfg.depth * cfg.width * (Z + 1 + N)
    with torch.device("meta"):  # the paper's B on ImageNet codes, without allocating it
        big = ARModel(ARConfig(**AR_SIZES["B"], num_classes=1000, visual_codebook=16384, prologue_codebook=1024,
                               z_len=16, num_visual=256))  # fmt: skip
    assert 100e6 < big.num_params(exclude_embeddings=True) < 150e6


def test_config_validation():
    for name, size in AR_SIZES.items():
        cfg = ARConfig(**size)
        cfg.validate()
        assert cfg.width % cfg.heads == 0, name
    assert set(field_docs(ARConfig)) == {f.name for f in dataclasses.fields(ARConfig)}
    assert from_dict(ARConfig, {"z_len": "0", "label_dropout": "0.2"}).z_len == 0
    for bad, message in [
        ({"heads": 5}, "heads: "),
        ({"width": 0}, "width: must be >= 1"),
        ({"num_visual": 0}, "num_visual: must be >= 1"),
        ({"z_len": -1}, "z_len: must be >= 0"),
        ({"label_dropout": 1.5}, "label_dropout: must be in [0, 1]"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            from_dict(ARConfig, bad)
    with pytest.raises(ConfigError, match=r"^heads: "):
        ARModel(ARConfig(width=64, heads=3))


def test_a_class_conditional_joint_prior_is_an_ar_model_name_for_name():
    """Prologue-OneStage evaluates its stage-1 joint prior as the AR model: the same modules, so the
    prior's weights load strictly into an ARModel of its size, which then gives the prior's logits."""
    import torch.nn.functional as F

    from modeling.joint_prior import JointPrior
    from modeling.tokenizer import TokenizerConfig

    size = AR_SIZES["tiny"]
    tok_cfg = TokenizerConfig(image_size=12, patch_size=4, visual_codebook=V, prologue_codebook=P, z_len=Z,
                              prior_width=size["width"], prior_depth=size["depth"], prior_heads=size["heads"],
                              prior_classes=C)  # fmt: skip
    prior = JointPrior(tok_cfg).eval()  # 9 visual tokens
    model = ARModel(ARConfig(**size, num_classes=C, visual_codebook=V, prologue_codebook=P, z_len=Z, num_visual=9))
    model.load_state_dict(prior.state_dict())  # strict
    classes, prologue, _ = batch()
    visual = torch.randint(0, V, (B, 9))
    with torch.no_grad():
        ours = prior(F.one_hot(prologue, P).float(), visual, visual_dropout=0.0, class_ids=classes)["logits"]
        theirs = model.eval()(classes, prologue, visual)["logits"]
    assert torch.allclose(ours, theirs, atol=1e-5)
    # without classes the prior reads the unconditional row, like the AR model's class id C
    with torch.no_grad():
        uncond = prior(F.one_hot(prologue, P).float(), visual, visual_dropout=0.0)["logits"]
        assert torch.allclose(uncond, model(torch.full((B,), C), prologue, visual)["logits"], atol=1e-5)
    prior.train()  # label dropout 1.0: every class becomes the unconditional one
    prior.label_dropout = 1.0
    with torch.no_grad():
        dropped = prior(F.one_hot(prologue, P).float(), visual, visual_dropout=0.0, class_ids=classes)["logits"]
    assert torch.allclose(dropped, uncond, atol=1e-5)
