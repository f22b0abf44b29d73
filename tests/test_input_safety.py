"""Reading only inside what the user named, validating Hub references before any download, clean push failures,
and no absolute local path in what is pushed (cards, recipes, task-vector metadata)."""

from __future__ import annotations

import json
import re
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import instant_retries
from huggingface_hub import CommitOperationAdd, HfApi
from merge_fixtures import clip_vision_family
from safetensors.torch import save_file
from transformers import CLIPVisionModel

from saft_hf.cards import finetune_card, task_vector_card
from saft_hf.cli import main as cli_main
from saft_hf.errors import OutsideFolderError, PushError, UnsafeOutputError
from saft_hf.hub import fetch_config, push_folder, resolve_model
from saft_hf.io import CheckpointReader, reading
from saft_hf.merging import MergeConfig, merge
from saft_hf.task_vectors import TaskVector

# The client's `http_backoff` tries a request once and retries a 5xx answer 5 times; the commit POST is not retried.
BACKOFF_TRIES = 6


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    return clip_vision_family(tmp_path_factory.mktemp("family"), count=2)


def recipe(base, models, output_dir, **extra) -> dict:
    return {
        "base_model": str(base),
        "models": [{"model": str(model)} for model in models],
        "method": "task_arithmetic",
        "parameters": {"alpha": 0.5},
        "output_dir": str(output_dir),
        **extra,
    }


@pytest.fixture
def opened(monkeypatch) -> list[Path]:
    """Every safetensors file the checkpoint reader opens."""
    files, original = [], reading.safe_open

    def recording_safe_open(file, **options):
        files.append(Path(file))
        return original(file, **options)

    monkeypatch.setattr(reading, "safe_open", recording_safe_open)
    return files


def write_index(folder: Path, weight_map: dict) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 16}, "weight_map": weight_map}))
    return index


# ---- shards named by an index stay inside its folder ----------------------------------------------------------

OUTSIDE_SHARDS = [
    "../secret.safetensors",
    "ok/../../secret.safetensors",
    "..\\secret.safetensors",
    "C:/secret.safetensors",
    "ABSOLUTE",
]


@pytest.mark.parametrize("shard", OUTSIDE_SHARDS)
def test_index_naming_a_shard_outside_its_folder_is_refused_before_reading(tmp_path, opened, shard):
    secret = tmp_path / "secret.safetensors"
    save_file({"w": torch.ones(2)}, secret)
    folder = tmp_path / "model"
    (folder / "ok").mkdir(parents=True)
    save_file({"v": torch.zeros(2)}, folder / "model-00001-of-00002.safetensors")
    shard = str(secret) if shard == "ABSOLUTE" else shard
    index = write_index(folder, {"v": "model-00001-of-00002.safetensors", "w": shard})

    with pytest.raises(OutsideFolderError) as raised:
        CheckpointReader(folder)
    assert str(index) in str(raised.value) and repr(shard) in str(raised.value)
    assert opened == []  # refused on the names alone: not even the good shard was opened


@pytest.mark.parametrize("value", [3, "", None, ["a.safetensors"]])
def test_index_with_a_non_string_shard_name_is_refused(tmp_path, value):
    write_index(tmp_path, {"w": value})
    with pytest.raises(ValueError, match=r"model\.safetensors\.index\.json: weight_map\['w'\] is .* expected the name"):
        CheckpointReader(tmp_path)


def test_index_may_name_shards_in_a_subfolder(tmp_path):
    (tmp_path / "shards").mkdir()
    save_file({"w": torch.arange(3.0)}, tmp_path / "shards" / "a.safetensors")
    save_file({"v": torch.ones(1)}, tmp_path / "b.safetensors")
    write_index(tmp_path, {"w": "shards/a.safetensors", "v": "./b.safetensors"})

    reader = CheckpointReader(tmp_path)
    assert torch.equal(reader["w"], torch.arange(3.0)) and torch.equal(reader["v"], torch.ones(1))


def upload(repo_id: str, files: dict[str, bytes | Path]) -> str:
    """Put files in a Hub repo with the plain client (not the code under test)."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    return api.create_commit(
        repo_id, [CommitOperationAdd(path, content) for path, content in files.items()], commit_message="fixture"
    ).oid


def test_hub_repo_whose_index_points_outside_its_snapshot_is_refused(hub_server, family, tmp_path, opened):
    base_dir, (tuned, _) = family
    names = list(CheckpointReader(tuned))
    weight_map = {name: "model-00001-of-00001.safetensors" for name in names}
    weight_map[names[0]] = "../../../x.safetensors"  # snapshots/<sha>/../../../ is the cache root
    upload(
        "evil/model",
        {
            "config.json": tuned / "config.json",
            "model-00001-of-00001.safetensors": tuned / "model.safetensors",
            "model.safetensors.index.json": json.dumps({"weight_map": weight_map}).encode(),
        },
    )
    secret = hub_server.cache_dir / "x.safetensors"
    hub_server.cache_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(tuned / "model.safetensors", secret)

    with pytest.raises(
        OutsideFolderError,
        match=r"snapshots/[0-9a-f]{40}/model\.safetensors\.index\.json: names shard "
        r"'\.\./\.\./\.\./x\.safetensors'",
    ):
        merge(recipe(base_dir, ["evil/model"], tmp_path / "out"), progress=False)
    assert secret.resolve() not in [file.resolve() for file in opened]
    assert not (tmp_path / "out").exists()


# ---- revisions and repo ids are validated before any request ----------------------------------------------------

BAD_REVISIONS = ["..", "a..b", "x~1", "main:evil", "@", "../../../etc", "a/.hidden", "b.lock", "v1.", "a b"]


@pytest.mark.parametrize("revision", BAD_REVISIONS)
def test_bad_revisions_are_refused_without_a_request(hub_server, family, tmp_path, revision):
    base_dir, _ = family
    calls = [
        lambda: resolve_model(f"org/tiny@{revision}"),
        lambda: fetch_config("org/tiny", revision=revision),
        lambda: merge(recipe(base_dir, ["org/a", f"org/b@{revision}"], tmp_path / "out"), progress=False),
    ]
    for call in calls:
        with pytest.raises(OutsideFolderError, match=re.escape(f"revision '{revision}' is not a valid git")):
            call()
    with pytest.raises(OutsideFolderError, match=r"^models\[1\]\.revision: revision"):
        MergeConfig.from_dict(
            {
                **recipe(base_dir, ["org/a"], tmp_path / "out"),
                "models": ["org/a", {"model": "org/b", "revision": revision}],
            }
        )
    assert hub_server.state.requests == []


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("base_model", "org/na..me", r"^base_model \(not a local folder either\): 'org/na\.\.me' is not a valid Hub"),
        (
            "models",
            ["org/a--b"],
            r"^models\[0\]\.model \(not a local folder either\): 'org/a--b' is not a valid Hub repo",
        ),
        ("push_to_hub", "bad//id", r"^push_to_hub\.repo_id: 'bad//id' is not a valid Hub repo id"),
        ("push_to_hub", {"repo_id": "org/x.git"}, r"^push_to_hub\.repo_id: 'org/x\.git' is not a valid Hub repo id"),
    ],
)
def test_bad_repo_ids_are_refused_before_the_merge_writes_anything(hub_server, family, tmp_path, field, value, message):
    base_dir, tuned = family
    with pytest.raises(ValueError, match=message):
        merge({**recipe(base_dir, tuned, tmp_path / "out"), field: value}, progress=False)
    with pytest.raises(ValueError, match=message):  # as `saft-hf merge --push_to_hub bad//id` changes a recipe
        MergeConfig.from_dict(recipe(base_dir, tuned, tmp_path / "out")).replace(**{field: value})
    assert hub_server.state.requests == [] and list(tmp_path.iterdir()) == []


# ---- the whole recipe is checked before the first weight download ----------------------------------------------


@pytest.fixture
def hub_family(hub_server, family):
    """The family pushed to the local Hub as org/base, org/ft0, org/ft1; the request log starts empty."""
    base_dir, tuned = family
    for name, folder in [("base", base_dir), *[(f"ft{index}", path) for index, path in enumerate(tuned)]]:
        push_folder(folder, f"org/{name}")
    hub_server.state.requests.clear()
    return hub_server


def weight_downloads(state) -> list[str]:
    resolved = [path for repo in state.repos for _, path in state.file_requests(repo) if path.endswith(".safetensors")]
    return resolved + state.lfs_downloads()


@pytest.mark.parametrize("revision", ["no-such-branch", "0" * 40])
def test_missing_revision_of_the_last_input_fails_before_any_weight_download(hub_family, tmp_path, revision):
    with pytest.raises(
        FileNotFoundError,
        match=rf"^models\[1\]: Revision '{revision}' does not exist in Hub repo "
        r"'org/ft1'",
    ):
        merge(recipe("org/base", ["org/ft0", f"org/ft1@{revision}"], tmp_path / "out"), progress=False)
    assert weight_downloads(hub_family.state) == []
    assert hub_family.state.requests, "the references were checked against the server"
    assert not (tmp_path / "out").exists()


def test_missing_repo_and_repo_without_model_vector_or_adapter_fail_before_any_weight_download(hub_family, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^models\[1\]: Model 'org/missing' is neither a local folder"):
        merge(recipe("org/base", ["org/ft0", "org/missing"], tmp_path / "out"), progress=False)
    upload("org/notes", {"notes.txt": b"no weights here"})
    with pytest.raises(
        FileNotFoundError,
        match=r"^models\[1\]: Hub repo 'org/notes@[0-9a-f]{40}' has no config\.json "
        r"\(a model\), no task_vector\.safetensors \(a task vector\) and no adapter_config\.json \(a PEFT "
        r"adapter\); files: \['\.gitattributes', 'notes\.txt'\]",
    ):
        merge(recipe("org/base", ["org/ft0", "org/notes"], tmp_path / "out"), progress=False)
    assert weight_downloads(hub_family.state) == []


def test_hub_task_vector_input_merges_like_the_local_one(hub_family, family, tmp_path):
    base_dir, tuned = family
    TaskVector.from_models(base_dir, tuned[1]).save(tmp_path / "tv")
    push_folder(tmp_path / "tv", "org/tv")

    from_hub = merge(recipe("org/base", ["org/ft0", "org/tv"], tmp_path / "hub"), progress=False)
    local = merge(recipe(base_dir, [tuned[0], tmp_path / "tv"], tmp_path / "local"), progress=False)
    expected = CheckpointReader(local)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in CheckpointReader(from_hub).items())
    recorded = yaml.safe_load((from_hub / "merge_config.yaml").read_text())
    sha = hub_family.state.repos["org/tv"].branches["main"]
    assert recorded["models"][1] == {"model": "org/tv", "revision": sha, "weight": 1.0}


# ---- push failures ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("route", "tries"),
    [("commit", 1), ("preupload", BACKOFF_TRIES), ("lfs_batch", BACKOFF_TRIES), ("lfs_put", BACKOFF_TRIES)],
)
def test_failed_merge_push_reports_the_complete_local_output(hub_server, family, tmp_path, monkeypatch, route, tries):
    waits = instant_retries(monkeypatch)
    base_dir, tuned = family
    hub_server.state.fail_next(route, tries)
    out = tmp_path / "out"

    with pytest.raises(PushError) as raised:
        merge(recipe(base_dir, tuned, out, push_to_hub="org/merged"), progress=False)
    message = str(raised.value)
    assert "\n" not in message and hub_server.token not in message
    assert message.startswith("Upload to Hub repo 'org/merged' failed (")
    assert f"answered HTTP 500: Injected failure of {route}" in message
    retry = f"saft_hf.hub.push_folder('{out}', 'org/merged')"
    assert f"the merged model in '{out}' is complete; retry with {retry}" in message
    assert hub_server.state.injected == [(route, 500)] * tries and len(waits) == tries - 1
    # No partial commit: the repo holds only what the Hub created it with.
    assert hub_server.state.commits_made("org/merged") == []
    assert set(hub_server.state.repos["org/merged"].resolve("main").files) == {".gitattributes"}
    # The local merge is complete and loadable, equal to one that was never pushed.
    expected = CheckpointReader(merge(recipe(base_dir, tuned, tmp_path / "unpushed"), progress=False))
    loaded = CLIPVisionModel.from_pretrained(out).state_dict()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert {"merge_config.yaml", "README.md", "config.json", "model.safetensors"} <= {p.name for p in out.iterdir()}
    # The retry the message suggests works.
    sha = push_folder(out, "org/merged")
    assert hub_server.state.commits_made("org/merged") == [sha]


def test_merge_refuses_to_push_over_a_model_repo_before_merging(hub_server, family, tmp_path):
    base_dir, tuned = family
    theirs = upload("org/their-model", {"model.safetensors": b"their weights", "config.json": b"{}"})
    out = tmp_path / "out"

    with pytest.raises(UnsafeOutputError, match="^push_to_hub: Hub repo 'org/their-model' already holds files saft_hf"):
        merge(recipe(base_dir, tuned, out, push_to_hub="org/their-model"), progress=False)
    assert not out.exists()  # refused before anything was merged or written
    assert hub_server.state.repos["org/their-model"].resolve("main").oid == theirs


def test_task_vector_command_refuses_to_push_into_its_base_before_writing(hub_server, family, tmp_path, capsys):
    """`saft-hf task-vector --push_to_hub` naming the base's own repo used to delete its weights (a saft_hf card
    replaced the model's); now it is refused in one line before anything is computed or written."""
    base_dir, tuned = family
    base = upload("org/base", {path.name: path for path in base_dir.iterdir() if path.is_file()})
    out = tmp_path / "tv"
    command = ["task-vector", "--base", "org/base", "--finetuned", str(tuned[0]), "-o", str(out), "--push_to_hub"]
    capsys.readouterr()  # the fixture upload's progress bars

    assert cli_main([*command, "org/base"]) == 1
    assert capsys.readouterr().err == (
        "saft-hf: error: push_to_hub: Hub repo 'org/base' is one of this run's inputs (--base); push to another repo "
        "id\n"
    )
    assert cli_main([*command, "bad//id"]) == 1
    assert "--push_to_hub" in capsys.readouterr().err
    assert not out.exists() and hub_server.state.repos["org/base"].resolve("main").oid == base


def test_failed_private_task_vector_push_suggests_a_private_retry(hub_server, family):
    base_dir, tuned = family
    hub_server.state.fail_next("commit")
    with pytest.raises(PushError, match=re.escape("retry with push_to_hub('org/tv', private=True, revision='exp')")):
        TaskVector.from_models(base_dir, tuned[0]).push_to_hub("org/tv", private=True, revision="exp")


def test_failed_task_vector_push_says_nothing_is_kept_locally(hub_server, family):
    base_dir, tuned = family
    hub_server.state.fail_next("commit")
    with pytest.raises(
        PushError,
        match=r"^Upload to Hub repo 'org/tv' failed \(POST /api/models/org/tv/commit/main "
        r"answered HTTP 500: Injected failure of commit\); the pushed copy was built "
        r"in a temporary folder, now deleted: the task vector is on disk only where "
        r"TaskVector\.save_pretrained\(\) wrote it; "
        r"retry with push_to_hub\('org/tv'\)$",
    ):
        TaskVector.from_models(base_dir, tuned[0]).push_to_hub("org/tv")
    assert hub_server.state.commits_made("org/tv") == []


# ---- nothing pushed carries an absolute local path --------------------------------------------------------------


def safetensors_metadata(content: bytes) -> dict[str, str]:
    (length,) = struct.unpack("<Q", content[:8])
    return json.loads(content[8 : 8 + length])["__metadata__"]


def test_pushed_card_recipe_and_vector_metadata_hold_no_absolute_path(hub_server, family, tmp_path, tmp_path_factory):
    base_dir, tuned = family
    root = str(tmp_path_factory.getbasetemp())  # above both the family's folder and tmp_path
    merge(recipe(base_dir, tuned, tmp_path / "out", push_to_hub="org/merged"), progress=False)
    vector = TaskVector.from_models(base_dir, tuned[0], task="digits")
    vector.push_to_hub("org/tv")

    merged = hub_server.state.repos["org/merged"].resolve("main").files
    card, pushed_recipe = merged["README.md"].content.decode(), merged["merge_config.yaml"].content.decode()
    assert root not in card and root not in pushed_recipe
    assert yaml.safe_load(pushed_recipe)["base_model"] == "base (local folder)"
    assert [entry["model"] for entry in yaml.safe_load(pushed_recipe)["models"]] == [
        "ft0 (local folder)",
        "ft1 (local folder)",
    ]
    assert yaml.safe_load(pushed_recipe)["output_dir"] == "out"
    assert "| base | base (local folder) |" in card and "| model | ft1 (local folder) |" in card
    assert HfApi().model_info("org/merged").card_data.base_model is None  # a local base is no Hub lineage

    pushed_vector = hub_server.state.repos["org/tv"].resolve("main").files
    metadata = safetensors_metadata(pushed_vector["task_vector.safetensors"].content)
    vector_card = pushed_vector["README.md"].content.decode()
    assert (metadata["base_model"], metadata["source"]) == ("base (local folder)", "ft0 (local folder)")
    assert root not in json.dumps(metadata) and root not in vector_card
    assert "https://huggingface.co/" not in vector_card  # a local base is not linked as if it were on the Hub
    assert vector.metadata["base_model"] == str(base_dir)  # the vector itself is unchanged


def test_unpushed_recipe_keeps_paths_as_written_and_reruns(family, tmp_path):
    base_dir, tuned = family
    first = merge(recipe(base_dir, tuned, tmp_path / "first"), progress=False)
    recorded = yaml.safe_load((first / "merge_config.yaml").read_text())
    assert recorded["base_model"] == str(base_dir) and recorded["output_dir"] == str(tmp_path / "first")
    assert [entry["model"] for entry in recorded["models"]] == [str(path) for path in tuned]

    again = merge({**recorded, "output_dir": str(tmp_path / "again")}, progress=False)
    expected = CheckpointReader(first)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in CheckpointReader(again).items())


def test_cards_show_a_local_base_by_folder_name_and_link_only_hub_bases(tmp_path):
    local = finetune_card({"base_model": str(tmp_path / "my_base"), "task": "digits"})
    assert "fine-tuned version of my_base (local folder) for digits" in local.text
    assert str(tmp_path) not in local.text and "https://huggingface.co/" not in local.text
    hub = task_vector_card({"base_model": "org/base@v1", "source": str(tmp_path / "ft")})
    assert "base model\n[org/base@v1](https://huggingface.co/org/base)," in hub.text
    assert "| fine-tuned model | ft (local folder) |" in hub.text and str(tmp_path) not in hub.text


def test_offline_merge_of_cached_hub_models_still_works(hub_family, tmp_path, monkeypatch):
    from huggingface_hub import constants

    online = merge(recipe("org/base", ["org/ft0", "org/ft1"], tmp_path / "online"), progress=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    hub_family.state.requests.clear()

    offline = merge(recipe("org/base", ["org/ft0", "org/ft1"], tmp_path / "offline"), progress=False)
    assert hub_family.state.requests == []
    expected = CheckpointReader(online)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in CheckpointReader(offline).items())
    assert (offline / "merge_config.yaml").read_text() == (online / "merge_config.yaml").read_text().replace(
        str(tmp_path / "online"), str(tmp_path / "offline")
    )
