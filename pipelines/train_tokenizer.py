"""Train a stage-1 tokenizer variant from the image shards in the store.

`train_tokenizer()` (what the asset calls) takes its target and input shards from the plan and,
unless that artefact already exists, launches its worker (`pipelines.workers.tokenizer`) as a subprocess on
`tokenizer_train.processes` ranks (torchrun; gloo on CPU, NCCL on GPU). The worker resumes from
the newest checkpoint in the store, trains, checkpoints every N steps, and rank 0 evaluates the
EMA weights on val and writes the outputs (and, launched through a `runner` such as the asset's
Dagster Pipes one, reports its metrics to it); the parent then commits the manifest.

Standalone: `python -m pipelines.train_tokenizer --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from modeling.config import to_dict
from pipelines.launch import Runner, launch_worker
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import SPLITS
from pipelines.runner import step_main
from pipelines.store import StepResult

ASSET = "tokenizer"
log = logging.getLogger(__name__)
CURVES = ("l1", "l2", "vq", "ce_prologue", "ce_visual", "prior_ce_prologue", "prior_ce_visual", "gan_g", "gan_d")


def train_tokenizer(
    plan: Plan,
    variant: str,
    *,
    on_log: Callable[[str], None] = log.info,
    progress: bool = True,
    runner: Runner | None = None,
) -> StepResult:
    """Train (or find) the tokenizer of one variant from the plan's image shards (and, for
    Prologue-Post, its trained baseline); returns once the manifest is committed."""
    target = plan.tokenizer(variant)
    return cached_or_run(target, lambda: _train(plan, target, variant, progress, on_log, runner), on_log)


def _train(plan: Plan, target: Target, variant: str, progress: bool, on_log, runner: Runner | None) -> dict:
    for s in SPLITS:
        plan.shards(s).require()
    base = plan.base_tokenizer(variant)
    if base is not None:
        base.require()
    train = plan.profile.tokenizer_train_for(variant)
    artifact = target.artifact
    spec = {
        "variant": target.config["variant"],
        "model": target.config["model"],
        "train": to_dict(train),
        "shards": {k: v for k, v in target.inputs.items() if k.startswith("image_shards/")},
        "base": base.key if base is not None else None,
        "profile": plan.label,
    }
    spec_record = artifact.put_json("spec.json", spec)
    launch_worker("tokenizer", plan.store, artifact.key, train.processes, progress, on_log, runner=runner)
    return artifact.commit_trained(
        {"spec.json": spec_record}, profile=plan.label, config=target.config, lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
    )


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        summary=lambda m: (
            f"val PSNR {m.metrics['psnr_db']:.2f} dB, visual codes used "
            f"{m.metrics['visual_codes']['fraction_used']:.1%}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
