"""Mechanism metrics: does the model read its prologue, and does the prologue carry the class?

1. Visual CE under perturbed prologues. A model that uses its prologue predicts the visual tokens
   worse when the prologue is not the image's own: shuffled among images of the same class (keeps
   the class, loses the image), shuffled across all images (loses both), or one constant prologue
   for every image (no information at all). Measured for the stage-3 AR (conditional) and for the
   stage-1 joint prior (unconditional, no visual dropout).
2. Fixed-prologue resampling: how often a resampled image (same prologue, new visual tokens) is
   classified like its original, against how often two independent samples of the same
   conditioning class are classified alike.

Shapes: N rows, Z prologue tokens, L visual tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

PROLOGUE_CONDITIONS = ("true", "shuffled_within_class", "shuffled_across_images", "constant")


def perturbed_prologues(prologue: Tensor, labels: Tensor, condition: str, seed: int = 0) -> Tensor:
    """prologue [N, Z] codes, labels [N] -> the prologue each row is given under `condition`."""
    g = torch.Generator().manual_seed(seed)
    if condition == "true":
        return prologue
    if condition == "shuffled_across_images":
        return prologue[torch.randperm(len(prologue), generator=g)]
    if condition == "shuffled_within_class":
        out = prologue.clone()
        for c in labels.unique():
            rows = (labels == c).nonzero().flatten()
            out[rows] = prologue[rows[torch.randperm(len(rows), generator=g)]]
        return out
    if condition == "constant":  # the most frequent whole prologue, for every row
        rows, counts = prologue.unique(dim=0, return_counts=True)
        return rows[counts.argmax()].expand_as(prologue).clone()
    raise ValueError(f"condition: {condition!r} is not one of {', '.join(PROLOGUE_CONDITIONS)}")


@torch.no_grad()
def ar_visual_ce(model, labels: Tensor, prologue: Tensor, visual: Tensor, batch: int = 500) -> float:
    """Mean CE per visual token of the stage-3 AR (eval mode, conditional) given these prologues."""
    total = 0.0
    for i in range(0, len(visual), batch):
        out = model(labels[i : i + batch], prologue[i : i + batch], visual[i : i + batch])
        total += float(out["ce_visual"]) * len(visual[i : i + batch])
    return total / len(visual)


@torch.no_grad()
def prior_visual_ce(prior, prologue: Tensor, visual: Tensor, batch: int = 500) -> float:
    """Mean CE per visual token of the joint prior (eval mode, visual inputs kept) given these prologues."""
    total = 0.0
    for i in range(0, len(visual), batch):
        onehot = F.one_hot(prologue[i : i + batch], prior.P).float()  # [B, Z, P]
        out = prior(onehot, visual[i : i + batch], visual_dropout=0.0)
        total += float(out["ce_visual"]) * len(visual[i : i + batch])
    return total / len(visual)


def agreement(a: Tensor, b: Tensor) -> float:
    """Share of pairs (a[i], b[i]) with the same predicted class."""
    assert a.shape == b.shape and len(a), (a.shape, b.shape)
    return float((a == b).float().mean())


def same_class_pair_rate(predicted: Tensor, conditioned: Tensor) -> float:
    """Probability that two distinct samples drawn at random from one conditioning class get the same
    predicted class, averaged over classes (exact: from the predicted-class counts of each class)."""
    rates = []
    for c in conditioned.unique():
        counts = torch.bincount(predicted[conditioned == c]).double()
        n = counts.sum()
        if n > 1:
            rates.append(float((counts * (counts - 1)).sum() / (n * (n - 1))))
    return sum(rates) / len(rates)
