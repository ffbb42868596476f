"""ControlNeXt inside ComfyUI: applying a loaded control to a MODEL.

How a ControlNeXt control reaches the UNet, through public extension points:

1. ``ControlNeXtApply`` clones the MODEL. The released UNet weights become
   ModelPatcher "diff" weight patches on the clone (``controlnext_unet``:
   subsets as ΔW, absolute subsets as W_file − W_base, full SVD UNets
   converted from diffusers keys), so ComfyUI applies and removes them like
   LoRA patches, offloading included, and LoRAs keep their effect.
2. The clone's ``model_options["transformer_options"]`` gets a
   ``ControlNeXtStack`` (every ControlNeXt control applied to this model, in
   order), an ``input_block_patch_after_skip``, an ``output_block_patch`` and
   an ``APPLY_MODEL`` wrapper (``controlnext_inject``). All three are
   module-level functions that do nothing when a call carries no stack.
3. The control module and the control image are ModelPatchers in the clone's
   additional models (``controlnext_memory``), so ComfyUI loads, counts and
   offloads them with the model, like a ControlNet.

Nothing is written into ComfyUI's modules and nothing outlives a model call,
so a graph without these nodes runs exactly as before.

The pieces live by idea: ``controlnext_arch`` (the modules and Cross
Normalization), ``controlnext_files`` (variants, files, model fit),
``controlnext_unet`` (UNet weight patches), ``controlnext_svd_unet`` (the
diffusers spatio-temporal UNet converter), ``controlnext_inject`` (the
per-call injection) and ``controlnext_memory`` (model management). The names
other modules use are re-exported here.
"""

from __future__ import annotations

import torch

import comfy.patcher_extension

from .controlnext_arch import ControlNeXtModule, cross_normalize  # noqa: F401 (re-exported)
from .controlnext_files import (  # noqa: F401 (re-exported)
    FOLDER_NAME,
    LAYOUT_DESCRIPTIONS,
    SAFE_PICKLE_SUFFIXES,
    UNET_WEIGHT_MODES,
    VARIANTS,
    ControlNeXtWeights,
    Variant,
    detect_layout,
    expected_shapes,
    injection_channels,
    load_state_dict_file,
    model_family,
    resolve_variant,
)
from .controlnext_inject import (  # noqa: F401 (re-exported)
    CALL_KEY,
    COMBINE_MODES,
    STACK_KEY,
    UNCOND_MODES,
    WRAPPER_KEY,
    ControlNeXtCall,
    ControlNeXtControl,
    ControlNeXtStack,
    apply_model_wrapper,
    call_transformer_options,
    injection_block_ids,
    input_block_patch_after_skip,
    output_block_patch,
    training_call,
)
from .controlnext_unet import add_unet_patches, describe_unet_file, unet_weight_patches  # noqa: F401
from . import controlnext_memory
from .inputs import check_image, check_percent_range
from .masks import normalise_mask
from .unet_patches import prepend_model_patch


def apply_controlnext(model, weights: ControlNeXtWeights, image: torch.Tensor, strength: float = 1.0,
                      start_percent: float = 0.0, end_percent: float = 1.0, mask: torch.Tensor | None = None,
                      combine: str = "add_com", uncond: str = "variant default", label: str = "ControlNeXt"):
    """A patched clone of ``model`` (ModelPatcher) with this ControlNeXt control."""
    if combine not in COMBINE_MODES:
        raise ValueError(f"{label}: combine must be one of {COMBINE_MODES}, got {combine!r}")
    if not isinstance(weights, ControlNeXtWeights):
        raise ValueError(f"{label}: controlnext must come from ControlNeXtLoader, got {type(weights).__name__}.")
    check_image(image, label)
    if image.shape[-1] == 1:
        image = image.expand(*image.shape[:-1], 3)
    mask = normalise_mask(mask, label)
    check_percent_range(start_percent, end_percent, label)
    variant = resolve_variant(weights, model)
    m = model.clone()
    if weights.unet_sd is not None:
        patches, _ = unet_weight_patches(weights, variant, model)
        add_unet_patches(m, patches, weights.unet_name or "unet_file")
    if strength == 0:
        return m
    control = ControlNeXtControl(weights, variant, image, strength, start_percent, end_percent, mask, uncond, label)
    controlnext_memory.register(m, control.patchers)
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(STACK_KEY)
    to[STACK_KEY] = ControlNeXtStack((prev.controls if prev else ()) + (control,), combine)
    # First in the lists, where core adds its controls: before FreeU, Deep Shrink and other patches.
    prepend_model_patch(m, input_block_patch_after_skip, "input_block_patch_after_skip")
    prepend_model_patch(m, output_block_patch, "output_block_patch")
    if not m.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return m
