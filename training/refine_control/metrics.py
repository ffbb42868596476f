"""Masked image metrics of the Refine-Control evaluation (PSNR, SSIM over the inpainted region)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from model_patches.masks import normalise_mask


def masked_psnr(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR (dB) over the masked pixels; images (B, H, W, C) in [0, 1],
    mask (B, H, W) with 1 = inpainted. NaN for an image with an empty mask."""
    m = (normalise_mask(mask) > 0.5).float().unsqueeze(-1)
    err = ((pred.float() - ref.float()).square() * m).sum(dim=(1, 2, 3))
    n = m.sum(dim=(1, 2, 3)) * pred.shape[-1]
    mse = err / n.clamp_min(1)
    psnr = 10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))
    return torch.where(n > 0, psnr, torch.full_like(psnr, float("nan")))


def masked_ssim(pred: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor, window: int = 7) -> torch.Tensor:
    """Per-image mean SSIM over the masked pixels (grey-level, uniform
    ``window``×``window`` statistics, constants of Wang et al. 2004 for data
    range 1). NaN for an image with an empty mask."""
    def grey(x):
        x = x.float()
        return (0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2]).unsqueeze(1) if x.shape[-1] >= 3 \
            else x[..., 0].unsqueeze(1)

    a, b = grey(pred), grey(ref)
    pad = window // 2

    def local_mean(x):
        return F.avg_pool2d(F.pad(x, (pad, pad, pad, pad), mode="reflect"), window, stride=1)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_a, mu_b = local_mean(a), local_mean(b)
    var_a = local_mean(a * a) - mu_a.square()
    var_b = local_mean(b * b) - mu_b.square()
    cov = local_mean(a * b) - mu_a * mu_b
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    m = (normalise_mask(mask) > 0.5).float().unsqueeze(1)
    n = m.sum(dim=(1, 2, 3))
    val = (ssim * m).sum(dim=(1, 2, 3)) / n.clamp_min(1)
    return torch.where(n > 0, val, torch.full_like(val, float("nan")))
