"""``python -m training eval``: the paper's measurements, as JSON plus a PNG chart.

* ``tv_silent``: total variation of each generated image inside the silent
  region of its condition (mean absolute difference of neighbouring pixels,
  [0, 1] scale). Higher means the silent area holds texture rather than flat
  colour.
* ``canny_l1``: cycle consistency, the mean L1 between the canny map of the
  generated image and the condition (both binary, [0, 1]) inside a region.
* ``asym``: the asymmetry of the ControlNet-induced Jacobian J_c,
  tr(J_c J_cᵀ) − tr(J_c J_c) (= ‖J_c − J_cᵀ‖²_F / 2), estimated with
  Rademacher probes (Hutchinson), per latent element, averaged over a batch
  and over evenly spaced noise levels; ``nasym`` divides by tr(J_c J_cᵀ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import cli

HELP = "measure silent-region texture (TV), canny cycle consistency and Jacobian asymmetry (Asym)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--output", required=True, help="folder for metrics.json and metrics.png")
    g = p.add_argument_group("image metrics (need --images and --condition)")
    g.add_argument("--images", nargs="*", default=[], help="generated images (files)")
    g.add_argument("--condition", default=None, help="the condition image they were generated with")
    g.add_argument("--silent-threshold", type=float, default=0.02,
                   help="condition pixels at or below this ([0, 1]) count as silent (default: 0.02)")
    g.add_argument("--region", default=None, help="mask image (white = inside) for canny_l1 (default: whole image)")
    g.add_argument("--canny-low", type=int, default=100, help="canny lower threshold (default: 100)")
    g.add_argument("--canny-high", type=int, default=200, help="canny upper threshold (default: 200)")
    g = p.add_argument_group("Jacobian asymmetry (needs --base and --controlnet)")
    g.add_argument("--base", default=None, help="single-file SD1.5/SDXL checkpoint")
    g.add_argument("--controlnet", default=None, help="ControlNet file to measure")
    g.add_argument("--prompt", default="", help="prompt for the Asym measurement (default: empty)")
    g.add_argument("--resolution", type=int, default=512, help="resolution of the Asym measurement (default: 512)")
    g.add_argument("--asym-batch", type=int, default=4, help="probes (batch rows) per noise level (default: 4)")
    g.add_argument("--asym-levels", type=int, default=5, help="evenly spaced noise levels (default: 5)")
    g.add_argument("--seed", type=int, default=0, help="seed of noise and probes (default: 0)")


def total_variation(img: np.ndarray, mask: np.ndarray) -> float:
    """Mean |horizontal| + |vertical| neighbour difference where both pixels lie in ``mask``."""
    x = img.astype(np.float64)
    dh = np.abs(x[:, 1:] - x[:, :-1]).mean(-1) if x.ndim == 3 else np.abs(x[:, 1:] - x[:, :-1])
    dv = np.abs(x[1:] - x[:-1]).mean(-1) if x.ndim == 3 else np.abs(x[1:] - x[:-1])
    mh, mv = mask[:, 1:] & mask[:, :-1], mask[1:] & mask[:-1]
    n = mh.sum() + mv.sum()
    return float((dh[mh].sum() + dv[mv].sum()) / n) if n else float("nan")


def canny_l1(img: np.ndarray, condition: np.ndarray, region: np.ndarray, low=100, high=200) -> float:
    from .data import canny

    edges = canny((img * 255).round().astype(np.uint8), low, high)[..., 0] > 127
    cond = condition.mean(-1) > 0.5
    return float(np.abs(edges.astype(np.float64) - cond)[region].mean()) if region.any() else float("nan")


def _load(path, size=None) -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert("RGB")
        if size is not None and im.size != size:
            im = im.resize(size, Image.Resampling.BILINEAR)
        return np.asarray(im).astype(np.float64) / 255.0


@torch.no_grad()
def asym_metric(model, cnet, hint, context, y=None, batch=4, levels=5, seed=0, latent_hw=None) -> list[dict]:
    """Asym per noise level: the Hutchinson mean of ‖J_cᵀv‖² − ⟨J_cᵀv, J_c v⟩
    (per latent element) over ``batch`` probes at random latents."""
    from . import objectives as O

    ms = model.model_sampling
    h, w = latent_hw or (hint.shape[-2] // 8, hint.shape[-1] // 8)
    g = torch.Generator().manual_seed(seed)
    n = ms.sigmas.shape[0]
    out = []
    for idx in np.linspace(n * 0.02, n - 1, levels).round().astype(int).tolist():
        sigma = ms.sigmas[idx].float().expand(batch)
        x = torch.randn(batch, model.latent_format.latent_channels, h, w, generator=g) * (sigma[:, None, None, None] ** 2 + 1) ** 0.5
        v = O.rademacher(x.shape, g)
        t = ms.timestep(sigma).float()
        x_unet = ms.calculate_input(sigma, x)
        ctx = context.expand(batch, *context.shape[1:])
        hb = hint.expand(batch, *hint.shape[1:])
        yb = None if y is None else y.expand(batch, *y.shape[1:])

        def f(xp):
            return O.controlled_eps(model, cnet, x_unet, ms.calculate_input(sigma, xp), t, ctx, yb, hb)

        with torch.enable_grad(), O.training_attention(forward_mode=True):
            _, jv, jtv = O.jacobian_probes(f, x, v, create_graph=False)
        asym = O.qc_per_row(jv, jtv)
        jjt = jtv.float().flatten(1).square().sum(1) / jtv[0].numel()
        out.append({"timestep_index": idx, "sigma": float(sigma[0]), "asym": float(asym.mean()),
                    "asym_std": float(asym.std()) if batch > 1 else 0.0,
                    "nasym": float((asym / (jjt + 1e-12)).mean() / 2)})
    return out


def bar_chart(values: dict[str, float], path: Path) -> None:
    """A plain bar chart drawn with PIL (no plotting dependency)."""
    names = list(values)
    w, h, pad = 120 * max(1, len(names)) + 40, 260, 30
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    finite = [abs(v) for v in values.values() if np.isfinite(v)]
    top = max(finite) if finite and max(finite) > 0 else 1.0
    d.line([(20, h - pad), (w - 10, h - pad)], fill="black")
    for i, name in enumerate(names):
        v = values[name]
        x0 = 30 + i * 120
        bh = 0 if not np.isfinite(v) else (h - 2 * pad - 20) * abs(v) / top
        d.rectangle([x0, h - pad - bh, x0 + 80, h - pad], fill=(70, 110, 200))
        d.text((x0, h - pad + 5), name[:16], fill="black")
        d.text((x0, h - pad - bh - 14), f"{v:.4g}", fill="black")
    img.save(path)


def run(args) -> int:
    cli.configure_logging()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    if args.images:
        if not args.condition:
            raise SystemExit("training eval: --images needs --condition (the condition they were made with)")
        per_image = []
        for p in args.images:
            img = _load(p)
            cond = _load(args.condition, (img.shape[1], img.shape[0]))
            silent = cond.max(-1) <= args.silent_threshold
            region = _load(args.region, (img.shape[1], img.shape[0])).mean(-1) > 0.5 if args.region else \
                np.ones(silent.shape, bool)
            per_image.append({"image": str(p), "tv_silent": total_variation(img, silent),
                              "silent_fraction": float(silent.mean()),
                              "canny_l1": canny_l1(img, cond, region, args.canny_low, args.canny_high)})
        metrics["images"] = per_image
        metrics["tv_silent"] = float(np.nanmean([r["tv_silent"] for r in per_image]))
        metrics["canny_l1"] = float(np.nanmean([r["canny_l1"] for r in per_image]))
    if args.base or args.controlnet:
        if not (args.base and args.controlnet and args.condition):
            raise SystemExit("training eval: Asym needs --base, --controlnet and --condition")
        from . import models
        from .runtime import setup_comfy

        setup_comfy()
        base = models.load_base_model(args.base)
        cnet = models.controlnet_from_file(args.controlnet, base)
        from .data import load_rgb

        hint = torch.from_numpy(load_rgb(Path(args.condition), args.resolution).copy()).permute(2, 0, 1)[None].float() / 255
        cond, pooled = base.clip.encode_from_tokens(base.clip.tokenize(args.prompt), return_pooled=True)
        y = None
        if base.family == "SDXL":
            r = args.resolution
            y = base.model.encode_adm(pooled_output=pooled, width=r, height=r, target_width=r, target_height=r,
                                      crop_w=0, crop_h=0, device="cpu")
        levels = asym_metric(base.model, cnet, hint, cond.float(), y, args.asym_batch, args.asym_levels, args.seed)
        metrics["asym_levels"] = levels
        metrics["asym"] = float(np.mean([lv["asym"] for lv in levels]))
        metrics["nasym"] = float(np.mean([lv["nasym"] for lv in levels]))
        metrics["asym_definition"] = "tr(Jc JcT) - tr(Jc Jc) per latent element (= ||Jc - JcT||_F^2 / 2 / d)"
    if not metrics:
        raise SystemExit("training eval: nothing to measure; pass --images/--condition and/or --base/--controlnet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    bar_chart({k: metrics[k] for k in ("tv_silent", "canny_l1", "asym", "nasym") if k in metrics}, out / "metrics.png")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, list)}, indent=1))
    return 0
