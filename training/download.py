"""``python -m training download NAME``: fetch released weights (the official
ControlNeXt files, the SD3 inpainting ControlNet) into ComfyUI's models
folders, checked against the built-in table's sha256."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

HELP = "download released weights (ControlNeXt, SD3 inpainting ControlNet) into ComfyUI's models folders"

DESCRIPTION = """\
Download files of the built-in table (--list shows it) from the Hugging Face
Hub with huggingface_hub, into the ComfyUI models folder each belongs in:
ControlNeXt modules and their UNet subsets in models/controlnext (where Load
ControlNeXt reads them), the SD3 inpainting ControlNet in models/controlnet,
full UNets in models/diffusion_models. Every file is checked against the
table's sha256 and refused (and removed) on a mismatch. Interrupted downloads
are retried (--tries); huggingface_hub <= 1.17 resumes the partial file.

HF_TOKEN is sent when set (gated or private repos); HF_ENDPOINT (or
--endpoint) selects a mirror. Without --models-dir the folders are those
ComfyUI's folder_paths registers in the ComfyUI tree ($COMFYUI_PATH, else the
cached one); pass --models-dir for another models directory.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = DESCRIPTION
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("names", nargs="*", metavar="NAME", help="table entries to download (see --list)")
    p.add_argument("--list", action="store_true", help="print the table and exit")
    p.add_argument("--models-dir", type=Path, default=None,
                   help="a ComfyUI models directory (files go to DIR/<folder>/...); default: the ComfyUI "
                        "tree's own folders")
    p.add_argument("--endpoint", default=None, help="Hub URL (default: $HF_ENDPOINT, else https://huggingface.co)")
    p.add_argument("--token", default=None, help="Hub token (default: $HF_TOKEN / the saved login)")
    p.add_argument("--tries", type=int, default=3, help="attempts per file on dropped connections (default 3)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing file at the target path whose checksum differs")
    p.add_argument("--table", type=Path, default=None,
                   help="a JSON table (list of entries with the built-in table's fields) instead of the "
                        "built-in one, e.g. for a mirror")


def _modules():
    from . import runtime  # noqa: F401  (puts the repository on sys.path)
    from model_patches import hub_download, hub_table

    return hub_table, hub_download


def folder_for(folder: str, models_dir: Path | None) -> Path:
    """``models_dir/folder``, or the folder ComfyUI's folder_paths registers."""
    if models_dir is not None:
        return Path(models_dir) / folder
    from . import runtime

    runtime.nodes()   # ComfyUI's folder_paths, with models/controlnext registered by the nodes
    _, hub_download = _modules()
    return hub_download.comfy_folder(folder)


def run(args: argparse.Namespace) -> int:
    hub_table, hub_download = _modules()
    table = hub_table.load_table(args.table) if args.table else hub_table.TABLE
    if args.list:
        print(hub_table.describe(table))
        return 0
    if not args.names:
        print("error: name at least one file to download; known names: " + ", ".join(sorted(table)),
              file=sys.stderr)
        return 2
    try:
        entries = [hub_table.lookup(n, table) for n in args.names]
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 2
    progress = _ConsoleProgress() if sys.stderr.isatty() or os.environ.get("BC_DOWNLOAD_PROGRESS") else None
    failed = 0
    for entry in entries:
        try:
            path = hub_download.download(entry, folder_for(entry.folder, args.models_dir), endpoint=args.endpoint,
                                         token=args.token, tries=args.tries, force=args.force,
                                         progress=progress)
        except hub_download.DownloadError as exc:
            print(f"error: {exc}", file=sys.stderr)
            failed += 1
            continue
        print(f"{entry.name}: {path}  (in ComfyUI: {entry.folder} / {entry.relative_path})")
    return 1 if failed else 0


class _ConsoleProgress:
    """A one-line byte counter on stderr (huggingface_hub hides its own bars off a TTY)."""

    def __init__(self):
        self.last = -1

    def __call__(self, done: int, total: int) -> None:
        pct = int(100 * done / total) if total else 0
        if pct != self.last:
            self.last = pct
            print(f"\r  {done / 1e6:9.1f} / {total / 1e6:.1f} MB ({pct:3d} %)", end="" if pct < 100 else "\n",
                  file=sys.stderr, flush=True)
