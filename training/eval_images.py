"""Image metrics of ``python -m training eval``, as the MIControlNet paper reports them.

* Silent region: condition pixels at or below ``--silent-threshold`` (or, with
  ``--silent-value V``, within the threshold of the value V, for controls whose
  silence is not black, e.g. a depth map's far plane), *minus* a margin: a
  pixel counts as silent only if it lies farther than ``--silent-margin``
  pixels from every non-silent pixel, so the texture right next to an edge
  (which the edge itself causes) is not counted.
* ``tv_silent``: total variation Σ |Δ| over horizontally and vertically
  neighbouring pixel pairs that both lie in the silent region, on the [0, 1]
  scale, averaged over the colour channels: a **sum** per image, as the
  paper's table (also given in its units, ``tv_silent_1e4`` = ``tv_silent`` /
  1e4). ``tv_silent_mean`` is the same per pixel pair.
* ``canny_l1``: cycle consistency, the mean L1 between the canny map of the
  generated image and the condition (both binary), by default over the
  non-silent region only (the texture the method puts into silent regions is
  not an error); ``--cycle-region all`` or ``--region mask.png`` change it.
* ``--pair``: the two-condition protocol. Two ControlNets were applied to one
  canvas, the first given the left half of its condition (the rest silent),
  the second the right half; each half of the generated image is scored with
  the metrics of its own condition.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def load_image(path, size=None) -> np.ndarray:
    """An RGB image as float64 in [0, 1], resized (bilinear) to ``size`` = (W, H) if given."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(im).astype(np.float64) / 255.0


def silent_region(condition: np.ndarray, threshold: float = 0.02, margin: int = 3,
                  silent_value: float = 0.0) -> np.ndarray:
    """Pixels of ``condition`` (H, W, C in [0, 1]) that are silent and farther than
    ``margin`` pixels (Euclidean) from every non-silent pixel."""
    from scipy.ndimage import distance_transform_edt

    raw = np.abs(condition - silent_value).max(-1) <= threshold
    if margin <= 0 or raw.all():
        return raw
    return distance_transform_edt(raw) > margin


def total_variation(img: np.ndarray, mask: np.ndarray) -> tuple[float, float]:
    """(Σ, mean) of |horizontal| and |vertical| neighbour differences (channel
    mean) over pairs whose two pixels both lie in ``mask``; NaN mean if none."""
    x = img.astype(np.float64)
    dh = np.abs(x[:, 1:] - x[:, :-1])
    dv = np.abs(x[1:] - x[:-1])
    if x.ndim == 3:
        dh, dv = dh.mean(-1), dv.mean(-1)
    mh, mv = mask[:, 1:] & mask[:, :-1], mask[1:] & mask[:-1]
    total = float(dh[mh].sum() + dv[mv].sum())
    n = int(mh.sum() + mv.sum())
    return total, (total / n if n else float("nan"))


def canny_l1(img: np.ndarray, condition: np.ndarray, region: np.ndarray, low=100, high=200) -> float:
    """Mean |canny(img) − condition| (both binary) over ``region``; NaN if empty."""
    from .data import canny

    edges = canny((img * 255).round().astype(np.uint8), low, high)[..., 0] > 127
    cond = condition.mean(-1) > 0.5
    return float(np.abs(edges.astype(np.float64) - cond)[region].mean()) if region.any() else float("nan")


def image_metrics(img: np.ndarray, cond: np.ndarray, args, region: np.ndarray | None = None,
                  within: np.ndarray | None = None) -> dict:
    """The metrics of one generated image against its condition. ``within``
    restricts every metric to part of the canvas (``--pair``'s halves)."""
    silent = silent_region(cond, args.silent_threshold, args.silent_margin, args.silent_value)
    non_silent = np.abs(cond - args.silent_value).max(-1) > args.silent_threshold
    if region is None:
        region = non_silent if args.cycle_region == "non_silent" else np.ones(silent.shape, bool)
    if within is not None:
        silent, region = silent & within, region & within
    tv_sum, tv_mean = total_variation(img, silent)
    return {"tv_silent": tv_sum, "tv_silent_1e4": tv_sum / 1e4, "tv_silent_mean": tv_mean,
            "silent_fraction": float(silent.mean()),
            "canny_l1": canny_l1(img, cond, region, args.canny_low, args.canny_high)}


def halves(shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Boolean (left, right) halves of an (H, W) canvas."""
    h, w = shape
    left = np.zeros((h, w), bool)
    left[:, : w // 2] = True
    return left, ~left


def measure_images(args) -> dict:
    """``--images`` against ``--condition`` (or, with ``--pair``, against two conditions, one per half)."""
    per_image = []
    for p in args.images:
        img = load_image(p)
        size = (img.shape[1], img.shape[0])
        region = load_image(args.region, size).mean(-1) > 0.5 if args.region else None
        if args.pair:
            left, right = halves(img.shape[:2])
            row = {"image": str(p)}
            for side, cond_path, within in (("left", args.pair[0], left), ("right", args.pair[1], right)):
                cond = load_image(cond_path, size)
                row[side] = image_metrics(img, cond, args, region, within)
            per_image.append(row)
        else:
            cond = load_image(args.condition, size)
            per_image.append({"image": str(p), **image_metrics(img, cond, args, region)})
    metrics: dict = {"images": per_image}
    keys = ("tv_silent", "tv_silent_1e4", "tv_silent_mean", "canny_l1")
    if args.pair:
        for side in ("left", "right"):
            for k in keys:
                metrics[f"{side}_{k}"] = float(np.nanmean([r[side][k] for r in per_image]))
    else:
        for k in keys:
            metrics[k] = float(np.nanmean([r[k] for r in per_image]))
    metrics["tv_definition"] = ("sum of |neighbour differences| (channel mean, [0, 1] scale) over pixel pairs in the "
                                f"silent region (farther than {args.silent_margin} px from any non-silent pixel)")
    return metrics


def check_files(paths) -> list[str]:
    return [f"{p}: no such file" for p in paths if p and not Path(p).is_file()]
