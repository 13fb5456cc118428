"""Stage-3 sampling from the class-conditional AR model (`modeling.ar_model.ARModel`): KV cache,
classifier-free guidance with a split schedule, split temperatures, top-k / top-p, per-sample seeds
and "resample visual only".

Guidance (docs/method.md, "Sampling"): at output position j the logits are s_j·cond + (1 − s_j)·uncond,
cond from the sample's class token and uncond from the unconditional one (model.uncond); both rows
run through the model as one batch of 2B. Schedules of s_j:

    split   cfg_prologue on the prologue (and EOS) positions; on visual position i = 0..N-1 the cosine
            ramp s(t) = 1 + (s_max − 1)·(1 − cos(π·t^p))/2 with t = i / (N − 1) (t = 0 when N = 1):
            s = 1 on the first visual token, s_max on the last
    global  cfg_global on every position
    none    the conditional logits alone (no unconditional rows: half the compute)

Guidance is computed on finite logits (masked ids set to 0) and the model's `allowed` mask is then
re-applied, so no -inf·s arithmetic (and no NaN) can occur. Then come the temperature of the position's
segment, top-k and top-p. The EOS position is forced (only EOS is allowed there anyway).

Randomness: sample b owns a CPU torch.Generator seeded with seeds[b] (see `sample_seed`), which draws
T uniforms u_0..u_{T-1} in [0, 1) up front; the token at position j is the inverse CDF of the position's
final distribution at u_j (torch.multinomial takes one generator per call, not one per row). A sample's
tokens thus depend on its class, seed and prologue alone, not on the batch it runs in nor on chunking;
up to floating-point differences between batch shapes, which change a token only if u_j falls within
about 1e-6 of a step of the CDF.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from modeling.ar_model import ARModel
from modeling.config import Config, ConfigError

SCHEDULES = ("split", "global", "none")


@dataclass
class SamplerConfig(Config):
    cfg_schedule: str = "split"
    """Classifier-free guidance: split (prologue constant, visual cosine ramp), global (one scale) or none."""
    cfg_prologue: float = 0.7
    """split: guidance scale on the prologue positions (the paper uses about 0.6-0.8)."""
    cfg_visual_max: float = 2.5
    """split: s_max, the scale the cosine ramp reaches on the last visual position (paper 2.25-3.75)."""
    cfg_power: float = 0.2
    """split: p, the ramp's exponent on t (p < 1 ramps up early)."""
    cfg_global: float = 2.0
    """global: the guidance scale on every position."""
    temperature_prologue: float = 1.0
    """Softmax temperature on the prologue positions."""
    temperature_visual: float = 0.9
    """Softmax temperature on the visual positions (the paper's 1.0 / 0.9 without guidance)."""
    top_k: int = 0
    """Keep the k most likely ids at each position (0 = off)."""
    top_p: float = 1.0
    """Keep the most likely ids until their probability reaches top_p (1.0 = off)."""
    batch_size: int = 64
    """Sequences per forward pass (twice as many rows with guidance)."""
    seed: int = 0
    """Run seed: sample `index` of class `c` uses the seed sample_seed(seed, c, index)."""

    def validate(self) -> None:
        if self.cfg_schedule not in SCHEDULES:
            raise ConfigError(f"cfg_schedule: {self.cfg_schedule!r} is not one of {', '.join(SCHEDULES)}")
        for name in ("cfg_prologue", "cfg_visual_max", "cfg_global", "top_k", "seed"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0, got {getattr(self, name)}")
        for name in ("cfg_power", "temperature_prologue", "temperature_visual"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be > 0, got {getattr(self, name)}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p: must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: must be >= 1, got {self.batch_size}")


def sample_seed(run_seed: int, class_id: int, index: int) -> int:
    """The seed of sample `index` of class `class_id` in run `run_seed`: the 8-byte BLAKE2b digest of
    "run_seed/class_id/index" read as a little-endian integer, shifted right by one -> [0, 2**63)."""
    digest = hashlib.blake2b(f"{run_seed}/{class_id}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def sample_seeds(run_seed: int, class_ids: Tensor, indices: Tensor) -> Tensor:
    """sample_seed of each (class_ids[b], indices[b]) -> seeds [B] long."""
    pairs = zip(class_ids.tolist(), indices.tolist(), strict=True)
    return torch.tensor([sample_seed(run_seed, c, i) for c, i in pairs], dtype=torch.long)


def cosine_ramp(t: Tensor, s_max: float, power: float) -> Tensor:
    """s(t) = 1 + (s_max − 1)·(1 − cos(π·t^p))/2 for t in [0, 1]: 1 at t = 0, s_max at t = 1."""
    return 1 + (s_max - 1) * (1 - torch.cos(math.pi * t.pow(power))) / 2


def guidance_scales(model: ARModel, cfg: SamplerConfig) -> list[float]:
    """The guidance scale s_j of every output position j = 0..T-1 (1.0 everywhere for "none")."""
    T, N = model.T, model.N
    if cfg.cfg_schedule != "split":
        return [cfg.cfg_global if cfg.cfg_schedule == "global" else 1.0] * T
    t = torch.arange(N, dtype=torch.float64) / max(N - 1, 1)  # [N]
    return [cfg.cfg_prologue] * (T - N) + cosine_ramp(t, cfg.cfg_visual_max, cfg.cfg_power).tolist()


def filter_top_k_top_p(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """logits [B, vocab] with the ids outside the top k (ties at the k-th kept) and outside the
    nucleus (the most likely ids until their mass reaches top_p; the first always kept) set to -inf."""
    if top_k:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True, stable=True)  # [B, vocab]
        probs = ordered.softmax(-1)
        before = probs.cumsum(-1) - probs  # mass of the more likely ids
        logits = logits.scatter(-1, order, ordered.masked_fill(before >= top_p, float("-inf")))
    return logits


def next_logits(model: ARModel, logits: Tensor, j: int, scale: float, cfg: SamplerConfig) -> Tensor:
    """Model logits [R, vocab] at output position j (R = 2B rows cond then uncond, or B for "none")
    -> the guided, tempered, filtered logits [B, vocab] to sample from (-inf outside `allowed`)."""
    allowed = model.allowed[j]  # [vocab]
    logits = logits.float().masked_fill(~allowed, 0.0)  # finite: s * 0 stays 0
    if cfg.cfg_schedule != "none":
        cond, uncond = logits.chunk(2)  # [B, vocab] each
        logits = scale * cond + (1 - scale) * uncond
    temperature = cfg.temperature_visual if j >= model.T - model.N else cfg.temperature_prologue
    logits = (logits / temperature).masked_fill(~allowed, float("-inf"))
    return filter_top_k_top_p(logits, cfg.top_k, cfg.top_p)


def draw(logits: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: logits [B, vocab] (some finite), uniforms u [B] in [0, 1) -> ids [B].
    The first id whose cumulative probability exceeds u: never one of probability 0."""
    cdf = logits.double().softmax(-1).cumsum(-1)  # [B, vocab]
    return torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]


def prefix_logits(model: ARModel, class_ids: Tensor, inputs: Tensor) -> Tensor:
    """Masked logits [R, vocab] at output position L from the class tokens class_ids [R] and the L
    vocabulary ids inputs [R, L] after them, recomputing the whole prefix (no KV cache)."""
    L = inputs.shape[1]
    x = torch.cat([model.class_embedding(class_ids)[:, None], model.embedding(inputs)], dim=1)  # [R, L + 1, D]
    h = model.transformer(x, model.angles[: L + 1])[:, -1]  # [R, D]
    return model.head(h).masked_fill(~model.allowed[L], float("-inf"))


def _decode(
    model: ARModel, class_ids: Tensor, seeds: Tensor, cfg: SamplerConfig, prologue: Tensor | None, cached: bool
) -> dict[str, Tensor]:
    """One batch of B sequences, one position at a time; prologue [B, Z] codes teacher-forced or None."""
    B, T, Z, V, device = class_ids.shape[0], model.T, model.Z, model.V, model.allowed.device
    classes = class_ids.to(device)
    if cfg.cfg_schedule != "none":
        classes = torch.cat([classes, torch.full_like(classes, model.uncond)])  # [R = 2B]: cond, then uncond
    copies = classes.shape[0] // B
    u = torch.stack([torch.rand(T, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                     for s in seeds.tolist()]).to(device)  # [B, T]  # fmt: skip
    scales = guidance_scales(model, cfg)
    ids = torch.zeros(B, T, dtype=torch.long, device=device)  # sampled vocabulary ids
    if cached:
        cache = model.init_cache(classes.shape[0], device, model.head.weight.dtype)
        logits = model.start(classes, cache)  # [R, vocab]
    else:
        logits = prefix_logits(model, classes, ids[:, :0].repeat(copies, 1))
    for j in range(T):
        if prologue is not None and j < Z:
            ids[:, j] = prologue[:, j].to(device) + V
        elif Z and j == Z:
            ids[:, j] = model.eos
        else:
            ids[:, j] = draw(next_logits(model, logits, j, scales[j], cfg), u[:, j])
        if j + 1 < T:
            if cached:
                logits = model.step(ids[:, j].repeat(copies), cache)
            else:
                logits = prefix_logits(model, classes, ids[:, : j + 1].repeat(copies, 1))
    return {"prologue": ids[:, :Z] - V, "visual": ids[:, T - model.N :]}


@torch.no_grad()
def _sample(
    model: ARModel, class_ids: Tensor, seeds: Tensor, cfg: SamplerConfig, prologue: Tensor | None, cached: bool
) -> dict[str, Tensor]:
    cfg.validate()
    assert not model.training, "sampling needs model.eval()"
    B = class_ids.shape[0]
    assert class_ids.shape == seeds.shape == (B,), f"class_ids {tuple(class_ids.shape)}, seeds {tuple(seeds.shape)}"
    assert 0 <= class_ids.min() and class_ids.max() <= model.uncond, "class ids must be in 0..num_classes"
    n, chunks = cfg.batch_size, []
    for i in range(0, B, n):
        forced = None if prologue is None else prologue[i : i + n]
        chunks.append(_decode(model, class_ids[i : i + n], seeds[i : i + n], cfg, forced, cached))
    return {k: torch.cat([c[k] for c in chunks]) for k in ("prologue", "visual")}


def sample(model: ARModel, class_ids: Tensor, seeds: Tensor, cfg: SamplerConfig) -> dict[str, Tensor]:
    """Sample B sequences with the KV cache: class_ids [B] long (0..num_classes-1; num_classes for
    unconditional samples), seeds [B] long -> {"prologue": [B, Z] codes 0..P-1 ([B, 0] for the
    baseline), "visual": [B, N] codes 0..V-1}, on the model's device. The model must be in eval mode."""
    return _sample(model, class_ids, seeds, cfg, None, cached=True)


def sample_no_cache(model: ARModel, class_ids: Tensor, seeds: Tensor, cfg: SamplerConfig) -> dict[str, Tensor]:
    """`sample` recomputing the whole prefix at every position (for checking the cache and benchmarks)."""
    return _sample(model, class_ids, seeds, cfg, None, cached=False)


def resample_visual(
    model: ARModel, class_ids: Tensor, prologue: Tensor, seeds: Tensor, cfg: SamplerConfig
) -> dict[str, Tensor]:
    """Keep the prologue codes prologue [B, Z] (teacher-forced, then EOS) and draw only the visual
    tokens. With a sample's own seed and prologue this reproduces its visual tokens."""
    assert model.Z and prologue.shape == (class_ids.shape[0], model.Z), f"prologue must be [B, {model.Z}] codes"
    assert 0 <= prologue.min() and prologue.max() < model.P, "prologue codes must be in 0..P-1"
    return _sample(model, class_ids, seeds, cfg, prologue, cached=True)
