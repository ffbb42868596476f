"""ControlNeXt inside ComfyUI: loading, variant resolution, UNet weight
patches and the injection with Cross Normalization.

How a ControlNeXt control reaches the UNet, through public extension points:

1. ``ControlNeXtApply`` clones the MODEL. The released UNet subset becomes
   ModelPatcher weight patches on the clone (SDXL ΔW as "diff" patches, SD1.5
   absolute weights as "set" patches), so ComfyUI applies and removes them
   like LoRA patches, offloading included.
2. The clone's ``model_options["transformer_options"]`` gets a
   ``ControlNeXtStack`` (every ControlNeXt control applied to this model, in
   order), an ``input_block_patch_after_skip``, an ``output_block_patch`` and
   an ``APPLY_MODEL`` wrapper. All three are module-level functions that do
   nothing when a call carries no stack.
3. The wrapper runs once per model call. It evaluates each control module
   once per distinct (hint row, timestep) of the batch (cond and uncond rows
   share one evaluation), with the timestep ``model_sampling.timestep(sigma)``
   the module was trained with, and puts the result into a per-call copy of
   transformer_options.
4. The patches inject at each variant's trained place: Cross Normalization per
   row against the UNet feature, pooled, scaled by the variant's strength rule,
   masked, combined with the other ControlNeXt controls of that place (add^com
   by default, or a plain sum) and added to the feature.

Nothing is written into ComfyUI's modules and nothing outlives a model call,
so a graph without these nodes runs exactly as before.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import re
from pathlib import Path
from typing import Callable

import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.utils

from .balance import add_com
from .controlnext_arch import (
    CONFIG_320,
    CONFIG_320_SVD,
    CONFIG_SD15,
    CONFIG_SVD_V1,
    ControlNeXtModule,
    ModuleConfig,
    cross_normalize,
)
from .inputs import check_image, check_percent_range
from .unet_patches import prepend_model_patch

log = logging.getLogger(__name__)

FOLDER_NAME = "controlnext"
STACK_KEY = "balanced_control_controlnext"
CALL_KEY = "balanced_control_controlnext_call"
WRAPPER_KEY = "balanced_control_controlnext"
COMBINE_MODES = ("add_com", "sum")
UNCOND_MODES = ("variant default", "apply", "zero")
SAFE_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


# --------------------------------------------------------------------------
# variants
# --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Variant:
    key: str
    title: str
    family: str  # the base-model family it was trained on
    layout: str  # which state-dict layout the control file has
    module_config: ModuleConfig
    # "conv_in": after input block 0, after its skip is stored;
    # "level0": after the first level's downsample, after its skip;
    # "last_input": after the last input block (just before the middle block);
    # "middle": on the middle-block output.
    injection: str
    eps: float
    normalize_before_pool: bool
    fixed_scale: float
    scale_rule: str  # "none", "learned" (scale), "sigmoid" (sigmoid(scale)·1.3)
    zero_uncond: bool
    unet_patch: str | None  # "diff", "set" or None (no UNet subset)


VARIANTS = {
    v.key: v
    for v in (
        Variant("sdxl", "SDXL", "SDXL", "320", CONFIG_320, "conv_in", 1e-12, True, 1.0, "none", False, "diff"),
        Variant("sd15_training", "SD1.5 (training code)", "SD1.5", "320", CONFIG_320, "level0", 1e-12, False,
                1.0, "none", False, "set"),
        Variant("svd_v2", "SVD v2", "SVD", "320", CONFIG_320_SVD, "level0", 1e-5, True, 0.2, "none", True, None),
        Variant("sd15", "SD1.5 (released module)", "SD1.5", "sd15", CONFIG_SD15, "middle", 1e-12, False, 1.0,
                "learned", False, "set"),
        Variant("svd_v1", "SVD v1", "SVD", "svd_v1", CONFIG_SVD_V1, "last_input", 1e-5, True, 1.0, "sigmoid",
                True, None),
    )
}

LAYOUT_DESCRIPTIONS = {
    "320": "52 tensors with embedding.*, mid_convs.1.weight [320, 256, 1, 1], no 'scale' "
           "(SDXL, SD1.5-Training or SVD-v2, told apart by the model it is applied to)",
    "sd15": "51 tensors with 'scale', no embedding.*, down_res.0.conv1.weight [128, 3, 3, 3], "
            "mid_convs.1.weight [1280, 256, 1, 1] (SD1.5 released module)",
    "svd_v1": "65 tensors with 'scale', embedding.* and down_res.2.*, mid_convs.1.weight [1280, 256, 1, 1] (SVD v1)",
}
_LAYOUT_CONFIG = {"320": CONFIG_320, "sd15": CONFIG_SD15, "svd_v1": CONFIG_SVD_V1}


def expected_shapes(config: ModuleConfig) -> dict[str, tuple[int, ...]]:
    """The official state-dict keys and shapes of a module layout."""
    with torch.device("meta"):
        module = ControlNeXtModule(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


_EXPECTED = {layout: expected_shapes(cfg) for layout, cfg in _LAYOUT_CONFIG.items()}


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, or of a .bin/.pth/.pt/.ckpt pickle read with
    ``torch.load(weights_only=True)`` (no code in the file is ever executed)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        import safetensors.torch

        sd = safetensors.torch.load_file(str(path), device="cpu")
    elif suffix in SAFE_PICKLE_SUFFIXES:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler refuses anything but tensors and containers
            raise ValueError(
                f"{path.name}: could not be read as a weights-only PyTorch file ({type(e).__name__}: {e}). "
                f"Files that need code execution to unpickle are refused; convert the file to .safetensors "
                f"with a trusted tool."
            ) from None
    else:
        raise ValueError(f"{path.name}: unsupported file type {suffix!r}; expected .safetensors, "
                         f"or {', '.join(SAFE_PICKLE_SUFFIXES)} (read without code execution).")
    # Training checkpoints sometimes nest the weights.
    for nest in ("state_dict", "module", "model"):
        if isinstance(sd, dict) and nest in sd and isinstance(sd[nest], dict) and len(sd) <= 3:
            sd = sd[nest]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path.name}: expected a mapping of tensor names to tensors, got {type(sd).__name__}.")
    return dict(sd)


def _strip_common_prefix(sd: dict, prefixes=("controlnext.", "controlnet.", "module.")) -> dict:
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def _describe_found(sd: dict) -> str:
    keys = list(sd)
    hints = []
    if any("zero_convs" in k or k.startswith("controlnet_cond_embedding") or "input_hint_block" in k for k in keys):
        hints.append("this looks like a ControlNet (load it with the ControlNet loader instead)")
    if any("lora" in k.lower() for k in keys):
        hints.append("this looks like a LoRA (load it with a LoRA loader instead)")
    if any(k.startswith(("input_blocks.", "model.diffusion_model.", "down_blocks.", "diffusion_model.")) for k in keys) \
            and not hints:
        hints.append("this looks like UNet weights (pass it as unet_file, not control_file)")
    svd_v1_no_scale = set(_EXPECTED["svd_v1"]) - {"scale"}
    if set(keys) == svd_v1_no_scale:
        hints.append("this is the SDXL ControlNeXt module released before 2024-08-10 (superseded by the "
                     "320-channel module; its injection details were not published, so it is not supported)")
    sample = ", ".join(f"{k} {list(sd[k].shape)}" for k in keys[:6])
    text = f"{len(keys)} tensors ({sample}{', ...' if len(keys) > 6 else ''})"
    if hints:
        text += "; " + "; ".join(hints)
    return text


def detect_layout(sd: dict, name: str = "control_file") -> str:
    """Which control-module layout ``sd`` holds; raises listing the expected
    layouts and what was found when it is none of them."""
    for layout, shapes in _EXPECTED.items():
        if set(sd) == set(shapes) and all(tuple(sd[k].shape) == s for k, s in shapes.items()):
            return layout
    # A near match gets a precise message (missing / unexpected / wrong shape).
    best = max(_EXPECTED, key=lambda lay: len(set(sd) & set(_EXPECTED[lay])))
    shapes = _EXPECTED[best]
    detail = ""
    if len(set(sd) & set(shapes)) >= len(shapes) // 2:
        missing = sorted(set(shapes) - set(sd))
        extra = sorted(set(sd) - set(shapes))
        wrong = [f"{k} {list(sd[k].shape)} (expected {list(shapes[k])})" for k in shapes
                 if k in sd and tuple(sd[k].shape) != shapes[k]]
        parts = []
        if missing:
            parts.append(f"missing {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if extra:
            parts.append(f"unexpected {extra[:5]}{' ...' if len(extra) > 5 else ''}")
        if wrong:
            parts.append(f"wrong shapes {wrong[:3]}")
        detail = f" Closest layout: {LAYOUT_DESCRIPTIONS[best].split(' (')[0]}; " + "; ".join(parts) + "."
    expected = "\n".join(f"  - {d}" for d in LAYOUT_DESCRIPTIONS.values())
    raise ValueError(
        f"{name} is not a ControlNeXt control module of any known variant.\nExpected one of:\n{expected}\n"
        f"Found: {_describe_found(sd)}.{detail}\n"
        f"Put an official ControlNeXt controlnet/controlnext file into models/{FOLDER_NAME}."
    )


class ControlNeXtWeights:
    """What ``ControlNeXtLoader`` outputs (type CONTROLNEXT): the control
    module's tensors with their layout, and optionally the UNet subset.

    The variant is resolved when the weights are applied to a model, because
    the SDXL, SD1.5-Training and SVD-v2 modules have identical keys."""

    def __init__(self, control_sd: dict, name: str = "control_file", unet_sd: dict | None = None,
                 unet_name: str | None = None):
        control_sd = _strip_common_prefix(control_sd)
        self.layout = detect_layout(control_sd, name)
        self.name = name
        self.source_dtype = next(iter(control_sd.values())).dtype
        # The module is tiny; it runs in fp32 like the official pipelines run it.
        self.control_sd = {k: v.to(torch.float32) for k, v in control_sd.items()}
        self.unet_sd = unet_sd
        self.unet_name = unet_name
        self._modules: dict[tuple, ControlNeXtModule] = {}

    @classmethod
    def from_files(cls, control_path, unet_path=None, progress: Callable[[], None] | None = None):
        control_path = Path(control_path)
        sd = load_state_dict_file(control_path)
        if progress:
            progress()
        unet_sd = None
        if unet_path is not None:
            unet_sd = load_state_dict_file(unet_path)
            if not unet_sd:
                raise ValueError(f"{Path(unet_path).name}: the UNet file holds no tensors.")
        if progress:
            progress()
        return cls(sd, control_path.name, unet_sd, Path(unet_path).name if unet_path else None)

    @property
    def candidates(self) -> list[Variant]:
        return [v for v in VARIANTS.values() if v.layout == self.layout]

    def module(self, variant: Variant, device: torch.device) -> ControlNeXtModule:
        """The module for ``variant`` on ``device`` (built once per device)."""
        key = (variant.module_config.name, str(device))
        m = self._modules.get(key)
        if m is None:
            m = ControlNeXtModule(variant.module_config)
            m.load_state_dict(self.control_sd, strict=True)
            m.requires_grad_(False).eval()
            m = m.to(device)
            self._modules[key] = m
        return m

    def learned_scale(self) -> float | None:
        s = self.control_sd.get("scale")
        return None if s is None else float(s)

    def __repr__(self):
        return f"ControlNeXtWeights({self.name!r}, layout={self.layout}, unet={self.unet_name!r})"


# --------------------------------------------------------------------------
# model fit
# --------------------------------------------------------------------------


def model_family(model) -> str:
    """'SDXL', 'SD1.5', 'SVD' or a description of another model."""
    import comfy.supported_models as sm

    cfg = getattr(getattr(model, "model", None), "model_config", None)
    if isinstance(cfg, sm.SVD_img2vid):
        return "SVD"
    if isinstance(cfg, (sm.SDXL,)) and not isinstance(cfg, sm.SDXLRefiner):
        return "SDXL"
    if isinstance(cfg, sm.SD15):
        return "SD1.5"
    return type(cfg).__name__ if cfg is not None else type(getattr(model, "model", model)).__name__


def injection_channels(variant: Variant, unet_config: dict) -> int:
    mc = unet_config["model_channels"]
    mult = unet_config["channel_mult"]
    if variant.injection == "conv_in":
        return mc
    if variant.injection == "level0":
        return mc * mult[0]
    return mc * mult[-1]


def resolve_variant(weights: ControlNeXtWeights, model) -> Variant:
    """The variant of ``weights`` that fits ``model``; raises naming both when none does."""
    family = model_family(model)
    for v in weights.candidates:
        if v.family == family:
            unet_config = model.model.model_config.unet_config
            channels = injection_channels(v, unet_config)
            if channels != v.module_config.final_channels:
                raise ValueError(
                    f"ControlNeXt: the {v.title} module outputs {v.module_config.final_channels} channels, but "
                    f"this {family} model has {channels} channels where it injects ({v.injection}). The model's "
                    f"UNet is not the architecture the module was trained for; use the base model it was "
                    f"trained for.")
            return v
    fits = ", ".join(f"{v.title} -> {v.family} models" for v in weights.candidates)
    raise ValueError(
        f"ControlNeXt: {weights.name} ({LAYOUT_DESCRIPTIONS[weights.layout].split(' (')[0]}) does not fit this "
        f"model. The module fits: {fits}; the model is {family}. Apply it to a model of its family, or load "
        f"the ControlNeXt file made for {family}.")


# --------------------------------------------------------------------------
# UNet weight patches
# --------------------------------------------------------------------------

_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


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


def unet_weight_patches(unet_sd: dict, variant: Variant, model, name: str = "unet_file") -> tuple[dict, str]:
    """ModelPatcher patches for the released UNet subset; returns (patches, kind).

    Diffusers names go through ``comfy.utils.unet_to_diffusers``; ComfyUI (SGM)
    names are taken as they are. Raises when a tensor has no place in the
    model, or a shape differs: ComfyUI would ignore or only log those.
    """
    if variant.unet_patch is None:
        raise ValueError(
            f"ControlNeXt {variant.title}: {name} was given, but the released {variant.title} UNet is a full "
            f"model. Load it with the core 'Load Diffusion Model' (UNETLoader) node and leave unet_file empty.")
    kind = variant.unet_patch
    if kind == "set" and re.search(r"increa|delta|diff", name, re.IGNORECASE):
        # SD1.5 training with --save_load_weights_increaments writes ΔW files.
        kind = "diff"
    unet_config = model.model.model_config.unet_config
    to_comfy = comfy.utils.unet_to_diffusers(unet_config)
    model_sd = model.model.state_dict()
    family = model_family(model)
    patches, unplaced, wrong = {}, [], []
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
        patches[target] = (v,) if kind == "diff" else ("set", (v,))
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
    return patches, kind


def add_unet_patches(model_patcher, patches: dict, name: str) -> list[str]:
    applied = model_patcher.add_patches(patches, 1.0, 1.0)
    missing = set(patches) - set(applied)
    if missing:  # add_patches ignores unknown keys silently
        raise ValueError(f"ControlNeXt: {len(missing)} UNet weights of {name} did not land on the model "
                         f"(e.g. {sorted(missing)[:3]}).")
    return applied


# --------------------------------------------------------------------------
# controls and the per-call injection
# --------------------------------------------------------------------------


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
        self.mask = None if mask is None else (mask.unsqueeze(0) if mask.ndim == 2 else mask).to(torch.float32)
        self.zero_uncond = variant.zero_uncond if uncond == "variant default" else uncond == "zero"
        self.label = label
        self._hint_cache: tuple | None = None
        self._mask_cache: tuple | None = None

    @functools.cached_property
    def effective_scale(self) -> float:
        """strength × the variant's trained output scale."""
        s = self.strength * self.variant.fixed_scale
        learned = self.weights.learned_scale()
        if self.variant.scale_rule == "learned":
            s *= learned
        elif self.variant.scale_rule == "sigmoid":
            s *= float(torch.sigmoid(torch.tensor(learned))) * 1.3
        return s

    def sigma_range(self, model_sampling) -> tuple[float, float]:
        start, end = self.percent_range
        return float(model_sampling.percent_to_sigma(start)), float(model_sampling.percent_to_sigma(end))

    def hint_at(self, height: int, width: int, device) -> torch.Tensor:
        """The control image at pixel size (height, width), like core resizes hints (centre crop)."""
        key = (height, width, str(device))
        if self._hint_cache is None or self._hint_cache[0] != key:
            h = self.hint
            if h.shape[-2:] != (height, width):
                h = comfy.utils.common_upscale(h, width, height, "bilinear", "center")
            self._hint_cache = (key, h.to(device))
        return self._hint_cache[1]

    def mask_at(self, height: int, width: int, device) -> torch.Tensor:
        """The mask as (B, 1, height, width) on ``device``, resized like the hint."""
        key = (height, width, str(device))
        if self._mask_cache is None or self._mask_cache[0] != key:
            m = self.mask.to(device).unsqueeze(1)
            self._mask_cache = (key, comfy.utils.common_upscale(m, width, height, "bilinear", "center"))
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


def _hint_rows(n_rows: int, n_chunks: int, n_images: int) -> torch.Tensor:
    """Which image feeds each row: rows of every cond/uncond chunk take the
    images in order, cycling when the chunk is longer (core's broadcast)."""
    per = n_rows // n_chunks if n_rows % n_chunks == 0 else n_rows
    return (torch.arange(n_rows) % per) % n_images


@dataclasses.dataclass
class _Prepared:
    control: ControlNeXtControl
    features: torch.Tensor  # (U, C, h, w): one module output per distinct (hint, timestep)
    row_feature: torch.Tensor  # (N,) index into features per row
    row_scale: torch.Tensor  # (N,) fp32: strength rule, range, uncond
    row_hint: torch.Tensor  # (N,) image index, for masks


class ControlNeXtCall:
    """The module outputs of one model call, and the injection of them."""

    def __init__(self, combine: str, injection_blocks: dict):
        self.combine = combine
        self.injection_blocks = injection_blocks  # injection name -> input block id
        self.points: dict[str, list[_Prepared]] = {}
        self.module_evaluations = 0  # rows the modules ran on (for tests and benchmarks)

    @classmethod
    def prepare(cls, stack: ControlNeXtStack, base_model, x: torch.Tensor, sigma: torch.Tensor,
                transformer_options: dict) -> "ControlNeXtCall":
        unet = base_model.diffusion_model
        call = cls(stack.combine, injection_block_ids(unet))
        model_sampling = base_model.model_sampling
        n = x.shape[0]
        cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
        labels = _row_labels(n, cond_or_uncond).to(x.device)
        n_chunks = len(cond_or_uncond) if n % len(cond_or_uncond) == 0 else 1
        sigma = sigma.reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(n)
        timesteps = model_sampling.timestep(sigma).to(torch.float32)
        pixel_h, pixel_w = x.shape[-2] * 8, x.shape[-1] * 8
        s = sigma.to(torch.float32)
        for control in stack.controls:
            hi, lo = control.sigma_range(model_sampling)
            active = (s <= hi) & (s >= lo)
            scale = torch.full((n,), control.effective_scale, dtype=torch.float32, device=x.device)
            scale = scale * active.to(scale)
            if control.zero_uncond:
                scale = scale * (labels != 1).to(scale)
            if not bool((scale != 0).any()):
                continue
            hint = control.hint_at(pixel_h, pixel_w, x.device)
            row_hint = _hint_rows(n, n_chunks, hint.shape[0]).to(x.device)
            # One evaluation per distinct (image, timestep) among the rows that use it.
            live = torch.nonzero(scale != 0).flatten()
            pairs = torch.stack([row_hint[live].to(torch.float64), timesteps[live].to(torch.float64)], dim=1)
            unique, inverse = torch.unique(pairs, dim=0, return_inverse=True)
            module = control.weights.module(control.variant, x.device)
            with torch.no_grad():
                feats = module(hint[unique[:, 0].long()].to(module.dtype), unique[:, 1].to(torch.float32))
            call.module_evaluations += unique.shape[0]
            row_feature = torch.zeros(n, dtype=torch.long, device=x.device)
            row_feature[live] = inverse
            call.points.setdefault(control.variant.injection, []).append(
                _Prepared(control, feats, row_feature, scale, row_hint))
        return call

    def inject(self, point: str, h: torch.Tensor) -> torch.Tensor:
        prepared = self.points.get(point)
        if not prepared:
            return h
        residuals = []
        for p in prepared:
            c = p.features.index_select(0, p.row_feature)
            r = cross_normalize(h, c, p.control.variant.eps, p.control.variant.normalize_before_pool)
            r = r * p.row_scale.view(-1, *([1] * (r.ndim - 1)))
            if p.control.mask is not None:
                m = p.control.mask_at(r.shape[-2], r.shape[-1], r.device)
                r = r * m[p.row_hint % m.shape[0]]
            residuals.append(r)
        if len(residuals) == 1:
            combined = residuals[0]
        elif self.combine == "sum":
            combined = torch.stack(residuals).sum(0)
        else:
            combined = add_com(residuals)
        return h + combined.to(h.dtype)


@dataclasses.dataclass(frozen=True)
class _TrainedFeatureSource:
    """What ``ControlNeXtCall.inject`` reads of a control (variant, mask) for
    features computed by the caller."""

    variant: Variant
    mask: torch.Tensor | None = None


def training_call(unet, variant: Variant, features: torch.Tensor, strength: float = 1.0) -> ControlNeXtCall:
    """A ``ControlNeXtCall`` for module outputs computed by the caller, one per
    batch row and still attached to the autograd graph (training), injected at
    ``variant``'s place exactly as at sampling."""
    n = features.shape[0]
    call = ControlNeXtCall("sum", injection_block_ids(unet))
    rows = torch.arange(n, device=features.device)
    scale = torch.full((n,), float(strength) * variant.fixed_scale, dtype=torch.float32, device=features.device)
    call.points[variant.injection] = [_Prepared(_TrainedFeatureSource(variant), features, rows, scale, rows)]
    return call


def call_transformer_options(call: ControlNeXtCall, transformer_options: dict | None = None) -> dict:
    """transformer_options for a direct UNet call that injects ``call`` through
    the patch functions the sampler uses."""
    options = dict(transformer_options or {})
    patches = {k: list(v) for k, v in options.get("patches", {}).items()}
    patches.setdefault("input_block_patch_after_skip", []).append(input_block_patch_after_skip)
    patches.setdefault("output_block_patch", []).append(output_block_patch)
    options["patches"] = patches
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
    call = ControlNeXtCall.prepare(stack, executor.class_obj, x, sigma, transformer_options)
    # A per-call copy: the sampler's dict may be reused, and the call must end here.
    transformer_options = dict(transformer_options)
    transformer_options[CALL_KEY] = call
    if len(args) > 5:
        args[5] = transformer_options
    else:
        kwargs["transformer_options"] = transformer_options
    return executor(*args, **kwargs)


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
    if mask is not None and (not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3)):
        raise ValueError(f"{label}: expected a MASK shaped (B, H, W) or (H, W).")
    check_percent_range(start_percent, end_percent, label)
    variant = resolve_variant(weights, model)
    m = model.clone()
    if weights.unet_sd is not None:
        patches, _ = unet_weight_patches(weights.unet_sd, variant, model, weights.unet_name or "unet_file")
        add_unet_patches(m, patches, weights.unet_name or "unet_file")
    if strength == 0:
        return m
    control = ControlNeXtControl(weights, variant, image, strength, start_percent, end_percent, mask, uncond, label)
    to = m.model_options.setdefault("transformer_options", {})
    prev = to.get(STACK_KEY)
    to[STACK_KEY] = ControlNeXtStack((prev.controls if prev else ()) + (control,), combine)
    # First in the lists, where core adds its controls: before FreeU, Deep Shrink and other patches.
    prepend_model_patch(m, input_block_patch_after_skip, "input_block_patch_after_skip")
    prepend_model_patch(m, output_block_patch, "output_block_patch")
    if not m.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY):
        m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return m
