"""Minimal-impact controls inside ComfyUI's sampler.

How a MIControlNet control reaches the UNet, through public extension points
only:

1. ``MinimalImpactControl`` is a ``ControlBase`` subclass placed in the
   conditioning's control chain like any core control. It wraps a copy of the
   core control that the loader produced (ControlNet, ControlLora,
   T2I-Adapter, ...) and runs it *alone* (no previous control) so that its
   residuals stay un-summed.
2. In ``get_control`` it applies its own strength and mask, then hands the
   residuals to the ``BalancedInjection`` of this model call, which lives in
   the call's ``transformer_options`` (a fresh dict the sampler builds for
   every model call). The first minimal-impact control of a call creates it
   and registers, on that dict only, an ``input_block_patch``, an
   ``output_block_patch`` and a ``DIFFUSION_MODEL`` wrapper.
3. It returns the previous controls' result unchanged, so core controls in
   the same chain keep their plain sums and are added by the UNet as usual.
4. In the UNet, the patches combine the residuals of all minimal-impact
   controls per layer with add^com and inject them into the skip features
   (``output`` residuals), the middle-block output (``middle``, at the first
   output block, where ``h`` is the middle output) and the input-block
   outputs (``input``, T2I-Adapters) with add^inj.
5. The wrapper runs after the UNet forward: it raises on non-finite
   residuals (one device sync per forward, not one per layer) and stores the
   balance record that ``MIControlNetBalanceMap`` draws.

Nothing is stored on the model or in ComfyUI's modules, so a graph without
these controls runs exactly as before, and nothing survives a model call.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

import comfy.controlnet
import comfy.patcher_extension
import comfy.utils

from .balance import GRANULARITIES, LAMBDA_CONVENTIONS, add_inj_with_lambda, combination_weights, weighted_sum

log = logging.getLogger(__name__)

MODES = ("micontrolnet", "controlnet_star", "vanilla")
MODE_DESCRIPTIONS = {
    "micontrolnet": "add^com to combine, add^inj to inject (MIControlNet)",
    "controlnet_star": "add^com to combine, plain add to inject (ControlNet*)",
    "vanilla": "plain sum to combine, plain add to inject (core behaviour)",
}

# Key in model_options["transformer_options"] set by the MIControlNetSettings node.
SETTINGS_KEY = "balanced_control_settings"
# Key in the per-call transformer_options holding the BalancedInjection.
INJECTION_KEY = "balanced_control_injection"
WRAPPER_KEY = "balanced_control"


@dataclasses.dataclass(frozen=True)
class BalanceSettings:
    mode: str = "micontrolnet"
    granularity: str = "layer"
    max_lambda: float = 20.0
    record_balance: bool = True
    lambda_convention: str = "as_written"  # balance.injection_coefficient

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not self.max_lambda >= 0:
            raise ValueError(f"max_lambda must be >= 0, got {self.max_lambda}")
        if self.lambda_convention not in LAMBDA_CONVENTIONS:
            raise ValueError(f"lambda_convention must be one of {LAMBDA_CONVENTIONS}, got {self.lambda_convention!r}")

    @classmethod
    def from_transformer_options(cls, transformer_options: dict) -> "BalanceSettings":
        raw = transformer_options.get(SETTINGS_KEY)
        if raw is None:
            return cls()
        return cls(**raw)


# --------------------------------------------------------------------------
# architecture fit
# --------------------------------------------------------------------------

# (text context width, class-embedding width) -> family. The block count is
# compared separately: it varies between a family's full and small variants.
_KNOWN_FAMILIES = {
    (768, None): "SD1.5",
    (1024, None): "SD2.x",
    (1024, 768): "SD2.x unCLIP",
    (2048, 2816): "SDXL",
    (1280, 2560): "SDXL refiner",
}


def describe_unet_family(module: torch.nn.Module) -> dict:
    """Summarise a ComfyUI UNet or cldm ControlNet: input blocks, text context
    width, class-embedding width, and the family name when it is a known one."""
    n_input = len(getattr(module, "input_blocks", []))
    context = None
    for name, sub in module.named_modules():
        if name.endswith("attn2.to_k") and hasattr(sub, "in_features"):
            context = int(sub.in_features)
            break
    adm = None
    label_emb = getattr(module, "label_emb", None)
    if label_emb is not None:
        for sub in label_emb.modules():
            if hasattr(sub, "in_features"):
                adm = int(sub.in_features)
                break
    family = _KNOWN_FAMILIES.get((context, adm))
    text = f"{n_input} input blocks, text context {context}, class embedding {adm or 'none'}"
    return {"input_blocks": n_input, "context_dim": context, "adm_in_channels": adm,
            "family": family, "text": (f"{family}-family ({text})" if family else text)}


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
# per-call injection
# --------------------------------------------------------------------------


class BalanceRecord:
    """What the last recorded model call did, per layer, for the balance map.

    ``layers`` is a list of dicts in UNet order:
    ``{"layer": "input 3" | "middle" | "output 5 skip", "controls": [labels],
    "weights": [fp32 (B,1,h,w) or (B,1,1,1)], "magnitudes": [fp32 (B,h,w)],
    "feature_magnitude": fp32 (B,h,w), "injected_magnitude": fp32 (B,h,w),
    "injection_lambda": fp32 (B,1,h,w) or (B,1,1,1)}``, all on the CPU, and
    ``cond_or_uncond`` labels each chunk of rows (0 = positive, 1 = negative).
    """

    def __init__(self, settings: BalanceSettings, cond_or_uncond: list[int], sigma: float | None):
        self.settings = settings
        self.cond_or_uncond = list(cond_or_uncond)
        self.sigma = sigma
        self.layers: list[dict] = []

    def rows_of(self, label: int, batch: int) -> list[int]:
        """Row indices of chunk ``label`` in a batch of ``batch`` rows."""
        chunks = max(len(self.cond_or_uncond), 1)
        per = batch // chunks
        rows = []
        for j, lab in enumerate(self.cond_or_uncond):
            if lab == label:
                rows.extend(range(j * per, (j + 1) * per))
        return rows


class _ControlEntry:
    __slots__ = ("label", "lists", "control")

    def __init__(self, label: str, control_dict: dict, control):
        self.label = label
        self.control = control
        # Copy the lists: the blocks pop from them like core's apply_control.
        self.lists = {k: list(v) for k, v in control_dict.items() if isinstance(v, (list, tuple))}

    def pop(self, key: str):
        lst = self.lists.get(key)
        if lst:
            return lst.pop()
        return None


class BalancedInjection:
    """Collects the minimal-impact residuals of one model call and injects them."""

    def __init__(self, settings: BalanceSettings, transformer_options: dict):
        self.settings = settings
        self.entries: list[_ControlEntry] = []
        self.cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        self._finite_checks: list[tuple[str, str, torch.Tensor]] = []
        self.record: BalanceRecord | None = None
        if settings.record_balance and _is_last_step(transformer_options):
            sigma = transformer_options.get("sigmas")
            sigma = float(sigma.flatten()[0]) if isinstance(sigma, torch.Tensor) and sigma.numel() else None
            self.record = BalanceRecord(settings, self.cond_or_uncond, sigma)

    # -- registration --------------------------------------------------------
    @classmethod
    def for_call(cls, transformer_options: dict) -> "BalancedInjection":
        inj = transformer_options.get(INJECTION_KEY)
        if inj is not None:
            return inj
        inj = cls(BalanceSettings.from_transformer_options(transformer_options), transformer_options)
        transformer_options[INJECTION_KEY] = inj
        # Replace (never mutate) the nested containers: they may be shared with
        # model_options, and this registration must end with the call.
        patches = dict(transformer_options.get("patches", {}))
        patches["input_block_patch"] = list(patches.get("input_block_patch", [])) + [inj.input_block_patch]
        patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [inj.output_block_patch]
        transformer_options["patches"] = patches
        wrappers = dict(transformer_options.get("wrappers", {}))
        by_type = dict(wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}))
        by_type[WRAPPER_KEY] = list(by_type.get(WRAPPER_KEY, [])) + [inj.diffusion_model_wrapper]
        wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL] = by_type
        transformer_options["wrappers"] = wrappers
        return inj

    def add(self, label: str, control_dict: dict, control) -> None:
        taken = {e.label for e in self.entries}
        unique, k = label, 2
        while unique in taken:  # two controls with one label would share a colour in the map
            unique, k = f"{label} ({k})", k + 1
        self.entries.append(_ControlEntry(unique, control_dict, control))

    # -- UNet patches ------------------------------------------------------------
    def input_block_patch(self, h, transformer_options):
        block = transformer_options.get("block", ("input", -1))
        return self._inject(h, "input", f"input {block[1]}")

    def output_block_patch(self, h, hsp, transformer_options):
        block = transformer_options.get("block", ("output", -1))
        if block[1] == 0:
            # At the first output block h is the middle-block output (after
            # core's own middle control): the place of the paper's middle injection.
            h = self._inject(h, "middle", "middle")
        hsp = self._inject(hsp, "output", f"output {block[1]} skip")
        return h, hsp

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.finish()
        return out

    # -- core ----------------------------------------------------------------------
    def _take(self, key: str) -> list[tuple[str, torch.Tensor]]:
        items = []
        for e in self.entries:
            r = e.pop(key)
            if r is not None:
                items.append((e.label, r))
        return items

    def _inject(self, feature: torch.Tensor, key: str, layer: str) -> torch.Tensor:
        items = self._take(key)
        if not items:
            return feature
        residuals = []
        for label, r in items:
            if r.shape[1:] != feature.shape[1:] or r.shape[0] not in (1, feature.shape[0]):
                raise ValueError(
                    f"{label}: its residual for UNet layer '{layer}' has shape {tuple(r.shape)} but the "
                    f"model's feature there has shape {tuple(feature.shape)}. The ControlNet was made for "
                    f"another base model; use one of the model's family."
                )
            r = r.to(device=feature.device, dtype=feature.dtype)
            if r.shape[0] != feature.shape[0]:
                r = r.expand_as(feature)
            # One fp32 reduction per residual (no elementwise temporaries); read once per forward in finish().
            self._finite_checks.append((label, layer, torch.isfinite(r.sum(dtype=torch.float32))))
            residuals.append(r)

        s = self.settings
        if s.mode == "vanilla":
            combined = residuals[0]
            for r in residuals[1:]:
                combined = combined + r
            weights = None
        else:
            # The weights are computed once, for the combination and the record alike.
            many = len(residuals) > 1
            weights = combination_weights(residuals, s.granularity) if many or self.record is not None else None
            combined = weighted_sum(residuals, weights) if many else residuals[0]
        if s.mode == "micontrolnet":
            out, lam = add_inj_with_lambda(feature, combined, s.max_lambda, s.granularity, s.lambda_convention)
        else:
            out, lam = feature + combined, None

        if self.record is not None:
            self._record_layer(layer, [lab for lab, _ in items], residuals, weights, feature, combined, lam)
        return out

    def _record_layer(self, layer, labels, residuals, weights, feature, combined, lam):
        n = len(residuals)
        ones = torch.ones(_batch_ones(feature), dtype=torch.float32, device=feature.device)
        if weights is None:
            weights = [ones] * n
        if lam is None:
            lam = ones
        mags = [(w * r.float()).norm(dim=1) for w, r in zip(weights, residuals)]
        self.record.layers.append({
            "layer": layer,
            "controls": labels,
            "weights": [w.detach().cpu() for w in weights],
            "magnitudes": [m.detach().cpu() for m in mags],
            "feature_magnitude": feature.float().norm(dim=1).detach().cpu(),
            "injected_magnitude": (lam * combined.float()).norm(dim=1).detach().cpu(),
            "injection_lambda": lam.detach().cpu(),
        })

    def finish(self) -> None:
        """After the UNet forward: fail loudly on non-finite residuals, publish the record."""
        if self._finite_checks:
            flags = torch.stack([f for _, _, f in self._finite_checks])
            if not bool(flags.all()):  # one device sync per forward
                bad = [(lab, layer) for (lab, layer, _), ok in zip(self._finite_checks, flags.tolist()) if not ok]
                label, layer = bad[0]
                more = f" (and {len(bad) - 1} more layer(s))" if len(bad) > 1 else ""
                raise FloatingPointError(
                    f"{label}: its residual for UNet layer '{layer}'{more} holds NaN or Inf, which would make "
                    f"the balancing weights NaN. Check the ControlNet file and its dtype (an fp16 ControlNet "
                    f"can overflow at high strength), or lower the strength."
                )
        self._finite_checks.clear()
        leftover = [e.label for e in self.entries if any(e.lists.values())]
        if leftover:
            log.warning("MIControlNet: residuals left unused by the UNet for %s; the control has more "
                        "layers than the model", ", ".join(leftover))
        if self.record is not None:
            for e in self.entries:
                prev = e.control.last_balance_record
                # cond and uncond may run in separate calls on the last step: keep the one with the positive rows.
                if prev is None or prev.sigma != self.record.sigma or 0 in self.record.cond_or_uncond:
                    e.control.last_balance_record = self.record


def _batch_ones(x: torch.Tensor) -> tuple[int, ...]:
    return (x.shape[0],) + (1,) * (x.ndim - 1)


def _is_last_step(transformer_options: dict) -> bool:
    """True on the final sampling step (the record the balance map shows).

    ``sample_sigmas`` is set by ComfyUI's sampler; without it every step counts."""
    sigmas = transformer_options.get("sample_sigmas")
    current = transformer_options.get("sigmas")
    if not isinstance(sigmas, torch.Tensor) or not isinstance(current, torch.Tensor) or sigmas.numel() < 2:
        return True
    sigmas = sigmas.flatten()
    positive = sigmas > 0
    last_index = (torch.arange(sigmas.numel(), device=sigmas.device) * positive).argmax()
    # One device read for all three numbers: this runs before every model call.
    any_positive, last, now = torch.stack([positive.any().to(torch.float64), sigmas[last_index].to(torch.float64),
                                           current.flatten()[0].to(sigmas.device, torch.float64)]).tolist()
    if not any_positive:
        return True
    return abs(now - last) <= 1e-4 * max(abs(last), 1e-8)


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
        own = self.inner.get_control(x_noisy, t, cond, batched_number, transformer_options)
        return own, control_prev

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

    @classmethod
    def create(cls, control_net, hint, strength, percent_range, vae=None, mask=None, label="MIControlNet"):
        inner = control_net.copy()
        inner.set_previous_controlnet(None)
        inner.set_cond_hint(hint, strength, percent_range, vae=vae)
        return cls(inner, mask=mask, label=label)

    # -- ControlBase protocol --------------------------------------------------------
    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        own, control_prev = self.run_chain(x_noisy, t, cond, batched_number, transformer_options)
        if own is not None:
            if self.mask is not None:
                own = {k: [self._apply_mask(r, batched_number) if r is not None else None for r in v]
                       for k, v in own.items()}
            BalancedInjection.for_call(transformer_options).add(self.label, own, self)
        # Core controls of the chain keep their plain sum.
        return control_prev

    def _apply_mask(self, r: torch.Tensor, batched_number: int) -> torch.Tensor:
        key = (r.shape[0], r.shape[-2], r.shape[-1], r.device, r.dtype, batched_number)
        m = self._mask_cache.get(key)
        if m is None:
            mask = self.mask
            if mask.ndim == 2:
                mask = mask.unsqueeze(0)
            mask = mask.unsqueeze(1).to(device=r.device, dtype=torch.float32)
            # Same resize and centre crop as core uses for hints.
            mask = comfy.utils.common_upscale(mask, r.shape[-1], r.shape[-2], "bilinear", "center")
            if mask.shape[0] != r.shape[0]:
                mask = comfy.controlnet.broadcast_image_to(mask, r.shape[0], batched_number)
            m = mask.to(r.dtype)
            self._mask_cache[key] = m
        return r * m

    def pre_run(self, model, percent_to_timestep_function):
        self.last_balance_record = None
        super().pre_run(model, percent_to_timestep_function)
        check_control_fits_model(self.inner, model, self.label)

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


def find_balance_record(conditioning: list) -> BalanceRecord | None:
    """The most recent balance record of the minimal-impact controls on a conditioning."""
    for _, extra in conditioning:
        for c in iter_chain(extra.get("control")):
            rec = getattr(c, "last_balance_record", None)
            if isinstance(c, MinimalImpactControl) and rec is not None:
                return rec
    return None


def settings_dict(mode: str, granularity: str, max_lambda: float, record_balance: bool = True,
                  lambda_convention: str = "as_written") -> dict[str, Any]:
    """Validated settings in the form stored in model_options."""
    return dataclasses.asdict(BalanceSettings(mode, granularity, float(max_lambda), bool(record_balance),
                                              lambda_convention=lambda_convention))
