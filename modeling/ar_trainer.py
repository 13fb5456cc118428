"""Stage-3 training step through a DeepSpeed engine: config, optimiser, schedule, EMA.

The same code runs on one CPU process (fp32, gloo) and on N GPUs (bf16, NCCL): DeepSpeed owns
data-parallel gradient averaging, gradient accumulation, clipping and (optionally) ZeRO sharding
of the optimiser state; the optimiser is torch's AdamW (no JIT-compiled DeepSpeed kernels).

Randomness (label dropout) is re-seeded from (seed, step, rank) at every step, so a run resumed
from a checkpoint draws exactly what the uninterrupted run drew, without saving RNG state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.optim.swa_utils import AveragedModel

from modeling.ar_model import AR_SIZES, ARConfig, ARModel
from modeling.config import NOT_IN_KEY, Config, ConfigError
from modeling.optim import decay_groups, ema_with_warmup, lr_lambda

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class ARTrainConfig(Config):
    size: str = "fashion32"
    """Transformer size preset of modeling.ar_model.AR_SIZES: tiny, fashion32, B, L, XL."""
    label_dropout: float = 0.1
    """Probability of training a sample as unconditional (enables classifier-free guidance)."""
    steps: int = 3000
    """Optimiser steps."""
    batch_size: int = 64
    """Sequences per micro-batch on each process."""
    grad_accum: int = 1
    """Micro-batches per optimiser step (global batch = batch_size * grad_accum * processes)."""
    lr: float = 4e-4
    """Peak learning rate (AdamW)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.96
    """AdamW beta2 (the paper's 0.96)."""
    weight_decay: float = 0.03
    """AdamW weight decay on matrices and embeddings."""
    warmup_steps: int = 100
    """Linear warm-up steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 disables)."""
    ema_decay: float = 0.9999
    """Decay of the float32 EMA of the weights (the EMA is what gets evaluated and sampled)."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0, 1 or 2 (the EMA and the exported weights need whole parameters)."""
    precision: str = "auto"
    """auto (bf16 on GPU, fp32 on CPU), fp32 or bf16."""
    processes: int = 1
    """Data-parallel processes (one per GPU; CPU processes with gloo where there is none)."""
    loader_workers: int = 1
    """DataLoader worker processes per training process."""
    data_format: str = "parquet"
    """Which copy of the token dataset to stream: parquet or wds."""
    shuffle_rows: int = 16384
    """Rows per shuffle window of the token reader."""
    checkpoint_every: int = field(default=500, metadata=NOT_IN_KEY)
    """Save a resumable checkpoint to the store every N steps (and at the end)."""
    log_every: int = field(default=25, metadata=NOT_IN_KEY)
    """Record (and stream to Dagster) the metrics every N steps."""
    seed: int = 0
    """Seed of initialisation, data order and label dropout."""

    def validate(self) -> None:
        if self.size not in AR_SIZES:
            raise ConfigError(f"size: {self.size!r} is not one of {', '.join(AR_SIZES)}")
        for name in ("steps", "batch_size", "grad_accum", "processes", "checkpoint_every", "log_every", "shuffle_rows"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.label_dropout <= 1:
            raise ConfigError(f"label_dropout: must be in [0, 1], got {self.label_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.zero_stage not in (0, 1, 2):
            raise ConfigError(f"zero_stage: must be 0, 1 or 2, got {self.zero_stage}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision: {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.data_format not in ("parquet", "wds"):
            raise ConfigError(f"data_format: {self.data_format!r} is not one of parquet, wds")

    def uses_bf16(self, cuda: bool) -> bool:
        return self.precision == "bf16" or (self.precision == "auto" and cuda)


def model_config(cfg: ARTrainConfig, codes: dict, num_classes: int) -> ARConfig:
    """The AR model for a token dataset: size preset + the dataset's codebooks and lengths."""
    return ARConfig(
        **AR_SIZES[cfg.size],
        num_classes=num_classes,
        visual_codebook=codes["visual_codebook"],
        prologue_codebook=max(1, codes["prologue_codebook"]),
        z_len=codes["z_len"],
        num_visual=codes["num_visual"],
        label_dropout=cfg.label_dropout,
    )


def deepspeed_config(cfg: ARTrainConfig, bf16: bool) -> dict:
    """The DeepSpeed JSON config generated from the profile."""
    return {
        "train_micro_batch_size_per_gpu": cfg.batch_size,
        "gradient_accumulation_steps": cfg.grad_accum,
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-compiled FusedAdam/CPUAdam
        "steps_per_print": 1 << 62,  # we log ourselves
        "wall_clock_breakdown": False,
    }


def step_seed(seed: int, step: int, rank: int) -> int:
    return (seed * 1_000_003 + step) * 1009 + rank


class ARTrainer:
    def __init__(self, model_cfg: ARConfig, cfg: ARTrainConfig, device: torch.device):
        import deepspeed

        if device.type == "cpu":
            # gloo is enough on CPU; DeepSpeed would otherwise JIT-compile its shared-memory op (~60 s)
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.cfg, self.model_cfg = cfg, model_cfg
        model = ARModel(model_cfg).to(device)
        # float32 EMA, copied before DeepSpeed may cast the module to bf16
        self.ema = AveragedModel(model, multi_avg_fn=ema_with_warmup(cfg.ema_decay))  # its buffers are constants
        opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio))
        self.bf16 = cfg.uses_bf16(device.type == "cuda")
        self.engine, _, _, self.sched = deepspeed.initialize(
            model=model, optimizer=opt, lr_scheduler=sched, config=deepspeed_config(cfg, self.bf16)
        )
        self.rank = self.engine.global_rank
        self.device = device

    @property
    def model(self) -> ARModel:
        return self.engine.module

    @property
    def step(self) -> int:
        return self.engine.global_steps

    def train_step(self, micro_batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> dict[str, float]:
        """One optimiser step over grad_accum micro-batches of (labels, prologue, visual)."""
        assert len(micro_batches) == self.cfg.grad_accum
        torch.manual_seed(step_seed(self.cfg.seed, self.step, self.rank))
        self.engine.train()
        sums: dict[str, float] = {}
        for labels, prologue, visual in micro_batches:
            out = self.engine(*self._inputs(labels, prologue, visual))
            self.engine.backward(out["loss"])
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            for k, v in out.items():
                if k != "logits":
                    sums[k] = sums.get(k, 0.0) + v.item()
        self.ema.update_parameters(self.model)
        stats = {k: v / len(micro_batches) for k, v in sums.items()}
        stats["lr"] = self.sched.get_last_lr()[0]
        norm = self.engine.get_global_grad_norm()  # only tracked by DeepSpeed's own optimiser wrappers
        if norm:
            stats["grad_norm"] = float(norm)
        return stats

    def _inputs(self, labels: torch.Tensor, prologue: torch.Tensor, visual: torch.Tensor) -> tuple:
        """Model arguments on the device; the baseline's empty [B, 0] prologue becomes None."""
        d = self.device
        return labels.to(d), (prologue.to(d) if self.model_cfg.z_len else None), visual.to(d)

    def evaluate(self, batches, max_batches: int = 0) -> dict[str, float]:
        """Conditional CE and accuracy per segment of the EMA weights on held-out batches."""
        return evaluate(self.ema.module, batches, self.device, max_batches)


@torch.no_grad()
def evaluate(model: ARModel, batches, device: torch.device | str = "cpu", max_batches: int = 0) -> dict[str, float]:
    """`val_`-prefixed conditional CE and accuracy per segment of `model` (put in eval mode) on
    held-out (labels, prologue, visual) batches, and `val_sequences`."""
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i, (labels, prologue, visual) in enumerate(batches):
        if max_batches and i >= max_batches:
            break
        out = model(labels.to(device), prologue.to(device) if model.Z else None, visual.to(device))
        for k, v in out.items():
            if k != "logits":
                sums[k] = sums.get(k, 0.0) + v.item() * len(labels)
        n += len(labels)
    return {f"val_{k}": v / max(1, n) for k, v in sums.items()} | {"val_sequences": n}
