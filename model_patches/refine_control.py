"""Refine-Control: SD3 inpainting ControlNets of any depth, in pure torch.

Three groups of explicit conventions live here; the node, the trainer and the
evaluation all use them, so a student is trained and run the same way.

* **Block wiring** (``BLOCK_MAPS``): which ControlNet layer's residual is added
  after each of the D base transformer blocks. A map is a list of length D
  whose entry i is a layer index or ``None``.

  - ``"diffusers_0.29"``: interval = ⌊D/N⌋, block i ← layer ⌊i/interval⌋.
    The rule of diffusers ≤ 0.31, which trained the public 23-layer inpainting
    ControlNet: one-to-one for N = 23 on D = 24, pairs for N = 12.
  - ``"comfyui"``: ComfyUI core's list (each layer repeated ⌊D/N⌋ times, the
    last one time fewer). For N = 23 on D = 24 it drops layer 22.
  - ``"diffusers_0.32"``: interval = D/N as a float (diffusers ≥ 0.32). For
    N = 23 it uses layer 0 twice and never layer 22.

  In every map the last base block gets nothing: in SD3 it is
  ``context_pre_only`` and diffusers never adds a residual there.

* **Inpainting conditioning** (``CONVENTIONS``): the 17-channel ControlNet
  input is the VAE latent of the masked image (16 channels) plus a keep
  channel (1 − mask; ComfyUI's MASK is 1 where to inpaint).

  - ``"diffusers"``: latent = (z − 0.0609)·1.5305, mask binarised at 0.5,
    masked pixels set to black (−1 in the VAE's [−1, 1] range). This is how
    the public teacher was trained and how this package's trainer trains.
  - ``"comfyui"``: latent = z·1.5305 (ComfyUI's SD3 ControlNet loader forces
    the shift to 0), soft mask kept soft in the keep channel, pixels multiplied
    by the rounded keep mask (core's ``ControlNetInpaintingAliMamaApply``).

* **Alignment plan** of the two wirings (``alignment_plan``), which the
  feature-alignment loss of training reads (the losses and the evaluation
  metrics are training's: training/refine_control/losses.py, metrics.py).

Reductions are accumulated in fp32; results keep nothing on the inputs.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
import torch.nn.functional as F

from . import masks

# --------------------------------------------------------------------------
# block wiring
# --------------------------------------------------------------------------


def _check_depths(n_layers: int, depth: int) -> None:
    if n_layers < 1 or depth < 2:
        raise ValueError(f"block map: expected n_layers >= 1 and depth >= 2, got n_layers={n_layers}, depth={depth}")


def map_diffusers_029(n_layers: int, depth: int) -> list[int | None]:
    """diffusers ≤ 0.31 (the rule the public 23-layer teacher was trained with)."""
    _check_depths(n_layers, depth)
    interval = max(depth // n_layers, 1)
    out: list[int | None] = []
    for i in range(depth):
        j = i // interval
        out.append(j if (i < depth - 1 and j < n_layers) else None)
    return out


def map_diffusers_032(n_layers: int, depth: int) -> list[int | None]:
    """diffusers ≥ 0.32: a float interval."""
    _check_depths(n_layers, depth)
    interval = depth / n_layers
    out: list[int | None] = []
    for i in range(depth):
        j = int(i / interval)
        out.append(j if (i < depth - 1 and j < n_layers) else None)
    return out


def map_comfyui(n_layers: int, depth: int) -> list[int | None]:
    """ComfyUI core (comfy/cldm/mmdit.py): layer j repeated ⌊depth/N⌋ times,
    the last layer once fewer; block i takes entry i of that list."""
    _check_depths(n_layers, depth)
    listed: list[int] = []
    for j in range(n_layers):
        count = depth // n_layers - (1 if j == n_layers - 1 else 0)
        listed.extend([j] * count)
    return [listed[i] if i < len(listed) else None for i in range(depth)]


BLOCK_MAPS = {
    "diffusers_0.29": map_diffusers_029,
    "comfyui": map_comfyui,
    "diffusers_0.32": map_diffusers_032,
}
BLOCK_MAP_DESCRIPTIONS = {
    "diffusers_0.29": "as trained (diffusers 0.29-0.31): one-to-one for a 23-layer ControlNet, pairs for 12",
    "comfyui": "ComfyUI core's wiring (drops layer 22 of a 23-layer ControlNet)",
    "diffusers_0.32": "diffusers >= 0.32 (float interval; layer 0 twice, layer 22 never for 23 layers)",
}


def block_map(name: str, n_layers: int, depth: int) -> list[int | None]:
    if name not in BLOCK_MAPS:
        raise ValueError(f"block map: expected one of {list(BLOCK_MAPS)}, got {name!r}")
    return BLOCK_MAPS[name](n_layers, depth)


def residuals_for_blocks(residuals: Sequence[torch.Tensor], mapping: Sequence[int | None]) -> list:
    """The per-base-block list (``None`` where a block gets nothing). Entries
    for one layer alias one tensor, as in core; nobody edits them in place."""
    return [residuals[j] if j is not None else None for j in mapping]


@dataclasses.dataclass(frozen=True)
class AlignmentTerm:
    student_layer: int          # j (0-based)
    count: int                  # how many base blocks student layer j feeds
    teacher_layers: tuple       # teacher layers feeding those same blocks (0-based)


def alignment_plan(student_map: Sequence[int | None], teacher_map: Sequence[int | None]) -> list[AlignmentTerm]:
    """What each student layer must match so both inject the same total.

    Student layer j is added to the blocks B_j = {i : student_map[i] = j}, so
    it injects |B_j|·f^S_j there; the teacher injects Σ_{i∈B_j} f^T_{teacher_map[i]}.
    For 12 layers vs a one-to-one 23-layer teacher on 24 blocks this is
    2·f^S_j vs f^T_{2j} + f^T_{2j+1} (0-based) for j < 11, and for the last
    student layer (block 22 only; block 23 gets nothing) f^S_11 vs f^T_22:
    the rule for an odd teacher depth. Layers that feed no block are left out.
    """
    if len(student_map) != len(teacher_map):
        raise ValueError(f"alignment_plan: maps for different depths ({len(student_map)} vs {len(teacher_map)})")
    blocks: dict[int, list[int]] = {}
    for i, j in enumerate(student_map):
        if j is not None:
            blocks.setdefault(j, []).append(i)
    plan = []
    for j in sorted(blocks):
        teacher = tuple(teacher_map[i] for i in blocks[j] if teacher_map[i] is not None)
        plan.append(AlignmentTerm(j, len(blocks[j]), teacher))
    return plan


# --------------------------------------------------------------------------
# inpainting conditioning
# --------------------------------------------------------------------------

SD3_SCALE = 1.5305
SD3_SHIFT = 0.0609


@dataclasses.dataclass(frozen=True)
class InpaintConvention:
    name: str
    shift: float          # subtracted from the raw VAE latent before scaling
    scale: float
    binarize: bool        # mask > 0.5 (diffusers) or kept soft in the keep channel (ComfyUI)
    description: str


CONVENTIONS = {
    "diffusers": InpaintConvention(
        "diffusers", SD3_SHIFT, SD3_SCALE, True,
        "(z - 0.0609) * 1.5305, binary mask: how the public inpainting teacher and this package's students are trained"),
    "comfyui": InpaintConvention(
        "comfyui", 0.0, SD3_SCALE, False,
        "z * 1.5305 (no shift), soft keep channel: ComfyUI core's ControlNetInpaintingAliMamaApply"),
}


def convention(name: str) -> InpaintConvention:
    if name not in CONVENTIONS:
        raise ValueError(f"inpainting convention: expected one of {list(CONVENTIONS)}, got {name!r}")
    return CONVENTIONS[name]


def normalise_mask(mask: torch.Tensor) -> torch.Tensor:
    """A ComfyUI MASK (H, W) or (B, H, W) as fp32 (B, H, W) in [0, 1]; NaN counts as 0."""
    if mask is None:
        raise ValueError("mask: expected a MASK shaped (B, H, W) or (H, W), got None; connect the inpaint mask.")
    return masks.normalise_mask(mask, "mask")


def keep_mask(mask: torch.Tensor, conv: InpaintConvention) -> torch.Tensor:
    """(B, H, W) fp32: 1 on pixels to keep, 0 on pixels to inpaint."""
    m = normalise_mask(mask)
    if conv.binarize:
        m = (m > 0.5).float()
    return 1.0 - m


def masked_image(image: torch.Tensor, mask: torch.Tensor, conv: InpaintConvention) -> torch.Tensor:
    """IMAGE (B, H, W, C) in [0, 1] with the pixels to inpaint set to 0 (black).

    The mask is resized to the image bilinearly and rounded, so a soft edge
    keeps a pixel when at least half of it is kept (core's rule); with
    ``binarize`` it is thresholded first (diffusers)."""
    keep = keep_mask(mask, conv).unsqueeze(1)
    if keep.shape[-2:] != image.shape[1:3]:
        keep = F.interpolate(keep, size=image.shape[1:3], mode="bilinear", align_corners=False)
    keep = keep.round().movedim(1, -1).to(image.dtype)
    if keep.shape[0] != image.shape[0]:
        keep = keep.expand(image.shape[0], -1, -1, -1) if keep.shape[0] == 1 else keep
    return image * keep


def keep_channel(mask: torch.Tensor, latent_hw: tuple[int, int], conv: InpaintConvention) -> torch.Tensor:
    """The 17th channel: (B, 1, h, w) keep mask at latent size (nearest-exact)."""
    keep = keep_mask(mask, conv).unsqueeze(1)
    return F.interpolate(keep, size=tuple(latent_hw), mode="nearest-exact")


def conditioning_latent(raw_latent: torch.Tensor, mask: torch.Tensor, conv: InpaintConvention) -> torch.Tensor:
    """(B, 17, h, w): the scaled (and per convention shifted) VAE latent of the
    masked image followed by the keep channel. ``raw_latent`` is what the VAE
    encoder returns (no shift, no scale)."""
    z = (raw_latent.float() - conv.shift) * conv.scale
    keep = keep_channel(mask, raw_latent.shape[-2:], conv).to(z.device)
    if keep.shape[0] != z.shape[0]:
        if keep.shape[0] != 1:
            raise ValueError(f"conditioning_latent: {keep.shape[0]} masks for {z.shape[0]} images")
        keep = keep.expand(z.shape[0], -1, -1, -1)
    return torch.cat([z, keep], dim=1).to(raw_latent.dtype)


def latent_mask(mask: torch.Tensor, latent_hw: tuple[int, int], conv: InpaintConvention) -> torch.Tensor:
    """(B, 1, h, w) fp32 inpaint mask M (1 = inpaint) at latent size, for the task loss."""
    return 1.0 - keep_channel(mask, latent_hw, conv)
