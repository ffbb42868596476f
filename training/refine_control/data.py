"""Refine-Control data: inpainting records (image, mask, prompt, local prompt)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("training.refine_control")


@dataclass
class InpaintRecord:
    name: str
    image: Path
    mask: Path
    prompt: str = ""
    local_prompt: str | None = None


def scan_inpaint_data(root: str | Path) -> tuple[list[InpaintRecord], list[tuple[str, str]]]:
    """Records with an image and a mask; the rest is reported as (item, reason)."""
    from PIL import Image

    root = Path(root)
    path = root / "metadata.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {root}: expected a .jsonl file or a folder with metadata.jsonl "
                                f"(lines like {{\"image\": ..., \"mask\": ..., \"prompt\": ...}})")
    records, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append((f"{path}:{n}", f"not JSON ({e})"))
            continue
        name = str(item.get("image", f"line {n}"))
        if not item.get("image"):
            skipped.append((f"{path}:{n}", "no image given"))
            continue
        if not item.get("mask"):
            skipped.append((name, "no mask given"))
            continue
        image, mask = path.parent / item["image"], path.parent / item["mask"]
        problem = None
        for f, what in ((image, "image"), (mask, "mask")):
            if not f.is_file():
                problem = f"{what} file missing: {f}"
                break
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder error means unusable
                problem = f"{what} unreadable: {f} ({type(e).__name__})"
                break
        if problem:
            skipped.append((name, problem))
            continue
        records.append(InpaintRecord(name, image, mask, str(item.get("prompt", item.get("text", "")) or ""),
                                     item.get("local_prompt")))
    for item, why in skipped:
        log.warning("dataset %s: skipped %s: %s", path, item, why)
    if not records:
        raise ValueError(f"dataset {path}: no usable items ({len(skipped)} skipped, listed above)")
    return records, skipped


def load_pair(rec: InpaintRecord, resolution: int):
    """(image (H, W, 3) float32 in [0,1], mask (H, W) float32 in [0,1]) as torch tensors."""
    import numpy as np
    import torch
    from PIL import Image

    from ..data import load_rgb, resize_crop

    image = load_rgb(rec.image, resolution).astype(np.float32) / 255.0
    with Image.open(rec.mask) as im:
        mask = np.asarray(resize_crop(im.convert("L"), resolution, Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    return torch.from_numpy(image.copy()), torch.from_numpy(mask.copy())


