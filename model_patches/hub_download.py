"""Fetch one ``hub_table`` entry into a models folder with ``huggingface_hub``,
resumably, with progress, and refuse it unless its sha256 is the table's.

What huggingface_hub does and does not do (details and versions:
docs/downloads.md):

- ``hf_hub_download(..., local_dir=)`` writes the real file at
  ``local_dir/<repo path>``; its temporary file and metadata live under
  ``local_dir/.cache/huggingface/download/`` (extensions ComfyUI's file lists
  never show).
- It checks the size only, never the sha256 of what it received, so this
  module hashes the file afterwards; on a mismatch the file and its metadata
  are removed and the download is refused.
- It reads ``HF_ENDPOINT`` only when imported, so the endpoint (argument, else
  ``HF_ENDPOINT`` now) is passed on every call. ``HF_TOKEN`` is read per call
  by the library itself.
- Resume: up to 1.17 an interrupted download resumes on the next call from the
  ``.incomplete`` file; from 1.18 a new call restarts from byte 0 (from 1.20 a
  dropped connection is resumed inside the call). A retry loop of ``tries``
  calls covers every version; partial files are kept only where a later call
  can resume them.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable

from .hub_table import HubFile

MARKER_DIR = Path(".cache") / "balancedcontrol"
ORPHAN_AGE_S = 3600
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRANSIENT = {"TransportError", "RemoteProtocolError", "ConnectError", "ConnectTimeout", "ReadTimeout",
              "TimeoutException", "ReadError", "ChunkedEncodingError", "ProtocolError", "IncompleteRead",
              "ConnectionError", "Timeout"}


class DownloadError(RuntimeError):
    """A download that did not produce the table's file; the message says why and what to do."""


def hub_version() -> tuple[int, int]:
    import huggingface_hub

    parts = (huggingface_hub.__version__.split(".") + ["0"])[:2]
    return tuple(int("".join(c for c in p if c.isdigit()) or 0) for p in parts)


def resumes_across_calls(version: tuple[int, int] | None = None) -> bool:
    """True where a later ``hf_hub_download`` call continues a partial file (≤ 1.17)."""
    return (version or hub_version()) < (1, 18)


def sha256_file(path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def comfy_folder(folder: str) -> Path:
    """The directory ComfyUI's folder_paths registers first for ``folder``
    (in a running ComfyUI, extra_model_paths.yaml included), else ``models/<folder>``."""
    import folder_paths

    if folder in folder_paths.folder_names_and_paths:
        paths = folder_paths.get_folder_paths(folder)
        if paths:
            return Path(paths[0])
    return Path(folder_paths.models_dir) / folder


def target_path(entry: HubFile, folder_dir) -> Path:
    return Path(folder_dir) / entry.subdir / entry.filename


def _marker(entry: HubFile, folder_dir) -> Path:
    return Path(folder_dir) / entry.subdir / MARKER_DIR / f"{entry.filename}.sha256"


def _hf_paths(entry: HubFile, folder_dir):
    """(metadata file, lock file, glob of partial files) that huggingface_hub keeps for the entry."""
    import base64

    meta = Path(folder_dir) / entry.subdir / ".cache" / "huggingface" / "download" / f"{entry.filename}.metadata"
    short = base64.urlsafe_b64encode(hashlib.sha1(meta.name.encode()).digest()).decode()
    return meta, meta.with_suffix(".lock"), (meta.parent, f"{short}.*incomplete")


def partial_files(entry: HubFile, folder_dir) -> list[Path]:
    _, _, (parent, pattern) = _hf_paths(entry, folder_dir)
    return sorted(parent.glob(pattern)) if parent.is_dir() else []


def check_existing(entry: HubFile, folder_dir, progress: Callable[[int, int], None] | None = None) -> str | None:
    """None when the file is there and is the table's (size, then sha256: from
    the marker written after a verified download while size and mtime are
    unchanged, else hashed); the found sha256 (or 'missing') otherwise."""
    path = target_path(entry, folder_dir)
    if not path.is_file():
        return "missing"
    st = path.stat()
    if entry.size is not None and st.st_size != entry.size:
        return f"size {st.st_size} B (expected {entry.size} B)"
    marker = _marker(entry, folder_dir)
    try:
        sha, size, mtime = marker.read_text().split()
        if sha == entry.sha256 and int(size) == st.st_size and int(mtime) == st.st_mtime_ns:
            return None
    except (OSError, ValueError):
        pass
    if progress:
        progress(0, 1)
    found = sha256_file(path)
    if found != entry.sha256:
        return f"sha256 {found}"
    _write_marker(entry, folder_dir)
    return None


def _write_marker(entry: HubFile, folder_dir) -> None:
    path, marker = target_path(entry, folder_dir), _marker(entry, folder_dir)
    st = path.stat()
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(f"{entry.sha256} {st.st_size} {st.st_mtime_ns}\n")


def remove(entry: HubFile, folder_dir) -> None:
    """Remove the entry's file, its metadata and marker, then every folder this
    left empty, so the models folder is as it was before the download. Partial
    files stay: huggingface_hub ≤ 1.17 resumes them, later versions delete their
    own (and ``download`` clears stale orphans)."""
    folder_dir = Path(folder_dir)
    meta, lock, _ = _hf_paths(entry, folder_dir)
    doomed = [target_path(entry, folder_dir), meta, lock, _marker(entry, folder_dir)]
    busy = bool(partial_files(entry, folder_dir))   # a partial (resumable, or another process's): keep its lock
    for p in doomed:
        if not (busy and p == lock):
            p.unlink(missing_ok=True)
    hf_dir = folder_dir / entry.subdir / ".cache" / "huggingface"
    if hf_dir.is_dir() and not any(p.is_file() for p in (hf_dir / "download").rglob("*")):
        shutil.rmtree(hf_dir)   # only .gitignore / CACHEDIR.TAG and empty folders were left
    for p in doomed[:1] + doomed[3:4] + [hf_dir / "download" / entry.filename]:
        parent = p.parent
        while parent != folder_dir and folder_dir in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent


def _progress_tqdm(progress: Callable[[int, int], None]):
    """A huggingface_hub tqdm class forwarding bytes done / total to ``progress``
    (its own counter: a disabled tqdm does not count; the xet backend's
    network-bytes bar, whose total is inflated, is ignored)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class ProgressTqdm(hf_tqdm):
        def update(self, n=1):
            self._done = getattr(self, "_done", getattr(self, "n", 0) or 0) + (n or 0)
            if not str(getattr(self, "desc", "") or "").endswith("downloading bytes"):
                progress(max(self._done, 0), getattr(self, "total", None) or 0)
            return super().update(n)

    return ProgressTqdm


def _chain(exc):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def explain(exc: BaseException, entry: HubFile, endpoint: str) -> tuple[str, bool]:
    """(a message for the user, whether another try may succeed)."""
    where = f"{entry.repo_id}@{entry.revision}:{entry.filename} from {endpoint}"
    names = [{c.__name__ for c in type(e).__mro__} for e in _chain(exc)]
    parts = [str(e).splitlines()[0] if str(e).strip() else type(e).__name__ for e in _chain(exc)]
    text = " | ".join(dict.fromkeys(parts))   # each distinct message once, outermost first
    statuses = [s for s in (_status(e) for e in _chain(exc)) if s]
    status = statuses[0] if statuses else None
    flat = set().union(*names)
    if "OfflineModeIsEnabled" in flat:
        return (f"{where}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1) and the file is not here; "
                f"unset HF_HUB_OFFLINE or copy the file to {entry.relative_path} by hand", False)
    if "FileMetadataError" in flat:
        return (f"{where}: the server's answer is not a Hub file (no X-Repo-Commit/ETag headers: an HTML page, "
                f"a proxy or login portal, or HF_ENDPOINT pointing at something that is not a Hub). "
                f"Check HF_ENDPOINT / --endpoint. ({text})", False)
    if "GatedRepoError" in flat:
        return (f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN "
                f"(or pass --token). ({text})", False)
    if "RepositoryNotFoundError" in flat:
        return (f"{where}: repository not found, or private and no valid token was sent; set HF_TOKEN if it "
                f"needs one. ({text})", False)
    if "RevisionNotFoundError" in flat:
        return f"{where}: the pinned revision is not on the server (a mirror that lacks it?). ({text})", False
    if "RemoteEntryNotFoundError" in flat or ("EntryNotFoundError" in flat and "LocalEntryNotFoundError" not in flat):
        return f"{where}: the repository has no such file at that revision. ({text})", False
    if status in (401, 403):
        return (f"{where}: the server refused access (HTTP {status}); set HF_TOKEN (or --token) to a token "
                f"that may read the repository. ({text})", False)
    if status == 404:
        return f"{where}: the server answered HTTP 404 (not found): wrong endpoint or repository. ({text})", False
    if "Consistency check failed" in text:
        return f"{where}: the transfer ended short of the announced size. ({text})", True
    if status is not None and status >= 500:
        return f"{where}: the server failed (HTTP {status}). ({text})", True
    if flat & _TRANSIENT or "LocalEntryNotFoundError" in flat:
        return f"{where}: the connection failed or dropped. ({text})", True
    return f"{where}: {type(exc).__name__}: {text}", False


def _sniff(path: Path) -> str:
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith((b"<!doctype", b"<html", b"<?xml", b"<head")):
        return " The server sent an HTML/XML page instead of the file."
    if head.startswith((b"{", b"[")):
        return " The server sent a JSON document instead of the file."
    return ""


def _check_announced(entry: HubFile, endpoint: str, token) -> None:
    """Refuse before transferring anything when the Hub announces another file:
    its ETag is the sha256 for LFS/Xet files (a git sha1, ignored, for small
    ones), and its size. Best effort: when the HEAD fails, the download call
    that follows asks again and reports what went wrong."""
    import huggingface_hub

    try:
        url = huggingface_hub.hf_hub_url(entry.repo_id, entry.filename, revision=entry.revision, endpoint=endpoint)
        meta = huggingface_hub.get_hf_file_metadata(url, token=token)
    except Exception as exc:
        if type(exc).__name__ == "InterruptProcessingException":
            raise
        return
    etag = str(meta.etag or "").strip('"').lower()
    announced_size = getattr(meta, "size", None)
    if not getattr(meta, "commit_hash", None) or not etag:
        return   # not a Hub answer (an HTML page...): the download call reports it
    if (_SHA256.match(etag) and etag != entry.sha256) or \
            (entry.size is not None and announced_size is not None and announced_size != entry.size):
        table_note = "" if entry.confirmed else (
            " This entry's checksum was read from a pull-request commit, so the table may be out of date: "
            "please report it.")
        raise DownloadError(
            f"{entry.name}: {endpoint} announces {entry.repo_id}@{entry.revision}:{entry.filename} as sha256 "
            f"{etag or '?'} ({announced_size} B); the table expects {entry.sha256}"
            f"{'' if entry.size is None else f' ({entry.size} B)'}. Not downloaded: it is not the released "
            f"file (a mirror serving other content, or a changed repository).{table_note}")


def download(entry: HubFile, folder_dir, *, endpoint: str | None = None, token: str | bool | None = None,
             tries: int = 3, force: bool = False, progress: Callable[[int, int], None] | None = None,
             log: Callable[[str], None] = print, backoff_s: float = 1.0) -> Path:
    """Make ``folder_dir/entry.subdir/entry.filename`` the table's file and return its path.

    An existing file that is the table's is returned without any request; one
    that is not is replaced only with ``force``. ``token=None`` lets
    huggingface_hub read HF_TOKEN; ``progress(done, total)`` gets byte counts
    (huggingface_hub ≥ 1.1; older versions show their own bars only).
    """
    if tries < 1:
        raise ValueError(f"tries must be at least 1, got {tries}")
    path = target_path(entry, folder_dir)
    found = check_existing(entry, folder_dir, progress)
    if found is None:
        log(f"{entry.name}: {path} is already there and verified (sha256 {entry.sha256[:12]}…)")
        return path
    if found != "missing":
        if not force:
            raise DownloadError(
                f"{entry.name}: {path} exists but is not the table's file: found {found}, expected sha256 "
                f"{entry.sha256}{'' if entry.size is None else f' and {entry.size} B'} (an older release or "
                f"another file). Move it away, or replace it with --force (node: overwrite).")
        log(f"{entry.name}: replacing {path} ({found})")
        remove(entry, folder_dir)

    import huggingface_hub

    version = hub_version()
    resumable = resumes_across_calls(version)
    if not resumable:
        # Orphans of killed runs are never reused from 1.18 on; an hour without a write
        # tells them from the temporary file of a download running in another process.
        for stale in partial_files(entry, folder_dir):
            if time.time() - stale.stat().st_mtime > ORPHAN_AGE_S:
                stale.unlink(missing_ok=True)
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")
    kwargs = dict(repo_id=entry.repo_id, filename=entry.filename, revision=entry.revision,
                  local_dir=str(Path(folder_dir) / entry.subdir), endpoint=endpoint, token=token)
    if progress is not None and version >= (1, 1):
        kwargs["tqdm_class"] = _progress_tqdm(progress)
    log(f"{entry.name}: downloading {entry.repo_id}@{entry.revision[:12]}:{entry.filename} from {endpoint} "
        f"to {path}")
    _check_announced(entry, endpoint, token)
    for attempt in range(1, tries + 1):
        try:
            huggingface_hub.hf_hub_download(**kwargs)
            break
        except Exception as exc:
            if type(exc).__name__ == "InterruptProcessingException":   # ComfyUI's Cancel: never swallowed
                raise
            message, transient = explain(exc, entry, endpoint)
            if transient and attempt < tries:
                log(f"{entry.name}: attempt {attempt}/{tries} failed: {message}; trying again"
                    + (" (resuming the partial file)" if resumable else ""))
                time.sleep(backoff_s * attempt)
                continue
            remove(entry, folder_dir)
            kept = " The partial file is kept; the next run resumes it." if resumable and \
                partial_files(entry, folder_dir) else ""
            raise DownloadError(f"{entry.name}: download failed after {attempt} attempt(s): {message}.{kept}") \
                from exc

    size = path.stat().st_size
    if entry.size is not None and size != entry.size:
        hint = _sniff(path)
        remove(entry, folder_dir)
        raise DownloadError(f"{entry.name}: the server sent {size} B, the table expects {entry.size} B; "
                            f"refused and removed.{hint} Check the endpoint ({endpoint}).")
    if progress:
        progress(size, size)
    got = sha256_file(path)
    if got != entry.sha256:
        hint = _sniff(path)
        remove(entry, folder_dir)
        table_note = "" if entry.confirmed else (
            " This entry's checksum was read from a pull-request commit; if the Hub's own ETag for the file "
            "equals the sha256 received, the table is out of date: please report it.")
        raise DownloadError(
            f"{entry.name}: sha256 mismatch for {entry.repo_id}@{entry.revision}:{entry.filename} from "
            f"{endpoint}: received {got} ({size} B), expected {entry.sha256}; refused, nothing was kept in "
            f"{Path(folder_dir)}.{hint}{table_note} Run again to retry; a mirror that keeps sending other "
            f"bytes is not serving the released file.")
    _write_marker(entry, folder_dir)
    log(f"{entry.name}: verified sha256 {got[:12]}…, {size} B -> {path}")
    return path
