"""``refine-control-eval``: teacher vs student through ComfyUI's sampler and the node."""

from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path

from . import metrics
from .data import load_pair, scan_inpaint_data
from .models import load_sd3_base
from .text import TextCache

log = logging.getLogger("training.refine_control")


def run_eval(args) -> int:

    from ..runtime import setup_comfy

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup_comfy()
    import torch

    records, skipped = scan_inpaint_data(args.data)
    patcher, clip, vae = load_sd3_base(args.base)
    text = TextCache(clip, max_entries=args.text_cache_size)  # embeddings kept as CLIP Text Encode gives them
    images_dir = Path(args.save_images) if args.save_images else None
    if images_dir is not None:
        images_dir.mkdir(parents=True, exist_ok=True)
    from model_patches.refine_control_files import load_refine_control

    # with the files' own metadata, so 'auto' follows a student's file and contradictions fail
    nets = {"teacher": (load_refine_control(args.teacher, "--teacher"), args.teacher_wiring),
            "student": (load_refine_control(args.student, "--student"), args.student_wiring)}
    scores = {k: {"psnr": [], "ssim": []} for k in nets}
    empty = 0
    for i, rec in enumerate(records):
        with torch.inference_mode():  # as ComfyUI's executor runs a prompt
            empty += evaluate_record(i, rec, args, patcher, vae, text, nets, scores, images_dir)

    timing = controlnet_timing(nets, patcher, args)
    report = {"images": len(scores["student"]["psnr"]), "skipped_items": len(skipped), "empty_masks": empty,
              **{f"{k}_{m}": (statistics.fmean(v[m]) if v[m] else None) for k, v in scores.items() for m in v},
              **timing}
    for k, v in report.items():
        print(f"{k}: {v}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


def evaluate_record(i: int, rec, args, patcher, vae, text, nets: dict, scores: dict, images_dir) -> int:
    """Inpaint one record with each ControlNet; 1 when its mask is empty (not scored), else 0."""
    import comfy.sample
    from ..runtime import nodes

    RefineControlInpaintApply = nodes().refine_control.RefineControlInpaintApply

    image, mask = load_pair(rec, args.resolution)
    image, mask = image[None], mask[None]
    if float((mask > 0.5).sum()) == 0:
        log.warning("eval: %s has an empty mask; nothing to inpaint, left out of the scores", rec.name)
        return 1
    c, p = text(rec.prompt)
    pos = [[c, {"pooled_output": p}]]
    cn_, pn_ = text("")
    neg = [[cn_, {"pooled_output": pn_}]]
    local = [[text(rec.local_prompt)[0], {}]] if rec.local_prompt else None
    # The graph this reproduces: VAE Encode -> Set Latent Noise Mask -> KSampler (euler, normal,
    # denoise 1) -> VAE Decode. The latent goes in as VAE Encode gives it and comes out as VAE
    # Decode takes it: comfy.sample.sample applies the latent format's process_in/process_out itself.
    latent = vae.encode(image[..., :3])
    for name, (control, wiring) in nets.items():
        out = RefineControlInpaintApply.execute(pos, neg, control, vae, image, mask, 1.0, 0.0, 1.0,
                                                args.convention, wiring, "add", 20.0, local_prompt=local)
        p_c, n_c = out.args
        noise = comfy.sample.prepare_noise(latent, args.seed + i)
        noise_mask = mask[:, None]
        samples = comfy.sample.sample(patcher, noise, args.steps, args.cfg, "euler", "normal", p_c, n_c, latent,
                                      denoise=1.0, noise_mask=noise_mask, seed=args.seed + i,
                                      disable_pbar=True)
        decoded = vae.decode(samples)[..., :3].float().cpu()
        if images_dir is not None:
            save_png(decoded[0], images_dir / f"{i:05d}_{name}.png")
        scores[name]["psnr"].append(float(metrics.masked_psnr(decoded, image, mask)[0]))
        scores[name]["ssim"].append(float(metrics.masked_ssim(decoded, image, mask)[0]))
    return 0


def save_png(image, path: Path) -> None:
    """An IMAGE row (H, W, 3) in [0, 1] as an 8-bit PNG, quantised like core's Save Image."""
    import numpy as np
    from PIL import Image

    Image.fromarray(np.clip(255.0 * image.numpy(), 0, 255).astype(np.uint8)).save(path)


def controlnet_timing(nets: dict, patcher, args) -> dict:
    """Median ControlNet forward time of the student and the teacher at the
    evaluation resolution (``median_controlnet_seconds``)."""
    import comfy.model_management
    import torch

    dev = comfy.model_management.get_torch_device()
    dm = patcher.model.diffusion_model
    dtype = comfy.model_management.unet_dtype() if dev.type == "cuda" else torch.float32
    models = {name: control.control_model.to(dev, dtype) for name, (control, _) in nets.items()}
    ctx_dim = dm.context_embedder.in_features if hasattr(dm.context_embedder, "in_features") else 4096
    adm = dm.y_embedder.mlp[0].in_features if dm.y_embedder is not None else 2048
    med = median_controlnet_seconds(models, args.resolution // 8, ctx_dim, adm, args.timing_repeats)
    return {"teacher_layers": len(models["teacher"].joint_blocks),
            "student_layers": len(models["student"].joint_blocks),
            "teacher_ms": med["teacher"] * 1000, "student_ms": med["student"] * 1000,
            "time_ratio": med["student"] / med["teacher"], "device": str(dev)}


def median_controlnet_seconds(models: dict, latent_side: int, ctx_dim: int, adm: int, repeats: int,
                              on_round=None) -> dict:
    """Median forward time of each SD3 ControlNet in ``models`` (name -> module,
    on its device and dtype) for one sampling step: batch 2 (cond + uncond
    rows), run by the node's own layer function. The models alternate within
    every round so that all see the same machine state; the first round warms
    up. ``on_round(i)`` is called after each round."""
    import torch

    from model_patches.refine_control_runtime import controlnet_layers

    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, cn in models.items():
        p = next(cn.parameters())
        hint_channels = cn.pos_embed_input.proj.weight.shape[1]
        inputs[name] = [t.to(p.device, p.dtype) for t in (
            torch.randn(2, 16, latent_side, latent_side, generator=g),
            torch.randn(2, hint_channels, latent_side, latent_side, generator=g),
            torch.full((2,), 500.0),
            torch.randn(2, 154, ctx_dim, generator=g),
            torch.randn(2, adm, generator=g))]

    def sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in models}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for name, cn in models.items():
                device = inputs[name][0].device
                sync(device)
                t0 = time.perf_counter()
                controlnet_layers(cn, *inputs[name])
                sync(device)
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)
            if on_round:
                on_round(rep)
    return {name: statistics.median(v) for name, v in times.items()}
