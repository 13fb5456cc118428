"""Stage 3: train the class-conditional AR model on a token dataset through DeepSpeed.

`train_ar()` (what the asset calls) takes its target and token dataset from the plan and, unless that
artefact exists, starts the `worker` subcommand of this module on `ar_train.processes` ranks: through
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
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable

import torch
import torch.distributed as dist

from modeling.config import from_dict, to_dict
from pipelines.checkpoints import PREFIX, latest_checkpoint
from pipelines.images import loss_curves_png
from pipelines.launch import command, ranks_in_sync, run, worker_context
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.runner import step_main, worker_args, worker_env
from pipelines.store import Artifact, StepResult, Store
from pipelines.token_reader import token_loader

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
    cfg, artifact = plan.profile.ar_train, target.artifact
    spec = {
        "variant": variant,
        "model": target.config["model"],
        "train": to_dict(cfg),
        "token_dataset": tokens.key,
        "profile": plan.label,
    }
    spec_record = artifact.put_json("spec.json", spec)
    argv, env = command("pipelines.train_ar", worker_args(plan.store, artifact.key, progress), cfg.processes)
    env |= worker_env(plan.store)
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


# -- worker (one per rank) -------------------------------------------------------------------------
def worker(store: Store, key: str, progress: bool) -> None:
    from tqdm import tqdm

    from modeling.ar_model import ARConfig
    from modeling.ar_trainer import ARTrainConfig, ARTrainer, deepspeed_config

    ctx = worker_context()  # DeepSpeed joins the process group itself
    rank, world, local_rank, device = ctx.rank, ctx.world, ctx.local_rank, ctx.device
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    model_cfg, cfg = from_dict(ARConfig, spec["model"]), from_dict(ARTrainConfig, spec["train"])
    trainer = ARTrainer(model_cfg, cfg, device)
    pipes = _open_pipes() if rank == 0 else None
    staging = os.path.join(tempfile.gettempdir(), f"prologue-{ASSET}-{key}")  # shared by the ranks of a node

    history: list[dict] = []
    ckpt = latest_checkpoint(artifact)
    if ckpt is not None:
        history = _resume(trainer, artifact, ckpt, staging, local_rank)
        _say(rank, pipes, f"resumed from {ckpt['folder']} (step {trainer.step})")
    tokens = store.artifact("token_dataset", spec["token_dataset"])
    loader = token_loader(
        tokens,
        cfg.batch_size,
        num_workers=cfg.loader_workers,
        fmt=cfg.data_format,
        shuffle_rows=cfg.shuffle_rows,
        seed=cfg.seed,
        start_batch=trainer.step * cfg.grad_accum,
        rank=rank,
        world_size=world,
    )
    batches = iter(loader)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * world * model_cfg.seq_len
    bar = tqdm(
        total=cfg.steps, initial=trainer.step, unit="step", disable=not (progress and rank == 0 and sys.stderr.isatty())
    )
    t0, last = time.perf_counter(), trainer.step
    while trainer.step < cfg.steps:
        stats = trainer.train_step([next(batches) for _ in range(cfg.grad_accum)])
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            stats["tokens_per_s"] = (trainer.step - last) * tokens_per_step / (time.perf_counter() - t0)
            t0, last = time.perf_counter(), trainer.step
            history.append({"step": trainer.step, **stats})
            shown = " ".join(f"{k}={stats[k]:.4g}" for k in SHOWN if k in stats)
            _say(rank, pipes, f"step {trainer.step}/{cfg.steps} {shown} {stats['tokens_per_s']:.0f} tok/s")
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            folder = _save(trainer, artifact, history, staging, rank, local_rank, world)
            _say(rank, pipes, f"checkpoint {folder}")
    bar.close()
    in_sync = ranks_in_sync(trainer.model, world)
    if rank == 0:
        val = token_loader(tokens, 500, num_workers=0, split="val", shuffle=False, epochs=1, rank=0, world_size=1)
        metrics = {
            **trainer.evaluate(val),
            "ranks": world,
            "ranks_in_sync": in_sync,
            "final": {k: v for k, v in history[-1].items() if k != "step"},
        }
        ds = {"config": deepspeed_config(cfg, trainer.bf16), "bf16": trainer.bf16}
        _finish(artifact, trainer, history, metrics, ds)
        _say(rank, pipes, f"val ce_visual {metrics['val_ce_visual']:.4f} on {metrics['val_sequences']} sequences")
        if pipes is not None:
            pipes.report_custom_message({"metrics": metrics})
            pipes.close()
    shutil.rmtree(staging, ignore_errors=True)
    if world > 1:
        dist.barrier()


def _open_pipes():
    """The Dagster Pipes context when launched by Dagster Pipes, else None (standalone run)."""
    from dagster_pipes import PipesEnvVarParamsLoader, open_dagster_pipes

    return open_dagster_pipes() if PipesEnvVarParamsLoader().is_dagster_pipes_process() else None


def _say(rank: int, pipes, message: str) -> None:
    if rank == 0:
        print(message, flush=True)
        if pipes is not None:
            pipes.log.info(message)


def _save(
    trainer, artifact: Artifact, history: list[dict], staging: str, rank: int, local_rank: int, world: int
) -> str:
    """DeepSpeed checkpoint (every rank writes its shards), uploaded per node; EMA + history by rank 0;
    then the `ckpt-` part that makes it count for resume."""
    step = trainer.step
    tag, folder = f"step-{step:07d}", f"checkpoints/step-{step:07d}"
    trainer.engine.save_checkpoint(staging, tag=tag, save_latest=False)
    if world > 1:
        dist.barrier()
    files: dict[str, dict] = {}
    if local_rank == 0:  # one upload per node: on one node rank 0 sees every shard
        for root, _, names in os.walk(os.path.join(staging, tag)):
            for name in names:
                local = os.path.join(root, name)
                rel = f"{folder}/deepspeed/{os.path.relpath(local, os.path.join(staging, tag))}"
                files[rel] = artifact.put_file(local, rel).__dict__
    if rank == 0:
        ema = artifact.put_safetensors(f"{folder}/ema.safetensors", trainer.ema.state_dict())
        files[f"{folder}/ema.safetensors"] = ema.__dict__
        state = json.dumps({"step": step, "history": history, "world_size": world}).encode()
        files[f"{folder}/state.json"] = artifact.put_bytes(f"{folder}/state.json", state).__dict__
    if world > 1:
        gathered: list = [None] * world
        dist.all_gather_object(gathered, files)
        files = {k: v for g in gathered for k, v in g.items()}
    if rank == 0:
        artifact.record_part(f"{PREFIX}{step:07d}", {"step": step, "folder": folder, "files": files})
    shutil.rmtree(os.path.join(staging, tag), ignore_errors=True)
    if world > 1:
        dist.barrier()
    return folder


def _resume(trainer, artifact: Artifact, record: dict, staging: str, local_rank: int) -> list[dict]:
    """Load engine state (model, optimiser, schedule, step) and the EMA; returns the history."""
    from safetensors.torch import load

    folder, tag = record["folder"], os.path.basename(record["folder"])
    if local_rank == 0:
        for rel in record["files"]:
            if f"{folder}/deepspeed/" in rel:
                local = os.path.join(staging, tag, rel.split("/deepspeed/", 1)[1])
                os.makedirs(os.path.dirname(local), exist_ok=True)
                artifact.fs.get_file(artifact.file_path(rel), local)
    if dist.is_initialized():
        dist.barrier()
    path, _ = trainer.engine.load_checkpoint(staging, tag=tag)
    if path is None:
        raise RuntimeError(f"{artifact.uri}: DeepSpeed could not load checkpoint {folder}")
    trainer.ema.load_state_dict(load(artifact.read_bytes(f"{folder}/ema.safetensors")))
    state = json.loads(artifact.read_bytes(f"{folder}/state.json"))
    if state["world_size"] != int(os.environ.get("WORLD_SIZE", "1")):
        print(
            f"warning: resuming a {state['world_size']}-process run on a different number of processes: "
            "training continues, but the data order differs from an uninterrupted run",
            flush=True,
        )
    return state["history"]


def _finish(artifact: Artifact, trainer, history: list[dict], metrics: dict, ds: dict) -> None:
    """Rank 0: consolidated safetensors (weights and EMA), curves, history, metrics; the `final` part."""
    weights = {"model/ar.safetensors": trainer.model, "model/ar_ema.safetensors": trainer.ema.module}
    files = {
        rel: artifact.put_safetensors(rel, {k: v.float() for k, v in m.state_dict().items()}).__dict__
        for rel, m in weights.items()
    }
    files["loss_curves.png"] = artifact.put_bytes("loss_curves.png", loss_curves_png(history, CURVES)).__dict__
    lines = "".join(json.dumps(h) + "\n" for h in history).encode()
    files["history.jsonl"] = artifact.put_bytes("history.jsonl", lines).__dict__
    files["metrics.json"] = artifact.put_json("metrics.json", metrics).__dict__
    ds_json = json.dumps(ds["config"], indent=1).encode()  # what DeepSpeed ran with, reusable as-is
    files["deepspeed_config.json"] = artifact.put_bytes("deepspeed_config.json", ds_json).__dict__
    checkpoints = sorted(p["folder"] for n, p in artifact.parts().items() if n.startswith(PREFIX))
    artifact.record_part(
        "final",
        {
            "files": files,
            "metrics": metrics,
            "steps": trainer.step,
            "deepspeed": ds,
            "checkpoints": checkpoints,
            "parameters": trainer.model.num_params(),
        },
    )


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        worker=worker,
        summary=lambda m: (
            f"final train loss {m['metrics']['final']['loss']:.4f}, val ce_visual {m['metrics']['val_ce_visual']:.4f}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
