"""ControlNeXt variants, file reading and the fit of a file to a model.

A variant is one trained configuration of the official code: module layout,
injection point, Cross-Normalization order and eps, strength rule and what
the unconditional rows of a CFG batch get. Facts with upstream file:line are
in the ``Variant`` table below; the repository is github
dvlab-research/ControlNeXt (commit ab4b3ac, and d1d16da for the first SDXL
module).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from typing import Callable

import torch

from .controlnext_arch import (
    CONFIG_320,
    CONFIG_320_SVD,
    CONFIG_SD15,
    CONFIG_SDXL_EARLY,
    CONFIG_SVD_V1,
    ControlNeXtModule,
    ModuleConfig,
)
from .families import family_name

log = logging.getLogger(__name__)

FOLDER_NAME = "controlnext"
SAFE_PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
UNET_WEIGHT_MODES = ("auto", "difference", "absolute")


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
    # What "variant default" gives the unconditional rows of a CFG batch:
    # "apply" (as the cond rows), "zero", or "zero_raw_scale" (the raw learned
    # scale is zeroed before the sigmoid rule: sigmoid(0)·1.3 = 0.65).
    uncond_default: str
    unet_file: str  # "subset" (a few UNet tensors) or "full" (a whole UNet, converted from diffusers keys)


VARIANTS = {
    v.key: v
    for v in (
        # ControlNeXt-SDXL/models/unet.py L1203-1212; pipeline L1530-1544 (both halves)
        Variant("sdxl", "SDXL", "SDXL", "320", CONFIG_320, "conv_in", 1e-12, True, 1.0, "none", "apply", "subset"),
        # ControlNeXt-SD1.5-Training/models/unet.py L1236-1244
        Variant("sd15_training", "SD1.5 (training code)", "SD1.5", "320", CONFIG_320, "level0", 1e-12, False,
                1.0, "none", "apply", "subset"),
        # ControlNeXt-SVD-v2/models/unet_spatio_temporal_condition_controlnext.py L456-464 (scale · 0.2);
        # pipeline L573-580 multiplies the uncond half by 0
        Variant("svd_v2", "SVD v2", "SVD", "320", CONFIG_320_SVD, "level0", 1e-5, True, 0.2, "none", "zero", "full"),
        # ControlNeXt-SD1.5/models/unet.py L1269-1278 (learned scale, both halves)
        Variant("sd15", "SD1.5 (released module)", "SD1.5", "sd15", CONFIG_SD15, "middle", 1e-12, False, 1.0,
                "learned", "apply", "subset"),
        # ControlNeXt-SVD/models/unet_spatio_temporal_condition_controlnext.py L466-472 (sigmoid(scale)·1.3);
        # pipeline L576-579 zeroes the raw scale of the uncond half, so those rows get sigmoid(0)·1.3
        Variant("svd_v1", "SVD v1", "SVD", "svd_v1", CONFIG_SVD_V1, "last_input", 1e-5, True, 1.0, "sigmoid",
                "zero_raw_scale", "full"),
        # commit d1d16da, ControlNeXt-SDXL/models/unet.py L1269-1277: after the mid block, pool then
        # normalise, eps 1e-12, scale 1 (controlnet.py L437), both halves (pipeline L1259-1272)
        Variant("sdxl_early", "SDXL (first module, before 2024-08-10)", "SDXL", "sdxl_early", CONFIG_SDXL_EARLY,
                "middle", 1e-12, False, 1.0, "none", "apply", "subset"),
    )
}

LAYOUT_DESCRIPTIONS = {
    "320": "52 tensors with embedding.*, mid_convs.1.weight [320, 256, 1, 1], no 'scale' "
           "(SDXL, SD1.5-Training or SVD-v2, told apart by the model it is applied to)",
    "sd15": "51 tensors with 'scale', no embedding.*, down_res.0.conv1.weight [128, 3, 3, 3], "
            "mid_convs.1.weight [1280, 256, 1, 1] (SD1.5 released module)",
    "svd_v1": "65 tensors with 'scale', embedding.* and down_res.2.*, mid_convs.1.weight [1280, 256, 1, 1] (SVD v1)",
    "sdxl_early": "64 tensors: the SVD v1 set without 'scale' (the first SDXL module, released before 2024-08-10)",
}
_LAYOUT_CONFIG = {"320": CONFIG_320, "sd15": CONFIG_SD15, "svd_v1": CONFIG_SVD_V1, "sdxl_early": CONFIG_SDXL_EARLY}


def expected_shapes(config: ModuleConfig) -> dict[str, tuple[int, ...]]:
    """The official state-dict keys and shapes of a module layout."""
    with torch.device("meta"):
        module = ControlNeXtModule(config)
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


_EXPECTED = {layout: expected_shapes(cfg) for layout, cfg in _LAYOUT_CONFIG.items()}


# --------------------------------------------------------------------------
# files
# --------------------------------------------------------------------------


def _damaged(path: Path, e: Exception) -> ValueError:
    size = path.stat().st_size if path.exists() else 0
    return ValueError(
        f"{path.name} ({path}) is damaged or incomplete: it could not be read ({type(e).__name__}: {e}); "
        f"the file has {size:,} bytes. This usually means an interrupted download or copy. Download the file "
        f"again (compare its size with the one on the download page) and replace it.")


def read_safetensors_metadata(path: str | Path) -> dict:
    """The ``__metadata__`` of a .safetensors file ({} when it has none)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > 100_000_000:
                raise ValueError(f"header length {n} is impossible")
            header = json.loads(f.read(n))
    except (OSError, ValueError) as e:
        raise _damaged(path, e) from None
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def load_state_dict_file(path: str | Path, metadata: bool = False):
    """Tensors of a .safetensors file, or of a .bin/.pth/.pt/.ckpt pickle read with
    ``torch.load(weights_only=True)`` (no code in the file is ever executed).
    With ``metadata=True`` returns (tensors, safetensors metadata or {})."""
    path = Path(path)
    suffix = path.suffix.lower()
    meta = {}
    if suffix == ".safetensors":
        import safetensors.torch

        meta = read_safetensors_metadata(path)
        try:
            sd = safetensors.torch.load_file(str(path), device="cpu")
        except Exception as e:  # truncated data, header that does not cover the file, ...
            raise _damaged(path, e) from None
    elif suffix in SAFE_PICKLE_SUFFIXES:
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            if isinstance(e, (EOFError, RuntimeError)) and "weights_only" not in str(e).lower() \
                    and "unpickl" not in str(e).lower():
                raise _damaged(path, e) from None
            raise ValueError(
                f"{path.name}: could not be read as a weights-only PyTorch file ({type(e).__name__}: {e}). "
                f"Files that need code execution to unpickle are refused; convert the file to .safetensors "
                f"with a trusted tool. If the file was downloaded, it may also be incomplete: download it again."
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
    return (dict(sd), meta) if metadata else dict(sd)


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
    best = max(_EXPECTED, key=lambda lay: (len(set(sd) & set(_EXPECTED[lay])), -len(_EXPECTED[lay])))
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


def unet_mode_from_metadata(meta: dict) -> str | None:
    """'difference' or 'absolute' when the file is one of this project's exports
    (``training/controlnext_trainer.py`` writes ``format: ControlNeXt UNet subset, delta|absolute``)."""
    fmt = (meta or {}).get("format", "")
    if fmt.startswith("ControlNeXt UNet subset"):
        if fmt.endswith("delta"):
            return "difference"
        if fmt.endswith("absolute"):
            return "absolute"
    return None


class ControlNeXtWeights:
    """What ``ControlNeXtLoader`` outputs (type CONTROLNEXT): the control
    module's tensors with their layout, and optionally the UNet weights
    (a subset, or for SVD a full UNet) with how they are to be applied.

    The variant is resolved when the weights are applied to a model, because
    the SDXL, SD1.5-Training and SVD-v2 modules have identical keys."""

    def __init__(self, control_sd: dict, name: str = "control_file", unet_sd: dict | None = None,
                 unet_name: str | None = None, unet_weights: str = "auto", control_metadata: dict | None = None,
                 unet_metadata: dict | None = None):
        if unet_weights not in UNET_WEIGHT_MODES:
            raise ValueError(f"unet_weights must be one of {UNET_WEIGHT_MODES}, got {unet_weights!r}")
        control_sd = _strip_common_prefix(control_sd)
        self.layout = detect_layout(control_sd, name)
        self.name = name
        self.source_dtype = next(iter(control_sd.values())).dtype
        # The module is tiny; it runs in fp32 like the official pipelines run it.
        self.control_sd = {k: v.to(torch.float32) for k, v in control_sd.items()}
        self.control_metadata = dict(control_metadata or {})
        self.unet_sd = unet_sd
        self.unet_name = unet_name
        self.unet_weights = unet_weights
        self.unet_metadata = dict(unet_metadata or {})
        self._modules: dict[tuple, ControlNeXtModule] = {}

    @classmethod
    def from_files(cls, control_path, unet_path=None, progress: Callable[[], None] | None = None,
                   unet_weights: str = "auto"):
        control_path = Path(control_path)
        sd, meta = load_state_dict_file(control_path, metadata=True)
        if progress:
            progress()
        unet_sd, unet_meta = None, {}
        if unet_path is not None:
            unet_sd, unet_meta = load_state_dict_file(unet_path, metadata=True)
            if not unet_sd:
                raise ValueError(f"{Path(unet_path).name}: the UNet file holds no tensors.")
        if progress:
            progress()
        return cls(sd, control_path.name, unet_sd, Path(unet_path).name if unet_path else None, unet_weights,
                   meta, unet_meta)

    @property
    def candidates(self) -> list[Variant]:
        return [v for v in VARIANTS.values() if v.layout == self.layout]

    def build_module(self, variant: Variant) -> ControlNeXtModule:
        """A new module for ``variant`` with these weights, on the CPU, frozen."""
        m = ControlNeXtModule(variant.module_config)
        m.load_state_dict(self.control_sd, strict=True)
        return m.requires_grad_(False).eval()

    def module(self, variant: Variant, device: torch.device) -> ControlNeXtModule:
        """The module for ``variant`` on ``device`` (built once per device), outside ComfyUI's
        model management: sampling uses the managed one (``controlnext_memory``)."""
        key = (variant.module_config.name, str(device))
        m = self._modules.get(key)
        if m is None:
            m = self.build_module(variant).to(device)
            self._modules[key] = m
        return m

    def learned_scale(self) -> float | None:
        s = self.control_sd.get("scale")
        return None if s is None else float(s)

    def trained_strength(self, variant: Variant) -> float:
        """The strength an SD1.5-Training export of this project was trained with
        (metadata ``strength``, ``--strength`` of ``python -m training controlnext``):
        the official SD1.5-Training ``controlnext_scale`` is not saved in the file
        (reference §10), ours is, and it is the default scale. 1 otherwise."""
        meta = self.control_metadata
        if variant.key == "sd15_training" and meta.get("variant") == "sd15_training" and "strength" in meta:
            try:
                return float(meta["strength"])
            except ValueError:
                raise ValueError(f"{self.name}: metadata strength {meta['strength']!r} is not a number; "
                                 f"re-export the file with python -m training controlnext.") from None
        return 1.0

    def __repr__(self):
        return f"ControlNeXtWeights({self.name!r}, layout={self.layout}, unet={self.unet_name!r})"


# --------------------------------------------------------------------------
# model fit
# --------------------------------------------------------------------------


def model_family(model) -> str:
    """'SDXL', 'SD1.5', 'SVD' or another family's (or model config's) name (families.py)."""
    return family_name(model)


def base_weight(model_patcher, key: str, model_sd: dict) -> torch.Tensor:
    """The model's own weight at ``key``, without any patch currently applied
    (a loaded model holds patched weights, the originals are in its backup)."""
    bk = getattr(model_patcher, "backup", {}).get(key)
    return bk.weight if bk is not None else model_sd[key]


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
