"""A pixel-space base model: ComfyUI's SD1.5-family UNet on 2×2-folded pixels.

For experiments that need a *trained* base model but cannot download one
(``benchmarks/silent_signal``): a grayscale image in [0, 1] is mapped to
[−1, 1] and folded 2×2 into four channels (``pixel_unshuffle``), so an
``S×S`` image is a ``4×S/2×S/2`` "latent" and no VAE is needed. The model is
ComfyUI's own ``comfy.model_base.BaseModel`` built from a
``comfy.supported_models.SD15`` subclass (the UNet is
``openaimodel.UNetModel``, the noise schedule SD1.5's discrete ε schedule),
with a plain ``LatentFormat`` (no channel mixing; its ``scale_factor`` is
``build_pixel_base``'s ``latent_scale``, 1 unless given), so ComfyUI's sampler,
ControlNet loader and this project's injection code all run on it unchanged.
Two spaces, as with a VAE: ``fold`` gives the "VAE" space in [−1, 1];
``model.process_latent_in`` scales it to the model space the UNet sees.

Attention heads: ComfyUI's ControlNet loader falls back to
``supported_models_base.BASE`` for a config that matches no released model
(comfy/model_detection.py ``model_config_from_unet(..., use_base_if_no_match)``),
whose extra config is ``num_heads=-1, num_head_channels=64``. The base uses the
same, so a ControlNet trained here and the one ComfyUI's loader builds from
its file compute the same attention (tested).
"""

from __future__ import annotations

import copy
import logging
import math
import numbers
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .runtime import setup_comfy

log = logging.getLogger(__name__)

# A small SD1.5-family UNet on 4 channels: two levels, self- and (constant-context)
# cross-attention at the lower level and in the middle block only.
PIXEL_UNET = {
    "use_checkpoint": False, "image_size": 16, "in_channels": 4, "out_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1], "channel_mult": [1, 2], "transformer_depth": [0, 1],
    "transformer_depth_output": [0, 0, 1, 1], "transformer_depth_middle": 1, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "context_dim": 32, "use_linear_in_transformer": False,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def pixel_unet_config(model_channels: int = 32, context_dim: int = 32) -> dict:
    cfg = copy.deepcopy(PIXEL_UNET)
    cfg.update(model_channels=model_channels, context_dim=context_dim)
    return cfg


def _config_class():
    setup_comfy()
    import comfy.latent_formats
    import comfy.supported_models

    class PixelSpaceSD15(comfy.supported_models.SD15):
        """SD1.5's schedule and UNet class on folded pixels (a plain latent format)."""
        latent_format = comfy.latent_formats.LatentFormat
        # What ComfyUI's ControlNet loader uses for an unrecognised config (see the module docstring).
        unet_extra_config = {"num_heads": -1, "num_head_channels": 64}

    return PixelSpaceSD15


def fold(gray: torch.Tensor) -> torch.Tensor:
    """(B, H, W) grayscale in [0, 1] -> (B, 4, H/2, W/2) folded latent in [−1, 1] (before the
    latent format's scale: ``model.process_latent_in`` gives model space)."""
    if gray.ndim != 3 or gray.shape[-1] % 2 or gray.shape[-2] % 2:
        raise ValueError(f"fold: expected (B, H, W) with even H and W, got {tuple(gray.shape)}")
    return F.pixel_unshuffle((gray * 2 - 1).unsqueeze(1), 2)


def unfold(latent: torch.Tensor) -> torch.Tensor:
    """Inverse of ``fold``: (B, 4, h, w) -> (B, 2h, 2w) in [0, 1] (clamped)."""
    if latent.ndim != 4 or latent.shape[1] != 4:
        raise ValueError(f"unfold: expected (B, 4, h, w), got {tuple(latent.shape)}")
    return ((F.pixel_shuffle(latent.float(), 2)[:, 0] + 1) / 2).clamp(0, 1)


@dataclass
class PixelBase:
    """The trained base: ComfyUI model, its patcher and the constant text context."""

    model: object          # comfy.model_base.BaseModel
    unet_config: dict
    context: torch.Tensor  # (1, 1, context_dim): the one "caption" every sample has

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.diffusion_model

    def patcher(self):
        import comfy.model_management
        import comfy.model_patcher

        return comfy.model_patcher.ModelPatcher(self.model, load_device=comfy.model_management.get_torch_device(),
                                                offload_device=comfy.model_management.unet_offload_device())

    def conditioning(self) -> list:
        """Positive/negative conditioning for ComfyUI's sampler."""
        return [[self.context.clone(), {}]]


def build_pixel_base(unet_config: dict | None = None, seed: int = 0, device="cpu",
                     latent_scale: float = 1.0) -> PixelBase:
    """A freshly initialised pixel-space base (PyTorch's default init, seeded).

    ``latent_scale`` is the latent format's ``scale_factor`` (model space = ``fold`` × scale,
    as SD1.5's 0.18215 scales its VAE latents): ComfyUI's sampler applies it on the way in
    and out, the trainers through ``model.process_latent_in``."""
    if isinstance(latent_scale, bool) or not isinstance(latent_scale, numbers.Real) or not 0 < latent_scale < math.inf:
        raise ValueError(f"latent_scale: expected a finite number > 0 (model space = fold space x scale; "
                         f"1 keeps the pixels' own scale), got {latent_scale!r}")
    cfg = copy.deepcopy(unet_config or PIXEL_UNET)
    config = _config_class()(cfg)
    config.latent_format.scale_factor = float(latent_scale)
    model = config.get_model({}, device=torch.device("cpu"))
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in model.diffusion_model.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                (torch.nn.Conv2d if isinstance(m, torch.nn.Conv2d) else torch.nn.Linear).reset_parameters(m)
            elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
                m.weight.fill_(1.0)
                m.bias.zero_()
        context = torch.randn(1, 1, cfg["context_dim"])
    torch.random.set_rng_state(g_state)
    model.diffusion_model.to(device)
    return PixelBase(model, config.unet_config, context)


def eps_loss(model, latents: torch.Tensor, noise: torch.Tensor, timestep_index: torch.Tensor,
             context: torch.Tensor) -> torch.Tensor:
    """Per-row ε-MSE of the UNet alone, on ComfyUI's schedule (as ``objectives.loss_terms``)."""
    ms = model.model_sampling
    sigma = ms.sigmas.to(latents.device)[timestep_index].float()
    x_in = ms.calculate_input(sigma, ms.noise_scaling(sigma, noise, latents))
    eps = model.diffusion_model(x_in, ms.timestep(sigma).float(), context=context.expand(len(latents), -1, -1))
    return (eps.float() - noise).square().flatten(1).mean(1)


LOSS_WEIGHTINGS = ("eps", "v")


def loss_weights(model_sampling, timestep_index: torch.Tensor, weighting: str) -> torch.Tensor:
    """Per-row weights of the ε-MSE. ``eps``: 1 (SD1.5's own loss). ``v``: 1 + σ², i.e. the
    v-prediction loss of Salimans & Ho 2022 (§4, "SNR+1" weighting) expressed on the ε model:
    with x = x0 + σε, v̂ − v = √(1+σ²)(ε̂ − ε). Divided by its mean over the schedule (the weights
    average 1 over the timesteps; 0.047 at t=0 and 10.07 at t=999 on SD1.5's schedule).
    ``v`` puts weight where a small ε-model is worst: at high σ an
    ε error δ is a σ·δ error of x0̂, the sampler's first steps."""
    check_timesteps(model_sampling, timestep_index)
    return loss_weight_table(model_sampling, weighting).to(timestep_index.device)[timestep_index]


def loss_weight_table(model_sampling, weighting: str) -> torch.Tensor:
    """``loss_weights`` for every timestep of the schedule, (n_t,) fp32 on the schedule's
    device: the trainers build it once and index it per step."""
    sigmas = model_sampling.sigmas.float()
    if weighting == "eps":
        return torch.ones_like(sigmas)
    if weighting == "v":
        w = 1.0 + sigmas.square()
        return w / w.mean()
    raise ValueError(f"loss weighting: expected one of {LOSS_WEIGHTINGS} ('eps': plain ε-MSE, "
                     f"'v': the v-prediction loss), got {weighting!r}")


def check_timesteps(model_sampling, timestep_index) -> None:
    """Timestep indices must lie in the schedule (a negative index would wrap to σ_max)."""
    n_t = int(model_sampling.sigmas.shape[0])
    t = torch.as_tensor(timestep_index)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= n_t):
        raise ValueError(f"timestep index: expected integers in [0, {n_t - 1}] (the schedule's "
                         f"{n_t} steps), got values from {int(t.min())} to {int(t.max())}")


def train_pixel_base(base: PixelBase, images: torch.Tensor, steps: int, batch_size: int = 16, lr: float = 2e-3,
                     seed: int = 0, device="cpu", log_every: int = 100, weighting: str = "eps") -> list[float]:
    """Train the base UNet on grayscale ``images`` (N, H, W) in [0, 1] with AdamW;
    every random choice comes from ``seed``. ``weighting``: see ``loss_weights``.
    Returns the per-step (unweighted) ε-MSE losses."""
    w_table = loss_weight_table(base.model.model_sampling, weighting).to(device)
    unet = base.unet.to(device)
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50) * max(0.1, 1 - s / max(steps, 1)))
    g = torch.Generator().manual_seed(seed)
    latents = base.model.process_latent_in(fold(images)).to(device)
    n_t = int(base.model.model_sampling.sigmas.shape[0])
    ctx = base.context.to(device)
    losses, t0 = [], time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, len(latents), (batch_size,), generator=g)
        noise = torch.randn((batch_size, *latents.shape[1:]), generator=g).to(device)
        t = torch.randint(0, n_t, (batch_size,), generator=g).to(device)
        per_row = eps_loss(base.model, latents[idx.to(device)], noise, t, ctx)
        loss = per_row.detach().mean()
        opt.zero_grad(set_to_none=True)
        (per_row * w_table[t]).mean().backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if log_every and (step + 1) % log_every == 0:
            log.info("base step %d/%d loss %.4f (%.1f s)", step + 1, steps,
                     sum(losses[-log_every:]) / log_every, time.perf_counter() - t0)
    unet.requires_grad_(False).eval()
    return losses


@torch.no_grad()
def denoising_report(base: PixelBase, images: torch.Tensor, timesteps=(50, 200, 400, 600, 800, 950, 999),
                     seed: int = 0) -> list[dict]:
    """How well the base denoises held-out ``images`` (N, H, W) at fixed timesteps.

    Per timestep: ``eps_mse``; ``x0_mse`` of x0̂ = x − σε̂ (model space, = σ²·ε-MSE);
    ``x0_mse_mean``, the x0-MSE of always answering these images' per-position mean (their
    variance: an oracle answer, slightly optimistic for few images). All in model space. A base
    whose ``x0_mse`` is above ``x0_mse_mean`` at high σ predicts worse than the trivial
    answer where the sampler starts, and its samples drift out of range (saturate)."""
    dev = next(base.unet.parameters()).device
    latents = base.model.process_latent_in(fold(images.float())).to(dev)
    ctx = base.context.to(dev)
    ms = base.model.model_sampling
    check_timesteps(ms, timesteps)
    g = torch.Generator().manual_seed(seed)
    var = float(latents.float().var(0, unbiased=False).mean())
    out = []
    for t in timesteps:
        noise = torch.randn(latents.shape, generator=g).to(dev)
        idx = torch.full((len(latents),), int(t), dtype=torch.long, device=dev)
        eps_mse = float(eps_loss(base.model, latents, noise, idx, ctx).mean())
        sigma = float(ms.sigmas[int(t)])
        out.append({"t": int(t), "sigma": sigma, "eps_mse": eps_mse, "x0_mse": sigma ** 2 * eps_mse,
                    "x0_mse_mean": var})
    return out
