"""Mechanism metrics and the domain evaluator: unit checks, and the figures of the trained tiny store."""

from __future__ import annotations

import pytest
import torch

from modeling.mechanism import PROLOGUE_CONDITIONS, agreement, perturbed_prologues, same_class_pair_rate
from pipelines.store import Store
from tests.conftest import tiny_plan


def test_perturbed_prologues_keep_class_or_nothing_as_named():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(4).repeat_interleave(25)  # [100]: 4 classes
    prologue = torch.randint(0, 16, (100, 3), generator=g)
    prologue[:, 0] = labels  # the first code names the class
    assert torch.equal(perturbed_prologues(prologue, labels, "true"), prologue)
    within = perturbed_prologues(prologue, labels, "shuffled_within_class", seed=1)
    assert torch.equal(within[:, 0], labels) and not torch.equal(within, prologue)
    assert sorted(map(tuple, within.tolist())) == sorted(map(tuple, prologue.tolist()))  # a permutation
    across = perturbed_prologues(prologue, labels, "shuffled_across_images", seed=1)
    assert (across[:, 0] != labels).float().mean() > 0.5
    constant = perturbed_prologues(prologue, labels, "constant")
    assert (constant == constant[0]).all() and any(torch.equal(constant[0], p) for p in prologue)
    with pytest.raises(ValueError, match="condition"):
        perturbed_prologues(prologue, labels, "reversed")


def test_same_class_pair_rate_is_exact():
    conditioned = torch.tensor([0, 0, 0, 1, 1, 1])
    predicted = torch.tensor([5, 5, 6, 7, 7, 7])
    # class 0: pairs among 3 -> 6 ordered pairs, 2 agree (the two 5s); class 1: all agree
    assert same_class_pair_rate(predicted, conditioned) == pytest.approx((2 / 6 + 1.0) / 2)
    assert agreement(torch.tensor([1, 2, 3]), torch.tensor([1, 0, 3])) == pytest.approx(2 / 3)


def test_the_trained_tiny_prologue_is_read_by_its_models(tiny_graph):
    """On the tiny store, the AR and the joint prior predict the visual tokens worse with another
    image's prologue than with the image's own."""
    plan = tiny_plan(Store(str(tiny_graph.root)))
    m = plan.mechanism("prologue").require().metrics
    assert set(m["ar_visual_ce"]) == set(PROLOGUE_CONDITIONS) == set(m["prior_visual_ce"])
    for model in ("ar_visual_ce", "prior_visual_ce"):
        ce = m[model]
        assert ce["shuffled_across_images"] > ce["true"] and ce["constant"] > ce["true"], (model, ce)
    assert 0 <= m["resample_keep_rate"] <= 1 and m["resampled"] == 10 * 10 * 4 and m["ce_rows"] == 128
    base = plan.mechanism("baseline").require().metrics
    assert "ar_visual_ce" not in base and 0 < base["same_class_pair_rate"] <= 1 and base["pair_samples"] == 120


def test_domain_features_give_zero_distance_to_themselves_and_stored_ceilings(tiny_graph):
    from modeling.fidelity import fd_from_features
    from pipelines.domain import features_stats, load_set

    plan = tiny_plan(Store(str(tiny_graph.root)))
    domain = plan.domain()
    m = domain.require().metrics
    features, predicted, labels = load_set(domain.artifact, "val")
    assert features.shape == (128, 32) and len(predicted) == len(labels) == 128
    assert fd_from_features(features.double().numpy(), *features_stats(features)) == pytest.approx(0, abs=1e-6)
    ref = load_set(domain.artifact, "reference")[0]
    assert m["reference_images"] == len(ref) == 128 and m["ceiling"]["images"] == 120  # N = 12 per class x 10
    assert m["val_top1"] == pytest.approx(float((predicted == labels).float().mean()))
    recon = plan.reconstruction("prologue").require().metrics["domain"]
    assert recon["images"] == 120 and recon["fd_domain"] >= 0 and 0 <= recon["class_consistency"] <= 1
