"""saft_hf.experiments and recipes/{vision8,glue_t2t}.py: the table math against hand-computed numbers, resumability
(a second run trains, merges and scores nothing and writes the same tables), and both recipes end to end on tiny
models offline, their scores checked against `evaluate_model` run directly on the written folders."""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from recipe_loader import RECIPES, import_recipe
from safetensors.torch import load_file
from transformers import CLIPModel

from saft_hf.evaluation import evaluate_model
from saft_hf.experiments import (
    FINETUNED,
    PRETRAINED,
    ExperimentConfig,
    Family,
    Score,
    normalized_accuracy,
    pipeline,
    summary_rows,
)
from saft_hf.experiments.pipeline import finetune_argv, is_finetuned
from saft_hf.experiments.tables import to_markdown
from saft_hf.finetuning import parse_finetune_args
from saft_hf.finetuning import run as run_finetune
from saft_hf.task_vectors import TaskVector
from saft_hf.testing import save_tiny_clip, save_tiny_t5

REPO = Path(__file__).resolve().parents[1]


# ---- table math ---------------------------------------------------------------------------------------------------


def _scores():
    return [
        Score("", PRETRAINED, "", "a", 0.5),
        Score("", PRETRAINED, "", "b", 0.25),
        Score("sgd", FINETUNED, "", "a", 0.8),
        Score("sgd", FINETUNED, "", "b", 0.5),
        Score("saft", FINETUNED, "", "a", 0.9),
        Score("saft", FINETUNED, "", "b", 0.4),
        Score("sgd", "task_arithmetic", "searched", "a", 0.6),
        Score("sgd", "task_arithmetic", "searched", "b", 0.45),
        Score("saft", "task_arithmetic", "searched", "a", 0.72),
        Score("saft", "task_arithmetic", "searched", "b", 0.4),
    ]


def test_normalized_accuracy_divides_by_the_same_family_and_tasks_own_finetune():
    normalized = normalized_accuracy(_scores())
    assert all(math.isnan(value) for value in normalized[:2])  # pre-trained: no reference
    assert normalized[2:6] == [1.0, 1.0, 1.0, 1.0]
    assert normalized[6:] == pytest.approx([0.6 / 0.8, 0.45 / 0.5, 0.72 / 0.9, 0.4 / 0.4])


@pytest.mark.parametrize(
    "method, family, expected",
    [  # per task absolute (%), per task normalized (%), avg, avg (norm): by hand
        (PRETRAINED, "", [50.0, 25.0, math.nan, math.nan, 37.5, math.nan]),
        (FINETUNED, "saft", [90.0, 40.0, 100.0, 100.0, 65.0, 100.0]),
        ("task_arithmetic", "sgd", [60.0, 45.0, 75.0, 90.0, 52.5, 82.5]),
        ("task_arithmetic", "saft", [72.0, 40.0, 80.0, 100.0, 56.0, 90.0]),
    ],
)
def test_summary_rows_match_hand_computed_percentages(method, family, expected):
    rows = summary_rows(_scores(), ["a", "b"])
    row = next(r for r in rows if r["method"] == method and r["family"] == family)
    values = [row[c] for c in ("a", "b", "a (norm)", "b (norm)", "avg", "avg (norm)")]
    assert values == pytest.approx(expected, nan_ok=True)


def test_markdown_table_renders_two_decimals_and_dashes_for_missing_values():
    text = to_markdown(summary_rows(_scores(), ["a", "b"])[:1], "T")
    assert text.splitlines()[0] == "### T"
    assert "| pre-trained |  |  | 50.00 | 25.00 | — | — | 37.50 | — |" in text


def test_summary_rows_name_a_missing_task():
    with pytest.raises(ValueError, match="pre-trained//: no score for task\\(s\\) c"):
        summary_rows(_scores(), ["a", "b", "c"])


@pytest.mark.parametrize(
    "values, message",
    [
        ({"tasks": ["a"]}, "at least two distinct tasks"),
        ({"families": [{"name": "x", "sam_mode": "adam"}]}, "families.x.sam_mode"),
        ({"families": [{"name": "x", "finetuned": "org/model"}]}, "must contain \\{task\\}"),
        ({"merge_methods": ["nope"]}, "nope"),
        ({"dataset_paths": {"c": "/data"}}, "dataset_paths"),
        ({"colour": 1}, "unknown field\\(s\\) colour"),
    ],
)
def test_config_errors_name_the_field(tmp_path, values, message):
    base = {
        "base_model": "m",
        "tasks": ["a", "b"],
        "families": [{"name": "sgd", "sam_mode": "none"}],
        "output_dir": str(tmp_path),
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(base | values))
    with pytest.raises((ValueError, KeyError), match=message):
        ExperimentConfig.from_yaml(path)


def test_shipped_configs_hold_the_paper_settings():
    vision = ExperimentConfig.from_yaml(RECIPES / "configs" / "vision8.yaml")
    assert vision.base_model == "openai/clip-vit-base-patch32" and vision.fixed_alpha == 0.4
    assert sorted(vision.tasks) == ["cars", "dtd", "eurosat", "gtsrb", "mnist", "resisc45", "sun397", "svhn"]
    sgd = vision.families[0]
    assert sgd.finetuned_model("cars") == "tanganke/clip-vit-base-patch32_stanford-cars"
    assert sgd.finetuned_model("dtd") == "tanganke/clip-vit-base-patch32_dtd"
    glue = ExperimentConfig.from_yaml(RECIPES / "configs" / "glue_t2t.yaml")
    assert (glue.base_model, glue.tasks, glue.merge_methods) == (
        "google/flan-t5-base",
        ["cola", "mrpc", "rte", "sst2"],
        ["task_arithmetic"],
    )
    argv = finetune_argv(glue, glue.families[1], "rte", Path("out"))
    assert Path(argv[0].removeprefix("--config=")) == RECIPES / "configs" / "flan_t5_base.yaml"
    _, data_args, training_args, _ = parse_finetune_args(argv + ["--bf16", "false"])  # this machine has no GPU
    assert (data_args.task, training_args.sam_mode, training_args.learning_rate, training_args.max_steps) == (
        "rte",
        "asam",
        1e-5,
        8000,
    )


# ---- vision8 end to end, resumable ---------------------------------------------------------------------------------

TINY_FINETUNE = (
    "--max_steps 4 --per_device_train_batch_size 16 --per_device_eval_batch_size 64 --learning_rate 3e-3 "
    "--eval_strategy no --save_strategy no --load_best_model_at_end false --bf16 false "
    "--dataloader_num_workers 0 --use_cpu true --logging_steps 2 --disable_tqdm true"
)


@pytest.fixture(scope="module")
def vision_run(tmp_path_factory):
    """recipes/vision8.py on a tiny CLIP, two digits tasks, a fine-tuned SAFT family and a `pulled` plain family
    (existing CLIPVisionModel fine-tunes named by a template with a task-id map, like the public tanganke ones)."""
    root = tmp_path_factory.mktemp("vision8")
    base = save_tiny_clip(root / "base", seed=0)
    clip = CLIPModel.from_pretrained(base)
    for seed, task_id in ((1, "low"), (2, "high")):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for parameter in clip.vision_model.parameters():
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
        clip.vision_model.save_pretrained(root / f"public_{task_id}")  # saved as a CLIPVisionModel folder
    config = yaml.safe_load((RECIPES / "configs" / "vision8.yaml").read_text())
    config["families"] = [
        {
            "name": "sgd",
            "sam_mode": "none",
            "finetuned": str(root / "public_{task}"),
            "task_ids": {"digits_0to4": "low", "digits_5to9": "high"},
        },
        {"name": "saft", "sam_mode": "asam"},
    ]
    config["search_grid"] = {"task_arithmetic": {"alpha": [0.3, 1.0]}, "ties": {"alpha": [1.0], "density": [0.2, 0.5]}}
    config["finetune_configs"] = [str(RECIPES / "configs" / "clip_vit_b32.yaml")]
    config_path = root / "vision8.yaml"
    config_path.write_text(yaml.safe_dump(config))
    vision8 = import_recipe("vision8")
    argv = [
        "--config",
        str(config_path),
        "--base_model",
        str(base),
        "--output_dir",
        str(root / "out"),
        "--tasks",
        "digits_0to4",
        "digits_5to9",
        "--eval_max_samples",
        "48",
        "--finetune_args",
        TINY_FINETUNE + " --torch_num_threads 1",
    ]
    calls = []

    def counting_finetune(args):
        calls.append(args)
        run_finetune(args)

    result = _run_with(vision8, argv, counting_finetune)
    return root, base, argv, vision8, result, calls


def _run_with(recipe, argv, finetune_fn):
    """`recipe.main(argv)` with the pipeline fine-tuning through `finetune_fn` (the fixture is module-scoped, so
    no `monkeypatch`)."""
    original = pipeline.run_finetune
    pipeline.run_finetune = finetune_fn
    try:
        return recipe.main(argv)
    finally:
        pipeline.run_finetune = original


@pytest.mark.slow
def test_vision8_tables_have_every_method_setting_and_family(vision_run):
    root, _, _, _, result, calls = vision_run
    assert len(calls) == 2 and all("--sam_mode" in c and c[c.index("--sam_mode") + 1] == "asam" for c in calls)
    assert set(result.tables) == {"table_merged_searched", "table_merged_alpha0.4"}
    searched = (root / "out" / "table_merged_searched.csv").read_text().splitlines()
    keys = [tuple(line.split(",")[:3]) for line in searched[1:]]
    assert keys == [
        ("pre-trained", "", ""),
        ("fine-tuned", "", "sgd"),
        ("fine-tuned", "", "saft"),
        ("weight_average", "-", "sgd"),
        ("task_arithmetic", "searched", "sgd"),
        ("ties", "searched", "sgd"),
        ("weight_average", "-", "saft"),
        ("task_arithmetic", "searched", "saft"),
        ("ties", "searched", "saft"),
    ]
    fixed = (root / "out" / "table_merged_alpha0.4.csv").read_text()
    assert "task_arithmetic,alpha=0.4,saft" in fixed and "ties,alpha=0.4,sgd" in fixed


@pytest.mark.slow
def test_vision8_scores_equal_evaluate_model_on_the_written_folders(vision_run):
    root, base, _, _, result, _ = vision_run
    scores = {
        (s["family"], s["method"], s["setting"], s["task"]): s
        for s in json.loads((root / "out" / "scores.json").read_text())
    }
    options = dict(max_samples=48, progress=False, base=str(base))
    merged = result.merged[("saft", "ties", "searched")]
    recipe = yaml.safe_load((merged / "merge_config.yaml").read_text())
    assert recipe["parameters"]["density"] in (0.2, 0.5) and (merged / "README.md").is_file()
    for task in ("digits_0to4", "digits_5to9"):
        direct = evaluate_model(merged, task, "test", **options)["accuracy"]
        tuned = evaluate_model(root / "out" / "finetuned" / "saft" / task, task, "test", **options)["accuracy"]
        pulled = evaluate_model(root / f"public_{'low' if task == 'digits_0to4' else 'high'}", task, "test", **options)
        row = scores[("saft", "ties", "searched", task)]
        assert row["accuracy"] == direct
        assert row["normalized_accuracy"] == pytest.approx(direct / tuned)
        assert scores[("sgd", FINETUNED, "", task)]["accuracy"] == pulled["accuracy"]
    # The task vectors saved are fine-tuned minus base, with the family's settings recorded.
    vector = TaskVector.load(result.task_vectors["saft"]["digits_5to9"])
    assert (vector.metadata["task"], vector.metadata["sam_mode"]) == ("digits_5to9", "asam")
    expected = TaskVector.from_models(base, root / "out" / "finetuned" / "saft" / "digits_5to9")
    assert all(torch.equal(vector[name], expected[name]) for name in expected)


@pytest.mark.slow
def test_vision8_rerun_trains_merges_and_scores_nothing_and_writes_the_same_tables(vision_run, monkeypatch):
    root, _, argv, vision8, result, _ = vision_run
    out = root / "out"
    before = {path: path.stat().st_mtime_ns for path in out.rglob("*") if "table_" not in path.name}
    tables = {stem: path.read_text() for stem, path in result.tables.items()}

    def no_training(args):
        raise AssertionError(f"retrained: {args}")

    def no_scoring(*args, **kwargs):
        raise AssertionError("re-scored a model")

    monkeypatch.setattr("saft_hf.experiments.pipeline.evaluate_model", no_scoring)
    monkeypatch.setattr("saft_hf.experiments.pipeline.search_coefficients", no_scoring)
    again = _run_with(vision8, argv, no_training)
    assert {stem: path.read_text() for stem, path in again.tables.items()} == tables
    changed = [
        str(p)
        for p, mtime in before.items()
        if p.exists() and p.stat().st_mtime_ns != mtime and p.name != "scores.json"
    ]
    assert changed == []
    assert is_finetuned(out / "finetuned" / "saft" / "digits_0to4")


def test_an_unfinished_finetune_is_not_taken_for_a_finished_one(tmp_path):
    (tmp_path / "all_results.json").write_text(json.dumps({"train_loss": 1.0}))
    assert not is_finetuned(tmp_path)
    (tmp_path / "all_results.json").write_text(json.dumps({"train_loss": 1.0, "test_accuracy": 0.5}))
    assert is_finetuned(tmp_path)


@pytest.mark.slow
def test_a_lora_family_runs_through_the_pipeline_and_the_study(tmp_path):
    """A LoRA family: adapters scored as adapters, task vectors the dense deltas B @ A * scaling, merges of them
    plain models (checked tensor by tensor against the adapter files) scored as evaluate_model scores the
    hand-built model, and the study's grid-neighbour scores likewise."""
    from saft_hf.experiments.pipeline import run_experiment
    from saft_hf.experiments.study import SMOOTHED, grid_neighbour_scores

    base = save_tiny_clip(tmp_path / "base", seed=0)
    tasks = ["digits_0to4", "digits_5to9"]
    lora_flags = ["--lora_r", "4", "--lora_alpha", "8", "--max_train_samples", "64"]
    config = ExperimentConfig(
        base_model=str(base),
        tasks=tasks,
        output_dir=str(tmp_path / "out"),
        families=[Family("lora", sam_mode="none", finetune_mode="lora", finetune_args=lora_flags)],
        finetune_args=TINY_FINETUNE.replace("3e-3", "3e-2").split(),
        merge_methods=["task_arithmetic"],
        fixed_alpha=0.4,
        search_grid={"task_arithmetic": {"alpha": [0.5, 1.0]}},
        eval_max_samples=24,
    )
    result = run_experiment(config, quiet=True)
    out = tmp_path / "out"
    base_state = load_file(base / "model.safetensors")
    deltas = {task: TaskVector.from_lora(base, out / "finetuned" / "lora" / task) for task in tasks}
    options = dict(max_samples=24, progress=False, base=str(base))

    def hand_merged(alpha):
        """base + alpha * sum over tasks of B @ A * lora_alpha / r, read from the adapter files by hand."""
        merged = {name: tensor.double() for name, tensor in base_state.items()}
        scaling = 8 / 4  # --lora_alpha / --lora_r
        for task in tasks:
            adapter = load_file(out / "finetuned" / "lora" / task / "adapter_model.safetensors")
            for key, a in adapter.items():
                if ".lora_A." in key:
                    name = key.removeprefix("base_model.model.").replace(".lora_A.weight", ".weight")
                    b = adapter[key.replace(".lora_A.", ".lora_B.")]
                    merged[name] += alpha * (b.double() @ a.double()) * scaling
        return {name: tensor.float() for name, tensor in merged.items()}

    scores = {(s.method, s.setting, s.task): s for s in result.scores}
    for task in tasks:  # the fine-tunes are scored as adapters on the base
        direct = evaluate_model(out / "finetuned" / "lora" / task, task, "test", **options)
        assert scores[(FINETUNED, "", task)].accuracy == direct["accuracy"]
        saved = TaskVector.load(result.task_vectors["lora"][task])
        assert saved.metadata["finetune_mode"] == "lora" and sorted(saved) == sorted(deltas[task])
    for setting in ("searched", "alpha=0.4"):
        folder = result.merged[("lora", "task_arithmetic", setting)]
        alpha = yaml.safe_load((folder / "merge_config.yaml").read_text())["parameters"]["alpha"]
        expected, actual = hand_merged(alpha), load_file(folder / "model.safetensors")
        assert actual.keys() == expected.keys()
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=1e-6)
        assert any(not torch.equal(actual[name], base_state[name]) for name in deltas[tasks[0]])
        assert json.loads((folder / "config.json").read_text())["saft_finetune_mode"] == "lora"
        for task in tasks:  # scored as the plain model it is
            direct = evaluate_model(base, task, "test", state_dict=expected, **options)
            assert scores[("task_arithmetic", setting, task)].accuracy == direct["accuracy"]
    assert scores[("task_arithmetic", "alpha=0.4", tasks[0])].parameters == {"alpha": 0.4}

    # The study's smoothing: the searched alpha's test score averaged with its grid neighbour's, merged by hand.
    chosen = scores[("task_arithmetic", "searched", tasks[0])].parameters["alpha"]
    neighbour = 1.0 if chosen == 0.5 else 0.5
    smoothed = {s.task: s.accuracy for s in grid_neighbour_scores(config, result) if s.setting == SMOOTHED}
    for task in tasks:
        other = evaluate_model(base, task, "test", state_dict=hand_merged(neighbour), **options)["accuracy"]
        assert smoothed[task] == pytest.approx((scores[("task_arithmetic", "searched", task)].accuracy + other) / 2)


# ---- glue_t2t end to end ----------------------------------------------------------------------------------------


def _glue_folder(root: Path, columns: dict, n_train: int, n_test: int) -> Path:
    root.mkdir(parents=True)
    Dataset.from_dict({k: v[:n_train] for k, v in columns.items()}).to_parquet(root / "train.parquet")
    Dataset.from_dict({k: v[n_train : n_train + n_test] for k, v in columns.items()}).to_parquet(
        root / "validation.parquet"
    )
    return root


@pytest.mark.slow
def test_glue_t2t_end_to_end_on_tiny_t5_with_label_word_confusion(tmp_path, capsys):
    n = 60
    labels = [i % 2 for i in range(n)]
    sst2 = _glue_folder(
        tmp_path / "sst2",
        {
            "sentence": [["a terrible film", "the movie was great"][y] for y in labels],
            "label": labels,
            "idx": list(range(n)),
        },
        48,
        12,
    )
    rte = _glue_folder(
        tmp_path / "rte",
        {
            "sentence1": ["the movie was great"] * n,
            "sentence2": [["it was good", "it was terrible"][y] for y in labels],
            "label": labels,
            "idx": list(range(n)),
        },
        48,
        12,
    )
    base = save_tiny_t5(tmp_path / "t5", seed=0)
    config = yaml.safe_load((RECIPES / "configs" / "glue_t2t.yaml").read_text())
    config["families"] = [
        config["families"][0],
        config["families"][1],
        {"name": "ftts", "sam_mode": "none", "finetune_mode": "ftts"},
    ]
    config["finetune_configs"] = [str(RECIPES / "configs" / "flan_t5_base.yaml")]
    config["search_grid"] = {"task_arithmetic": {"alpha": [0.5, 1.0]}}
    config_path = tmp_path / "glue.yaml"
    config_path.write_text(yaml.safe_dump(config))
    glue = import_recipe("glue_t2t")
    result = glue.main(
        [
            "--config",
            str(config_path),
            "--base_model",
            str(base),
            "--output_dir",
            str(tmp_path / "out"),
            "--tasks",
            "sst2",
            "rte",
            "--dataset_path",
            f"sst2={sst2}",
            "--dataset_path",
            f"rte={rte}",
            "--finetune_args",
            TINY_FINETUNE.replace("3e-3", "1e-2") + " --max_steps 6",
        ]
    )
    rows = (tmp_path / "out" / "table_merged_searched.csv").read_text().splitlines()
    assert [line.split(",")[:3] for line in rows[1:]] == [
        ["pre-trained", "", ""],
        ["fine-tuned", "", "sgd"],
        ["fine-tuned", "", "saft"],
        ["fine-tuned", "", "ftts"],
        ["task_arithmetic", "searched", "sgd"],
        ["task_arithmetic", "searched", "saft"],
        ["task_arithmetic", "searched", "ftts"],
    ]
    # The FTTS family's merge records its mode, so it is scored with the linearised forward.
    assert (
        json.loads((result.merged[("ftts", "task_arithmetic", "searched")] / "config.json").read_text())[
            "saft_finetune_mode"
        ]
        == "ftts"
    )
    scores = json.loads((tmp_path / "out" / "scores.json").read_text())
    merged = result.merged[("saft", "task_arithmetic", "searched")]
    for task, data in (("sst2", sst2), ("rte", rte)):
        direct = evaluate_model(merged, task, "test", dataset_path=str(data), progress=False)
        row = next(s for s in scores if (s["family"], s["method"], s["task"]) == ("saft", "task_arithmetic", task))
        assert row["accuracy"] == direct["accuracy"]
        assert row["extra"]["off_label_fraction"] == direct["off_label_fraction"]
        # Another task's label word is never the task's own, so it is one of the off-label outputs.
        assert 0.0 <= row["extra"]["other_task_label_fraction"] <= row["extra"]["off_label_fraction"]
    assert (tmp_path / "out" / "label_words.md").is_file()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--dataset_path", "sst2"], "--dataset_path 'sst2': expected TASK=PATH"),
        (["--families", "sgd", "adam"], "--families: \\['adam'\\] are not families"),
        (["--tasks", "sst2"], "at least two distinct tasks"),
    ],
)
def test_recipe_overrides_are_checked(flags, message):
    from saft_hf.experiments.config import config_from_args, parse_experiment_args

    args = parse_experiment_args(flags, RECIPES / "configs" / "glue_t2t.yaml")
    with pytest.raises(ValueError, match=message):
        config_from_args(args)


def test_recipe_overrides_apply_on_top_of_the_config():
    from saft_hf.experiments.config import config_from_args, parse_experiment_args

    args = parse_experiment_args(
        [
            "--tasks",
            "sst2",
            "rte",
            "--families",
            "saft",
            "--dataset_path",
            "sst2=/data/s",
            "--dataset_path",
            "rte=/data/rte",
            "--finetune_args",
            "--max_steps 3 --learning_rate 1e-3",
            "--output_dir",
            "/tmp/x",
        ],
        RECIPES / "configs" / "glue_t2t.yaml",
    )
    config = config_from_args(args)
    assert (config.tasks, [f.name for f in config.families], config.dataset_paths) == (
        ["sst2", "rte"],
        ["saft"],
        {"sst2": "/data/s", "rte": "/data/rte"},
    )
    argv = finetune_argv(config, config.families[0], "rte", Path("/tmp/x/run"))
    assert argv[-4:] == ["--max_steps", "3", "--learning_rate", "1e-3"]
    assert argv[argv.index("--dataset_path") + 1] == "/data/rte" and config.output_dir == "/tmp/x"


# ---- resumable by content ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_rerun_redoes_exactly_the_stages_whose_settings_changed(tmp_path, caplog, monkeypatch):
    from saft_hf.experiments.demo import pretrain_tiny_clip, register_demo_tasks
    from saft_hf.experiments.pipeline import run_experiment

    register_demo_tasks()
    base = pretrain_tiny_clip(tmp_path / "pretrained", max_steps=2, batch_size=16)
    calls = []

    def counting_finetune(argv):
        calls.append(argv[argv.index("--output_dir") + 1])
        run_finetune(argv)

    monkeypatch.setattr(pipeline, "run_finetune", counting_finetune)

    def experiment(saft_flags):
        config = ExperimentConfig(
            base_model=str(base),
            tasks=["demo_parity", "demo_small_large"],
            output_dir=str(tmp_path / "out"),
            families=[Family("sgd", sam_mode="none"), Family("saft", sam_mode="asam", finetune_args=saft_flags)],
            finetune_args=TINY_FINETUNE.split(),
            merge_methods=["task_arithmetic"],
            fixed_alpha=None,
            search_grid={"task_arithmetic": {"alpha": [0.5, 1.0]}},
            eval_max_samples=32,
        )
        return run_experiment(config, quiet=True)

    experiment(["--learning_rate", "3e-3"])
    assert len(calls) == 4
    out = tmp_path / "out"
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*.safetensors")}

    calls.clear()
    experiment(["--learning_rate", "3e-3"])  # same settings: nothing is redone
    assert calls == [] and all(path.stat().st_mtime_ns == stamp for path, stamp in stamps.items())

    calls.clear()
    again = experiment(["--learning_rate", "1e-2"])  # one family's settings change
    assert sorted(Path(c).relative_to(out).as_posix() for c in calls) == [
        "finetuned/saft/demo_parity",
        "finetuned/saft/demo_small_large",
    ]
    assert "demo_parity was made with other settings (argv: 3e-3 -> 1e-2): redoing it" in caplog.text
    changed = {path.relative_to(out).parts[:2] for path, stamp in stamps.items() if path.stat().st_mtime_ns != stamp}
    # The changed fine-tunes and everything built on them (task vectors, merges) were redone; sgd's were reused.
    assert changed == {("finetuned", "saft"), ("task_vectors", "saft"), ("merged", "saft")}
    # Scores follow the redone models, not the cache entries of the old ones.
    saft = {s.task: s.accuracy for s in again.scores if (s.family, s.method) == ("saft", FINETUNED)}
    for task, accuracy in saft.items():
        direct = evaluate_model(out / "finetuned" / "saft" / task, task, "test", max_samples=32, progress=False)
        assert accuracy == direct["accuracy"]
