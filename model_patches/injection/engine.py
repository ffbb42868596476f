"""The per-call balanced-injection engine, shared by every architecture.

One ``BalancedInjection`` lives in one model call's ``transformer_options``
(a fresh dict the sampler builds per call, ``comfy/samplers.py:302-321``).
Controls hand it their residual dicts (``add``); an architecture's *site*
(``unet_sites``, ``dit_sites``) finds, at each place where core adds its
ControlNets, the feature there and the residuals for it, and calls
``inject_items``, which

1. combines the residuals of that layer: plain ``sum`` (core) or add^com
   (eq. 12 and its N-control weights, ``balance.combination_weights``);
2. injects the result into the feature: plain ``add`` (core) or add^inj
   (eqs. 9-10, ``balance.add_inj_with_lambda``);
3. queues finiteness flags (the feature, each residual, the result) that
   ``finish`` reads with one device read per model call;
4. records weights, magnitudes and λ for the balance map (``BalanceRecord``).

Features are ``(B, C, ...)`` with channels in dim 1 (a DiT site presents its
image tokens as a ``(B, D, h, w)`` view); every reduction is per row.
"""

from __future__ import annotations

import itertools
import logging

import torch

from ..balance import add_inj_with_lambda, channel_norm, combination_weights, weighted_sum

log = logging.getLogger(__name__)

# Key in the per-call transformer_options holding the call's MIControlNet injection (UNet or DiT site).
INJECTION_KEY = "balanced_control_injection"
# Key of the injection's wrapper among the call's wrappers.
WRAPPER_KEY = "balanced_control"
# (label, control) of the minimal-impact controls that ran in this call but were outside their range.
INACTIVE_KEY = "balanced_control_inactive"
_RECORD_SEQ = itertools.count(1)


class BalanceRecord:
    """What one model call did, per layer, for the balance map.

    ``layers`` is a list of dicts in model order:
    ``{"layer": "input 3" | "middle" | "output 5 skip" | "joint block 2" | ...,
    "controls": [labels], "weights": [fp32 (B,1,h,w) or (B,1,1,1)],
    "magnitudes": [fp32 (B,h,w)], "feature_magnitude": fp32 (B,h,w),
    "injected_magnitude": fp32 (B,h,w), "injection_lambda": fp32 (B,1,h,w) or
    (B,1,1,1)}``. For a DiT, (h, w) is the latent's patch grid. The tensors
    stay on the model's device until ``to_cpu`` (no device sync while
    sampling). ``cond_or_uncond`` labels each chunk of rows (0 = positive,
    1 = negative); ``inactive`` names the minimal-impact controls that ran in
    the call but were outside their start/end range; ``seq`` orders records.
    """

    def __init__(self, settings, cond_or_uncond: list[int], sigma: float | None = None, site: str = "UNet"):
        self.settings = settings
        self.site = site  # "UNet" or "transformer" (a DiT): what the map calls the base
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


class ControlEntry:
    """One control's residual dict in one model call."""
    __slots__ = ("label", "lists", "control")

    def __init__(self, label: str, control_dict: dict, control):
        self.label = label
        self.control = control
        # Copy the lists: UNet sites pop from them like core's apply_control.
        self.lists = {k: list(v) for k, v in control_dict.items() if isinstance(v, (list, tuple))}

    def pop(self, key: str):
        lst = self.lists.get(key)
        if lst:
            return lst.pop()
        return None

    def slot(self, key: str, index: int):
        lst = self.lists.get(key)
        if lst is not None and index < len(lst):
            return lst[index]
        return None

    @property
    def strength(self) -> float:
        return float(getattr(self.control, "strength", 1.0))


def unique_label(label: str, taken: set) -> str:
    """``label``, or ``label (2)``, ``label (3)``... the first not in ``taken``."""
    unique, k = label, 2
    while unique in taken:
        unique, k = f"{label} ({k})", k + 1
    return unique


def finite_flag(x: torch.Tensor) -> torch.Tensor:
    # One fp32 reduction (no elementwise temporaries); read once per call in finish().
    return torch.isfinite(x.sum(dtype=torch.float32))


class BalancedInjection:
    """Collects the residuals of one model call's balanced controls, combines and injects them.

    ``rules`` (combination, injection) defaults to the mode's
    (``settings.rules``); a control family with its own fixed rule passes it
    (Refine-Control: ``("sum", "add_inj")``). Subclasses (the sites) register
    the patches and call ``inject_items`` and ``finish``. ``site`` names the
    architecture in messages ("UNet", "transformer")."""

    site = "model"
    name = "MIControlNet"

    def __init__(self, settings, transformer_options: dict, rules: tuple[str, str] | None = None):
        self.settings = settings
        self.rules = tuple(rules) if rules is not None else settings.rules
        self.transformer_options = transformer_options
        self.entries: list[ControlEntry] = []
        self.cond_or_uncond = list(transformer_options.get("cond_or_uncond", [0]))
        # (kind, label, layer, flag): kind in latent, feature, residual, injection; in order of occurrence.
        self._checks: list[tuple[str, str | None, str, torch.Tensor]] = []
        self._skipped: list[str] = []
        # The map shows the positive rows: calls without them (an uncond-only pass) are not recorded.
        self.record: BalanceRecord | None = None
        if getattr(settings, "record_balance", False) and 0 in self.cond_or_uncond:
            self.record = BalanceRecord(settings, self.cond_or_uncond, site=self.site)

    def add(self, label: str, control_dict: dict, control) -> ControlEntry:
        # Two controls with one label would share a colour in the map.
        entry = ControlEntry(unique_label(label, {e.label for e in self.entries}), control_dict, control)
        self.entries.append(entry)
        return entry

    def check(self, kind: str, label: str | None, layer: str, x: torch.Tensor, first: bool = False) -> None:
        item = (kind, label, layer, finite_flag(x))
        if first:
            self._checks.insert(0, item)
        else:
            self._checks.append(item)

    # -- combination and injection -------------------------------------------------
    def inject_items(self, feature: torch.Tensor, items: list, layer: str) -> torch.Tensor:
        """``feature`` (B, C, ...) after combining and injecting ``items``
        [(entry, residual)], each residual of ``feature``'s shape or with 1 row."""
        self.check("feature", None, layer, feature)
        for e, r in items:
            self.check("residual", e.label, layer, r)
        combine, inject = self.rules
        s = self.settings
        weights = lam = None
        if combine == "sum":
            # Core's arithmetic: the chain's sum in the residuals' dtype (control_merge's prev + new).
            combined = items[0][1]
            for _, r in items[1:]:
                combined = combined + r
            residuals = [r for _, r in items]
            if inject == "add":
                # core's in-place `h += ctrl` casts to the feature's dtype
                out = feature + combined
                if out.dtype != feature.dtype:
                    out = out.to(feature.dtype)
            else:
                combined = combined.to(device=feature.device, dtype=feature.dtype)
                if combined.shape[0] != feature.shape[0]:
                    combined = combined.expand_as(feature)
                out, lam = add_inj_with_lambda(feature, combined, s.max_lambda, s.granularity, s.lambda_convention)
        else:
            residuals = []
            for _, r in items:
                r = r.to(device=feature.device, dtype=feature.dtype)
                residuals.append(r.expand_as(feature) if r.shape[0] != feature.shape[0] else r)
            out, combined, weights, lam = self._balanced(feature, residuals, [e.strength for e, _ in items],
                                                         inject == "add_inj")
        self.check("injection", None, layer, out)
        if self.record is not None:
            self._record_layer(layer, [e.label for e, _ in items], residuals, weights, feature, combined, lam)
        return out

    def _balanced(self, feature, residuals, strengths, inj: bool):
        """(output, combined residual, weights, λ) under add^com, then add^inj (``inj``) or add.

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
        if inj:
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
        """After the forward: fail loudly on non-finite values (one device
        read), warn about skipped residuals, publish the record."""
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
                raise FloatingPointError(self.nonfinite_message(kind, label, layer, checks, read))
        self.warn_unused()
        if self.record is not None:
            self._publish(sigma)

    def warn_unused(self) -> None:
        """Site hook: warn about residuals the forward skipped or left over."""
        if self._skipped:
            log.warning("%s: residuals not applied in this model call because their size differs from "
                        "the %s feature, as core skips them (e.g. Deep Shrink / PatchModelAddDownscale steps): %s",
                        self.name, self.site, "; ".join(self._skipped))
            self._skipped = []

    def _publish(self, sigma) -> None:
        rec = self.record
        rec.sigma = sigma
        active = {id(e.control) for e in self.entries}
        taken = {e.label for e in self.entries}
        for label, control in self.transformer_options.get(INACTIVE_KEY, []):
            if id(control) in active:
                continue
            unique = unique_label(label, taken)
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

    def other_patches_text(self) -> str:
        """Site hook: the other patches on the model, for messages."""
        return ""

    def nonfinite_message(self, kind, label, layer, checks, read) -> str:
        patches = self.other_patches_text()
        bad = [c[2] for c, ok in zip(checks, read) if not ok]
        more = f" (and {len(bad) - 1} later check(s))" if len(bad) > 1 else ""
        site = self.site
        if kind == "latent":
            return (f"{self.name}: the latent entering the {site} already holds NaN or Inf{more}: an earlier step "
                    f"produced it, not this call's ControlNet residuals{patches}. Find the patch or setting that "
                    f"makes the first non-finite step (e.g. FreeU_V2 on a 1x1 middle block divides by zero).")
        if kind == "feature":
            return (f"{self.name}: the {site} feature at layer '{layer}' already held NaN or Inf before the "
                    f"minimal-impact injection{more}: it came from the {site} or another patch that ran before it, "
                    f"not from a ControlNet residual{patches}.")
        if kind == "residual":
            return (f"{label}: its residual for {site} layer '{layer}'{more} holds NaN or Inf, which would make "
                    f"the balancing weights NaN. Check the ControlNet file and its dtype (an fp16 ControlNet "
                    f"can overflow at high strength), or lower the strength.")
        s = self.settings
        strengths = ", ".join(f"{e.label} strength {e.strength:g}" for e in self.entries)
        what = (f"λ·f_c overflowed (mode {s.mode}, max_lambda {s.max_lambda:g}, {strengths})"
                if self.rules[1] == "add_inj" else f"the sum overflowed (mode {s.mode}, {strengths})")
        return (f"{self.name}: the injection at {site} layer '{layer}' made the feature NaN or Inf although the "
                f"feature and the residuals were finite{more}: {what} in the feature's dtype. Lower max_lambda in "
                f"MIControlNetSettings or the strength, or run the model in fp32 or bf16.")
