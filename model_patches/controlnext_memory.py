"""ControlNeXt's tensors in ComfyUI's model management.

A core ControlNet is a ModelPatcher that the sampler loads with the model
(``comfy/sampler_helpers.py`` ``_prepare_sampling``: ``get_additional_models``
from the conditioning) and that ``comfy.model_management`` counts, keeps in
``current_loaded_models`` and moves to its offload device when memory is
needed. A ControlNeXt control lives on the MODEL instead, so its tensors go
the way core offers for a model's companions: ModelPatchers in the model's
``additional_models`` (``ModelPatcher.set_additional_models``), which the same
``_prepare_sampling`` loads with the model
(``model.get_nested_additional_models()``).

* one ModelPatcher per (loaded file, variant) around the control module
  (14-22 MB in fp32), shared by every Apply node that uses that file;
* one ModelPatcher per applied control around its control image, the hint the
  module reads every model call (3·H·W fp32: ≈ 7 MB per 1024×576 SVD frame).

Both load to ComfyUI's torch device and offload to ``unet_offload_device()``,
as core's ControlNet does (``comfy/controlnet.py`` ``ControlNet.__init__``).
Where a call runs on a device the managed copy is not on, the call looks for
the device clone ComfyUI 0.28's multi-GPU sampling made of it, and otherwise (a
direct call outside the sampler) uses a per-device copy.

For ComfyUI 0.28's multi-GPU deep clones of additional models
(``ModelPatcher.deepclone_multigpu`` rebuilds from ``cached_patcher_init``),
each patcher carries the factory that builds it afresh.
"""

from __future__ import annotations

import torch

import comfy.model_management
import comfy.model_patcher

RESOURCES_KEY = "balanced_control_controlnext"


class HintHolder(torch.nn.Module):
    """The control image (B, 3, H, W) fp32 as a (frozen) parameter, so that ModelPatcher
    counts and moves it like a weight."""

    def __init__(self, hint: torch.Tensor):
        super().__init__()
        self.hint = torch.nn.Parameter(hint, requires_grad=False)


def _wrap(module: torch.nn.Module, factory, args) -> comfy.model_patcher.ModelPatcher:
    p = comfy.model_patcher.ModelPatcher(module, load_device=comfy.model_management.get_torch_device(),
                                         offload_device=comfy.model_management.unet_offload_device())
    p.cached_patcher_init = (factory, args)
    return p


def new_module_patcher(weights, variant, **_) -> comfy.model_patcher.ModelPatcher:
    """A ModelPatcher around a fresh control module for ``variant`` built from ``weights``, on the CPU.
    (0.28 may call a ``cached_patcher_init`` factory with keyword options; none apply here.)"""
    return _wrap(weights.build_module(variant), new_module_patcher, (weights, variant))


def module_patcher(weights, variant) -> comfy.model_patcher.ModelPatcher:
    """The shared ModelPatcher of ``weights``' module for ``variant`` (built once)."""
    cache = weights.__dict__.setdefault("_module_patchers", {})
    p = cache.get(variant.module_config.name)
    if p is None:
        p = cache[variant.module_config.name] = new_module_patcher(weights, variant)
    return p


def hint_patcher(hint: torch.Tensor, **_) -> comfy.model_patcher.ModelPatcher:
    return _wrap(HintHolder(hint), hint_patcher, (hint,))


def _same_init(a, b) -> bool:
    return (a is not None and b is not None and a[0] is b[0] and len(a[1]) == len(b[1])
            and all(x is y for x, y in zip(a[1], b[1])))


def managed_on(patcher, device, base_model=None):
    """``patcher``'s module where ComfyUI loaded it on ``device``; else, with multi-GPU
    sampling (0.28), the device clone of it among the additional models of the patcher
    sampling on that device (``base_model.current_patcher``; the clones are rebuilt from the
    same ``cached_patcher_init``); else None."""
    if is_on(patcher.model, device):
        return patcher.model
    current = getattr(base_model, "current_patcher", None)
    if current is not None:
        for p in current.get_additional_models_with_key(RESOURCES_KEY):
            if _same_init(getattr(p, "cached_patcher_init", None), patcher.cached_patcher_init) \
                    and is_on(p.model, device):
                return p.model
    return None


def register(model_patcher, patchers) -> None:
    """Add ``patchers`` to ``model_patcher``'s additional models (once per underlying
    module: the model's clones carry clones of earlier ones)."""
    existing = list(model_patcher.get_additional_models_with_key(RESOURCES_KEY))
    for p in patchers:
        if not any(q.model is p.model for q in existing):
            existing.append(p)
    model_patcher.set_additional_models(RESOURCES_KEY, existing)


def same_device(a: torch.device, b: torch.device) -> bool:
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.type == "cpu":
        return True
    return (a.index or 0) == (b.index or 0)


def is_on(t: torch.Tensor | torch.nn.Module, device) -> bool:
    """Whether ``t`` (every parameter of a module: a partial low-VRAM load may leave some of a
    plain torch module's layers on the offload device) is on ``device``."""
    if isinstance(t, torch.nn.Module):
        return all(same_device(p.device, device) for p in t.parameters())
    return same_device(t.device, device)
