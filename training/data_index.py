"""The dataset index: the scan of a dataset (its samples, their image sizes and
captions) built once into a cache file next to the data, so that a
million-image folder starts in seconds and every rank reads the same list.

The file is ``DATA/.bc-index.json`` for a folder dataset, ``FILE.jsonl.bc-index.json``
for a JSONL file. It is valid while the dataset's folders (images/,
conditions/, segmentation/) or its JSONL file keep their modification times
(adding, removing or renaming a file changes a folder's); after editing files
in place (a caption, an image), delete it to rebuild.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

VERSION = 1


def index_file(root: Path) -> Path:
    return root.with_name(root.name + ".bc-index.json") if root.is_file() else root / ".bc-index.json"


def signature(root: Path, need_condition: bool) -> dict:
    """What the index depends on: the layout's files and folders and their mtimes."""
    if root.is_file():
        watched = [root]
    elif (root / "metadata.jsonl").is_file():
        watched = [root / "metadata.jsonl"]
    else:
        watched = [root / d for d in ("images", "conditions", "segmentation")]
    return {"version": VERSION, "need_condition": need_condition,
            "watched": {str(p): (p.stat().st_mtime_ns if p.exists() else None) for p in watched}}


def read(root: Path, need_condition: bool):
    """The cached ``(records, skipped)`` (records as dicts with absolute paths), or None."""
    path = index_file(root)
    if not path.is_file():
        return None
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if cached.get("signature") != signature(root, need_condition):
        return None
    base = str(root.parent if root.is_file() else root) + os.sep
    records = cached["records"]
    for rec in records:  # string joins: pathlib's parsing would dominate at a million records
        for key in ("image", "condition", "segmentation"):
            if rec.get(key):
                rec[key] = base + rec[key]
    return records, [tuple(s) for s in cached["skipped"]]


def write(root: Path, need_condition: bool, records: list[dict], skipped: list[tuple[str, str]]) -> None:
    """Write the index atomically; a read-only dataset only gets a log line."""
    base = root.parent if root.is_file() else root

    def relative(rec):
        return {k: (os.path.relpath(v, base) if k in ("image", "condition", "segmentation") and v else v)
                for k, v in rec.items()}

    path = index_file(root)
    tmp = path.with_name(path.name + f".partial-{os.getpid()}")
    try:
        tmp.write_text(json.dumps({"signature": signature(root, need_condition),
                                   "records": [relative(r) for r in records], "skipped": skipped}))
        tmp.replace(path)
        log.info("dataset: index of %d samples written to %s", len(records), path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        log.warning("dataset: the index could not be written to %s (%s); every start scans the data again", path, e)
