"""``python -m training eval``: the paper's measurements, as JSON plus a PNG chart.

Image metrics (``--images``; definitions in ``training/eval_images.py``):
``tv_silent`` (a sum over the silent region, also in the paper's 1e4 units),
``canny_l1`` (cycle consistency over the non-silent region), and ``--pair``,
the two-condition protocol (each half of the canvas scored against its own
condition).

Jacobian asymmetry (``--base`` and ``--controlnet``): of the score
s_t = −ε̂/σ_t w.r.t. x_t through the ControlNet, as L_QC^simple:
``asym`` = tr(J_c J_cᵀ) − tr(J_c J_c) (= ½‖J_c − J_cᵀ‖²_F, a sum per sample),
``nasym`` = asym / (2 tr(J_c J_cᵀ)) (= ‖A‖²_F/‖J_c‖²_F, A the antisymmetric
part), Hutchinson estimates with Rademacher probes, on dataset images
(``--data``: VAE-encoded and noised, with their prompts and conditions) at
several evenly spaced noise levels, for any injection: add^inj (both
granularities, both λ conventions) or a plain add (``--injection add``, a
regular ControlNet).

FID needs Inception weights, which are not bundled and cannot be downloaded
here: pass ``--fid-features`` with a TorchScript feature extractor of your
own (e.g. an exported pt_inception-2015-12-05) and ``--fid-reference`` images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from . import cli
from .eval_images import canny_l1, check_files, measure_images, silent_region, total_variation  # noqa: F401

HELP = "measure silent-region texture (TV), canny cycle consistency, Jacobian asymmetry (Asym) and optionally FID"

# balance.LAMBDA_CONVENTIONS; --help must not import ComfyUI.
LAMBDA_CONVENTIONS = ("as_written", "mgda_weight_of_control")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.description = __doc__
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.add_argument("--output", required=True, help="folder for metrics.json and metrics.png")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N: where every network and tensor of "
                   "the Asym measurement goes (default: auto)")
    g = p.add_argument_group("image metrics (need --images and --condition, or --pair)")
    g.add_argument("--images", nargs="*", default=[], help="generated images (files)")
    g.add_argument("--condition", default=None, help="the condition image they were generated with")
    g.add_argument("--pair", nargs=2, default=None, metavar=("LEFT", "RIGHT"),
                   help="two-condition protocol: the two conditions whose left and right halves two ControlNets "
                        "were given; each half of every image is scored against its own condition")
    g.add_argument("--silent-threshold", type=float, default=0.02,
                   help="condition pixels within this ([0, 1]) of --silent-value count as silent (default: 0.02)")
    g.add_argument("--silent-value", type=float, default=0.0,
                   help="the condition value that means 'no signal' (default: 0, black; e.g. 1 for a depth map "
                        "whose far plane is white)")
    g.add_argument("--silent-margin", type=int, default=3,
                   help="a silent pixel counts for tv_silent only farther than this many pixels from any "
                        "non-silent pixel (default: 3)")
    g.add_argument("--cycle-region", default="non_silent", choices=["non_silent", "all"],
                   help="where canny_l1 is measured unless --region is given (default: non_silent)")
    g.add_argument("--region", default=None, help="mask image (white = inside) for canny_l1")
    g.add_argument("--canny-low", type=int, default=100, help="canny lower threshold (default: 100)")
    g.add_argument("--canny-high", type=int, default=200, help="canny upper threshold (default: 200)")
    g = p.add_argument_group("Jacobian asymmetry (needs --base, --controlnet and --data or --condition)")
    g.add_argument("--base", default=None, help="single-file SD1.5/SDXL checkpoint")
    g.add_argument("--controlnet", default=None, help="ControlNet file to measure")
    g.add_argument("--data", default=None, help="dataset (as for training) whose images, conditions and prompts "
                   "are noised and measured (default: --condition with --prompt on random latents)")
    g.add_argument("--asym-samples", type=int, default=4, help="dataset samples measured (default: 4)")
    g.add_argument("--condition-source", default="file", choices=["file", "canny"],
                   help="with --data: the dataset's condition files or canny edges of its images (default: file)")
    g.add_argument("--prompt", default="", help="prompt without --data (default: empty)")
    g.add_argument("--resolution", type=int, default=512, help="resolution of the Asym measurement (default: 512)")
    g.add_argument("--asym-batch", type=int, default=4, help="probes per sample and noise level (default: 4)")
    g.add_argument("--asym-levels", type=int, default=5, help="evenly spaced noise levels (default: 5)")
    g.add_argument("--injection", default="add_inj", choices=["add_inj", "add"],
                   help="add_inj (MIControlNet) or add (a plain add: a regular ControlNet) (default: add_inj)")
    g.add_argument("--granularity", default=None, choices=["layer", "pixel"],
                   help="add^inj granularity (default: the ControlNet file's metadata, else layer)")
    g.add_argument("--lambda-convention", default=None, choices=list(LAMBDA_CONVENTIONS),
                   help="add^inj's λ convention (default: the ControlNet file's metadata, else as_written)")
    g.add_argument("--max-lambda", type=float, default=20.0, help="clip of add^inj's λ (default: 20)")
    g.add_argument("--seed", type=int, default=0, help="seed of noise and probes (default: 0)")
    g = p.add_argument_group("FID (needs a feature extractor of your own)")
    g.add_argument("--fid-features", default=None, metavar="FILE",
                   help="TorchScript module mapping (N, 3, H, W) images in [0, 1] to (N, D) features")
    g.add_argument("--fid-reference", nargs="*", default=[], help="reference images for FID against --images")


@torch.no_grad()
def asym_metric(model, cnet, hint, context, y=None, batch=4, levels=5, seed=0, latent_hw=None, latents=None,
                mode="micontrolnet", granularity="layer", max_lambda=20.0,
                lambda_convention="as_written") -> list[dict]:
    """Asym and NAsym per noise level (see the module docstring), over the rows of
    ``hint``/``context`` (one per sample) × ``batch`` probes each.

    ``latents`` (samples, C, h, w): the samples' clean latents, noised at each
    level with ComfyUI's noise scaling; None: random N(0, 1) latents. ``mode``
    is the injection's (``micontrolnet`` = add^inj, ``vanilla`` = plain add)."""
    from . import objectives as O

    ms = model.model_sampling
    device = hint.device
    samples = hint.shape[0]
    h, w = latent_hw or (hint.shape[-2] // 8, hint.shape[-1] // 8)
    g = torch.Generator().manual_seed(seed)
    n = ms.sigmas.shape[0]
    rows = samples * batch
    rep = lambda t: None if t is None else t.repeat_interleave(batch, 0).to(device)  # noqa: E731
    ctx, hb, yb = rep(context), rep(hint), rep(y)
    out = []
    for idx in np.linspace(n * 0.02, n - 1, levels).round().astype(int).tolist():
        sigma = ms.sigmas[idx].float().expand(rows).to(device)
        x0 = (rep(latents) if latents is not None else
              torch.randn(rows, model.latent_format.latent_channels, h, w, generator=g).to(device))
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, x0))
        v = O.rademacher(x_t.shape, g).to(device)
        t = ms.timestep(sigma).float()
        k = O.score_jacobian_scale(ms, sigma)

        def f(xp):
            return O.controlled_eps(model, cnet, x_t, xp, t, ctx, yb, hb, granularity, max_lambda, mode,
                                    lambda_convention)

        with torch.enable_grad(), O.training_attention(forward_mode=True):
            _, jv, jtv = O.jacobian_probes(f, x_t, v, create_graph=False)
        jv, jtv = k * jv.float(), k * jtv.float()
        asym = O.qc_per_row(jv, jtv)
        jjt = jtv.flatten(1).square().sum(1)
        out.append({"timestep_index": idx, "sigma": float(sigma[0]), "asym": float(asym.mean()),
                    "asym_std": float(asym.std()) if rows > 1 else 0.0,
                    "nasym": float(asym.mean() / (2 * jjt.mean() + 1e-12))})
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


def _asym_inputs(args, base, device):
    """(hint, context, y, latents) of the samples measured: --data's first
    --asym-samples records, or --condition with --prompt on random latents."""
    from . import data

    res = args.resolution
    if args.data:
        report = data.scan_dataset(args.data, need_condition=args.condition_source == "file")
        records = report.records[: args.asym_samples]
        if not records:
            raise SystemExit(f"training eval: no usable samples in {args.data}")
        images = [data.load_rgb(r.image, res) for r in records]
        conds = [data.canny(im) if args.condition_source == "canny" else data.load_rgb(r.condition, res)
                 for im, r in zip(images, records)]
        prompts = [r.prompt for r in records]
        pixels = torch.from_numpy(np.stack(images)).float() / 255.0
        with torch.no_grad():
            latents = base.model.process_latent_in(base.vae.encode(pixels).float())
    else:
        conds, prompts, latents = [data.load_rgb(Path(args.condition), res)], [args.prompt], None
    hint = torch.from_numpy(np.stack(conds).copy()).permute(0, 3, 1, 2).float() / 255
    contexts, ys = [], []
    for prompt in prompts:
        cond, pooled = base.clip.encode_from_tokens(base.clip.tokenize(prompt), return_pooled=True)
        contexts.append(cond.float())
        if base.family == "SDXL":
            ys.append(base.model.encode_adm(pooled_output=pooled, width=res, height=res, target_width=res,
                                            target_height=res, crop_w=0, crop_h=0, device="cpu"))
    y = torch.cat(ys).to(device) if ys else None
    return hint.to(device), torch.cat(contexts).to(device), y, None if latents is None else latents.to(device)


def measure_asym(args) -> dict:
    from . import engine, models
    from .runtime import setup_comfy

    device = engine.init_distributed(args.device).device
    setup_comfy(force_cpu=device.type == "cpu")
    base = models.load_base_model(args.base, **engine.network_dtypes("no"))
    base.unet.to(device)
    cnet = models.controlnet_from_file(args.controlnet, base).to(device=device, dtype=torch.float32)
    meta = _metadata(args.controlnet)
    granularity = args.granularity or meta.get("granularity", "layer")
    convention = args.lambda_convention or meta.get("lambda_convention", "as_written")
    hint, context, y, latents = _asym_inputs(args, base, device)
    mode = "micontrolnet" if args.injection == "add_inj" else "vanilla"
    levels = asym_metric(base.model, cnet, hint, context, y, args.asym_batch, args.asym_levels, args.seed,
                         latents=latents, mode=mode, granularity=granularity, max_lambda=args.max_lambda,
                         lambda_convention=convention)
    return {"asym_levels": levels, "asym": float(np.mean([lv["asym"] for lv in levels])),
            "nasym": float(np.mean([lv["nasym"] for lv in levels])),
            "asym_setting": {"injection": args.injection, "granularity": granularity,
                             "lambda_convention": convention, "samples": "dataset" if args.data else "random latents"},
            "asym_definition": "tr(Jc JcT) - tr(Jc Jc) of the score's Jacobian w.r.t. x_t through the ControlNet, "
                               "summed over the latent (= ||Jc - JcT||_F^2 / 2); nasym = asym / (2 tr(Jc JcT))"}


def _metadata(path) -> dict:
    import safetensors

    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return dict(f.metadata() or {})
    except Exception:  # noqa: BLE001 - diffusers or pickle files: no metadata to read
        return {}


def fid(args) -> float:
    """FID between --images and --fid-reference on a user-provided feature extractor."""
    from scipy import linalg

    from .eval_images import load_image

    extractor = torch.jit.load(args.fid_features, map_location="cpu").eval()

    def features(paths):
        with torch.no_grad():
            return np.concatenate([extractor(torch.from_numpy(load_image(p)).permute(2, 0, 1)[None].float())
                                   .double().numpy() for p in paths])

    a, b = features(args.images), features(args.fid_reference)
    if min(len(a), len(b)) < 2:
        raise SystemExit("training eval: FID needs at least two --images and two --fid-reference images")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


def _check(args) -> None:
    problems = check_files([args.condition, args.region, args.base, args.controlnet, args.fid_features,
                            *(args.pair or []), *args.images, *args.fid_reference])
    if args.images and not (args.condition or args.pair):
        problems.append("--images needs --condition (the condition they were made with) or --pair LEFT RIGHT")
    if (args.base or args.controlnet) and not (args.base and args.controlnet and (args.data or args.condition)):
        problems.append("Asym needs --base, --controlnet and --data (or --condition)")
    if args.fid_features and not (args.images and args.fid_reference):
        problems.append("--fid-features needs --images and --fid-reference")
    if args.fid_reference and not args.fid_features:
        problems.append("--fid-reference needs --fid-features: FID needs Inception-type weights, which are not "
                        "bundled; pass a TorchScript feature extractor of your own")
    cli.stop_on_problems("eval", problems)


def run(args) -> int:
    cli.configure_logging()
    _check(args)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    metrics: dict = {}
    if args.images:
        metrics.update(measure_images(args))
    if args.base:
        metrics.update(measure_asym(args))
    if args.fid_features:
        metrics["fid"] = fid(args)
    if not metrics:
        raise SystemExit("training eval: nothing to measure; pass --images/--condition and/or --base/--controlnet")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    keys = [k for k, v in metrics.items() if isinstance(v, float) and not k.endswith(("_1e4", "_mean"))]
    bar_chart({k: metrics[k] for k in keys}, out / "metrics.png")
    print(json.dumps({k: v for k, v in metrics.items() if not isinstance(v, (list, dict))}, indent=1))
    return 0
