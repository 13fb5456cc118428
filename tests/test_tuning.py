"""The sampling search: the same budget for every variant, selection on the tuning reference."""

from __future__ import annotations

import pytest

from modeling.config import ConfigError
from pipelines.profiles import TuningConfig, load_profile
from pipelines.store import Store
from pipelines.tuning import guidance_grid, no_guidance_grid, sampler_label
from tests.conftest import tiny_plan


@pytest.mark.parametrize("name", ["tiny", "fashion32", "fashion32-full"])
def test_every_variant_gets_a_grid_of_the_same_size(name):
    profile = load_profile(name)
    tuning, base = profile.tuning, profile.sampler
    sizes = set()
    for v in profile.variants:
        has_prologue = profile.tokenizer_for(v).z_len > 0
        free = no_guidance_grid(tuning, base, has_prologue)
        guided = guidance_grid(tuning, free[0], has_prologue)
        assert all(c.cfg_schedule == "none" for c in free) and all(c.cfg_schedule == "split" for c in guided)
        assert len({(c.temperature_prologue, c.temperature_visual) for c in free}) == len(free)  # distinct points
        visual = [c.temperature_visual for c in free]
        assert min(visual) == min(tuning.temperatures) and max(visual) == max(tuning.temperatures)
        sizes.add((len(free), len(guided)))
    assert len(sizes) == 1  # one budget for every variant


def test_sampler_labels_name_only_the_knobs_a_variant_has():
    knobs = {"cfg_schedule": "split", "cfg_prologue": 1.5, "cfg_visual_max": 3.0, "cfg_power": 1.0,
             "temperature_prologue": 0.7, "temperature_visual": 0.9}  # fmt: skip
    assert sampler_label(knobs, prologue=True) == "T 0.7 / 0.9, prologue 1.5, s_max 3, p 1"
    assert sampler_label(knobs, prologue=False) == "T_visual 0.9, s_max 3, p 1"
    assert sampler_label(knobs | {"cfg_schedule": "none"}, prologue=False) == "T_visual 0.9"


def test_probe_lengths_follow_each_variant(tmp_path):
    from pipelines.plan import Plan

    full = load_profile("fashion32-full")
    plan = Plan(full, Store(str(tmp_path)), tiny_plan(Store(str(tmp_path))).listing)
    assert plan.probe_lengths("baseline") == [2, 4, 8]
    assert plan.probe_lengths("prologue_z2") == [2] and plan.probe_lengths("prologue_z8") == [8]


def test_tuning_config_keeps_the_guidance_grids_equal():
    with pytest.raises(ConfigError, match="cfg_power"):
        TuningConfig(cfg_prologue=[0.7, 0.8], cfg_power=[1.0])
    with pytest.raises(ConfigError, match="temperatures"):
        TuningConfig(temperatures=[])


def test_the_tiny_store_selected_from_its_grid_on_the_val_split(tiny_graph):
    plan = tiny_plan(Store(str(tiny_graph.root)))
    for v in ("baseline", "prologue"):
        m = plan.tuning(v).require().metrics
        assert m["reference"] == "val" and m["points"] == {"nocfg": 4, "cfg": 4} and m["samples_per_point"] == 20
        for g in ("nocfg", "cfg"):
            best = min(m["grid"][g], key=lambda p: p["fd_domain"])["sampler"]
            assert {k: m["selected"][g][k] for k in best} == best
        used = plan.samples(v)[0].require().samplers  # the samples were drawn with the selection
        for g in ("nocfg", "cfg"):
            assert used[g] == {**m["selected"][g], "seed": plan.profile.sampler.seed}
