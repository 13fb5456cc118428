"""Mechanism metrics per variant (`mechanism_metrics[variant]`): does the model read its prologue, and
does the prologue carry the class? (`modeling.mechanism`).

- The stage-3 AR's and the joint prior's val CE per visual token with the true prologues, prologues
  shuffled within class, shuffled across images, and one constant prologue (prologue variants).
- Fixed-prologue resampling: `evaluation.mechanism_originals` samples per class drawn without
  guidance (the first ones of the stored no-guidance set: same seeds), each resampled
  `evaluation.mechanism_resamples` times with its prologue fixed; the share classified (domain
  classifier) like its original, against the share of random same-class sample pairs classified
  alike (every variant, the baseline included: its pair rate is the floor to compare with).

Standalone: `python -m pipelines.mechanism --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import torch

from modeling.config import from_dict
from modeling.domain_classifier import embed
from modeling.mechanism import (
    PROLOGUE_CONDITIONS,
    agreement,
    ar_visual_ce,
    perturbed_prologues,
    prior_visual_ce,
    same_class_pair_rate,
)
from modeling.sampler import SamplerConfig
from pipelines.domain import load_classifier
from pipelines.loaders import load_ar, load_prior, load_tokenizer
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.shard_reader import labelled_batches, sample_set_images
from pipelines.store import StepResult
from pipelines.token_reader import split_rows

ASSET = "mechanism_metrics"
log = logging.getLogger(__name__)


def mechanism_metrics(plan: Plan, variant: str, *, on_log=log.info, progress: bool = False) -> StepResult:
    """Prologue-perturbation CEs and fixed-prologue resampling agreement of one variant."""
    target = plan.mechanism(variant)
    return cached_or_run(target, lambda: _measure(plan, target, variant, on_log), on_log)


def _measure(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    inputs = {"ar": plan.ar(variant), "tokenizer": plan.tokenizer(variant), "tokens": plan.tokens(variant),
              "samples": plan.samples(variant)[0], "domain": plan.domain()}  # fmt: skip
    manifests = {k: t.require() for k, t in inputs.items()}
    classifier = load_classifier(inputs["domain"].artifact)
    stored = sample_set_images(inputs["samples"].artifact, manifests["samples"], "nocfg")
    _, predicted, conditioned = embed(classifier, labelled_batches(stored, 500))
    metrics: dict[str, Any] = {
        "same_class_pair_rate": same_class_pair_rate(predicted, conditioned),
        "pair_samples": len(predicted),
        "z_len": plan.profile.tokenizer_for(variant).z_len,
    }
    if metrics["z_len"]:
        model = load_ar(inputs["ar"].artifact)
        metrics |= _prologue_ce(model, inputs, on_log)
        metrics |= _resampling(model, plan, inputs, target.config, classifier, on_log)
    return target.artifact.commit(
        {"metrics.json": target.artifact.put_json("metrics.json", metrics).__dict__},
        config=target.config, lineage=target.inputs, code_version=CODE_VERSIONS[ASSET], metrics=metrics,
        profile=plan.label,
    )  # fmt: skip


def _prologue_ce(model, inputs: dict[str, Target], on_log: Callable[[str], None]) -> dict[str, Any]:
    """Val CE per visual token of the AR and of the joint prior under each prologue condition."""
    labels, prologue, visual = split_rows(inputs["tokens"].artifact, "val")
    prior = load_prior(inputs["tokenizer"].artifact)
    out: dict[str, Any] = {"ar_visual_ce": {}, "prior_visual_ce": {}, "ce_rows": len(labels)}
    for condition in PROLOGUE_CONDITIONS:
        given = perturbed_prologues(prologue, labels, condition, seed=0)
        out["ar_visual_ce"][condition] = ar_visual_ce(model, labels, given, visual)
        out["prior_visual_ce"][condition] = prior_visual_ce(prior, given, visual)
        on_log(f"{condition}: AR visual CE {out['ar_visual_ce'][condition]:.4f}, prior "
               f"{out['prior_visual_ce'][condition]:.4f}")  # fmt: skip
    return out


def _resampling(model, plan: Plan, inputs: dict[str, Target], config: dict, classifier, on_log) -> dict[str, Any]:
    """Share of fixed-prologue resamples that the domain classifier puts in their original's class."""
    from modeling.sampler import resample_visual, sample, sample_seeds

    tokenizer = load_tokenizer(inputs["tokenizer"].artifact)
    # the no-guidance samples' settings
    cfg = replace(from_dict(SamplerConfig, inputs["samples"].config["sampler"]), cfg_schedule="none")
    m, r, classes = config["originals_per_class"], config["resamples"], len(plan.listing.classes)
    cls = torch.arange(classes).repeat_interleave(m)  # [C * m]
    index = torch.arange(m).repeat(classes)
    original = sample(model, cls, sample_seeds(cfg.seed, cls, index), cfg)  # = the stored nocfg samples' codes
    again_cls, again_index = cls.repeat_interleave(r), index.repeat_interleave(r) * r + torch.arange(r).repeat(len(cls))
    again = resample_visual(model, again_cls, original["prologue"].repeat_interleave(r, 0),
                            sample_seeds(cfg.seed + 1_000_003, again_cls, again_index), cfg)  # fmt: skip

    def classify(codes: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            images = ((tokenizer.decode_codes(codes).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return embed(classifier, [(images, labels)])[1]

    kept = agreement(classify(again["visual"], again_cls), classify(original["visual"], cls).repeat_interleave(r))
    on_log(f"fixed-prologue resampling: {kept:.3f} of {len(again_cls)} resamples keep their original's class")
    return {"resample_keep_rate": kept, "resampled": len(again_cls), "originals": len(cls)}


def main(argv: list[str] | None = None) -> int:
    from pipelines.runner import step_main

    def summary(m) -> str:
        x = m.metrics
        ce = x.get("ar_visual_ce", {})
        shown = ", ".join(f"{k} {v:.3f}" for k, v in ce.items())
        keep = f"; resample keep {x['resample_keep_rate']:.3f}" if "resample_keep_rate" in x else ""
        return f"AR visual CE {shown or '-'}{keep}; same-class pairs {x['same_class_pair_rate']:.3f}"

    return step_main(__doc__, argv, ASSET, summary=summary)


if __name__ == "__main__":
    sys.exit(main())
