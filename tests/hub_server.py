"""A small local stand-in for the Hugging Face Hub: the HTTP calls ``huggingface_hub``'s
HfFileSystem makes to list and read a dataset repository, served from a dict of files, so
``hf://datasets/<org>/<name>/...`` is tested for real without the network.

Endpoints (as ``huggingface_hub`` 1.x calls them, see ``hf_api.py`` and ``hf_file_system.py``):

* ``GET /api/datasets/<org>/<name>[/revision/<rev>]``: the repo's info (does it exist?);
* ``GET /api/datasets/<org>/<name>/tree/<rev>[/<path>]?recursive=...``: a folder's entries;
* ``POST /api/datasets/<org>/<name>/paths-info/<rev>`` (form ``paths=...``): entries of paths;
* ``GET|HEAD /datasets/<org>/<name>/resolve/<rev>/<path>`` (with ``Range``): a file's bytes.

A missing repo, revision or path answers 404 with the ``X-Error-Code`` the Hub sends
(``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``), which huggingface_hub turns into its
typed errors. Every request's ``Authorization`` header is recorded in :attr:`FakeHub.auth`.
Repos are public unless ``token`` is set: then a request without ``Bearer <token>`` is answered
401 as the Hub answers for a private repo.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

_API = re.compile(r"^/api/datasets/(?P<repo>[^/]+/[^/]+)(?:/(?P<op>revision|tree|paths-info)/(?P<rest>.*))?$")
_RESOLVE = re.compile(r"^/datasets/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")
_RANGE = re.compile(r"bytes=(\d+)-(\d*)")


class FakeHub:
    """``FakeHub({"org/bench": {"data/a.parquet": b"..."}})``; ``start()`` -> the endpoint URL."""

    def __init__(self, repos: dict[str, dict[str, bytes]], token: str | None = None,
                 revision: str = "main") -> None:
        self.repos, self.token, self.revision = repos, token, revision
        self.auth: list[str | None] = []  # the Authorization header of every request, in order
        self.paths: list[str] = []  # every request's method and path
        self._server: ThreadingHTTPServer | None = None

    # --- the repository ---

    def _files(self, repo: str) -> dict[str, bytes] | None:
        return self.repos.get(repo)

    def _entry(self, path: str, files: dict[str, bytes]) -> dict | None:
        if path in files:
            data = files[path]
            return {"type": "file", "path": path, "size": len(data),
                    "oid": hashlib.sha1(data).hexdigest()}
        if any(p.startswith(path.rstrip("/") + "/") for p in files) or path == "":
            return {"type": "directory", "path": path.rstrip("/"),
                    "oid": hashlib.sha1(path.encode()).hexdigest()}
        return None

    def _tree(self, folder: str, files: dict[str, bytes], recursive: bool) -> list[dict] | None:
        folder = folder.strip("/")
        if folder and (self._entry(folder, files) or {}).get("type") != "directory":
            return None
        prefix = folder + "/" if folder else ""
        names: dict[str, None] = {}
        for path in sorted(files):
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix):].split("/")
            for depth in range(1, len(parts) + 1 if recursive else 2):
                names[prefix + "/".join(parts[:depth])] = None
        return [self._entry(n, files) for n in names]

    # --- HTTP ---

    def answer(self, method: str, url: str, headers, body: bytes) -> tuple[int, dict, bytes]:
        """(status, headers, body) for one request."""
        self.auth.append(headers.get("Authorization"))
        self.paths.append(f"{method} {url}")
        if self.token and headers.get("Authorization") != f"Bearer {self.token}":
            return _error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        parts = urlsplit(url)
        path = unquote(parts.path)
        m = _RESOLVE.match(path)
        if m:
            return self._resolve(m["repo"], m["rev"], m["path"], headers, method)
        m = _API.match(path)
        if not m:
            return _error(404, None, f"no route {path}")
        files = self._files(m["repo"])
        if files is None:
            return _error(404, "RepoNotFound", "Repository not found")
        op, rest = m["op"], m["rest"] or ""
        rev, _, sub = rest.partition("/")
        if op and rev != self.revision:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if op in (None, "revision"):
            return _json({"id": m["repo"], "sha": "0" * 40, "private": bool(self.token)})
        if op == "tree":
            recursive = parse_qs(parts.query).get("recursive", ["False"])[0].lower() == "true"
            tree = self._tree(sub, files, recursive)
            return _error(404, "EntryNotFound", f"{sub} does not exist") if tree is None else _json(tree)
        form = parse_qs(body.decode())
        found = [self._entry(p.strip("/"), files) for p in form.get("paths", [])]
        return _json([e for e in found if e])

    def _resolve(self, repo: str, rev: str, path: str, headers, method: str) -> tuple[int, dict, bytes]:
        files = self._files(repo)
        if files is None:
            return _error(404, "RepoNotFound", "Repository not found")
        if rev != self.revision:
            return _error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        if path not in files:
            return _error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        data = files[path]
        extra = {"ETag": f'"{hashlib.sha1(data).hexdigest()}"', "Accept-Ranges": "bytes",
                 "X-Repo-Commit": "0" * 40}
        m = _RANGE.match(headers.get("Range") or headers.get("range") or "")
        if not m:
            return 200, {**extra, "Content-Type": "application/octet-stream"}, data if method != "HEAD" else b""
        start = int(m[1])
        end = min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
        chunk = data[start:end + 1]
        extra["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
        return 206, {**extra, "Content-Type": "application/octet-stream"}, chunk

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                status, headers, payload = hub.answer(self.command, self.path, self.headers, body)
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_POST = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _json(doc) -> tuple[int, dict, bytes]:
    return 200, {"Content-Type": "application/json"}, json.dumps(doc).encode()


def _error(status: int, code: str | None, message: str) -> tuple[int, dict, bytes]:
    headers = {"Content-Type": "application/json", "X-Error-Message": message}
    if code:
        headers["X-Error-Code"] = code
    return status, headers, json.dumps({"error": message}).encode()
