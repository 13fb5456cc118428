"""Stage-1 training: the two alternating optimiser steps per batch.

Step 1 (encoder + decoder): L1 + L2 reconstruction, optional perceptual loss (VGG features or
ConvNeXt-S logits), GAN generator loss, VQ loss, and the joint prior's CE on prologue/EOS and visual
positions, computed by the prior with its weights frozen (the CE reaches the encoder through the
prologue path only).
Step 2 (joint prior + discriminator): plain CE on detached codes; hinge loss for the discriminator.

Every module has its own AdamW and its own schedule (encoder/decoder, joint prior, discriminator), as
the method specifies. The discriminator's schedule counts its own steps from `gan_start`, so it is the
same in every variant whether or not a joint prior trains beside it (a shared optimiser once let the
prior's steps advance the discriminator's schedule in the prologue arms only).

The trainer is data-parallel aware (DDP per module) but does no I/O: checkpoints are `tensors()`
(safetensors-ready) plus `training_state()` (optimisers, schedules, RNG), loaded back with `load()`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.optim.swa_utils import AveragedModel

from modeling.codebook_restart import DeadCodeRestarter
from modeling.config import KEY_UNLESS_DEFAULT, NOT_IN_KEY, Config, ConfigError
from modeling.discriminator import PatchDiscriminator, d_hinge_loss, g_loss
from modeling.joint_prior import JointPrior
from modeling.optim import ema_with_warmup, lr_lambda
from modeling.perceptual import NETWORKS, perceptual_loss
from modeling.tokenizer import Tokenizer, TokenizerConfig


@dataclass
class TokenizerTrainConfig(Config):
    steps: int = 2000
    """Optimiser steps (each: one encoder/decoder step and one prior/discriminator step)."""
    batch_size: int = 64
    """Images per step on each process."""
    lr: float = 3e-4
    """Peak learning rate of the encoder/decoder (AdamW)."""
    aux_lr: float = 3e-4
    """Peak learning rate of the joint prior and the discriminator (AdamW)."""
    beta1: float = 0.9
    """AdamW beta1."""
    beta2: float = 0.95
    """AdamW beta2."""
    weight_decay: float = 0.05
    """AdamW weight decay."""
    warmup_steps: int = 100
    """Linear warm-up steps, then cosine decay."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak."""
    grad_clip: float = 1.0
    """Gradient-norm clipping for both steps (0 disables)."""
    ema_decay: float = 0.999
    """Decay of the EMA of the tokenizer weights (the EMA is what gets evaluated and exported)."""
    l2_weight: float = 1.0
    """Weight of the L2 term next to L1 in the reconstruction loss."""
    perceptual_weight: float = 0.0
    """Weight of the perceptual loss (0: off; needs perceptual_weights)."""
    perceptual_net: str = field(default="vgg16", metadata=KEY_UNLESS_DEFAULT)
    """Network of the perceptual loss (modeling.perceptual): vgg16 (VGG feature distance) or
    convnext_s_logits (MSE of ConvNeXt-S logits, Prologue-L's)."""
    perceptual_weights: str = ""
    """Local torchvision state-dict file of perceptual_net (never downloaded)."""
    gan_weight: float = 0.1
    """Weight of the GAN generator loss."""
    gan_start: int = 500
    """Step at which the discriminator and the generator loss switch on."""
    ce_prologue_weight: float = 3.0
    """Weight of the joint prior's CE on prologue and EOS positions (prologue variant)."""
    ce_visual_weight: float = 3.0
    """Weight of the joint prior's CE on visual positions (prologue variant)."""
    prologue_entropy_weight: float = 0.0
    """Weight of the prologue codebook entropy loss (confident per image, spread over the batch);
    0 is the paper's recipe."""
    restart_dead_codes_every: int = 0
    """Re-seed codebook entries unused for this many steps from recent encoder outputs (0: off, as in
    the paper; see modeling/codebook_restart.py)."""
    processes: int = 1
    """Data-parallel processes (one per GPU; CPU processes with gloo where there is none)."""
    loader_workers: int = field(default=1, metadata=NOT_IN_KEY)
    """DataLoader worker processes per training process."""
    shuffle_buffer: int = 2000
    """Sample shuffle buffer of the streaming reader."""
    checkpoint_every: int = field(default=500, metadata=NOT_IN_KEY)
    """Save a resumable checkpoint to the store every N steps (and at the end)."""
    log_every: int = field(default=25, metadata=NOT_IN_KEY)
    """Record the loss terms every N steps."""
    eval_images: int = 2000
    """Validation images used for PSNR and codebook usage (0: the whole split)."""
    seed: int = 0
    """Seed of initialisation, data order and dropout."""

    def validate(self) -> None:
        for name in ("steps", "batch_size", "processes", "checkpoint_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0 or self.aux_lr <= 0:
            raise ConfigError("lr: learning rates must be > 0")
        if not 0 <= self.ema_decay < 1:
            raise ConfigError(f"ema_decay: must be in [0, 1), got {self.ema_decay}")
        if self.perceptual_net not in NETWORKS:
            raise ConfigError(f"perceptual_net: {self.perceptual_net!r} is not one of {', '.join(NETWORKS)}")
        if self.perceptual_weight > 0 and not self.perceptual_weights:
            raise ConfigError(
                f"perceptual_weights: a local {self.perceptual_net} weights file is needed when perceptual_weight > 0"
            )


# parameters of the prologue path: the only ones Prologue-Post trains on top of a frozen 2D tokenizer
PROLOGUE_PATH = ("prologue_encoder.", "prologue_quantizer.")


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, C, H, W] -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1)


class TokenizerTrainer:
    def __init__(
        self,
        model_cfg: TokenizerConfig,
        cfg: TokenizerTrainConfig,
        device: torch.device,
        rank: int = 0,
        distributed: bool = False,
        base: dict[str, torch.Tensor] | None = None,
    ):
        """base: the trained 2D tokenizer's weights, required for (and only for) post_hoc configs:
        loaded and frozen, so that only the prologue path trains."""
        torch.manual_seed(cfg.seed)  # same initial weights on every rank
        self.cfg, self.model_cfg, self.device = cfg, model_cfg, device
        # shared modules first (the discriminator, then the tokenizer, whose prologue parts come last),
        # the prior after them: initial weights of what both arms have do not depend on the variant
        self.disc = PatchDiscriminator(model_cfg.channels).to(device)
        self.tokenizer = Tokenizer(model_cfg).to(device)
        if model_cfg.post_hoc != (base is not None):
            raise ValueError("post_hoc training needs the 2D tokenizer's weights (base), and only it takes them")
        if base is not None:
            missing, unexpected = self.tokenizer.load_state_dict(base, strict=False)
            new = {k for k in missing if k.startswith(PROLOGUE_PATH)}
            if unexpected or set(missing) != new:
                raise ValueError(f"base weights do not fit: missing {sorted(set(missing) - new)}, extra {unexpected}")
            for name, p in self.tokenizer.named_parameters():
                p.requires_grad_(name.startswith(PROLOGUE_PATH))
        self.prior = JointPrior(model_cfg).to(device) if model_cfg.z_len > 0 else None
        self.perceptual = None
        if cfg.perceptual_weight > 0:
            self.perceptual = perceptual_loss(cfg.perceptual_net, cfg.perceptual_weights).to(device)
        self.ema = AveragedModel(self.tokenizer, multi_avg_fn=ema_with_warmup(cfg.ema_decay), use_buffers=True)
        wrap = (lambda m: DDP(m)) if distributed else (lambda m: m)
        self.tokenizer_dp = wrap(self.tokenizer)
        self.prior_dp = wrap(self.prior) if self.prior is not None else None
        self.disc_dp = wrap(self.disc)
        adamw = dict(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
        trainable = [p for p in self.tokenizer.parameters() if p.requires_grad]
        schedule = lr_lambda(cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
        # the discriminator trains from gan_start for the remaining steps, with its own warm-up
        disc_schedule = lr_lambda(cfg.warmup_steps, max(1, cfg.steps - cfg.gan_start), cfg.min_lr_ratio)
        self.opt = torch.optim.AdamW(trainable, lr=cfg.lr, **adamw)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, schedule)
        self.opt_disc = torch.optim.AdamW(self.disc.parameters(), lr=cfg.aux_lr, **adamw)
        self.sched_disc = torch.optim.lr_scheduler.LambdaLR(self.opt_disc, disc_schedule)
        self.opt_prior = self.sched_prior = None
        if self.prior is not None:
            self.opt_prior = torch.optim.AdamW(self.prior.parameters(), lr=cfg.aux_lr, **adamw)
            self.sched_prior = torch.optim.lr_scheduler.LambdaLR(self.opt_prior, schedule)
        self.restarters = {}
        if cfg.restart_dead_codes_every and not model_cfg.post_hoc:
            self.restarters["visual"] = DeadCodeRestarter(self.tokenizer.visual_quantizer, cfg.restart_dead_codes_every)
        self.restart_rng = torch.Generator().manual_seed(cfg.seed)
        self.step = 0
        torch.manual_seed(cfg.seed * 1009 + 1 + rank)  # then rank-specific dropout draws

    # -- one batch -----------------------------------------------------------------------------
    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        """One batch: images uint8 [B, C, H, W], labels [B] (read by a class-conditional prior only)."""
        cfg = self.cfg
        if labels is not None and self.model_cfg.prior_classes:
            labels = labels.to(self.device)
        else:
            labels = None
        x = to_unit(images.to(self.device, non_blocking=True))
        post = self.model_cfg.post_hoc  # the visual path is frozen: the prior's CE is the whole loss
        gan_on = self.step >= cfg.gan_start and not post
        stats: dict[str, float] = {}

        # step 1: encoder + decoder; prior and discriminator frozen (used unwrapped, no DDP sync)
        frozen = [p for m in (self.prior, self.disc) if m is not None for p in m.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        recon, enc = self.tokenizer_dp(x)
        l1 = (recon - x).abs().mean()
        l2 = F.mse_loss(recon, x)
        loss = torch.zeros((), device=x.device) if post else l1 + cfg.l2_weight * l2 + enc.visual.loss
        stats.update(
            l1=l1.item(),
            l2=l2.item(),
            vq=enc.visual.loss.item(),
            visual_usage=float(enc.visual.usage),
            visual_perplexity=float(enc.visual.perplexity),
        )
        if self.perceptual is not None and not post:
            perc = self.perceptual(recon, x)
            loss = loss + cfg.perceptual_weight * perc
            stats["perceptual"] = perc.item()
        if gan_on:
            gen = g_loss(self.disc(recon))
            loss = loss + cfg.gan_weight * gen
            stats["gan_g"] = gen.item()
        if self.prior is not None:
            ce = self.prior(enc.prologue.onehot, enc.visual.codes, class_ids=labels)
            loss = loss + self._sequence_ce(ce, cfg.ce_prologue_weight, cfg.ce_visual_weight)
            if cfg.prologue_entropy_weight:
                loss = loss + cfg.prologue_entropy_weight * enc.prologue.entropy_loss
                stats["prologue_entropy_loss"] = enc.prologue.entropy_loss.item()
            stats.update(
                ce_prologue=ce["ce_prologue"].item(),
                ce_visual=ce["ce_visual"].item(),
                prologue_usage=float(enc.prologue.usage),
                prologue_perplexity=float(enc.prologue.perplexity),
            )
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        stats["grad_norm"] = self._clip(p for g in self.opt.param_groups for p in g["params"])
        self.opt.step()
        self.sched.step()
        self.ema.update_parameters(self.tokenizer)
        for p in frozen:
            p.requires_grad_(True)

        # step 2: joint prior on detached codes, discriminator on detached reconstructions (each its own step)
        if self.prior_dp is not None:
            ce = self.prior_dp(enc.prologue.onehot.detach(), enc.visual.codes.detach(), class_ids=labels)
            self._aux_step(self._sequence_ce(ce, 1.0, 1.0), self.opt_prior, self.sched_prior)
            stats.update(prior_ce_prologue=ce["ce_prologue"].item(), prior_ce_visual=ce["ce_visual"].item())
        if gan_on:
            d = d_hinge_loss(self.disc_dp(x), self.disc_dp(recon.detach()))
            stats["disc_lr"] = self._aux_step(d, self.opt_disc, self.sched_disc)
            stats["gan_d"] = d.item()

        self.step += 1
        for name, restarter in self.restarters.items():
            q = enc.visual if name == "visual" else enc.prologue
            restarter.observe(q.codes, q.projected)
            restarted = restarter.maybe_restart(self.step, self.restart_rng)
            if restarted:
                stats[f"{name}_codes_restarted"] = float(restarted)
        stats.update(loss=loss.item(), lr=self.sched.get_last_lr()[0])
        return stats

    def _sequence_ce(self, ce: dict[str, torch.Tensor], w_prologue: float, w_visual: float) -> torch.Tensor:
        """Weighted CE per token of the whole sequence: each segment counts by its number of tokens.

        Averaging each segment on its own would price one nat of prologue information N / (Z + 1)
        times higher than the nat of visual CE it saves, and the prologue collapses to one code.
        """
        n_prologue, n_visual = self.model_cfg.z_len + 1, self.model_cfg.num_patches
        total = n_prologue + n_visual
        return (w_prologue * n_prologue * ce["ce_prologue"] + w_visual * n_visual * ce["ce_visual"]) / total

    def _aux_step(self, loss: torch.Tensor, opt: torch.optim.Optimizer, sched) -> float:
        """One optimiser step of an auxiliary module; returns the learning rate it stepped with."""
        lr = opt.param_groups[0]["lr"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        self._clip(p for g in opt.param_groups for p in g["params"])
        opt.step()
        sched.step()
        return lr

    def _clip(self, params) -> float:
        params = [p for p in params if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.grad_clip > 0:
            return float(torch.nn.utils.clip_grad_norm_(params, self.cfg.grad_clip))
        return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))

    # -- checkpoints ---------------------------------------------------------------------------
    def tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """Weights per file: tokenizer, ema (the evaluated/exported one), prior, discriminator."""
        out = {
            "tokenizer": self.tokenizer.state_dict(),
            "ema": self.ema.module.state_dict(),
            "discriminator": self.disc.state_dict(),
        }
        if self.prior is not None:
            out["prior"] = self.prior.state_dict()
        return {name: {k: v.detach().cpu().contiguous() for k, v in sd.items()} for name, sd in out.items()}

    def training_state(self) -> dict:
        return {
            "step": self.step,
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "opt_disc": self.opt_disc.state_dict(),
            "sched_disc": self.sched_disc.state_dict(),
            **({"opt_prior": self.opt_prior.state_dict(), "sched_prior": self.sched_prior.state_dict()}
               if self.prior is not None else {}),
            "ema_n_averaged": self.ema.n_averaged.cpu(),
            "restart": {"rng": self.restart_rng.get_state(), **{k: r.counts for k, r in self.restarters.items()}},
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()},
        }

    def load(self, tensors: dict[str, dict[str, torch.Tensor]], state: dict) -> None:
        self.tokenizer.load_state_dict(tensors["tokenizer"])
        self.ema.module.load_state_dict(tensors["ema"])
        self.disc.load_state_dict(tensors["discriminator"])
        if self.prior is not None:
            self.prior.load_state_dict(tensors["prior"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        self.opt_disc.load_state_dict(state["opt_disc"])
        self.sched_disc.load_state_dict(state["sched_disc"])
        if self.prior is not None:
            self.opt_prior.load_state_dict(state["opt_prior"])
            self.sched_prior.load_state_dict(state["sched_prior"])
        self.ema.n_averaged.copy_(state["ema_n_averaged"])
        self.restart_rng.set_state(state["restart"]["rng"])
        for name, restarter in self.restarters.items():
            restarter.counts.copy_(state["restart"][name])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        self.step = state["step"]
