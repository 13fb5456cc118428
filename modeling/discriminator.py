"""Adversarial losses for tokenizer training.

- `PatchDiscriminator`: a PatchGAN-style conv net returning a map of real/fake logits. It uses
  GroupNorm (not BatchNorm) so that it behaves the same with batch 1 and under DDP.
- `d_hinge_loss` / `g_loss`: hinge GAN losses.
"""

from __future__ import annotations

import math

import torch.nn.functional as F
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
