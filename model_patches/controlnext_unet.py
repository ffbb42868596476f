"""The UNet weights released with a ControlNeXt module, as ModelPatcher weight patches.

A UNet subset file holds either weight differences (ΔW = W_trained − W_base,
official SDXL releases with ``--load_weight_increasement``) or absolute
weights (official SD1.5 releases, SDXL-Training without
``--save_weights_increaments``, which still names its file
``unet_weight_increasements.safetensors``: ControlNeXt-SDXL-Training/
train_controlnext.py L196-205, L382-386). The file name never tells which;
``unet_weights`` says it, or ``auto`` decides:

1. this project's exports carry the mode in their metadata;
2. otherwise each tensor is compared with the weight it lands on:
   an absolute file is close to the base (‖W_file − W_base‖ ≪ ‖W_file‖),
   a difference is far from it (‖W_file − W_base‖ ≈ ‖W_base‖ ≫ ‖W_file‖).
   Tensors that disagree, or that are neither, fail and ask the user to choose.

Absolute weights become a difference against the weights they are applied to
(W_file − W_base, a "diff" patch), never a "set" patch: ComfyUI implements
"set" by copying the weight, which would discard a LoRA applied before. So a
LoRA before or after gives W_file + ΔW_LoRA, what the official scripts get by
loading the subset first and the LoRA on top.
"""

from __future__ import annotations

import logging
import re

import torch

import comfy.utils

from .controlnext_files import ControlNeXtWeights, Variant, base_weight, model_family, unet_mode_from_metadata
from .controlnext_svd_unet import convert_svd_unet, full_unet_patches

log = logging.getLogger(__name__)

_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")
# ‖W_file − W_base‖ / ‖W_file‖ below this: absolute; above its inverse: difference.
ABSOLUTE_RATIO = 0.5


def describe_unet_file(sd: dict) -> str:
    keys = list(sd)
    if any(re.search(r"transformer_blocks\.[1-9]\d*\.", k) for k in keys) and \
            not any("down_blocks.0.attentions" in k for k in keys):
        family = "SDXL (attention output projections of 2- and 10-block transformers)"
    elif any("down_blocks.0.attentions" in k for k in keys):
        family = "SD1.5 (attention output projections)"
    else:
        family = "unknown family"
    return f"{family}, {len(keys)} tensors, e.g. {keys[0]} {list(sd[keys[0]].shape)}"


def place_unet_tensors(unet_sd: dict, variant: Variant, model, name: str = "unet_file") -> dict:
    """{ComfyUI model key: tensor}. Diffusers names go through
    ``comfy.utils.unet_to_diffusers``; ComfyUI (SGM) names are taken as they
    are. Raises when a tensor has no place in the model or a shape differs
    (ComfyUI would ignore or only log those)."""
    unet_config = model.model.model_config.unet_config
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)
    model_sd = model.model.state_dict()
    family = model_family(model)
    placed, unplaced, wrong = {}, [], []
    for k, v in unet_sd.items():
        short = k
        for p in _UNET_PREFIXES:
            if short.startswith(p):
                short = short[len(p):]
                break
        if short in to_comfy:
            target = "diffusion_model." + to_comfy[short]
        elif "diffusion_model." + short in model_sd:
            target = "diffusion_model." + short
        else:
            unplaced.append(k)
            continue
        if tuple(model_sd[target].shape) != tuple(v.shape):
            wrong.append(f"{k} {list(v.shape)} vs model {list(model_sd[target].shape)}")
            continue
        placed[target] = v
    if unplaced or wrong:
        problems = []
        if unplaced:
            problems.append(f"{len(unplaced)} tensors have no place in it (e.g. {unplaced[:3]})")
        if wrong:
            problems.append(f"{len(wrong)} tensors have other shapes (e.g. {wrong[:2]})")
        raise ValueError(
            f"ControlNeXt: {name} does not fit this {family} model: {'; '.join(problems)}. The file is "
            f"{describe_unet_file(unet_sd)}; the {variant.title} variant needs the UNet subset released with it, "
            f"for the {variant.family} model it is applied to.")
    return placed


def decide_unet_mode(placed: dict, model_patcher, name: str, metadata: dict | None = None) -> tuple[str, str]:
    """('difference' | 'absolute', why) for ``auto``; raises when the tensors disagree."""
    from_meta = unet_mode_from_metadata(metadata or {})
    if from_meta:
        return from_meta, f"its metadata says so (format {metadata['format']!r})"
    model_sd = model_patcher.model.state_dict()
    absolute, difference, unclear, silent = [], [], [], []
    for key, v in placed.items():
        w = base_weight(model_patcher, key, model_sd).to(v.device, torch.float32)
        f = v.to(torch.float32)
        ratio = float((f - w).norm() / f.norm().clamp_min(1e-30))
        if float(w.norm()) <= 1e-12 * max(1.0, float(f.norm())):
            silent.append((key, ratio))  # a zero weight in the model: both readings predict the same file
        elif ratio < ABSOLUTE_RATIO:
            absolute.append((key, ratio))
        elif ratio > 1 / ABSOLUTE_RATIO:
            difference.append((key, ratio))
        elif float(w.norm()) <= float(f.norm()):
            # The model's weight is small against the file's (e.g. a zero bias): W_file − W_model ≈ W_file
            # either way, so this tensor cannot tell.
            silent.append((key, ratio))
        else:
            unclear.append((key, ratio))
    skipped = f"; {len(silent)} tensors on near-zero model weights cannot tell" if silent else ""
    if absolute and not difference and not unclear:
        worst = max(r for _, r in absolute)
        return "absolute", (f"all {len(absolute)} telling tensors are close to the model's weight "
                            f"(‖W_file − W_model‖ / ‖W_file‖ ≤ {worst:.3g} < {ABSOLUTE_RATIO}){skipped}")
    if difference and not absolute and not unclear:
        least = min(r for _, r in difference)
        return "difference", (f"all {len(difference)} telling tensors are far from the model's weight "
                              f"(‖W_file − W_model‖ / ‖W_file‖ ≥ {least:.3g} > {1 / ABSOLUTE_RATIO:g}){skipped}")

    def some(items):
        return ", ".join(f"{k.removeprefix('diffusion_model.')} ({r:.3g})" for k, r in items[:3])

    if not absolute and not difference and not unclear:
        raise ValueError(
            f"ControlNeXt: cannot tell whether {name} holds absolute UNet weights or weight differences: the "
            f"model's weights at all {len(silent)} of its tensors are near zero against the file's, so both "
            f"readings give almost the same comparison. Set unet_weights on Load ControlNeXt to 'difference' or "
            f"'absolute' (the file's download page or training script says which).")
    parts = [f"{len(absolute)} look absolute" + (f" (e.g. {some(absolute)})" if absolute else ""),
             f"{len(difference)} look like differences" + (f" (e.g. {some(difference)})" if difference else "")]
    if unclear:
        parts.append(f"{len(unclear)} are neither (e.g. {some(unclear)})")
    raise ValueError(
        f"ControlNeXt: cannot tell whether {name} holds absolute UNet weights or weight differences: comparing "
        f"each tensor with the model's weight (‖W_file − W_model‖ / ‖W_file‖; absolute < {ABSOLUTE_RATIO}, "
        f"difference > {1 / ABSOLUTE_RATIO:g}), {'; '.join(parts)}. Set unet_weights on Load ControlNeXt to "
        f"'difference' or 'absolute' (the file's download page or training script says which), or check that "
        f"the file belongs to this base model.")


def unet_weight_patches(weights_or_sd, variant: Variant, model, name: str = "unet_file",
                        mode: str = "auto", metadata: dict | None = None) -> tuple[dict, str]:
    """One-tensor "diff" patches for the UNet subset; returns (patches, mode used).

    ``weights_or_sd`` is a ``ControlNeXtWeights`` (its file, ``unet_weights``
    and metadata are used) or a plain state dict with ``mode``/``metadata``."""
    if isinstance(weights_or_sd, ControlNeXtWeights):
        w = weights_or_sd
        unet_sd, name, mode, metadata = w.unet_sd, w.unet_name or name, w.unet_weights, w.unet_metadata
    else:
        unet_sd = weights_or_sd
    if variant.unet_file == "full":
        # The official SVD UNets are whole fine-tuned models (reference §5.3): absolute weights.
        placed = convert_svd_unet(unet_sd, model, name)
        if mode == "difference":
            return {k: (v,) for k, v in placed.items()}, mode
        log.info("ControlNeXt: %s is a full %s UNet (%d tensors); the model's UNet is replaced by it.", name,
                 variant.family, len(placed))
        return full_unet_patches(placed, model), "absolute"
    placed = place_unet_tensors(unet_sd, variant, model, name)
    if mode == "auto":
        mode, why = decide_unet_mode(placed, model, name, metadata)
        log.info("ControlNeXt: %s applied as %s weights: %s.", name,
                 "absolute" if mode == "absolute" else "difference (ΔW)", why)
    elif mode not in ("difference", "absolute"):
        raise ValueError(f"unet_weights must be auto, difference or absolute, got {mode!r}")
    if mode == "difference":
        return {k: (v,) for k, v in placed.items()}, mode
    model_sd = model.model.state_dict()
    patches = {}
    for k, v in placed.items():
        base = base_weight(model, k, model_sd)
        diff = v.to(base.device, torch.float32) - base.to(torch.float32)
        # Kept in fp32: W_base + (W_file − W_base) then rounds to W_file in the model's dtype.
        patches[k] = (diff,)
    return patches, mode


def add_unet_patches(model_patcher, patches: dict, name: str) -> list[str]:
    applied = model_patcher.add_patches(patches, 1.0, 1.0)
    missing = set(patches) - set(applied)
    if missing:  # add_patches ignores unknown keys silently
        raise ValueError(f"ControlNeXt: {len(missing)} UNet weights of {name} did not land on the model "
                         f"(e.g. {sorted(missing)[:3]}).")
    return applied
