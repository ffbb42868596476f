"""Where control injections sit among the other UNet patches of a model.

ComfyUI's UNet adds core ControlNet residuals (``apply_control``) *before* it
runs the patch lists: ``input_block_patch`` after the input control,
``output_block_patch`` after the output control has been added to the skip,
and (ComfyUI 0.28, ``comfy/ldm/modules/diffusionmodules/openaimodel.py``
``UNetModel._forward``) ``middle_block_after_patch`` after the middle control.
FreeU, Deep Shrink and friends are patches in those same lists. An injection
that is to land where core's control lands must therefore run *first* in each
list; appended, it would see (and skip) what FreeU or Deep Shrink did to the
feature.
"""

from __future__ import annotations

import comfy.model_patcher

# ComfyUI 0.28 runs transformer_options["patches"]["middle_block_after_patch"]
# right after the middle control; 0.3.75 has no such list (its setter is the sign).
HAS_MIDDLE_BLOCK_AFTER_PATCH = hasattr(comfy.model_patcher.ModelPatcher, "set_model_middle_block_after_patch")


def prepend_patches(patches: dict | None, new: dict) -> dict:
    """A new ``patches`` dict with ``new[name]`` placed first in each list.

    Neither ``patches`` nor its lists are mutated: they may be shared with the
    model's options (or another call's)."""
    out = dict(patches or {})
    for name, fn in new.items():
        out[name] = [fn] + [p for p in out.get(name, []) if p is not fn]
    return out


def prepend_model_patch(model_patcher, fn, name: str) -> None:
    """Like ``ModelPatcher.set_model_patch`` but puts ``fn`` first in the list."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    to["patches"] = prepend_patches(to.get("patches"), {name: fn})


def describe_patch(fn) -> str:
    """A readable name of a patch function: the node class that made it, when
    it is a closure (``FreeU_V2.patch.<locals>.output_block_patch`` ->
    ``FreeU_V2``), and its module."""
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    owner = qual.split(".<locals>")[0].split(".")[0]
    module = getattr(fn, "__module__", None) or "?"
    return f"{owner} ({module})"


def other_patches(transformer_options: dict, names: tuple[str, ...], ours: tuple = ()) -> list[str]:
    """Readable names of the patches in the lists ``names`` that are not ``ours``."""
    patches = transformer_options.get("patches", {}) or {}
    seen: list[str] = []
    for name in names:
        for p in patches.get(name, []):
            if any(p == o for o in ours):
                continue
            text = f"{describe_patch(p)} [{name}]"
            if text not in seen:
                seen.append(text)
    return seen
