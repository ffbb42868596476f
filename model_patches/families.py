"""One table of the base-model families this package names, and how each is recognised.

Every check that says "this control was made for another base" reads this
table: MIControlNet's fit check (a cldm ControlNet's UNet signature against
the model's), ControlNeXt's variant choice (which variant a model family
takes) and the DiT checks (SD3/SD3.5, Flux, Qwen-Image, HunyuanDiT).

A family is recognised on a loaded model by its ComfyUI model config class
(``comfy.supported_models``; subclasses count, e.g. SSD-1B as SDXL, so more
specific entries come first), and on a bare UNet or cldm ControlNet by its
signature: the text-context width (``attn2.to_k`` input) and the class
embedding width (``label_emb`` input, None without one).

The injection sites work per architecture (``ARCHITECTURES``): a base
diffusion module and the core ControlNet modules made for it, by class
(``architecture_of_base``, ``architecture_of_control``).
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    architecture: str  # "unet" or "dit"
    config_classes: tuple[str, ...] = ()  # comfy.supported_models class names
    unet_signature: tuple | None = None  # (context width, class-embedding width) of its UNet


FAMILIES: tuple[Family, ...] = (
    Family("SD1.5", "unet", ("SD15",), (768, None)),
    Family("SD2.x unCLIP", "unet", ("SD21UnclipL", "SD21UnclipH"), (1024, 768)),
    Family("SD2.x", "unet", ("SD20",), (1024, None)),
    Family("SDXL refiner", "unet", ("SDXLRefiner",), (1280, 2560)),
    Family("SDXL", "unet", ("SDXL",), (2048, 2816)),
    Family("SVD", "unet", ("SVD_img2vid",)),
    Family("SD3", "dit", ("SD3",)),
    Family("Flux.2", "dit", ("Flux2",)),
    Family("Flux", "dit", ("Flux",)),
    Family("Qwen-Image", "dit", ("QwenImage",)),
    Family("HunyuanDiT", "dit", ("HunyuanDiT",)),
)
BY_NAME = {f.name: f for f in FAMILIES}


@dataclasses.dataclass(frozen=True)
class Architecture:
    key: str
    title: str  # for messages
    base_modules: tuple[str, ...]  # classes of BaseModel.diffusion_model ("module.Class")
    control_modules: tuple[str, ...] = ()  # classes of core's control_model for it


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture("sd3", "SD3/SD3.5 (MMDiT)", ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT",),
                 ("comfy.cldm.mmdit.ControlNet", "comfy.cldm.dit_embedder.ControlNetEmbedder")),
    # Chroma runs Flux ControlNets through the same slots (comfy/ldm/chroma/model.py:191-259).
    Architecture("flux", "Flux", ("comfy.ldm.flux.model.Flux", "comfy.ldm.chroma.model.Chroma"),
                 ("comfy.ldm.flux.controlnet.ControlNetFlux",)),
    Architecture("qwen", "Qwen-Image", ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",),
                 ("comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel",)),
    Architecture("hunyuan", "HunyuanDiT", ("comfy.ldm.hydit.models.HunYuanDiT",),
                 ("comfy.ldm.hydit.controlnet.HunYuanControlNet",)),
    Architecture("unet", "UNet (SD1.5/SDXL)", ("comfy.ldm.modules.diffusionmodules.openaimodel.UNetModel",)),
)
ARCHITECTURE_TITLES = {a.key: a.title for a in ARCHITECTURES}


def _classes(paths: tuple[str, ...]) -> tuple[type, ...]:
    import importlib

    out = []
    for path in paths:
        module, _, name = path.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module), name, None)
        except ImportError:  # a ComfyUI without this architecture
            cls = None
        if cls is not None:
            out.append(cls)
    return tuple(out)


def architecture_of_base(diffusion_model) -> str | None:
    """The architecture key of a base diffusion model (``BaseModel.diffusion_model``), or None.

    A module compiled with ``torch.compile`` (e.g. set as an object patch) is
    judged by the module it wraps (``OptimizedModule._orig_mod``)."""
    while hasattr(diffusion_model, "_orig_mod"):
        diffusion_model = diffusion_model._orig_mod
    for arch in ARCHITECTURES:
        classes = _classes(arch.base_modules)
        if classes and isinstance(diffusion_model, classes):
            return arch.key
    return None


def architecture_of_control(control_model) -> str | None:
    """The architecture key of a core control model (a DiT ControlNet), or None."""
    for arch in ARCHITECTURES:
        classes = _classes(arch.control_modules)
        if classes and isinstance(control_model, classes):
            return arch.key
    return None


def family_of(model) -> Family | None:
    """The family of a ModelPatcher or BaseModel, by its model config class; None if not in the table."""
    import comfy.supported_models as sm

    inner = getattr(model, "model", model)
    cfg = getattr(inner, "model_config", None)
    if cfg is None:
        return None
    for fam in FAMILIES:
        classes = tuple(c for c in (getattr(sm, n, None) for n in fam.config_classes) if c is not None)
        if classes and isinstance(cfg, classes):
            return fam
    return None


def family_name(model) -> str:
    """The family's name, or the model config's (or model's) class name when it is not in the table."""
    fam = family_of(model)
    if fam is not None:
        return fam.name
    inner = getattr(model, "model", model)
    cfg = getattr(inner, "model_config", None)
    return type(cfg).__name__ if cfg is not None else type(inner).__name__


def family_of_signature(context_dim: int | None, adm_in_channels: int | None) -> Family | None:
    """The UNet family with this (text context width, class-embedding width), if one."""
    for fam in FAMILIES:
        if fam.unet_signature == (context_dim, adm_in_channels):
            return fam
    return None


def describe_unet(module: torch.nn.Module) -> dict:
    """Summarise a ComfyUI UNet or cldm ControlNet: input blocks, text context
    width, class-embedding width, and the family name when the table knows it.
    (The block count is compared separately by callers: it varies between a
    family's full and small variants.)"""
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
    fam = family_of_signature(context, adm)
    family = fam.name if fam else None
    text = f"{n_input} input blocks, text context {context}, class embedding {adm or 'none'}"
    return {"input_blocks": n_input, "context_dim": context, "adm_in_channels": adm,
            "family": family, "text": (f"{family}-family ({text})" if family else text)}
