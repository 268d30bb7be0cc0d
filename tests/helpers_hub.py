"""A small Hugging Face Hub look-alike on 127.0.0.1 for tests that use the real `huggingface_hub` client
through `HF_ENDPOINT`.

It answers what `huggingface_hub` calls for `model_info`, `snapshot_download` and `hf_hub_download`:
  GET  /api/models/{repo}[/revision/{rev}][?blobs=True]   -> {id, sha, siblings[{rfilename, size, blobId}]}
  GET  /api/models/{repo}/tree/{rev}[?recursive=..]       -> [{type: file, path, size, oid}]
  HEAD/GET /{repo}/resolve/{rev}/{file}                    -> the bytes, with X-Repo-Commit, ETag, Content-Length
Errors carry the `X-Error-Code` header the client maps to its exceptions (RepoNotFound, RevisionNotFound,
EntryNotFound). Every request is logged in `hub.requests`; anything it does not understand goes to
`hub.unexpected` and gets a 404.
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeRepo:
    def __init__(self, repo_id: str):
        self.repo_id = repo_id
        self.commits: dict[str, dict[str, bytes]] = {}
        self.refs: dict[str, str] = {}

    def add_commit(self, files: dict[str, bytes], refs: tuple[str, ...] = ("main",)) -> str:
        """Add a commit holding `files`; point the given branch/tag names at it. Returns its sha."""
        h = hashlib.sha1(self.repo_id.encode())
        for name in sorted(files):
            h.update(name.encode() + b"\0" + git_blob_id(files[name]).encode())
        h.update(str(len(self.commits)).encode())
        sha = h.hexdigest()
        self.commits[sha] = dict(files)
        for r in refs:
            self.refs[r] = sha
        return sha

    def resolve(self, rev: str | None) -> str | None:
        rev = rev or "main"
        if rev in self.commits:
            return rev
        return self.refs.get(rev)


def files_from_dir(folder: str | Path, extra: dict[str, bytes] | None = None) -> dict[str, bytes]:
    folder = Path(folder)
    out = {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}
    out.update(extra or {})
    return out


class FakeHub:
    def __init__(self):
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []
        self.unexpected: list[tuple[str, str]] = []
        self.downloads: list[str] = []  # "{repo}/{file}" for every GET of file content
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def repo(self, repo_id: str) -> FakeRepo:
        return self.repos.setdefault(repo_id, FakeRepo(repo_id))

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                hub._handle(self, head=False)

            def do_HEAD(self):
                hub._handle(self, head=True)

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- routing ---------------------------------------------------------------------------------
    def _split_repo(self, parts: list[str]) -> tuple[FakeRepo | None, list[str]]:
        """The longest leading path that names a known repo (ids have one or two segments)."""
        for n in (2, 1):
            if len(parts) >= n and "/".join(parts[:n]) in self.repos:
                return self.repos["/".join(parts[:n])], parts[n:]
        return None, parts

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        method = "HEAD" if head else "GET"
        url = urlsplit(h.path)
        self.requests.append((method, h.path))
        parts = [unquote(p) for p in url.path.strip("/").split("/") if p]
        if parts == ["api", "agent-harnesses"]:  # the client's best-effort telemetry registry
            return self._json(h, {"standardEnvVars": [], "harnesses": {}})
        if parts[:2] == ["api", "models"] and not head:
            repo, rest = self._split_repo(parts[2:])
            if repo is None:
                return self._error(h, 404, "RepoNotFound", "Repository not found", head)
            if rest == [] or (len(rest) == 2 and rest[0] == "revision"):
                return self._info(h, repo, rest[1] if rest else None)
            if len(rest) >= 2 and rest[0] == "tree":
                return self._tree(h, repo, rest[1])
        elif len(parts) >= 4:
            repo, rest = self._split_repo(parts)
            if repo is None and "resolve" in parts:
                return self._error(h, 404, "RepoNotFound", "Repository not found", head)
            if repo is not None and len(rest) >= 3 and rest[0] == "resolve":
                return self._file(h, repo, rest[1], "/".join(rest[2:]), head)
        self.unexpected.append((method, h.path))
        self._error(h, 404, None, "unknown endpoint", head)

    # -- responses -------------------------------------------------------------------------------
    def _send(self, h, status: int, body: bytes, headers: dict[str, str], head: bool) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _json(self, h, obj) -> None:
        self._send(h, 200, json.dumps(obj).encode(), {"Content-Type": "application/json"}, False)

    def _error(self, h, status: int, code: str | None, message: str, head: bool, extra: dict | None = None) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message, **(extra or {})}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head)

    def _info(self, h, repo: FakeRepo, rev: str | None) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", False)
        files = repo.commits[sha]
        self._json(h, {
            "id": repo.repo_id, "modelId": repo.repo_id, "sha": sha, "private": False, "gated": False,
            "siblings": [{"rfilename": f, "size": len(b), "blobId": git_blob_id(b)} for f, b in sorted(files.items())],
        })

    def _tree(self, h, repo: FakeRepo, rev: str) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", False)
        self._json(h, [{"type": "file", "path": f, "size": len(b), "oid": git_blob_id(b)}
                       for f, b in sorted(repo.commits[sha].items())])

    def _file(self, h, repo: FakeRepo, rev: str, filename: str, head: bool) -> None:
        sha = repo.resolve(rev)
        if sha is None:
            return self._error(h, 404, "RevisionNotFound", f"Invalid rev id: {rev}", head)
        data = repo.commits[sha].get(filename)
        if data is None:
            return self._error(h, 404, "EntryNotFound", f"{filename} does not exist", head, {"X-Repo-Commit": sha})
        if not head:
            self.downloads.append(f"{repo.repo_id}/{filename}")
        self._send(h, 200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": sha,
                                  "ETag": f'"{git_blob_id(data)}"'}, head)
