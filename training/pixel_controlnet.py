"""Train ControlNets on a pixel-space base (``pixel_space``) in memory.

The same objective as ``python -m training micontrolnet``: the ControlNet is
``models.controlnet_from_unet`` (encoder copied from the UNet, zero convs
zeroed) or a copy of a given one; every step calls ``objectives.loss_terms``
(the residuals go through ``UNetInjection``, the object the sampler
uses; ``mode`` ``vanilla`` = plain add, ``micontrolnet`` = add^inj in the
given λ convention; ``qc_weight`` > 0 adds stage 2's L_QC^simple) under
``objectives.training_attention``; silent-signal rebalancing silences each
sample's regions with ``data.silence_mask`` from the canvas's own region
labels; the as_written plain-add warm-up is the trainer's rule. What differs
from the file-based trainer: the data are arrays in memory, the text context
is the base's constant one, the task loss can be weighted per row
(``ControlTraining.weighting``, ``pixel_space.loss_weights``; "eps" is the file
trainer's plain ε-MSE), and there is no checkpointing, DDP or mixed precision
(runs of minutes on one device).

Hints enter the ControlNet at 8× the latent size, upscaled with
``comfy.utils.common_upscale(..., "nearest-exact", "center")``: what core's
``ControlNet.get_control`` does at sampling (comfy/controlnet.py, ``cond_hint``).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class ControlTraining:
    steps: int = 400
    batch_size: int = 16
    lr: float = 1e-3
    mode: str = "vanilla"                 # "vanilla" (plain add) or "micontrolnet" (add^inj)
    lambda_convention: str = "as_written"
    granularity: str = "layer"
    max_lambda: float = 20.0
    rebalance_prob: float = 0.0
    keep_prob: float = 0.5
    qc_weight: float = 0.0                # > 0: stage 2 (L_QC^simple on every step)
    plain_add_warmup_steps: int = -1      # -1: the trainer's rule (500 from zero under as_written, else 0)
    silent_value: float = 0.0
    weighting: str = "eps"                # per-row weight of the task loss: pixel_space.loss_weights
    seed: int = 0


def upscale_hint(hint_bhwc: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, 3) control images -> (B, 3, 8h, 8w), as core's ControlNet resizes its hint."""
    import comfy.utils

    h, w = latent_hw
    return comfy.utils.common_upscale(hint_bhwc.movedim(-1, 1), w * 8, h * 8, "nearest-exact", "center")


def rebalanced(hints: np.ndarray, labels: np.ndarray, rng: np.random.Generator, cfg: ControlTraining) -> np.ndarray:
    """Silent-signal rebalancing of one batch (stage 1, paper §4): with probability
    ``rebalance_prob`` a sample keeps a random subset of its regions (``data.silence_mask``)."""
    from .data import silence_mask

    out = hints.copy()
    for i in range(len(out)):
        if rng.random() < cfg.rebalance_prob:
            m = silence_mask(labels[i], rng, cfg.keep_prob)[..., None]
            out[i] = out[i] * m + np.float32(cfg.silent_value) * (1 - m)
    return out


def train_controlnet(base, images: np.ndarray, hints: np.ndarray, labels: np.ndarray, cfg: ControlTraining,
                     init: torch.nn.Module | None = None, device="cpu", log_every: int = 100):
    """Train one ControlNet; returns (ControlNet in eval mode, per-step losses).

    ``images`` (N, S, S) grayscale targets, ``hints`` (N, S, S, 3) in [0, 1],
    ``labels`` (N, S, S) region ids for rebalancing."""
    from . import data, models, objectives
    from .pixel_space import fold, loss_weight_table

    w_table = loss_weight_table(base.model.model_sampling, cfg.weighting).to(device)
    if init is None:
        cnet = models.controlnet_from_unet(base.unet, base.unet_config, seed=cfg.seed)
    else:
        cnet = copy.deepcopy(models.unwrap(init))
    cnet = cnet.to(device).float().train().requires_grad_(True)
    warmup = cfg.plain_add_warmup_steps
    if warmup < 0:
        warmup = 500 if init is None and cfg.lambda_convention == "as_written" and cfg.mode == "micontrolnet" else 0
    opt = torch.optim.AdamW(cnet.parameters(), lr=cfg.lr, weight_decay=0.0)
    latents_all = base.model.process_latent_in(fold(torch.from_numpy(images))).to(device)
    n_t = int(base.model.model_sampling.sigmas.shape[0])
    hw = tuple(latents_all.shape[-2:])
    losses, t0 = [], time.perf_counter()
    with objectives.training_attention():
        for step in range(cfg.steps):
            rng, tg = data.sample_generator(cfg.seed, step)
            idx = rng.integers(0, len(images), cfg.batch_size)
            hint = torch.from_numpy(rebalanced(hints[idx], labels[idx], rng, cfg))
            probe = (objectives.rademacher((cfg.batch_size, *latents_all.shape[1:]), tg)
                     if cfg.qc_weight > 0 else None)
            batch = objectives.Batch(
                latents=latents_all[torch.from_numpy(idx).to(device)], hint=upscale_hint(hint, hw).to(device),
                context=base.context.expand(cfg.batch_size, -1, -1).to(device), y=None,
                noise=torch.randn((cfg.batch_size, *latents_all.shape[1:]), generator=tg).to(device),
                timestep_index=torch.randint(0, n_t, (cfg.batch_size,), generator=tg).to(device),
                probe=None if probe is None else probe.to(device))
            mode = "vanilla" if step < warmup else cfg.mode
            terms = objectives.loss_terms(base.model, cnet, batch, cfg.qc_weight, cfg.granularity, cfg.max_lambda,
                                          None, mode, cfg.lambda_convention, task_weight=w_table[batch.timestep_index])
            loss = terms["total"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(cnet.parameters(), 1.0)
            opt.step()
            losses.append(float(terms["task"].detach().mean()))
            if log_every and (step + 1) % log_every == 0:
                log.info("controlnet step %d/%d loss %.4f (%.1f s)", step + 1, cfg.steps,
                         float(np.mean(losses[-log_every:])), time.perf_counter() - t0)
    return cnet.eval().requires_grad_(False), losses


def comfy_controlnet(cnet: torch.nn.Module):
    """The trained weights as ComfyUI's loader reads them (``load_controlnet_state_dict``),
    i.e. the object ControlNetLoader would give the nodes."""
    import comfy.controlnet

    from .models import unwrap

    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in unwrap(cnet).state_dict().items()}
    return comfy.controlnet.load_controlnet_state_dict(sd)
