"""saft_hf.experiments.noise_sweep (recipes/noise_sweep.py): the noise scale each run logs against a hand
computation, each seed's gains against the analysis functions applied to the saved runs by another route, the
statistics over seeds against hand-computed values, the figures' data, resumability and bad input."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from accelerate import PartialState
from recipe_loader import import_recipe
from safetensors.torch import load_file

from saft_hf.analysis import (
    align_to_model,
    build_analysis_tasks,
    coefficient_grid,
    current_weights,
    linear_interpolation,
    logged_noise_scale,
    task_arithmetic_gain,
)
from saft_hf.experiments import noise_sweep
from saft_hf.finetuning import parse_finetune_args

REPO = Path(__file__).resolve().parents[1]
noise_sweep_recipe = import_recipe("noise_sweep")

# The demo's settings (tiny CLIP from seed 0, AdamW) shrunk to 4 steps of a linear decay without warm-up, logged at
# every step, with beta1 = 0.8 so the momentum term is not 1/(1 - 0.9)^2 = 100 by coincidence of defaults.
FINETUNE_OVERRIDES = {
    "sam_mode": "none",
    "max_steps": 4,
    "logging_steps": 1,
    "lr_scheduler_type": "linear",
    "warmup_steps": 0,
    "adam_beta1": 0.8,
    "max_train_samples": 64,
    "max_eval_samples": 40,
    "eval_strategy": "no",
    "save_strategy": "no",
    "load_best_model_at_end": False,
    "disable_tqdm": True,
}
GRID = {"learning_rates": [2e-3, 8e-3], "batch_sizes": [4, 8], "weight_decays": [0.05]}
TASKS = {"interpolation_task": "digits_0to4", "arithmetic_tasks": ["digits_0to4", "digits_5to9"]}
EVAL = {"max_eval_examples": 40, "eval_batch_size": 64, "interpolation_points": 3, "arithmetic_alpha": 0.7}
SEEDS = [0, 1]


def _write_sweep_config(folder: Path, output_dir: Path, **changes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.yaml").write_text(yaml.safe_dump(FINETUNE_OVERRIDES | changes.pop("finetune", {})))
    values = {
        # An absolute path and one relative to the sweep config file.
        "finetune_configs": [str(REPO / "recipes" / "configs" / "demo.yaml"), "overrides.yaml"],
        "output_dir": str(output_dir),
        "seeds": SEEDS,
        **GRID,
        **TASKS,
        **EVAL,
        **changes,
    }
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("noise_sweep")
    config = _write_sweep_config(root / "configs", root / "out")
    result = noise_sweep_recipe.main(["--config", str(config)])
    return config, root / "out", result


def _rows(output_dir: Path) -> list[dict[str, str]]:
    return list(csv.DictReader((output_dir / "merge_gain_vs_noise.csv").open()))


def _run(output_dir: Path, setting: str, task: str, data_seed: int, seed: int = 0) -> Path:
    return output_dir / "runs" / setting / f"seed{seed}" / f"{task}_data{data_seed}"


# The logged learning rates are lr * (1, 0.75, 0.5, 0.25) (the rate of the step just taken, decaying linearly to 0
# over 4 steps), so the mean noise scale is 0.625 * lr / (B (1 - 0.8)^2) = 0.625 * lr / (0.04 B).
@pytest.mark.slow
@pytest.mark.parametrize(
    ("setting", "expected"),
    [
        ("lr0.002_bs4_wd0.05", 0.0078125),
        ("lr0.008_bs4_wd0.05", 0.03125),
        ("lr0.002_bs8_wd0.05", 0.00390625),
        ("lr0.008_bs8_wd0.05", 0.015625),
    ],
)
def test_each_run_logs_the_hand_computed_noise_scale(sweep, setting, expected):
    _, output_dir, _ = sweep
    runs = [("digits_0to4", 0), ("digits_0to4", 1), ("digits_5to9", 0)]
    for (task, data_seed), seed in ((run, seed) for run in runs for seed in SEEDS):
        folder = _run(output_dir, setting, task, data_seed, seed)
        assert logged_noise_scale(folder) == pytest.approx(expected, rel=1e-9)
        recorded = yaml.safe_load((folder / "finetune_config.yaml").read_text())
        # B = 4 or 8 samples per step on one process without accumulation: the per-device batch itself.
        assert recorded["weight_decay"] == 0.05 and recorded["data_seed"] == data_seed
        assert recorded["seed"] == recorded["tiny_model_seed"] == seed  # each seed its own tiny model
        assert recorded["per_device_train_batch_size"] == int(setting.split("_bs")[1].split("_")[0])
    row = next(row for row in _rows(output_dir) if row["setting"] == setting)
    assert float(row["noise_scale"]) == pytest.approx(expected, rel=1e-9)


@pytest.mark.slow
def test_the_interpolated_runs_share_their_start_and_differ_in_data_order(sweep):
    _, output_dir, _ = sweep
    first, second = (_run(output_dir, "lr0.008_bs4_wd0.05", "digits_0to4", data_seed) for data_seed in (0, 1))
    start_a, start_b = (load_file(folder / "pretrained" / "model.safetensors") for folder in (first, second))
    assert all(torch.equal(start_a[key], start_b[key]) for key in start_a)
    # Another seed starts from another model.
    other = load_file(
        _run(output_dir, "lr0.008_bs4_wd0.05", "digits_0to4", 0, seed=1) / "pretrained" / "model.safetensors"
    )
    assert any(not torch.equal(start_a[key], other[key]) for key in start_a)
    tuned_a, tuned_b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert any(not torch.equal(tuned_a[key], tuned_b[key]) for key in tuned_a)


def _saved_weights(folder: Path, model) -> dict:
    return align_to_model(load_file(folder / "model.safetensors"), model, label=str(folder))


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_each_seeds_gains_equal_the_analysis_functions_on_the_saved_models(sweep, seed):
    _, output_dir, result = sweep
    document = json.loads((output_dir / "merge_gain_vs_noise.json").read_text())
    rows = [row for row in document["per_seed"] if row["seed"] == seed]
    assert sorted(row["setting"] for row in rows) == sorted(
        f"lr{lr:g}_bs{b}_wd0.05" for lr in GRID["learning_rates"] for b in GRID["batch_sizes"]
    )
    base = _run(output_dir, rows[0]["setting"], "digits_0to4", 0, seed) / "pretrained"
    tasks = build_analysis_tasks(base, ["digits_0to4", "digits_5to9"], max_examples=40, batch_size=64)
    model = tasks[0].model
    for row in rows:
        setting = row["setting"]
        # Models read straight from the fine-tunes' safetensors; task vectors as their difference to theta_0.
        model_a, model_b, model_5to9 = (
            _saved_weights(_run(output_dir, setting, task, data_seed, seed), model)
            for task, data_seed in (("digits_0to4", 0), ("digits_0to4", 1), ("digits_5to9", 0))
        )
        theta_0 = current_weights(model, list(model_a))
        curve = linear_interpolation(tasks[0], model_a, model_b, alphas=coefficient_grid(0.0, 1.0, 3))
        assert float(row["interpolation_accuracy_gain"]) == pytest.approx(curve.summary["accuracy_gain"], abs=1e-9)
        assert float(row["interpolation_accuracy_merged"]) == pytest.approx(curve.summary["accuracy_merged"], abs=1e-9)
        assert float(row["interpolation_loss_gain"]) == pytest.approx(curve.summary["loss_gain"], rel=1e-4, abs=1e-7)
        vectors = [{name: tuned[name] - theta_0[name] for name in theta_0} for tuned in (model_a, model_5to9)]
        merged = task_arithmetic_gain(tasks, vectors, alpha=0.7)
        assert float(row["arithmetic_accuracy_gain"]) == pytest.approx(merged.summary["mean_gain"], abs=1e-9)
        expected_normalized = np.mean(merged.series["accuracy_merged"] / merged.series["accuracy_single"])
        assert float(row["arithmetic_normalized_accuracy"]) == pytest.approx(expected_normalized, abs=1e-9)
        saved_curve = json.loads((output_dir / "runs" / setting / f"seed{seed}" / "interpolation.json").read_text())
        assert saved_curve["alpha"] == [0.0, 0.5, 1.0]


@pytest.mark.slow
def test_the_table_reports_each_settings_gains_over_the_seeds(sweep):
    _, output_dir, result = sweep
    document = json.loads((output_dir / "merge_gain_vs_noise.json").read_text())
    table = _rows(output_dir)
    assert [row["setting"] for row in table] == [row["setting"] for row in result["rows"]]
    for row, written in zip(result["rows"], table):
        per_seed = [r for r in document["per_seed"] if r["setting"] == row["setting"]]
        assert [r["seed"] for r in per_seed] == SEEDS and row["seeds"] == int(written["seeds"]) == 2
        for merge in ("interpolation", "arithmetic"):
            gains = [r[f"{merge}_accuracy_merged"] - r[f"{merge}_accuracy_single"] for r in per_seed]
            # Two seeds: mean ± t_{0.975,1} |g0 - g1| / 2 (s = |g0 - g1| / sqrt 2, over sqrt 2).
            half = 12.706204736 * abs(gains[0] - gains[1]) / 2
            mean = sum(gains) / 2
            assert row[f"{merge}_accuracy_gain"] == pytest.approx(mean, abs=1e-12)
            assert float(written[f"{merge}_accuracy_gain_low"]) == pytest.approx(mean - half, rel=1e-9)
            assert float(written[f"{merge}_accuracy_gain_high"]) == pytest.approx(mean + half, rel=1e-9)
            assert row[f"{merge}_accuracy_gain_wins"] == sum(gain > 0 for gain in gains)


@pytest.mark.slow
def test_the_figures_plot_the_mean_gains_against_the_noise_scale(sweep, monkeypatch):
    config, output_dir, result = sweep
    for name in (
        "merge_gain_vs_noise_interpolation.png",
        "merge_gain_vs_noise_task_arithmetic.png",
        "interpolation_curves.png",
    ):
        assert str(output_dir / name) in result["files"]
    drawn = {}
    monkeypatch.setattr(
        noise_sweep,
        "plot_merge_gain_vs_noise",
        lambda points, path, ylabel: drawn.setdefault(Path(path).name, (points, ylabel)),
    )
    args = noise_sweep.parse_noise_sweep_args(["--config", str(config)])
    noise_sweep.plot_gains(result["rows"], noise_sweep.grid(args), args)
    by_setting = {row["setting"]: row for row in result["rows"]}
    for name, merge in (
        ("merge_gain_vs_noise_interpolation.png", "interpolation"),
        ("merge_gain_vs_noise_task_arithmetic.png", "arithmetic"),
    ):
        points, ylabel = drawn[name]
        assert ylabel.endswith("mean of 2 seed(s)")
        # One line per batch size (weight decay fixed), along which the learning rate varies.
        assert set(points) == {"B = 4, wd = 0.05", "B = 8, wd = 0.05"}
        for batch in (4, 8):
            expected = [
                (
                    by_setting[f"lr{lr:g}_bs{batch}_wd0.05"]["noise_scale"],
                    by_setting[f"lr{lr:g}_bs{batch}_wd0.05"][f"{merge}_accuracy_gain"],
                )
                for lr in GRID["learning_rates"]
            ]
            assert points[f"B = {batch}, wd = 0.05"] == expected


def test_gain_statistics_match_hand_computed_values():
    # Three seeds of one setting: arithmetic merged / single 0.80 / 0.75, 0.70 / 0.72, 0.75 / 0.70 (gains +0.05,
    # -0.02, +0.05); interpolation gains +0.01, +0.01, +0.04.
    def row(seed, scale, merged, single, interpolated, endpoints):
        return {
            "setting": "lr0.1_bs4_wd0",
            "seed": seed,
            "learning_rate": 0.1,
            "batch_size": 4,
            "weight_decay": 0.0,
            "noise_scale": scale,
            "arithmetic_accuracy_merged": merged,
            "arithmetic_accuracy_single": single,
            "interpolation_accuracy_merged": interpolated,
            "interpolation_accuracy_single": endpoints,
            "interpolation_loss_gain": -0.1 * seed,
            "arithmetic_normalized_accuracy": merged / single,
        }

    rows = [
        row(0, 1.0, 0.80, 0.75, 0.91, 0.90),
        row(1, 2.0, 0.70, 0.72, 0.93, 0.92),
        row(2, 3.0, 0.75, 0.70, 0.94, 0.90),
    ]
    stats = noise_sweep.gain_statistics(rows)
    assert (stats["setting"], stats["seeds"], stats["noise_scale"]) == ("lr0.1_bs4_wd0", 3, 2.0)
    # arithmetic gains 0.05, -0.02, 0.05: mean 0.08 / 3, deviations 0.07/3, -0.14/3, 0.07/3, s^2 = 0.0294 / 9 / 2
    arithmetic_half = 4.302652730 * math.sqrt(0.0294 / 18) / math.sqrt(3)
    assert stats["arithmetic_accuracy_gain"] == pytest.approx(0.08 / 3)
    assert (stats["arithmetic_accuracy_gain_low"], stats["arithmetic_accuracy_gain_high"]) == pytest.approx(
        (0.08 / 3 - arithmetic_half, 0.08 / 3 + arithmetic_half)
    )
    assert stats["arithmetic_accuracy_gain_wins"] == 2 and stats["arithmetic_accuracy_merged"] == pytest.approx(0.75)
    # interpolation gains 0.01, 0.01, 0.04: mean 0.02, deviations -0.01, -0.01, 0.02, s^2 = 0.0006 / 2
    interpolation_half = 4.302652730 * math.sqrt(0.0003) / math.sqrt(3)
    assert stats["interpolation_accuracy_gain"] == pytest.approx(0.02)
    assert (stats["interpolation_accuracy_gain_low"], stats["interpolation_accuracy_gain_high"]) == pytest.approx(
        (0.02 - interpolation_half, 0.02 + interpolation_half)
    )
    assert stats["interpolation_accuracy_gain_wins"] == 3
    assert stats["interpolation_loss_gain"] == pytest.approx(-0.1)
    # The Markdown table in % and pp: accuracy, then gain [interval] and seeds won, per merge.
    low, high = 100 * (0.08 / 3 - arithmetic_half), 100 * (0.08 / 3 + arithmetic_half)
    i_low, i_high = 100 * (0.02 - interpolation_half), 100 * (0.02 + interpolation_half)
    assert noise_sweep.format_table([stats]).splitlines()[2] == (
        f"| lr0.1_bs4_wd0 | 2 | 3 | 92.67 | +2.00 [{i_low:+.2f}, {i_high:+.2f}] pp, 3/3 | 75.00 | "
        f"+2.67 [{low:+.2f}, {high:+.2f}] pp, 2/3 |"
    )
    # One seed: the gain without an interval.
    single = noise_sweep.gain_statistics(rows[:1])
    assert single["arithmetic_accuracy_gain"] == pytest.approx(0.05) and math.isnan(
        single["arithmetic_accuracy_gain_low"]
    )


@pytest.mark.slow
def test_a_second_invocation_trains_nothing_and_an_unfinished_run_is_retrained(sweep):
    config, output_dir, first = sweep
    assert len(first["trained"]) == 24  # 2 seeds x 4 settings x 3 runs (digits_0to4 data order 0 serves both merges)
    models = sorted(output_dir.glob("runs/*/*/model.safetensors"))
    stamps = [path.stat().st_mtime_ns for path in models]
    again = noise_sweep_recipe.main(["--config", str(config)])
    assert again["trained"] == []
    assert [path.stat().st_mtime_ns for path in models] == stamps
    assert again["rows"] == first["rows"]

    args = noise_sweep.parse_noise_sweep_args(["--config", str(config)])
    setting = noise_sweep.Setting(learning_rate=2e-3, batch_size=8, weight_decay=0.05)
    _, (_, unfinished) = noise_sweep.runs_of(args, setting, 0)
    assert unfinished.folder == _run(output_dir, "lr0.002_bs8_wd0.05", "digits_5to9", 0)
    finished_model = load_file(unfinished.folder / "model.safetensors")
    (unfinished.folder / noise_sweep.RUN_COMPLETE_FILE).unlink()
    (unfinished.folder / "stale_leftover.txt").write_text("from the interrupted run")
    assert noise_sweep.ensure_trained(args, unfinished, 8, True, PartialState()) is True
    assert not (unfinished.folder / "stale_leftover.txt").exists()
    assert json.loads((unfinished.folder / noise_sweep.RUN_COMPLETE_FILE).read_text())["noise_scale"] == pytest.approx(
        0.00390625, rel=1e-9
    )
    retrained = load_file(unfinished.folder / "model.safetensors")
    assert all(torch.equal(retrained[name], finished_model[name]) for name in finished_model)  # same seeds and data
    assert noise_sweep.ensure_trained(args, unfinished, 8, True, PartialState()) is False


@pytest.mark.slow
def test_a_finished_run_of_another_configuration_is_refused(sweep, tmp_path):
    _, output_dir, _ = sweep
    changed = _write_sweep_config(tmp_path, output_dir, finetune={"max_steps": 5})
    with pytest.raises(
        ValueError, match=r"lr0\.002_bs4_wd0\.05/seed0/digits_0to4_data0 .*max_steps: trained 4, asked 5"
    ):
        noise_sweep.run_noise_sweep(noise_sweep.parse_noise_sweep_args(["--config", str(changed)]))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"data_seeds": [3]}, "data_seeds must be two different seeds"),
        ({"arithmetic_tasks": ["digits_0to4", "no_such_task"]}, "Unknown task 'no_such_task'"),
        ({"learning_rates": [1e-3, 1e-3]}, "learning_rates has repeated values"),
        ({"seeds": [1, 1]}, "seeds has repeated values"),
        ({"seeds": []}, "seeds must name at least one seed"),
        ({"batch_sizes": [4, "many"]}, "Config file .*sweep.yaml: batch_sizes must be an integer, got 'many'"),
        ({"finetune_configs": ["missing.yaml"]}, "missing.yaml is not a file"),
        ({"unknown_field": 1}, r"unknown field\(s\): \['unknown_field'\]"),
        ({"finetune": {"gradient_accumulation_steps": 3}}, "batch_sizes: 4 samples per step cannot be split"),
    ],
)
def test_bad_configuration_is_refused_before_anything_is_written(tmp_path, changes, message):
    output_dir = tmp_path / "out"
    config = _write_sweep_config(tmp_path / "configs", output_dir, **changes)
    with pytest.raises(ValueError, match=message):
        noise_sweep.run_noise_sweep(noise_sweep.parse_noise_sweep_args(["--config", str(config)]))
    assert not output_dir.exists()


def test_flags_override_the_sweep_config(tmp_path):
    config = _write_sweep_config(tmp_path, tmp_path / "out")
    args = noise_sweep.parse_noise_sweep_args(
        ["--config", str(config), "--learning_rates", "1e-4", "3e-4", "--device", "meta"]
    )
    assert args.learning_rates == [1e-4, 3e-4] and args.device == "meta"
    assert args.batch_sizes == [4, 8] and args.finetune_configs[1] == str(tmp_path / "overrides.yaml")


CONFIGS = REPO / "recipes" / "configs"


@pytest.mark.parametrize(
    ("sweep_config", "model", "task", "settings", "max_steps", "seeds"),
    [
        ("noise_sweep_demo.yaml", None, "digits_0to4", 6, 150, [0, 1, 2]),
        ("noise_sweep_clip_vit_b32.yaml", "openai/clip-vit-base-patch32", "resisc45", 20, 2000, [0]),
    ],
)
def test_shipped_sweep_configs_parse(sweep_config, model, task, settings, max_steps, seeds, tmp_path):
    args = noise_sweep.parse_noise_sweep_args(["--config", str(CONFIGS / sweep_config), "--output_dir", str(tmp_path)])
    assert len(noise_sweep.grid(args)) == settings and args.interpolation_task == task and args.seeds == seeds
    run = noise_sweep.runs_of(args, noise_sweep.grid(args)[0], seeds[-1])[0][1]
    # bf16 needs a GPU: the command line turns it off here, as it would override the configs.
    model_args, data_args, training_args, _ = parse_finetune_args(
        [*noise_sweep.finetune_argv(args, run, 16, model is None), "--bf16", "false"]
    )
    assert model_args.model_name_or_path == model and data_args.task == task
    assert model_args.tiny_model_seed == (seeds[-1] if model is None else None) and training_args.seed == seeds[-1]
    assert (training_args.sam_mode, training_args.max_steps, training_args.data_seed) == ("none", max_steps, 1)
    assert not training_args.load_best_model_at_end and training_args.learning_rate == args.learning_rates[0]
