"""UNet sites of the engine: where core adds ControlNet residuals in a UNet.

``UNetInjection`` adds the call's residuals where core adds its ControlNets'
(``apply_control`` in ``comfy/ldm/modules/diffusionmodules/openaimodel.py``):

* ``input``: after each input block, in ``input_block_patch`` (T2I-Adapters);
* ``middle``: on the middle-block output, in ``middle_block_after_patch``
  where the runtime has it (ComfyUI 0.28), else at output block 0, where ``h``
  is still the middle output;
* ``output``: on the skip features, in ``output_block_patch``.

Its patches go *first* in each list (``unet_patches``), so FreeU, Deep Shrink
and others see the controlled feature exactly as they see core's. The UNet
feature f_e therefore already includes the core ControlNets' residuals of
that layer (core adds them before the patch lists run).

Like core's ``apply_control``, a residual whose channels fit but whose size
differs from the feature (Deep Shrink's downscaled steps) is skipped, with one
warning per model call; a channel mismatch means a ControlNet of another
family and raises. The latent entering the UNet is checked for non-finite
values in a ``DIFFUSION_MODEL`` wrapper, which also calls ``finish``.
"""

from __future__ import annotations

import logging

import torch

import comfy.patcher_extension

from ..unet_patches import HAS_MIDDLE_BLOCK_AFTER_PATCH, other_patches, prepend_patches
from .engine import INJECTION_KEY, WRAPPER_KEY, BalancedInjection
from .settings import BalanceSettings

log = logging.getLogger(__name__)

_PATCH_LISTS = ("input_block_patch", "input_block_patch_after_skip", "middle_block_after_patch", "output_block_patch")


class UNetInjection(BalancedInjection):
    """The engine at a UNet's input blocks, middle block and skip connections."""

    site = "UNet"

    @classmethod
    def for_call(cls, transformer_options: dict) -> "UNetInjection":
        """The call's injection; the first minimal-impact control of a call
        creates it with the settings in ``transformer_options`` and registers it."""
        inj = transformer_options.get(INJECTION_KEY)
        if inj is None:
            inj = cls(BalanceSettings.from_transformer_options(transformer_options), transformer_options)
            inj.register(transformer_options)
        return inj

    # -- registration --------------------------------------------------------
    def register(self, transformer_options: dict) -> None:
        """Put this injection's patches first in the call's patch lists and its
        wrapper on the call's diffusion model. The nested containers are
        replaced, never mutated: they may be shared with model_options."""
        transformer_options[INJECTION_KEY] = self
        ours = {"input_block_patch": self.input_block_patch, "output_block_patch": self.output_block_patch}
        if HAS_MIDDLE_BLOCK_AFTER_PATCH:
            ours["middle_block_after_patch"] = self.middle_block_after_patch
        transformer_options["patches"] = prepend_patches(transformer_options.get("patches"), ours)
        wrappers = dict(transformer_options.get("wrappers", {}))
        by_type = dict(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
        by_type[WRAPPER_KEY] = list(by_type.get(WRAPPER_KEY, [])) + [self.diffusion_model_wrapper]
        wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL] = by_type
        transformer_options["wrappers"] = wrappers

    # -- UNet patches ------------------------------------------------------------
    def input_block_patch(self, h, transformer_options):
        block = transformer_options.get("block", ("input", -1))
        return self._inject(h, "input", f"input {block[1]}")

    def middle_block_after_patch(self, args: dict) -> dict:
        """ComfyUI 0.28: right after the middle block and core's middle control."""
        out = dict(args)
        out["h"] = self._inject(args["h"], "middle", "middle")
        return out

    def output_block_patch(self, h, hsp, transformer_options):
        block = transformer_options.get("block", ("output", -1))
        if h is not None:
            self.check("feature", None, f"output {block[1]} main path", h)
        if block[1] == 0:
            # Without middle_block_after_patch (or if it did not run), h is the
            # middle-block output here, after core's middle control.
            h = self._inject(h, "middle", "middle")
        hsp = self._inject(hsp, "output", f"output {block[1]} skip")
        return h, hsp

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor):
            self.check("latent", None, "UNet input", x, first=True)
        out = executor(*args, **kwargs)
        self.finish()
        return out

    # -- residuals per layer -------------------------------------------------------
    def _take(self, key: str) -> list:
        items = []
        for e in self.entries:
            r = e.pop(key)
            if r is not None:
                items.append((e, r))
        return items

    def _fitting(self, items, feature: torch.Tensor, layer: str):
        """The items whose residual fits ``feature``; size mismatches are skipped as core skips them."""
        fit = []
        for e, r in items:
            if r.ndim != feature.ndim or r.shape[1] != feature.shape[1]:
                raise ValueError(
                    f"{e.label}: its residual for UNet layer '{layer}' has shape {tuple(r.shape)} but the "
                    f"model's feature there has shape {tuple(feature.shape)}. The ControlNet was made for "
                    f"another base model; use one of the model's family.")
            if r.shape[2:] != feature.shape[2:]:
                self._skipped.append(f"{layer} ({e.label}: {tuple(r.shape[2:])} vs {tuple(feature.shape[2:])})")
                continue
            if r.shape[0] not in (1, feature.shape[0]):
                raise ValueError(
                    f"{e.label}: its residual for UNet layer '{layer}' has {r.shape[0]} rows but the model "
                    f"call has {feature.shape[0]}. The control's image batch must be 1 or match the latent batch.")
            fit.append((e, r))
        return fit

    def _inject(self, feature, key: str, layer: str):
        items = self._take(key)
        if not items:
            return feature
        if feature is None:
            # An earlier output_block_patch returned hsp=None (it merged the skip into h).
            self._skipped.append(f"{layer} (no skip feature: an earlier output_block_patch merged it into h)")
            return feature
        items = self._fitting(items, feature, layer)
        if not items:
            return feature
        return self.inject_items(feature, items, layer)

    # -- messages ------------------------------------------------------------------
    def warn_unused(self) -> None:
        super().warn_unused()
        leftover = [e.label for e in self.entries if any(r is not None for v in e.lists.values() for r in v)]
        if leftover:
            log.warning("MIControlNet: residuals left unused by the UNet for %s; the control has more "
                        "layers than the model", ", ".join(leftover))

    def other_patches_text(self) -> str:
        others = other_patches(self.transformer_options, _PATCH_LISTS,
                               ours=(self.input_block_patch, self.output_block_patch, self.middle_block_after_patch))
        return ("; other patches on this model: " + ", ".join(others)) if others else \
            "; no other UNet patch is on this model"
