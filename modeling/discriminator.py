"""Adversarial and perceptual losses for tokenizer training.

- `PatchDiscriminator`: a PatchGAN-style conv net returning a map of real/fake logits. It uses
  GroupNorm (not BatchNorm) so that it behaves the same with batch 1 and under DDP.
- `d_hinge_loss` / `g_loss`: hinge GAN losses.
- `PerceptualLoss`: a *VGG feature loss* (distance between unit-normalised VGG16 activations), not
  LPIPS: there are no learned per-channel weights. It needs a local VGG16 weights file and never
  downloads anything.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn


class PatchDiscriminator(nn.Module):
    """`layers` stride-2 4x4 convs (channels doubling from `base`, at most 8x), then a 3x3 conv to one
    channel: images [B, C, H, W] -> logits [B, 1, H / 2^layers, W / 2^layers]."""

    def __init__(self, channels: int = 3, base: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(channels, base, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        ch = base
        for i in range(1, layers):
            out = base * min(2**i, 8)
            mods += [
                nn.Conv2d(ch, out, 4, stride=2, padding=1, bias=False),  # the norm's shift replaces the bias
                nn.GroupNorm(math.gcd(32, out), out),
                nn.LeakyReLU(0.2),
            ]
            ch = out
        mods.append(nn.Conv2d(ch, 1, 3, padding=1))
        self.net = nn.Sequential(*mods)

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images)


def d_hinge_loss(real_logits: Tensor, fake_logits: Tensor) -> Tensor:
    """Discriminator hinge loss: mean of relu(1 - real) and relu(1 + fake), averaged over the two."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def g_loss(fake_logits: Tensor) -> Tensor:
    """Generator (hinge) loss: push the discriminator's logits on reconstructions up."""
    return -fake_logits.mean()


# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features.
VGG_RELUS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class PerceptualLoss(nn.Module):
    """VGG feature loss: mean squared difference of channel-normalised VGG16 relu activations.

    `weights_path` is a local torchvision VGG16 state dict (the full model's, or only its
    `features.*` entries). Inputs are images in [-1, 1], [B, 3, H, W] with H, W >= 16. The VGG
    weights are frozen; gradient flows to the inputs. Returns a scalar (mean over the batch).
    """

    def __init__(self, weights_path: str):
        super().__init__()
        path = Path(weights_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"VGG16 weights for the perceptual (VGG feature) loss not found at {weights_path!r}; "
                "point the perceptual-loss weights path at a local torchvision vgg16 state dict, "
                "or turn the perceptual loss off (nothing is downloaded)"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        vgg = torchvision.models.vgg16(weights=None).features[: VGG_RELUS[-1] + 1]
        vgg.load_state_dict(features)  # strict: a file that is not a VGG16 state dict fails here
        self.vgg = vgg.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> PerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # frozen feature extractor: always in eval mode
        return self

    def _features(self, images: Tensor) -> list[Tensor]:
        x = ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation
        feats = []
        for i, layer in enumerate(self.vgg):
            x = layer(x)
            if i in VGG_RELUS:
                feats.append(F.normalize(x, dim=1, eps=1e-10))  # unit length along channels at each pixel
        return feats

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        total = images.new_zeros(())
        for a, b in zip(self._features(images), self._features(targets), strict=True):
            total = total + (a - b).pow(2).sum(1).mean()  # squared distance per pixel, mean over B, H, W
        return total
