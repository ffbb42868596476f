"""The ControlNeXt injection: the applied controls of a model, the module
outputs of one model call, and the UNet patch functions that add them.

The wrapper runs once per model call. It evaluates each control module once
per distinct (hint row, timestep) of the batch (cond and uncond rows share
one evaluation), with the timestep ``model_sampling.timestep(sigma)`` the
module was trained with, and puts the result into a per-call copy of
transformer_options. The patches inject at each variant's trained place:
Cross Normalization per row against the UNet feature, pooled, scaled by the
variant's strength rule per row (cond / uncond), masked per latent row,
combined with the other ControlNeXt controls of that place (add^com by
default, or a plain sum) and added to the feature.

The combination, the addition, the finiteness checks and their one device
read per model call are the shared engine's (``injection.engine``), with the
rules (``add_com`` | ``sum``, ``add``) that ``ControlNeXtApply``'s
``combine`` input chooses: ControlNeXt adds its residual once, as the
official UNet does, so add^inj does not apply to it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

import comfy.utils

from . import controlnext_memory
from .controlnext_arch import cross_normalize
from .controlnext_files import ControlNeXtWeights, Variant
from .injection.engine import BalancedInjection, ControlEntry, unique_label
from .injection.settings import BalanceSettings
from .masks import mask_at, mask_index_per_row, normalise_mask
from .unet_patches import prepend_patches

STACK_KEY = "balanced_control_controlnext"
CALL_KEY = "balanced_control_controlnext_call"
WRAPPER_KEY = "balanced_control_controlnext"
COMBINE_MODES = ("add_com", "sum")
UNCOND_MODES = ("variant default", "apply", "zero")


class ControlNeXtControl:
    """One applied ControlNeXt: weights, variant, hint, strength, range, mask."""

    def __init__(self, weights: ControlNeXtWeights, variant: Variant, image: torch.Tensor, strength: float,
                 start_percent: float = 0.0, end_percent: float = 1.0, mask: torch.Tensor | None = None,
                 uncond: str = "variant default", label: str = "ControlNeXt"):
        if uncond not in UNCOND_MODES:
            raise ValueError(f"uncond must be one of {UNCOND_MODES}, got {uncond!r}")
        self.weights = weights
        self.variant = variant
        # IMAGE (B, H, W, C) in [0, 1] -> (B, 3, H, W)
        self.hint = image[..., :3].movedim(-1, 1).to(torch.float32)
        self.strength = float(strength)
        self.percent_range = (float(start_percent), float(end_percent))
        self.mask = normalise_mask(mask, label)
        self.uncond_rule = variant.uncond_default if uncond == "variant default" else uncond
        self.label = label
        self._hint_cache: tuple | None = None
        self._mask_cache: tuple | None = None
        # Loaded, counted and offloaded by ComfyUI with the model (controlnext_memory).
        self.module_patcher = controlnext_memory.module_patcher(weights, variant)
        self.hint_patcher = controlnext_memory.hint_patcher(self.hint)

    @property
    def patchers(self) -> tuple:
        return (self.module_patcher, self.hint_patcher)

    def module_on(self, device, base_model=None):
        """The managed module (or its multi-GPU clone) on ``device``, else a per-device copy."""
        m = controlnext_memory.managed_on(self.module_patcher, device, base_model)
        return m if m is not None else self.weights.module(self.variant, device)

    def _trained_scale(self, learned: float | None) -> float:
        s = self.variant.fixed_scale * self.weights.trained_strength(self.variant)
        if self.variant.scale_rule == "learned":
            s *= learned
        elif self.variant.scale_rule == "sigmoid":
            # ControlNeXt-SVD/models/unet_spatio_temporal_condition_controlnext.py L472
            s *= 1.3 / (1.0 + math.exp(-learned))
        return s

    @functools.cached_property
    def effective_scale(self) -> float:
        """strength × the variant's trained output scale, on conditional rows."""
        return self.strength * self._trained_scale(self.weights.learned_scale())

    @functools.cached_property
    def uncond_scale(self) -> float:
        """The scale of unconditional rows. "zero_raw_scale" (SVD v1 as its
        pipeline runs it, ControlNeXt-SVD/pipeline/
        pipeline_stable_video_diffusion_controlnext.py L576-579): the raw learned
        scale of the uncond half is zeroed before the UNet's sigmoid(scale)·1.3,
        so those rows get sigmoid(0)·1.3 = 0.65 × strength."""
        if self.uncond_rule == "zero":
            return 0.0
        if self.uncond_rule == "zero_raw_scale":
            return self.strength * self._trained_scale(0.0)
        return self.effective_scale

    def sigma_range(self, model_sampling) -> tuple[float, float]:
        start, end = self.percent_range
        return float(model_sampling.percent_to_sigma(start)), float(model_sampling.percent_to_sigma(end))

    def hint_at(self, height: int, width: int, device, base_model=None) -> torch.Tensor:
        """The control image at pixel size (height, width), like core resizes hints (centre crop)."""
        holder = controlnext_memory.managed_on(self.hint_patcher, device, base_model)
        if holder is not None:
            managed = holder.hint
            # Not cached: ComfyUI may move the managed hint off the device after the run.
            if managed.shape[-2:] == (height, width):
                return managed
            return comfy.utils.common_upscale(managed, width, height, "bilinear", "center")
        key = (height, width, str(device))
        if self._hint_cache is None or self._hint_cache[0] != key:
            h = self.hint
            if h.shape[-2:] != (height, width):
                h = comfy.utils.common_upscale(h, width, height, "bilinear", "center")
            self._hint_cache = (key, h.to(device))
        return self._hint_cache[1]

    def mask_rows(self, n_rows: int, per: int) -> torch.Tensor:
        """Which mask each batch row takes: one mask for all rows, or one per
        latent of the batch (per video frame for SVD) in every cond/uncond
        chunk of ``per`` rows, independent of how many control images there are."""
        return mask_index_per_row(self.mask.shape[0], n_rows, per, self.label,
                                  "video frames" if self.variant.family == "SVD" else "images")

    def mask_at(self, height: int, width: int, device) -> torch.Tensor:
        """The mask as (B, 1, height, width) on ``device``, resized like the hint."""
        key = (height, width, str(device))
        if self._mask_cache is None or self._mask_cache[0] != key:
            self._mask_cache = (key, mask_at(self.mask, height, width, device))
        return self._mask_cache[1]

    def __deepcopy__(self, memo):
        return self  # immutable after construction; model_options are deep-copied on every clone


@dataclasses.dataclass(frozen=True)
class ControlNeXtStack:
    """The ControlNeXt controls of a model, oldest first, and how controls that
    meet at one injection point combine."""

    controls: tuple
    combine: str = "add_com"

    def __deepcopy__(self, memo):
        return self


def _row_labels(n_rows: int, cond_or_uncond) -> torch.Tensor:
    labels = list(cond_or_uncond) if cond_or_uncond else [0]
    if n_rows % len(labels):
        labels = [0]
    per = n_rows // len(labels)
    return torch.tensor(labels).repeat_interleave(per)


def _hint_rows(n_rows: int, per: int, n_images: int) -> torch.Tensor:
    """Which image feeds each row: rows of every cond/uncond chunk (``per``
    rows each) take the images in order, cycling when the chunk is longer
    (core's broadcast)."""
    return (torch.arange(n_rows) % per) % n_images


@dataclasses.dataclass
class _Prepared:
    """One control's module outputs at one injection place in one call. ``control`` is
    the applied control (its mask), or None for features computed by a trainer."""
    variant: Variant
    label: str
    control: ControlNeXtControl | None
    features: torch.Tensor  # (U, C, h, w): one module output per distinct (hint, timestep)
    row_feature: torch.Tensor  # (N,) index into features per row
    row_scale: torch.Tensor  # (N,) fp32: strength rule, range, uncond
    row_mask: torch.Tensor | None  # (N,) mask index per row, None without a mask
    entry: ControlEntry | None = None  # the engine's entry, made when prepared (outside a compiled forward)


class ControlNeXtEngine(BalancedInjection):
    """The shared engine with ControlNeXt's rules: (``add_com`` | ``sum``, ``add``), no balance record."""

    site = "UNet"
    name = "ControlNeXt"

    def __init__(self, combine: str, transformer_options: dict | None = None):
        if combine not in COMBINE_MODES:
            raise ValueError(f"ControlNeXt: combine must be one of {COMBINE_MODES}, got {combine!r}")
        settings = BalanceSettings(mode="controlnet_star" if combine == "add_com" else "vanilla",
                                   record_balance=False)
        super().__init__(settings, transformer_options if transformer_options is not None else {},
                         rules=(combine, "add"))

    def nonfinite_message(self, kind, label, layer, checks, read) -> str:
        if kind == "residual":
            return (f"{label}: its residual for UNet layer '{layer}' holds NaN or Inf: check the control image "
                    f"(NaN pixels, e.g. from a preprocessor) and the ControlNeXt file and its dtype, or lower the "
                    f"strength.")
        if kind != "injection":
            return super().nonfinite_message(kind, label, layer, checks, read)
        strengths = ", ".join(f"{e.label} strength {e.strength:g}" for e in self.entries)
        return (f"ControlNeXt: adding the control at UNet layer '{layer}' made the feature NaN or Inf although "
                f"the feature and the control were finite ({strengths}): the sum overflowed in the feature's "
                f"dtype. Lower the strength, or run the model in fp32 or bf16.")


class ControlNeXtCall:
    """The module outputs of one model call, and the injection of them."""

    def __init__(self, combine: str, injection_blocks: dict, transformer_options: dict | None = None):
        self.combine = combine
        self.injection_blocks = injection_blocks  # injection name -> input block id
        self.points: dict[str, list[_Prepared]] = {}
        self.module_evaluations = 0  # rows the modules ran on (for tests and benchmarks)
        self.engine = ControlNeXtEngine(combine, transformer_options)

    def add(self, p: "_Prepared") -> None:
        """Queue one control's prepared outputs at its injection place, with its engine entry.

        Made here, before the UNet forward: inside a compiled forward a lookup by
        object id would make torch.compile guard on the id and recompile every call."""
        p.entry = ControlEntry(unique_label(p.label, {e.label for e in self.engine.entries}), {}, p.control)
        self.engine.entries.append(p.entry)
        self.points.setdefault(p.variant.injection, []).append(p)

    @classmethod
    def prepare(cls, stack: ControlNeXtStack, base_model, x: torch.Tensor, sigma: torch.Tensor,
                transformer_options: dict) -> "ControlNeXtCall":
        unet = base_model.diffusion_model
        call = cls(stack.combine, injection_block_ids(unet), transformer_options)
        model_sampling = base_model.model_sampling
        n = x.shape[0]
        cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
        labels = _row_labels(n, cond_or_uncond).to(x.device)
        per = n // len(cond_or_uncond) if n % len(cond_or_uncond) == 0 else n  # rows of one cond/uncond chunk
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        timesteps = model_sampling.timestep(sigma).to(torch.float32)
        pixel_h, pixel_w = x.shape[-2] * 8, x.shape[-1] * 8
        s = sigma.to(torch.float32)
        for control in stack.controls:
            hi, lo = control.sigma_range(model_sampling)
            active = (s <= hi) & (s >= lo)
            scale = torch.where(labels == 1, control.uncond_scale, control.effective_scale).to(torch.float32)
            scale = scale * active.to(scale)
            if not bool((scale != 0).any()):
                continue
            hint = control.hint_at(pixel_h, pixel_w, x.device, base_model)
            row_hint = _hint_rows(n, per, hint.shape[0]).to(x.device)
            # One evaluation per distinct (image, timestep) among the rows that use it. fp32 holds both
            # exactly (small image indices, fp32 timesteps); float64 would fail on MPS.
            live = torch.nonzero(scale != 0).flatten()
            pairs = torch.stack([row_hint[live].to(torch.float32), timesteps[live]], dim=1)
            unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            module = control.module_on(x.device, base_model)
            with torch.no_grad():
                feats = module(hint[unique[:, 0].long()].to(module.dtype), unique[:, 1].to(torch.float32))
            call.module_evaluations += unique.shape[0]
            row_feature = torch.zeros(n, dtype=torch.long, device=x.device)
            row_feature[live] = inverse
            row_mask = None if control.mask is None else control.mask_rows(n, per).to(x.device)
            call.add(_Prepared(control.variant, control.label, control, feats, row_feature, scale, row_mask))
        return call

    def inject(self, point: str, h: torch.Tensor) -> torch.Tensor:
        prepared = self.points.get(point)
        if not prepared:
            return h
        residuals = []
        for p in prepared:
            c = p.features.index_select(0, p.row_feature)
            r = cross_normalize(h, c, p.variant.eps, p.variant.normalize_before_pool)
            r = r * p.row_scale.view(-1, *([1] * (r.ndim - 1)))
            if p.row_mask is not None:
                m = p.control.mask_at(r.shape[-2], r.shape[-1], r.device)
                r = r * m.index_select(0, p.row_mask)
            residuals.append((p.entry, r))
        return self.engine.inject_items(h, residuals, point)

    def finish(self) -> None:
        """After the UNet forward: the engine's one device read of the finiteness checks."""
        self.engine.finish()


def training_call(unet, variant: Variant, features: torch.Tensor, strength: float = 1.0) -> ControlNeXtCall:
    """A ``ControlNeXtCall`` for module outputs computed by the caller, one per
    batch row and still attached to the autograd graph (training), injected at
    ``variant``'s place exactly as at sampling."""
    n = features.shape[0]
    call = ControlNeXtCall("sum", injection_block_ids(unet))
    rows = torch.arange(n, device=features.device)
    scale = torch.full((n,), float(strength) * variant.fixed_scale, dtype=torch.float32, device=features.device)
    call.add(_Prepared(variant, "ControlNeXt (training)", None, features, rows, scale, None))
    return call


def call_transformer_options(call: ControlNeXtCall, transformer_options: dict | None = None) -> dict:
    """transformer_options for a direct UNet call that injects ``call`` through
    the patch functions the sampler uses, first in their lists as
    ``apply_controlnext`` puts them."""
    options = dict(transformer_options or {})
    options["patches"] = prepend_patches(options.get("patches"), {
        "input_block_patch_after_skip": input_block_patch_after_skip, "output_block_patch": output_block_patch})
    options[CALL_KEY] = call
    options.setdefault("cond_or_uncond", [0])
    return options


def injection_block_ids(unet) -> dict:
    """Input-block ids of the injection points of a ComfyUI UNet.

    Computed per call (a walk over a dozen blocks): a cache keyed by object id
    could outlive the model and answer for another one."""
    import comfy.ldm.modules.diffusionmodules.openaimodel as oai

    blocks = unet.input_blocks
    level0 = next((i for i, b in enumerate(blocks) if any(isinstance(m, oai.Downsample) for m in b)),
                  len(blocks) - 1)
    return {"conv_in": 0, "level0": level0, "last_input": len(blocks) - 1}


# -- the functions registered on the model ----------------------------------------


def apply_model_wrapper(executor, *args, **kwargs):
    """APPLY_MODEL wrapper: evaluates the ControlNeXt modules of this call."""
    args = list(args)
    if len(args) > 5:
        transformer_options = args[5]
    else:
        transformer_options = kwargs.get("transformer_options", {})
    stack = transformer_options.get(STACK_KEY) if transformer_options else None
    if stack is None or not stack.controls:
        return executor(*args, **kwargs)
    x, sigma = args[0], args[1]
    # A per-call copy: the sampler's dict may be reused, and the call must end here.
    transformer_options = dict(transformer_options)
    call = ControlNeXtCall.prepare(stack, executor.class_obj, x, sigma, transformer_options)
    transformer_options[CALL_KEY] = call
    if len(args) > 5:
        args[5] = transformer_options
    else:
        kwargs["transformer_options"] = transformer_options
    if isinstance(x, torch.Tensor):
        call.engine.check("latent", None, "UNet input", x, first=True)
    out = executor(*args, **kwargs)
    call.finish()
    return out


def input_block_patch_after_skip(h, transformer_options):
    call = transformer_options.get(CALL_KEY)
    if call is None:
        return h
    block = transformer_options.get("block", ("input", -1))
    for point, block_id in call.injection_blocks.items():
        if block[1] == block_id and point in call.points:
            h = call.inject(point, h)
    return h


def output_block_patch(h, hsp, transformer_options):
    call = transformer_options.get(CALL_KEY)
    if call is None:
        return h, hsp
    block = transformer_options.get("block", ("output", -1))
    if block[1] == 0:
        # At output block 0, h is the middle-block output (after core's middle control).
        h = call.inject("middle", h)
    return h, hsp

