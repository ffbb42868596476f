"""Minimal-impact controls inside ComfyUI's sampler.

How a MIControlNet control reaches the UNet, through public extension points
only:

1. ``MinimalImpactControl`` is a ``ControlBase`` subclass placed in the
   conditioning's control chain like any core control. It wraps a copy of the
   core control that the loader produced (ControlNet, ControlLora,
   T2I-Adapter, ...) and runs it *alone* (no previous control) so that its
   residuals stay un-summed.
2. In ``get_control`` it applies its own strength and mask, then hands the
   residuals to the engine's ``UNetInjection`` of this model call
   (``injection``), which lives in the call's ``transformer_options`` (a
   fresh dict the sampler builds for every model call). The first
   minimal-impact control of a call creates it and registers, on that dict
   only and *first* in each list, an ``input_block_patch``, an
   ``output_block_patch``, a ``middle_block_after_patch`` (where the runtime
   has one) and a ``DIFFUSION_MODEL`` wrapper.
3. It returns the previous controls' result unchanged, so core controls in
   the same chain keep their plain sums and are added by the UNet as usual.
   The UNet feature f_e that add^inj balances against therefore already
   includes the core ControlNets' residuals of that layer.
4. In the UNet, the patches combine the residuals of all minimal-impact
   controls per layer with add^com and inject them into the skip features
   (``output`` residuals), the middle-block output (``middle``) and the
   input-block outputs (``input``, T2I-Adapters) with add^inj, where core
   adds its own controls: before FreeU, Deep Shrink and other patches.
5. The wrapper runs after the UNet forward: it raises on non-finite values
   (one device read per forward), warns once about residuals skipped for a
   size mismatch, and stores the balance record that
   ``MIControlNetBalanceMap`` draws.

DiT ControlNets (SD3/SD3.5, Flux, Qwen-Image; ``injection.dit_sites``) take
another route in step 2: in ``vanilla`` mode the control returns core's own
positional merge of its slots with the previous controls' (so the image is
core's, bit for bit); otherwise its slots go to the call's ``DiTInjection``,
which registers ``patches_replace["dit"]`` entries on the call's options and
balances the image tokens after each block. There the feature f_e excludes
the core ControlNets' residuals of that block: core adds them after the
replace patch returns. HunyuanDiT ControlNets are refused (core folds their
residual into the skip input).

Nothing is stored on the model or in ComfyUI's modules, so a graph without
these controls runs exactly as before, and nothing survives a model call.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

import comfy.controlnet
import comfy.utils

from .balance import reduction_memory_bytes
from . import multigpu
from .families import ARCHITECTURE_TITLES, architecture_of_base, describe_unet
from .masks import mask_for_rows
from .injection.engine import INACTIVE_KEY, BalanceRecord  # noqa: F401
from .injection.settings import (  # noqa: F401  (re-exported for the nodes and tests)
    MODE_DESCRIPTIONS,
    MODES,
    SETTINGS_KEY,
    STRENGTH_SCALING_DESCRIPTIONS,
    STRENGTH_SCALINGS,
    BalanceSettings,
    settings_dict,
)
from .injection.dit_sites import (
    check_dit_control_fits, control_family, core_merge, describe_module, dit_injection_for_call, token_grid)
from .injection.unet_sites import INJECTION_KEY, WRAPPER_KEY, UNetInjection  # noqa: F401

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------
# architecture fit
# --------------------------------------------------------------------------

def describe_unet_family(module: torch.nn.Module) -> dict:
    """Summarise a ComfyUI UNet or cldm ControlNet (families.describe_unet: the one family table)."""
    return describe_unet(module)


def check_control_fits_model(control: comfy.controlnet.ControlBase, model, label: str) -> None:
    """Raise a readable error when a UNet ControlNet was made for another base model.

    Only cldm ControlNets are checked: ControlLoras are built from the model
    itself, and T2I-Adapters have no comparable structure.
    """
    control_model = getattr(control, "control_model", None)
    unet = getattr(model, "diffusion_model", None)
    if control_model is None or unet is None or not hasattr(control_model, "zero_convs"):
        return
    c = describe_unet_family(control_model)
    m = describe_unet_family(unet)
    mismatch = (
        c["input_blocks"] != m["input_blocks"]
        or (c["context_dim"] is not None and m["context_dim"] is not None and c["context_dim"] != m["context_dim"])
        or (c["adm_in_channels"] != m["adm_in_channels"])
    )
    if mismatch:
        raise ValueError(
            f"{label}: this ControlNet does not fit the model. The ControlNet is {c['text']}; "
            f"the model is {m['text']}. Load a ControlNet trained for the model's family "
            f"(or a checkpoint of the ControlNet's family)."
        )


# --------------------------------------------------------------------------
# the control object
# --------------------------------------------------------------------------


class WrappedControl(comfy.controlnet.ControlBase):
    """A control that delegates the work to ``self.inner``, a core control run
    without a previous control. Adds the inner control's models, hooks, memory
    and cleanup to the chain's, so ComfyUI's sampler loads and frees it like
    any core control."""

    def __init__(self, inner: comfy.controlnet.ControlBase, label: str):
        super().__init__()
        self.inner = inner
        self.label = label
        self.strength = inner.strength
        self.timestep_percent_range = inner.timestep_percent_range

    def run_chain(self, x_noisy, t, cond, batched_number, transformer_options):
        """(this control's own output, the previous controls' combined output)."""
        control_prev = None
        if self.previous_controlnet is not None:
            control_prev = self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options)
        own = self.inner.get_control(x_noisy, t, self.inner_cond(cond, transformer_options), batched_number,
                                     transformer_options)
        return own, control_prev

    def inner_cond(self, cond: dict, transformer_options: dict) -> dict:
        """The conditioning the inner control sees; the previous controls get ``cond`` as it is."""
        return cond

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        self.inner.pre_run(model, percent_to_timestep_function)

    def cleanup(self):
        self.inner.cleanup()
        super().cleanup()

    def get_models(self):
        return super().get_models() + self.inner.get_models()

    def get_extra_hooks(self):
        return self.inner.get_extra_hooks() + super().get_extra_hooks()

    def inference_memory_requirements(self, dtype):
        return super().inference_memory_requirements(dtype) + self.inner.inference_memory_requirements(dtype)

    # -- multi-GPU (model_patches/multigpu.py) --------------------------------------------
    def deepclone_multigpu(self, load_device, autoregister=False):
        """This control for ``load_device`` (ComfyUI 0.28's contract, ``comfy/controlnet.py``
        ``ControlNet.deepclone_multigpu`` L322-328): a ``copy()`` (hint, mask, strength, range, label;
        no previous control, the sampler links the device's chain) whose inner control is cloned
        for the device, its weights a deep copy wrapped for ``load_device``."""
        c = self.copy()
        c.inner = multigpu.clone_core_control(self.inner, load_device, self.label)
        if autoregister:
            multigpu.device_clones(self)[load_device] = c
        return c

    if not hasattr(comfy.controlnet.ControlBase, "get_instance_for_device"):
        def get_instance_for_device(self, device):
            """As ComfyUI 0.28's ``ControlBase.get_instance_for_device`` (runtimes without it)."""
            return multigpu.instance_for_device(self, device)


class MinimalImpactControl(WrappedControl):
    """A control whose residuals are balanced with the other minimal-impact
    controls of the chain (add^com) and injected with add^inj.

    ``inner`` is the core control doing the actual work; it has no previous
    control, so its output is this control's own residuals, scaled by its own
    strength. ``mask`` (B, H, W) in [0, 1], optional, limits the residuals to
    a region; it is resized to each residual like core resizes hints.
    """

    def __init__(self, inner: comfy.controlnet.ControlBase, mask: torch.Tensor | None = None, label: str = "MIControlNet"):
        super().__init__(inner, label)
        self.mask = mask
        self.last_balance_record: BalanceRecord | None = None
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._model_text: str | None = None
        self.run_stats = _RunStats()

    @property
    def dit_family(self) -> str | None:
        """"sd3", "flux", "qwen" or "hunyuan" for a DiT ControlNet, None for a UNet control."""
        return control_family(getattr(self.inner, "control_model", None))

    @classmethod
    def create(cls, control_net, hint, strength, percent_range, vae=None, mask=None, label="MIControlNet"):
        if control_family(getattr(control_net, "control_model", None)) == "hunyuan":
            check_dit_control_fits("hunyuan", None, control_net.control_model, label)  # raises: cannot be balanced
        inner = control_net.copy()
        inner.set_previous_controlnet(None)
        inner.set_cond_hint(hint, strength, percent_range, vae=vae)
        return cls(inner, mask=mask, label=label)

    # -- ControlBase protocol --------------------------------------------------------
    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        own, control_prev = self.run_chain(x_noisy, t, cond, batched_number, transformer_options)
        stats = self.run_stats
        stats.calls += 1
        run_settings = BalanceSettings.from_transformer_options(transformer_options)
        stats.record_balance = run_settings.record_balance
        stats.dit_vanilla = run_settings.mode == "vanilla" and self.dit_family is not None
        if own is not None:
            stats.active_calls += 1
            if 0 in transformer_options.get("cond_or_uncond", [0]):
                stats.positive_active_calls += 1
            family = self.dit_family
            if family is not None:
                return self._dit_control(own, control_prev, family, tuple(x_noisy.shape), batched_number,
                                         transformer_options)
            if self.mask is not None:
                own = {k: [self._apply_mask(r, batched_number) if r is not None else None for r in v]
                       for k, v in own.items()}
            UNetInjection.for_call(transformer_options).add(self.label, own, self)
        else:
            # Outside its start/end range on this call: named as inactive in the balance map.
            transformer_options[INACTIVE_KEY] = list(transformer_options.get(INACTIVE_KEY, [])) + [(self.label, self)]
        # Core controls of the chain keep their plain sum.
        return control_prev

    def _dit_control(self, own, control_prev, family, latent_shape, batched_number, transformer_options):
        """A DiT ControlNet's slots: core's merge in ``vanilla`` mode (bit for
        bit core's chain), else handed to the call's DiT injection (the
        previous core controls' sum goes back to core, which adds it after
        our block patch)."""
        if self.mask is not None:
            masked = {}  # slots share tensors: mask each once

            def once(r):
                if id(r) not in masked:
                    masked[id(r)] = self._apply_token_mask(r, latent_shape, batched_number)
                return masked[id(r)]
            own = {k: [None if r is None else once(r) for r in v] for k, v in own.items()}
        settings = BalanceSettings.from_transformer_options(transformer_options)
        if settings.mode == "vanilla":
            return core_merge(own, control_prev)
        dit_injection_for_call(transformer_options, family, latent_shape, settings, self._model_text).add(
            self.label, own, self)
        return control_prev

    def _apply_token_mask(self, r: torch.Tensor, latent_shape, batched_number: int) -> torch.Tensor:
        """``r`` (B, N, D) image tokens times the mask resized to the latent's patch grid."""
        grid = token_grid(latent_shape, r.shape[1])
        key = ("tokens", r.shape[0], grid, r.device, r.dtype, batched_number)
        m = self._mask_cache.get(key)
        if m is None:
            mask = self.mask if self.mask.ndim == 3 else self.mask.unsqueeze(0)
            mask = mask.unsqueeze(1).to(device=r.device, dtype=torch.float32)
            mask = comfy.utils.common_upscale(mask, grid[1], grid[0], "bilinear", "center")
            if mask.shape[0] != r.shape[0]:
                mask = comfy.controlnet.broadcast_image_to(mask, r.shape[0], batched_number)
            m = mask.flatten(2).transpose(1, 2).to(r.dtype)  # (B, N, 1)
            self._mask_cache[key] = m
        return r * m

    def _apply_mask(self, r: torch.Tensor, batched_number: int) -> torch.Tensor:
        key = (r.shape[0], r.shape[-2], r.shape[-1], r.device, r.dtype, batched_number)
        m = self._mask_cache.get(key)
        if m is None:
            m = self._mask_cache[key] = mask_for_rows(self.mask, r, batched_number)  # as core resizes hints
        return r * m

    def pre_run(self, model, percent_to_timestep_function):
        self.last_balance_record = None
        self.run_stats = _RunStats()
        super().pre_run(model, percent_to_timestep_function)
        family = self.dit_family
        if family is not None:
            unet = getattr(model, "diffusion_model", None)
            check_dit_control_fits(family, unet, self.inner.control_model, self.label)
            self._model_text = describe_module(unet)
        else:
            unet = getattr(model, "diffusion_model", None)
            arch = architecture_of_base(unet)
            if arch not in (None, "unet"):
                # Not a DiT ControlNet we can place (e.g. 0.28's Qwen-Image "Fun" ControlNet, a T2I-Adapter)
                # on a model without the UNet's injection points: refuse rather than leave it unused.
                raise ValueError(
                    f"{self.label}: this control ({type(getattr(self.inner, 'control_model', self.inner)).__name__}"
                    f") cannot be balanced on this model ({ARCHITECTURE_TITLES.get(arch, type(unet).__name__)}): "
                    f"MIControlNetApply balances UNet controls on SD1.5/SDXL-family models and the DiT ControlNets "
                    f"of SD3/SD3.5, Flux and Qwen-Image (docs/dit.md). Use core's Apply ControlNet for it.")
            check_control_fits_model(self.inner, model, self.label)

    def inference_memory_requirements(self, dtype):
        # The chunked fp32 reductions of add^com / add^inj and the balance record (balance.py).
        return super().inference_memory_requirements(dtype) + reduction_memory_bytes()

    def cleanup(self):
        self._mask_cache.clear()
        super().cleanup()

    def copy(self):
        c = MinimalImpactControl(self.inner.copy(), mask=self.mask, label=self.label)
        self.copy_to(c)
        return c


def iter_chain(control) -> list:
    """The controls of a chain, newest first."""
    out = []
    seen = set()
    while control is not None and id(control) not in seen:
        seen.add(id(control))
        out.append(control)
        control = getattr(control, "previous_controlnet", None)
    return out


@dataclasses.dataclass
class _RunStats:
    """What a control saw in the current sampling run (for the balance map's error)."""
    calls: int = 0
    active_calls: int = 0
    positive_active_calls: int = 0
    record_balance: bool | None = None
    dit_vanilla: bool = False


def _minimal_impact_controls(conditioning: list) -> list["MinimalImpactControl"]:
    out = []
    for _, extra in conditioning:
        for c in iter_chain(extra.get("control")):
            # With multi-GPU sampling, the clones for the other devices record their own rows.
            for d in [c] + list(getattr(c, "multigpu_clones", {}).values()):
                if isinstance(d, MinimalImpactControl) and d not in out:
                    out.append(d)
    return out


def find_balance_record(conditioning: list) -> BalanceRecord | None:
    """The most recent balance record (the last model call a minimal-impact
    control took part in) of the controls on a conditioning, on the CPU."""
    records = [c.last_balance_record for c in _minimal_impact_controls(conditioning)
               if c.last_balance_record is not None]
    if not records:
        return None
    return max(records, key=lambda r: r.seq).to_cpu()


def explain_missing_record(conditioning: list) -> str:
    """Why ``find_balance_record`` found nothing, in words a user can act on."""
    controls = _minimal_impact_controls(conditioning)
    if not controls:
        return ("this conditioning carries no minimal-impact control: connect the positive conditioning that "
                "went through MIControlNetApply (the one given to the sampler).")
    if all(c.run_stats.calls == 0 for c in controls):
        return ("its minimal-impact controls were never called by a sampler: give this conditioning to the "
                "sampler, and the sampler's LATENT output to 'samples' so that this node runs after it.")
    if any(c.run_stats.dit_vanilla for c in controls):
        return ("mode is vanilla on a DiT model: the controls take core's own path there, which records no "
                "balance. Pick micontrolnet or controlnet_star in MIControlNetSettings to see the map.")
    if any(c.run_stats.record_balance is False for c in controls):
        return "record_balance is off in MIControlNetSettings on the sampled model; turn it on."
    if all(c.run_stats.active_calls == 0 for c in controls):
        ranges = ", ".join(f"{c.label} {c.timestep_percent_range[0]:g}-{c.timestep_percent_range[1]:g}"
                           for c in controls)
        return (f"no minimal-impact control was active on any model call of the run: no sampling step fell "
                f"inside their start/end percent ranges ({ranges}). Widen a range, or check the sampler's "
                f"start/end steps.")
    if all(c.run_stats.positive_active_calls == 0 for c in controls):
        return ("the controls were active only in model calls without positive rows (negative conditioning "
                "only); the map shows the positive rows. Attach the controls to the positive conditioning.")
    return "the controls ran, but no model call finished (was the run interrupted?)."
