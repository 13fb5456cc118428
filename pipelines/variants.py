"""Variant names: one arm of a comparison, and what it changes against the profile's settings.

    <arm>[_z<N>][_s<S>][_ent<W>][_tok<K>x][_ar<K>x]

- arm: `baseline` (the 2D tokenizer: no prologue, no joint prior), `baseline_1d` (the 1D, TiTok-style
  tokenizer: as many latent tokens as patches, no prologue), `prologue`, `prologue_post` (the
  baseline's tokenizer frozen, a separate prologue path trained on top of it) or `prologue_onestage`
  (Prologue-OneStage: the joint prior is the profile's AR model, class-conditional, trained with the
  tokenizer in one stage and evaluated as the AR model: no stage 3);
- `_z<N>`: N prologue tokens instead of the profile's `tokenizer.z_len` (prologue arms);
- `_s<S>`: training seed S for the tokenizer and the AR model (the profile's are 0): a second
  training run of the same arm, for the spread over training seeds;
- `_ent<W>`: the prologue entropy weight W instead of `tokenizer_train.prologue_entropy_weight`
  (`p` for the decimal point: `_ent0p1` is 0.1; prologue arms);
- `_tok<K>x`: K times the tokenizer's steps (its GAN start moves with them);
- `_ar<K>x`: K times the AR model's steps. The tokenizer and token dataset are then those of the
  name without `_ar<K>x`: the same artefacts, reused, so the AR budget is the only difference.

Every other setting is the profile's, the same for every arm.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

from modeling.ar_trainer import ARTrainConfig
from modeling.config import ConfigError
from modeling.tokenizer import TokenizerConfig
from modeling.tokenizer_trainer import TokenizerTrainConfig

ARMS = ("baseline", "baseline_1d", "prologue", "prologue_post", "prologue_onestage")
_NAME = re.compile(
    rf"(?P<arm>{'|'.join(sorted(ARMS, key=len, reverse=True))})"  # longest first: baseline_1d before baseline
    r"(?:_z(?P<z>[1-9]\d*))?(?:_s(?P<seed>\d+))?(?:_ent(?P<ent>\d+(?:p\d+)?))?(?:_tok(?P<tok>[1-9]\d*)x)?"
    r"(?:_ar(?P<ar>[1-9]\d*)x)?"
)


@dataclass(frozen=True)
class Variant:
    """A parsed variant name (see the module docstring); None: the profile's setting."""

    name: str
    arm: str
    z_len: int | None = None
    seed: int | None = None
    entropy_weight: float | None = None
    tokenizer_budget: int = 1
    ar_budget: int = 1

    def _without(self, suffix: str | None) -> str:
        return self.name.replace(suffix, "", 1) if suffix else self.name

    @property
    def tokenizer_variant(self) -> str:
        """The variant whose tokenizer and token dataset this one uses (itself but for the AR budget)."""
        return self._without(f"_ar{self.ar_budget}x" if self.ar_budget != 1 else None)

    @property
    def without_tokenizer_budget(self) -> str:
        """The name without `_tok<K>x`: the variants that differ only by tokenizer budget share it."""
        return self._without(f"_tok{self.tokenizer_budget}x" if self.tokenizer_budget != 1 else None)

    @property
    def ar_is_joint_prior(self) -> bool:
        """Prologue-OneStage: the AR model is the tokenizer's joint prior (no stage 3)."""
        return self.arm == "prologue_onestage"

    @property
    def base_variant(self) -> str | None:
        """The 2D tokenizer a Prologue-Post arm trains on: the baseline of the same seed and tokenizer
        budget; None for the other arms."""
        if self.arm != "prologue_post":
            return None
        seed = "" if self.seed is None else f"_s{self.seed}"
        return "baseline" + seed + ("" if self.tokenizer_budget == 1 else f"_tok{self.tokenizer_budget}x")

    @property
    def seed_group(self) -> str:
        """The name without its training seed: the rows that differ only by training seed share it."""
        return self._without(f"_s{self.seed}" if self.seed is not None else None)

    def tokenizer(self, profile_tokenizer: TokenizerConfig) -> TokenizerConfig:
        cfg = profile_tokenizer
        if self.arm == "baseline":
            return replace(cfg, z_len=0)
        if self.arm == "baseline_1d":
            return replace(cfg, z_len=0, layout="1d")
        if self.z_len is not None:
            cfg = replace(cfg, z_len=self.z_len)
        return replace(cfg, post_hoc=True) if self.arm == "prologue_post" else cfg

    def tokenizer_train(self, profile_train: TokenizerTrainConfig) -> TokenizerTrainConfig:
        changes: dict = {}
        if self.seed is not None:
            changes["seed"] = self.seed
        if self.entropy_weight is not None:
            changes["prologue_entropy_weight"] = self.entropy_weight
        if self.tokenizer_budget != 1:
            changes["steps"] = profile_train.steps * self.tokenizer_budget
            changes["gan_start"] = profile_train.gan_start * self.tokenizer_budget
        return replace(profile_train, **changes) if changes else profile_train

    def ar_train(self, profile_train: ARTrainConfig) -> ARTrainConfig:
        changes: dict = {}
        if self.seed is not None:
            changes["seed"] = self.seed
        if self.ar_budget != 1:
            changes["steps"] = profile_train.steps * self.ar_budget
        return replace(profile_train, **changes) if changes else profile_train


def group_rows(rows: Iterable[dict[str, Any]], key: Callable[[Variant], str]) -> dict[str, list[dict[str, Any]]]:
    """Results rows (each with a `variant`) grouped by `key` of their parsed variant, in row order."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(key(parse_variant(r["variant"])), []).append(r)
    return groups


def parse_variant(name: str) -> Variant:
    """The variant a name stands for, or a ConfigError saying what names look like."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ConfigError(
            f"variant: {name!r} is not <arm>[_z<N>][_s<S>][_ent<W>][_tok<K>x][_ar<K>x] with arm one of "
            f"{', '.join(ARMS)} (e.g. prologue_z8, baseline_s1, prologue_ent0p1, prologue_post_ar4x)"
        )
    arm = m["arm"]
    if arm.startswith("baseline") and (m["z"] or m["ent"]):
        raise ConfigError(f"variant: {name!r}: the baseline has no prologue tokens (no _z, no _ent)")
    if arm == "prologue_onestage" and m["ar"]:  # see Variant.ar_is_joint_prior
        raise ConfigError(f"variant: {name!r}: Prologue-OneStage trains no stage-3 AR model (no _ar)")
    entropy = float(m["ent"].replace("p", ".")) if m["ent"] else None
    return Variant(
        name,
        arm,
        z_len=int(m["z"]) if m["z"] else None,
        seed=int(m["seed"]) if m["seed"] else None,
        entropy_weight=entropy,
        tokenizer_budget=int(m["tok"] or 1),
        ar_budget=int(m["ar"] or 1),
    )
