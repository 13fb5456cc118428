"""Worker of the `tokenizer` step: one rank of data-parallel tokenizer training (torchrun contract).

Resumes from the newest checkpoint in the store, trains, checkpoints every N steps; rank 0 then
evaluates the EMA weights on val, writes the outputs, records the `final` part that the parent
step (`pipelines.train_tokenizer`) commits and reports its steps and metrics (through Dagster Pipes
when launched by it). Started as `python -m pipelines.workers.tokenizer`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator

import torch.distributed as dist

from modeling.config import from_dict
from pipelines.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pipelines.images import grid_png, loss_curves_png
from pipelines.launch import ranks_in_sync, worker_context
from pipelines.shard_reader import image_loader
from pipelines.store import Artifact, Store
from pipelines.workers import report, say, worker_main

ASSET = "tokenizer"
CURVES = ("l1", "l2", "vq", "ce_prologue", "ce_visual", "prior_ce_prologue", "prior_ce_visual", "gan_g", "gan_d")


def _batches(artifact: Artifact, cfg, rank: int, world: int, epoch: int, skip: int) -> Iterator[tuple]:
    """Endless training batches (epoch, batches done in it, images, labels): a fresh seeded shuffle per
    epoch; starts `skip` batches into `epoch`."""
    while True:
        loader = image_loader(
            artifact,
            cfg.batch_size,
            num_workers=cfg.loader_workers,
            rank=rank,
            world_size=world,
            shuffle=cfg.shuffle_buffer,
            seed=cfg.seed * 7919 + epoch,
        )
        for i, (images, labels) in enumerate(loader):
            if i >= skip and images.shape[0] == cfg.batch_size:
                yield epoch, i + 1, images, labels
        epoch, skip = epoch + 1, 0


SHOWN = ("loss", "l1", "vq", "ce_prologue", "ce_visual", "gan_g", "gan_d", "visual_usage", "prologue_perplexity")


def run(store: Store, key: str, progress: bool) -> None:
    from modeling.tokenizer import TokenizerConfig
    from modeling.tokenizer_eval import evaluate
    from modeling.tokenizer_trainer import TokenizerTrainConfig, TokenizerTrainer

    ctx = worker_context(process_group=True)
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    model_cfg = from_dict(TokenizerConfig, spec["model"])
    cfg = from_dict(TokenizerTrainConfig, spec["train"])
    base = None
    if spec.get("base"):  # the frozen 2D tokenizer under a Prologue-Post prologue path (EMA weights)
        from safetensors.torch import load

        base = load(store.artifact(ASSET, spec["base"]).read_bytes("model/tokenizer.safetensors"))
    trainer = TokenizerTrainer(model_cfg, cfg, ctx.device, rank=ctx.rank, distributed=ctx.world > 1, base=base)
    shards = {name.split("/")[1]: store.artifact("image_shards", k) for name, k in spec["shards"].items()}
    history: list[dict] = []
    positions = [(0, 0)] * ctx.world
    ckpt = latest_checkpoint(artifact)
    if ckpt is not None:
        tensors, state = load_checkpoint(artifact, ckpt)
        trainer.load(tensors, state)
        history, positions = state["history"], state["positions"]
        ctx.say(f"resumed from {ckpt['folder']} (step {trainer.step})")
    _train(ctx, trainer, cfg, artifact, shards["train"], history, positions[ctx.rank], progress)
    in_sync = ranks_in_sync(trainer.tokenizer, ctx.world)
    if ctx.rank == 0:
        trainable = sum(p.numel() for p in trainer.tokenizer.parameters() if p.requires_grad)
        extra = {"ranks": ctx.world, "ranks_in_sync": in_sync, "trainable_parameters": trainable}
        _finish(artifact, trainer, shards["val"], cfg, history, evaluate, extra)
    if ctx.world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _train(ctx, trainer, cfg, artifact: Artifact, train: Artifact, history: list, position, progress: bool) -> None:
    """Train to `cfg.steps` from where the trainer is (`position`: this rank's epoch and batch)."""
    batches = _batches(train, cfg, ctx.rank, ctx.world, *position)
    bar = ctx.progress(cfg.steps, trainer.step, enabled=progress)
    t0, last_step = time.perf_counter(), trainer.step
    data_checksum = history[-1]["data_checksum"] if history else 0
    while trainer.step < cfg.steps:
        epoch, done_in_epoch, images, labels = next(batches)
        # a running checksum of every batch seen: two arms with the same data order log the same values
        data_checksum = (data_checksum * 1000003 + int(images.sum())) % (1 << 61)
        stats = trainer.train_step(images, labels)
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            rate = (trainer.step - last_step) * cfg.batch_size * ctx.world / (time.perf_counter() - t0)
            t0, last_step = time.perf_counter(), trainer.step
            entry = {"step": trainer.step, "epoch": epoch, "data_checksum": data_checksum, "images_per_s": rate}
            history.append(entry | stats)
            shown = " ".join(f"{k}={v:.4g}" for k, v in stats.items() if k in SHOWN)
            ctx.say(f"step {trainer.step}/{cfg.steps} {shown} {rate:.0f} img/s")
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            _checkpoint(ctx, trainer, artifact, history, (epoch, done_in_epoch))
    bar.close()


def _checkpoint(ctx, trainer, artifact: Artifact, history: list, here: tuple[int, int]) -> None:
    """Save a checkpoint with every rank's data position (rank 0 writes it)."""
    positions = [here]
    if ctx.world > 1:
        positions = [None] * ctx.world
        dist.all_gather_object(positions, here)
    if ctx.rank == 0:
        state = {**trainer.training_state(), "history": history, "positions": positions}
        folder = save_checkpoint(artifact, trainer.step, trainer.tensors(), state)
        ctx.say(f"checkpoint {folder}")
    ctx.barrier()


def _finish(artifact: Artifact, trainer, val: Artifact, cfg, history: list[dict], evaluate, extra: dict) -> None:
    """Rank 0: evaluate the EMA tokenizer on val, write the outputs, record the `final` part, report it."""
    ema = trainer.ema.module
    val_batches = (images for images, _ in image_loader(val, 250, num_workers=0, rank=0, world_size=1))
    metrics, grid = evaluate(ema, val_batches, max_images=cfg.eval_images)
    metrics.update(extra)
    weights = {"model/tokenizer.safetensors": ema}
    if trainer.prior is not None:
        weights["model/prior.safetensors"] = trainer.prior
    files = {rel: artifact.put_safetensors(rel, m.state_dict()).__dict__ for rel, m in weights.items()}
    files["reconstructions.png"] = artifact.put_bytes("reconstructions.png", grid_png(grid)).__dict__
    files["loss_curves.png"] = artifact.put_bytes("loss_curves.png", loss_curves_png(history, CURVES)).__dict__
    files["history.jsonl"] = artifact.put_bytes(
        "history.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode()
    ).__dict__
    files["metrics.json"] = artifact.put_json("metrics.json", metrics).__dict__
    checkpoints = sorted(p["folder"] for n, p in artifact.parts().items() if n.startswith("ckpt-"))
    artifact.record_part(
        "final", {"files": files, "metrics": metrics, "steps": trainer.step, "checkpoints": checkpoints}
    )
    say(
        f"val PSNR {metrics['psnr_db']:.2f} dB on {metrics['images']} images; visual codes used "
        f"{metrics['visual_codes']['fraction_used']:.1%}"
    )
    report(artifact, {"counts": {"steps": trainer.step}, "metrics": metrics})


if __name__ == "__main__":
    sys.exit(worker_main(run))
