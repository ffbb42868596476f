"""The two figures, drawn with PIL (the project has no plotting dependency).

* ``sample_grid``: rows are test canvases; columns the target, the two half
  conditions and every variant, all from the same noise.
* ``tradeoff_plot``: per half kind, edge recall against TV in flat regions;
  the plain sum's gain sweep is a line, every other variant a point with
  standard-error bars, so a variant above the line is better than more gain.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

PALETTE = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207), (0, 0, 128), (128, 0, 0)]


def _tile(pic: np.ndarray, cell: int) -> Image.Image:
    a = np.clip(np.asarray(pic, np.float64), 0, 1)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, 2)
    im = Image.fromarray((a * 255).round().astype(np.uint8)).resize((cell, cell), Image.Resampling.NEAREST)
    d = ImageDraw.Draw(im)
    d.line([(cell // 2, 0), (cell // 2, cell)], fill=(255, 0, 0))
    return im


def sample_grid(run: dict, path: Path, rows: int = 4, cell: int = 64) -> Path:
    r = run["results"][0]
    ps, (a, b) = r["samples"], r["conditions"]
    lk, rk = ps.pairing.split("|")
    names = [v.name for v in run["variants"]]
    cols = ["target", f"L: {lk}", f"R: {rk}"] + names
    rows = min(rows, len(a))
    head, gap = 46, 4
    img = Image.new("RGB", (len(cols) * (cell + gap) + gap, head + rows * (cell + gap) + 14), "white")
    d = ImageDraw.Draw(img)
    for j, name in enumerate(cols):
        x = gap + j * (cell + gap)
        words = name.replace(",", "").split(" ")
        lines, cur = [], ""
        for w in words:
            if len(cur) + len(w) + 1 > 11 and cur:
                lines.append(cur)
                cur = w
            else:
                cur = f"{cur} {w}".strip()
        lines.append(cur)
        for k, line in enumerate(lines[:4]):
            d.text((x, 2 + 11 * k), line, fill="black")
        for i in range(rows):
            pic = [run["test"].images[i], a[i], b[i]][j] if j < 3 else ps.images[names[j - 3]][i]
            img.paste(_tile(pic, cell), (x, head + i * (cell + gap)))
    d.text((gap, img.height - 12), f"network seed {ps.seed}, pairing {ps.pairing}: every column from the same noise; "
           f"red line = the halves' border", fill="black")
    img.save(path)
    return path


def tradeoff_plot(summary: dict, run: dict, path: Path, w: int = 560, h: int = 440) -> Path:
    kinds = summary["kinds"]
    t = summary["table"]
    gains = [v.name for v in run["variants"] if v.group == "gain"]
    others = [n for n in summary["variants"] if n not in gains]
    legend_w = 250
    img = Image.new("RGB", (len(kinds) * w + legend_w, h), "white")
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 60, 20, 30, 50
    for p, kind in enumerate(kinds):
        ox = p * w
        pts = {n: (t[n][kind]["tv_flat"], t[n][kind]["recall"]) for n in summary["variants"]}
        xs = [v[0][0] for v in pts.values() if np.isfinite(v[0][0])]
        ys = [v[1][0] for v in pts.values() if np.isfinite(v[1][0])]
        tgt = summary["targets"].get(kind, {})
        if not xs or not ys:
            continue
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        x0, x1 = x0 - 0.08 * (x1 - x0 + 1e-6), x1 + 0.08 * (x1 - x0 + 1e-6)
        y0, y1 = y0 - 0.08 * (y1 - y0 + 1e-6), y1 + 0.08 * (y1 - y0 + 1e-6)

        def X(v):  # error bars are clipped to the panel
            return ox + left + (min(max(v, x0), x1) - x0) / (x1 - x0) * (w - left - right)

        def Y(v):
            return h - bottom - (min(max(v, y0), y1) - y0) / (y1 - y0) * (h - top - bottom)

        d.rectangle([X(x0), Y(y1), X(x1), Y(y0)], outline="black")
        for k in range(5):
            xv, yv = x0 + (x1 - x0) * k / 4, y0 + (y1 - y0) * k / 4
            d.text((X(xv) - 14, h - bottom + 4), f"{xv:.3f}", fill="black")
            d.text((ox + 8, Y(yv) - 5), f"{yv:.3f}", fill="black")
        d.text((ox + left, h - 18), "TV in flat regions (lower = cleaner)", fill="black")
        d.text((ox + left, 4), f"halves given the {kind} control: edge recall @1px (y)", fill="black")
        if np.isfinite(tgt.get("tv_flat", np.nan)) and x0 <= tgt["tv_flat"] <= x1:
            d.line([(X(tgt["tv_flat"]), Y(y1)), (X(tgt["tv_flat"]), Y(y0))], fill=(150, 150, 150))
            d.text((X(tgt["tv_flat"]) + 2, Y(y1) + 2), "target", fill=(120, 120, 120))
        line = [(X(pts[g][0][0]), Y(pts[g][1][0])) for g in gains
                if np.isfinite(pts[g][0][0]) and np.isfinite(pts[g][1][0])]
        if len(line) > 1:
            d.line(line, fill="black", width=2)
        for g, (px, py) in zip(gains, line):
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill="black")
            d.text((px + 4, py + 2), g.replace("sum ", ""), fill="black")
        for i, n in enumerate(others):
            (mx, sx), (my, sy) = pts[n]
            if not (np.isfinite(mx) and np.isfinite(my)):
                continue
            c = PALETTE[i % len(PALETTE)]
            sx, sy = np.nan_to_num(sx), np.nan_to_num(sy)
            d.line([(X(mx - sx), Y(my)), (X(mx + sx), Y(my))], fill=c)
            d.line([(X(mx), Y(my - sy)), (X(mx), Y(my + sy))], fill=c)
            d.rectangle([X(mx) - 3, Y(my) - 3, X(mx) + 3, Y(my) + 3], fill=c)
    lx = len(kinds) * w + 8
    d.line([(lx, 20), (lx + 20, 20)], fill="black", width=2)
    d.text((lx + 26, 14), "plain sum, gain sweep", fill="black")
    for i, n in enumerate(others):
        c = PALETTE[i % len(PALETTE)]
        y = 36 + 16 * i
        d.rectangle([lx + 7, y, lx + 13, y + 6], fill=c)
        d.text((lx + 26, y - 3), n, fill="black")
    d.text((lx, 40 + 16 * len(others)), "bars: ± SE over network seeds (clipped to the panel)", fill="black")
    img.save(path)
    return path
