"""Stage 3: train the class-conditional AR model on a token dataset through DeepSpeed.

`train_ar()` (what the asset calls) takes its target and token dataset from the plan and, unless that
artefact exists, starts its worker (`pipelines.workers.ar`) on `ar_train.processes` ranks: through
torchrun by default, or through any runner given (the asset passes Dagster Pipes, which streams the
rank-0 metrics into the Dagster event log). Multi-node: start the worker with the `deepspeed` or
torchrun launcher on every node (see deploy/README.md); it reads the usual RANK/WORLD_SIZE contract.

The worker resumes from the newest checkpoint in the store (DeepSpeed engine state + float32 EMA),
streams batches with the resumable token reader, checkpoints every N steps and at the end, then
rank 0 evaluates the EMA weights on val and writes consolidated safetensors for inference.

Standalone: `python -m pipelines.train_ar --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

import torch

from modeling.config import to_dict
from pipelines.launch import run, worker_command
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.runner import step_main
from pipelines.store import StepResult

ASSET = "ar_model"
CURVES = ("loss", "ce_prologue", "ce_visual", "accuracy_prologue", "accuracy_visual", "lr", "tokens_per_s")
SHOWN = ("loss", "ce_prologue", "ce_visual", "accuracy_visual", "grad_norm")
log = logging.getLogger(__name__)

Runner = Callable[[list[str], dict[str, str]], None]  # (argv, extra environment) -> runs to completion


def train_ar(
    plan: Plan,
    variant: str,
    *,
    on_log: Callable[[str], None] = log.info,
    progress: bool = True,
    runner: Runner | None = None,
) -> StepResult:
    """Train (or find) the AR model of one variant on its plan token dataset; returns once its
    manifest is committed."""
    target = plan.ar(variant)
    return cached_or_run(target, lambda: _train(plan, target, variant, progress, on_log, runner), on_log)


def _train(plan: Plan, target: Target, variant: str, progress: bool, on_log, runner: Runner | None) -> dict:
    tokens = plan.tokens(variant)
    tokens.require()
    cfg, artifact = plan.profile.ar_train_for(variant), target.artifact
    spec = {
        "variant": variant,
        "model": target.config["model"],
        "train": to_dict(cfg),
        "token_dataset": tokens.key,
        "profile": plan.label,
    }
    spec_record = artifact.put_json("spec.json", spec)
    argv, env = worker_command("ar", plan.store, artifact.key, cfg.processes, progress)
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"  # DeepSpeed would otherwise probe for GPUs (and mpi4py)
    if runner is None:
        run(argv, env, on_line=on_log)
    else:
        runner(argv, env)
    return artifact.commit_trained(
        {"spec.json": spec_record},
        counts=("steps", "parameters"),
        recorded=("metrics", "checkpoints", "deepspeed"),
        profile=plan.label,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
    )


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        summary=lambda m: (
            f"final train loss {m.metrics['final']['loss']:.4f}, val ce_visual {m.metrics['val_ce_visual']:.4f}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
