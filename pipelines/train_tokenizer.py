"""Train a stage-1 tokenizer variant from the image shards in the store.

`train_tokenizer()` (what the asset calls) takes its target and input shards from the plan and,
unless that artefact already exists, launches the `worker` subcommand of this module as a subprocess on
`tokenizer_train.processes` ranks (torchrun; gloo on CPU, NCCL on GPU). The worker resumes from
the newest checkpoint in the store, trains, checkpoints every N steps, and rank 0 evaluates the
EMA weights on val and writes the outputs; the parent then commits the manifest.

Standalone: `python -m pipelines.train_tokenizer --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from modeling.config import from_dict, to_dict
from pipelines.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pipelines.images import grid_png, loss_curves_png
from pipelines.launch import launch, ranks_in_sync, worker_context
from pipelines.plan import CODE_VERSIONS, Plan, Target, cached_or_run
from pipelines.profiles import SPLITS
from pipelines.runner import step_main, worker_args, worker_env
from pipelines.shard_reader import image_loader
from pipelines.store import Artifact, StepResult, Store

ASSET = "tokenizer"
log = logging.getLogger(__name__)
CURVES = ("l1", "l2", "vq", "ce_prologue", "ce_visual", "prior_ce_prologue", "prior_ce_visual", "gan_g", "gan_d")


def train_tokenizer(
    plan: Plan, variant: str, *, on_log: Callable[[str], None] = log.info, progress: bool = True
) -> StepResult:
    """Train (or find) the tokenizer of one variant from the plan's image shards (and, for
    Prologue-Post, its trained baseline); returns once the manifest is committed."""
    target = plan.tokenizer(variant)
    return cached_or_run(target, lambda: _train(plan, target, variant, progress, on_log), on_log)


def _train(plan: Plan, target: Target, variant: str, progress: bool, on_log: Callable[[str], None]) -> dict:
    for s in SPLITS:
        plan.shards(s).require()
    base = plan.base_tokenizer(variant)
    if base is not None:
        base.require()
    train = plan.profile.tokenizer_train
    artifact = target.artifact
    spec = {
        "variant": variant,
        "model": target.config["model"],
        "train": to_dict(train),
        "shards": {k: v for k, v in target.inputs.items() if k.startswith("image_shards/")},
        "base": base.key if base is not None else None,
        "profile": plan.label,
    }
    spec_record = artifact.put_json("spec.json", spec)
    launch("pipelines.train_tokenizer", worker_args(plan.store, artifact.key, progress), train.processes,
           on_line=on_log, env=worker_env(plan.store))
    return artifact.commit_trained(
        {"spec.json": spec_record}, profile=plan.label, config=target.config, lineage=target.inputs,
        code_version=CODE_VERSIONS[ASSET],
    )


# -- worker (one per rank) -------------------------------------------------------------------------
def _batches(artifact: Artifact, cfg, rank: int, world: int, epoch: int, skip: int) -> Iterator[torch.Tensor]:
    """Endless training batches: a fresh seeded shuffle per epoch; starts `skip` batches into `epoch`."""
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
        for i, (images, _) in enumerate(loader):
            if i >= skip and images.shape[0] == cfg.batch_size:
                yield epoch, i + 1, images
        epoch, skip = epoch + 1, 0


def worker(store: Store, key: str, progress: bool) -> None:
    from modeling.tokenizer import TokenizerConfig
    from modeling.tokenizer_eval import evaluate
    from modeling.tokenizer_trainer import TokenizerTrainConfig, TokenizerTrainer

    ctx = worker_context(process_group=True)
    rank, world, device = ctx.rank, ctx.world, ctx.device
    artifact = store.artifact(ASSET, key)
    spec = artifact.read_json("spec.json")
    model_cfg = from_dict(TokenizerConfig, spec["model"])
    cfg = from_dict(TokenizerTrainConfig, spec["train"])
    base = None
    if spec.get("base"):  # the frozen 2D tokenizer under a Prologue-Post prologue path (EMA weights)
        from safetensors.torch import load

        base = load(store.artifact(ASSET, spec["base"]).read_bytes("model/tokenizer.safetensors"))
    trainer = TokenizerTrainer(model_cfg, cfg, device, rank=rank, distributed=world > 1, base=base)
    shards = {name.split("/")[1]: store.artifact("image_shards", k) for name, k in spec["shards"].items()}

    history: list[dict] = []
    positions = [(0, 0)] * world
    ckpt = latest_checkpoint(artifact)
    if ckpt is not None:
        tensors, state = load_checkpoint(artifact, ckpt)
        trainer.load(tensors, state)
        history, positions = state["history"], state["positions"]
        _say(rank, f"resumed from {ckpt['folder']} (step {trainer.step})")
    epoch, skip = positions[rank]
    batches = _batches(shards["train"], cfg, rank, world, epoch, skip)
    bar = _progress(progress and rank == 0, cfg.steps, trainer.step)
    t0, last_step = time.perf_counter(), trainer.step
    while trainer.step < cfg.steps:
        epoch, done_in_epoch, images = next(batches)
        stats = trainer.train_step(images)
        bar.update(1)
        if trainer.step % cfg.log_every == 0 or trainer.step == cfg.steps:
            rate = (trainer.step - last_step) * cfg.batch_size * world / (time.perf_counter() - t0)
            t0, last_step = time.perf_counter(), trainer.step
            history.append({"step": trainer.step, "epoch": epoch, "images_per_s": rate, **stats})
            _say(
                rank,
                f"step {trainer.step}/{cfg.steps} "
                + " ".join(
                    f"{k}={v:.4g}"
                    for k, v in stats.items()
                    if k
                    in (
                        "loss",
                        "l1",
                        "vq",
                        "ce_prologue",
                        "ce_visual",
                        "gan_g",
                        "gan_d",
                        "visual_usage",
                        "prologue_perplexity",
                    )
                )
                + f" {rate:.0f} img/s",
            )
        if trainer.step % cfg.checkpoint_every == 0 or trainer.step == cfg.steps:
            here = [(epoch, done_in_epoch)]
            if world > 1:
                gathered: list = [None] * world
                dist.all_gather_object(gathered, here[0])
                here = gathered
            if rank == 0:
                state = {**trainer.training_state(), "history": history, "positions": here}
                folder = save_checkpoint(artifact, trainer.step, trainer.tensors(), state)
                _say(rank, f"checkpoint {folder}")
            if world > 1:
                dist.barrier()
    bar.close()
    in_sync = ranks_in_sync(trainer.tokenizer, world)
    if rank == 0:
        _finish(artifact, trainer, shards["val"], cfg, history, evaluate, {"ranks": world, "ranks_in_sync": in_sync})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def _finish(artifact: Artifact, trainer, val: Artifact, cfg, history: list[dict], evaluate, extra: dict) -> None:
    """Rank 0: evaluate the EMA tokenizer on val, write the outputs, record the `final` part."""
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
    _say(
        0,
        f"val PSNR {metrics['psnr_db']:.2f} dB on {metrics['images']} images; visual codes used "
        f"{metrics['visual_codes']['fraction_used']:.1%}",
    )


def _say(rank: int, message: str) -> None:
    if rank == 0:
        print(message, flush=True)


def _progress(enabled: bool, total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="step", disable=not (enabled and sys.stderr.isatty()))


def main(argv: list[str] | None = None) -> int:
    return step_main(
        __doc__,
        argv,
        ASSET,
        worker=worker,
        summary=lambda m: (
            f"val PSNR {m['metrics']['psnr_db']:.2f} dB, visual codes used "
            f"{m['metrics']['visual_codes']['fraction_used']:.1%}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
