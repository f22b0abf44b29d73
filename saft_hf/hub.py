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
from dataclasses import dataclass
from pathlib import Path

import yaml
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
    RevisionResolutionError,
)
from huggingface_hub.repocard import metadata_load
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects, validate_repo_id

from .errors import OutsideFolderError, PushError, UnsafeOutputError, listed_names
from .layout import CONFIG_NAME, OUTPUT_KIND_TAGS, OUTPUT_MANIFEST_NAME, SAFT_HF_TAG, is_task_vector_folder

__all__ = [
    "HubListing",
    "PickleWeightsError",
    "absolute_ref",
    "check_push_target",
    "check_recorded_base",
    "check_repo_id",
    "check_revision",
    "check_same_architecture",
    "fetch_config",
    "is_local",
    "list_hub_files",
    "names_another_model",
    "parse_model_ref",
    "public_ref",
    "push_folder",
    "reporting_push_failure",
    "resolve_model",
    "resolved_revision",
]

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
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "image_size",
        "patch_size",
        "num_channels",
        "d_model",
        "d_ff",
        "d_kv",
        "num_layers",
        "num_decoder_layers",
        "num_heads",
    }
)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")
# What `git check-ref-format` refuses anywhere in a ref name: ASCII control characters, space, ~ ^ : ? * [ \ and
# the sequences `..` and `@{`. The client builds cache paths from revisions, so `..` could leave its cache.
_REVISION_BAD_TEXT = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{")
LOCAL_MARKER = " (local folder)"
# An absolute or home-relative path inside a longer label, such as the source `(/home/me/a + 0.5*/home/me/b)` of a
# combined task vector: it runs up to whitespace or a parenthesis.
_PATH_IN_LABEL = re.compile(r"(?:^|(?<=[\s(*]))(?:~|/|[A-Za-z]:[\\/])[^\s()]*")


class PickleWeightsError(ValueError):
    """A Hub repo only offers pickle weights (`.bin`, `.pt` ...) and the caller did not opt in with `allow_pickle`."""


def is_local(ref: str) -> bool:
    """Whether `ref` names a local path: it exists, or it cannot be a Hub id (`/abs`, `./rel`, `a/b/c` ...)."""
    if Path(ref).expanduser().exists():
        return True
    return _HUB_ID.fullmatch(ref.partition("@")[0]) is None


def check_revision(revision: str, where: str) -> str:
    """`revision` if git would accept it as a ref name (`git check-ref-format` rules), else `OutsideFolderError`
    naming `where`: the client turns revisions into cache paths, so `..` or `a/../../x` could write outside it."""
    if not isinstance(revision, str):
        raise ValueError(f"{where}: expected a branch, tag or commit sha, got {revision!r}")
    components = revision.split("/")
    if not revision:
        problem = "it is empty"
    elif (bad := _REVISION_BAD_TEXT.search(revision)) is not None:
        problem = f"it contains {bad.group()!r}"
    elif revision == "@":
        problem = "it is '@'"
    elif revision.endswith("."):
        problem = "it ends with '.'"
    elif "" in components:
        problem = "it starts or ends with '/' or contains '//'"
    elif any(part.startswith(".") or part.endswith(".lock") for part in components):
        problem = "a '/'-separated part starts with '.' or ends with '.lock'"
    else:
        return revision
    raise OutsideFolderError(
        f"{where}: revision {revision!r} is not a valid git branch, tag or commit name ({problem}); use a branch, "
        "tag or commit sha of the repo"
    )


def check_repo_id(repo_id: str, where: str) -> str:
    """`repo_id` if it is a valid Hub repo id (`name` or `namespace/name`, the client's `validate_repo_id` rules),
    else `ValueError` naming `where`, before any request is made."""
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{where}: {repo_id!r} is not a valid Hub repo id ({error})") from error
    return repo_id


def parse_model_ref(ref: str, revision: str | None = None, *, where: str | None = None) -> tuple[str, str | None]:
    """Split `org/name@rev` into `("org/name", "rev")`; local paths are returned whole, with `revision`.

    A revision given both ways must agree. The repo id and revision are validated (see `check_repo_id`,
    `check_revision`) before anything is asked of the Hub; errors name `where` (a recipe field such as
    `models[1].model`), or the reference.
    """
    where = where or f"model reference '{ref}'"
    if revision is not None:
        check_revision(revision, where)
    if is_local(ref):
        return ref, revision
    repo_id, at, ref_revision = ref.partition("@")
    if at and Path(repo_id).expanduser().exists():  # it would be read as that folder, the revision dropped
        raise ValueError(f"{where}: '{repo_id}' is a local folder, which has no revisions; drop '@{ref_revision}'")
    check_repo_id(repo_id, f"{where} (not a local folder either)")
    if not at:
        return repo_id, revision
    if not ref_revision:
        raise ValueError(f"{where}: '{ref}' has an empty revision after '@'.")
    check_revision(ref_revision, where)
    if revision is not None and revision != ref_revision:
        raise ValueError(f"{where}: '{ref}' pins revision '{ref_revision}' but revision='{revision}' was given.")
    return repo_id, ref_revision


def absolute_ref(ref: str) -> str:
    """``ref`` with an existing local folder named by its absolute path, so that it names the folder from any working
    directory and is published as a local folder (a relative `m/base` could pass for a Hub id); else as given."""
    path = Path(ref).expanduser()
    return str(path.resolve()) if is_local(ref) and path.exists() else ref


def public_ref(ref: str) -> str:
    """How a model reference is shown where others read it (pushed cards, recipes and task-vector metadata).

    A Hub id (with its `@revision`) is shown as it is. A local path is shown as its folder name followed by
    `" (local folder)"` (`/home/me/runs/eurosat_ft` -> `eurosat_ft (local folder)`): an absolute path would leak
    a user name and folder layout, and a bare folder name could be mistaken for a Hub id. In a longer label (a
    description, or the source `(a + b)` of a combined task vector) each absolute or home-relative path is
    replaced that way. The result never changes when applied again.
    """
    if not is_local(ref):
        return ref
    path = Path(ref).expanduser()
    if path.exists() or not re.search(r"[\s()*]", ref):
        return f"{path.name or path.resolve().name}{LOCAL_MARKER}"
    return _PATH_IN_LABEL.sub(lambda match: public_ref(match.group()), ref)


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
    except (RevisionResolutionError, OfflineModeIsEnabled) as error:
        raise FileNotFoundError(
            f"Model '{repo_id}' is not a local folder, and the Hub ({constants.ENDPOINT}) cannot be reached to look it "
            "up (offline, or HF_HUB_OFFLINE is set): check the path, or go online"
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


@dataclass(frozen=True)
class HubListing:
    """A Hub repo at one commit: what a reference resolves to, known without downloading any file."""

    repo_id: str
    commit: str  # the commit sha the revision resolved to
    files: frozenset[str]


def list_hub_files(ref: str, revision: str | None = None, token: str | bool | None = None) -> HubListing | None:
    """The commit a Hub reference resolves to and the repo's files there (None for a local folder).

    No file is downloaded; it raises `FileNotFoundError` naming the repo or revision when either does not exist
    (a commit sha included), so a recipe can be checked whole before any weights are fetched. The revision is
    resolved as the client does it (recorded in the cache); offline (`HF_HUB_OFFLINE`), the commit and snapshot
    cached by an earlier download are used instead.
    """
    repo_id, revision = parse_model_ref(ref, revision)
    if is_local(repo_id):
        return None
    api = HfApi(token=token)
    with _hub_errors(repo_id, revision):
        commit = api.resolve_revision(repo_id, revision=revision).resolved
        try:
            files = [sibling.rfilename for sibling in api.model_info(repo_id, revision=commit).siblings or []]
        except OfflineModeIsEnabled:
            snapshot = Path(
                snapshot_download(
                    repo_id,
                    revision=commit,
                    allow_patterns=list(NEEDED_FILE_PATTERNS),
                    local_files_only=True,
                    token=token,
                )
            )
            files = [path.relative_to(snapshot).as_posix() for path in snapshot.rglob("*") if path.is_file()]
    return HubListing(repo_id, commit, frozenset(files))


def fetch_config(
    ref: str, revision: str | None = None, token: str | bool | None = None, *, filename: str = CONFIG_NAME
) -> dict:
    """The `config.json` (or another JSON file, e.g. `adapter_config.json`) of a local folder or Hub model,
    downloading nothing else."""
    repo_id, revision = parse_model_ref(ref, revision)
    if is_local(repo_id):
        path = Path(repo_id).expanduser() / filename
        if not path.parent.is_dir():
            raise FileNotFoundError(f"Local model folder '{repo_id}' does not exist (or is not a folder).")
        if not path.is_file():
            raise FileNotFoundError(f"Local model folder '{repo_id}' has no {filename}.")
    else:
        try:
            with _hub_errors(repo_id, revision):
                path = Path(hf_hub_download(repo_id, filename, revision=revision, token=token))
        except RemoteEntryNotFoundError as error:
            raise FileNotFoundError(f"Hub repo {_describe(repo_id, revision)} has no {filename}.") from error
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{filename} of {_describe(repo_id, revision)} is not valid JSON: {error}") from error


def names_another_model(recorded: str, wanted: str) -> bool:
    """Whether the model reference `recorded` (the base a fine-tune records) provably names another model than
    `wanted`: two existing local folders that are not the same folder, or two Hub ids that differ (revisions and
    letter case aside). Anything else cannot be told from the references alone and is not a mismatch: a recorded
    local path that no longer exists (the folder was moved), or a Hub id against a local folder (its download?)."""
    recorded_path, wanted_path = Path(recorded).expanduser(), Path(wanted).expanduser()
    if recorded_path.exists() and wanted_path.exists():
        return recorded_path.resolve() != wanted_path.resolve()
    if recorded_path.exists() or wanted_path.exists() or is_local(recorded) or is_local(wanted):
        return False
    return recorded.partition("@")[0].lower() != wanted.partition("@")[0].lower()


def check_recorded_base(label: str, recorded: str | None, field: str, base_model: str) -> None:
    """Refuse an input whose recorded base (`recorded`, read from `field`) provably is not `base_model`
    (`names_another_model`): a LoRA adapter or FTTS fine-tune only means something on the base it was trained from."""
    if recorded and names_another_model(recorded, base_model):
        raise ValueError(
            f"{label}: records base model {recorded!r} ({field}), not the base_model {base_model!r}; use the base "
            "it was fine-tuned from, or pass allow_other_base=True (recipe: allow_other_base: true; saft-hf: "
            "--allow_other_base) to use it anyway"
        )


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
    An existing repo (branch) that holds anything is replaced only as :func:`check_push_target` allows, judged by
    the kind of saft_hf output the folder's model card names.

    Raises:
        PermissionError: `private=True` but the repo already exists and is public.
        UnsafeOutputError: the repo holds files saft_hf did not push there as this kind of output.
    """
    check_repo_id(repo_id, "repo_id")
    if revision is not None:
        check_revision(revision, "revision")
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"Folder to push '{folder}' does not exist.")
    local_files = _folder_files(folder)
    if not local_files:
        raise ValueError(f"Folder to push '{folder}' is empty.")
    api = HfApi(token=token)
    with _hub_errors(repo_id, revision):
        # Created first (nothing happens to an existing repo) for the full id a namespace-less `repo_id` gets.
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        # The commit checked is the one committed on: a commit landing in between fails the push (HTTP 412) rather
        # than being overwritten, or mixed with this push's weights.
        try:
            head = api.model_info(repo_id, revision=revision).sha
        except RevisionNotFoundError:  # a new branch, made from main below
            head = None
        check_push_target(repo_id, _output_kind(folder), token=token, revision=revision)
        if private and not api.model_info(repo_id).private:
            raise PermissionError(f"Hub repo '{repo_id}' already exists and is public; refusing a private=True push.")
        if revision is not None:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        remote_files = api.list_repo_files(repo_id, revision=head or revision)
        # Root files only: weights a user keeps in a subfolder (a checkpoint, an adapter) shadow nothing.
        root_files = [path for path in remote_files if "/" not in path]
        stale_weights = set(filter_repo_objects(root_files, allow_patterns=list(PUSH_REPLACED_PATTERNS)))
        operations = [CommitOperationDelete(path) for path in sorted(stale_weights - set(local_files))]
        operations += [CommitOperationAdd(path_in_repo=path, path_or_fileobj=folder / path) for path in local_files]
        commit = api.create_commit(
            repo_id, operations, commit_message=commit_message, revision=revision, parent_commit=head
        )
    return commit.oid


def check_push_target(
    repo_id: str,
    kind: str | None,
    *,
    token: str | bool | None = None,
    revision: str | None = None,
    inputs: Sequence[tuple[str, str]] = (),
) -> None:
    """Refuse a push that would replace what saft_hf did not push, before anything is computed or written.

    A push replaces the repo's files of the same names and deletes its other weight files, so it may only go to a
    repo (or branch) that does not exist yet, holds nothing but `.gitattributes`, or whose model card carries the
    `saft_hf` tag and the tag of `kind` (a key of `layout.OUTPUT_KIND_TAGS`: saft_hf pushed the same kind of output
    there); with `kind=None` only to an empty or new repo. Never to one of the run's `inputs` (`(field, reference)`
    pairs: a Hub reference names the repo it reads), whatever it holds.

    Raises:
        UnsafeOutputError: naming the repo, what it holds and what to do.
        ValueError: `repo_id` has no namespace (the repo it names is only known once created), or the Hub is
            offline (`HF_HUB_OFFLINE`): nothing could be checked.
    """
    if "/" not in repo_id:
        raise ValueError(
            f"push_to_hub: give the full repo id 'namespace/{repo_id}' (your user or organisation name), so that the "
            "repo can be checked before anything is written"
        )
    if constants.HF_HUB_OFFLINE:
        raise ValueError("push_to_hub: the Hub is offline (HF_HUB_OFFLINE is set); unset it to push")
    for field, ref in inputs:
        if not is_local(ref) and parse_model_ref(ref)[0].lower() == repo_id.lower():  # Hub ids ignore case
            raise UnsafeOutputError(
                f"push_to_hub: Hub repo '{repo_id}' is one of this run's inputs ({field}); push to another repo id"
            )
    api = HfApi(token=token)
    with _hub_errors(repo_id, revision):
        try:
            files = set(api.list_repo_files(repo_id, revision=revision)) - {".gitattributes"}
        except GatedRepoError:
            raise
        except (RepositoryNotFoundError, RevisionNotFoundError):  # no such repo or branch yet: the push creates it
            return
    if not files:
        return
    tags: list[str] = []
    if kind is not None and "README.md" in files:
        with _hub_errors(repo_id, revision):
            tags = _card_tags(Path(hf_hub_download(repo_id, "README.md", revision=revision, token=token)))
    if kind is not None and SAFT_HF_TAG in tags and kind in tags:
        return
    what = f"as a {OUTPUT_KIND_TAGS[kind]}" if kind is not None else "(saft_hf only pushes into new or empty repos)"
    raise UnsafeOutputError(
        f"push_to_hub: Hub repo {_describe(repo_id, revision)} already holds files saft_hf did not push there "
        f"{what} ({listed_names(sorted(files))}); push to a new repo id, or remove those files on the Hub first"
    )


def _output_kind(folder: Path) -> str | None:
    """The kind of saft_hf output (a key of `layout.OUTPUT_KIND_TAGS`) whose card `folder/README.md` is, or None."""
    card = folder / "README.md"
    tags = _card_tags(card) if card.is_file() else []
    kinds = [kind for kind in OUTPUT_KIND_TAGS if kind in tags]
    return kinds[0] if SAFT_HF_TAG in tags and len(kinds) == 1 else None


def _card_tags(card: Path) -> list[str]:
    """The tags in a model card's metadata; none when it has no metadata mapping with a list of tags (malformed
    YAML, not UTF-8, `tags: "a_saft_hf_note"`): such a card is not one saft_hf wrote."""
    try:
        metadata = metadata_load(card)
    except (ValueError, UnicodeDecodeError, yaml.YAMLError):
        return []
    tags = metadata.get("tags") if isinstance(metadata, dict) else None
    return [tag for tag in tags if isinstance(tag, str)] if isinstance(tags, list) else []


def _failure(error: BaseException) -> str:
    """What failed, in one line: the request and the server's answer (never headers, so never a token)."""
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        request = error.response.request
        answer = error.server_message or error.response.reason_phrase
        text = f"{request.method} {request.url.path} answered HTTP {error.response.status_code}: {answer}"
    elif error.__cause__ is not None:  # the client wraps a failed LFS upload in a RuntimeError naming the file
        text = f"{str(error).rstrip('.')}: {_failure(error.__cause__)}"
    else:
        text = f"{type(error).__name__}: {error}"
    return " ".join(text.split())


@contextmanager
def reporting_push_failure(repo_id: str, local_output: str) -> Iterator[None]:
    """Turn any failure of an upload into a one-line `PushError`: what failed, then `local_output` (where the
    complete local output is, and how to retry). The upload is the last step, so whatever went wrong, the user
    must learn that the local output is complete; the original error stays chained (shown with --debug)."""
    try:
        yield
    except UnsafeOutputError:  # a refused target, not a failed upload: nothing was sent
        raise
    except Exception as error:
        raise PushError(f"Upload to Hub repo '{repo_id}' failed ({_failure(error)}); {local_output}") from error
