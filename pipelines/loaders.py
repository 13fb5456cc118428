"""Load trained models from their store artefacts (for export, sampling and evaluation)."""

from __future__ import annotations

from typing import Any

import torch

from modeling.config import from_dict
from pipelines.manifests import read
from pipelines.store import Artifact


def _model_config(artifact: Artifact, what: str, cls: type) -> Any:
    """The model config a materialised artefact was trained with (its manifest's config.model)."""
    return from_dict(cls, read(artifact, what).config["model"])


def _loaded(model: torch.nn.Module, artifact: Artifact, rel: str, device: torch.device | str) -> torch.nn.Module:
    from safetensors.torch import load

    model.load_state_dict(load(artifact.read_bytes(rel)))
    return model.to(device).eval()


def load_tokenizer(artifact: Artifact, device: torch.device | str = "cpu"):
    """The trained tokenizer (EMA weights) of a materialised `tokenizer` artefact, in eval mode."""
    from modeling.tokenizer import Tokenizer, TokenizerConfig

    model = Tokenizer(_model_config(artifact, "tokenizer", TokenizerConfig))
    return _loaded(model, artifact, "model/tokenizer.safetensors", device)


def load_prior(artifact: Artifact, device: torch.device | str = "cpu"):
    """The stage-1 joint prior of a prologue `tokenizer` artefact, in eval mode."""
    from modeling.joint_prior import JointPrior
    from modeling.tokenizer import TokenizerConfig

    model = JointPrior(_model_config(artifact, "tokenizer", TokenizerConfig))
    return _loaded(model, artifact, "model/prior.safetensors", device)


def load_ar(artifact: Artifact, device: torch.device | str = "cpu", ema: bool = True):
    """The trained AR model (EMA weights by default) of a materialised `ar_model` artefact, in eval mode."""
    from modeling.ar_model import ARConfig, ARModel

    model = ARModel(_model_config(artifact, "AR model", ARConfig))
    return _loaded(model, artifact, "model/ar_ema.safetensors" if ema else "model/ar.safetensors", device)
