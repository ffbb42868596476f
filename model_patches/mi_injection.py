"""The per-call injection of minimal-impact residuals into a ComfyUI UNet.

``BalancedInjection`` lives in one model call's ``transformer_options``. It
collects the residuals of the minimal-impact controls of that call and adds
them to the UNet where core adds its ControlNets' residuals
(``apply_control`` in ``comfy/ldm/modules/diffusionmodules/openaimodel.py``):

* ``input``: after each input block, in ``input_block_patch`` (T2I-Adapters);
* ``middle``: on the middle-block output, in ``middle_block_after_patch``
  where the runtime has it (ComfyUI 0.28), else at output block 0, where ``h``
  is still the middle output;
* ``output``: on the skip features, in ``output_block_patch``.

Its patches go *first* in each list (``unet_patches``), so FreeU, Deep Shrink
and others see the controlled feature exactly as they see core's.

Like core's ``apply_control``, a residual whose channels fit but whose size
differs from the feature (Deep Shrink's downscaled steps) is skipped, with one
warning per model call; a channel mismatch means a ControlNet of another
family and raises.

Non-finite values are checked where they arise with one device read per
model call: the latent entering the UNet, each feature before the injection,
each residual, each injected result. The first one that fails names its
cause: an earlier step or another patch, the control's residual, or the
injection itself (strength and ``max_lambda``).
"""

from __future__ import annotations

import itertools
import logging

import torch

import comfy.patcher_extension

from .balance import add_inj_with_lambda, channel_norm, combination_weights, weighted_sum
from .unet_patches import HAS_MIDDLE_BLOCK_AFTER_PATCH, other_patches, prepend_patches

log = logging.getLogger(__name__)

# Key in the per-call transformer_options holding the BalancedInjection.
INJECTION_KEY = "balanced_control_injection"
# (label, control) of the minimal-impact controls that ran in this call but were outside their range.
INACTIVE_KEY = "balanced_control_inactive"
WRAPPER_KEY = "balanced_control"

_PATCH_LISTS = ("input_block_patch", "input_block_patch_after_skip", "middle_block_after_patch", "output_block_patch")
_RECORD_SEQ = itertools.count(1)


class BalanceRecord:
    """What one model call did, per layer, for the balance map.

    ``layers`` is a list of dicts in UNet order:
    ``{"layer": "input 3" | "middle" | "output 5 skip", "controls": [labels],
    "weights": [fp32 (B,1,h,w) or (B,1,1,1)], "magnitudes": [fp32 (B,h,w)],
    "feature_magnitude": fp32 (B,h,w), "injected_magnitude": fp32 (B,h,w),
    "injection_lambda": fp32 (B,1,h,w) or (B,1,1,1)}``. The tensors stay on
    the model's device until ``to_cpu`` (no device sync while sampling).
    ``cond_or_uncond`` labels each chunk of rows (0 = positive, 1 = negative);
    ``inactive`` names the minimal-impact controls that ran in the call but
    were outside their start/end range; ``seq`` orders records in time.
    """

    def __init__(self, settings, cond_or_uncond: list[int], sigma: float | None = None):
        self.settings = settings
        self.cond_or_uncond = list(cond_or_uncond)
        self.sigma = sigma
        self.layers: list[dict] = []
        self.inactive: list[str] = []
        self.seq = next(_RECORD_SEQ)
        self._on_cpu = False

    def rows_of(self, label: int, batch: int) -> list[int]:
        """Row indices of chunk ``label`` in a batch of ``batch`` rows."""
        chunks = max(len(self.cond_or_uncond), 1)
        per = batch // chunks
        rows = []
        for j, lab in enumerate(self.cond_or_uncond):
            if lab == label:
                rows.extend(range(j * per, (j + 1) * per))
        return rows

    def to_cpu(self) -> "BalanceRecord":
        if not self._on_cpu:
            for layer in self.layers:
                for k, v in layer.items():
                    if isinstance(v, torch.Tensor):
                        layer[k] = v.detach().cpu()
                    elif isinstance(v, list) and v and isinstance(v[0], torch.Tensor):
                        layer[k] = [t.detach().cpu() for t in v]
            self._on_cpu = True
        return self


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

    @property
    def strength(self) -> float:
        return float(getattr(self.control, "strength", 1.0))


def _unique_label(label: str, taken: set) -> str:
    """``label``, or ``label (2)``, ``label (3)``... the first not in ``taken``."""
    unique, k = label, 2
    while unique in taken:
        unique, k = f"{label} ({k})", k + 1
    return unique


def _finite(x: torch.Tensor) -> torch.Tensor:
    # One fp32 reduction (no elementwise temporaries); read once per call in finish().
    return torch.isfinite(x.sum(dtype=torch.float32))


class BalancedInjection:
    """Collects the minimal-impact residuals of one model call and injects them."""

    def __init__(self, settings, transformer_options: dict):
        self.settings = settings
        self.transformer_options = transformer_options
        self.entries: list[_ControlEntry] = []
        self.cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        # (kind, label, layer, flag): kind in latent, feature, residual, injection; in order of occurrence.
        self._checks: list[tuple[str, str | None, str, torch.Tensor]] = []
        self._skipped: list[str] = []
        # The map shows the positive rows: calls without them (an uncond-only pass) are not recorded.
        self.record: BalanceRecord | None = None
        if getattr(settings, "record_balance", False) and 0 in self.cond_or_uncond:
            self.record = BalanceRecord(settings, self.cond_or_uncond)

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

    def add(self, label: str, control_dict: dict, control) -> None:
        # Two controls with one label would share a colour in the map.
        self.entries.append(_ControlEntry(_unique_label(label, {e.label for e in self.entries}), control_dict,
                                          control))

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
            self._checks.append(("feature", None, f"output {block[1]} main path", _finite(h)))
        if block[1] == 0:
            # Without middle_block_after_patch (or if it did not run), h is the
            # middle-block output here, after core's middle control.
            h = self._inject(h, "middle", "middle")
        hsp = self._inject(hsp, "output", f"output {block[1]} skip")
        return h, hsp

    def diffusion_model_wrapper(self, executor, *args, **kwargs):
        x = args[0] if args else kwargs.get("x")
        if isinstance(x, torch.Tensor):
            self._checks.insert(0, ("latent", None, "UNet input", _finite(x)))
        out = executor(*args, **kwargs)
        self.finish()
        return out

    # -- core ----------------------------------------------------------------------
    def _take(self, key: str) -> list[tuple[_ControlEntry, torch.Tensor]]:
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
        self._checks.append(("feature", None, layer, _finite(feature)))
        for e, r in items:
            self._checks.append(("residual", e.label, layer, _finite(r)))

        s = self.settings
        weights = lam = None
        if s.mode == "vanilla":
            # Core's arithmetic: the chain's sum in the residuals' dtype (control_merge's
            # prev + new), added to the feature and cast back as its in-place `h += ctrl`.
            combined = items[0][1]
            for _, r in items[1:]:
                combined = combined + r
            out = feature + combined
            if out.dtype != feature.dtype:
                out = out.to(feature.dtype)
            residuals = [r for _, r in items]
        else:
            residuals = []
            for _, r in items:
                r = r.to(device=feature.device, dtype=feature.dtype)
                residuals.append(r.expand_as(feature) if r.shape[0] != feature.shape[0] else r)
            out, combined, weights, lam = self._balanced(feature, residuals, [e.strength for e, _ in items])
        self._checks.append(("injection", None, layer, _finite(out)))
        if self.record is not None:
            self._record_layer(layer, [e.label for e, _ in items], residuals, weights, feature, combined, lam)
        return out

    def _balanced(self, feature, residuals, strengths):
        """(output, combined residual, weights, λ) of the micontrolnet / controlnet_star modes.

        ``strength_scaling == "linear"``: the weights and λ are those of the
        residuals at strength 1 (each divided by its strength), and the
        combination uses the strength-scaled residuals, so one control's
        injected term is proportional to its strength."""
        s = self.settings
        linear = getattr(s, "strength_scaling", "paper") == "linear"
        unit = [1.0 / v if v else 1.0 for v in strengths] if linear else None
        many = len(residuals) > 1
        # Computed once, for the combination and the record alike.
        weights = combination_weights(residuals, s.granularity, scales=unit) if many or self.record is not None else None
        combined = weighted_sum(residuals, weights) if many else residuals[0]
        lam = None
        if s.mode == "micontrolnet":
            if not linear:
                out, lam = add_inj_with_lambda(feature, combined, s.max_lambda, s.granularity, s.lambda_convention)
            else:
                basis = (weighted_sum(residuals, [w * k for w, k in zip(weights, unit)]) if many
                         else residuals[0] * unit[0])
                _, lam = add_inj_with_lambda(feature, basis, s.max_lambda, s.granularity, s.lambda_convention)
                del basis
                out = torch.addcmul(feature, lam.to(feature.dtype), combined)
        else:
            out = feature + combined
        return out, combined, weights, lam

    def _record_layer(self, layer, labels, residuals, weights, feature, combined, lam):
        rows = feature.shape[0]
        ones = torch.ones((rows,) + (1,) * (feature.ndim - 1), dtype=torch.float32, device=feature.device)
        weights = [ones] * len(residuals) if weights is None else weights
        lam = ones if lam is None else lam
        spatial = feature.shape[2:]
        # ‖w·r‖ over channels = |w|·‖r‖: w and λ are constant over channels.
        mags = [(w[:, 0].abs() * channel_norm(r.to(feature.device))).expand(rows, *spatial)
                for w, r in zip(weights, residuals)]
        injected = (lam[:, 0].abs() * channel_norm(combined.to(feature.device))).expand(rows, *spatial)
        self.record.layers.append({
            "layer": layer,
            "controls": labels,
            "weights": [w.detach() for w in weights],
            "magnitudes": [m.detach() for m in mags],
            "feature_magnitude": channel_norm(feature).detach(),
            "injected_magnitude": injected.detach(),
            "injection_lambda": lam.detach(),
        })

    # -- after the forward ---------------------------------------------------------
    def finish(self) -> None:
        """After the UNet forward: fail loudly on non-finite values, warn about
        skipped residuals, publish the record."""
        sigma_t = self.transformer_options.get("sigmas")
        values = [f.to(torch.float32) for _, _, _, f in self._checks]
        if isinstance(sigma_t, torch.Tensor) and sigma_t.numel():
            dev = values[0].device if values else sigma_t.device
            values.append(sigma_t.flatten()[0].to(dev, torch.float32))
            has_sigma = True
        else:
            has_sigma = False
        read = torch.stack(values).tolist() if values else []  # the one device read of the call
        sigma = read.pop() if has_sigma else None
        checks, self._checks = self._checks, []
        for (kind, label, layer, _), ok in zip(checks, read):
            if not ok:
                raise FloatingPointError(self._nonfinite_message(kind, label, layer, checks, read))

        if self._skipped:
            log.warning("MIControlNet: residuals not applied in this model call because their size differs from "
                        "the UNet feature, as core skips them (e.g. Deep Shrink / PatchModelAddDownscale steps): %s",
                        "; ".join(self._skipped))
            self._skipped = []
        leftover = [e.label for e in self.entries if any(r is not None for v in e.lists.values() for r in v)]
        if leftover:
            log.warning("MIControlNet: residuals left unused by the UNet for %s; the control has more "
                        "layers than the model", ", ".join(leftover))
        if self.record is not None:
            self._publish(sigma)

    def _publish(self, sigma) -> None:
        rec = self.record
        rec.sigma = sigma
        active = {id(e.control) for e in self.entries}
        taken = {e.label for e in self.entries}
        for label, control in self.transformer_options.get(INACTIVE_KEY, []):
            if id(control) in active:
                continue
            unique = _unique_label(label, taken)
            taken.add(unique)
            rec.inactive.append(unique)
        # A guidance pass (PAG, SAG) runs after the main pass at the same sigma, with
        # one conditioning list (labels [0] only): the main pass's record stays. A call
        # holding cond and uncond rows is a main pass (e.g. Heun's next step at the
        # sigma of its correction) and replaces it.
        main_pass = 0 in self.cond_or_uncond and 1 in self.cond_or_uncond
        for e in self.entries:
            if e.control is None:
                continue
            prev = getattr(e.control, "last_balance_record", None)
            if (prev is None or prev.sigma is None or sigma is None or main_pass
                    or abs(prev.sigma - sigma) > 1e-6 * max(abs(sigma), 1e-8)):
                e.control.last_balance_record = rec

    def _nonfinite_message(self, kind, label, layer, checks, read) -> str:
        others = other_patches(self.transformer_options, _PATCH_LISTS,
                               ours=(self.input_block_patch, self.output_block_patch, self.middle_block_after_patch))
        patches = ("; other patches on this model: " + ", ".join(others)) if others else \
            "; no other UNet patch is on this model"
        bad = [c[2] for c, ok in zip(checks, read) if not ok]
        more = f" (and {len(bad) - 1} later check(s))" if len(bad) > 1 else ""
        if kind == "latent":
            return (f"MIControlNet: the latent entering the UNet already holds NaN or Inf{more}: an earlier step "
                    f"produced it, not this call's ControlNet residuals{patches}. Find the patch or setting that "
                    f"makes the first non-finite step (e.g. FreeU_V2 on a 1x1 middle block divides by zero).")
        if kind == "feature":
            return (f"MIControlNet: the UNet feature at layer '{layer}' already held NaN or Inf before the "
                    f"minimal-impact injection{more}: it came from the UNet or another patch that ran before it, "
                    f"not from a ControlNet residual{patches}.")
        if kind == "residual":
            return (f"{label}: its residual for UNet layer '{layer}'{more} holds NaN or Inf, which would make "
                    f"the balancing weights NaN. Check the ControlNet file and its dtype (an fp16 ControlNet "
                    f"can overflow at high strength), or lower the strength.")
        s = self.settings
        strengths = ", ".join(f"{e.label} strength {e.strength:g}" for e in self.entries)
        what = (f"λ·f_c overflowed (mode {s.mode}, max_lambda {s.max_lambda:g}, {strengths})"
                if s.mode == "micontrolnet" else f"the sum overflowed (mode {s.mode}, {strengths})")
        return (f"MIControlNet: the injection at UNet layer '{layer}' made the feature NaN or Inf although the "
                f"feature and the residuals were finite{more}: {what} in the feature's dtype. Lower max_lambda in "
                f"MIControlNetSettings or the strength, or run the model in fp32 or bf16.")
