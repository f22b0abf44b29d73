"""Every user error is one line: `saft-hf` and the recipes print `<prog>: error: <message>` naming the field or
file and exit with status 1 (130 on Ctrl-C, 143 on SIGTERM), with a traceback only under `--debug` or
`SAFT_HF_DEBUG=1`; a bug keeps its traceback. recipes/finetune.py checks everything before it writes anything, and
never writes into a folder holding another run."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import pytest
import torch
import yaml
from huggingface_hub.utils import hf_raise_for_status
from merge_fixtures import clip_vision_family
from safetensors.torch import save_file

from saft_hf.cli import main as cli_main
from saft_hf.entrypoint import run_main
from saft_hf.errors import PushError, UnsafeOutputError
from saft_hf.finetuning import check_output_dir, check_resume_checkpoint
from saft_hf.io import ShardedSafetensorsWriter, TensorSpec

REPO = Path(__file__).resolve().parents[1]
FINETUNE = REPO / "recipes" / "finetune.py"
DEMO_CONFIG = REPO / "recipes" / "configs" / "demo.yaml"
ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "SAFT_HF_DEBUG"} | {
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "PYTHONPATH": str(REPO),
    "OMP_NUM_THREADS": "1",
}
# transformers prints this on the first use of CLIPImageProcessor where torchvision is not installed (a tiny CLIP
# built from a config uses it): a note about the environment, not an error of the run.
TORCHVISION_NOTE = "requires torchvision (not installed)"


def _run(*args: str, environment: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env=ENVIRONMENT | (environment or {}),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if TORCHVISION_NOTE not in line]


def _assert_one_line(stderr: str, prefix: str, *parts: str) -> str:
    """stderr is one line starting with `prefix` and holding every part; no traceback."""
    lines = _error_lines(stderr)
    assert len(lines) == 1 and lines[0].startswith(prefix), stderr
    assert "Traceback" not in stderr
    for part in parts:
        assert part in lines[0], (part, lines[0])
    return lines[0]


# ---- the runner ------------------------------------------------------------------------------------------------


def _raising(error: BaseException):
    def main(argv):
        raise error

    return main


def _hub_error(status: int, url: str, **headers: str) -> Exception:
    request = httpx2.Request("GET", url, headers={"authorization": "Bearer hf_SeCrEtToKeN"})
    try:
        hf_raise_for_status(httpx2.Response(status, request=request, headers=headers))
    except Exception as error:
        return error
    raise AssertionError("hf_raise_for_status accepted an error status")


@pytest.mark.parametrize(
    "error, expected",
    [
        (ValueError("sam_rho must be >= 0,\n  got -1."), "tool: error: sam_rho must be >= 0, got -1."),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "in/x.yaml"),
            "tool: error: [Errno 2] No such file or directory: 'in/x.yaml'",
        ),
        (
            UnsafeOutputError("out: holds another run; choose another output_dir"),
            "tool: error: out: holds another run; choose another output_dir",
        ),
        (
            PushError("upload to org/m failed; the merge is complete in out/m"),
            "tool: error: upload to org/m failed; the merge is complete in out/m",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device", "/data/out/model.safetensors"),
            "tool: error: /data/out/model.safetensors: no space left on device: "
            "free space or choose another output_dir",
        ),
        (
            OSError(errno.EDQUOT, "Disk quota exceeded", "/data/out"),
            "tool: error: /data/out: disk quota exceeded: free space or choose another output_dir",
        ),
        (
            OSError(errno.EROFS, "Read-only file system", "/ro/out"),
            "tool: error: /ro/out: read-only file system: choose another output_dir",
        ),
        (
            PermissionError(errno.EACCES, "Permission denied", "/root/out"),
            "tool: error: /root/out: permission denied: check its permissions (or choose another output_dir)",
        ),
        (
            OSError(errno.ENOSPC, "No space left on device"),  # file.write() names no file
            "tool: error: no space left on device: free space or choose another output_dir",
        ),
        (
            _hub_error(
                403,
                "https://huggingface.co/api/models/org/private?expand=sha",
                **{"x-error-message": "Access to model org/private is restricted."},
            ),
            "tool: error: the Hub refused GET https://huggingface.co/api/models/org/private: HTTP 403 Forbidden: "
            "Access to model org/private is restricted.",
        ),
        (
            _hub_error(404, "https://huggingface.co/api/models/org/gone", **{"x-error-code": "RepoNotFound"}),
            "tool: error: the Hub refused GET https://huggingface.co/api/models/org/gone: HTTP 404 Not Found",
        ),
    ],
)
def test_user_errors_print_one_line_and_exit_1(capsys, monkeypatch, error, expected):
    monkeypatch.delenv("SAFT_HF_DEBUG", raising=False)
    assert run_main(_raising(error), [], prog="tool") == 1
    captured = capsys.readouterr()
    assert captured.err == expected + "\n" and captured.out == ""
    assert "hf_SeCrEtToKeN" not in captured.err


def test_bugs_keep_their_traceback_and_debug_reraises_user_errors(capsys, monkeypatch):
    monkeypatch.delenv("SAFT_HF_DEBUG", raising=False)
    with pytest.raises(KeyError):  # not a user error: a bug
        run_main(_raising(KeyError("weight")), [], prog="tool")
    with pytest.raises(OSError, match="Input/output error"):  # an OSError that is no disk-full/permission problem
        run_main(_raising(OSError(errno.EIO, "Input/output error", "f")), [], prog="tool")
    seen = []

    def main(argv):
        seen.append(argv)
        raise ValueError("bad field")

    with pytest.raises(ValueError, match="bad field"):
        run_main(main, ["a", "--debug", "b", "--", "--debug"], prog="tool")
    assert seen == [["a", "b", "--", "--debug"]]  # the flag is taken out; after "--" it is an argument
    monkeypatch.setenv("SAFT_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="bad field"):
        run_main(_raising(ValueError("bad field")), [], prog="tool")
    monkeypatch.setenv("SAFT_HF_DEBUG", "0")
    assert run_main(_raising(ValueError("bad field")), [], prog="tool", debug_flag=None) == 1
    assert capsys.readouterr().err == "tool: error: bad field\n"


def test_interrupts_exit_130_and_sigterm_143_after_cleanup(capsys):
    assert run_main(_raising(KeyboardInterrupt()), [], prog="tool") == 130
    assert capsys.readouterr().err == "tool: interrupted\n"
    cleaned = []

    def terminated_mid_run(argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            cleaned.append(True)

    before = signal.getsignal(signal.SIGTERM)
    assert run_main(terminated_mid_run, [], prog="tool") == 143
    assert capsys.readouterr().err == "tool: terminated\n" and cleaned == [True]
    assert signal.getsignal(signal.SIGTERM) is before  # the runner's handler is gone again


# ---- saft-hf ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=2)


def _recipe(family, folder: Path, **changes) -> Path:
    base_dir, tuned = family
    values = {
        "base_model": str(base_dir),
        "models": [{"model": str(path)} for path in tuned],
        "method": "ties",
        "parameters": {"density": 0.5},
        "output_dir": str(folder / "out"),
    } | changes
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


@pytest.mark.parametrize(
    "changes, parts",
    [
        ({"method": "nosuch"}, ["method: unknown merge method 'nosuch'"]),
        ({"colour": "red"}, ["colour: unknown field"]),
        ({"models": [{"model": "{tmp}/missing"}, {"model": "{tmp}/missing2"}]}, ["{tmp}/missing"]),
        ({"base_model": "{tmp}/no_base"}, ["Local model folder '{tmp}/no_base' does not exist"]),
        # A mistyped local path that could be a Hub id, with the Hub out of reach (the suite runs offline).
        ({"base_model": "nosuch/base"}, ["Model 'nosuch/base' is not a local folder", "check the path, or go online"]),
        (
            {"push_to_hub": {"repo_id": "org/merged", "private": "yes"}},
            ["push_to_hub.private: expected true or false, got 'yes'"],
        ),
        (
            {"tensor_parameters": [{"filter": "mlp", "parameters": [1]}]},
            ["tensor_parameters[0].parameters: expected a mapping of parameter values, got [1]"],
        ),
        (
            {"models": [{"model": "{tmp}/a"}, {"model": "{tmp}/a"}]},
            ["models[1]: the same model as models[0] ({tmp}/a)"],
        ),
    ],
)
def test_bad_merge_recipes_are_one_line_naming_the_field_or_folder(family, tmp_path, capsys, changes, parts):
    changes = yaml.safe_load(yaml.safe_dump(changes).replace("{tmp}", str(tmp_path)))
    assert cli_main(["merge", str(_recipe(family, tmp_path, **changes)), "--no_progress"]) == 1
    _assert_one_line(capsys.readouterr().err, "saft-hf: error: ", *[part.format(tmp=tmp_path) for part in parts])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["recipe.yaml"]  # nothing written


def test_missing_merge_recipe_is_one_line(tmp_path, capsys):
    assert cli_main(["merge", str(tmp_path / "missing.yaml")]) == 1
    _assert_one_line(capsys.readouterr().err, "saft-hf: error: ", str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("where", ["before the command", "after the command", "environment"])
def test_debug_shows_the_traceback(family, tmp_path, monkeypatch, where):
    recipe = str(_recipe(family, tmp_path, method="nosuch"))
    argv = {
        "before the command": ["--debug", "merge", recipe],
        "after the command": ["merge", recipe, "--debug"],
        "environment": ["merge", recipe],
    }[where]
    if where == "environment":
        monkeypatch.setenv("SAFT_HF_DEBUG", "1")
    with pytest.raises(ValueError, match="unknown merge method 'nosuch'"):
        cli_main(argv)


def test_module_and_merge_recipe_print_one_line(family, tmp_path):
    recipe = str(_recipe(family, tmp_path, colour="red"))
    _assert_one_line(_run("-m", "saft_hf.cli", "merge", recipe).stderr, "saft-hf: error: colour: unknown field")
    script = _run(str(REPO / "recipes" / "merge.py"), "--config", recipe)
    assert script.returncode == 1
    _assert_one_line(script.stderr, "merge.py: error: colour: unknown field")


def test_the_command_exits_with_its_output_flushed_and_the_merge_written(family, tmp_path):
    # `python -m saft_hf.cli` ends through exit_process (no interpreter teardown): what it printed into a pipe and
    # the merged folder must both be complete.
    done = _run("-m", "saft_hf.cli", "merge", str(_recipe(family, tmp_path)), "--no_progress")
    assert (done.returncode, done.stdout) == (0, f"{tmp_path / 'out'}\n"), done.stderr
    assert (tmp_path / "out" / "merge_config.yaml").is_file() and (tmp_path / "out" / "README.md").is_file()


_EXIT_DRIVER = """
import atexit, sys, threading, time
from saft_hf.entrypoint import exit_process

def late():
    time.sleep(0.5)
    print("thread done", flush=True)

if sys.argv[1] == "thread":
    threading.Thread(target=late).start()
atexit.register(print, "atexit ran")
sys.stdout.write("no newline yet;")  # buffered: a pipe is block-buffered
exit_process(3)
"""


@pytest.mark.parametrize(
    "case, stdout",
    [("plain", "no newline yet;atexit ran\n"), ("thread", "no newline yet;thread done\natexit ran\n")],
)
def test_exit_process_runs_atexit_flushes_and_waits_for_running_threads(case, stdout):
    done = _run("-c", _EXIT_DRIVER, case)
    assert (done.returncode, done.stdout, done.stderr) == (3, stdout, "")


# Runs saft-hf with the merge's tensor writer replaced: "slow" writes nothing and sleeps once the merge has started
# writing (and says so by creating the marker file); "full" fails like a full disk.
_WRITER_DRIVER = """
import errno, os, pathlib, sys, time
from saft_hf.cli import main
from saft_hf.io import writing

mode, marker = sys.argv[1], pathlib.Path(sys.argv[2])

def add(self, name, tensor):
    if mode == "full":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.folder / "model.safetensors"))
    marker.touch()
    time.sleep(600)

writing.ShardedSafetensorsWriter.add = add
sys.exit(main(sys.argv[3:]))
"""


def _start_merge(family, tmp_path: Path, mode: str) -> tuple[subprocess.Popen, Path]:
    marker = tmp_path / "writing"
    work = tmp_path / "work"
    work.mkdir()
    command = [
        sys.executable,
        "-c",
        _WRITER_DRIVER,
        mode,
        str(marker),
        "merge",
        str(_recipe(family, work)),
        "--no_progress",
    ]
    process = subprocess.Popen(
        command, cwd=REPO, env=ENVIRONMENT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    return process, marker


def test_ctrl_c_during_a_merge_exits_130_and_leaves_no_output(family, tmp_path):
    process, marker = _start_merge(family, tmp_path, "slow")
    deadline = time.monotonic() + 120
    while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), process.communicate(timeout=10)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    _assert_one_line(stderr, "saft-hf: interrupted")
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["recipe.yaml"]  # staging folder removed


def test_full_disk_during_a_merge_is_one_line_naming_the_file(family, tmp_path):
    process, _ = _start_merge(family, tmp_path, "full")
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1
    line = _assert_one_line(
        stderr,
        f"saft-hf: error: {tmp_path / 'work'}/",
        "/model.safetensors: no space left on device: free space or choose another output_dir",
    )
    assert sorted(path.name for path in (tmp_path / "work").iterdir()) == ["recipe.yaml"], line


# ---- recipes/finetune.py -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, parts",
    [
        (["--sam_rho", "-1"], ["sam_rho", "-1"]),
        (["--task", "nosuchtask"], ["task: Unknown task 'nosuchtask'"]),
        # argparse's usage text (hundreds of TrainingArguments flags) and exit status 2 are replaced by one line.
        (["--lora_r", "many"], ["argument --lora_r/--lora-r: invalid int value: 'many' (see --help)"]),
        (["--output_dir", "{tmp}/out/{{nope}}"], ["output_dir '{tmp}/out/{{nope}}'", "unknown placeholder"]),
        (["--resume_from_checkpoint", "missing/"], ["resume_from_checkpoint missing/ does not exist"]),
    ],
)
def test_finetune_refuses_bad_settings_in_one_line_before_writing(tmp_path, flags, parts):
    flags = [flag.format(tmp=tmp_path) for flag in flags]
    result = _run(str(FINETUNE), "--config", str(DEMO_CONFIG), "--output_dir", str(tmp_path / "run"), *flags)
    assert result.returncode == 1
    _assert_one_line(result.stderr, "finetune.py: error: ", *[part.format(tmp=tmp_path) for part in parts])
    assert list(tmp_path.iterdir()) == []


def test_finetune_shows_the_traceback_under_saft_hf_debug(tmp_path):
    result = _run(
        str(FINETUNE),
        "--config",
        str(DEMO_CONFIG),
        "--output_dir",
        str(tmp_path / "run"),
        "--task",
        "nope",
        environment={"SAFT_HF_DEBUG": "1"},
    )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert _error_lines(result.stderr)[-1].startswith("ValueError: task: Unknown task 'nope'")


def _write_checkpoint(folder: Path, *, state: bool = True, weights: str | None = "model.safetensors") -> Path:
    folder.mkdir(parents=True)
    if state:
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 3}))
    if weights:
        save_file({"weight": torch.ones(4, 4)}, folder / weights)
    return folder


def test_resume_checkpoint_is_checked_and_named(tmp_path):
    check_resume_checkpoint(str(_write_checkpoint(tmp_path / "ok" / "checkpoint-3")))
    check_resume_checkpoint(str(_write_checkpoint(tmp_path / "lora", weights="adapter_model.safetensors")))
    (tmp_path / "file").write_text("x")
    sharded = _write_checkpoint(tmp_path / "sharded", weights=None)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "model-1-of-2.safetensors"}}))
    truncated = _write_checkpoint(tmp_path / "truncated")
    os.truncate(truncated / "model.safetensors", (truncated / "model.safetensors").stat().st_size - 8)
    cases = [
        (tmp_path / "file", NotADirectoryError, "resume_from_checkpoint {path} is not a folder"),
        (
            _write_checkpoint(tmp_path / "no_state", state=False),
            FileNotFoundError,
            "{path} holds no trainer_state.json",
        ),
        (_write_checkpoint(tmp_path / "no_weights", weights=None), FileNotFoundError, "{path} holds no model weights"),
        (
            sharded,
            ValueError,
            "resume_from_checkpoint {path}: {path}/model.safetensors.index.json: lists shard "
            "model-1-of-2.safetensors, which is missing",
        ),
        (truncated, ValueError, "resume_from_checkpoint {path}: {path}/model.safetensors: corrupt or truncated"),
    ]
    for path, error_type, message in cases:
        with pytest.raises(error_type) as error:
            check_resume_checkpoint(str(path))
        assert message.format(path=path) in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "content, resume_from, refused",
    [
        ([], None, False),
        (["pretrained/config.json"], None, False),  # a run that failed before training: nothing to lose
        (["finetune_config.yaml"], None, True),
        (["checkpoint-3/trainer_state.json"], None, True),
        (["model.safetensors"], None, True),
        (["adapter_model.safetensors"], None, True),
        (["finetune_config.yaml", "checkpoint-3/trainer_state.json"], "{run}/checkpoint-3", False),
        (["finetune_config.yaml", "checkpoint-3/trainer_state.json"], "{tmp}/other/checkpoint-3", True),
    ],
)
def test_output_dir_holding_a_run_is_refused_unless_resuming_it(tmp_path, content, resume_from, refused):
    run = tmp_path / "run"
    for name in content:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("")
    resume_from = resume_from and resume_from.format(run=run, tmp=tmp_path)
    if refused:
        with pytest.raises(UnsafeOutputError, match=f"output_dir {run} already holds a fine-tuning run; choose"):
            check_output_dir(run, resume_from)
    else:
        check_output_dir(run, resume_from)


@pytest.mark.slow  # one real (tiny) fine-tune and two refused runs: ~30 s
def test_failing_runs_leave_a_finished_run_untouched(tmp_path):
    run = tmp_path / "run"
    tiny = [
        "--max_steps",
        "2",
        "--eval_steps",
        "1",
        "--save_steps",
        "1",
        "--logging_steps",
        "1",
        "--warmup_steps",
        "0",
        "--max_train_samples",
        "16",
        "--max_eval_samples",
        "16",
        "--per_device_train_batch_size",
        "8",
        "--per_device_eval_batch_size",
        "16",
    ]
    finished = _run(str(FINETUNE), "--config", str(DEMO_CONFIG), "--output_dir", str(run), *tiny)
    assert finished.returncode == 0, finished.stderr[-3000:]
    checkpoint = run / "checkpoint-1"  # the best one, kept by save_total_limit 1
    assert (checkpoint / "model.safetensors").is_file()

    def snapshot() -> dict[str, bytes]:
        return {str(path.relative_to(run)): path.read_bytes() for path in sorted(run.rglob("*")) if path.is_file()}

    before = snapshot()
    again = _run(str(FINETUNE), "--config", str(DEMO_CONFIG), "--output_dir", str(run), *tiny, "--learning_rate", "1")
    assert again.returncode == 1
    _assert_one_line(
        again.stderr,
        f"finetune.py: error: output_dir {run} already holds a fine-tuning run",
        "choose another output_dir",
        f"--resume_from_checkpoint {run}/checkpoint-<step>",
    )
    assert snapshot() == before  # finetune_config.yaml included, byte for byte

    weights = checkpoint / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    before = snapshot()
    corrupt = _run(
        str(FINETUNE),
        "--config",
        str(DEMO_CONFIG),
        "--output_dir",
        str(run),
        *tiny,
        "--resume_from_checkpoint",
        str(checkpoint),
    )
    assert corrupt.returncode == 1
    _assert_one_line(
        corrupt.stderr,
        f"finetune.py: error: resume_from_checkpoint {checkpoint}: ",
        f"{weights}: corrupt or truncated safetensors file",
    )
    assert snapshot() == before


def test_a_full_disk_while_writing_weights_names_the_file(tmp_path, capsys):
    # /dev/full fails every write with ENOSPC, and such a failed write names no file by itself.
    (tmp_path / "model.safetensors").symlink_to("/dev/full")
    spec = TensorSpec("w", (1 << 20,), torch.float32)

    def write(argv):
        with ShardedSafetensorsWriter(tmp_path, [spec]) as writer:
            writer.add("w", torch.zeros(1 << 20))

    assert run_main(write, [], prog="tool") == 1
    assert capsys.readouterr().err == (
        f"tool: error: {tmp_path / 'model.safetensors'}: no space left on device: free space or choose another "
        "output_dir\n"
    )
