"""Stage-3 sampling: KV cache vs recomputation, per-sample seeds, guidance schedules, masks, resampling (CPU)."""

from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from modeling.ar_model import AR_SIZES, ARConfig, ARModel
from modeling.config import ConfigError, field_docs, from_dict
from modeling.sampler import (
    SamplerConfig,
    cosine_ramp,
    guidance_scales,
    next_logits,
    resample_visual,
    sample,
    sample_no_cache,
    sample_seed,
    sample_seeds,
)

C, Z, N, V, P = 5, 3, 6, 16, 8  # classes, prologue tokens, visual tokens, codebook sizes


def tiny_model(z_len: int = Z, seed: int = 0) -> ARModel:
    """A random tiny model whose class embeddings are large enough for the class to matter."""
    torch.manual_seed(seed)
    model = ARModel(ARConfig(**AR_SIZES["tiny"], num_classes=C, visual_codebook=V, prologue_codebook=P,
                             z_len=z_len, num_visual=N))  # fmt: skip
    torch.nn.init.normal_(model.class_embedding.weight, std=1.0)
    return model.eval()


def inputs(n: int, run_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    classes = torch.arange(n) % C
    return classes, sample_seeds(run_seed, classes, torch.arange(n))


def assert_same(a: dict, b: dict) -> None:
    assert torch.equal(a["prologue"], b["prologue"]) and torch.equal(a["visual"], b["visual"])


@pytest.fixture(scope="module")
def trained() -> ARModel:
    """Visual code = class id at every position, random prologue: 60 AdamW steps with label dropout."""
    torch.manual_seed(0)
    model = ARModel(ARConfig(**AR_SIZES["tiny"], num_classes=C, visual_codebook=V, prologue_codebook=P, z_len=Z,
                             num_visual=N, label_dropout=0.1))  # fmt: skip
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    for _ in range(60):
        classes = torch.randint(0, C, (32,))
        out = model(classes, torch.randint(0, P, (32, Z)), classes[:, None].expand(32, N))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
    return model.eval()


@pytest.mark.parametrize("z_len", [0, Z])
@pytest.mark.parametrize(
    "cfg",
    [SamplerConfig(), SamplerConfig(top_k=5, top_p=0.8, temperature_visual=1.3), SamplerConfig(cfg_schedule="none")],
    ids=["split", "split-topk-topp", "none"],
)
def test_kv_cache_matches_no_cache(z_len, cfg):
    model = tiny_model(z_len)
    classes, seeds = inputs(8)
    cached = sample(model, classes, seeds, cfg)
    assert cached["prologue"].shape == (8, z_len) and cached["visual"].shape == (8, N)
    assert_same(cached, sample_no_cache(model, classes, seeds, cfg))


@pytest.mark.parametrize("z_len", [0, Z])
def test_sample_alone_equals_batched(z_len):
    model = tiny_model(z_len)
    cfg = SamplerConfig(top_k=10, top_p=0.9)
    classes, seeds = inputs(10)
    batched = sample(model, classes, seeds, cfg)
    assert_same(batched, sample(model, classes, seeds, dataclasses.replace(cfg, batch_size=3)))  # chunking
    for b in (0, 3, 9):
        alone = sample(model, classes[b : b + 1], seeds[b : b + 1], cfg)
        assert torch.equal(alone["prologue"][0], batched["prologue"][b])
        assert torch.equal(alone["visual"][0], batched["visual"][b])
    other = sample(model, classes, sample_seeds(1, classes, torch.arange(10)), cfg)
    assert not torch.equal(other["visual"], batched["visual"])  # the seeds matter


@pytest.mark.parametrize("z_len", [0, Z])
def test_tokens_in_range(z_len):
    model = tiny_model(z_len)
    classes, seeds = inputs(64)
    for cfg in (SamplerConfig(temperature_prologue=3.0, temperature_visual=3.0), SamplerConfig(top_k=3, top_p=0.5)):
        out = sample(model, classes, seeds, cfg)
        assert out["prologue"].shape == (64, z_len) and out["visual"].shape == (64, N)
        assert out["prologue"].dtype == out["visual"].dtype == torch.long
        if z_len:
            assert 0 <= out["prologue"].min() and out["prologue"].max() < P
            assert len(out["prologue"].unique()) > P // 2  # high temperature: many codes used
        assert 0 <= out["visual"].min() and out["visual"].max() < V


def test_top_k_restricts_choices():
    model = tiny_model()
    classes, seeds = inputs(40)
    out = sample(model, torch.zeros_like(classes), seeds, SamplerConfig(cfg_schedule="none", top_k=1))
    assert len(out["visual"].unique(dim=0)) == 1 and len(out["prologue"].unique(dim=0)) == 1  # greedy


def test_cosine_ramp():
    t = torch.linspace(0, 1, 101, dtype=torch.float64)
    s = cosine_ramp(t, 3.0, 0.2)
    assert s[0] == 1.0 and s[-1] == pytest.approx(3.0)
    assert torch.all(s[1:] >= s[:-1])
    assert s[50] == pytest.approx(1 + (1 - math.cos(math.pi * 0.5**0.2)))
    model = tiny_model()
    scales = guidance_scales(model, SamplerConfig(cfg_prologue=0.6, cfg_visual_max=3.0))
    assert scales[: Z + 1] == [0.6] * (Z + 1) and scales[Z + 1] == 1.0 and scales[-1] == pytest.approx(3.0)
    assert guidance_scales(model, SamplerConfig(cfg_schedule="global", cfg_global=1.5)) == [1.5] * model.T


def test_guidance_arithmetic_keeps_masks():
    model = tiny_model()
    cfg = SamplerConfig(cfg_schedule="global", temperature_prologue=1.0, temperature_visual=1.0)
    raw = torch.randn(4, model.cfg.vocab_size)
    for j in (0, Z, Z + 1):
        logits = raw.masked_fill(~model.allowed[j], float("-inf"))
        out = next_logits(model, logits, j, 2.5, cfg)
        allowed = model.allowed[j].expand(2, -1)
        assert not out.isnan().any() and torch.all(out[~allowed] == float("-inf"))
        assert torch.allclose(out[allowed], (2.5 * raw[:2] - 1.5 * raw[2:])[allowed])


@pytest.mark.parametrize("z_len", [0, Z])
def test_schedules(z_len):
    model = tiny_model(z_len)
    classes, seeds = inputs(12)
    none = sample(model, classes, seeds, SamplerConfig(cfg_schedule="none"))
    # scale 1 everywhere is the conditional distribution: the same tokens as without guidance
    assert_same(none, sample(model, classes, seeds, SamplerConfig(cfg_schedule="global", cfg_global=1.0)))
    assert_same(none, sample(model, classes, seeds, SamplerConfig(cfg_prologue=1.0, cfg_visual_max=1.0)))
    strong = sample(model, classes, seeds, SamplerConfig(cfg_schedule="global", cfg_global=4.0))
    assert not torch.equal(strong["visual"], none["visual"])
    split = sample(model, classes, seeds, SamplerConfig(cfg_visual_max=4.0))
    assert not torch.equal(split["visual"], none["visual"])


def test_resample_visual():
    model = tiny_model()
    cfg = SamplerConfig(temperature_visual=1.5)
    classes, seeds = inputs(16)
    first = sample(model, classes, seeds, cfg)
    # own prologue and seeds: the very same visual tokens (the cache path with teacher forcing)
    assert_same(first, resample_visual(model, classes, first["prologue"], seeds, cfg))
    fixed = torch.randint(0, P, (16, Z), generator=torch.Generator().manual_seed(3))
    again = resample_visual(model, classes, fixed, sample_seeds(7, classes, torch.arange(16)), cfg)
    assert torch.equal(again["prologue"], fixed)
    assert (again["visual"] != first["visual"]).any(-1).float().mean() > 0.5
    with pytest.raises(AssertionError, match="prologue"):
        resample_visual(tiny_model(0), classes, fixed, seeds, cfg)


def test_sample_seed():
    s = sample_seed(0, 3, 17)
    assert s == sample_seed(0, 3, 17) and 0 <= s < 2**63
    assert len({sample_seed(r, c, i) for r in range(3) for c in range(3) for i in range(50)}) == 450
    assert sample_seeds(0, torch.tensor([3, 1]), torch.tensor([17, 0])).tolist() == [s, sample_seed(0, 1, 0)]


def test_learns_class_codes(trained):
    """A model fitted to visual code = class id samples its class's code everywhere at low temperature."""
    classes = torch.arange(20) % C
    seeds = sample_seeds(0, classes, torch.arange(20))
    for cfg in (SamplerConfig(temperature_visual=0.1), SamplerConfig(cfg_schedule="none", temperature_visual=0.1)):
        out = sample(trained, classes, seeds, cfg)
        assert (out["visual"] == classes[:, None]).float().mean() > 0.95


def test_needs_eval_mode():
    model = tiny_model().train()
    with pytest.raises(AssertionError, match="eval"):
        sample(model, *inputs(2), SamplerConfig())


def test_config_validation():
    SamplerConfig().validate()
    assert set(field_docs(SamplerConfig)) == {f.name for f in dataclasses.fields(SamplerConfig)}
    assert from_dict(SamplerConfig, {"cfg_schedule": "none", "top_k": "5"}).top_k == 5
    for bad, message in [
        ({"cfg_schedule": "cosine"}, "cfg_schedule: 'cosine' is not one of split, global, none"),
        ({"cfg_prologue": -0.1}, "cfg_prologue: must be >= 0"),
        ({"cfg_visual_max": -1.0}, "cfg_visual_max: must be >= 0"),
        ({"cfg_global": -2.0}, "cfg_global: must be >= 0"),
        ({"cfg_power": 0.0}, "cfg_power: must be > 0"),
        ({"temperature_prologue": 0.0}, "temperature_prologue: must be > 0"),
        ({"temperature_visual": -1.0}, "temperature_visual: must be > 0"),
        ({"top_k": -1}, "top_k: must be >= 0"),
        ({"top_p": 0.0}, "top_p: must be in (0, 1]"),
        ({"top_p": 1.5}, "top_p: must be in (0, 1]"),
        ({"batch_size": 0}, "batch_size: must be >= 1"),
        ({"seed": -1}, "seed: must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match="^" + re.escape(message)):
            from_dict(SamplerConfig, bad)
    with pytest.raises(ConfigError, match=r"^top_k: "):
        sample(tiny_model(), *inputs(2), SamplerConfig(top_k=-3))
