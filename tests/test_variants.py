"""Variant names: parsing, what each suffix changes, and which artefacts variants share."""

from __future__ import annotations

import json
import math

import pytest

from modeling.config import ConfigError
from pipelines.profiles import load_profile
from pipelines.store import Store
from pipelines.variants import parse_variant
from tests.conftest import tiny_plan


def test_names_parse_into_what_they_change():
    v = parse_variant("prologue_z8_s1_ent0p1_tok3x_ar4x")
    assert (v.arm, v.z_len, v.seed, v.entropy_weight, v.tokenizer_budget, v.ar_budget) == ("prologue", 8, 1, 0.1, 3, 4)
    assert v.tokenizer_variant == "prologue_z8_s1_ent0p1_tok3x" and v.seed_group == "prologue_z8_ent0p1_tok3x_ar4x"
    plain = parse_variant("prologue")
    assert (plain.z_len, plain.seed, plain.entropy_weight, plain.tokenizer_budget, plain.ar_budget) == (
        None,
        None,
        None,
        1,
        1,
    )
    assert parse_variant("prologue_post_s1_tok3x").base_variant == "baseline_s1_tok3x"
    assert (
        parse_variant("prologue_post_ar4x").base_variant == "baseline"
        and parse_variant("prologue").base_variant is None
    )
    assert parse_variant("prologue_ent0").entropy_weight == 0.0


@pytest.mark.parametrize("name, message", [
    ("baseline_z4", "no prologue tokens"),
    ("baseline_ent0", "no prologue tokens"),
    ("prologue_onestage_ar4x", "no stage-3 AR model"),
    ("prologue_ar4x_s1", "is not <arm>"),  # suffixes in their order only
    ("prologue_z0", "is not <arm>"),
    ("prologue_tok0x", "is not <arm>"),
    ("onestage", "is not <arm>"),
])  # fmt: skip
def test_bad_names_say_what_names_look_like(name, message):
    with pytest.raises(ConfigError, match=message):
        parse_variant(name)


def test_each_suffix_changes_only_its_setting():
    names = ["baseline", "prologue", "baseline_s1", "prologue_ent0", "prologue_tok3x", "baseline_ar4x"]
    p = load_profile("fashion32", {"variants": names})
    assert p.tokenizer_train_for("prologue") == p.tokenizer_train and p.ar_train_for("prologue") == p.ar_train
    seeded = p.tokenizer_train_for("baseline_s1")
    assert seeded.seed == 1 and seeded.steps == p.tokenizer_train.steps and p.ar_train_for("baseline_s1").seed == 1
    assert p.tokenizer_train_for("prologue_ent0").prologue_entropy_weight == 0.0
    assert p.tokenizer_train.prologue_entropy_weight == 0.5
    longer = p.tokenizer_train_for("prologue_tok3x")
    assert (longer.steps, longer.gan_start, longer.warmup_steps) == (4500, 2250, p.tokenizer_train.warmup_steps)
    assert p.ar_train_for("prologue_tok3x") == p.ar_train
    assert p.ar_train_for("baseline_ar4x").steps == 3200 and p.tokenizer_train_for("baseline_ar4x") == p.tokenizer_train
    assert p.tokenizer_for("baseline_ar4x") == p.tokenizer_for("baseline")


def test_a_post_arm_needs_its_2d_tokenizer_listed():
    with pytest.raises(ConfigError, match="variants: prologue_post_s1 trains on the 2D tokenizer of baseline_s1"):
        load_profile("tiny", {"variants": ["baseline", "prologue_post_s1"]})
    with pytest.raises(ConfigError, match="list baseline before it"):
        load_profile("tiny", {"variants": ["prologue_post", "baseline"]})


def test_an_ar_budget_arm_reuses_its_tokenizer_and_tokens_and_trains_its_own_ar(tmp_path, fashion_mnist):
    variants = "variants=baseline,prologue_post,prologue_post_ar4x,baseline_s1"
    plan = tiny_plan(Store(str(tmp_path)), [variants])
    assert plan.tokenizer("prologue_post_ar4x").key == plan.tokenizer("prologue_post").key
    assert plan.tokens("prologue_post_ar4x").key == plan.tokens("prologue_post").key
    assert plan.ar("prologue_post_ar4x").key != plan.ar("prologue_post").key
    assert (
        plan.ar("prologue_post_ar4x").config["train"]["steps"] == 4 * plan.ar("prologue_post").config["train"]["steps"]
    )
    assert plan.tokenizer("baseline_s1").key != plan.tokenizer("baseline").key
    assert plan.deps("tokenizer", "prologue_post_ar4x") == plan.deps("tokenizer", "prologue_post")
    # the listed variants keep the keys they had before suffixes existed (pinned in golden_keys.json)
    plain = tiny_plan(Store(str(tmp_path)))
    assert plain.tokenizer("baseline").key == plan.tokenizer("baseline").key


def test_the_ablations_share_the_full_profiles_trained_arms(tmp_path, fashion_mnist):
    """fashion32-ablations trains and evaluates only what it adds: its 1x baseline, prologue and Post arms
    and their second seeds, the tokenizers of its AR-budget arms, the domain classifier and the shared arms'
    metrics are the artefacts of fashion32-full at fashion32's tokenizer budget (its keys before it moved to
    3x, so a store holding those rows keeps them)."""
    from pipelines.plan import Plan
    from pipelines.results import VARIANT_STEPS

    store = Store(str(tmp_path))
    ablations = Plan.from_listing(load_profile("fashion32-ablations"), store)
    full_1x = Plan.from_listing(load_profile("fashion32-full", ["tokenizer_train.steps=1500",
                                                                "tokenizer_train.gan_start=750"]), store)  # fmt: skip
    for v in ("baseline", "prologue", "prologue_post", "baseline_s1", "prologue_s1"):
        assert ablations.ar(v).key == full_1x.ar(v).key and ablations.tokenizer(v).key == full_1x.tokenizer(v).key
        # (a baseline's probe also reads its first Z visual tokens for each prologue length the profile has)
        for step in ("generation_metrics", "reconstruction_metrics") + (("linear_probe",) if "prologue" in v else ()):
            assert [t.key for t in ablations.targets(step, v)] == [t.key for t in full_1x.targets(step, v)], (step, v)
    assert ablations.targets("domain_classifier", None)[0].key == full_1x.targets("domain_classifier", None)[0].key
    assert ablations.tokens("baseline_ar4x").key == full_1x.tokens("baseline").key
    assert ablations.tokenizer("prologue_post_ar4x").inputs == full_1x.tokenizer("prologue_post").inputs
    # fashion32-full's own arms train as the ablations' `_tok3x` rows do (only the variant's name differs)
    full = Plan.from_listing(load_profile("fashion32-full"), store)
    for v in ("baseline", "prologue", "baseline_s1", "prologue_s1"):
        for step in ("tokenizer", "ar"):
            ours, theirs = getattr(full, step)(v), getattr(ablations, step)(f"{v}_tok3x")
            assert {**ours.config, "variant": None} == {**theirs.config, "variant": None}, (step, v)
    assert full.domain().key == ablations.domain().key
    # its session-sized parts are subsets of its rows, every artefact the same
    for name in ("fashion32-ar-budget", "fashion32-entropy"):
        part = Plan.from_listing(load_profile(name), store)
        assert set(part.profile.variants) < set(ablations.profile.variants)
        for v in part.profile.variants:
            for step in VARIANT_STEPS:
                assert [t.key for t in part.targets(step, v)] == [t.key for t in ablations.targets(step, v)], (name, v)


def test_the_1d_arm_trains_exports_and_feeds_the_ar(tiny_graph, tmp_path):
    """The 1D-tokenizer baseline goes through the same steps: its tokenizer learns, its token dataset
    holds N one-dimensional codes and no prologue, and the AR model trains on them."""
    from pipelines.token_export import export_tokens
    from pipelines.train_ar import train_ar
    from pipelines.train_tokenizer import train_tokenizer
    from tests.conftest import copy_store

    store = copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards",))
    plan = tiny_plan(store, ["variants=baseline,baseline_1d"])
    tok = train_tokenizer(plan, "baseline_1d", progress=False)
    assert tok.manifest.config["model"]["layout"] == "1d" and "prologue_codes" not in tok.manifest.metrics
    history = [json.loads(line) for line in tok.artifact.read_bytes("history.jsonl").decode().splitlines()]
    assert history[-1]["l1"] < 0.85 * history[0]["l1"]  # 30 tiny steps: it learns (its codebook barely)
    tokens = export_tokens(plan, "baseline_1d", progress=False)
    assert (tokens.manifest.codes.num_visual, tokens.manifest.codes.z_len) == (16, 0)
    ar = train_ar(plan, "baseline_1d", progress=False)
    assert ar.manifest.counts.steps == 40 and ar.manifest.metrics["val_ce_visual"] < 2 * math.log(64)


def test_the_onestage_arm_evaluates_its_joint_prior_as_the_ar_model(tiny_graph, tmp_path):
    """Prologue-OneStage: the tokenizer trains a class-conditional joint prior of the profile's AR size;
    its `ar_model` is that prior (no stage-3 steps), which the AR loader reads as an ARModel."""
    import torch
    import torch.nn.functional as F

    from pipelines.loaders import load_ar, load_prior
    from pipelines.token_export import export_tokens
    from pipelines.token_reader import token_loader
    from pipelines.train_ar import train_ar
    from pipelines.train_tokenizer import train_tokenizer
    from tests.conftest import copy_store

    store = copy_store(tiny_graph.root, Store(str(tmp_path)), ("image_shards",))
    plan = tiny_plan(store, ["variants=baseline,prologue_onestage"])
    assert plan.deps("ar_model", "prologue_onestage") == [("token_dataset", "prologue_onestage"),
                                                          ("tokenizer", "prologue_onestage")]  # fmt: skip
    tok = train_tokenizer(plan, "prologue_onestage", progress=False)
    model_cfg = tok.manifest.config["model"]
    assert (model_cfg["prior_width"], model_cfg["prior_depth"], model_cfg["prior_classes"]) == (64, 2, 10)
    export_tokens(plan, "prologue_onestage", progress=False)
    ar = train_ar(plan, "prologue_onestage", progress=False)
    assert ar.manifest.counts.steps == 0 and ar.manifest.metrics["val_sequences"] == 128
    model, prior = load_ar(ar.artifact), load_prior(tok.artifact)
    labels, prologue, visual = next(iter(token_loader(plan.tokens("prologue_onestage").artifact, 8, num_workers=0,
                                                      split="val", shuffle=False, epochs=1, rank=0,
                                                      world_size=1)))  # fmt: skip
    with torch.no_grad():
        expected = prior(F.one_hot(prologue, 16).float(), visual, visual_dropout=0.0, class_ids=labels)["logits"]
        assert torch.allclose(model(labels, prologue, visual)["logits"], expected, atol=1e-5)
    assert train_ar(plan, "prologue_onestage", progress=False).cached
