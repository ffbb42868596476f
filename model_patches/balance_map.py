"""Render a BalanceRecord as an IMAGE for preview in the graph.

One image per latent of the recorded call (its positive rows), or the one
``batch_index`` picks. One row per UNet layer (or DiT block) that received
minimal-impact residuals, top to bottom in model order, with cells in the
latent's aspect ratio. A DiT block's cell is its image tokens drawn at the
latent's patch grid (``injection.dit_sites.token_grid``): one cell pixel
block per token, same legend as for a UNet. Each row shows:

* **who dominates where**: every pixel takes the colour of the controls,
  mixed by their share of ``‖w_k·f_k‖`` there (the legend gives the colours);
  brightness is the combined magnitude, normalised per layer;
* **control vs base** ("control/UNet", "control/DiT"): the share of the injected control term in the
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


def _resize(m: torch.Tensor, height: int, width: int) -> torch.Tensor:
    return F.interpolate(m[None, None].float(), size=(height, width), mode="nearest")[0, 0]


def render_balance_map(record, cell: int = 64, batch_index: int | None = None) -> torch.Tensor:
    """Return an IMAGE tensor (N, H, W, 3) in [0, 1]: one map per latent of
    the recorded call's positive rows (``batch_index=None``), or the map of
    latent ``batch_index`` (N = 1). Cells are ``cell`` pixels wide and follow
    the latent's aspect ratio."""
    if not record.layers:
        raise ValueError("the balance record holds no layer: no minimal-impact residual reached the UNet on the "
                         "recorded model call")
    batch = record.layers[0]["feature_magnitude"].shape[0]
    rows = record.rows_of(0, batch) or list(range(batch))
    if batch_index is not None:
        if not 0 <= batch_index < len(rows):
            raise ValueError(f"batch_index {batch_index} does not exist: the recorded model call had "
                             f"{len(rows)} latent(s); use 0-{len(rows) - 1}, or -1 for all")
        picked = [batch_index]
    else:
        picked = list(range(len(rows)))
    return torch.cat([_render_row(record, rows[i], i, len(rows), cell) for i in picked])


def _cell_shape(record, cell: int) -> tuple[int, int]:
    """(height, width) of a cell: ``cell`` wide, in the aspect ratio of the largest recorded layer."""
    h, w = max((tuple(layer["feature_magnitude"].shape[-2:]) for layer in record.layers),
               key=lambda hw: hw[0] * hw[1])
    return max(int(round(cell * h / w)), 1), cell


def _render_row(record, row: int, latent: int, latents: int, cell: int) -> torch.Tensor:
    batch = record.layers[0]["feature_magnitude"].shape[0]
    labels: list[str] = []
    for layer in record.layers:
        for lab in layer["controls"]:
            if lab not in labels:
                labels.append(lab)
    inactive = [lab for lab in getattr(record, "inactive", []) if lab not in labels]
    colors = {lab: PALETTE[i % len(PALETTE)] for i, lab in enumerate(labels)}
    cell_h, cell_w = _cell_shape(record, cell)

    font = ImageFont.load_default()
    text_w, pad = 250, 4
    legend_h = 16 * (len(labels) + len(inactive) + 3)
    row_h = max(cell_h, 52)  # three lines of text
    width = text_w + 2 * (cell_w + pad) + pad
    height = legend_h + len(record.layers) * (row_h + pad) + pad
    canvas = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)

    s = record.settings
    sigma = f", sigma {record.sigma:.4g}" if getattr(record, "sigma", None) is not None else ""
    draw.text((pad, 2), f"mode {s.mode}, granularity {s.granularity}, max_lambda {s.max_lambda:g}",
              fill=(230, 230, 230), font=font)
    draw.text((pad, 18), f"latent {latent} of {latents} (batch row {row}, {_row_kind(record, row, batch)}){sigma}",
              fill=(230, 230, 230), font=font)
    for i, lab in enumerate(labels):
        y = 34 + 16 * i
        draw.rectangle([pad, y, pad + 12, y + 12], fill=colors[lab])
        draw.text((pad + 18, y), lab, fill=(230, 230, 230), font=font)
    for i, lab in enumerate(inactive):
        y = 34 + 16 * (len(labels) + i)
        draw.rectangle([pad, y, pad + 12, y + 12], outline=(120, 120, 120))
        draw.text((pad + 18, y), f"{lab} (inactive: outside its range)",
                  fill=(150, 150, 150), font=font)
    draw.text((text_w + pad, legend_h - 16), "dominance", fill=(200, 200, 200), font=font)
    base = "UNet" if getattr(record, "site", "UNet") == "UNet" else "DiT"
    draw.text((text_w + 2 * pad + cell_w, legend_h - 16), f"control/{base}", fill=(200, 200, 200), font=font)

    for li, layer in enumerate(record.layers):
        y0 = legend_h + li * (row_h + pad)
        mags = [m[row] for m in layer["magnitudes"]]
        total = torch.stack(mags).sum(0)
        rgb = torch.zeros(3, *total.shape)
        for lab, m in zip(layer["controls"], mags):
            share = m / total.clamp_min(1e-12)
            rgb += share * torch.tensor(colors[lab], dtype=torch.float32).view(3, 1, 1) / 255.0
        bright = total / total.max().clamp_min(1e-12)
        rgb = rgb * (0.25 + 0.75 * bright)
        dom = torch.stack([_resize(c, cell_h, cell_w) for c in rgb])
        inj = layer["injected_magnitude"][row]
        feat = layer["feature_magnitude"][row]
        ctrl_share = _resize(inj / (inj + feat).clamp_min(1e-12), cell_h, cell_w)

        canvas.paste(_to_pil(dom), (text_w + pad, y0))
        canvas.paste(_to_pil(ctrl_share.expand(3, -1, -1)), (text_w + 2 * pad + cell_w, y0))

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
