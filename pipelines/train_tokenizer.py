"""Train a stage-1 tokenizer variant from the image shards in the store.

`train_tokenizer()` (what the asset calls) resolves the shards, computes the cache key and, unless
that artefact already exists, launches the `worker` subcommand of this module as a subprocess on
`tokenizer_train.processes` ranks (torchrun; gloo on CPU, NCCL on GPU). The worker resumes from
the newest checkpoint in the store, trains, checkpoints every N steps, and rank 0 evaluates the
EMA weights on val and writes the outputs; the parent then commits the manifest.

Standalone: `python -m pipelines.train_tokenizer --profile fashion32 --variant prologue`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist

from pipelines.checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from pipelines.cli import variant_step_main, worker_args
from pipelines.config import from_dict, key_dict, to_dict
from pipelines.images import grid_png, loss_curves_png
from pipelines.launch import launch, ranks_in_sync
from pipelines.profiles import SPLITS, Profile
from pipelines.shard_reader import image_loader
from pipelines.sharding import shard_split
from pipelines.store import Artifact, StepResult, Store, cache_key

ASSET = "tokenizer"
CODE_VERSION = "1"
log = logging.getLogger(__name__)
CURVES = ("l1", "l2", "vq", "ce_prologue", "ce_visual", "prior_ce_prologue", "prior_ce_visual", "gan_g", "gan_d")


def train_tokenizer(
    profile: Profile, variant: str, store: Store, *, on_log: Callable[[str], None] = log.info, progress: bool = True
) -> StepResult:
    """Train (or find) the tokenizer of one variant; returns once its manifest is committed."""
    start = time.perf_counter()
    model_cfg = profile.tokenizer_for(variant)
    shards = {s: shard_split(profile, s, store, progress=progress, on_log=on_log) for s in SPLITS}
    config = {"variant": variant, "model": key_dict(model_cfg), "train": key_dict(profile.tokenizer_train)}
    inputs = {f"image_shards/{s}": r.artifact.key for s, r in shards.items()}
    if model_cfg.post_hoc:  # Prologue-Post: the prologue path is trained on top of the trained 2D tokenizer
        base = train_tokenizer(profile, "baseline", store, on_log=on_log, progress=progress)
        inputs[f"{ASSET}/baseline"] = base.artifact.key
    artifact = store.artifact(ASSET, cache_key(ASSET, CODE_VERSION, config, inputs))
    manifest = artifact.manifest()
    if manifest is not None:
        on_log(f"{ASSET}[{variant}] already materialised at {artifact.uri}")
        return StepResult(artifact, manifest, True, time.perf_counter() - start)

    spec = {
        "variant": variant,
        "model": config["model"],
        "train": to_dict(profile.tokenizer_train),
        "shards": {k: v for k, v in inputs.items() if k.startswith("image_shards/")},
        "base": inputs.get(f"{ASSET}/baseline"),
        "profile": f"{profile.name}@{profile.version}",
    }
    spec_record = artifact.put_bytes("spec.json", json.dumps(spec, indent=1).encode())
    args = worker_args(store, artifact.key, progress)
    launch("pipelines.train_tokenizer", args, profile.tokenizer_train.processes, on_line=on_log)

    manifest = artifact.commit_trained(
        {"spec.json": spec_record}, profile=spec["profile"], config=config, lineage=inputs, code_version=CODE_VERSION
    )
    return StepResult(artifact, manifest, False, time.perf_counter() - start)


def load_tokenizer(artifact: Artifact, device: torch.device | str = "cpu"):
    """The trained tokenizer (EMA weights) of a materialised `tokenizer` artefact, in eval mode."""
    from safetensors.torch import load

    from modeling.tokenizer import Tokenizer, TokenizerConfig

    manifest = artifact.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{artifact.uri}: tokenizer not materialised (no manifest)")
    tokenizer = Tokenizer(from_dict(TokenizerConfig, manifest["config"]["model"]))
    tokenizer.load_state_dict(load(artifact.read_bytes("model/tokenizer.safetensors")))
    return tokenizer.to(device).eval()


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

    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{local_rank}" if cuda else "cpu")
    if world > 1:
        if cuda:
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if cuda else "gloo")
    artifact = store.artifact(ASSET, key)
    spec = json.loads(artifact.read_bytes("spec.json"))
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
    from safetensors.torch import save_file

    ema = trainer.ema.module
    val_batches = (images for images, _ in image_loader(val, 250, num_workers=0, rank=0, world_size=1))
    metrics, grid = evaluate(ema, val_batches, max_images=cfg.eval_images)
    metrics.update(extra)
    files = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = {"model/tokenizer.safetensors": ema.state_dict()}
        if trainer.prior is not None:
            weights["model/prior.safetensors"] = trainer.prior.state_dict()
        for rel, sd in weights.items():
            local = os.path.join(tmp, os.path.basename(rel))
            save_file({k: v.detach().cpu().contiguous() for k, v in sd.items()}, local)
            files[rel] = artifact.put_file(local, rel).__dict__
    files["reconstructions.png"] = artifact.put_bytes("reconstructions.png", grid_png(grid)).__dict__
    files["loss_curves.png"] = artifact.put_bytes("loss_curves.png", loss_curves_png(history, CURVES)).__dict__
    files["history.jsonl"] = artifact.put_bytes(
        "history.jsonl", "".join(json.dumps(h) + "\n" for h in history).encode()
    ).__dict__
    files["metrics.json"] = artifact.put_bytes("metrics.json", json.dumps(metrics, indent=1).encode()).__dict__
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
    return variant_step_main(
        __doc__,
        argv,
        train_tokenizer,
        worker,
        lambda m: (
            f"val PSNR {m['metrics']['psnr_db']:.2f} dB, visual codes used "
            f"{m['metrics']['visual_codes']['fraction_used']:.1%}"
        ),
    )


if __name__ == "__main__":
    sys.exit(main())
