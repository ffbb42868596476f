"""Dataset -> pixel-space base -> ControlNets (per kind, per seed) -> protocol samples -> metrics."""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch

from .metrics import batch_metrics
from .sampling import PairSamples, half_conditions, sample_variant, variants

log = logging.getLogger("silent_signal")


@dataclass(frozen=True)
class Preset:
    size: int = 32               # canvas pixels (latent = size/2)
    n_train: int = 2048
    n_test: int = 16
    model_channels: int = 32
    base_steps: int = 3000
    base_batch: int = 16
    cn_steps: int = 600          # plain-add ControlNet from the UNet
    ft_steps: int = 200          # each fine-tune from it (rebalanced plain add, add^inj per convention)
    s2_steps: int = 60           # stage 2 (L_QC) after the mgda add^inj fine-tune; 0 = none
    cn_batch: int = 8
    qc_weight: float = 0.01
    seeds: int = 3               # ControlNet seeds (each trained network)
    sample_steps: int = 20
    rebalance_prob: float = 0.5
    latent_scale: float = 2.5    # latent format scale (pixel_space.build_pixel_base): fold std 0.6 -> model std ~1.4
    weighting: str = "v"         # loss weighting of base and ControlNets (pixel_space.loss_weights)


PRESETS = {
    "tiny": Preset(size=16, n_train=16, n_test=2, model_channels=32, base_steps=3, base_batch=4, cn_steps=2,
                   ft_steps=1, s2_steps=1, cn_batch=2, seeds=2, sample_steps=2),
    # A reduced run: 24 px canvases, 192 training canvases, 1/5 of the base steps, ~1/3 of the ControlNet steps.
    "small": Preset(size=24, n_train=192, n_test=6, base_steps=600, cn_steps=160, ft_steps=80, s2_steps=15,
                    cn_batch=8, sample_steps=8),
    "default": Preset(),
}
KINDS = ("canny", "regions")
PAIRINGS = (("canny", "regions"), ("regions", "canny"))


def train_nets(base, canvases, conds, preset: Preset, seed: int, kind: str, device) -> dict:
    """The ControlNets of one kind and seed: plain add from the UNet; fine-tuned from it:
    plain add on rebalanced data, add^inj (each λ convention) on rebalanced data; stage 2."""
    from training.pixel_controlnet import ControlTraining, train_controlnet

    s = 1000 * seed + KINDS.index(kind)
    base_cfg = ControlTraining(steps=preset.cn_steps, batch_size=preset.cn_batch, seed=s, weighting=preset.weighting)
    args = (base, canvases.images, conds[kind], canvases.labels)
    nets, losses = {}, {}
    nets["plain"], losses["plain"] = train_controlnet(*args, base_cfg, device=device, log_every=0)
    ft = replace(base_cfg, steps=preset.ft_steps, rebalance_prob=preset.rebalance_prob, seed=s + 1)
    nets["plain_reb"], losses["plain_reb"] = train_controlnet(*args, ft, init=nets["plain"], device=device, log_every=0)
    for conv in ("as_written", "mgda_weight_of_control"):
        cfg = replace(ft, mode="micontrolnet", lambda_convention=conv, plain_add_warmup_steps=0)
        nets[f"inj_{conv}"], losses[f"inj_{conv}"] = train_controlnet(*args, cfg, init=nets["plain"], device=device,
                                                                      log_every=0)
    if preset.s2_steps:
        cfg = replace(ft, steps=preset.s2_steps, mode="micontrolnet", lambda_convention="mgda_weight_of_control",
                      plain_add_warmup_steps=0, qc_weight=preset.qc_weight, seed=s + 2)
        key = "inj_mgda_weight_of_control_s2"
        nets[key], losses[key] = train_controlnet(*args, cfg, init=nets["inj_mgda_weight_of_control"],
                                                  device=device, log_every=0)
    return nets, {k: [float(np.mean(v[:max(1, len(v) // 10)])), float(np.mean(v[-max(1, len(v) // 10):]))]
                  for k, v in losses.items()}


def run(preset: Preset, device: str = "cpu", data_seed: int = 0, base_seed: int = 0, max_lambda: float = 20.0,
        progress=print) -> dict:
    """Everything the report needs: per (seed, pairing) samples and metrics, and the inputs."""
    from training import procedural
    from training.pixel_controlnet import comfy_controlnet
    from training.pixel_space import build_pixel_base, denoising_report, pixel_unet_config, train_pixel_base

    t0 = time.perf_counter()
    train = procedural.make_canvases(preset.n_train, preset.size, seed=data_seed)
    test = procedural.make_canvases(preset.n_test, preset.size, seed=data_seed + 10_000)
    conds = {k: procedural.control(k, train) for k in KINDS}
    test_conds = {k: procedural.control(k, test) for k in KINDS}
    base = build_pixel_base(pixel_unet_config(preset.model_channels), seed=base_seed, device=device,
                            latent_scale=preset.latent_scale)
    base_losses = train_pixel_base(base, torch.from_numpy(train.images), preset.base_steps, preset.base_batch,
                                   seed=base_seed, device=device, log_every=0, weighting=preset.weighting)
    progress(f"base trained: {preset.base_steps} steps, loss {np.mean(base_losses[:10]):.3f} -> "
             f"{np.mean(base_losses[-10:]):.3f} ({time.perf_counter() - t0:.0f} s)")
    base_denoising = denoising_report(base, torch.from_numpy(test.images))
    progress("base denoising of the test canvases (x0-MSE vs the data mean's): " + ", ".join(
        f"t={d['t']} {d['x0_mse']:.3f}/{d['x0_mse_mean']:.3f}" for d in base_denoising))
    patcher = base.patcher()
    vs = variants(with_stage2=preset.s2_steps > 0)
    latent_shape = (preset.n_test, 4, preset.size // 2, preset.size // 2)
    results, losses = [], {}
    for seed in range(preset.seeds):
        comfy_nets = {}
        for kind in KINDS:
            nets, losses[f"{kind}/seed{seed}"] = train_nets(base, train, conds, preset, seed, kind, device)
            comfy_nets[kind] = {k: comfy_controlnet(v) for k, v in nets.items()}
            progress(f"seed {seed}: {kind} ControlNets trained ({time.perf_counter() - t0:.0f} s)")
        for p_index, (lk, rk) in enumerate(PAIRINGS):
            a, b = half_conditions(test_conds[lk], test_conds[rk])
            ps = PairSamples(seed, f"{lk}|{rk}")
            # Rotate the order of variants from one (seed, pairing) to the next.
            shift = (2 * seed + p_index) % len(vs)
            for v in vs[shift:] + vs[:shift]:
                controls = [(comfy_nets[lk][v.nets], a), (comfy_nets[rk][v.nets], b)]
                img, digest = sample_variant(base, patcher, controls, v, preset.sample_steps,
                                             seed=10_000 * seed + p_index, latent_shape=latent_shape,
                                             max_lambda=max_lambda)
                ps.images[v.name], ps.noise[v.name] = img.numpy(), digest
            metrics = {name: batch_metrics(img, test, np.arange(preset.n_test), test_conds, lk, rk)
                       for name, img in ps.images.items()}
            results.append({"samples": ps, "metrics": metrics, "conditions": (a.numpy(), b.numpy())})
            progress(f"seed {seed}: pairing {lk}|{rk} sampled ({time.perf_counter() - t0:.0f} s)")
    return {"preset": asdict(preset), "device": device, "variants": vs, "results": results, "test": test,
            "test_conditions": test_conds,
            "base_loss": [float(np.mean(base_losses[:10])), float(np.mean(base_losses[-10:]))],
            "controlnet_loss": losses, "base_denoising": base_denoising, "seconds": time.perf_counter() - t0}
