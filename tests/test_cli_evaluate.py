"""`saft-hf evaluate`: the table row and JSON equal `evaluate_model`'s scores; bad options fail before any model or
dataset is loaded, in one line."""

from __future__ import annotations

import json

import pytest

from saft_hf.cli import main as cli_main
from saft_hf.evaluation import evaluate_model
from saft_hf.testing import save_tiny_clip

TASKS = ("digits", "digits_parity")


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip") / "tiny_clip", seed=0)


def test_table_row_and_json_are_the_scores(clip_dir, tmp_path, capsys):
    output = tmp_path / "scores" / "tiny.json"
    argv = [
        "evaluate",
        str(clip_dir),
        "--task",
        TASKS[0],
        "--task",
        TASKS[1],
        "--max_samples",
        "40",
        "--output",
        str(output),
        "--no_progress",
    ]
    assert cli_main(argv) == 0
    expected = {task: evaluate_model(clip_dir, task, "test", max_samples=40, progress=False) for task in TASKS}
    accuracies = [100 * expected[task]["accuracy"] for task in TASKS]
    average = sum(accuracies) / 2
    assert capsys.readouterr().out.splitlines() == [
        "### Accuracy (%) on the test split",
        "",
        "| model | digits | digits_parity | avg |",
        "|---|---:|---:|---:|",
        f"| {clip_dir} | {accuracies[0]:.2f} | {accuracies[1]:.2f} | {average:.2f} |",
    ]
    scores = json.loads(output.read_text())
    assert scores["tasks"] == expected and scores["average_accuracy"] == pytest.approx(average / 100)
    assert (scores["format"], scores["split"], scores["max_samples"]) == ("saft_hf.evaluation", "test", 40)
    assert expected["digits"]["num_samples"] == 40
    # A later run may replace its own output.
    assert cli_main([*argv[:4], "--max_samples", "10", "--output", str(output), "--no_progress"]) == 0
    assert json.loads(output.read_text())["tasks"]["digits"]["num_samples"] == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--task", "digitz"], "Unknown task 'digitz'. Registered tasks: "),
        (["--task", "digits", "--task", "digits"], "--task: each task once, got ['digits', 'digits']"),
        (["--task", "digits", "--split", "dev"], "--split must be one of train, validation, test, got 'dev'"),
        (["--task", "digits", "--dataset_path", "digits"], "--dataset_path 'digits': expected TASK=PATH"),
        (
            ["--task", "digits", "--dataset_path", "cola=/data"],
            "--dataset_path 'cola=/data': task 'cola' is not one of the --task options ['digits']",
        ),
    ],
)
def test_bad_options_fail_in_one_line_before_loading(tmp_path, capsys, options, message):
    # The model does not exist: every error here must come before it is looked at.
    assert cli_main(["evaluate", str(tmp_path / "no_model"), *options]) == 1
    error = capsys.readouterr().err
    assert error.startswith(f"saft-hf: error: {message}") and error.count("\n") == 1


def test_max_samples_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["evaluate", "model", "--task", "digits", "--max_samples", "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.endswith("saft-hf evaluate: error: argument --max_samples: must be >= 1, got 0\n")


def test_output_it_did_not_write_is_left_alone(tmp_path, capsys):
    output = tmp_path / "notes.json"
    output.write_text('{"mine": 1}')
    assert cli_main(["evaluate", str(tmp_path / "no_model"), "--task", "digits", "--output", str(output)]) == 1
    assert capsys.readouterr().err == (
        f"saft-hf: error: --output {output}: exists and was not written by saft-hf evaluate; choose another file or "
        "remove it\n"
    )
    assert output.read_text() == '{"mine": 1}'
    assert cli_main(["evaluate", str(tmp_path / "no_model"), "--task", "digits", "--output", str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"saft-hf: error: --output {tmp_path}: is a folder; name a .json file\n"


def test_model_and_output_are_checked_before_anything_is_loaded(clip_dir, tmp_path, capsys):
    vector = tmp_path / "tv"
    vector.mkdir()
    (vector / "task_vector.safetensors").write_bytes(b"")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["evaluate", str(tmp_path / "none")], f"MODEL {tmp_path / 'none'}: no such model folder (and not a Hub id)"),
        (["evaluate", str(vector)], f"MODEL {vector}: holds a task vector, not a model; score the model it applies"),
        (
            ["evaluate", str(clip_dir), "--output", str(tmp_path / "afile" / "x.json")],
            f"--output {tmp_path / 'afile' / 'x.json'}: {tmp_path / 'afile'} is a file, not a folder",
        ),
        (
            ["evaluate", str(clip_dir), "--base", str(tmp_path / "nobase")],
            f"--base {tmp_path / 'nobase'}: no such model folder",
        ),
        # A Hub id, with the Hub out of reach (the suite runs offline): it was transformers' OSError traceback.
        (["evaluate", "nosuch/model"], "Model 'nosuch/model' is not a local folder, and the Hub"),
    ]
    for argv, message in cases:
        assert cli_main([*argv, "--task", "digits", "--no_progress"]) == 1  # these used to be tracebacks or late
        error = capsys.readouterr().err
        assert error.startswith(f"saft-hf: error: {message}") and error.count("\n") == 1, error
