"""Domain classifier: a small CNN trained on the embedded data set, used as the evaluator of generated images.

Its penultimate features give a Fréchet distance in the domain's own feature space (an ImageNet Inception says
little about 32x32 grey clothes), and its predictions give class consistency: the share of class-conditional
samples it assigns to their conditioning class.

The model is a function of its config: weights are drawn from `cfg.seed`, and training draws its augmentation
from `cfg.seed`, so the same config and the same batches give the same classifier. The defaults are the cheapest
setting measured to pass 90%: on Fashion-MNIST (32x32, 3 channels) 2 epochs over the 60,000 train images give
91.1% top-1 on the 10,000 test images, at ~38 s per epoch on 2 CPU cores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from modeling.config import Config, ConfigError
from modeling.optim import decay_groups, lr_lambda


@dataclass
class DomainClassifierConfig(Config):
    width: int = 16
    """Channels of the first conv stage; each of the three stages doubles them (w, 2w, 4w)."""
    feature_dim: int = 128
    """Width of the penultimate layer: the features the Fréchet distance is computed on."""
    epochs: int = 2
    """Passes over the training images."""
    batch_size: int = 64
    """Images per optimiser step."""
    lr: float = 2e-3
    """Peak AdamW learning rate (short warm-up, then cosine decay to zero over all steps)."""
    weight_decay: float = 5e-4
    """AdamW weight decay on conv and linear weights (not on norms and biases)."""
    seed: int = 0
    """Seed of the initial weights and of the augmentation draws."""

    def validate(self) -> None:
        for name in ("width", "feature_dim", "epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"lr: must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay: must be >= 0, got {self.weight_decay}")
        if self.seed < 0:
            raise ConfigError(f"seed: must be >= 0, got {self.seed}")


def _stage(cin: int, cout: int) -> nn.Sequential:
    """(conv3x3-BN-ReLU) x 2, then 2x2 max pool: [B, cin, H, W] -> [B, cout, H / 2, W / 2]."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),  # BN's shift replaces the bias
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2),
    )


class DomainClassifier(nn.Module):
    """uint8 images [B, C, S, S] -> three stages (widths w, 2w, 4w; S -> S / 8) -> global average pool [B, 4w]
    -> Linear + ReLU (the features, [B, feature_dim]) -> Linear (logits, [B, num_classes])."""

    def __init__(self, cfg: DomainClassifierConfig, channels: int, image_size: int, num_classes: int):
        super().__init__()
        assert channels >= 1 and num_classes >= 2, (channels, num_classes)
        assert image_size >= 16 and image_size % 8 == 0, f"image_size must be a multiple of 8, >= 16: {image_size}"
        w = cfg.width
        with torch.random.fork_rng(devices=[]):  # initial weights from cfg.seed, global RNG untouched
            torch.manual_seed(cfg.seed)
            self.body = nn.Sequential(_stage(channels, w), _stage(w, 2 * w), _stage(2 * w, 4 * w))
            self.embed = nn.Linear(4 * w, cfg.feature_dim)
            self.head = nn.Linear(cfg.feature_dim, num_classes)

    def features(self, images: Tensor) -> Tensor:
        """uint8 [B, C, S, S] -> penultimate features float [B, feature_dim] (non-negative: after the ReLU)."""
        assert images.dtype == torch.uint8 and images.ndim == 4, (images.dtype, images.shape)
        x = (images.float() / 127.5 - 1).contiguous(memory_format=torch.channels_last)  # [-1, 1]; NHWC: faster convs
        x = self.body(x).mean((2, 3))  # [B, 4w, S / 8, S / 8] -> [B, 4w]
        return F.relu(self.embed(x))

    def forward(self, images: Tensor) -> Tensor:
        """uint8 [B, C, S, S] -> logits [B, num_classes]."""
        return self.head(self.features(images))


def augment(images: Tensor, g: torch.Generator) -> Tensor:
    """Random horizontal flip of images [B, C, H, W], drawn from the CPU generator `g`. A mirrored garment is still
    the same garment; 2 px random shifts were tried and cost accuracy at this short a training."""
    flip = (torch.rand(len(images), generator=g) < 0.5).to(images.device)
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def train_classifier(
    model: DomainClassifier,
    batches: Callable[[int], Iterable[tuple[Tensor, Tensor]]],
    cfg: DomainClassifierConfig,
    total_steps: int,
    on_log: Callable[[str], None] = print,
) -> dict:
    """Train `model` for cfg.epochs passes; `batches(epoch)` yields (uint8 images [B, C, H, W], int64 labels [B])
    in that epoch's order (the caller shuffles by epoch). `total_steps` (batches over all epochs) sets the length
    of the LR schedule and must match what `batches` yields. Logs at least every 30 s of work. Returns the steps,
    train_loss (mean over the last epoch's steps: fixed steps, so it does not depend on the machine's speed, as
    the time-spaced log lines do) and seconds; leaves the model in eval mode."""
    assert total_steps >= 1, total_steps
    device = next(model.parameters()).device
    opt = torch.optim.AdamW(decay_groups(model, cfg.weight_decay), lr=cfg.lr)
    warmup = max(1, total_steps // 50)  # 2%: Adam's moment estimates settle before the peak LR
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, 0.0))
    g = torch.Generator().manual_seed(cfg.seed)
    model.train()
    start = last_log = time.monotonic()
    step, loss_sum, loss_n, epoch_losses = 0, 0.0, 0, []
    for epoch in range(cfg.epochs):
        epoch_losses = []
        for images, labels in batches(epoch):
            if step == total_steps:
                raise ValueError(f"batches yield more than total_steps={total_steps} batches")
            x, y = augment(images.to(device), g), labels.to(device)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            epoch_losses.append(loss.item())
            loss_sum, loss_n = loss_sum + epoch_losses[-1], loss_n + 1
            if time.monotonic() - last_log >= 30 or step == total_steps:
                last_log = time.monotonic()
                on_log(
                    f"classifier epoch {epoch + 1}/{cfg.epochs} step {step}/{total_steps} "
                    f"loss {loss_sum / loss_n:.4f} lr {sched.get_last_lr()[0]:.2e} {last_log - start:.0f}s"
                )
                loss_sum, loss_n = 0.0, 0
    if step != total_steps:
        raise ValueError(f"batches yielded {step} batches, not total_steps={total_steps}")
    model.eval()
    train_loss = sum(epoch_losses) / len(epoch_losses) if epoch_losses else float("nan")
    return {"steps": step, "train_loss": train_loss, "seconds": time.monotonic() - start}


@torch.no_grad()
def embed(model: DomainClassifier, batches: Iterable[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor, Tensor]:
    """-> (features float32 [N, feature_dim], predicted class int64 [N], labels int64 [N]) over all batches of
    (uint8 images [B, C, H, W], labels [B]), in eval mode (BN running statistics), on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    feats, preds, ys = [], [], []
    for images, labels in batches:
        f = model.features(images.to(device))  # [B, feature_dim]
        feats.append(f.float().cpu())
        preds.append(model.head(f).argmax(1).cpu())
        ys.append(labels.long().cpu())
    return torch.cat(feats), torch.cat(preds), torch.cat(ys)


def class_consistency(predicted: Tensor, labels: Tensor) -> float:
    """Share of samples whose predicted class is their label (top-1 accuracy on real images)."""
    assert predicted.shape == labels.shape and predicted.ndim == 1 and len(labels), (predicted.shape, labels.shape)
    return float((predicted == labels.to(predicted.device)).float().mean())
