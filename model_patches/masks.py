"""One mask helper for every control family (MIControlNet, ControlNeXt, Refine-Control).

A ComfyUI MASK is (B, H, W) or (H, W), 1 = full effect. ``normalise_mask``
checks and normalises it once, at the node; ``mask_at`` resizes it to a
feature map exactly as core resizes hints (``comfy.utils.common_upscale``,
bilinear, centre crop: comfy/controlnet.py ``ControlBase.get_control``);
``mask_for_rows`` repeats it over a batch the way core repeats a hint
(``comfy.controlnet.broadcast_image_to``: one mask per latent, repeated in
every cond/uncond chunk); ``mask_index_per_row`` gives which mask each row of
a cond/uncond batch takes when the masks are one per latent.
"""

from __future__ import annotations

import torch


def normalise_mask(mask: torch.Tensor | None, what: str = "mask") -> torch.Tensor | None:
    """(B, H, W) fp32 in [0, 1] (NaN read as 0), or None for no mask; a clear error otherwise."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        found = f"a tensor shaped {tuple(mask.shape)}" if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{what}: expected a MASK shaped (B, H, W) or (H, W), got {found}; connect a MASK "
                         "output (e.g. from Load Image or Convert Image to Mask).")
    if mask.ndim == 2:
        mask = mask.unsqueeze(0)
    return torch.nan_to_num(mask.to(torch.float32), nan=0.0).clamp(0.0, 1.0)


def mask_at(mask: torch.Tensor, height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(B, 1, height, width): the (B, H, W) mask resized as core resizes a hint."""
    import comfy.utils

    m = mask.to(device=device if device is not None else mask.device, dtype=torch.float32).unsqueeze(1)
    return comfy.utils.common_upscale(m, width, height, "bilinear", "center").to(dtype)


def mask_for_rows(mask: torch.Tensor, like: torch.Tensor, batched_number: int) -> torch.Tensor:
    """The mask at ``like``'s size, device and dtype, one per row of ``like`` (N, C, H, W),
    repeated over the cond/uncond chunks as core repeats a hint."""
    import comfy.controlnet

    m = mask_at(mask, like.shape[-2], like.shape[-1], like.device)
    if m.shape[0] != like.shape[0]:
        m = comfy.controlnet.broadcast_image_to(m, like.shape[0], batched_number)
    return m.to(like.dtype)


def mask_index_per_row(count: int, n_rows: int, per: int, what: str = "mask",
                       latents: str = "images") -> torch.Tensor:
    """Which of ``count`` masks each of ``n_rows`` batch rows takes: the one mask for all
    rows, or one per latent in every chunk of ``per`` rows (cond/uncond chunks)."""
    if count == 1:
        return torch.zeros(n_rows, dtype=torch.long)
    if count != per:
        raise ValueError(
            f"{what}: the mask batch has {count} masks, but the latent batch has {per} latents ({latents}). "
            f"Expected 1 mask (used for every latent) or {per} (one per latent, in order); give a mask batch "
            "of that size.")
    return torch.arange(n_rows) % per
