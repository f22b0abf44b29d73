"""Model references that are local folders or Hub ids: configs, architecture checks, pulls and one-commit pushes.

A reference is a local folder, or a Hub model id with an optional revision, `org/name@rev` (a branch, a tag or a
commit sha). Hub access goes through the `huggingface_hub` client, so `HF_ENDPOINT`, `HF_HUB_OFFLINE`, the cache and
the usual token sources (`token=`, `HF_TOKEN`, `hf auth login`) all apply. Tokens are only ever handed to that
client: this module writes nothing to disk and puts no token in any message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi, constants, hf_hub_download
from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

__all__ = [
    "PickleWeightsError",
    "check_same_architecture",
    "fetch_config",
    "is_local",
    "parse_model_ref",
    "push_folder",
    "resolve_model",
    "resolved_revision",
]

CONFIG_NAME = "config.json"
# What loading, merging and re-saving a model needs: configs, safetensors weights and their index, tokenizer and
# processor files (tokenizer.json, *.model for SentencePiece, vocab/merges *.txt, chat templates).
NEEDED_FILE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")
PICKLE_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt")
# Remote files a push replaces wholesale: left in place, an old `model.safetensors` would shadow a new sharded
# checkpoint (loaders try the single file first).
PUSH_REPLACED_PATTERNS = ("*.safetensors", "*.safetensors.index.json", *PICKLE_WEIGHT_PATTERNS, "*.bin.index.json")
# Shape-defining config fields compared between inputs (at any depth: `vision_config.hidden_size` ...).
SHAPE_KEYS = frozenset(
    {
        "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
        "head_dim", "vocab_size", "max_position_embeddings", "image_size", "patch_size", "num_channels", "d_model",
        "d_ff", "d_kv", "num_layers", "num_decoder_layers", "num_heads",
    }
)  # fmt: skip
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


class PickleWeightsError(ValueError):
    """A Hub repo only offers pickle weights (`.bin`, `.pt` ...) and the caller did not opt in with `allow_pickle`."""


def is_local(ref: str) -> bool:
    """Whether `ref` names a local path: it exists, or it cannot be a Hub id (`/abs`, `./rel`, `a/b/c` ...)."""
    if Path(ref).expanduser().exists():
        return True
    return _HUB_ID.fullmatch(ref.partition("@")[0]) is None


def parse_model_ref(ref: str, revision: str | None = None) -> tuple[str, str | None]:
    """Split `org/name@rev` into `("org/name", "rev")`; local paths are returned whole, with `revision`.

    A revision given both ways must agree.
    """
    if is_local(ref):
        return ref, revision
    repo_id, at, ref_revision = ref.partition("@")
    if not at:
        return repo_id, revision
    if not ref_revision:
        raise ValueError(f"Model reference '{ref}' has an empty revision after '@'.")
    if revision is not None and revision != ref_revision:
        raise ValueError(f"Model reference '{ref}' pins revision '{ref_revision}' but revision='{revision}' was given.")
    return repo_id, ref_revision


def _describe(repo_id: str, revision: str | None) -> str:
    return f"'{repo_id}'" if revision is None else f"'{repo_id}@{revision}'"


@contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Turn the client's HTTP errors into messages naming the model reference (and never a token)."""
    try:
        yield
    except RevisionNotFoundError as error:
        raise FileNotFoundError(
            f"Revision '{revision}' does not exist in Hub repo '{repo_id}' ({constants.ENDPOINT})."
        ) from error
    except GatedRepoError as error:
        raise PermissionError(
            f"Hub repo '{repo_id}' is gated: accept its conditions on {constants.ENDPOINT}/{repo_id} and pass a token."
        ) from error
    except RepositoryNotFoundError as error:
        raise FileNotFoundError(
            f"Model '{repo_id}' is neither a local folder nor a model repo on {constants.ENDPOINT}. If the repo is "
            "private, pass token= or log in with `hf auth login`."
        ) from error
    except HfHubHTTPError as error:
        if error.response.status_code not in (401, 403):
            raise
        raise PermissionError(
            f"The Hub ({constants.ENDPOINT}) refused access to '{repo_id}': {error.server_message}. Pass a token with "
            "write access as token=, set HF_TOKEN, or log in with `hf auth login`."
        ) from error


def resolved_revision(ref: str, revision: str | None = None, token: str | bool | None = None) -> str | None:
    """The commit sha a Hub reference points to now (None for a local folder), to record in recipes and cards.

    Full 40-character shas are immutable and returned as given; offline, the sha cached by an earlier download is used.
    """
    repo_id, revision = parse_model_ref(ref, revision)
    if is_local(repo_id):
        return None
    with _hub_errors(repo_id, revision):
        return HfApi(token=token).resolve_revision(repo_id, revision=revision).resolved


def fetch_config(ref: str, revision: str | None = None, token: str | bool | None = None) -> dict:
    """The `config.json` of a local folder or Hub model, downloading nothing else."""
    repo_id, revision = parse_model_ref(ref, revision)
    if is_local(repo_id):
        path = Path(repo_id).expanduser() / CONFIG_NAME
        if not path.is_file():
            raise FileNotFoundError(f"Local model folder '{repo_id}' has no {CONFIG_NAME}.")
    else:
        try:
            with _hub_errors(repo_id, revision):
                path = Path(hf_hub_download(repo_id, CONFIG_NAME, revision=revision, token=token))
        except RemoteEntryNotFoundError as error:
            raise FileNotFoundError(f"Hub repo {_describe(repo_id, revision)} has no {CONFIG_NAME}.") from error
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{CONFIG_NAME} of {_describe(repo_id, revision)} is not valid JSON: {error}") from error


def _architecture_view(config: dict, model_type: str | None) -> dict | None:
    """The part of `config` describing a `model_type` model: the config itself or one of its sub-configs.

    This is what lets a CLIP vision tower saved as `CLIPVisionModel` (model_type `clip_vision_model`) be merged
    into the `vision_config` part of a full `CLIPModel` base.
    """
    if model_type is None:
        return None
    if config.get("model_type") == model_type:
        return config
    return next((sub for sub in config.values() if isinstance(sub, dict) and sub.get("model_type") == model_type), None)


def _shape_fields(config: dict, prefix: str = "") -> dict[str, object]:
    fields = {}
    for key, value in config.items():
        if isinstance(value, dict):
            fields |= _shape_fields(value, f"{prefix}{key}.")
        elif key in SHAPE_KEYS:
            fields[prefix + key] = value
    return fields


def _architecture_difference(base: dict, other: dict) -> str | None:
    """How `other`'s config is incompatible with `base`'s, or None if it is compatible."""
    base_view, other_view = _architecture_view(base, other.get("model_type")), other
    if base_view is None:
        base_view, other_view = base, _architecture_view(other, base.get("model_type"))
    if other_view is None:
        return (
            f"model_type={other.get('model_type')!r}, architectures={other.get('architectures')} vs the base's "
            f"model_type={base.get('model_type')!r}, architectures={base.get('architectures')}"
        )
    if base_view is base and other_view is other:
        base_architectures, other_architectures = base.get("architectures"), other.get("architectures")
        if base_architectures and other_architectures and base_architectures != other_architectures:
            return f"architectures={other_architectures} vs the base's architectures={base_architectures}"
    base_shapes, other_shapes = _shape_fields(base_view), _shape_fields(other_view)
    differing = [key for key in base_shapes.keys() & other_shapes.keys() if base_shapes[key] != other_shapes[key]]
    if differing:
        return ", ".join(f"{key}={other_shapes[key]!r} vs the base's {base_shapes[key]!r}" for key in sorted(differing))
    return None


def check_same_architecture(
    base: str,
    others: Sequence[str],
    revisions: Sequence[str | None] | Mapping[str, str | None] | None = None,
    token: str | bool | None = None,
) -> None:
    """Check from the configs alone, before any weights are downloaded, that every input fits the base.

    Compares `model_type` and `architectures`, and the shape-defining fields (`hidden_size`, `num_hidden_layers`
    ...) present in both. An input may also be a sub-model of the base (a `CLIPVisionModel` fine-tune of a
    `CLIPModel`), or the reverse. Local task vector folders carry no config (their base fingerprint is checked
    when they are applied) and are skipped.

    Args:
        revisions: per-reference revisions, as a mapping from reference to revision, or a sequence parallel to
            `[base, *others]` or to `others`. Revisions may also be given inline as `org/name@rev`.

    Raises:
        ValueError: naming the first input that differs and both values.
    """
    refs = [base, *others]
    if revisions is None:
        revisions = [None] * len(refs)
    elif isinstance(revisions, Mapping):
        revisions = [revisions.get(ref) for ref in refs]
    elif len(revisions) == len(others):
        revisions = [None, *revisions]
    elif len(revisions) != len(refs):
        raise ValueError(
            f"revisions has {len(revisions)} entries; expected {len(others)} (one per input) or {len(refs)} "
            "(base first)."
        )
    from .task_vectors import is_task_vector_folder

    base_config = fetch_config(base, revisions[0], token=token)
    for ref, revision in zip(others, revisions[1:]):
        if is_local(ref) and is_task_vector_folder(Path(ref).expanduser()):
            continue
        difference = _architecture_difference(base_config, fetch_config(ref, revision, token=token))
        if difference is not None:
            name = ref if revision is None else f"{ref}@{revision}"
            raise ValueError(f"Input '{name}' does not have the architecture of base '{base}': {difference}.")


def resolve_model(
    ref: str, revision: str | None = None, *, allow_pickle: bool = False, token: str | bool | None = None
) -> Path:
    """A local folder holding `ref`'s files: a local folder as is, or a snapshot of the Hub repo with only the
    files a merge needs (configs, safetensors weights and index, tokenizer and processor files).

    Pickle weights (`.bin`, `.pt` ...) can run code when loaded: they are downloaded only for a repo that has no
    safetensors weights, and only with `allow_pickle=True`.
    """
    repo_id, revision = parse_model_ref(ref, revision)
    if is_local(repo_id):
        path = Path(repo_id).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"Local model folder '{repo_id}' does not exist (or is not a folder).")
        return path
    with _hub_errors(repo_id, revision):
        patterns = list(NEEDED_FILE_PATTERNS)
        snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, token=token))
        if any(snapshot.rglob("*.safetensors")):
            return snapshot
        # Snapshot folders are named by commit sha: list and fetch that exact commit.
        repo_files = HfApi(token=token).list_repo_files(repo_id, revision=snapshot.name)
        pickle_files = sorted(filter_repo_objects(repo_files, allow_patterns=list(PICKLE_WEIGHT_PATTERNS)))
        if not pickle_files:
            raise FileNotFoundError(
                f"Hub repo {_describe(repo_id, revision)} has no weights (no *.safetensors, no pickle files); "
                f"files: {sorted(repo_files)}."
            )
        if not allow_pickle:
            raise PickleWeightsError(
                f"Hub repo {_describe(repo_id, revision)} only has pickle weights ({', '.join(pickle_files)}), which "
                "can run arbitrary code when loaded. Pass allow_pickle=True (recipe: `allow_pickle: true`) if you "
                "trust it."
            )
        return Path(
            snapshot_download(
                repo_id,
                revision=snapshot.name,
                allow_patterns=[*patterns, *PICKLE_WEIGHT_PATTERNS],
                token=token,
            )
        )


# saft_hf's record of the files it wrote into an output folder (see saft_hf.checkpoints): local, never pushed.
OUTPUT_MANIFEST_NAME = ".saft_hf_output.json"


def _folder_files(folder: Path) -> list[str]:
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(files, ignore_patterns=[*DEFAULT_IGNORE_PATTERNS, OUTPUT_MANIFEST_NAME]))


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Upload with saft_hf",
    token: str | bool | None = None,
    revision: str | None = None,
) -> str:
    """Upload everything in `folder` to the Hub model repo `repo_id` as ONE commit; return the commit sha.

    The repo is created if missing (private if asked) and so is the branch `revision`. Weight files on the Hub
    that the folder does not have (say, the shards of an earlier, differently sharded push) are deleted in the
    same commit. `upload_folder` is not used: with Xet enabled it may split a large folder into several commits.

    Raises:
        PermissionError: `private=True` but the repo already exists and is public.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder to push '{folder}' does not exist.")
    local_files = _folder_files(folder)
    if not local_files:
        raise ValueError(f"Folder to push '{folder}' is empty.")
    api = HfApi(token=token)
    with _hub_errors(repo_id, revision):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private and not api.model_info(repo_id).private:
            raise PermissionError(f"Hub repo '{repo_id}' already exists and is public; refusing a private=True push.")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote_files = api.list_repo_files(repo_id, revision=revision)
        stale_weights = set(filter_repo_objects(remote_files, allow_patterns=list(PUSH_REPLACED_PATTERNS)))
        operations = [CommitOperationDelete(path) for path in sorted(stale_weights - set(local_files))]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in local_files]
        commit = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision)
    return commit.oid
