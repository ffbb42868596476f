"""Render a BalanceRecord as an IMAGE for preview in the graph.

One row per UNet layer that received minimal-impact residuals, top to bottom
in UNet order. Each row shows, for the chosen batch row (default: the first
positive row):

* **who dominates where**: every pixel takes the colour of the controls,
  mixed by their share of ``‖w_k·f_k‖`` there (the legend gives the colours);
  brightness is the combined magnitude, normalised per layer;
* **control vs UNet**: the share of the injected control term in the
  feature after injection, ``‖λ·f_c‖ / (‖f_e‖ + ‖λ·f_c‖)`` per pixel, black =
  the UNet feature alone, white = the control alone;
* the numbers: each control's combination weight and the injection λ
  (means over the row's pixels in pixel granularity).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

PALETTE = [
    (230, 60, 60), (60, 200, 80), (70, 120, 255), (240, 200, 40),
    (200, 80, 220), (40, 210, 210), (255, 140, 40), (160, 160, 160),
]


def _resize(m: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=(size, size), mode="nearest")[0, 0]


def render_balance_map(record, row: int | None = None, cell: int = 64) -> torch.Tensor:
    """Return an IMAGE tensor (1, H, W, 3) in [0, 1]."""
    if not record.layers:
        raise ValueError("the balance record holds no layer: no minimal-impact control was active on the recorded step")
    batch = record.layers[0]["feature_magnitude"].shape[0]
    if row is None:
        rows = record.rows_of(0, batch) or list(range(batch))
        row = rows[0]
    if not 0 <= row < batch:
        raise ValueError(f"batch row {row} does not exist: the recorded step had {batch} rows")

    labels: list[str] = []
    for layer in record.layers:
        for lab in layer["controls"]:
            if lab not in labels:
                labels.append(lab)
    colors = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}

    font = ImageFont.load_default()
    text_w, pad, legend_h = 250, 4, 16 * (len(labels) + 2)
    width = text_w + 2 * (cell + pad) + pad
    height = legend_h + len(record.layers) * (cell + pad) + pad
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)

    s = record.settings
    draw.text((pad, 2), f"mode {s.mode}, granularity {s.granularity}, max_lambda {s.max_lambda:g}, "
              f"batch row {row} ({_row_kind(record, row, batch)})", fill=(230, 230, 230), font=font)
    for i, lab in enumerate(labels):
        y = 18 + 16 * i
        draw.rectangle([pad, y, pad + 12, y + 12], fill=colors[lab])
        draw.text((pad + 18, y), lab, fill=(230, 230, 230), font=font)
    draw.text((text_w + pad, legend_h - 16), "dominance", fill=(200, 200, 200), font=font)
    draw.text((text_w + 2 * pad + cell, legend_h - 16), "control/UNet", fill=(200, 200, 200), font=font)

    for li, layer in enumerate(record.layers):
        y0 = legend_h + li * (cell + pad)
        mags = [m[row] for m in layer["magnitudes"]]
        total = torch.stack(mags).sum(0)
        rgb = torch.zeros(3, *total.shape)
        for lab, m in zip(layer["controls"], mags):
            share = m / total.clamp_min(1e-12)
            rgb += share * torch.tensor(colors[lab], dtype=torch.float32).view(3, 1, 1) / 255.0
        bright = total / total.max().clamp_min(1e-12)
        rgb = rgb * (0.25 + 0.75 * bright)
        dom = torch.stack([_resize(c, cell) for c in rgb])
        inj = layer["injected_magnitude"][row]
        feat = layer["feature_magnitude"][row]
        ctrl_share = _resize(inj / (inj + feat).clamp_min(1e-12), cell)

        canvas.paste(_to_pil(dom), (text_w + pad, y0))
        canvas.paste(_to_pil(ctrl_share.expand(3, -1, -1)), (text_w + 2 * pad + cell, y0))

        weights = ", ".join(f"{float(w[row].mean()):.2f}" for w in layer["weights"])
        lam = float(layer["injection_lambda"][row].mean())
        draw.text((pad, y0 + 4), layer["layer"], fill=(230, 230, 230), font=font)
        draw.text((pad, y0 + 20), f"w = [{weights}]", fill=(200, 200, 200), font=font)
        draw.text((pad, y0 + 36), f"lambda_inj = {lam:.2f}", fill=(200, 200, 200), font=font)

    arr = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy(arr)[None]


def _row_kind(record, row: int, batch: int) -> str:
    if row in record.rows_of(0, batch):
        return "positive"
    if row in record.rows_of(1, batch):
        return "negative"
    return "unlabelled"


def _to_pil(chw: torch.Tensor) -> Image.Image:
    arr = (chw.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    return Image.fromarray(arr)
