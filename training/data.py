"""Training data: layout, loading, canny conditions and silent-signal rebalancing.

Layout (either form):

* **Folder**::

      DATA/images/NAME.png|jpg|webp      target images
      DATA/images/NAME.txt               prompt (optional; empty prompt if absent)
      DATA/conditions/NAME.png           condition image (not needed with --condition canny)
      DATA/segmentation/NAME.png         segmentation map (optional)

* **JSONL** (``DATA`` is a ``.jsonl`` file, or a folder holding ``metadata.jsonl``);
  one object per line, paths relative to the JSONL file's folder::

      {"image": "img/0001.png", "condition": "cond/0001.png", "prompt": "a cat",
       "segmentation": "seg/0001.png"}

  ``condition`` may be omitted with ``--condition canny``; ``segmentation``
  is optional; ``text`` is accepted for ``prompt``.

A segmentation map is an image whose distinct values (grey levels or colours)
are the regions. Images are resized (shorter side to the resolution, area
filter) and centre-cropped; segmentation maps use nearest-neighbour.

Every random choice for a sample (silenced regions, noise, timestep, probe,
empty prompt) comes from a generator seeded with (run seed, global sample
position), so a run gives the same samples whatever the number of ranks,
data workers or restarts.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class Record:
    name: str
    image: Path
    prompt: str
    condition: Path | None = None
    segmentation: Path | None = None
    size: tuple[int, int] | None = None  # (W, H) of the target image


@dataclass
class ScanReport:
    records: list[Record]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)


def scan_dataset(root: str | Path, need_condition: bool, use_index: bool = True) -> ScanReport:
    """Find the samples of a dataset; missing or unreadable files are reported
    by name and the sample is skipped. The result is kept in the dataset's
    index file (``data_index``) and read from it while the data is unchanged."""
    from . import data_index

    root = Path(root)
    cached = data_index.read(root, need_condition) if use_index else None
    if cached is not None:
        rows, skipped = cached
        report = ScanReport([_record(r) for r in rows], skipped)
        for f, why in report.skipped:
            log.warning("dataset: skipped %s: %s", f, why)
        log.info("dataset: %d samples from the index %s", len(report.records), data_index.index_file(root))
        if not report.records:
            raise ValueError(f"dataset {root}: no usable samples ({len(report.skipped)} skipped).")
        return report
    report = _scan(root, need_condition)
    if use_index:
        data_index.write(root, need_condition, [_row(r) for r in report.records], report.skipped)
    return report


def _row(rec: Record) -> dict:
    return {"name": rec.name, "image": str(rec.image), "prompt": rec.prompt,
            "condition": str(rec.condition) if rec.condition else None,
            "segmentation": str(rec.segmentation) if rec.segmentation else None,
            "size": list(rec.size) if rec.size else None}


def _record(row: dict) -> Record:
    return Record(name=row["name"], image=Path(row["image"]), prompt=row["prompt"],
                  condition=Path(row["condition"]) if row.get("condition") else None,
                  segmentation=Path(row["segmentation"]) if row.get("segmentation") else None,
                  size=tuple(row["size"]) if row.get("size") else None)


def _scan(root: Path, need_condition: bool) -> ScanReport:
    if root.is_file() and root.suffix == ".jsonl":
        candidates = _from_jsonl(root)
    elif root.is_dir() and (root / "metadata.jsonl").is_file():
        candidates = _from_jsonl(root / "metadata.jsonl")
    elif root.is_dir() and (root / "images").is_dir():
        candidates = _from_folder(root)
    else:
        raise FileNotFoundError(
            f"no dataset at {root}: expected a folder with images/ (and conditions/, optional "
            f"segmentation/), a folder with metadata.jsonl, or a .jsonl file. See docs/training.md.")
    report = ScanReport([])
    for rec in candidates:
        files = [rec.image] + ([rec.condition] if need_condition else []) + \
                ([rec.segmentation] if rec.segmentation is not None else [])
        if need_condition and rec.condition is None:
            report.skipped.append((str(rec.image), "no condition image given"))
            continue
        problem = None
        for f in files:
            if not f.is_file():
                problem = (str(f), "missing file")
                break
            try:
                with Image.open(f) as im:  # header only: cheap, catches non-images
                    if f == rec.image:
                        rec.size = im.size
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder error means unusable
                problem = (str(f), f"unreadable image ({type(e).__name__}: {e})")
                break
        if problem:
            report.skipped.append(problem)
        else:
            report.records.append(rec)
    for f, why in report.skipped:
        log.warning("dataset: skipped %s: %s", f, why)
    if report.skipped:
        log.warning("dataset: skipped %d of %d samples (listed above)", len(report.skipped), len(candidates))
    if not report.records:
        raise ValueError(f"dataset {root}: no usable samples ({len(report.skipped)} skipped).")
    return report


def _from_jsonl(path: Path) -> list[Record]:
    base = path.parent
    out = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if "image" not in row:
            raise ValueError(f"{path}:{n}: the line has no 'image' field (found {sorted(row)})")

        def p(key):
            return base / row[key] if row.get(key) else None

        out.append(Record(name=Path(row["image"]).stem, image=base / row["image"],
                          prompt=str(row.get("prompt", row.get("text", "")) or ""),
                          condition=p("condition"), segmentation=p("segmentation")))
    return out


def _from_folder(root: Path) -> list[Record]:
    out = []
    for img in sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption = img.with_suffix(".txt")
        out.append(Record(
            name=img.stem, image=img,
            prompt=caption.read_text().strip() if caption.is_file() else "",
            condition=_find(root / "conditions", img.stem),
            segmentation=_find(root / "segmentation", img.stem),
        ))
    return out


def _find(folder: Path, stem: str) -> Path | None:
    for ext in IMAGE_EXTENSIONS:
        p = folder / (stem + ext)
        if p.is_file():
            return p
    # A missing condition is reported at scan time by its expected name.
    return folder / (stem + ".png") if folder.name == "conditions" else None


# --------------------------------------------------------------------------
# images
# --------------------------------------------------------------------------

def load_rgb(path: Path, resolution: int) -> np.ndarray:
    """(res, res, 3) uint8: shorter side resized to ``resolution``, centre crop."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        return np.asarray(resize_crop(im, resolution, Image.Resampling.BICUBIC))


def load_labels(path: Path, resolution: int, min_area: int = 0) -> np.ndarray:
    """(res, res) int64 region labels from a segmentation map: one label per
    distinct value, or with ``min_area`` > 0 one per connected one-colour region,
    regions below ``min_area`` pixels merged into a neighbour (``regions``)."""
    with Image.open(path) as im:
        arr = np.asarray(resize_crop(im.convert("RGB"), resolution, Image.Resampling.NEAREST)).astype(np.int64)
    packed = (arr[..., 0] << 16) | (arr[..., 1] << 8) | arr[..., 2]
    if min_area > 0:
        from .regions import merge_small_regions

        return merge_small_regions(packed, min_area)
    return np.unique(packed, return_inverse=True)[1].reshape(packed.shape)


def resize_crop(im: Image.Image, res: int, resample) -> Image.Image:
    """Shorter side resized to ``res``, then the centre ``res`` × ``res`` square."""
    w, h = im.size
    scale = res / min(w, h)
    nw, nh = max(res, round(w * scale)), max(res, round(h * scale))
    im = im.resize((nw, nh), resample)
    left, top = (nw - res) // 2, (nh - res) // 2
    return im.crop((left, top, left + res, top + res))


def canny(rgb: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """(H, W, 3) uint8 canny edge map of an RGB image (white edges on black)."""
    import cv2

    edges = cv2.Canny(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), low, high)
    return np.repeat(edges[..., None], 3, axis=2)


def superpixels(rgb: np.ndarray, n_segments: int = 12) -> np.ndarray:
    """Fallback regions when no segmentation map is given: SLIC superpixels.

    They follow colour and position, not objects, so silencing them teaches
    less than real masks do (documented as the weaker option)."""
    from skimage.segmentation import slic

    return slic(rgb, n_segments=n_segments, compactness=10, start_label=0).astype(np.int64)


def silence_mask(labels: np.ndarray, rng: np.random.Generator, keep_prob: float) -> np.ndarray:
    """(H, W) float32 mask, 1 in the regions that keep their condition.

    Each region is kept with ``keep_prob``; with two or more regions at least
    one is kept and at least one silenced, so every rebalanced sample has both."""
    regions = np.unique(labels)
    keep = rng.random(len(regions)) < keep_prob
    if len(regions) >= 2:
        if keep.all():
            keep[rng.integers(len(regions))] = False
        if not keep.any():
            keep[rng.integers(len(regions))] = True
    else:
        keep[:] = True
    return np.isin(labels, regions[keep]).astype(np.float32)


# --------------------------------------------------------------------------
# dataset
# --------------------------------------------------------------------------

@dataclass
class SampleOptions:
    resolution: int = 512
    condition: str = "file"           # "file" or "canny"
    canny_low: int = 100
    canny_high: int = 200
    rebalance_prob: float = 0.5       # fraction of samples that get silent regions
    keep_prob: float = 0.5            # per-region keep probability in a rebalanced sample
    superpixels: int = 12             # SLIC regions when a sample has no segmentation map
    empty_prompt_prob: float = 0.0
    latent_channels: int = 4
    num_timesteps: int = 1000
    probes: bool = False              # draw Rademacher probes (stage 2)
    min_region_area: int = 0          # segmentation regions below this many pixels join a neighbour
    silent_value: float = 0.0         # the condition value that means "no signal" ([0, 1])


def sample_generator(seed: int, position: int) -> tuple[np.random.Generator, torch.Generator]:
    ss = np.random.SeedSequence([seed, position])
    tg = torch.Generator().manual_seed(int(ss.generate_state(1, np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return np.random.default_rng(ss), tg


class TrainingSamples(torch.utils.data.Dataset):
    """Item ``(position, index)`` -> one sample dict. A corrupt file found at
    load time is reported by name and replaced by the next loadable sample
    (deterministically), so a long run continues."""

    def __init__(self, records: list[Record], options: SampleOptions, seed: int):
        self.records = records
        self.options = options
        self.seed = seed
        self.bad: set[int] = set()

    def __len__(self):
        return len(self.records)

    def __getitem__(self, item):
        position, index = item
        for attempt in range(len(self.records)):
            i = (index + attempt) % len(self.records)
            if i in self.bad:
                continue
            try:
                return self._load(position, i)
            except Exception as e:  # noqa: BLE001 - a decoder error must not stop the run
                self.bad.add(i)
                log.warning("dataset: skipped %s: cannot decode (%s: %s); %d sample(s) skipped at load time",
                            self.records[i].image, type(e).__name__, e, len(self.bad))
        raise RuntimeError("dataset: every sample failed to load")

    def _load(self, position: int, i: int) -> dict:
        o, rec = self.options, self.records[i]
        rng, tg = sample_generator(self.seed, position)
        rgb = load_rgb(rec.image, o.resolution)
        cond = canny(rgb, o.canny_low, o.canny_high) if o.condition == "canny" else load_rgb(rec.condition, o.resolution)
        cond = cond.astype(np.float32) / 255.0
        mask = np.ones(cond.shape[:2], np.float32)
        if rng.random() < o.rebalance_prob:
            labels = (load_labels(rec.segmentation, o.resolution, o.min_region_area) if rec.segmentation
                      else superpixels(rgb, o.superpixels))
            mask = silence_mask(labels, rng, o.keep_prob)
        # Silenced parts take the "no signal" value: black for edge/pose maps (the default),
        # e.g. the far plane's value for depth maps.
        cond = cond * mask[..., None] + np.float32(o.silent_value) * (1.0 - mask[..., None])
        prompt = "" if rng.random() < o.empty_prompt_prob else rec.prompt
        h = o.resolution // 8
        out = {
            "image": torch.from_numpy(rgb.copy()).float() / 255.0,      # (H, W, 3), ComfyUI IMAGE layout
            "hint": torch.from_numpy(np.ascontiguousarray(cond.transpose(2, 0, 1))),  # (3, H, W)
            "mask": torch.from_numpy(mask),
            "prompt": prompt,
            "noise": torch.randn((o.latent_channels, h, h), generator=tg),
            "timestep_index": torch.randint(0, o.num_timesteps, (), generator=tg),
            "position": position,
            "index": i,
        }
        if o.probes:
            out["probe"] = torch.randint(0, 2, (o.latent_channels, h, h), generator=tg).float() * 2 - 1
        return out


def collate(items: list[dict]) -> dict:
    out = {}
    for k in items[0]:
        vals = [it[k] for it in items]
        out[k] = torch.stack(vals) if isinstance(vals[0], torch.Tensor) else vals
    return out


@functools.lru_cache(maxsize=4)
def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch (cached: every position of the epoch reads it; do not modify)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))


class PositionSampler(torch.utils.data.Sampler):
    """Micro-batches of ``(position, index)`` for one rank, from a global
    sample position onwards: the data order depends only on the seed, so a
    resumed run continues exactly where the saved one stopped."""

    def __init__(self, n: int, seed: int, start_step: int, total_steps: int, micro_batch: int,
                 accumulation: int, world: int, rank: int):
        self.n, self.seed = n, seed
        self.start_step, self.total_steps = start_step, total_steps
        self.micro_batch, self.accumulation, self.world, self.rank = micro_batch, accumulation, world, rank

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.world * self.accumulation

    def index(self, position: int) -> int:
        return int(epoch_order(self.n, self.seed, position // self.n)[position % self.n])

    def __len__(self):
        return (self.total_steps - self.start_step) * self.accumulation

    def __iter__(self):
        for step in range(self.start_step, self.total_steps):
            for micro in range(self.accumulation):
                first = step * self.global_batch + (micro * self.world + self.rank) * self.micro_batch
                yield [(p, self.index(p)) for p in range(first, first + self.micro_batch)]
