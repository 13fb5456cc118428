"""The results table's summary over training seeds and its reading of gaps against that spread."""

from __future__ import annotations

import pytest

from pipelines.results import (
    SEED_FIGURES,
    _code_usage,
    _gap_text,
    _seed_table,
    _usage,
    one_setting_gaps,
    over_training_seeds,
    seed_group_gaps,
)

EV = "effnetlite0"


def _row(variant: str, fd: float, probe: float) -> dict:
    row = {f.format(ev=EV): 1.0 for f in SEED_FIGURES}
    return {**row, "variant": variant, "fd_domain_nocfg": fd, "probe_top1": probe}


ROWS = [
    _row("baseline", 20.0, 0.40),
    _row("prologue", 15.0, 0.50),
    _row("prologue_z2", 18.0, 0.45),  # one seed: no group
    _row("baseline_s1", 22.0, 0.42),
    _row("prologue_s1", 16.0, 0.50),
]


def test_rows_that_differ_by_training_seed_are_summarised_together():
    summary = over_training_seeds(ROWS, EV)
    assert [(g["group"], g["variants"]) for g in summary] == [
        ("baseline", ["baseline", "baseline_s1"]),
        ("prologue", ["prologue", "prologue_s1"]),
    ]
    base, pro = summary
    assert base["fd_domain_nocfg"]["mean"] == pytest.approx(21.0)
    assert base["fd_domain_nocfg"]["std"] == pytest.approx(2**0.5)  # sample std of 20 and 22
    assert pro["probe_top1"] == {"mean": pytest.approx(0.5), "std": pytest.approx(0.0)}


def test_a_gap_between_two_arms_is_read_against_the_spread_of_a_difference_of_two_means():
    [entry] = seed_group_gaps(ROWS, EV)
    assert (entry["rows"], entry["against"]) == ("prologue", "baseline")
    fd = entry["figures"]["fd_domain_nocfg"]
    # 15.5 - 21 = -5.5; pooled std sqrt((2 + 0.5) / 2) = 1.118, times sqrt(1/2 + 1/2) for two means of two
    assert fd["gap"] == pytest.approx(-5.5) and fd["spread"] == pytest.approx(1.118, abs=1e-3) and not fd["inside"]
    line = _gap_text(entry)
    assert line.startswith("prologue − baseline: ") and "fd_domain_nocfg -5.500 (spread 1.118: outside)" in line
    # the probe: +0.09 against sqrt((0.0002 + 0) / 2) = 0.010: outside; an equal figure is inside
    assert "probe_top1 +0.090 (spread 0.010: outside)" in line and "psnr_db +0.000 (spread 0.000: inside)" in line
    noisy = [_row("baseline", 20.0, 0.4), _row("baseline_s1", 30.0, 0.4), _row("prologue", 18.0, 0.4),
             _row("prologue_s1", 28.0, 0.4)]  # fmt: skip
    assert "fd_domain_nocfg -2.000 (spread 7.071: inside)" in _gap_text(seed_group_gaps(noisy, EV)[0])
    assert seed_group_gaps(ROWS[:3], EV) == []  # one seed per arm: no spread to read a gap against


def test_without_seed_groups_the_table_has_no_summary():
    assert over_training_seeds(ROWS[:3], EV) == [] and _seed_table(ROWS[:3], EV) == []
    text = "\n".join(_seed_table(ROWS, EV))
    assert "| baseline | baseline, baseline_s1 |" in text and "21.000 ± 1.414" in text
    assert "- prologue − baseline: " in text and "(spread 1.118: outside)" in text


def test_each_setting_is_read_against_its_arm_and_the_baseline_with_the_same_setting():
    rows = [*ROWS, _row("prologue_ent0", 14.0, 0.55), _row("baseline_ar4x", 19.0, 0.40),
            _row("prologue_post", 19.5, 0.45), _row("prologue_post_ar4x", 16.0, 0.45)]  # fmt: skip
    found = {(e["rows"], e["against"]): e for e in one_setting_gaps(rows, EV)}
    assert set(found) == {("prologue_z2", "prologue"), ("prologue_ent0", "prologue"), ("baseline_ar4x", "baseline"),
                          ("prologue_post_ar4x", "prologue_post"), ("prologue_post_ar4x", "baseline_ar4x")}
    # pooled seed std of FD-domain no CFG: sqrt((2 + 0.5) / 2) = 1.118 (baseline 20/22, prologue 15/16)
    z2 = found[("prologue_z2", "prologue")]["figures"]["fd_domain_nocfg"]
    assert z2["gap"] == pytest.approx(2.5) and z2["spread"] == pytest.approx(1.118 * 1.5**0.5, abs=1e-3)
    assert z2["inside"] is False  # 2.5 > 1.369: one run against a mean of two
    post = found[("prologue_post_ar4x", "baseline_ar4x")]
    f = post["figures"]["fd_domain_nocfg"]
    assert f["gap"] == pytest.approx(-3.0) and f["spread"] == pytest.approx(1.118 * 2**0.5, abs=1e-3)
    assert f["inside"] is False  # 3.0 > 1.581: two single runs
    assert post["without_setting"]["figures"]["fd_domain_nocfg"]["gap"] == pytest.approx(19.5 - 21.0)
    text = "\n".join(_gap_text(e) for e in one_setting_gaps(rows, EV))
    [line] = [t for t in text.splitlines() if t.startswith("prologue_post_ar4x − baseline_ar4x: ")]
    assert "fd_domain_nocfg -3.000 (spread 1.581: outside)" in line
    assert "[without the setting, prologue_post − baseline: " in line and "fd_domain_nocfg -1.500" in line
    assert one_setting_gaps(ROWS[:3], EV)[0]["figures"]["fd_domain_nocfg"]["spread"] is None  # no seed groups


def test_two_arms_read_alike_with_and_without_a_setting():
    """prologue_tok3x − baseline_tok3x (two seeds each) gets the spread prologue − baseline gets."""
    names = {"baseline": "baseline_tok3x", "baseline_s1": "baseline_s1_tok3x", "prologue": "prologue_tok3x",
             "prologue_s1": "prologue_s1_tok3x"}  # fmt: skip
    tok3x = [_row(names[r["variant"]], r["fd_domain_nocfg"] - 1.0, r["probe_top1"])
             for r in ROWS if r["variant"] in names]  # fmt: skip
    rows = [*ROWS, *tok3x]
    [arms] = seed_group_gaps(rows, EV)
    found = {(e["rows"], e["against"]): e for e in one_setting_gaps(rows, EV)}
    setting = found[("prologue_tok3x", "baseline_tok3x")]["figures"]["fd_domain_nocfg"]
    assert setting["spread"] == pytest.approx(arms["figures"]["fd_domain_nocfg"]["spread"])
    assert setting["gap"] == pytest.approx(arms["figures"]["fd_domain_nocfg"]["gap"])


def test_codebook_usage_reads_the_tokenizer_metrics_and_shows_a_collapsed_prologue():
    visual = {"codebook_size": 512, "fraction_used": 0.96875, "perplexity": 80.33}
    collapsed = {"codebook_size": 64, "fraction_used": 0.0625, "perplexity": 3.013}
    row = _code_usage({"visual_codes": visual, "prologue_codes": collapsed})
    assert row["prologue_codes_used"] == 0.0625 and row["prologue_perplexity"] == 3.013
    assert _usage(row, "prologue") == "4 of 64 (perplexity 3.0)"
    assert _usage(row, "visual") == "496 of 512 (perplexity 80.3)"
    baseline = _code_usage({"visual_codes": visual})  # no prologue codebook: no figure, not a zero
    assert baseline["prologue_codes_used"] is None and _usage(baseline, "prologue") == "—"
