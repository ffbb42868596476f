"""The released weights ``python -m training download`` and the
BalancedControl Download node know: where each lives on the Hugging Face Hub
(repo, pinned commit, path), what it must be (size, sha256) and which ComfyUI
models folder it belongs in.

Sizes and sha256 are the Hub's LFS pointers of the pinned commits (commit
pages / blob pages; see docs/downloads.md). ``size=None`` where only a rounded
size was published: the sha256 is always checked, the size then only against
what the server announces. ``confirmed=False`` marks a checksum read from a
pull-request commit rather than from the pinned commit itself; a mismatch is
then reported as possibly a table error.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

# Commits the table is pinned to (full ids, so a repeat call needs no request).
CONTROLNEXT_REPO = "Pbihao/ControlNeXt"
CONTROLNEXT_COMMIT = "067a80da028de99e48120c315845edccfc809d6e"   # "updated anime canny model (#6)"
SD3_INPAINT_REPO = "alimama-creative/SD3-Controlnet-Inpainting"
SD3_INPAINT_COMMIT = "3868f02488398b2e3b035aa8a1f47734b212aab8"
KIJAI_SVD_REPO = "Kijai/ControlNeXt-SVD-V2-Comfy"

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclasses.dataclass(frozen=True)
class HubFile:
    name: str            # what the user types: python -m training download NAME
    repo_id: str
    revision: str        # a 40-hex commit where one is known, else a branch
    filename: str        # path inside the repo; kept below the folder, so names stay distinct
    sha256: str
    size: int | None     # bytes; None where the exact size was not published
    folder: str          # ComfyUI folder_paths name: controlnext, controlnet, diffusion_models
    subdir: str = ""     # extra folder under the models folder (for repos with generic file names)
    description: str = ""
    confirmed: bool = True

    def __post_init__(self):
        if not _SHA256.match(self.sha256):
            raise ValueError(f"table entry {self.name!r}: sha256 must be 64 lowercase hex digits, "
                             f"got {self.sha256!r}")
        if self.size is not None and (not isinstance(self.size, int) or self.size <= 0):
            raise ValueError(f"table entry {self.name!r}: size must be a positive int or None, got {self.size!r}")
        for part in (self.filename, self.subdir):
            if part.startswith(("/", "\\")) or ".." in Path(part).parts:
                raise ValueError(f"table entry {self.name!r}: {part!r} must be a relative path without '..'")

    @property
    def relative_path(self) -> str:
        """The file's name inside its models folder, as ComfyUI's file lists show it."""
        return f"{self.subdir}/{self.filename}" if self.subdir else self.filename


def _cnx(name, path, size, sha256, description, confirmed=True):
    return HubFile(name, CONTROLNEXT_REPO, CONTROLNEXT_COMMIT, path, sha256, size, "controlnext",
                   description=description, confirmed=confirmed)


_ENTRIES = [
    _cnx("controlnext-sdxl-anime-canny", "ControlAny-SDXL/anime_canny/controlnet.safetensors", 14_110_296,
         "b222038c62ae75307db534eb68964e938fc491a0e35306be696815dee9dd18ec",
         "ControlNeXt-SDXL control module, anime canny (Load ControlNeXt: control_file)"),
    _cnx("controlnext-sdxl-anime-canny-unet", "ControlAny-SDXL/anime_canny/unet.safetensors", 204_984_648,
         "d0bade332e1e6151b3b60534340d207b43a7d135aa1052910f13a449a6d580cb",
         "its UNet subset, attn2.to_out weight differences (Load ControlNeXt: unet_file)"),
    _cnx("controlnext-sdxl-vidit-depth", "ControlAny-SDXL/vidit_depth/controlnet.safetensors", 14_110_296,
         "e73afec65f3e664f9de255d68a420e742c8413e3a02ea968ac6331788fd73d3f",
         "ControlNeXt-SDXL control module, depth (vidit)", confirmed=False),
    _cnx("controlnext-sdxl-vidit-depth-unet", "ControlAny-SDXL/vidit_depth/unet.safetensors", 204_985_792,
         "6eeebed777b5a78653558154c33f039205004ae1ec9dad0311ad6dbac673e09a",
         "its UNet subset", confirmed=False),
    _cnx("controlnext-sd15-vidit-depth", "ControlNeXt-SD1.5/vidit_depth/controlnet.safetensors", None,
         "1009f0bca12415c881b4e73f9f4663cc330b2fb4fbaf0aeac69636024429ef95",
         "ControlNeXt-SD1.5 control module, depth (vidit), 21.4 MB"),
    _cnx("controlnext-svd-v2", "ControlNeXt-SVD/v2/controlnet.bin", 14_122_234,
         "2a60c6e9cfde16adb1d2bf41b8a19a4929b0ba5b206d8bdf7125329c2a684b7c",
         "ControlNeXt-SVD v2 control module (pose); the UNet: controlnext-svd-v2-unet-comfy"),
    _cnx("controlnext-svd-v1", "ControlNeXt-SVD/finetune/controlnet.bin", 22_461_411,
         "481f3d8f3e40281a0ef76150abe90699438b19d95b51f0fdb546873a16301a7d",
         "ControlNeXt-SVD v1 control module (learned scale)"),
    HubFile("controlnext-svd-v2-unet-comfy", KIJAI_SVD_REPO, "main",
            "controlnext-svd_v2-unet-fp16_converted.safetensors",
            "81b29226d4414d386099b7566926ed4ec18b45f9a864fb9a933145d944dbde50", 3_049_445_996,
            "diffusion_models", subdir="ControlNeXt-SVD-V2",
            description="SVD v2 fine-tuned UNet converted to ComfyUI's layout by Kijai (third party), "
                        "3.05 GB; load with Load Diffusion Model"),
    HubFile("sd3-inpainting-controlnet", SD3_INPAINT_REPO, SD3_INPAINT_COMMIT,
            "diffusion_pytorch_model.safetensors",
            "f7e2bcf98ed0989558dd05d857cc49c0aff14dfa3197050d65e51a9d37008dde", None,
            "controlnet", subdir="SD3-Controlnet-Inpainting",
            description="SD3 inpainting ControlNet (alimama-creative, 23 layers, 4.16 GB; licence 'other'), "
                        "the Refine-Control teacher; load with Load ControlNet Model"),
]

TABLE: dict[str, HubFile] = {e.name: e for e in _ENTRIES}


def lookup(name: str, table: dict[str, HubFile] | None = None) -> HubFile:
    """The entry called ``name``; an unknown name is answered with the known ones."""
    table = TABLE if table is None else table
    if name in table:
        return table[name]
    raise KeyError(f"no downloadable file called {name!r}; known names: {', '.join(sorted(table))} "
                   f"(python -m training download --list describes them)")


def load_table(path) -> dict[str, HubFile]:
    """A table from a JSON file: a list of objects with HubFile's fields (for
    mirrors and private repos). Unknown or missing fields are named."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of entries, found {type(data).__name__}")
    fields = {f.name for f in dataclasses.fields(HubFile)}
    required = {f.name for f in dataclasses.fields(HubFile) if f.default is dataclasses.MISSING}
    table = {}
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: entry {i} must be an object, found {type(item).__name__}")
        unknown, missing = set(item) - fields, required - set(item)
        if unknown or missing:
            raise ValueError(f"{path}: entry {i}: unknown fields {sorted(unknown)}, missing fields "
                             f"{sorted(missing)}; the fields are {sorted(fields)}")
        entry = HubFile(**item)
        table[entry.name] = entry
    return table


def describe(table: dict[str, HubFile] | None = None) -> str:
    table = TABLE if table is None else table
    lines = []
    for e in table.values():
        size = f"{e.size / 1e6:.1f} MB" if e.size else "size not pinned"
        flag = "" if e.confirmed else " [checksum from a pull-request commit]"
        lines.append(f"{e.name}\n    {e.repo_id}@{e.revision[:7]}:{e.filename} -> models/{e.folder}/"
                     f"{e.relative_path} ({size}){flag}\n    {e.description}")
    return "\n".join(lines)
