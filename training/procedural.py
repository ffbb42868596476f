"""Procedural canvases of flat and textured regions, and two control kinds from them.

A canvas is a grayscale image split into Voronoi regions; each region is
either flat (one grey level) or carries a texture of one of ``TEXTURES`` at
one of ``PERIODS`` (pixels per cycle). Two controls are computed from it:

* ``canny``: the project's canny map (``data.canny``): white edges on black;
  it says *where* every texture line and region border is.
* ``regions``: a semantic region map: each region is a constant colour
  (R = texture kind, G = period, B = grey level), never black, so black
  (0) stays the "no signal" value silent-signal rebalancing uses. It says
  *what* each region holds, not where its lines are: a genuinely different
  condition from canny, learnt by a separate ControlNet.

Everything is a deterministic function of ``seed`` (numpy ``SeedSequence``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TEXTURES = ("flat", "stripes", "checker", "grain")
PERIODS = (4, 6, 8)
CONTROL_KINDS = ("canny", "regions")


@dataclass
class Canvases:
    images: np.ndarray     # (N, S, S) float32 in [0, 1]
    labels: np.ndarray     # (N, S, S) int64 region id (0..k-1 per canvas)
    kinds: np.ndarray      # (N, S, S) int64 index into TEXTURES (0 = flat)
    periods: np.ndarray    # (N, S, S) int64 period in pixels (0 for flat)
    levels: np.ndarray     # (N, S, S) float32 region grey level

    def __len__(self):
        return len(self.images)


def _texture(kind: str, period: int, level: float, rng: np.random.Generator, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    amp = 0.35
    if kind == "flat":
        return np.full((size, size), level, np.float32)
    if kind == "stripes":
        theta = rng.choice([0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4])
        phase = rng.random() * period
        u = xx * np.cos(theta) + yy * np.sin(theta) + phase
        wave = np.where((u % period) < period / 2, 1.0, -1.0)
    elif kind == "checker":
        ox, oy = rng.integers(0, period, 2)
        half = period // 2
        wave = np.where((((xx + ox) // half) + ((yy + oy) // half)) % 2 == 0, 1.0, -1.0)
    elif kind == "grain":
        cell = max(1, period // 4)
        n = size // cell + 2
        cells = rng.choice([-1.0, 1.0], size=(n, n))
        wave = np.kron(cells, np.ones((cell, cell)))[:size, :size]
    else:
        raise ValueError(f"unknown texture {kind!r}; expected one of {TEXTURES}")
    return np.clip(level + amp * wave, 0.0, 1.0).astype(np.float32)


def make_canvases(n: int, size: int = 32, seed: int = 0, regions_per_half: int = 2) -> Canvases:
    """``n`` canvases of ``size``×``size`` pixels. Each half (left, right) holds
    ``regions_per_half`` Voronoi seeds and at least one flat and one textured
    region, so the two-condition protocol finds both kinds in each half."""
    if size % 4 or size < 8:
        raise ValueError(f"canvas size must be a multiple of 4 and at least 8, got {size}")
    if regions_per_half < 2:
        raise ValueError(f"regions_per_half must be >= 2 (one flat, one textured), got {regions_per_half}")
    out = {k: [] for k in ("images", "labels", "kinds", "periods", "levels")}
    yy, xx = np.mgrid[0:size, 0:size]
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence([seed, i]))
        pts, kinds = [], []
        for half in (0, 1):
            x0 = half * size / 2
            for j in range(regions_per_half):
                pts.append((x0 + rng.uniform(0.15, 0.85) * size / 2, rng.uniform(0.1, 0.9) * size))
            ks = [0, int(rng.integers(1, len(TEXTURES)))] + [int(rng.integers(0, len(TEXTURES)))
                                                             for _ in range(regions_per_half - 2)]
            rng.shuffle(ks)
            kinds += ks
        pts = np.array(pts)
        d = (xx[..., None] - pts[:, 0]) ** 2 + (yy[..., None] - pts[:, 1]) ** 2
        labels = d.argmin(-1)
        img = np.zeros((size, size), np.float32)
        kind_map = np.zeros((size, size), np.int64)
        period_map = np.zeros((size, size), np.int64)
        level_map = np.zeros((size, size), np.float32)
        for r, k in enumerate(kinds):
            period = int(rng.choice(PERIODS))
            level = float(rng.uniform(0.3, 0.7)) if k else float(rng.uniform(0.1, 0.9))
            tex = _texture(TEXTURES[k], period, level, rng, size)
            m = labels == r
            img[m] = tex[m]
            kind_map[m] = k
            period_map[m] = period if k else 0
            level_map[m] = level
        for key, v in zip(out, (img, labels, kind_map, period_map, level_map)):
            out[key].append(v)
    return Canvases(**{k: np.stack(v) for k, v in out.items()})


def canny_control(images: np.ndarray, low: int = 100, high: int = 200) -> np.ndarray:
    """(N, S, S, 3) float32 canny maps in [0, 1] (the trainer's ``data.canny``)."""
    from .data import canny

    u8 = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    return np.stack([canny(np.repeat(im[..., None], 3, axis=2), low, high) for im in u8]).astype(np.float32) / 255.0


def region_control(c: Canvases) -> np.ndarray:
    """(N, S, S, 3) float32 region maps: R kind, G period, B grey level; each in [0.2, 1]."""
    r = 0.2 + 0.8 * c.kinds / (len(TEXTURES) - 1)
    g = np.select([c.periods == p for p in PERIODS], [0.4 + 0.3 * i for i in range(len(PERIODS))], 0.2)
    b = 0.2 + 0.8 * c.levels
    return np.stack([r, g, b], -1).astype(np.float32)


def control(kind: str, c: Canvases) -> np.ndarray:
    if kind == "canny":
        return canny_control(c.images)
    if kind == "regions":
        return region_control(c)
    raise ValueError(f"unknown control kind {kind!r}; expected one of {CONTROL_KINDS}")
