"""saft_hf.hub against the local Hub-protocol server (tests/hub_server.py) through the real huggingface_hub client."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError
from safetensors.torch import save_file
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import CLIPConfig, CLIPVisionConfig, CLIPVisionModel, PretrainedConfig, T5Config

from saft_hf.errors import UnsafeOutputError
from saft_hf.hub import (
    PickleWeightsError,
    _card_tags,
    check_push_target,
    check_same_architecture,
    fetch_config,
    is_local,
    parse_model_ref,
    push_folder,
    resolve_model,
    resolved_revision,
)

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def make_model_folder(folder: Path, *, seed: int = 0, max_shard_size: str = "30KB", **overrides) -> Path:
    """A tiny CLIP vision tower saved the way transformers saves it (sharded), plus a tokenizer and a README."""
    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**{**TINY, "image_size": 32, "patch_size": 8, **overrides}))
    model.save_pretrained(folder, max_shard_size=max_shard_size)
    Tokenizer(WordLevel({"[UNK]": 0, "cat": 1, "dog": 2}, unk_token="[UNK]")).save(str(folder / "tokenizer.json"))
    # The card of a merged model saft_hf pushed: a later push to the same repo may replace it.
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags:\n- merge\n- saft_hf\n---\n\n# tiny\n")
    return folder


def weight_files(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("*.safetensors*"))}


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory) -> Path:
    folder = make_model_folder(tmp_path_factory.mktemp("tiny"))
    assert len(list(folder.glob("*.safetensors"))) > 1, "the fixture is meant to be sharded"
    return folder


@pytest.mark.parametrize(
    ("ref", "revision", "expected"),
    [
        ("org/name", None, ("org/name", None)),
        ("org/name@v1", None, ("org/name", "v1")),
        ("org/name@" + "a" * 40, None, ("org/name", "a" * 40)),
        ("org/name", "main", ("org/name", "main")),
        ("org/name@main", "main", ("org/name", "main")),
        ("gpt2", None, ("gpt2", None)),
        ("./models/name@x", "v2", ("./models/name@x", "v2")),
    ],
)
def test_parse_model_ref(ref, revision, expected):
    assert parse_model_ref(ref, revision) == expected


@pytest.mark.parametrize(("ref", "message"), [("org/name@v1", "pins revision 'v1'"), ("org/name@", "empty revision")])
def test_parse_model_ref_rejects(ref, message):
    with pytest.raises(ValueError, match=message):
        parse_model_ref(ref, "v2")


@pytest.mark.parametrize(
    ("ref", "local"),
    [
        ("org/name", False),
        ("gpt2", False),
        ("org/name@v1", False),
        ("/abs/path", True),
        ("./rel", True),
        ("a/b/c", True),
        ("~/x", True),
    ],
)
def test_is_local(ref, local, tmp_path):
    assert is_local(ref) is local
    assert is_local(str(tmp_path)) is True  # an existing folder, whatever its name


def test_push_is_one_commit_and_pulls_back_byte_identical(hub_server, model_folder):
    sha = push_folder(model_folder, "org/tiny", commit_message="merge")

    assert hub_server.state.commits_made("org/tiny") == [sha]
    remote = hub_server.state.repos["org/tiny"].resolve("main").files
    local = sorted(path.name for path in model_folder.iterdir())
    assert sorted(set(remote) - {".gitattributes"}) == local
    assert all(remote[name].is_lfs for name in local if name.endswith(".safetensors"))
    assert not remote["config.json"].is_lfs

    for ref in ("org/tiny", f"org/tiny@{sha}"):
        snapshot = resolve_model(ref)
        assert snapshot.name == sha
        assert weight_files(snapshot) == weight_files(model_folder)
        assert (snapshot / "tokenizer.json").read_bytes() == (model_folder / "tokenizer.json").read_bytes()
    assert resolved_revision("org/tiny") == sha
    assert resolve_model("org/tiny", revision=sha) == snapshot


def test_old_revision_still_pulls_old_bytes_after_second_push(hub_server, model_folder, tmp_path):
    first = push_folder(model_folder, "org/tiny")
    # Re-saved unsharded: the old shards must go in the same commit, or `model.safetensors` would be ambiguous.
    second_folder = make_model_folder(tmp_path / "v2", seed=1, max_shard_size="10MB")
    second = push_folder(second_folder, "org/tiny")

    assert hub_server.state.commits_made("org/tiny") == [first, second]
    assert weight_files(resolve_model(f"org/tiny@{first}")) == weight_files(model_folder)
    latest = resolve_model("org/tiny")
    assert latest.name == second
    assert weight_files(latest) == weight_files(second_folder)
    assert list(weight_files(latest)) == ["model.safetensors"]
    reloaded = CLIPVisionModel.from_pretrained(latest).state_dict()
    expected = CLIPVisionModel.from_pretrained(second_folder).state_dict()
    assert all(torch.equal(reloaded[name], expected[name]) for name in expected)


def test_push_to_a_branch_leaves_main_alone(hub_server, model_folder, tmp_path):
    main = push_folder(model_folder, "org/tiny")
    branch = push_folder(make_model_folder(tmp_path / "v2", seed=1), "org/tiny", revision="experiment")

    assert resolved_revision("org/tiny") == main
    assert resolved_revision("org/tiny@experiment") == branch
    assert hub_server.state.repos["org/tiny"].commits[branch].parent == main


USER_CARD = b"---\nlicense: mit\ntags:\n- merge\n---\n# my model\n"  # a merge, but not one saft_hf pushed
TASK_VECTOR_CARD = b"---\ntags:\n- saft_hf\n- task-vector\n---\n# a saft_hf task vector\n"


@pytest.mark.parametrize(
    ("files", "held"),
    [
        ({"model.safetensors": b"user weights", "README.md": USER_CARD}, "README.md, model.safetensors"),
        ({"model.safetensors": b"user weights"}, "model.safetensors"),
        ({"model.safetensors": b"w", "README.md": TASK_VECTOR_CARD}, "README.md, model.safetensors"),
        ({f"notes{i}.txt": b"n" for i in range(5)}, "notes0.txt, notes1.txt, notes2.txt (+2 more)"),
    ],
    ids=["user-model", "no-card", "other-saft-hf-kind", "many-files"],
)
def test_push_never_replaces_a_repo_saft_hf_did_not_push_this_kind_of_output_to(hub_server, model_folder, files, held):
    before = upload("org/theirs", files)

    with pytest.raises(UnsafeOutputError) as refused:
        push_folder(model_folder, "org/theirs")

    assert str(refused.value) == (
        f"push_to_hub: Hub repo 'org/theirs' already holds files saft_hf did not push there as a merged model "
        f"({held}); push to a new repo id, or remove those files on the Hub first"
    )
    assert resolved_revision("org/theirs") == before  # no commit: the user's weights and card are still the head


def test_push_target_check_refuses_inputs_and_foreign_repos_before_any_write(hub_server, model_folder, tmp_path):
    upload("org/base", {"model.safetensors": b"w", "README.md": USER_CARD})
    push_folder(model_folder, "org/earlier-merge")  # saft_hf's own merge: may be replaced by the next one

    check_push_target("org/new", "merge")  # does not exist yet
    check_push_target("org/earlier-merge", "merge")
    check_push_target("org/base", "merge", revision="new-branch")  # a branch that does not exist: main untouched
    with pytest.raises(UnsafeOutputError, match="'org/earlier-merge' is one of this run's inputs \\(models\\[1\\]\\)"):
        check_push_target(
            "org/earlier-merge", "merge", inputs=[("base_model", "org/base"), ("models[1]", "org/earlier-merge@v1")]
        )
    with pytest.raises(UnsafeOutputError, match="did not push there as a task vector"):
        check_push_target("org/earlier-merge", "task-vector")
    with pytest.raises(UnsafeOutputError, match="saft_hf only pushes into new or empty repos"):
        check_push_target("org/earlier-merge", None)
    assert hub_server.state.commits_made("org/new") == []


@pytest.mark.parametrize(
    "card",
    [b"---\ntags: not_saft_hf_merge_notes\n---\n", b"---\ntags: {saft_hf: 1, merge: 2}\n---\n"],
    ids=["string", "mapping"],  # a string's `in` matched substrings; a mapping's matched keys
)
def test_a_card_whose_tags_are_not_a_list_is_not_saft_hfs(hub_server, card):
    upload("org/odd-card", {"model.safetensors": b"their weights", "README.md": card})
    with pytest.raises(UnsafeOutputError, match="^push_to_hub: Hub repo 'org/odd-card' already holds files saft_hf"):
        check_push_target("org/odd-card", "merge")


@pytest.mark.parametrize(
    "card",
    [
        b"---\ntags: [saft_hf, merge\n---\n",
        b"---\n- saft_hf\n- merge\n---\n",
        b"---\ntags: [saft_hf, merge]\n---\n\xff\xfe",
        b"no metadata",
    ],
    ids=["malformed-yaml", "not-a-mapping", "not-utf8", "none"],
)
def test_cards_the_client_cannot_parse_have_no_tags(tmp_path, card):
    """Such cards (which the Hub's client refuses to upload, but a repo may hold) were tracebacks in the check."""
    (tmp_path / "README.md").write_bytes(card)
    assert _card_tags(tmp_path / "README.md") == []


def test_push_targets_need_a_namespace_the_hub_online_and_inputs_in_any_case(hub_server, monkeypatch):
    upload("org/merged", {"README.md": b"---\ntags: [saft_hf, merge]\n---\n"})
    with pytest.raises(UnsafeOutputError, match="'Org/Merged' is one of this run's inputs \\(models\\[0\\]\\)"):
        check_push_target("Org/Merged", "merge", inputs=[("models[0]", "org/merged")])  # Hub ids ignore case
    with pytest.raises(ValueError, match="^push_to_hub: give the full repo id 'namespace/merged'"):
        check_push_target("merged", "merge")  # its namespace, hence the repo, is only known once created
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match="^push_to_hub: the Hub is offline"):  # was taken for "no such repo"
        check_push_target("org/new", "merge")


def test_a_commit_landing_after_the_check_fails_the_push_instead_of_being_overwritten(hub_server, model_folder):
    push_folder(model_folder, "org/tiny")
    api, create_commit = HfApi, HfApi.create_commit

    def user_commits_first(self, repo_id, operations, **kwargs):  # someone else's commit lands in between
        create_commit(self, repo_id, [CommitOperationAdd("README.md", b"# mine now")], commit_message="edit")
        return create_commit(self, repo_id, operations, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(api, "create_commit", user_commits_first)
        with pytest.raises(HfHubHTTPError, match="412"):
            push_folder(model_folder, "org/tiny")
    assert hub_server.state.repos["org/tiny"].resolve("main").files["README.md"].content == b"# mine now"


def test_a_push_leaves_weights_in_subfolders_alone(hub_server, model_folder):
    push_folder(model_folder, "org/tiny")
    api = HfApi()
    user_files = {"checkpoint-100/model.safetensors": b"a checkpoint", "adapter/adapter_model.bin": b"an adapter"}
    upload("org/tiny", user_files)
    push_folder(model_folder, "org/tiny")  # root weights are replaced; a subfolder's shadow nothing
    assert set(user_files) <= set(api.list_repo_files("org/tiny"))


def upload(repo_id: str, files: dict[str, bytes | Path]) -> str:
    """Put files in a Hub repo with the plain client (not the code under test)."""
    api = HfApi()
    api.create_repo(repo_id, exist_ok=True)
    operations = [CommitOperationAdd(path, content) for path, content in files.items()]
    return api.create_commit(repo_id, operations, commit_message="fixture").oid


def test_resolve_model_downloads_only_the_files_a_merge_needs(hub_server, model_folder):
    files = {path.name: path for path in model_folder.iterdir()}
    extras = {"pytorch_model.bin": b"\x80pickle" * 50, "training_args.bin": b"\x80args", "notes/extra.dat": b"\x00\x01"}
    upload("org/mixed", {**files, **extras})

    snapshot = resolve_model("org/mixed")

    downloaded = sorted(path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file())
    assert downloaded == sorted(name for name in files if name != "README.md")
    assert hub_server.state.served_files("org/mixed") == set(downloaded)


def test_pickle_only_repo_is_refused_unless_allowed(hub_server, model_folder):
    pickle_weights = b"\x80\x02pickled weights" * 100
    upload("org/legacy", {"config.json": model_folder / "config.json", "pytorch_model.bin": pickle_weights})

    with pytest.raises(PickleWeightsError, match=r"'org/legacy'.*pytorch_model\.bin.*allow_pickle=True"):
        resolve_model("org/legacy")
    assert "pytorch_model.bin" not in hub_server.state.served_files("org/legacy")

    snapshot = resolve_model("org/legacy", allow_pickle=True)
    assert (snapshot / "pytorch_model.bin").read_bytes() == pickle_weights


def test_repo_without_weights_is_an_error(hub_server, model_folder):
    upload("org/config-only", {"config.json": model_folder / "config.json"})
    with pytest.raises(FileNotFoundError, match=r"'org/config-only' has no weights"):
        resolve_model("org/config-only")


def save_config(folder: Path, config) -> str:
    folder.mkdir(parents=True)
    config.to_json_file(folder / "config.json")
    return str(folder)


CLIP_VISION = CLIPVisionConfig(**TINY)
CLIP_FULL = CLIPConfig(text_config=dict(TINY), vision_config=dict(TINY), projection_dim=16)
CLIP_FULL.architectures = ["CLIPModel"]
CLIP_VISION.architectures = ["CLIPVisionModel"]
T5 = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, architectures=["T5ForConditionalGeneration"])
T5_ENCODER = T5Config(d_model=32, d_ff=64, num_layers=2, num_heads=4, d_kv=8, architectures=["T5EncoderModel"])
WIDER_CLIP_VISION = CLIPVisionConfig(**{**TINY, "hidden_size": 64}, architectures=["CLIPVisionModel"])


@pytest.mark.parametrize(
    ("base", "other", "error"),
    [
        (CLIP_VISION, CLIP_VISION, None),
        (CLIP_FULL, CLIP_VISION, None),  # tanganke/clip-vit-base-patch32_<task> into openai/clip-vit-base-patch32
        (CLIP_VISION, CLIP_FULL, None),
        (T5, T5, None),
        (CLIP_VISION, WIDER_CLIP_VISION, r"hidden_size=64 vs the base's 32"),
        (CLIP_FULL, WIDER_CLIP_VISION, r"hidden_size=64 vs the base's 32"),
        (T5, CLIP_VISION, r"model_type='clip_vision_model'.*CLIPVisionModel.*model_type='t5'"),
        (T5, T5_ENCODER, r"architectures=\['T5EncoderModel'\] vs the base's .*\['T5ForConditionalGeneration'\]"),
        (CLIP_VISION, PretrainedConfig(), r"model_type=None, architectures=None vs .*'clip_vision_model'"),
    ],
)
def test_check_same_architecture_cases(tmp_path, base, other, error):
    base_ref = save_config(tmp_path / "base", base)
    fine_tunes = [save_config(tmp_path / "same", base), save_config(tmp_path / "other", other)]
    if error is None:
        check_same_architecture(base_ref, fine_tunes)
    else:
        with pytest.raises(ValueError, match=rf"Input '{fine_tunes[1]}' does not .* base '{base_ref}': {error}"):
            check_same_architecture(base_ref, fine_tunes)


def test_check_same_architecture_skips_local_task_vectors_and_needs_configs(tmp_path):
    base = save_config(tmp_path / "base", CLIP_VISION)
    task_vector = tmp_path / "task_vector"
    task_vector.mkdir()
    metadata = {"format": "saft_hf.task_vector"}
    save_file({"w": torch.zeros(2)}, task_vector / "task_vector.safetensors", metadata=metadata)
    check_same_architecture(base, [str(task_vector)])

    not_a_model = tmp_path / "weights_only"
    not_a_model.mkdir()
    save_file({"w": torch.zeros(2)}, not_a_model / "model.safetensors")
    with pytest.raises(FileNotFoundError, match=rf"'{not_a_model}' has no config.json"):
        check_same_architecture(base, [str(not_a_model)])


def test_check_same_architecture_on_the_hub_reads_configs_only(hub_server, model_folder, tmp_path):
    fine_tune = push_folder(make_model_folder(tmp_path / "ft", seed=1), "org/fine-tune")
    push_folder(model_folder, "org/base")
    t5 = tmp_path / "t5"
    save_config(t5, T5)
    save_file({"shared.weight": torch.zeros(4, 32)}, t5 / "model.safetensors")
    push_folder(t5, "org/t5")

    check_same_architecture("org/base", ["org/fine-tune", "org/fine-tune"], revisions=[None, fine_tune, "main"])
    with pytest.raises(ValueError, match=r"Input 'org/t5@main' does not .* of base 'org/base': model_type='t5'"):
        check_same_architecture("org/base", ["org/fine-tune", "org/t5"], revisions={"org/t5": "main"})

    state = hub_server.state
    requested = {path for repo in ("org/base", "org/fine-tune", "org/t5") for _, path in state.file_requests(repo)}
    assert requested == {"config.json"}
    assert state.lfs_downloads() == []


@pytest.mark.parametrize("call", [resolve_model, fetch_config, resolved_revision], ids=lambda call: call.__name__)
def test_missing_repo_and_revision_give_clear_errors(hub_server, model_folder, call):
    push_folder(model_folder, "org/tiny")
    with pytest.raises(FileNotFoundError, match=r"'org/nope' is neither a local folder nor a model repo on http://127"):
        call("org/nope")
    with pytest.raises(FileNotFoundError, match=r"Revision 'v9' does not exist in Hub repo 'org/tiny'"):
        call("org/tiny@v9")


def test_missing_config_on_the_hub(hub_server, model_folder):
    upload("org/no-config", {"model.safetensors": next(model_folder.glob("*.safetensors"))})
    with pytest.raises(FileNotFoundError, match=r"Hub repo 'org/no-config@main' has no config.json"):
        fetch_config("org/no-config@main")


def test_private_flag_reaches_the_server(hub_server, model_folder):
    push_folder(model_folder, "org/secret", private=True)
    push_folder(model_folder, "org/open")

    assert hub_server.state.repos["org/secret"].private is True
    assert hub_server.state.repos["org/open"].private is False
    # Without the token first: once cached, the client would fall back to the cached file.
    with pytest.raises(FileNotFoundError, match="If the repo is private, pass token="):
        fetch_config("org/secret", token=False)
    assert fetch_config("org/secret")["model_type"] == "clip_vision_model"
    with pytest.raises(PermissionError, match="'org/open' already exists and is public"):
        push_folder(model_folder, "org/open", private=True)


@pytest.mark.parametrize(
    ("token", "server_message"),
    [
        (None, "You must be authenticated to write to the Hub"),
        ("hf_" + "x" * 34, "Invalid credentials in Authorization header"),
    ],
)
def test_writes_need_a_valid_token(hub_server, model_folder, monkeypatch, token, server_message):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(PermissionError, match=rf"refused access to 'org/tiny': {server_message}\. Pass a token"):
        push_folder(model_folder, "org/tiny", token=token)
    assert "org/tiny" not in hub_server.state.repos
    sha = push_folder(model_folder, "org/tiny", token=hub_server.token)
    assert hub_server.state.commits_made("org/tiny") == [sha]


def test_token_is_never_written(hub_server, model_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")  # only the explicit argument carries it
    token = hub_server.token
    folder = shutil.copytree(model_folder, tmp_path / "out")
    sha = push_folder(folder, "org/tiny", private=True, token=token)
    snapshot = resolve_model(f"org/tiny@{sha}", token=token)
    check_same_architecture(str(folder), ["org/tiny"], token=token)
    with pytest.raises(FileNotFoundError) as missing:
        resolve_model("org/tiny@v9", token=token)

    assert token not in str(missing.value) and token not in repr(missing.value.__cause__)
    written = [path for root in (tmp_path, hub_server.home) for path in root.rglob("*") if path.is_file()]
    assert snapshot.is_relative_to(hub_server.cache_dir) and len(written) > 10
    assert not [path for path in written if token.encode() in path.read_bytes()]


def test_fetch_config_reads_local_folders_and_rejects_bad_json(tmp_path, model_folder):
    assert fetch_config(str(model_folder)) == json.loads((model_folder / "config.json").read_text())
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json of '.*broken' is not valid JSON"):
        fetch_config(str(broken))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "missing"))


def test_a_local_folder_with_a_revision_is_refused(tmp_path, monkeypatch):
    """`m/base@main` where `m/base` is a local folder used to read the folder and drop the revision silently."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m" / "base").mkdir(parents=True)
    with pytest.raises(
        ValueError, match=r"^base_model: 'm/base' is a local folder, which has no revisions; drop '@main'$"
    ):
        parse_model_ref("m/base@main", where="base_model")
    assert parse_model_ref("m/other@main") == ("m/other", "main")  # no such folder: a Hub id
