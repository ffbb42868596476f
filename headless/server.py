"""Start a real ComfyUI server with this extension, talk to it over HTTP, stop it.

The server runs ComfyUI's own ``main.py`` in a subprocess with its own base
directory (models, custom_nodes, input, output, user), so runs never touch the
user's ComfyUI folders unless asked to.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from .runtime import REPO, comfyui_path

EXTENSION_FOLDER = "ComfyUI-BalancedControl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare_base_directory(base: Path) -> Path:
    """A ComfyUI base directory whose custom_nodes holds (a link to) this extension."""
    base = Path(base)
    for sub in ("custom_nodes", "input", "output", "user", "temp",
                "models/checkpoints", "models/controlnet", "models/vae"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / EXTENSION_FOLDER
    if not link.exists():
        link.symlink_to(REPO, target_is_directory=True)
    return base


class ComfyServer:
    """``with ComfyServer(base_dir) as server: server.queue(prompt)``."""

    def __init__(self, base_dir: Path, port: int | None = None, extra_args: list[str] | None = None,
                 log_path: Path | None = None, startup_timeout: float = 180.0):
        self.base_dir = prepare_base_directory(base_dir)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.extra_args = list(extra_args or [])
        self.log_path = Path(log_path) if log_path else self.base_dir / "comfyui.log"
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen | None = None
        self.client_id = uuid.uuid4().hex

    # -- lifecycle ---------------------------------------------------------------
    def start(self) -> "ComfyServer":
        import torch

        root = comfyui_path()
        cmd = [sys.executable, str(root / "main.py"), "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base_dir), "--disable-auto-launch",
               "--database-url", "sqlite:///:memory:"]
        if not torch.cuda.is_available():
            cmd.append("--cpu")
        cmd += self.extra_args
        self._log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, cwd=str(root), stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        deadline = time.time() + self.startup_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} during startup:\n{self.log_tail()}")
            try:
                self.get_json("/system_stats")
                return self
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer within {self.startup_timeout}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])

    # -- HTTP ----------------------------------------------------------------------
    def _request(self, path: str, data: bytes | None = None, timeout: float = 60.0) -> bytes:
        req = urllib.request.Request(self.url + path, data=data,
                                     headers={"Content-Type": "application/json"} if data else {})
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.read()

    def get_json(self, path: str, timeout: float = 60.0):
        return json.loads(self._request(path, timeout=timeout))

    def post_json(self, path: str, payload: dict, timeout: float = 60.0):
        try:
            return json.loads(self._request(path, json.dumps(payload).encode(), timeout=timeout))
        except urllib.error.HTTPError as e:
            body = e.read().decode(errors="replace")
            raise RuntimeError(f"POST {path} failed with {e.code}: {body}") from None

    def queue(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id."""
        answer = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        return answer["prompt_id"]

    def wait(self, prompt_id: str, timeout: float = 1800.0, poll: float = 0.5) -> dict:
        """Wait for a prompt to finish; return its /history entry, or raise with ComfyUI's error."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            history = self.get_json(f"/history/{prompt_id}")
            entry = history.get(prompt_id)
            if entry is not None:
                status = entry.get("status", {})
                if status.get("status_str") == "error" or status.get("completed") is False:
                    messages = [m for m in status.get("messages", []) if m[0] == "execution_error"]
                    detail = messages[0][1] if messages else status
                    raise RuntimeError(f"prompt {prompt_id} failed: "
                                       f"{json.dumps(detail, indent=1)[:4000]}\n{self.log_tail()}")
                return entry
            time.sleep(poll)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout}s:\n{self.log_tail()}")

    def run(self, prompt: dict, timeout: float = 1800.0) -> dict:
        return self.wait(self.queue(prompt), timeout=timeout)

    def fetch_image(self, image: dict) -> bytes:
        """GET /view for one entry of a history 'images' list."""
        query = urllib.parse.urlencode({"filename": image["filename"], "subfolder": image.get("subfolder", ""),
                                        "type": image.get("type", "output")})
        return self._request(f"/view?{query}")

    def output_images(self, entry: dict) -> dict[str, list[bytes]]:
        """node id -> the PNG bytes of the images it output, fetched through /view."""
        out = {}
        for node_id, node_out in entry.get("outputs", {}).items():
            images = node_out.get("images", [])
            if images:
                out[node_id] = [self.fetch_image(img) for img in images]
        return out


def copy_model(src: Path, dest_dir: Path, name: str | None = None) -> str:
    """Place a model file into a models folder (a link when possible); return its name."""
    src = Path(src).resolve()
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (name or src.name)
    if not dest.exists():
        try:
            dest.symlink_to(src)
        except OSError:
            shutil.copy2(src, dest)
    return dest.name
