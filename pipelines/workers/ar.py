"""Worker of the `ar_model` step: one rank of DeepSpeed AR training (torchrun / deepspeed contract).

Resumes from the newest checkpoint in the store (DeepSpeed engine state + float32 EMA), streams
batches with the resumable token reader, checkpoints every N steps and at the end; rank 0 then
evaluates the EMA weights on val, writes consolidated safetensors and the `final` part that the
parent step (`pipelines.train_ar`) commits, and reports its counts, metrics and DeepSpeed settings
(through Dagster Pipes when launched by it). Started as `python -m pipelines.workers.ar`.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

import torch.distributed as dist

from modeling.config import from_dict
from pipelines.checkpoints import PREFIX, latest_checkpoint
from pipelines.images import loss_curves_png
from pipelines.launch import ranks_in_sync, worker_context
from pipelines.store import Artifact, Store
from pipelines.token_reader import token_loader
from pipelines.workers import report, say, worker_main

ASSET = "ar_model"
CURVES = ("loss", "ce_prologue", "ce_visual", "accuracy_prologue", "accuracy_visual", "lr", "tokens_per_s")
SHOWN = ("loss", "ce_prologue", "ce_visual", "accuracy_visual", "grad_norm")


def run(store: Store, key: str, progress: bool) -> None:
    from modeling.ar_model import ARConfig
    from modeling.ar_trainer import ARTrainConfig, ARTrainer

    ctx = worker_context()  # DeepSpeed joins the process group itself
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    model_cfg, cfg = from_dict(ARConfig, spec["model"]), from_dict(ARTrainConfig, spec["train"])
    trainer = ARTrainer(model_cfg, cfg, ctx.device)
    staging = os.path.join(tempfile.gettempdir(), f"prologue-{ASSET}-{key}")  # shared by the ranks of a node
    history: list[dict] = []
    ckpt = latest_checkpoint(artifact)
    if ckpt is not None:
        history = _resume(trainer, artifact, ckpt, staging, ctx.local_rank)
        ctx.say(f"resumed from {ckpt['folder']} (step {trainer.step})")
    tokens = store.artifact("token_dataset", spec["token_dataset"])
    _train(ctx, trainer, cfg, artifact, tokens, history, staging, progress)
    in_sync = ranks_in_sync(trainer.model, ctx.world)
    if os.environ.get("PROLOGUE_RANK_WEIGHTS"):  # every rank's own final weights, for checking data parallelism
        artifact.put_safetensors(f"ranks/rank-{ctx.rank}.safetensors", trainer.model.state_dict())
    if ctx.rank == 0:
        _final(ctx, artifact, trainer, cfg, tokens, history, {"ranks": ctx.world, "ranks_in_sync": in_sync})
    shutil.rmtree(staging, ignore_errors=True)
    ctx.barrier()


def _train(ctx, trainer, cfg, artifact: Artifact, tokens: Artifact, history: list, staging: str, progress: bool):
    """Train to `cfg.steps` from where the trainer is, logging and checkpointing on the way."""
    loader = token_loader(
        tokens,
        cfg.batch_size,
        num_workers=cfg.loader_workers,
        fmt=cfg.data_format,
        shuffle_rows=cfg.shuffle_rows,
        seed=cfg.seed,
        start_batch=trainer.step * cfg.grad_accum,
        rank=ctx.rank,
        world_size=ctx.world,
    )
    batches = iter(loader)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * ctx.world * trainer.model.cfg.seq_len
    bar = ctx.progress(cfg.steps, trainer.step, enabled=progress)
    t0, last = time.perf_counter(), trainer.step
    while trainer.step < cfg.steps:
        stats = trainer.train_step([next(batches) for _ in range(cfg.grad_accum)])
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            stats["tokens_per_s"] = (trainer.step - last) * tokens_per_step / (time.perf_counter() - t0)
            t0, last = time.perf_counter(), trainer.step
            history.append({"step": trainer.step, **stats})
            shown = " ".join(f"{k}={stats[k]:.4g}" for k in SHOWN if k in stats)
            ctx.say(f"step {trainer.step}/{cfg.steps} {shown} {stats['tokens_per_s']:.0f} tok/s")
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            folder = _save(trainer, artifact, history, staging, ctx.rank, ctx.local_rank, ctx.world)
            ctx.say(f"checkpoint {folder}")
    bar.close()


def _final(ctx, artifact: Artifact, trainer, cfg, tokens: Artifact, history: list, extra: dict) -> None:
    """Rank 0: evaluate the EMA weights on val, write the outputs, report what it stored."""
    from modeling.ar_trainer import deepspeed_config

    val = token_loader(tokens, 500, num_workers=0, split="val", shuffle=False, epochs=1, rank=0, world_size=1)
    metrics = {**trainer.evaluate(val), **extra, "final": {k: v for k, v in history[-1].items() if k != "step"}}
    ds = {"config": deepspeed_config(cfg, trainer.bf16), "bf16": trainer.bf16}
    _finish(artifact, trainer, history, metrics, ds)
    ctx.say(f"val ce_visual {metrics['val_ce_visual']:.4f} on {metrics['val_sequences']} sequences")
    counts = {"steps": trainer.step, "parameters": trainer.model.num_params()}
    report(artifact, {"counts": counts, "metrics": metrics, "deepspeed": ds})


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
        say(
            f"warning: resuming a {state['world_size']}-process run on a different number of processes: "
            "training continues, but the data order differs from an uninterrupted run"
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


if __name__ == "__main__":
    sys.exit(worker_main(run))
