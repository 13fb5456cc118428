"""Load trained models from their store artefacts (for export, sampling and evaluation)."""

from __future__ import annotations

import torch

from modeling.config import from_dict
from pipelines.store import Artifact


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


def load_ar(artifact: Artifact, device: torch.device | str = "cpu", ema: bool = True):
    """The trained AR model (EMA weights by default) of a materialised `ar_model` artefact, in eval mode."""
    from safetensors.torch import load

    from modeling.ar_model import ARConfig, ARModel

    manifest = artifact.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{artifact.uri}: AR model not materialised (no manifest)")
    model = ARModel(from_dict(ARConfig, manifest["config"]["model"]))
    model.load_state_dict(load(artifact.read_bytes("model/ar_ema.safetensors" if ema else "model/ar.safetensors")))
    return model.to(device).eval()


def load_prior(artifact: Artifact, device: torch.device | str = "cpu"):
    """The stage-1 joint prior of a prologue `tokenizer` artefact, in eval mode."""
    from safetensors.torch import load

    from modeling.joint_prior import JointPrior
    from modeling.tokenizer import TokenizerConfig

    manifest = artifact.manifest()
    if manifest is None:
        raise FileNotFoundError(f"{artifact.uri}: tokenizer not materialised (no manifest)")
    prior = JointPrior(from_dict(TokenizerConfig, manifest["config"]["model"]))
    prior.load_state_dict(load(artifact.read_bytes("model/prior.safetensors")))
    return prior.to(device).eval()
