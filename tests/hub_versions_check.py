"""Run the download function against the mock Hub with whatever
huggingface_hub is importable, e.g. another version installed aside:

    pip install --target /tmp/hf0362 huggingface_hub==0.36.2
    PYTHONPATH=/tmp/hf0362 HF_HUB_DISABLE_PROGRESS_BARS=1 python tests/hub_versions_check.py

(not a pytest module: the suite imports ComfyUI, whose transformers needs a
recent huggingface_hub). Prints, per scenario, what the server saw and what
was left on disk."""

import dataclasses
import hashlib
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from hub_mock import COMMIT, MockHub  # noqa: E402
from model_patches import hub_download as hd, hub_table as ht  # noqa: E402

import huggingface_hub  # noqa: E402


def left(d: Path) -> list[str]:
    return [str(q.relative_to(d)) for q in d.rglob("*") if q.is_file()]


def main() -> int:
    print("huggingface_hub", huggingface_hub.__version__, "| resumes across calls:", hd.resumes_across_calls())
    hub = MockHub()
    data = os.urandom(12 << 20)
    real = ht.TABLE["controlnext-sdxl-anime-canny-unet"]
    e = dataclasses.replace(real, revision=COMMIT, sha256=hub.add(real.repo_id, real.filename, data), size=len(data))
    quiet = dict(endpoint=hub.endpoint, log=lambda m: None, backoff_s=0)

    d = Path(tempfile.mkdtemp())
    hub.set_mode("drop", drop_at=11 << 20, drop_count=1)
    p = hd.download(e, d, progress=lambda a, b: None, **quiet)
    print("drop once at 11 MiB: ok =", hashlib.sha256(p.read_bytes()).hexdigest() == e.sha256,
          "| GET ranges:", [h.get("range") for h in hub.gets()])

    d = Path(tempfile.mkdtemp())
    hub.set_mode("drop", drop_at=11 << 20, drop_count=99)
    try:
        hd.download(e, d, tries=2, **quiet)
    except hd.DownloadError as exc:
        print("drops on every try: failed;", "partial kept" if "partial file is kept" in str(exc) else "no partial",
              [q.stat().st_size for q in hd.partial_files(e, d)])
    hub.set_mode("normal")
    hd.download(e, d, **quiet)
    print("  next run: GET ranges:", [h.get("range") for h in hub.gets()], "| partials left:", hd.partial_files(e, d))

    for mode in ["corrupt", "html", "get_html", "404", "404entry", "401repo"]:
        hub.set_mode(mode)
        d = Path(tempfile.mkdtemp())
        try:
            hd.download(e, d, tries=1, **quiet)
            print(mode, "-> NOT REFUSED")
        except hd.DownloadError as exc:
            msg = str(exc).split(f"{hub.endpoint}", 1)[-1]
            print(f"{mode} -> {msg[:150]!r} | left: {left(d)}")
    hub.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
