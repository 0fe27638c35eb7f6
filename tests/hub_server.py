"""A small in-process stand-in for the Hugging Face Hub, for offline tests of the real `huggingface_hub` client.

It serves the endpoints a CREAM push and a read-back use, with git-like semantics (immutable commits, branches as
refs): ``whoami-v2``, ``repos/create``, ``branch``, ``refs``, ``validate-yaml``, ``preupload``, ``tree``, ``commit``
(ndjson: regular files in base64 and LFS pointers), the LFS batch API with a single-part ``PUT`` upload, and
``resolve/<revision>/<path>`` (HEAD + GET) for `hf_hub_download`. No Xet: the tests disable the client's Xet path.

Threaded, bound to 127.0.0.1 on a random port, request bodies capped at `MAX_BODY`. Failures can be injected per
route (`fail(...)`) to test retries, and every request's method, path and ``Authorization`` header is recorded.
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

MAX_BODY = 64 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".parquet", ".pt")
_REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


@dataclass
class Repo:
    repo_type: str
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: content}
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit oid


@dataclass
class Failure:
    method: str
    pattern: str
    status: int
    remaining: int  # -1: forever


class FakeHub:
    """State of the fake Hub, and the HTTP server in front of it (`start` / `stop`)."""

    def __init__(self, token: str = "hf_test_token_0123456789") -> None:
        self.token = token
        self.repos: dict[tuple[str, str], Repo] = {}
        self.blobs: dict[str, bytes] = {}  # sha256 -> content (LFS storage)
        self.requests: list[tuple[str, str, str | None]] = []
        self.failures: list[Failure] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------ test helpers
    def fail(self, method: str, pattern: str, status: int, times: int = -1) -> None:
        """Answer the next ``times`` requests (``-1``: all) matching ``method`` and the path regex with ``status``."""
        with self.lock:
            self.failures.append(Failure(method, pattern, status, times))

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        repo = self.repos[(repo_type, repo_id)]
        return repo.commits[repo.refs[revision]]

    def branches(self, repo_id: str, repo_type: str = "model") -> dict[str, str]:
        return dict(self.repos[(repo_type, repo_id)].refs)

    def count(self, method: str, pattern: str) -> int:
        return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    # ------------------------------------------------ state changes (under the lock)
    def _commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], message: str) -> str:
        oid = hashlib.sha1(f"{parent}{message}{len(repo.commits)}{sorted(files)}".encode()).hexdigest()
        repo.commits[oid] = files
        return oid


def _type_of(prefix: str | None) -> str:
    return {"datasets": "dataset", "spaces": "space"}.get((prefix or "").rstrip("/"), "model")


def _git_oid(content: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"
    timeout = 30

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ------------------------------------------------ plumbing
    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks, total = [], 0
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    break
                total += size
                if total > MAX_BODY:
                    raise ValueError("body too large")
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY:
            raise ValueError("body too large")
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, payload: Any = None, headers: dict[str, str] | None = None, body: bytes = b""
    ) -> None:
        if payload is not None:
            body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json" if payload is not None else "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, {"error": message}, headers={"X-Error-Message": message})

    def _authorized(self) -> bool:
        return self.headers.get("Authorization") == f"Bearer {self.fake.token}"

    def _dispatch(self) -> None:
        path = urlsplit(self.path).path
        self.fake.requests.append((self.command, path, self.headers.get("Authorization")))
        body = self._body() if self.command in ("POST", "PUT") else b""
        with self.fake.lock:
            for failure in self.fake.failures:
                if failure.method == self.command and failure.remaining != 0 and re.search(failure.pattern, path):
                    failure.remaining -= 1 if failure.remaining > 0 else 0
                    return self._error(failure.status, f"injected failure {failure.status}")
        for method, pattern, handler in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method == self.command and match:
                if handler.__name__ != "resolve" and handler.__name__ != "lfs_put" and not self._authorized():
                    return self._error(401, "Invalid credentials in Authorization header")
                with self.fake.lock:
                    return handler(self, match, body)
        self._error(404, f"no route for {self.command} {path}")

    do_GET = do_POST = do_PUT = do_HEAD = _dispatch

    def _repo(self, match: re.Match) -> Repo | None:
        repo = self.fake.repos.get((_type_of(match.groupdict().get("type")), match["repo"]))
        if repo is None:
            self._error(404, "Repository not found")
        return repo

    # ------------------------------------------------ routes
    def whoami(self, match: re.Match, body: bytes) -> None:
        self._send(200, {"type": "user", "name": "tester", "auth": {"accessToken": {"role": "write"}}})

    def validate_yaml(self, match: re.Match, body: bytes) -> None:
        self._send(200, {"errors": [], "warnings": []})

    def create_repo(self, match: re.Match, body: bytes) -> None:
        data = json.loads(body)
        repo_type = data.get("type") or "model"
        repo_id = f"{data['organization'] or 'tester'}/{data['name']}"
        prefix = "" if repo_type == "model" else f"{repo_type}s/"
        url = f"{self.fake.url}/{prefix}{repo_id}"
        if (repo_type, repo_id) in self.fake.repos:
            return self._send(409, {"error": "You already created this repo", "url": url})
        repo = Repo(repo_type, data.get("visibility") == "private")
        repo.refs["main"] = self.fake._commit(repo, None, {".gitattributes": b"*.safetensors filter=lfs\n"}, "init")
        self.fake.repos[(repo_type, repo_id)] = repo
        self._send(200, {"url": url, "name": repo_id})

    def create_branch(self, match: re.Match, body: bytes) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        branch = unquote(match["branch"])
        if branch in repo.refs:
            return self._error(409, f"Branch {branch} already exists")
        start = (json.loads(body) if body else {}).get("startingPoint") or "main"
        repo.refs[branch] = repo.refs.get(start, start)
        self._send(200, {})

    def refs(self, match: re.Match, body: bytes) -> None:
        repo = self._repo(match)
        if repo is not None:
            branches = [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": o} for b, o in repo.refs.items()]
            self._send(200, {"branches": branches, "converts": [], "tags": []})

    def preupload(self, match: re.Match, body: bytes) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        current = repo.commits[repo.refs.get(unquote(match["rev"]), repo.refs["main"])]
        files = []
        for f in json.loads(body)["files"]:
            lfs = f["path"].endswith(LFS_SUFFIXES) or f["size"] > 1_000_000
            existing = current.get(f["path"])
            oid = None if existing is None else (hashlib.sha256(existing).hexdigest() if lfs else _git_oid(existing))
            files.append(
                {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False, "oid": oid}
            )
        self._send(200, {"files": files})

    def lfs_batch(self, match: re.Match, body: bytes) -> None:
        if self._repo(match) is None:
            return
        objects = []
        for obj in json.loads(body)["objects"]:
            entry: dict[str, Any] = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.fake.blobs:
                entry["actions"] = {"upload": {"href": f"{self.fake.url}/lfs-upload/{obj['oid']}"}}
            objects.append(entry)
        self._send(200, {"transfer": "basic", "objects": objects})

    def lfs_put(self, match: re.Match, body: bytes) -> None:
        if hashlib.sha256(body).hexdigest() != match["oid"]:
            return self._error(400, "sha256 mismatch")
        self.fake.blobs[match["oid"]] = body
        self._send(200, {})

    def commit(self, match: re.Match, body: bytes) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        revision = unquote(match["rev"])
        if revision not in repo.refs:
            return self._error(404, f"Revision {revision} not found")
        parent = repo.refs[revision]
        files = dict(repo.commits[parent])
        message = ""
        for line in body.splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                message = value["summary"]
            elif key == "file":
                files[value["path"]] = base64.b64decode(value["content"])
            elif key == "lfsFile":
                if value["oid"] not in self.fake.blobs:
                    return self._error(400, f"LFS object {value['oid']} was never uploaded")
                files[value["path"]] = self.fake.blobs[value["oid"]]
            elif key == "deletedFile":
                files.pop(value["path"], None)
            elif key == "deletedFolder":
                files = {p: c for p, c in files.items() if not p.startswith(value["path"].rstrip("/") + "/")}
            else:
                return self._error(400, f"unsupported commit operation {key}")
        oid = self.fake._commit(repo, parent, files, message)
        repo.refs[revision] = oid
        prefix = "" if repo.repo_type == "model" else f"{repo.repo_type}s/"
        url = f"{self.fake.url}/{prefix}{match['repo']}/commit/{oid}"
        self._send(200, {"commitUrl": url, "commitOid": oid, "pullRequestUrl": None, "success": True})

    def tree(self, match: re.Match, body: bytes) -> None:
        repo = self._repo(match)
        if repo is None:
            return
        revision = unquote(match["rev"])
        if revision not in repo.refs:
            return self._error(404, f"Revision {revision} not found")
        files = repo.commits[repo.refs[revision]]
        under = (match["path"] or "").strip("/")
        entries = [
            {"type": "file", "path": p, "size": len(c), "oid": _git_oid(c)}
            for p, c in sorted(files.items())
            if not under or p.startswith(under + "/")
        ]
        self._send(200, entries)

    def resolve(self, match: re.Match, body: bytes) -> None:
        repo = self.fake.repos.get((_type_of(match["type"]), match["repo"]))
        if repo is None or (repo.private and not self._authorized()):
            return self._error(404, "Repository not found")
        revision = unquote(match["rev"])
        commit = repo.refs.get(revision, revision if revision in repo.commits else None)
        if commit is None:
            return self._error(404, f"Revision {revision} not found")
        content = repo.commits[commit].get(unquote(match["path"]))
        if content is None:
            return self._error(404, "Entry not found")
        lfs = match["path"].endswith(LFS_SUFFIXES) or len(content) > 1_000_000
        etag = hashlib.sha256(content).hexdigest() if lfs else _git_oid(content)
        self._send(200, headers={"X-Repo-Commit": commit, "ETag": f'"{etag}"'}, body=content)


_ROUTES: list[tuple[str, str, Any]] = [
    ("GET", r"/api/whoami-v2", _Handler.whoami),
    ("POST", r"/api/validate-yaml", _Handler.validate_yaml),
    ("POST", r"/api/repos/create", _Handler.create_repo),
    ("POST", rf"/api/(?P<type>models|datasets)/{_REPO}/branch/(?P<branch>[^/]+)", _Handler.create_branch),
    ("GET", rf"/api/(?P<type>models|datasets)/{_REPO}/refs", _Handler.refs),
    ("POST", rf"/api/(?P<type>models|datasets)/{_REPO}/preupload/(?P<rev>[^/]+)", _Handler.preupload),
    ("POST", rf"/api/(?P<type>models|datasets)/{_REPO}/commit/(?P<rev>[^/]+)", _Handler.commit),
    ("GET", rf"/api/(?P<type>models|datasets)/{_REPO}/tree/(?P<rev>[^/]+)(?P<path>/.*)?", _Handler.tree),
    ("POST", rf"/(?P<type>datasets/)?{_REPO}\.git/info/lfs/objects/batch", _Handler.lfs_batch),
    ("PUT", r"/lfs-upload/(?P<oid>[0-9a-f]{64})", _Handler.lfs_put),
    ("HEAD", rf"/(?P<type>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
    ("GET", rf"/(?P<type>datasets/)?{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", _Handler.resolve),
]
