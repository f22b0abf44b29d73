"""A local stand-in for the Hugging Face Hub, for tests: the protocol subset `huggingface_hub` 2.x speaks.

The real client (`HfApi`, `hf_hub_download`, `snapshot_download`, `create_commit`) talks to it over HTTP through
`HF_ENDPOINT`, so the code under test runs exactly as against huggingface.co:

- `POST /api/repos/create` (409 if it exists), `POST /api/models/{id}/branch/{branch}`
- `POST /api/validate-yaml` (README metadata must parse to a mapping; `base_model_relation` is checked)
- `POST /api/models/{id}/preupload/{rev}`: "lfs" for files the repo's `.gitattributes` tracks, binary or >= 10 MiB
- `POST /{id}.git/info/lfs/objects/batch` -> basic transfer: PUT to a "CDN" URL, then POST verify
- `POST /api/models/{id}/commit/{rev}` with NDJSON `header`/`file`/`lfsFile`/`deletedFile`/`deletedFolder` lines
- `GET /api/models/{id}[/revision/{rev}]`, `GET /api/models/{id}/tree/{rev}[/{path}]` (`recursive`)
- `HEAD`/`GET /{id}/resolve/{rev}/{path}`: regular files are served with `ETag` (git blob id), `X-Repo-Commit`
  and `Content-Length`; LFS files answer 302 to the CDN with `X-Linked-Etag` (sha256) and `X-Linked-Size`.

The "CDN" is the same server reached as `localhost` instead of `127.0.0.1`: another origin, so the client treats
it as the real Hub's CDN (metadata taken from the 302, no `Authorization` header sent there).
Errors carry `X-Error-Code` (`RepoNotFound`, `RevisionNotFound`, `EntryNotFound`) as the Hub does.
Writes need the server's token; private repos are invisible (404 `RepoNotFound`) without it.
`HubState.fail_next(route, count)` makes the next requests to a route answer 500, to test failing uploads.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import itertools
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import pytest
import yaml

NAMESPACE_OF_TOKEN_OWNER = "test-user"
REGULAR_FILE_MAX_SIZE = 10 * 1024 * 1024
VALID_BASE_MODEL_RELATIONS = {"adapter", "merge", "quantized", "finetune"}
# The `.gitattributes` the Hub commits when it creates a model repo (abridged to the weight and archive formats).
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.bin",
        "*.safetensors",
        "*.pt",
        "*.pth",
        "*.ckpt",
        "*.h5",
        "*.msgpack",
        "*.onnx",
        "*.model",
        "*.npy",
        "*.npz",
        "*.pkl",
        "*.pickle",
        "*.tar.gz",
        "*.zip",
        "*tfevents*",
    )
)


def git_blob_id(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


def _object_id(repo_id: str) -> str:
    """A stable MongoDB-style id, as the Hub gives every repo."""
    return hashlib.md5(repo_id.encode()).hexdigest()[:24]


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


class HubError(Exception):
    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None, **body):
        super().__init__(message)
        self.status, self.message, self.error_code = status, message, error_code
        self.headers, self.body = headers or {}, body


@dataclass(frozen=True)
class StoredFile:
    content: bytes
    is_lfs: bool

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()

    @property
    def lfs_pointer(self) -> bytes:
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {len(self.content)}\n"
        return pointer.encode()

    def lfs_entry(self, sha256_key: str) -> dict:
        """The `lfs` field of a listing: the Hub calls the sha256 `oid` in trees and `sha256` in model info."""
        return {sha256_key: self.sha256, "size": len(self.content), "pointerSize": len(self.lfs_pointer)}

    @property
    def git_oid(self) -> str:
        """The git object id: of the content for regular files, of the pointer file for LFS files."""
        return git_blob_id(self.lfs_pointer if self.is_lfs else self.content)


@dataclass(frozen=True)
class Commit:
    oid: str
    parent: str | None
    summary: str
    files: Mapping[str, StoredFile]
    date: str


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    created_at: str = field(default_factory=_now)

    def resolve(self, revision: str) -> Commit:
        """A branch name, a full commit sha, or an unambiguous sha prefix of at least 7 characters."""
        if revision in self.branches:
            return self.commits[self.branches[revision]]
        if revision in self.commits:
            return self.commits[revision]
        matches = [oid for oid in self.commits if len(revision) >= 7 and oid.startswith(revision)]
        if len(matches) == 1:
            return self.commits[matches[0]]
        raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def lfs_patterns(self, commit: Commit) -> list[str]:
        gitattributes = commit.files.get(".gitattributes")
        lines = gitattributes.content.decode().splitlines() if gitattributes else []
        return [line.split()[0] for line in lines if "filter=lfs" in line]


@dataclass(frozen=True)
class LoggedRequest:
    method: str
    route: str | None  # the handler that served it
    params: Mapping[str, str]  # from the URL path: repo, rev, path, oid ...
    query: Mapping[str, list[str]]


class HubState:
    """Everything the server stores, plus a log of what clients asked for (for assertions in tests)."""

    def __init__(self, token: str):
        self.token = token
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}  # uploaded (not necessarily committed) LFS objects by sha256
        self.requests: list[LoggedRequest] = []
        self.commit_log: list[tuple[str, str]] = []  # (repo_id, commit oid) for each commit made by a client
        self.faults: dict[str, list[int]] = {}  # route -> statuses the next requests to it answer with
        self.injected: list[tuple[str, int]] = []  # (route, status) of every injected failure served
        self._counter = itertools.count()

    # --- helpers for tests ---------------------------------------------------------------------------------------
    def fail_next(self, route: str, count: int = 1, status: int = 500) -> None:
        """Make the next `count` requests to `route` (a handler name: "commit", "preupload", "lfs_batch",
        "lfs_put" ...) answer `status` with an error message, before the handler runs (nothing is stored)."""
        with self.lock:
            self.faults.setdefault(route, []).extend([status] * count)

    def commits_made(self, repo_id: str) -> list[str]:
        """Commit oids created through the commit endpoint (the Hub's initial `.gitattributes` commit excluded)."""
        return [oid for repo, oid in self.commit_log if repo == repo_id]

    def file_requests(self, repo_id: str) -> list[tuple[str, str]]:
        """(method, filename) of every `/resolve/` request on this repo, HEAD included."""
        return [
            (request.method, request.params["path"])
            for request in self.requests
            if request.route == "resolve" and request.params["repo"] == repo_id
        ]

    def lfs_downloads(self, repo_id: str | None = None) -> list[str]:
        """Filenames of the LFS files sent from the CDN (of one repo, or of all)."""
        return [
            request.query["filename"][0]
            for request in self.requests
            if request.route == "lfs_get" and request.method == "GET" and repo_id in (None, request.query["repo_id"][0])
        ]

    def served_files(self, repo_id: str) -> set[str]:
        """Files of this repo whose content was sent to a client (regular files, or LFS files from the CDN)."""
        regular = {path for method, path in self.file_requests(repo_id) if method == "GET"}
        return regular | set(self.lfs_downloads(repo_id))

    # --- storage -------------------------------------------------------------------------------------------------
    def new_commit(self, repo: Repo, parent: Commit | None, summary: str, files: dict[str, StoredFile]) -> Commit:
        listing = sorted((path, stored.git_oid) for path, stored in files.items())
        seed = json.dumps([repo.repo_id, parent.oid if parent else None, summary, listing, next(self._counter)])
        commit = Commit(hashlib.sha1(seed.encode()).hexdigest(), parent.oid if parent else None, summary, files, _now())
        repo.commits[commit.oid] = commit
        return commit


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, payload, status: int = 200, headers: dict | None = None) -> Response:
        return cls(status, json.dumps(payload).encode(), {"Content-Type": "application/json", **(headers or {})})


API_REPO = r"/api/models/(?P<repo>[^/]+/[^/]+)"
GIT_REPO = r"/(?P<repo>[^/]+/[^/]+)\.git/info/lfs/objects"


class HubRequestHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    server: LocalHubServer

    # --- plumbing ------------------------------------------------------------------------------------------------
    def log_message(self, format, *args):  # noqa: A002 - silence the default per-request stderr logging
        pass

    def do_GET(self):
        self._dispatch("GET")

    def do_HEAD(self):
        self._dispatch("HEAD")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def _routes(self) -> list[tuple[tuple[str, ...], str, Callable[..., Response]]]:
        return [
            (("POST",), r"/api/repos/create", self.create_repo),
            (("POST",), r"/api/validate-yaml", self.validate_yaml),
            (("GET",), API_REPO + r"(?:/revision/(?P<rev>.+))?", self.model_info),
            (("GET",), API_REPO + r"/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?", self.tree),
            (("POST",), API_REPO + r"/preupload/(?P<rev>[^/]+)", self.preupload),
            (("POST",), API_REPO + r"/commit/(?P<rev>[^/]+)", self.commit),
            (("POST",), API_REPO + r"/branch/(?P<branch>[^/]+)", self.create_branch),
            (("POST",), GIT_REPO + r"/batch", self.lfs_batch),
            (("POST",), GIT_REPO + r"/verify", self.lfs_verify),
            (("PUT",), r"/lfs-blobs/(?P<oid>[0-9a-f]{64})", self.lfs_put),
            (("GET", "HEAD"), r"/lfs-blobs/(?P<oid>[0-9a-f]{64})", self.lfs_get),
            (("GET", "HEAD"), r"/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)", self.resolve),
        ]

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        query = parse_qs(url.query)
        state = self.server.state
        body = self._read_body() if method in ("POST", "PUT") else b""
        try:
            for methods, pattern, handler in self._routes():
                match = re.fullmatch(pattern, url.path)
                if method in methods and match:
                    params = {key: unquote(value) for key, value in match.groupdict().items() if value is not None}
                    with state.lock:
                        state.requests.append(LoggedRequest(method, handler.__name__, params, query))
                        if state.faults.get(handler.__name__):
                            status = state.faults[handler.__name__].pop(0)
                            state.injected.append((handler.__name__, status))
                            raise HubError(status, f"Injected failure of {handler.__name__}")
                        response = handler(body=body, query=query, **params)
                    break
            else:
                with state.lock:
                    state.requests.append(LoggedRequest(method, None, {}, query))
                raise HubError(404, f"No route for {method} {url.path}")
        except HubError as error:
            headers = {"X-Error-Message": error.message, **error.headers}
            if error.error_code:
                headers["X-Error-Code"] = error.error_code
            response = Response.json({"error": error.message, **error.body}, error.status, headers)
        self._send(method, response)

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip(), 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # optional trailers, up to the blank line
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, method: str, response: Response) -> None:
        self.send_response(response.status)
        headers = {"Content-Length": str(len(response.body)), **response.headers}
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(response.body)

    # --- auth and lookups ----------------------------------------------------------------------------------------
    def _authenticated(self) -> bool:
        return self.headers.get("Authorization", "") == f"Bearer {self.server.state.token}"

    def _require_write_access(self) -> None:
        if not self.headers.get("Authorization"):
            raise HubError(401, "You must be authenticated to write to the Hub")
        if not self._authenticated():
            raise HubError(401, "Invalid credentials in Authorization header")

    def _repo(self, repo_id: str) -> Repo:
        repo = self.server.state.repos.get(repo_id)
        if repo is None or (repo.private and not self._authenticated()):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    def _branch_head(self, repo: Repo, revision: str) -> Commit:
        if revision not in repo.branches:
            raise HubError(404, f"Invalid rev id: {revision} (commits go to a branch)", "RevisionNotFound")
        return repo.commits[repo.branches[revision]]

    # --- repos ---------------------------------------------------------------------------------------------------
    def create_repo(self, body: bytes, query) -> Response:
        self._require_write_access()
        payload = json.loads(body)
        if payload.get("type", "model") != "model":
            raise HubError(400, "This test server only hosts model repos")
        repo_id = f"{payload.get('organization') or NAMESPACE_OF_TOKEN_OWNER}/{payload['name']}"
        url = f"{self.server.endpoint}/{repo_id}"
        state = self.server.state
        if repo_id in state.repos:
            raise HubError(409, "You already created this model repo", url=url)
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        gitattributes = StoredFile(DEFAULT_GITATTRIBUTES.encode(), is_lfs=False)
        initial = state.new_commit(repo, None, "initial commit", {".gitattributes": gitattributes})
        repo.branches["main"] = initial.oid
        state.repos[repo_id] = repo
        return Response.json({"url": url, "name": repo_id, "id": _object_id(repo_id)})

    def create_branch(self, body: bytes, query, repo: str, branch: str) -> Response:
        self._require_write_access()
        hub_repo = self._repo(repo)
        if branch in hub_repo.branches:
            raise HubError(409, f"Reference already exists: {branch}")
        starting_point = json.loads(body or b"{}").get("startingPoint") or "main"
        hub_repo.branches[branch] = hub_repo.resolve(starting_point).oid
        return Response.json({})

    def model_info(self, body: bytes, query, repo: str, rev: str = "main") -> Response:
        hub_repo = self._repo(repo)
        commit = hub_repo.resolve(rev)
        with_blobs = query.get("blobs", ["false"])[0].lower() in ("1", "true")
        siblings = []
        for path, stored in sorted(commit.files.items()):
            sibling = {"rfilename": path}
            if with_blobs:
                sibling |= {"size": len(stored.content), "blobId": stored.git_oid}
                if stored.is_lfs:
                    sibling["lfs"] = stored.lfs_entry("sha256")
            siblings.append(sibling)
        info = {
            "_id": _object_id(repo),
            "id": repo,
            "modelId": repo,
            "author": repo.split("/")[0],
            "sha": commit.oid,
            "private": hub_repo.private,
            "disabled": False,
            "gated": False,
            "createdAt": hub_repo.created_at,
            "lastModified": commit.date,
            "tags": [],
            "siblings": siblings,
        }
        readme = commit.files.get("README.md")
        if readme is not None and (metadata := _front_matter(readme.content.decode())):
            info["cardData"] = metadata
        return Response.json(info)

    def tree(self, body: bytes, query, repo: str, rev: str, path: str = "") -> Response:
        commit = self._repo(repo).resolve(rev)
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        root = path.strip("/")
        prefix = f"{root}/" if root else ""
        if root and root not in commit.files and not any(name.startswith(prefix) for name in commit.files):
            raise HubError(404, f"{root} does not exist on {rev}", "EntryNotFound")
        entries: dict[str, dict] = {}
        for name, stored in sorted(commit.files.items()):
            if not name.startswith(prefix):
                continue
            parts = name[len(prefix) :].split("/")
            folders = [prefix + "/".join(parts[: depth + 1]) for depth in range(len(parts) - 1)]
            for folder in folders if recursive else folders[:1]:
                entries.setdefault(folder, {"type": "directory", "oid": git_blob_id(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                entry = {"type": "file", "oid": stored.git_oid, "size": len(stored.content), "path": name}
                if stored.is_lfs:
                    entry["lfs"] = stored.lfs_entry("oid")
                entries[name] = entry
        return Response.json(list(entries.values()))

    # --- uploads -------------------------------------------------------------------------------------------------
    def validate_yaml(self, body: bytes, query) -> Response:
        content = json.loads(body)["content"]
        try:
            metadata = _front_matter(content)
        except yaml.YAMLError as error:
            return Response.json({"errors": [{"message": f"Invalid YAML: {error}"}]}, 400)
        errors = []
        relation = metadata.get("base_model_relation")
        if relation is not None and relation not in VALID_BASE_MODEL_RELATIONS:
            errors.append({"message": f'"base_model_relation" must be one of {sorted(VALID_BASE_MODEL_RELATIONS)}'})
        base_models = metadata.get("base_model", [])
        for base_model in [base_models] if isinstance(base_models, str) else base_models:
            if not (isinstance(base_model, str) and re.fullmatch(r"[\w.\-]+(/[\w.\-]+)?", base_model)):
                errors.append({"message": f'"base_model" must be Hub model ids, got {base_model!r}'})
        return Response.json({"errors": errors, "warnings": []}, 400 if errors else 200)

    def preupload(self, body: bytes, query, repo: str, rev: str) -> Response:
        self._require_write_access()
        hub_repo = self._repo(repo)
        head = self._branch_head(hub_repo, rev)
        patterns = hub_repo.lfs_patterns(head)
        files = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            is_lfs = (
                any(fnmatch.fnmatch(Path(file["path"]).name, pattern) for pattern in patterns)
                or file["size"] >= REGULAR_FILE_MAX_SIZE
                or b"\0" in sample
            )
            existing = head.files.get(file["path"])
            remote_oid = None if existing is None else (existing.sha256 if existing.is_lfs else existing.git_oid)
            upload_mode = "lfs" if is_lfs else "regular"
            files.append({"path": file["path"], "uploadMode": upload_mode, "shouldIgnore": False, "oid": remote_oid})
        return Response.json({"files": files, "commitOid": head.oid})

    def lfs_batch(self, body: bytes, query, repo: str) -> Response:
        self._require_write_access()
        self._repo(repo)
        payload = json.loads(body)
        if payload.get("operation") != "upload" or "basic" not in payload.get("transfers", ["basic"]):
            raise HubError(400, "Only the basic upload transfer is supported")
        objects = []
        for item in payload["objects"]:
            entry = {"oid": item["oid"], "size": item["size"], "authenticated": True}
            if item["oid"] not in self.server.state.lfs_objects:  # already-stored objects get no actions
                entry["actions"] = {
                    "upload": {"href": f"{self.server.cdn}/lfs-blobs/{item['oid']}", "expires_in": 900},
                    "verify": {"href": f"{self.server.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        return Response.json({"transfer": "basic", "objects": objects}, headers=lfs_json)

    def lfs_put(self, body: bytes, query, oid: str) -> Response:
        if hashlib.sha256(body).hexdigest() != oid:
            raise HubError(400, f"Uploaded content does not hash to {oid}")
        self.server.state.lfs_objects[oid] = body
        return Response(200, b"", {"ETag": f'"{oid}"'})

    def lfs_verify(self, body: bytes, query, repo: str) -> Response:
        self._require_write_access()
        payload = json.loads(body)
        stored = self.server.state.lfs_objects.get(payload["oid"])
        if stored is None or len(stored) != payload["size"]:
            raise HubError(404, f"LFS object {payload['oid']} was not uploaded with size {payload['size']}")
        return Response.json({"success": True})

    def commit(self, body: bytes, query, repo: str, rev: str) -> Response:
        self._require_write_access()
        if query.get("create_pr"):
            raise HubError(400, "Pull requests are not supported by this test server")
        state, hub_repo = self.server.state, self._repo(repo)
        head = self._branch_head(hub_repo, rev)
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        if not lines or lines[0]["key"] != "header":
            raise HubError(400, "The first NDJSON line of a commit must be its header")
        header = lines[0]["value"]
        if header.get("parentCommit") not in (None, head.oid):
            raise HubError(412, f"A commit has happened since {header['parentCommit']}: the branch is at {head.oid}")
        files = dict(head.files)
        for line in lines[1:]:
            key, value = line["key"], line["value"]
            path = value["path"]
            if key == "file":
                content = value["content"].encode()
                if value.get("encoding") == "base64":
                    content = base64.b64decode(content)
                if len(content) >= REGULAR_FILE_MAX_SIZE or b"\0" in content:
                    raise HubError(400, f"Your push was rejected: {path} is binary or too large for a regular file")
                files[path] = StoredFile(content, is_lfs=False)
            elif key == "lfsFile":
                content = state.lfs_objects.get(value["oid"])
                if content is None:
                    raise HubError(400, f"Your push was rejected: LFS object {value['oid']} of {path} was not uploaded")
                files[path] = StoredFile(content, is_lfs=True)
            elif key == "deletedFile":
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                files = {name: stored for name, stored in files.items() if not name.startswith(path.rstrip("/") + "/")}
            else:
                raise HubError(400, f"Unknown commit operation {key!r}")
        commit = state.new_commit(hub_repo, head, header["summary"], files)
        hub_repo.branches[rev] = commit.oid
        state.commit_log.append((repo, commit.oid))
        commit_url = f"{self.server.endpoint}/{repo}/commit/{commit.oid}"
        return Response.json({"success": True, "commitOid": commit.oid, "commitUrl": commit_url, "hookOutput": ""})

    # --- downloads -----------------------------------------------------------------------------------------------
    def resolve(self, body: bytes, query, repo: str, rev: str, path: str) -> Response:
        commit = self._repo(repo).resolve(rev)
        stored = commit.files.get(path)
        if stored is None:
            raise HubError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.oid})
        headers = {"X-Repo-Commit": commit.oid, "ETag": f'"{stored.git_oid}"', "Accept-Ranges": "bytes"}
        if stored.is_lfs:
            location = f"{self.server.cdn}/lfs-blobs/{stored.sha256}?" + urlencode({"repo_id": repo, "filename": path})
            headers |= {
                "Location": location,
                "X-Linked-Etag": f'"{stored.sha256}"',
                "X-Linked-Size": str(len(stored.content)),
            }
            return Response(302, b"", headers)
        return Response(200, stored.content, {**headers, "Content-Type": "application/octet-stream"})

    def lfs_get(self, body: bytes, query, oid: str) -> Response:
        content = self.server.state.lfs_objects.get(oid)
        if content is None:
            raise HubError(404, "No such object")
        return Response(200, content, {"ETag": f'"{oid}"', "Content-Type": "application/octet-stream"})


def _front_matter(readme: str) -> dict:
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", readme, flags=re.DOTALL)
    metadata = yaml.safe_load(match.group(1)) if match else {}
    if not isinstance(metadata or {}, dict):
        raise yaml.YAMLError("the metadata block is not a mapping")
    return metadata or {}


class LocalHubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, token: str):
        super().__init__(("127.0.0.1", 0), HubRequestHandler)
        port = self.server_address[1]
        self.endpoint = f"http://127.0.0.1:{port}"
        self.cdn = f"http://localhost:{port}"  # same server, another origin: plays the Hub's LFS CDN
        self.state = HubState(token)
        self._thread = threading.Thread(target=self.serve_forever, name="local-hub", daemon=True)

    def start(self) -> LocalHubServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self.shutdown()
        self.server_close()

    def reset(self) -> None:
        self.state = HubState(self.state.token)


@dataclass
class LocalHub:
    """What the `hub_server` fixture hands to a test."""

    server: LocalHubServer
    home: Path

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def token(self) -> str:
        return self.server.state.token

    @property
    def state(self) -> HubState:
        return self.server.state

    @property
    def cache_dir(self) -> Path:
        return self.home / "hub"


def instant_retries(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make the client's retries of 5xx answers (`http_backoff`: 1 try + 5 retries, waiting 1 s, 2 s ... 8 s)
    immediate; the waits it asked for are recorded in the returned list."""
    from types import SimpleNamespace

    from huggingface_hub.utils import _http

    waits: list[float] = []
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=waits.append))
    return waits


@pytest.fixture(scope="session")
def hub_server_session() -> Iterator[LocalHubServer]:
    token = "hf_" + secrets.token_urlsafe(30).replace("-", "a").replace("_", "b")[:34]
    server = LocalHubServer(token).start()
    yield server
    server.stop()


@pytest.fixture
def hub_server(
    hub_server_session: LocalHubServer, monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalHub]:
    """A clean local Hub, with `huggingface_hub` pointed at it, a throwaway `HF_TOKEN` and an empty `HF_HOME`.

    `huggingface_hub.constants` computes the endpoint, cache paths and the offline/Xet/telemetry switches once, at
    import time (and the suite's conftest imports it with `HF_HUB_OFFLINE=1`), so setting the environment is not
    enough: the same values are patched on the constants module, and on the module-level `HfApi` behind the
    top-level helper functions (`huggingface_hub.model_info` ...), which fixed its endpoint at import too. The
    shared HTTP client is closed so the next request builds one with the current settings.
    """
    from huggingface_hub import constants, hf_api
    from huggingface_hub.utils import close_session

    hub_server_session.reset()
    home = tmp_path_factory.mktemp("hf_home")
    hub = LocalHub(hub_server_session, home)
    # Same names in the environment and in `huggingface_hub.constants`.
    paths = {
        "HF_HOME": home,
        "HF_HUB_CACHE": hub.cache_dir,
        "HF_ASSETS_CACHE": home / "assets",
        "HF_XET_CACHE": home / "xet",
        "HF_TOKEN_PATH": home / "token",  # no login cached on this machine leaks in
    }
    switches = {
        "HF_HUB_OFFLINE": False,
        "HF_HUB_DISABLE_XET": True,  # Xet would need a CAS server: plain LFS basic transfer instead
        "HF_HUB_DISABLE_TELEMETRY": True,
    }
    environment = {
        **{name: str(path) for name, path in paths.items()},
        **{name: str(int(value)) for name, value in switches.items()},
        "HF_ENDPOINT": hub.endpoint,
        "HF_TOKEN": hub.token,
        "NO_PROXY": "127.0.0.1,localhost",
    }
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    constants_values = {
        **{name: str(path) for name, path in paths.items()},
        **switches,
        "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "ENDPOINT": hub.endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}",
    }
    for name, value in constants_values.items():
        monkeypatch.setattr(constants, name, value)
    monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
    close_session()
    yield hub
    close_session()
