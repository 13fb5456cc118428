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

import json
import logging
import sys
from collections.abc import Callable

import torch

from modeling.config import to_dict
from pipelines.launch import Runner, launch_worker
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.runner import step_main
from pipelines.store import StepResult

ASSET = "ar_model"
CURVES = ("loss", "ce_prologue", "ce_visual", "accuracy_prologue", "accuracy_visual", "lr", "tokens_per_s")
SHOWN = ("loss", "ce_prologue", "ce_visual", "accuracy_visual", "grad_norm")
log = logging.getLogger(__name__)


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
    if target.config.get("from") == "joint_prior":  # Prologue-OneStage: no stage 3
        return cached_or_run(target, lambda: _from_prior(plan, target, variant, on_log), on_log)
    return cached_or_run(target, lambda: _train(plan, target, variant, progress, on_log, runner), on_log)


def _from_prior(plan: Plan, target: Target, variant: str, on_log: Callable[[str], None]) -> dict:
    """Prologue-OneStage: the tokenizer's class-conditional joint prior, stored as the AR model (its
    modules are the AR model's, name for name) and evaluated on the val token rows like a trained one."""
    from modeling.ar_model import ARConfig, ARModel
    from modeling.ar_trainer import evaluate
    from modeling.config import from_dict
    from pipelines.loaders import load_prior
    from pipelines.token_reader import token_loader

    tok, tokens = plan.tokenizer(variant), plan.tokens(variant)
    tok_manifest = tok.require()
    tokens.require()
    model = ARModel(from_dict(ARConfig, target.config["model"]))
    model.load_state_dict(load_prior(tok.artifact).state_dict())  # strict: the same modules and shapes
    on_log(f"{target.label}: the joint prior of {tok.label} ({model.num_params():,} parameters), no stage 3")
    val = token_loader(tokens.artifact, 500, num_workers=0, split="val", shuffle=False, epochs=1, rank=0, world_size=1)
    history = [json.loads(line) for line in tok.artifact.read_bytes("history.jsonl").decode().splitlines()]
    final = {k.removeprefix("prior_"): v for k, v in history[-1].items() if k.startswith("prior_ce")}
    metrics = {**evaluate(model, val), "ranks": tok_manifest.metrics["ranks"], "final": final}
    artifact = target.artifact
    weights = {k: v.float() for k, v in model.state_dict().items()}
    # the prior has no EMA (the authors sample from the non-EMA AR weights): both files hold its weights
    files = {rel: artifact.put_safetensors(rel, weights) for rel in ("model/ar.safetensors",
                                                                     "model/ar_ema.safetensors")}  # fmt: skip
    files["metrics.json"] = artifact.put_json("metrics.json", metrics)
    files["loss_curves.png"] = artifact.put_bytes("loss_curves.png", tok.artifact.read_bytes("loss_curves.png"))
    return artifact.commit(
        files,
        counts={"steps": 0, "parameters": model.num_params()},
        metrics=metrics,
        checkpoints=[],
        deepspeed={"config": None, "bf16": False},
        profile=plan.label,
        config=target.config,
        lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
    )


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
    # on CPU, DeepSpeed would otherwise probe for GPUs (and mpi4py)
    env = {} if torch.cuda.is_available() else {"DS_ACCELERATOR": "cpu"}
    launch_worker("ar", plan.store, artifact.key, cfg.processes, progress, on_log, runner=runner, env=env)
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
            f"{m.counts.steps} steps, val ce_visual {m.metrics['val_ce_visual']:.4f}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
