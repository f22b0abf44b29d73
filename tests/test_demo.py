"""recipes/demo.py and saft_hf.experiments.demo: held-out data really is held out, the pre-trained start is cached,
and a reduced demo run writes the tables, the merged model folder with its card and recipe, and the heat-map."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml
from recipe_loader import RECIPES, import_recipe
from safetensors.torch import load_file

from saft_hf.data import get_task, load_digits_splits
from saft_hf.errors import UnsafeOutputError
from saft_hf.evaluation import evaluate_model
from saft_hf.experiments.demo import (
    DEMO_TASKS,
    PRETRAINING_TASK,
    held_out_splits,
    pretrain_tiny_clip,
    pretraining_splits,
    register_demo_tasks,
)
from saft_hf.experiments.study import SMOOTHED

register_demo_tasks()


def _pixels(dataset) -> list[bytes]:
    return [np.asarray(image).tobytes() for image in dataset["image"]]


def test_pretraining_and_task_training_images_are_disjoint_halves_of_the_train_split():
    pretraining, held_out = pretraining_splits()["train"], held_out_splits()["train"]
    assert len(pretraining) + len(held_out) == len(load_digits_splits()["train"]) == 1293
    assert not set(_pixels(pretraining)) & set(_pixels(held_out))
    for name in DEMO_TASKS:
        task_train = set(_pixels(get_task(name).load()["train"]))
        assert task_train <= set(_pixels(held_out)) and not task_train & set(_pixels(pretraining))


@pytest.mark.parametrize(
    "task, class_of_digit",
    [
        ("demo_0to4", {d: d for d in range(5)}),
        ("demo_5to9", {d: d - 5 for d in range(5, 10)}),
        ("demo_parity", {d: d % 2 for d in range(10)}),
        ("demo_small_large", {d: int(d >= 5) for d in range(10)}),
    ],
)
def test_demo_tasks_relabel_the_shared_test_split(task, class_of_digit):
    digits = load_digits_splits()["test"]
    expected = [class_of_digit[d] for d in digits["label"] if d in class_of_digit]
    assert get_task(task).load()["test"]["label"] == expected


def test_pretraining_is_cached_by_its_settings_and_redone_when_they_change(tmp_path, caplog):
    folder = pretrain_tiny_clip(tmp_path / "pretrained", max_steps=3, batch_size=16)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["settings"]["max_steps"] == 3 and record["settings"]["task"] == PRETRAINING_TASK
    assert pretrain_tiny_clip(folder, max_steps=3, batch_size=16) == folder
    assert weights.stat().st_mtime_ns == stamp
    # Other settings into the same folder: redone (never silently reused), with one line naming the change.
    pretrain_tiny_clip(folder, max_steps=4, batch_size=16)
    assert json.loads((folder / "pretraining.json").read_text())["settings"]["max_steps"] == 4
    assert "max_steps: 3 -> 4" in caplog.text
    # A file the user put there makes the folder theirs too: refused rather than deleted.
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(UnsafeOutputError, match="notes.txt"):
        pretrain_tiny_clip(folder, max_steps=5, batch_size=16)
    assert (folder / "notes.txt").read_text() == "mine"
    # The saved folder is a complete CLIPModel: it scores a task zero-shot like any Hub checkpoint.
    assert "accuracy" in evaluate_model(folder, "demo_parity", "test", max_samples=16, progress=False)
    assert "text_model.embeddings.token_embedding.weight" in load_file(weights)


def test_a_seed_worker_importing_the_demo_prints_nothing():
    # A spawned worker imports recipes/demo.py as `__mp_main__` before its initializer quiets the console: anything
    # the imports print (transformers' torchvision note on CLIPImageProcessor, ...) would reach the user once per
    # worker. The in-process console test cannot see it (those warnings fire once per process, at collection).
    code = f"import runpy; runpy.run_path({str(RECIPES / 'demo.py')!r}, run_name='__mp_main__')"
    environment = os.environ | {"PYTHONPATH": str(RECIPES.parent), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and (done.stdout, done.stderr) == ("", "")


@pytest.mark.slow
def test_two_seed_demo_study_end_to_end_prints_progress_and_tables_but_no_raw_logs(tmp_path, capfd):
    config = yaml.safe_load((RECIPES / "configs" / "demo_experiment.yaml").read_text())
    config["tasks"] = ["demo_parity", "demo_small_large"]  # the heat-map pair
    config["finetune_configs"] = [str(RECIPES / "configs" / "demo_experiment_finetune.yaml")]
    config["merge_methods"] = ["task_arithmetic", "ties"]
    config["search_grid"] = {"task_arithmetic": {"alpha": [0.3, 1.0]}, "ties": {"alpha": [1.0], "density": [0.2]}}
    config["eval_max_samples"] = 48
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    demo = import_recipe("demo")
    out = tmp_path / "out"
    summary = demo.main(
        [
            "--output_dir",
            str(out),
            "--config",
            str(config_path),
            "--quick",
            "--seeds",
            "2",
            "--processes",
            "1",
            "--heatmap_examples",
            "16",
        ]
    )
    captured = capfd.readouterr()
    console = captured.out + captured.err

    # Progress bars and the final tables only: no Trainer dicts, metrics blocks, or library warnings.
    for raw in ("{'loss'", "'train_runtime'", "***** ", "[transformers]", "torchvision", "INFO"):
        assert raw not in console, raw
    assert "study: 100%" in captured.err and summary["table_markdown"] in captured.out
    assert all(sentence in captured.out for sentence in summary["verdicts"])
    # The fine-tunes' own output went to their logs.
    assert "train_runtime" in (out / "seed_1" / "logs" / "saft_demo_parity.log").read_text()

    assert summary["seeds"] == [0, 1] and summary["baseline"] == "sgd"
    rows = {(r["method"], r["setting"], r["family"]): r for r in summary["rows"]}
    assert set(rows) == {
        ("fine-tuned", "", "sgd"),
        ("fine-tuned", "", "saft"),
        ("task_arithmetic", "searched", "sgd"),
        ("task_arithmetic", "searched", "saft"),
        ("ties", "searched", "sgd"),
        ("ties", "searched", "saft"),
        *((method, SMOOTHED, family) for method in ("task_arithmetic", "ties") for family in ("sgd", "saft")),
    }
    # A one-value grid has no neighbours: its smoothed row is the searched one.
    assert rows[("ties", SMOOTHED, "saft")]["merged"] == rows[("ties", "searched", "saft")]["merged"]
    # The recorded budget is the fine-tunes' (--quick: 10 steps), the same for both families.
    assert summary["finetune_settings"]["saft"]["sam_mode"] == "asam"
    assert {f["max_steps"] for f in summary["finetune_settings"].values()} == {10}
    # The study's numbers are the per-seed experiments' (one source of numbers): the paired difference of seed s is
    # saft's minus sgd's average test accuracy in seed s's scores.json.
    for seed in (0, 1):
        scores = json.loads((out / f"seed_{seed}" / "scores.json").read_text())

        def average(family, scores=scores):
            values = [s["accuracy"] for s in scores if (s["family"], s["method"]) == (family, "task_arithmetic")]
            return 100 * sum(values) / len(values)

        per_seed = rows[("task_arithmetic", "searched", "saft")]["difference"]["per_seed"][str(seed)]
        assert per_seed == pytest.approx(average("saft") - average("sgd"))
    assert summary["headline"].startswith("task_arithmetic (searched): saft - sgd = ")
    # Each seed pre-trained its own model.
    weights = [(out / f"seed_{s}" / "pretrained" / "model.safetensors").read_bytes() for s in (0, 1)]
    assert weights[0] != weights[1]
    heatmap = out / "analysis" / "disentanglement_pair.png"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "study.md").read_text() == summary["table_markdown"]
