"""Perceptual losses for tokenizer training, each on a frozen pretrained network read from a local
weights file (nothing is downloaded).

- `VGGFeatureLoss` (`vgg16`): distance between unit-normalised VGG16 relu activations. Not LPIPS:
  there are no learned per-channel weights.
- `ConvNeXtLogitLoss` (`convnext_s_logits`): mean squared difference of ConvNeXt-S ImageNet logits,
  the perceptual loss of the paper's Prologue-L.

Inputs are images in [-1, 1], [B, 3, H, W]; gradient flows to the inputs, never to the network.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn

# Indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in torchvision's vgg16().features.
VGG_RELUS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NETWORKS = ("vgg16", "convnext_s_logits")


def _state(weights_path: str, what: str) -> dict[str, Tensor]:
    path = Path(weights_path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{what} weights for the perceptual loss not found at {weights_path!r}; point "
            "tokenizer_train.perceptual_weights at a local torchvision state dict, or turn the perceptual "
            "loss off (nothing is downloaded)"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


class _Frozen(nn.Module):
    """A frozen network behind ImageNet normalisation: always in eval mode, no trainable parameters."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> _Frozen:
        super().train(mode)
        self.net.eval()
        return self

    def normalise(self, images: Tensor) -> Tensor:
        return ((images + 1) / 2 - self.mean) / self.std  # [-1, 1] -> ImageNet normalisation


class VGGFeatureLoss(_Frozen):
    """`weights_path`: a torchvision VGG16 state dict (the full model's, or only its `features.*`
    entries). H, W >= 16. Returns a scalar (mean over the batch)."""

    def __init__(self, weights_path: str):
        state = _state(weights_path, "VGG16")
        features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
        vgg = torchvision.models.vgg16(weights=None).features[: VGG_RELUS[-1] + 1]
        vgg.load_state_dict(features)  # strict: a file that is not a VGG16 state dict fails here
        super().__init__(vgg)

    def _features(self, images: Tensor) -> list[Tensor]:
        x, feats = self.normalise(images), []
        for i, layer in enumerate(self.net):
            x = layer(x)
            if i in VGG_RELUS:
                feats.append(F.normalize(x, dim=1, eps=1e-10))  # unit length along channels at each pixel
        return feats

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        total = images.new_zeros(())
        for a, b in zip(self._features(images), self._features(targets), strict=True):
            total = total + (a - b).pow(2).sum(1).mean()  # squared distance per pixel, mean over B, H, W
        return total


class ConvNeXtLogitLoss(_Frozen):
    """`weights_path`: a torchvision convnext_small state dict (1000 ImageNet classes). H, W >= 32.
    Returns the mean over batch and classes of the squared logit difference."""

    def __init__(self, weights_path: str):
        state = _state(weights_path, "ConvNeXt-S")
        net = torchvision.models.convnext_small(weights=None)
        net.load_state_dict(state)  # strict: a file that is not a ConvNeXt-S state dict fails here
        super().__init__(net)

    def forward(self, images: Tensor, targets: Tensor) -> Tensor:
        logits = self.net(self.normalise(torch.cat([images, targets])))  # [2B, 1000]
        return F.mse_loss(*logits.chunk(2))


def perceptual_loss(network: str, weights_path: str) -> nn.Module:
    """The perceptual loss of `network` (one of NETWORKS) on a local weights file."""
    return {"vgg16": VGGFeatureLoss, "convnext_s_logits": ConvNeXtLogitLoss}[network](weights_path)
