"""A Hugging Face Hub on 127.0.0.1 that speaks the file-download protocol
``hf_hub_download`` uses (stdlib only):

- ``HEAD /{repo}/resolve/{rev}/{path}``: 200 with ``X-Repo-Commit``,
  ``ETag`` (the sha256) and ``Content-Length`` (direct form), or a 302 to a
  second listener (another origin, like the Hub's CDN) with ``X-Linked-Etag``
  and ``X-Linked-Size`` (``redirect`` mode). Never ``X-Xet-Hash``: plain HTTP.
- ``GET`` the same path (or the CDN path): the body; ``Range: bytes=N-`` is
  answered 206 with ``Content-Range``.
- Modes (``hub.mode``): ``normal``, ``redirect``, ``drop`` (the first
  ``drop_count`` GETs send the full ``Content-Length``, then ``drop_at`` bytes
  of the file and close the connection), ``corrupt`` (same size, one byte
  flipped), ``html`` (200 ``text/html`` to everything, no Hub headers),
  ``get_html`` (proper HEAD, an HTML page as body), ``404``, ``404entry``,
  ``401repo``.

Every request is logged as ``(method, path, headers)`` in ``hub.requests``.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HTML = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body>Please sign in</body></html>\n"


class MockHub:
    def __init__(self):
        self.files: dict[tuple[str, str], bytes] = {}   # (repo_id, path) -> bytes
        self.mode = "normal"
        self.drop_at = 0
        self.drop_count = 0
        self.requests: list[tuple[str, str, dict]] = []
        self._gets = 0
        self._lock = threading.Lock()
        self.hub = self._serve()
        self.cdn = self._serve()
        self.endpoint = f"http://127.0.0.1:{self.hub.server_address[1]}"
        self.cdn_origin = f"http://127.0.0.1:{self.cdn.server_address[1]}"

    def add(self, repo_id: str, path: str, data: bytes) -> str:
        self.files[(repo_id, path)] = data
        return hashlib.sha256(data).hexdigest()

    def set_mode(self, mode: str, drop_at: int = 0, drop_count: int = 0) -> None:
        with self._lock:
            self.mode, self.drop_at, self.drop_count, self._gets = mode, drop_at, drop_count, 0
            self.requests.clear()

    def gets(self) -> list[dict]:
        return [h for m, _, h in self.requests if m == "GET"]

    def close(self) -> None:
        for server in (self.hub, self.cdn):
            server.shutdown()
            server.server_close()

    def _serve(self) -> ThreadingHTTPServer:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"   # keep-alive, as the client's pooled connection expects

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return server

    def _reply(self, h, status, headers=None, body=b"", head=False):
        h.send_response(status)
        for k, v in (headers or {}).items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _lookup(self, raw_path):
        path = urllib.parse.unquote(urllib.parse.urlsplit(raw_path).path)
        if path.startswith("/_cdn/"):
            sha = path[len("/_cdn/"):]
            for data in self.files.values():
                if hashlib.sha256(data).hexdigest() == sha:
                    return data, None
            return None, None
        parts = path.lstrip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":
            return None, None
        repo_id, filename = "/".join(parts[:2]), "/".join(parts[4:])
        return self.files.get((repo_id, filename)), (repo_id, filename)

    def _handle(self, h, head):
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", h.path, {k.lower(): v for k, v in h.headers.items()}))
            mode = self.mode
            if not head:
                self._gets += 1
            get_index = self._gets
        if mode == "html":
            return self._reply(h, 200, {"Content-Type": "text/html"}, HTML, head)
        data, key = self._lookup(h.path)
        error = {"404": (404, None), "404entry": (404, "EntryNotFound"), "401repo": (401, "RepoNotFound")}
        if mode in error or data is None:
            status, code = error.get(mode, (404, "EntryNotFound"))
            headers = {"X-Repo-Commit": COMMIT, "Content-Type": "application/json"}
            if code:
                headers.update({"X-Error-Code": code, "X-Error-Message": f"{code} (mock)"})
            return self._reply(h, status, headers, b'{"error": "not found"}', head)
        sha = hashlib.sha256(data).hexdigest()
        if head:
            if mode == "redirect" and key is not None:
                return self._reply(h, 302, {"Location": f"{self.cdn_origin}/_cdn/{sha}?X-Amz-Signature=x",
                                            "X-Repo-Commit": COMMIT, "X-Linked-Etag": f'"{sha}"',
                                            "X-Linked-Size": len(data)}, b"", head=True)
            h.send_response(200)
            for k, v in {"X-Repo-Commit": COMMIT, "ETag": f'"{sha}"', "Accept-Ranges": "bytes",
                         "Content-Length": len(data)}.items():
                h.send_header(k, str(v))
            h.end_headers()
            return None
        if mode == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if mode == "get_html":
            data = (HTML * (len(data) // len(HTML) + 1))[:len(data)]
        start = 0
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes="):
            start = int(rng[len("bytes="):].split("-")[0])
        status = 206 if start else 200
        h.send_response(status)
        h.send_header("Content-Length", str(len(data) - start))
        if start:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if mode == "drop" and get_index <= self.drop_count and self.drop_at > start:
            h.wfile.write(data[start:self.drop_at])
            h.wfile.flush()
            h.connection.shutdown(socket.SHUT_RDWR)
            h.close_connection = True
            return None
        h.wfile.write(data[start:])
        return None
