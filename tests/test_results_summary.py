"""The results table's summary over training seeds and its reading of gaps against that spread."""

from __future__ import annotations

import pytest

from pipelines.results import SEED_FIGURES, _seed_table, gaps, over_training_seeds

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


def test_a_gap_is_read_against_the_spread_of_two_single_runs():
    [line] = gaps(over_training_seeds(ROWS, EV), EV)
    # FD-domain no CFG: 15.5 - 21 = -5.5 against sqrt(2 + 0.5) = 1.58: outside
    assert line.startswith("prologue − baseline: ") and "fd_domain_nocfg -5.500 (spread 1.581: outside)" in line
    # the probe: +0.09 against sqrt(0.0002 + 0) = 0.014: outside; an equal figure is inside
    assert "probe_top1 +0.090 (spread 0.014: outside)" in line and "psnr_db +0.000 (spread 0.000: inside)" in line
    noisy = [_row("baseline", 20.0, 0.4), _row("baseline_s1", 30.0, 0.4), _row("prologue", 18.0, 0.4),
             _row("prologue_s1", 28.0, 0.4)]  # fmt: skip
    assert "fd_domain_nocfg -2.000 (spread 10.000: inside)" in gaps(over_training_seeds(noisy, EV), EV)[0]


def test_without_seed_groups_the_table_has_no_summary():
    assert over_training_seeds(ROWS[:3], EV) == [] and _seed_table([], EV) == []
    text = "\n".join(_seed_table(over_training_seeds(ROWS, EV), EV))
    assert "| baseline | baseline, baseline_s1 |" in text and "21.000 ± 1.414" in text
