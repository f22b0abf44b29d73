"""saft_hf.finetuning (recipes/finetune.py): config-file/flag precedence, end-to-end runs in every fine-tuning mode
whose saved models reproduce their metrics through `evaluate_model`, and best-on-validation checkpoint selection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image
from PIL import Image as PILImage
from safetensors.torch import load_file
from transformers import AutoConfig, CLIPModel

from saft_hf import finetuning
from saft_hf.data import DIGIT_NAMES, ImageClassificationTask, get_task, register_task
from saft_hf.evaluation import evaluate_model
from saft_hf.models import NOT_A_LABEL_WORD, CLIPVisionClassifier, load_text_to_text_model, predict_label_words
from saft_hf.modes import load_linearized

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "finetune.py"
DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"


def _write_config(path: Path, values: dict) -> Path:
    path.write_text(yaml.safe_dump(values))
    return path


# ---- --config file vs command-line flags -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "file_values, flags, expected",
    [
        # file only: the file's values
        ({"learning_rate": 0.003, "sam_rho": 0.2}, [], {"learning_rate": 0.003, "sam_rho": 0.2, "max_steps": -1}),
        # a flag overrides the file; other file values stay
        ({"learning_rate": 0.003, "max_steps": 50}, ["--max_steps", "7"], {"learning_rate": 0.003, "max_steps": 7}),
        # a flag the file does not set; field defaults elsewhere
        ({}, ["--sam_mode", "sam"], {"sam_mode": "sam", "sam_rho": 0.05, "learning_rate": 5e-5}),
        # booleans both ways
        (
            {"load_best_model_at_end": True, "eval_strategy": "steps", "save_steps": 5, "eval_steps": 5},
            ["--load_best_model_at_end", "false"],
            {"load_best_model_at_end": False},
        ),
        ({"remove_unused_columns": True}, ["--no_remove_unused_columns"], {"remove_unused_columns": False}),
        # YAML 1.1 reads "1e-4" as a string: the field's type converts it
        ({"learning_rate": "1e-4"}, [], {"learning_rate": 1e-4}),
        # the file sets the required task; a flag overrides it
        ({"task": "digits"}, ["--task", "digits_parity"], {"task": "digits_parity"}),
        # fine-tuning mode and LoRA options, from the file and from flags
        (
            {"finetune_mode": "lora", "lora_target_modules": ["q_proj", "k_proj"]},
            ["--lora_r", "4"],
            {"finetune_mode": "lora", "lora_r": 4, "lora_alpha": 32, "lora_target_modules": ["q_proj", "k_proj"]},
        ),
        ({}, ["--finetune_mode", "ftts"], {"finetune_mode": "ftts", "lora_target_modules": None}),
    ],
)
def test_flags_override_config_file(tmp_path, file_values, flags, expected):
    values = {"task": "digits", "tiny_model_seed": 0, "output_dir": str(tmp_path / "run"), "use_cpu": True}
    config = _write_config(tmp_path / "config.yaml", values | file_values)
    model_args, data_args, training_args, resolved = finetuning.parse_finetune_args(["--config", str(config), *flags])
    for name, value in expected.items():
        parsed = next(getattr(args, name) for args in (model_args, data_args, training_args) if hasattr(args, name))
        assert parsed == value, name
    flag_names = {flag.removeprefix("--no_").removeprefix("--") for flag in flags if flag.startswith("--")}
    assert set(file_values) | flag_names <= set(resolved)


def test_resolved_config_reproduces_the_run_and_keeps_no_secret(tmp_path):
    config = _write_config(tmp_path / "config.yaml", {"task": "digits", "tiny_model_seed": 0, "sam_rho": 0.3})
    flags = [
        "--config",
        str(config),
        "--output_dir",
        str(tmp_path / "out_{task}_{sam_mode}"),
        "--use_cpu",
        "true",
        "--max_steps",
        "9",
        "--hub_token",
        "hf_secret_value",
    ]
    first = finetuning.parse_finetune_args(flags)
    assert first[2].output_dir == str(tmp_path / "out_digits_asam")
    finetuning.write_resolved_config(first[3], tmp_path)
    written = (tmp_path / finetuning.RESOLVED_CONFIG_FILE).read_text()
    assert "hf_secret_value" not in written and "hub_token" not in written
    second = finetuning.parse_finetune_args(["--config", str(tmp_path / finetuning.RESOLVED_CONFIG_FILE)])
    for before, after in zip(first[:3], second[:3]):
        if hasattr(before, "to_dict"):
            before, after = before.to_dict(), after.to_dict()
            before.pop("hub_token"), after.pop("hub_token")
        else:
            before, after = vars(before), vars(after)
        assert before == after


@pytest.mark.parametrize(
    "file_values, flags, error, message",
    [
        ({"task": "digits", "tiny_model_seed": 0, "learning_rat": 0.1}, [], ValueError, "unknown field.*learning_rat"),
        ({"tiny_model_seed": 0}, [], ValueError, "task is required: set it in a --config file or with --task"),
        ({"task": "digits"}, [], ValueError, "exactly one of model_name_or_path and tiny_model_seed"),
        ({"task": "digits", "tiny_model_seed": 0, "output_dir": "o/{model}"}, [], ValueError, "unknown placeholder"),
        ({"task": "digits", "tiny_model_seed": 0}, ["--sam_rho", "-1"], ValueError, "sam_rho"),
        ({"task": "digits", "tiny_model_seed": 0, "finetune_mode": "qlora"}, [], ValueError, "finetune_mode.*qlora"),
        (
            {"task": "digits", "tiny_model_seed": 0},
            ["--finetune_mode", "qlora"],
            ValueError,
            "argument --finetune_mode.*: invalid choice: 'qlora'",
        ),
        ({"task": "digits", "tiny_model_seed": 0}, ["--lora_r", "0"], ValueError, "lora_r must be >= 1"),
        ({"task": "digits", "tiny_model_seed": 0}, ["--lora_dropout", "1"], ValueError, "lora_dropout"),
    ],
)
def test_bad_configuration_is_refused(tmp_path, file_values, flags, error, message):
    config = _write_config(tmp_path / "config.yaml", {"use_cpu": True, "output_dir": str(tmp_path)} | file_values)
    with pytest.raises(error, match=message):
        finetuning.parse_finetune_args(["--config", str(config), *flags])


def test_later_config_files_override_earlier_ones(tmp_path):
    first = _write_config(
        tmp_path / "a.yaml",
        {
            "task": "digits",
            "tiny_model_seed": 0,
            "learning_rate": 0.1,
            "max_steps": 5,
            "output_dir": str(tmp_path / "{finetune_mode}"),
        },
    )
    second = _write_config(tmp_path / "b.yaml", {"learning_rate": 0.2, "finetune_mode": "lora"})
    model_args, _, training_args, resolved = finetuning.parse_finetune_args(
        ["--config", str(first), "--config", str(second), "--max_steps", "7", "--use_cpu", "true"]
    )
    assert (training_args.learning_rate, training_args.max_steps, model_args.finetune_mode) == (0.2, 7, "lora")
    assert training_args.output_dir == str(tmp_path / "lora")
    assert resolved["learning_rate"] == 0.2
    with pytest.raises(ValueError, match="b.yaml sets unknown field.*lora_rank"):
        _write_config(second, {"lora_rank": 4})
        finetuning.parse_finetune_args(["--config", str(first), "--config", str(second)])


CONFIGS = REPO / "recipes" / "configs"


@pytest.mark.parametrize(
    "configs, model, expected_dir, learning_rate, batch_size",
    [
        (["clip_vit_b32"], "openai/clip-vit-base-patch32", "clip-vit-base-patch32_rte_ftlo_asam", 1e-5, 128),
        (["clip_vit_b16"], "openai/clip-vit-base-patch16", "clip-vit-base-patch16_rte_ftlo_asam", 1e-5, 128),
        (["flan_t5_base"], "google/flan-t5-base", "flan-t5-base_rte_ftlo_asam", 1e-5, 16),
        (["clip_vit_b32", "lora"], "openai/clip-vit-base-patch32", "clip-vit-base-patch32_rte_lora_asam", 1e-4, 128),
        (["flan_t5_base", "lora"], "google/flan-t5-base", "flan-t5-base_rte_lora_asam", 1e-4, 16),
    ],
)
def test_shipped_configs_parse(configs, model, expected_dir, learning_rate, batch_size):
    flags = [arg for name in configs for arg in ("--config", str(CONFIGS / f"{name}.yaml"))]
    if "lora" not in configs:
        flags += ["--finetune_mode", "ftlo"]
    # bf16 needs a GPU: the command line turns it off here, as it would override anything else.
    model_args, _, training_args, _ = finetuning.parse_finetune_args([*flags, "--bf16", "false", "--task", "rte"])
    assert model_args.model_name_or_path == model
    assert training_args.max_steps == 8000 and training_args.learning_rate == learning_rate
    assert training_args.per_device_train_batch_size == batch_size
    assert (training_args.sam_mode, training_args.sam_rho) == ("asam", 0.5)
    assert training_args.load_best_model_at_end and training_args.metric_for_best_model == "accuracy"
    assert Path(training_args.output_dir).name == expected_dir
    if "lora" in configs:
        assert (model_args.finetune_mode, model_args.lora_r, model_args.lora_alpha) == ("lora", 16, 32)


# ---- end-to-end runs ------------------------------------------------------------------------------------------


def _assert_reloaded_scores_match(output_dir: Path, task: str, splits: dict[str, int], **kwargs) -> dict:
    """`evaluate_model` on the saved folder reproduces the accuracy the run recorded on each split."""
    results = json.loads((output_dir / "all_results.json").read_text())
    for split, num_samples in splits.items():
        prefix = "eval" if split == "validation" else "test"
        scores = evaluate_model(output_dir, task, split, max_samples=num_samples, progress=False, **kwargs)
        for name, value in scores.items():
            if name != "num_samples":
                assert value == pytest.approx(results[f"{prefix}_{name}"], abs=1e-12), (split, name)
    return results


@pytest.mark.slow
def test_demo_runs_end_to_end_and_its_model_reproduces_the_recorded_accuracy(tmp_path):
    output_dir = tmp_path / "demo"
    command = [
        sys.executable,
        str(RECIPE),
        "--config",
        str(DEMO_CONFIG),
        "--output_dir",
        str(output_dir),
        "--max_steps",
        "12",
        "--eval_steps",
        "6",
        "--save_steps",
        "6",
        "--logging_steps",
        "3",
    ]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    resolved = yaml.safe_load((output_dir / finetuning.RESOLVED_CONFIG_FILE).read_text())
    assert resolved["max_steps"] == 12 and resolved["learning_rate"] == 2e-3 and resolved["task"] == "digits"
    _assert_reloaded_scores_match(
        output_dir, "digits", {"validation": None, "test": None}, batch_size=resolved["per_device_eval_batch_size"]
    )
    assert CLIPVisionClassifier.from_pretrained(output_dir).class_names == DIGIT_NAMES

    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 12 and state["best_model_checkpoint"] is not None
    sam_logs = [entry for entry in state["log_history"] if "sam/sharpness" in entry]
    assert len(sam_logs) == 4 and all(entry["sam/skipped"] == 0 for entry in sam_logs)

    # The fine-tune started from the saved tiny CLIP and moved its vision tower (and nothing else is saved).
    pretrained = CLIPModel.from_pretrained(output_dir / "pretrained").vision_model.state_dict()
    tuned = load_file(output_dir / "model.safetensors")
    assert tuned.keys() == {f"vision_model.{key}" for key in pretrained}
    assert any(not torch.equal(tuned[f"vision_model.{key}"], value) for key, value in pretrained.items())


def _run(output_dir: Path, *flags: str) -> None:
    finetuning.run(
        [
            *flags,
            "--tiny_model_seed",
            "0",
            "--output_dir",
            str(output_dir),
            "--use_cpu",
            "true",
            "--report_to",
            "none",
            "--torch_num_threads",
            "1",
        ]
    )


# Each mode's artifact: what the folder must hold, and what its config says.
_IMAGE_MODE_FILES = {
    "full": {"config.json", "model.safetensors", "zero_shot_head.safetensors", "preprocessor_config.json"},
    "ftlo": {"config.json", "model.safetensors", "zero_shot_head.safetensors", "preprocessor_config.json"},
    "ftts": {"config.json", "model.safetensors", "zero_shot_head.safetensors", "preprocessor_config.json"},
    "lora": {
        "adapter_config.json",
        "adapter_model.safetensors",
        "zero_shot_head.safetensors",
        "preprocessor_config.json",
    },
}


@pytest.mark.parametrize("finetune_mode", ["full", "ftlo", "ftts", "lora"])
def test_image_task_runs_in_every_mode_and_reloads_with_the_recorded_accuracy(tmp_path, finetune_mode):
    output_dir = tmp_path / finetune_mode
    _run(
        output_dir,
        "--task",
        "digits",
        "--finetune_mode",
        finetune_mode,
        "--lora_r",
        "4",
        "--lora_alpha",
        "8",
        "--max_train_samples",
        "64",
        "--max_eval_samples",
        "40",
        "--max_steps",
        "4",
        "--learning_rate",
        "2e-3",
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "16",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "2",
        "--save_steps",
        "2",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "accuracy",
        "--sam_mode",
        "asam",
    )
    assert _IMAGE_MODE_FILES[finetune_mode] <= {path.name for path in output_dir.iterdir()}
    if finetune_mode != "lora":
        config = AutoConfig.from_pretrained(output_dir)
        assert config.architectures == ["CLIPVisionModel"] and config.saft_finetune_mode == finetune_mode
    if finetune_mode == "ftts":
        assert config.saft_base_model == str((output_dir / "pretrained").resolve())
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["best_model_checkpoint"] is not None
    _assert_reloaded_scores_match(output_dir, "digits", {"validation": 40, "test": 40}, batch_size=16)


def _sentiment_rows(n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    good, bad = ["great", "wonderful", "good", "fun"], ["terrible", "boring", "bad", "dull"]
    labels = rng.integers(0, 2, n).tolist()
    sentences = [
        f"the movie was {rng.choice(good if label else bad)} and {rng.choice(['long', 'short'])}" for label in labels
    ]
    return {"sentence": sentences, "label": labels, "idx": list(range(n))}


@pytest.fixture(scope="module")
def sentiment_data(tmp_path_factory):
    """A local SST-2 copy in GLUE's layout (its validation split is the test split here)."""
    data = tmp_path_factory.mktemp("sst2")
    Dataset.from_dict(_sentiment_rows(200, 0)).to_parquet(data / "train.parquet")
    Dataset.from_dict(_sentiment_rows(40, 1)).to_parquet(data / "validation.parquet")
    return data


@pytest.mark.parametrize(
    "finetune_mode, steps, learning_rate",
    [("full", 60, "3e-3"), ("lora", 60, "1e-2"), ("ftlo", 40, "3e-3"), ("ftts", 40, "3e-3")],
)
def test_text_to_text_runs_reload_with_the_recorded_generation_metrics(
    tmp_path, sentiment_data, finetune_mode, steps, learning_rate
):
    output_dir = tmp_path / finetune_mode
    _run(
        output_dir,
        "--task",
        "sst2",
        "--dataset_path",
        str(sentiment_data),
        "--finetune_mode",
        finetune_mode,
        "--max_steps",
        str(steps),
        "--learning_rate",
        learning_rate,
        "--per_device_train_batch_size",
        "16",
        "--per_device_eval_batch_size",
        "16",
        "--logging_steps",
        "20",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        str(steps // 2),
        "--save_steps",
        str(steps // 2),
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "accuracy",
        "--sam_mode",
        "none",
    )
    results = _assert_reloaded_scores_match(
        output_dir,
        "sst2",
        {"validation": None, "test": None},
        dataset_path=str(sentiment_data),
        batch_size=16,
        max_source_length=256,
    )
    assert {"test_accuracy", "test_off_label_fraction", "eval_accuracy"} <= set(results)

    # A second implementation of the score: the models package's generate-and-match, counted with numpy.
    if finetune_mode != "lora":
        model, tokenizer = load_text_to_text_model(output_dir)
        if finetune_mode == "ftts":
            model = load_linearized(output_dir)
        task = get_task("sst2")
        test = task.load(str(sentiment_data))["test"]
        predicted = np.array(predict_label_words(model, tokenizer, task.format_inputs(test[:]), task.label_words, 16))
        assert float(np.mean(predicted == np.array(test["label"]))) == results["test_accuracy"]
        assert float(np.mean(predicted == NOT_A_LABEL_WORD)) == results["test_off_label_fraction"]
    # The tiny T5 has learnt to answer with label words, so the matching maps real label-word outputs.
    assert results["test_off_label_fraction"] < 0.5


def test_image_task_runs_on_local_copy_of_a_hub_dataset(tmp_path):
    rng = np.random.default_rng(0)
    eurosat = get_task("eurosat")
    features = Features({"image": Image(), "label": ClassLabel(names=list(eurosat.class_names))})

    def rows(n):
        images = [PILImage.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(n)]
        return Dataset.from_dict({"image": images, "label": [i % 10 for i in range(n)]}, features=features)

    DatasetDict(train=rows(30), test=rows(10)).save_to_disk(tmp_path / "eurosat")
    output_dir = tmp_path / "run"
    _run(
        output_dir,
        "--task",
        "eurosat",
        "--dataset_path",
        str(tmp_path / "eurosat"),
        "--max_steps",
        "2",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "8",
        "--save_strategy",
        "no",
    )
    model = CLIPVisionClassifier.from_pretrained(output_dir)
    assert model.class_names == eurosat.class_names and model.templates == eurosat.templates
    _assert_reloaded_scores_match(
        output_dir, "eurosat", {"validation": None, "test": None}, dataset_path=str(tmp_path / "eurosat"), batch_size=8
    )


# ---- best-on-validation checkpoint selection ----------------------------------------------------------------------


PHASE_ONE_STEPS, BATCH = 3, 32


def _two_phase_splits(source: str | None) -> DatasetDict:
    """Digits images whose training stream (read in order) teaches class 1 for the first 3 steps, then class 0;
    validation and test are all class 1. Validation accuracy peaks at the first checkpoint, then falls."""
    digits = get_task("digits_parity").load()

    def relabel(dataset: Dataset, label_of_row) -> Dataset:
        return dataset.remove_columns("label").add_column("label", [label_of_row(i) for i in range(len(dataset))])

    return DatasetDict(
        train=relabel(digits["train"], lambda i: int(i < PHASE_ONE_STEPS * BATCH)),
        validation=relabel(digits["validation"], lambda i: 1),
        test=relabel(digits["test"], lambda i: 1),
    )


TWO_PHASE = register_task(
    ImageClassificationTask(
        "test_digits_two_phase", ("even", "odd"), get_task("digits_parity").templates, _two_phase_splits
    )
)


def test_best_checkpoint_is_the_best_on_validation_not_the_last(tmp_path):
    output_dir = tmp_path / "best"
    _run(
        output_dir,
        "--task",
        TWO_PHASE.name,
        "--train_sampling_strategy",
        "sequential",
        "--max_eval_samples",
        "60",
        "--max_steps",
        "12",
        "--learning_rate",
        "3e-3",
        "--lr_scheduler_type",
        "constant",
        "--per_device_train_batch_size",
        str(BATCH),
        "--per_device_eval_batch_size",
        "60",
        "--eval_strategy",
        "steps",
        "--eval_steps",
        "3",
        "--save_steps",
        "3",
        "--load_best_model_at_end",
        "true",
        "--metric_for_best_model",
        "accuracy",
        "--sam_mode",
        "none",
    )
    state = json.loads((output_dir / "trainer_state.json").read_text())
    # trainer_state.json is written when training ends, before the final evaluations.
    evals = {entry["step"]: entry["eval_accuracy"] for entry in state["log_history"] if "eval_accuracy" in entry}
    assert sorted(evals) == [3, 6, 9, 12]
    assert evals[3] == 1.0 and evals[12] == 0.0  # the construction worked: the last checkpoint is the worst
    best_step = min(step for step, accuracy in evals.items() if accuracy == max(evals.values()))  # first of ties
    assert state["best_model_checkpoint"] == str(output_dir / f"checkpoint-{best_step}")
    best = load_file(output_dir / f"checkpoint-{best_step}" / "model.safetensors")
    final = load_file(output_dir / "model.safetensors")
    assert best.keys() == final.keys() and all(torch.equal(best[key], final[key]) for key in best)
    results = json.loads((output_dir / "all_results.json").read_text())
    assert results["eval_accuracy"] == 1.0 and results["test_accuracy"] == 1.0
