"""recipes/demo.py and saft_hf.experiments.demo: held-out data really is held out, the pre-trained start is cached,
and a reduced demo run writes the tables, the merged model folder with its card and recipe, and the heat-map."""

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
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
from test_experiments import RECIPES, import_recipe

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
    [("demo_0to4", {d: d for d in range(5)}), ("demo_5to9", {d: d - 5 for d in range(5, 10)}),
     ("demo_parity", {d: d % 2 for d in range(10)}), ("demo_small_large", {d: int(d >= 5) for d in range(10)})],
)  # fmt: skip
def test_demo_tasks_relabel_the_shared_test_split(task, class_of_digit):
    digits = load_digits_splits()["test"]
    expected = [class_of_digit[d] for d in digits["label"] if d in class_of_digit]
    assert get_task(task).load()["test"]["label"] == expected


def test_pretraining_is_cached_and_its_model_reloads(tmp_path):
    folder = pretrain_tiny_clip(tmp_path / "pretrained", max_steps=3, batch_size=16)
    weights = folder / "model.safetensors"
    stamp = weights.stat().st_mtime_ns
    record = json.loads((folder / "pretraining.json").read_text())
    assert record["settings"]["max_steps"] == 3 and record["settings"]["task"] == PRETRAINING_TASK
    assert pretrain_tiny_clip(folder, max_steps=3, batch_size=16) == folder
    assert weights.stat().st_mtime_ns == stamp
    # A different setting would silently reuse the wrong model; it refuses instead of overwriting.
    with pytest.raises(UnsafeOutputError, match="records other pre-training settings"):
        pretrain_tiny_clip(folder, max_steps=4, batch_size=16)
    assert weights.stat().st_mtime_ns == stamp
    # The saved folder is a complete CLIPModel: it scores a task zero-shot like any Hub checkpoint.
    assert 0.0 <= evaluate_model(folder, "demo_parity", "test", max_samples=16, progress=False)["accuracy"] <= 1.0
    assert "text_model.embeddings.token_embedding.weight" in load_file(weights)


@pytest.mark.slow
def test_reduced_demo_writes_tables_merged_model_card_recipe_and_heatmap(tmp_path, capsys):
    config = yaml.safe_load((RECIPES / "configs" / "demo_experiment.yaml").read_text())
    config["tasks"] = ["demo_parity", "demo_small_large"]  # the heat-map pair
    config["finetune_configs"] = [str(RECIPES / "configs" / "demo_experiment_finetune.yaml")]
    config["search_grid"] = {"task_arithmetic": {"alpha": [0.3, 1.0]}, "ties": {"alpha": [1.0], "density": [0.2]}}
    config["eval_max_samples"] = 48
    config_path = tmp_path / "demo.yaml"
    config_path.write_text(yaml.safe_dump(config))
    demo = import_recipe("demo")
    out = tmp_path / "out"
    record = demo.main(["--output_dir", str(out), "--config", str(config_path), "--quick", "--grid_points", "3",
                        "--heatmap_examples", "16"])  # fmt: skip
    printed = capsys.readouterr().out

    merged = out / "merged" / "saft" / "ties"
    assert f"merged model (saft, ties, searched): {merged}" in printed
    recipe = yaml.safe_load((merged / "merge_config.yaml").read_text())
    assert recipe["method"] == "ties" and recipe["parameters"]["density"] == 0.2
    assert [Path(m["model"]).name for m in recipe["models"]] == ["demo_parity", "demo_small_large"]
    assert "ties" in (merged / "README.md").read_text().lower()
    heatmap = out / "analysis" / "disentanglement_pair.png"
    assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(heatmap) in printed

    table = (out / "table_merged_searched.md").read_text()
    assert table in printed
    methods = {(row["method"], row["setting"]) for row in record["comparison"]}
    assert methods == {("weight_average", "-"), ("task_arithmetic", "searched"), ("task_arithmetic", "alpha=0.4"),
                       ("ties", "searched"), ("ties", "alpha=0.4")}  # fmt: skip
    # The comparison's averages are the tables' (one source of numbers).
    scores = json.loads((out / "scores.json").read_text())
    ta_saft = [s["accuracy"] for s in scores if (s["family"], s["method"], s["setting"]) == ("saft", "ties", "searched")]
    row = next(r for r in record["comparison"] if (r["method"], r["setting"]) == ("ties", "searched"))
    assert row["saft avg"] == pytest.approx(100 * sum(ta_saft) / len(ta_saft))
    assert record["wall_time_seconds"] > 0 and (out / "demo_summary.json").is_file()
