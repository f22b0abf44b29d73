"""Output folders: saft_hf replaces only what it wrote (manifest), never an input, and leaves no staging behind."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from merge_fixtures import clip_vision_family
from safetensors.torch import load_file

from saft_hf.cli import main as cli_main
from saft_hf.errors import UnsafeOutputError
from saft_hf.hub import _folder_files, push_folder, resolve_model
from saft_hf.io import ShardedSafetensorsWriter, atomic_output_dir
from saft_hf.io.outputs import replace_dir
from saft_hf.layout import OUTPUT_MANIFEST_NAME
from saft_hf.merging import merge
from saft_hf.task_vectors import TaskVector


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=2)


def recipe(inputs, output_dir, alpha=0.5):
    base_dir, *models = inputs
    return {
        "base_model": str(base_dir),
        "models": [str(model) for model in models],
        "method": "task_arithmetic",
        "parameters": {"alpha": alpha},
        "output_dir": str(output_dir),
    }


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` with its bytes (byte-for-byte comparisons of whole folders)."""
    files = sorted(path for path in folder.rglob("*") if path.is_file())
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in files}


def hidden_entries(parent: Path) -> list[str]:
    return sorted(path.name for path in parent.iterdir() if path.name.startswith("."))


# ---- never an input ---------------------------------------------------------------------------------------------


def test_merge_into_one_of_its_task_vector_inputs_is_refused(family, tmp_path):
    base_dir, (ft0, ft1) = family
    vector_dir = TaskVector.from_models(base_dir, ft0).save(tmp_path / "tv")
    before = tree(vector_dir)
    with pytest.raises(UnsafeOutputError, match=r"^output_dir: \S+/tv is the folder of input models\[0\] \("):
        merge(recipe((base_dir, vector_dir, ft1), vector_dir), progress=False)
    assert tree(vector_dir) == before and hidden_entries(tmp_path) == []


def test_local_inputs_are_checked_before_anything_is_downloaded(family, tmp_path):
    base_dir, (ft0, _) = family
    vector_dir = TaskVector.from_models(base_dir, ft0).save(tmp_path / "tv")
    # The Hub is offline in the tests: reaching "org/never-fetched" would fail with a Hub error instead.
    with pytest.raises(UnsafeOutputError, match=r"is the folder of input models\[1\] "):
        merge(recipe((base_dir, "org/never-fetched", vector_dir), vector_dir), progress=False)


def test_merged_folder_fed_back_as_input_is_not_replaced(family, tmp_path):
    base_dir, (ft0, ft1) = family
    merged = merge(recipe((base_dir, ft0, ft1), tmp_path / "merged"), progress=False)
    before = tree(merged)
    with pytest.raises(UnsafeOutputError, match=r"is the folder of input models\[1\] \(\S+/merged\)"):
        merge(recipe((base_dir, ft0, merged), merged), progress=False)
    assert tree(merged) == before and hidden_entries(tmp_path) == []


@pytest.mark.parametrize(
    ("where", "relation", "field"),
    [
        ("base", "is", "base_model"),
        ("inside_base", "is inside", "base_model"),
        ("around_input", "contains", r"models\[1\]"),
    ],
)
def test_output_that_is_inside_or_contains_an_input_is_refused(family, tmp_path, where, relation, field):
    base_dir = tmp_path / "base"
    shutil.copytree(family[0], base_dir)
    work = tmp_path / "work"
    shutil.copytree(family[1][1], work / "ft1")
    output = {"base": base_dir, "inside_base": base_dir / "merged", "around_input": work}[where]
    before = tree(tmp_path)
    with pytest.raises(UnsafeOutputError, match=rf"^output_dir: \S+ {relation} the folder of input {field} \("):
        merge(recipe((base_dir, family[1][0], work / "ft1"), output), progress=False)
    assert tree(tmp_path) == before and not (base_dir / "merged").exists()


def test_output_holding_a_file_an_input_links_to_is_refused(family, tmp_path):
    """An input folder whose weights are a link into an earlier merge's folder: replacing that merge would change
    the input (it used to, silently)."""
    base_dir, (ft0, ft1) = family
    merged = merge(recipe((base_dir, ft0, ft1), tmp_path / "merged"), progress=False)
    linked = tmp_path / "linked"
    linked.mkdir()
    shutil.copy(ft0 / "config.json", linked / "config.json")
    (linked / "model.safetensors").symlink_to(merged / "model.safetensors")
    before = tree(merged)

    with pytest.raises(UnsafeOutputError) as refused:
        merge(recipe((base_dir, linked, ft1), merged), progress=False)
    assert str(refused.value) == (
        f"output_dir: {merged} holds {merged / 'model.safetensors'}, which input models[0] ({linked}) reads through "
        f"its link {linked / 'model.safetensors'}; writing there would change that input, choose another output_dir"
    )
    assert tree(merged) == before and hidden_entries(tmp_path) == []


def test_hub_input_snapshot_is_checked_once_resolved(family, tmp_path, hub_server):
    base_dir, (ft0, ft1) = family
    push_folder(ft0, "org/ft0")
    snapshot = resolve_model("org/ft0")
    before = tree(snapshot)
    with pytest.raises(UnsafeOutputError, match=r"is inside the folder of input models\[0\] \(org/ft0\)"):
        merge(recipe((base_dir, "org/ft0", ft1), snapshot / "merged"), progress=False)
    assert tree(snapshot) == before and hidden_entries(snapshot) == []


def test_task_vector_is_never_saved_over_a_folder_it_is_read_from(family, tmp_path):
    base_dir, (ft0, ft1) = family
    vector_dir = TaskVector.from_models(base_dir, ft0).save(tmp_path / "tv")
    before = tree(vector_dir)
    loaded = TaskVector.load(vector_dir)
    with pytest.raises(UnsafeOutputError, match=r"^task vector folder: \S+/tv is the folder of input task vector "):
        loaded.save(vector_dir)
    combined = loaded + TaskVector.from_models(base_dir, ft1)
    with pytest.raises(UnsafeOutputError, match=r"is inside the folder of input finetuned \S+/ft1; "):
        (0.5 * combined).save(ft1 / "tv")
    with pytest.raises(UnsafeOutputError, match=r"contains the folder of input base "):
        TaskVector.from_models(base_dir, ft0).save(base_dir.parent)
    assert tree(vector_dir) == before and not (ft1 / "tv").exists()


def test_cli_task_vector_into_its_own_finetuned_folder_is_refused(family, tmp_path, capsys):
    base_dir, (ft0, ft1) = family
    merged = merge(recipe((base_dir, ft0, ft1), tmp_path / "merged"), progress=False)
    before = tree(merged)
    assert cli_main(["task-vector", "--base", str(base_dir), "--finetuned", str(merged), "-o", str(merged)]) == 1
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("saft-hf: error:")]
    assert re.search(r"task vector folder: \S+/merged is the folder of input finetuned \S+/merged; writing", error)
    assert tree(merged) == before and hidden_entries(tmp_path) == []


# ---- only what saft_hf wrote --------------------------------------------------------------------------------------


def test_rerun_into_an_untouched_previous_output_replaces_it(family, tmp_path):
    base_dir, (ft0, ft1) = family
    out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out", alpha=0.5), progress=False)
    first = load_file(out / "model.safetensors")
    merge(recipe((base_dir, ft0, ft1), out, alpha=0.9), progress=False)
    second = load_file(out / "model.safetensors")
    base = load_file(base_dir / "model.safetensors")
    # task arithmetic is base + alpha * (sum of deltas): the new output's deltas are the old ones times 0.9 / 0.5
    for name, tensor in base.items():
        assert ((second[name] - tensor) - (first[name] - tensor) * 1.8).abs().max() < 1e-5, name
    assert any(not first[name].equal(second[name]) for name in base)
    manifest = json.loads((out / OUTPUT_MANIFEST_NAME).read_text())
    assert manifest["kind"] == "merged_model" and set(manifest["files"]) == set(tree(out)) - {OUTPUT_MANIFEST_NAME}
    info = (out / "model.safetensors").stat()
    assert manifest["files"]["model.safetensors"] == {"size": info.st_size, "mtime_ns": info.st_mtime_ns}
    assert hidden_entries(tmp_path) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda out: (out / "notes.txt").write_text("mine"),
            r"holds files saft_hf did not write: notes\.txt; move them",
        ),
        (
            lambda out: ((out / "eval").mkdir(), (out / "eval" / "scores.json").write_text("{}")),
            r"holds files saft_hf did not write: eval/; ",
        ),
        (
            lambda out: [(out / f"{name}.txt").write_text(name) for name in "abcde"],
            r"did not write: a\.txt, b\.txt, c\.txt \(\+2 more\)",
        ),
        (
            lambda out: (out / "README.md").write_text((out / "README.md").read_text() + "\nMy results.\n"),
            r"file README\.md changed since saft_hf wrote it; ",
        ),
        (lambda out: os.utime(out / "config.json", ns=(0, 0)), r"file config\.json changed since saft_hf wrote it"),
    ],
)
def test_rerun_into_a_changed_previous_output_is_refused(family, tmp_path, change, message):
    base_dir, (ft0, ft1) = family
    out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
    change(out)
    before = tree(out)
    with pytest.raises(UnsafeOutputError, match=message):
        merge(recipe((base_dir, ft0, ft1), out, alpha=0.9), progress=False)
    assert tree(out) == before and hidden_entries(tmp_path) == []


def test_folder_changed_during_the_merge_is_not_replaced(family, tmp_path, monkeypatch):
    base_dir, (ft0, ft1) = family
    out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
    original = ShardedSafetensorsWriter.add

    def add_while_the_user_saves_notes(self, name, tensor):
        (out / "notes.txt").write_text("written during the merge")
        return original(self, name, tensor)

    monkeypatch.setattr(ShardedSafetensorsWriter, "add", add_while_the_user_saves_notes)
    before = {**tree(out), "notes.txt": b"written during the merge"}
    with pytest.raises(UnsafeOutputError, match="did not write: notes.txt"):
        merge(recipe((base_dir, ft0, ft1), out, alpha=0.9), progress=False)
    assert tree(out) == before and hidden_entries(tmp_path) == []


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"merge_config.yaml": "method: ties\n", "thesis.tex": "\\documentclass{article}"}, "older saft_hf"),
        # the demo's pre-trained model cache from before manifests: the real reason, not "not written by saft_hf"
        ({"pretraining.json": "{}", "model.safetensors": "x"}, "older saft_hf"),
        ({"thesis.tex": "\\documentclass{article}"}, "was not written by saft_hf"),
        ({OUTPUT_MANIFEST_NAME: "{not json", "thesis.tex": "x"}, "is not a valid saft_hf manifest"),
    ],
)
def test_folder_without_a_valid_manifest_is_refused_and_untouched(family, tmp_path, files, message):
    base_dir, (ft0, ft1) = family
    folder = tmp_path / "thesis"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    before = tree(folder)
    with pytest.raises(UnsafeOutputError, match=message):
        merge(recipe((base_dir, ft0, ft1), folder), progress=False)
    with pytest.raises(UnsafeOutputError, match=message):
        TaskVector.from_models(base_dir, ft0).save(folder)
    assert tree(folder) == before and hidden_entries(tmp_path) == []


def test_output_of_an_older_saft_hf_is_refused(family, tmp_path):
    base_dir, (ft0, ft1) = family
    out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
    (out / OUTPUT_MANIFEST_NAME).unlink()  # what a folder written before manifests looks like
    before = tree(out)
    with pytest.raises(UnsafeOutputError, match=r"was written by an older saft_hf, which kept no record of its files"):
        merge(recipe((base_dir, ft0, ft1), out), progress=False)
    assert tree(out) == before


def test_manifest_is_kept_out_of_hub_pushes(family, tmp_path):
    base_dir, (ft0, _) = family
    vector_dir = TaskVector.from_models(base_dir, ft0).save(tmp_path / "tv")
    assert (vector_dir / OUTPUT_MANIFEST_NAME).is_file()
    assert _folder_files(vector_dir) == ["task_vector.safetensors"]


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o755), (0o027, 0o750)])
def test_output_folder_permissions_follow_the_umask(family, tmp_path, umask, mode):
    base_dir, (ft0, ft1) = family
    previous = os.umask(umask)
    try:
        out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
        vector_dir = TaskVector.from_models(base_dir, ft0).save(tmp_path / "tv")
    finally:
        os.umask(previous)
    assert (out.stat().st_mode & 0o777, vector_dir.stat().st_mode & 0o777) == (mode, mode)
    assert (out / "model.safetensors").stat().st_mode & 0o777 == mode & 0o666


# ---- interrupted runs ---------------------------------------------------------------------------------------------

# A merge whose writer stalls after the first tensor (announced on stdout), so the test can signal it mid-write.
_STALLING_MERGE = """
import json, sys, time
from saft_hf.io import ShardedSafetensorsWriter
from saft_hf.merging import merge

original = ShardedSafetensorsWriter.add

def add_then_stall(self, name, tensor):
    original(self, name, tensor)
    print("writing", flush=True)
    time.sleep(120)

ShardedSafetensorsWriter.add = add_then_stall
merge(json.loads(sys.argv[1]), progress=False)
"""


def start_stalled_merge(config: dict) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _STALLING_MERGE, json.dumps(config)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline() == "writing\n"
    return process


def staging_of(parent: Path, target: str, pid: int) -> list[str]:
    pattern = re.compile(re.escape(f".{target}.") + rf"(tmp|old)-{pid}@{re.escape(socket.gethostname())}-[0-9a-f]+")
    return [name for name in hidden_entries(parent) if pattern.fullmatch(name)]


def test_sigterm_during_a_merge_removes_staging_and_keeps_the_previous_output(family, tmp_path):
    base_dir, (ft0, ft1) = family
    out = merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
    before = tree(out)
    process = start_stalled_merge(recipe((base_dir, ft0, ft1), out, alpha=0.9))
    assert len(staging_of(tmp_path, "out", process.pid)) == 1
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=60) == -signal.SIGTERM  # still ends as terminated (exit status 143 in a shell)
    assert hidden_entries(tmp_path) == [] and tree(out) == before


def test_staging_left_by_sigkill_is_removed_by_the_next_run_for_that_target_only(family, tmp_path):
    base_dir, (ft0, ft1) = family
    process = start_stalled_merge(recipe((base_dir, ft0, ft1), tmp_path / "out"))
    process.kill()
    process.wait(timeout=60)
    (dead_staging,) = staging_of(tmp_path, "out", process.pid)
    host = socket.gethostname()
    dead_retired = f".out.old-{process.pid}@{host}-0badcafe"
    live_staging = f".out.tmp-{os.getpid()}@{host}-0badcafe"  # this very process is alive
    other_target = f".other.tmp-{process.pid}@{host}-0badcafe"
    other_host = f".out.tmp-{process.pid}@elsewhere.example-0badcafe"
    for name in (dead_retired, live_staging, other_target, other_host):
        (tmp_path / name).mkdir()
        (tmp_path / name / "partial.safetensors").write_bytes(b"partial")
    merge(recipe((base_dir, ft0, ft1), tmp_path / "out"), progress=False)
    assert hidden_entries(tmp_path) == sorted([live_staging, other_target, other_host])
    assert (tmp_path / live_staging / "partial.safetensors").read_bytes() == b"partial"
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_failed_output_leaves_no_folder_it_made_and_keeps_the_ones_it_found(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="mid-run"), atomic_output_dir(tmp_path / "kept/a/b/out", kind="test"):
        raise RuntimeError("mid-run failure")
    assert sorted(path.relative_to(tmp_path).as_posix() for path in tmp_path.rglob("*")) == ["kept"]


def test_output_under_a_file_is_one_line_before_anything_is_made(family, tmp_path):
    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UnsafeOutputError) as refused:
        merge(recipe((family[0], *family[1]), tmp_path / "afile" / "sub" / "out"), progress=False)
    assert str(refused.value) == f"output_dir: {tmp_path / 'afile'} is a file, not a folder; choose another output_dir"
    assert (tmp_path / "afile").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_an_output_another_run_made_during_the_swap_is_not_replaced(tmp_path):
    """Two runs into the same new folder: the second's swap finds the first's output, made after its last check
    (simulated by a target that claims not to exist); it used to end in an `[Errno 39]` traceback."""

    class RacingPath(type(tmp_path)):
        def exists(self, **kwargs):
            return False

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "theirs.txt").write_text("first run")
    staging = tmp_path / ".out.tmp"
    staging.mkdir()
    (staging / "mine.txt").write_text("second run")
    with pytest.raises(UnsafeOutputError, match=r"out: another run wrote this folder while this one worked; run again"):
        replace_dir(staging, RacingPath(tmp_path / "out"))
    assert (tmp_path / "out" / "theirs.txt").read_text() == "first run"
