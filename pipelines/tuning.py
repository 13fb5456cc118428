"""Sampling tuning per variant (`sampling_tuning[variant]`): the same search for every variant.

The paper tunes every row's sampling (temperatures without guidance, a sweep of guidance scales);
comparing tuned rows with untuned ones, or rows tuned on different budgets, says nothing about the
tokenizer. Here each variant searches a grid of the same size (`tuning`):

- no guidance: T_prologue x T_visual over `tuning.temperatures` (the baseline, which has no prologue
  positions: T_visual over as many evenly spaced values in the same range);
- guidance (split schedule, at the selected temperatures): cfg_prologue x cfg_visual_max (the
  baseline: cfg_visual_max x cfg_power).

Each point draws `tuning.samples_per_class` samples per class with the tuning seed and is scored by
FD-domain against the val split's domain features: the tuning reference, disjoint from the reporting
reference (held-out train images), so a selected setting is not also graded on the set it was chosen
on. `samples[variant]` then samples with the selected settings. Sampling runs in this process.

Standalone: `python -m pipelines.tuning --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from modeling.config import to_dict
from modeling.domain_classifier import embed
from modeling.sampler import SamplerConfig, sample, sample_seeds
from pipelines.domain import features_stats, load_classifier, load_set, set_figures
from pipelines.loaders import load_ar, load_tokenizer
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import TuningConfig
from pipelines.store import StepResult

ASSET = "sampling_tuning"
log = logging.getLogger(__name__)


def no_guidance_grid(tuning: TuningConfig, base: SamplerConfig, has_prologue: bool) -> list[SamplerConfig]:
    """The no-guidance points: T_prologue x T_visual, or T_visual alone over as many values."""
    off = replace(base, cfg_schedule="none")
    t = tuning.temperatures
    if has_prologue:
        return [replace(off, temperature_prologue=a, temperature_visual=b) for a in t for b in t]
    values = np.linspace(min(t), max(t), len(t) ** 2) if len(t) > 1 else np.array(t)
    return [replace(off, temperature_visual=round(float(v), 4)) for v in values]


def guidance_grid(tuning: TuningConfig, chosen: SamplerConfig, has_prologue: bool) -> list[SamplerConfig]:
    """The guided points (split schedule, at the chosen temperatures): cfg_prologue x s_max, or for the
    baseline s_max x power."""
    on = replace(chosen, cfg_schedule="split")
    if has_prologue:
        return [replace(on, cfg_prologue=a, cfg_visual_max=s) for a in tuning.cfg_prologue
                for s in tuning.cfg_visual_max]  # fmt: skip
    return [replace(on, cfg_visual_max=s, cfg_power=p) for s in tuning.cfg_visual_max for p in tuning.cfg_power]


def sampling_tuning(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Search the variant's sampling grid; the manifest's metrics hold every point and the selection."""
    target = plan.tuning(variant)
    return cached_or_run(target, lambda: _tune(plan, target, variant, on_log), on_log)


def _tune(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    ar, tok, domain = plan.ar(variant), plan.tokenizer(variant), plan.domain()
    for t in (ar, tok, domain):
        t.require()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, tokenizer = load_ar(ar.artifact, device), load_tokenizer(tok.artifact, device)
    classifier = load_classifier(domain.artifact)
    reference = features_stats(load_set(domain.artifact, "val")[0])
    tuning, has_prologue = plan.profile.tuning, bool(model.Z)
    classes = len(plan.listing.classes)

    def score(cfg: SamplerConfig) -> dict[str, Any]:
        t0 = time.perf_counter()
        cls = torch.arange(classes).repeat_interleave(tuning.samples_per_class)
        idx = torch.arange(tuning.samples_per_class).repeat(classes)
        seeds = sample_seeds(tuning.seed, cls, idx)
        images = []
        for i in range(0, len(cls), cfg.batch_size):
            codes = sample(model, cls[i : i + cfg.batch_size].to(device), seeds[i : i + cfg.batch_size], cfg)
            with torch.no_grad():
                x = tokenizer.decode_codes(codes["visual"])
            images.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu())
        figures = set_figures(*embed(classifier, [(torch.cat(images), cls)]), reference)
        point = {"sampler": _knobs(cfg), **figures}
        on_log(f"{sampler_label(_knobs(cfg), has_prologue)}: fd_domain {figures['fd_domain']:.3f}, "
               f"consistency {figures['class_consistency']:.3f} ({time.perf_counter() - t0:.1f}s)")  # fmt: skip
        return point

    base = replace(plan.profile.sampler, seed=tuning.seed)
    grids: dict[str, list[dict[str, Any]]] = {}
    grids["nocfg"] = [score(c) for c in no_guidance_grid(tuning, base, has_prologue)]
    chosen_nocfg = _best(grids["nocfg"], base)
    grids["cfg"] = [score(c) for c in guidance_grid(tuning, chosen_nocfg, has_prologue)]
    chosen_cfg = _best(grids["cfg"], base)
    selected = {"cfg": to_dict(replace(chosen_cfg, seed=plan.profile.sampler.seed)),
                "nocfg": to_dict(replace(chosen_nocfg, seed=plan.profile.sampler.seed))}  # fmt: skip
    labels = {g: sampler_label(_knobs(c), has_prologue) for g, c in (("nocfg", chosen_nocfg), ("cfg", chosen_cfg))}
    on_log(f"selected: no guidance {labels['nocfg']}; guidance {labels['cfg']}")
    metrics = {"grid": grids, "selected": selected, "labels": labels, "points": {g: len(v) for g, v in grids.items()},
               "reference": "val", "samples_per_point": classes * tuning.samples_per_class}  # fmt: skip
    files = {"metrics.json": target.artifact.put_json("metrics.json", metrics).__dict__}
    return target.artifact.commit(
        files, config=target.config, lineage=target.inputs, code_version=CODE_VERSIONS[ASSET], metrics=metrics,
        profile=plan.label,
    )  # fmt: skip


KNOBS = ("cfg_schedule", "cfg_prologue", "cfg_visual_max", "cfg_power", "temperature_prologue", "temperature_visual")


def _knobs(cfg: SamplerConfig) -> dict[str, Any]:
    return {k: getattr(cfg, k) for k in KNOBS}


def sampler_label(knobs: dict[str, Any], prologue: bool) -> str:
    """A sampler setting in one line: the temperatures and, with guidance, the scales that apply (a variant
    without prologue tokens has no T_prologue or prologue guidance scale)."""
    visual = f"s_max {knobs['cfg_visual_max']:g}, p {knobs['cfg_power']:g}"
    if not prologue:
        t = f"T_visual {knobs['temperature_visual']:g}"
        return t if knobs["cfg_schedule"] == "none" else f"{t}, {visual}"
    t = f"T {knobs['temperature_prologue']:g} / {knobs['temperature_visual']:g}"
    return t if knobs["cfg_schedule"] == "none" else f"{t}, prologue {knobs['cfg_prologue']:g}, {visual}"


def _best(points: list[dict[str, Any]], base: SamplerConfig) -> SamplerConfig:
    """The point with the lowest FD-domain (the first of equals: the grid order is fixed)."""
    best = min(points, key=lambda p: p["fd_domain"])
    return replace(base, **best["sampler"])


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    def summary(m) -> str:
        return "; ".join(f"{g}: {m.metrics['labels'][g]}" for g in ("nocfg", "cfg"))

    return step_main(__doc__, argv, ASSET, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
