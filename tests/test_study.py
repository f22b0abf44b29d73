"""saft_hf.experiments.statistics and .study: intervals, paired differences, wins, flags and verdicts against
hand-computed values; the written table, summary and figures; a tiny two-seed study end to end."""

import json
import math
from pathlib import Path

import pytest

from saft_hf.experiments.statistics import paired_difference, t_interval
from saft_hf.experiments.study import (
    README_HEADING,
    SeedResult,
    cost_gain_points,
    decision,
    readme_section,
    summarize,
    verdicts,
    write_study,
)
from saft_hf.experiments.tables import FINETUNED, PRETRAINED, Score

# Student t quantiles t_{0.975, df} from printed tables (df = 1, 2, 3).
T_975 = {1: 12.706204736, 2: 4.302652730, 3: 3.182446305}


def test_t_interval_matches_the_hand_computed_student_interval():
    interval = t_interval([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, s = sqrt(5/3), half width = t_{0.975,3} s / sqrt(4)
    half = T_975[3] * math.sqrt(5 / 3) / 2
    assert (interval.mean, interval.n) == (2.5, 4)
    assert (interval.low, interval.high) == pytest.approx((2.5 - half, 2.5 + half))
    assert interval.half_width == pytest.approx(2.054260, abs=1e-6)
    two = t_interval([0.0, 2.0])  # s = sqrt(2): half width = t_{0.975,1} sqrt(2) / sqrt(2)
    assert (two.low, two.high) == pytest.approx((1 - T_975[1], 1 + T_975[1]))


def test_one_value_has_no_interval():
    interval = t_interval([3.0])
    assert interval.mean == 3.0 and math.isnan(interval.low) and interval.format() == "3.00"


def test_paired_difference_is_the_interval_of_per_seed_differences_and_counts_wins():
    difference = paired_difference({0: 70.0, 1: 72.0, 2: 68.0}, {0: 69.0, 1: 70.0, 2: 69.0})
    assert difference.differences == {0: 1.0, 1: 2.0, 2: -1.0}
    assert difference.wins == 2 and difference.seeds == 3
    half = T_975[2] * math.sqrt(42 / 18) / math.sqrt(3)  # s^2 = ((1/3)^2 + (4/3)^2 + (5/3)^2) / 2
    interval = difference.interval
    assert interval.mean == pytest.approx(2 / 3)
    assert (interval.low, interval.high) == pytest.approx((2 / 3 - half, 2 / 3 + half))
    # Pairing is the point: unpaired seeds are refused.
    with pytest.raises(ValueError, match="seeds differ"):
        paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 2: 2.0})


def test_a_tie_is_not_a_win():
    assert paired_difference({0: 1.0, 1: 2.0}, {0: 1.0, 1: 1.0}).wins == 1


@pytest.mark.parametrize(
    "values, expected",
    [
        ({0: 2.0, 1: 3.0, 2: 2.5}, "better (interval above 0)"),
        ({0: -2.0, 1: -3.0, 2: -2.5}, "worse (interval below 0)"),
        ({0: 4.0, 1: -4.0, 2: 1.0}, "undecided: the interval spans 0 and is too wide"),
        ({0: 0.1, 1: -0.1, 2: 0.05}, "no difference detected: the interval spans 0 (±0.3 pp)"),
    ],
)
def test_decision_says_what_the_interval_supports(values, expected):
    assert decision(paired_difference(values, {seed: 0.0 for seed in values})).startswith(expected)


def _seed(seed, finetuned, merged, seconds):
    """Scores of one seed on tasks a, b: {family: (acc a, acc b)} for the fine-tunes and task arithmetic merges."""
    scores = [Score("", PRETRAINED, "", "a", 0.5), Score("", PRETRAINED, "", "b", 0.5)]
    for family in finetuned:
        scores += [Score(family, FINETUNED, "", task, value) for task, value in zip("ab", finetuned[family])]
        scores += [
            Score(family, "task_arithmetic", "searched", task, value) for task, value in zip("ab", merged[family])
        ]
    return SeedResult(seed, scores, seconds, f"out/seed_{seed}")


@pytest.fixture
def seeds():
    return [
        _seed(
            0,
            {"sgd": (0.9, 0.8), "saft": (0.9, 0.8)},
            {"sgd": (0.6, 0.6), "saft": (0.7, 0.6)},
            {"sgd": 10.0, "saft": 20.0},
        ),
        _seed(
            1,
            {"sgd": (0.9, 0.9), "saft": (0.8, 0.8)},
            {"sgd": (0.7, 0.6), "saft": (0.7, 0.7)},
            {"sgd": 12.0, "saft": 22.0},
        ),
        _seed(
            2,
            {"sgd": (1.0, 0.8), "saft": (0.9, 0.7)},
            {"sgd": (0.7, 0.7), "saft": (0.6, 0.6)},
            {"sgd": 11.0, "saft": 24.0},
        ),
    ]


def test_summarize_averages_tasks_then_pairs_seeds_and_flags_undertrained_families(seeds):
    rows = summarize(seeds, ["a", "b"], "sgd")
    assert [(r.method, r.family) for r in rows] == [
        (FINETUNED, "sgd"),
        ("task_arithmetic", "sgd"),
        (FINETUNED, "saft"),
        ("task_arithmetic", "saft"),
    ]
    saft = rows[3]
    # merged averages: saft 65, 70, 60; sgd 60, 65, 70 -> per-seed differences +5, +5, -10
    assert saft.merged.mean == pytest.approx(65.0) and rows[1].merged.mean == pytest.approx(65.0)
    assert saft.difference.differences == pytest.approx({0: 5.0, 1: 5.0, 2: -10.0})
    assert saft.difference.wins == 2 and saft.difference.interval.mean == pytest.approx(0.0, abs=1e-9)
    # normalized: saft (0.7/0.9 + 0.6/0.8)/2, (0.7/0.8 + 0.7/0.8)/2, (0.6/0.9 + 0.6/0.7)/2
    expected = [100 * (0.7 / 0.9 + 0.75) / 2, 100 * 0.875, 100 * (0.6 / 0.9 + 0.6 / 0.7) / 2]
    assert saft.merged_normalized.mean == pytest.approx(sum(expected) / 3)
    # fine-tunes: saft 85, 80, 80 vs sgd 85, 90, 90 -> 6.7 pp below: flagged
    assert saft.finetuned_difference.interval.mean == pytest.approx(-20 / 3)
    assert saft.notes == ["fine-tunes 6.7 pp below sgd's: its merges do not test the claim"]
    assert saft.training_seconds.mean == pytest.approx(22.0)
    assert rows[1].difference is None and rows[1].notes == []
    sentence = verdicts(rows, "sgd")
    half = saft.difference.interval.half_width
    assert sentence == [
        f"task_arithmetic (searched): saft - sgd = +0.00 [{-half:+.2f}, {half:+.2f}] pp, 2/3 seeds; "
        f"undecided: the interval spans 0 and is too wide (±{half:.1f} pp) to detect 1 pp; "
        "fine-tunes 6.7 pp below sgd's: its merges do not test the claim."
    ]


def test_summarize_names_an_unknown_baseline(seeds):
    with pytest.raises(ValueError, match="baseline: 'adam' is not a family"):
        summarize(seeds, ["a", "b"], "adam")


def test_write_study_writes_table_summary_and_figures(seeds, tmp_path):
    rows = summarize(seeds, ["a", "b"], "sgd")
    summary = write_study(tmp_path, rows, seeds, baseline="sgd", extra={"command": "demo"})
    saved = json.loads((tmp_path / "study_summary.json").read_text())
    assert saved["headline"] == summary["headline"] == verdicts(rows, "sgd")[0]
    assert saved["seeds"] == [0, 1, 2] and saved["command"] == "demo" and saved["machine"]["cpus"] >= 1
    saft = next(r for r in saved["rows"] if (r["method"], r["family"]) == ("task_arithmetic", "saft"))
    assert saft["difference"]["per_seed"] == pytest.approx({"0": 5.0, "1": 5.0, "2": -10.0})
    table = (tmp_path / "study.md").read_text()
    assert "| task_arithmetic (searched) | saft | 3 | 81.67 [" in table and "| 2/3 |" in table
    header = (tmp_path / "study.csv").read_text().splitlines()[0].split(",")
    assert {"merged_mean", "merged_low", "merged_high", "difference_wins", "notes"} <= set(header)
    for name in ("study_merged.png", "study_cost_gain.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cost_gain_points_put_each_familys_time_ratio_against_its_paired_gain(seeds, tmp_path):
    rows = summarize(seeds, ["a", "b"], "sgd")
    points = cost_gain_points(rows, "sgd", ("task_arithmetic", "searched"))
    # mean times: sgd (10 + 12 + 11) / 3 = 11 s, saft (20 + 22 + 24) / 3 = 22 s; saft's gain: +5, +5, -10 pp
    assert [(p.family, p.time_ratio, p.wins) for p in points] == [("sgd", 1.0, None), ("saft", 2.0, 2)]
    assert points[0].gain.mean == 0.0 and math.isnan(points[0].gain.low)
    half = T_975[2] * math.sqrt((25 + 25 + 100) / 2) / math.sqrt(3)
    assert points[1].gain.mean == pytest.approx(0.0, abs=1e-9)
    assert (points[1].gain.low, points[1].gain.high) == pytest.approx((-half, half))
    # The summary records the plotted points.
    saved = write_study(tmp_path, rows, seeds, baseline="sgd")["cost_gain"]
    assert saved["merge"] == "task_arithmetic (searched)"
    assert [(p["family"], p["time_ratio"], p["wins"]) for p in saved["points"]] == [
        ("sgd", 1.0, None),
        ("saft", 2.0, 2),
    ]
    assert saved["points"][1]["gain"]["half_width"] == pytest.approx(half)


def test_readme_demo_section_is_generated_from_the_committed_study_summary():
    repo = Path(__file__).resolve().parents[1]
    path = "recipes/results/demo_study/study_summary.json"
    summary = json.loads((repo / path).read_text())
    readme = (repo / "README.md").read_text()
    start = readme.index(README_HEADING)
    end = readme.index("\n## ", start + 1) + 1
    assert readme[start:end] == readme_section(summary, path)
    # The headline the README repeats is computed from the committed per-seed differences.
    headline = next(r for r in summary["rows"] if (r["method"], r["family"]) == ("task_arithmetic", "saft"))
    differences = list(headline["difference"]["per_seed"].values())
    assert headline["difference"]["mean"] == pytest.approx(sum(differences) / len(differences))
    assert headline["difference"]["wins"] == sum(d > 0 for d in differences)


def test_readme_text_states_each_familys_recorded_budget_and_sam_settings():
    from saft_hf.experiments.study import _families_text

    settings = {
        "sgd": {"sam_mode": "none", "max_steps": 600},
        "saft": {"sam_mode": "asam", "sam_rho": 0.5, "max_steps": 600},
        "every4": {"sam_mode": "asam", "sam_rho": 0.5, "sam_interval": 4, "max_steps": 600},
    }
    assert _families_text({"finetune_settings": settings}) == (
        "plain fine-tuning (`sgd`), `saft` (ASAM, rho 0.5) and `every4` (ASAM, rho 0.5, every 4 steps) "
        "for the same 600 steps"
    )
    settings["saft"]["max_steps"] = 300
    assert _families_text({"finetune_settings": settings}).endswith("for 300, 600 steps")
