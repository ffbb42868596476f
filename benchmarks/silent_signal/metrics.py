"""Per-half, per-region-kind metrics of generated canvases, and paired statistics.

For each half of the canvas (scored against the control that was given that
half) and each image:

* ``tv_texture``: mean |neighbour difference| over pixel pairs inside textured
  regions (texture wanted), ``tv_flat``: the same inside flat regions (texture
  not wanted); pairs touching a region border (within 1 px) are left out.
* ``recall`` / ``precision``: canny edges of the image against the target
  canvas's canny edges, matched within 1 px (3×3 dilation): recall = share of
  target edge pixels with a generated edge within 1 px, precision = share of
  generated edge pixels with a target edge within 1 px.
* ``tv_silent`` and ``cycle``: the paper's TV in the silent region of the
  half's own condition (a sum, ``eval_images.total_variation`` on
  ``eval_images.silent_region``) and cycle consistency (``eval_images.canny_l1``
  over the condition's non-silent region). Both are defined for the canny
  control; the region map is never black inside its half and is not an edge
  map, so both are NaN on its halves.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np

METRICS = ("tv_texture", "tv_flat", "recall", "precision", "tv_silent", "cycle")
EVAL_ARGS = SimpleNamespace(silent_threshold=0.02, silent_margin=1, silent_value=0.0, cycle_region="non_silent",
                            canny_low=100, canny_high=200)


def _interior(labels: np.ndarray) -> np.ndarray:
    """Pixels whose 3×3 neighbourhood lies in one region."""
    from scipy.ndimage import maximum_filter, minimum_filter

    return maximum_filter(labels, 3, mode="nearest") == minimum_filter(labels, 3, mode="nearest")


def _mean_tv(img: np.ndarray, mask: np.ndarray) -> float:
    from training.eval_images import total_variation

    return total_variation(img, mask)[1]


def _edges(img: np.ndarray) -> np.ndarray:
    from training.data import canny

    u8 = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return canny(np.repeat(u8[..., None], 3, 2), EVAL_ARGS.canny_low, EVAL_ARGS.canny_high)[..., 0] > 127


def edge_recall_precision(gen_edges: np.ndarray, target_edges: np.ndarray, within: np.ndarray) -> tuple[float, float]:
    from scipy.ndimage import binary_dilation

    st = np.ones((3, 3), bool)
    t, g = target_edges & within, gen_edges & within
    recall = float((t & binary_dilation(g, st)).sum() / t.sum()) if t.any() else float("nan")
    precision = float((g & binary_dilation(t, st)).sum() / g.sum()) if g.any() else float("nan")
    return recall, precision


def image_half_metrics(img: np.ndarray, target: np.ndarray, labels: np.ndarray, kinds: np.ndarray,
                       cond: np.ndarray, cond_kind: str, within: np.ndarray) -> dict:
    from training.eval_images import image_metrics

    inner = _interior(labels) & within
    rec, prec = edge_recall_precision(_edges(img), _edges(target), within)
    out = {"tv_texture": _mean_tv(img, inner & (kinds > 0)), "tv_flat": _mean_tv(img, inner & (kinds == 0)),
           "recall": rec, "precision": prec, "tv_silent": float("nan"), "cycle": float("nan")}
    if cond_kind == "canny":
        paper = image_metrics(np.repeat(img[..., None], 3, 2), cond, EVAL_ARGS, within=within)
        out["tv_silent"], out["cycle"] = paper["tv_silent"], paper["canny_l1"]
    return out


def batch_metrics(images: np.ndarray, canvases, idx: np.ndarray, conds: dict, left_kind: str,
                  right_kind: str) -> dict:
    """{half kind ("canny"/"regions"): {metric: (B,) array}} for one batch of one pairing.
    ``conds[kind]`` are the full (unsilenced) conditions of the test canvases."""
    from training.eval_images import halves

    s = images.shape[-1]
    left, right = halves((s, s))
    out = {}
    for kind, within in ((left_kind, left), (right_kind, right)):
        rows = [image_half_metrics(images[i], canvases.images[j], canvases.labels[j], canvases.kinds[j],
                                   conds[kind][i], kind, within) for i, j in enumerate(idx)]
        out[kind] = {m: np.array([r[m] for r in rows]) for m in METRICS}
    return out


def seed_mean_se(per_seed: list[float]) -> tuple[float, float]:
    """Mean over network seeds and its standard error (NaN SE for one seed)."""
    x = np.array([v for v in per_seed if np.isfinite(v)], dtype=np.float64)
    if len(x) == 0:
        return float("nan"), float("nan")
    return float(x.mean()), (float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan"))


def paired_difference(a: list[np.ndarray], b: list[np.ndarray]) -> tuple[float, float]:
    """Mean and SE over seeds of the per-seed mean of per-image differences a − b
    (the same images, from the same noise, under two variants)."""
    diffs = [np.asarray(x, np.float64) - np.asarray(y, np.float64) for x, y in zip(a, b)]
    return seed_mean_se([float(d[np.isfinite(d)].mean()) if np.isfinite(d).any() else float("nan") for d in diffs])


def gain_line_gap(gain_x: list[float], gain_y: list[float], x: float, y: float) -> float:
    """y minus the gain sweep's y at the same x (linear interpolation between the sweep's
    points sorted by x; NaN outside the sweep's range): above 0 = better than more gain."""
    order = np.argsort(gain_x)
    gx, gy = np.asarray(gain_x)[order], np.asarray(gain_y)[order]
    if not (np.isfinite(x) and gx[0] <= x <= gx[-1]):
        return float("nan")
    return float(y - np.interp(x, gx, gy))
