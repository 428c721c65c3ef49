"""A local HTTP server that answers the Hub's upload API, so tests run the real huggingface_hub client offline.

Point the client at it with ``HF_ENDPOINT=<server.url>`` (read when ``huggingface_hub.constants`` is imported,
so in a fresh process) or ``HfApi(endpoint=server.url)``. It implements what ``create_repo``, ``create_branch``
and ``create_commit`` call when Xet is off (``HF_HUB_DISABLE_XET=1``):

- ``GET  /api/agent-harnesses``                               (a registry the client fetches for its user agent)
- ``POST /api/repos/create``                                  (409 when the repo exists)
- ``POST /api/models/{repo}/branch/{branch}``
- ``GET  /api/models/{repo}`` and ``/api/models/{repo}/revision/{rev}`` (repo info, used after a 401/403 on create)
- ``POST /api/validate-yaml``                                  (the card's YAML block must be a mapping)
- ``POST /api/models/{repo}/preupload/{rev}``                   (binary files -> "lfs", text -> "regular")
- ``POST /{repo}.git/info/lfs/objects/batch``, ``PUT /lfs-storage/{oid}``, ``POST /{repo}.git/info/lfs/objects/verify``
- ``POST /api/models/{repo}/commit/{rev}``                      (NDJSON; LFS objects must have been uploaded)

Every request is recorded (``server.requests``) and every commit kept (``server.commits``); anything else is
answered 404 and recorded too, so a test sees calls it did not expect.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import yaml

# Files the Hub stores with LFS whatever their content (its default .gitattributes), besides binary ones.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".h5", ".onnx", ".msgpack", ".npz")
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def ndjson(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.body.splitlines() if line.strip()]

    def __str__(self) -> str:
        return f"{self.method} {self.path}"


@dataclass
class Commit:
    repo_id: str
    revision: str
    summary: str
    description: str
    regular_files: dict[str, bytes]
    lfs_files: dict[str, str]  # path -> sha256

    @property
    def paths(self) -> set[str]:
        return set(self.regular_files) | set(self.lfs_files)


@dataclass
class Repo:
    private: bool
    branches: dict[str, dict[str, bytes]] = field(default_factory=lambda: {"main": {}})


class LocalHubServer:
    """The server on 127.0.0.1 (a free port), answering in a background thread. Use as a context manager."""

    def __init__(self, token: str = "hf_local_test_token", user: str = "alice") -> None:
        self.token = token
        self.user = user
        self.requests: list[RecordedRequest] = []
        self.commits: list[Commit] = []
        self.repos: dict[str, Repo] = {}
        self.lfs_objects: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> LocalHubServer:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._server.shutdown()
        self._server.server_close()

    def calls(self) -> list[str]:
        """``"METHOD /path"`` of every request, in order."""
        return [str(request) for request in self.requests]

    def branch_files(self, repo_id: str, branch: str = "main") -> dict[str, bytes]:
        """The content of every file on a branch, LFS files resolved."""
        return dict(self.repos[repo_id].branches[branch])

    # ----------------------------------------------------------------------------------------------

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            self.rfile.readline()
                            return b"".join(chunks)
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                request = RecordedRequest(
                    self.command,
                    unquote(parts.path),
                    parts.query,
                    {key.lower(): value for key, value in self.headers.items()},
                    self._body(),
                )
                with hub._lock:
                    hub.requests.append(request)
                    status, payload, headers = hub._route(request, raw_path=parts.path)
                body = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for key, value in headers.items():
                    self.send_header(key, value)
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        return Handler

    def _authorized(self, request: RecordedRequest) -> bool:
        return request.headers.get("authorization") == f"Bearer {self.token}"

    @staticmethod
    def _error(status: int, message: str, code: str | None = None) -> tuple[int, dict, dict]:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        return status, {"error": message}, headers

    def _route(self, request: RecordedRequest, raw_path: str) -> tuple[int, Any, dict[str, str]]:
        method, path = request.method, request.path
        if path.startswith("/lfs-storage/") and method == "PUT":
            oid = path.rsplit("/", 1)[1]
            if hashlib.sha256(request.body).hexdigest() != oid:
                return self._error(400, "the uploaded content does not match its sha256")
            self.lfs_objects[oid] = request.body
            return 200, {}, {}
        if method == "GET" and path == "/api/agent-harnesses":
            # huggingface_hub fetches this registry (best effort, at most daily) to tag its user agent.
            return 200, {"standardEnvVars": [], "harnesses": {}}, {}
        if not self._authorized(request):
            return self._error(401, "Invalid credentials in Authorization header")
        if method == "POST" and path == "/api/repos/create":
            return self._create_repo(request.json())
        if method == "POST" and path == "/api/validate-yaml":
            return self._validate_yaml(request.json())
        if match := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/batch", path):
            return self._lfs_batch(match["repo"], request.json())
        if match := re.fullmatch(rf"/{REPO}\.git/info/lfs/objects/verify", path):
            body = request.json()
            if len(self.lfs_objects.get(body["oid"], b"")) != body["size"]:
                return self._error(404, "object not uploaded")
            return 200, {}, {}
        # The revision is URL-quoted in the path (a branch may hold '/'): split the raw path first.
        raw = re.fullmatch(r"/api/models/([\w.-]+)/([\w.-]+)/(preupload|commit|branch|revision)/([^/]+)", raw_path)
        if raw:
            repo_id, action, revision = f"{raw[1]}/{raw[2]}", raw[3], unquote(raw[4])
            if repo_id not in self.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            repo = self.repos[repo_id]
            if action == "branch" and method == "POST":
                if revision in repo.branches:
                    return self._error(409, "Reference already exists")
                repo.branches[revision] = dict(repo.branches["main"])
                return 200, {}, {}
            if revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            if action == "preupload" and method == "POST":
                return self._preupload(request.json())
            if action == "commit" and method == "POST":
                return self._commit(repo_id, revision, request.ndjson())
            if action == "revision" and method == "GET":
                return 200, self._repo_info(repo_id), {}
        if match := re.fullmatch(rf"/api/models/{REPO}", path):
            if match["repo"] not in self.repos:
                return self._error(404, "Repository not found", "RepoNotFound")
            return 200, self._repo_info(match["repo"]), {}
        return self._error(404, f"{method} {path} is not implemented by the local test server")

    def _repo_info(self, repo_id: str) -> dict[str, Any]:
        return {"id": repo_id, "private": self.repos[repo_id].private, "sha": "0" * 40, "siblings": []}

    def _create_repo(self, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        repo_id = f"{body.get('organization') or self.user}/{body['name']}"
        if repo_id in self.repos:
            return 409, {"error": "You already created this model repo", "url": f"{self.url}/{repo_id}"}, {}
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return 200, {"url": f"{self.url}/{repo_id}", "name": repo_id}, {}

    @staticmethod
    def _validate_yaml(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", body["content"], re.DOTALL)
        try:
            metadata = yaml.safe_load(match[1]) if match else None
        except yaml.YAMLError as error:
            return 400, {"errors": [{"message": f"invalid YAML: {error}"}]}, {}
        if not isinstance(metadata, dict):
            return 400, {"errors": [{"message": "the metadata block must be a YAML mapping"}]}, {}
        return 200, {"errors": [], "warnings": []}, {}

    @staticmethod
    def _preupload(body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        files = []
        for item in body["files"]:
            sample = base64.b64decode(item["sample"])
            binary = item["path"].endswith(LFS_SUFFIXES) or b"\x00" in sample or item["size"] >= 10_000_000
            files.append({"path": item["path"], "uploadMode": "lfs" if binary else "regular", "shouldIgnore": False})
        return 200, {"files": files}, {}

    def _lfs_batch(self, repo_id: str, body: dict[str, Any]) -> tuple[int, Any, dict[str, str]]:
        if repo_id not in self.repos:
            return self._error(404, "Repository not found", "RepoNotFound")
        objects = []
        for item in body["objects"]:
            entry = {"oid": item["oid"], "size": item["size"]}
            if item["oid"] not in self.lfs_objects:
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/lfs-storage/{item['oid']}"},
                    "verify": {"href": f"{self.url}/{repo_id}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects}, {}

    def _commit(self, repo_id: str, revision: str, lines: list[dict[str, Any]]) -> tuple[int, Any, dict[str, str]]:
        header = next(line["value"] for line in lines if line["key"] == "header")
        regular, lfs = {}, {}
        for line in lines:
            value = line["value"]
            if line["key"] == "file":
                regular[value["path"]] = base64.b64decode(value["content"])
            elif line["key"] == "lfsFile":
                if value["oid"] not in self.lfs_objects:
                    return self._error(422, f"LFS object {value['oid']} for {value['path']} was never uploaded")
                lfs[value["path"]] = value["oid"]
            elif line["key"] != "header":
                return self._error(400, f"unexpected commit operation {line['key']}")
        branch = self.repos[repo_id].branches[revision]
        branch.update(regular)
        branch.update({path: self.lfs_objects[oid] for path, oid in lfs.items()})
        self.commits.append(Commit(repo_id, revision, header["summary"], header.get("description", ""), regular, lfs))
        oid = hashlib.sha1(f"{repo_id}{len(self.commits)}".encode()).hexdigest()
        return 200, {"commitUrl": f"{self.url}/{repo_id}/commit/{oid}", "commitOid": oid, "success": True}, {}
