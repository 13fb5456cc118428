"""Resumable checkpoints in the store: safetensors weights plus a torch file of training state.

`checkpoints/step-NNNNNNN/<name>.safetensors` and `state.pt`, recorded as part `ckpt-NNNNNNN`
after every file is uploaded, so a checkpoint interrupted mid-upload is never picked for resume.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load_file

from pipelines.store import Artifact

PREFIX = "ckpt-"


def save_checkpoint(artifact: Artifact, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict[str, Any]) -> str:
    """Upload one checkpoint and record it; returns its folder (relative to the artefact)."""
    folder = f"checkpoints/step-{step:07d}"
    files = {
        f"{folder}/{name}.safetensors": artifact.put_safetensors(f"{folder}/{name}.safetensors", sd).__dict__
        for name, sd in tensors.items()
    }
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, "state.pt")
        torch.save(state, local)
        files[f"{folder}/state.pt"] = artifact.put_file(local, f"{folder}/state.pt").__dict__
    artifact.record_part(f"{PREFIX}{step:07d}", {"step": step, "folder": folder, "files": files})
    return folder


def latest_checkpoint(artifact: Artifact) -> dict[str, Any] | None:
    """The part record of the newest intact checkpoint, or None."""
    ckpts = [p for name, p in artifact.parts().items() if name.startswith(PREFIX)]
    return max(ckpts, key=lambda p: p["step"]) if ckpts else None


def load_tensors(artifact: Artifact, rel: str) -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(rel))
        artifact.fs.get_file(artifact.file_path(rel), local)
        return load_file(local)


def load_checkpoint(artifact: Artifact, record: dict[str, Any]) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """(weights per name, training state) of a checkpoint record from `latest_checkpoint`."""
    tensors, state = {}, None
    for rel in record["files"]:
        name = os.path.basename(rel)
        if name.endswith(".safetensors"):
            tensors[name[: -len(".safetensors")]] = load_tensors(artifact, rel)
        elif name == "state.pt":
            with artifact.fs.open(artifact.file_path(rel), "rb") as f:
                state = torch.load(f, weights_only=False)  # our own file: optimiser state + RNG tuples
    if state is None:
        raise FileNotFoundError(f"{artifact.uri}: checkpoint {record['folder']} has no state.pt")
    return tensors, state
