"""Models for training, built and loaded with ComfyUI's own code.

* The base model comes from the user's single-file checkpoint through
  ``comfy.sd.load_state_dict_guess_config`` (the loader CheckpointLoaderSimple
  uses), so the UNet, text encoder, VAE and noise schedule are exactly the ones
  that sample.
* The ControlNet is ComfyUI's ``comfy.cldm.cldm.ControlNet`` built with the
  UNet's config, so its state dict is the ControlNet v1.1 (ldm) layout that
  ComfyUI's ControlNetLoader reads with no conversion.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from model_patches.families import BY_NAME

log = logging.getLogger(__name__)

# ComfyUI model-config class name -> family name used in messages and options (the family
# table, model_patches/families.py; exactly these classes, not their subclasses such as SSD-1B).
SUPPORTED_FAMILIES = {cls: fam.name for fam in (BY_NAME["SD1.5"], BY_NAME["SDXL"]) for cls in fam.config_classes}


class WrongFamilyError(ValueError):
    """The base checkpoint (or ControlNet) is not of a family this trainer supports."""


@dataclass
class BaseModel:
    """The frozen parts of the user's checkpoint."""

    family: str                # "SD1.5" or "SDXL"
    model: Any                 # comfy.model_base.BaseModel (UNet in .diffusion_model, schedule in .model_sampling)
    patcher: Any               # comfy.model_patcher.ModelPatcher of ``model`` (for ComfyUI's sampler)
    clip: Any                  # comfy.sd.CLIP
    vae: Any                   # comfy.sd.VAE
    unet_config: dict

    @property
    def unet(self) -> torch.nn.Module:
        return self.model.diffusion_model


def detect_family(state_dict: dict, source: str) -> tuple[str, Any]:
    """(family, ComfyUI model config) of a checkpoint's UNet, or a clear error."""
    import comfy.model_detection

    prefix = comfy.model_detection.unet_prefix_from_state_dict(state_dict)
    config = comfy.model_detection.model_config_from_unet(state_dict, prefix)
    if config is None:
        raise WrongFamilyError(
            f"{source}: no diffusion-model weights that ComfyUI recognises were found (looked under "
            f"'{prefix}'). Expected a single-file SD1.5 or SDXL checkpoint (UNet + text encoder + VAE, "
            f"as loaded by ComfyUI's Load Checkpoint node)."
        )
    name = type(config).__name__
    if name not in SUPPORTED_FAMILIES:
        raise WrongFamilyError(
            f"{source}: this is a {name} checkpoint, but training supports SD1.5 and SDXL base models "
            f"(ComfyUI model types {', '.join(SUPPORTED_FAMILIES)}). Use an SD1.5- or SDXL-family checkpoint."
        )
    return SUPPORTED_FAMILIES[name], config


def load_base_model(path: str | Path, expected_family: str | None = None,
                    dtype: torch.dtype | None = None, text_encoder_dtype: torch.dtype | None = None,
                    vae_dtype: torch.dtype | None = None) -> BaseModel:
    """Load a single-file SD1.5/SDXL checkpoint with ComfyUI's loader.

    ``dtype``, ``text_encoder_dtype``, ``vae_dtype``: the dtypes the UNet, the
    text encoder and the VAE are stored in (``engine.network_dtypes``); None
    leaves ComfyUI's own choice for the machine (fp16 on CUDA).

    The family is checked from the UNet keys before anything large is built, so
    a wrong file fails within seconds."""
    import comfy.sd
    import comfy.utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint not found: {path}. Pass a .safetensors file with --base.")
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    family, config = detect_family(sd, str(path))
    if expected_family not in (None, "auto") and _family_key(expected_family) != _family_key(family):
        raise WrongFamilyError(
            f"{path}: expected a {expected_family} checkpoint (--family {expected_family}), found {family}. "
            f"Pass a {expected_family} checkpoint or --family auto."
        )
    # With a dtype ComfyUI stores the UNet in it and picks ops that cast
    # weights per layer where the device cannot compute in it.
    vae = None
    if vae_dtype is not None:
        # ComfyUI's loader takes no VAE dtype: the same VAE state dict it builds, given to comfy.sd.VAE with one.
        vae_sd = comfy.utils.state_dict_prefix_replace(sd, {k: "" for k in config.vae_key_prefix}, filter_keys=True)
        vae = comfy.sd.VAE(sd=config.process_vae_state_dict(vae_sd), dtype=vae_dtype, metadata=metadata)
    patcher, clip, loaded_vae, _ = comfy.sd.load_state_dict_guess_config(
        sd, output_vae=vae is None, output_clip=True, metadata=metadata,
        model_options={"dtype": dtype} if dtype is not None else {},
        te_model_options={"dtype": text_encoder_dtype} if text_encoder_dtype is not None else {})
    vae = vae or loaded_vae
    if clip is None or vae is None:
        raise ValueError(f"{path}: the checkpoint has no text encoder or VAE; training needs a full "
                         f"single-file checkpoint (UNet, text encoder and VAE).")
    model = patcher.model
    import comfy.model_base
    if model.model_type != comfy.model_base.ModelType.EPS:
        raise ValueError(f"{path}: {model.model_type.name} prediction is not supported; training supports "
                         f"epsilon-prediction SD1.5/SDXL checkpoints.")
    model.diffusion_model.requires_grad_(False)
    model.diffusion_model.eval()
    return BaseModel(family, model, patcher, clip, vae, copy.deepcopy(config.unet_config))


def _family_key(name: str) -> str:
    return name.lower().replace(".", "").replace("-", "")


# --------------------------------------------------------------------------
# ControlNet
# --------------------------------------------------------------------------

def controlnet_config(unet_config: dict) -> dict:
    """The cldm ControlNet kwargs for a UNet config (as ComfyUI's loader derives them)."""
    cfg = {k: v for k, v in copy.deepcopy(unet_config).items()
           if k not in ("out_channels", "transformer_depth_output", "dtype")}  # the ControlNet is fp32
    return cfg


_TRAINABLE_CONTROLNET = None


def trainable_controlnet_class():
    """ComfyUI's cldm ControlNet whose forward hands ``transformer_options`` to
    its blocks, like ComfyUI's UNet does (core's ControlNet forward passes
    none). Training needs it to pick a differentiable attention through
    ComfyUI's ``optimized_attention_override`` hook. The modules, and so the
    saved keys, are exactly cldm's. Union ControlNets are not trained here."""
    global _TRAINABLE_CONTROLNET
    if _TRAINABLE_CONTROLNET is None:
        import comfy.cldm.cldm
        from comfy.ldm.modules.diffusionmodules.util import timestep_embedding

        class TrainableControlNet(comfy.cldm.cldm.ControlNet):
            def forward(self, x, hint, timesteps, context, y=None, transformer_options=None, **kwargs):
                if self.control_add_embedding is not None:
                    raise ValueError("union ControlNets cannot be trained with python -m training")
                to = transformer_options or {}
                emb = self.time_embed(timestep_embedding(timesteps, self.model_channels, repeat_only=False).to(x.dtype))
                if self.num_classes is not None:
                    if y is None:
                        raise ValueError("this ControlNet needs the class embedding input y (an SDXL base)")
                    emb_h = emb + self.label_emb(y)
                else:
                    emb_h = emb
                # The hint encoder sees the time embedding without the class term, as in cldm.
                guided_hint = self.input_hint_block(hint, emb, context, transformer_options=to)
                outputs, h = [], x
                for i, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
                    h = module(h, emb_h, context, transformer_options=to)
                    if i == 0:
                        h = h + guided_hint
                    outputs.append(zero_conv(h, emb_h, context, transformer_options=to))
                h = self.middle_block(h, emb_h, context, transformer_options=to)
                return {"middle": [self.middle_block_out(h, emb_h, context, transformer_options=to)],
                        "output": outputs}

        _TRAINABLE_CONTROLNET = TrainableControlNet
    return _TRAINABLE_CONTROLNET


def build_controlnet(unet_config: dict, hint_channels: int = 3, device="cpu") -> torch.nn.Module:
    """An uninitialised fp32 ControlNet (cldm layout) for a UNet of ``unet_config``."""
    import comfy.ops

    return trainable_controlnet_class()(hint_channels=hint_channels, operations=comfy.ops.disable_weight_init,
                                        device=device, dtype=torch.float32, **controlnet_config(unet_config))


@torch.no_grad()
def controlnet_from_unet(unet: torch.nn.Module, unet_config: dict, hint_channels: int = 3,
                         seed: int = 0, device="cpu") -> torch.nn.Module:
    """ControlNet initialised as the original ControlNet does: the encoder (time
    embedding, class embedding, input blocks, middle block) copied from the UNet,
    the hint encoder freshly initialised with its last conv zero, every zero
    conv (and the middle-block output conv) zero, so the first residuals are
    exactly 0 and sampling starts from the base model's behaviour."""
    cnet = build_controlnet(unet_config, hint_channels, device)
    # ComfyUI's layers skip initialisation; give every layer PyTorch's default
    # init (deterministically), then overwrite what comes from the UNet.
    g_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    for m in cnet.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            _default_reset(m)
        elif isinstance(m, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and m.weight is not None:
            m.weight.fill_(1.0)
            m.bias.zero_()
    torch.random.set_rng_state(g_state)
    unet_sd = unet.state_dict()
    own = cnet.state_dict()
    copied = {k: v for k, v in unet_sd.items() if k in own and own[k].shape == v.shape}
    missing_encoder = [k for k in own if k.startswith(("input_blocks.", "middle_block.", "time_embed.", "label_emb."))
                       and k not in copied]
    if missing_encoder:
        raise ValueError(f"the UNet lacks {len(missing_encoder)} encoder weights the ControlNet needs "
                         f"(first: {missing_encoder[0]}); the UNet config and weights disagree.")
    cnet.load_state_dict(copied, strict=False)
    for zc in list(cnet.zero_convs) + [cnet.middle_block_out]:
        for p in zc.parameters():
            p.zero_()
    last_hint_conv = [m for m in cnet.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last_hint_conv.weight.zero_()
    last_hint_conv.bias.zero_()
    return cnet.float().to(device)


def _default_reset(m: torch.nn.Module) -> None:
    # comfy.ops layers override reset_parameters with a no-op; call torch's.
    base = torch.nn.Conv2d if isinstance(m, torch.nn.Conv2d) else torch.nn.Linear
    base.reset_parameters(m)


def controlnet_from_file(path: str | Path, base: BaseModel, device="cpu") -> torch.nn.Module:
    """Load an existing ControlNet (ControlNet v1.1 ldm or diffusers layout) as
    the starting point, e.g. to turn a ControlNet v1.1 into a MIControlNet.

    ComfyUI's own loader reads the file (any layout it supports); its weights
    are then copied into an fp32 ControlNet for training."""
    import comfy.controlnet
    import comfy.utils

    from model_patches.mi_control import describe_unet_family

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ControlNet to start from not found: {path}")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    loaded = comfy.controlnet.load_controlnet_state_dict(sd)
    inner = getattr(loaded, "control_model", None)
    if inner is None or not hasattr(inner, "zero_convs"):
        raise ValueError(f"{path}: not a UNet ControlNet (ComfyUI loaded it as {type(loaded).__name__}); "
                         f"--init-controlnet needs a ControlNet v1.1 (ldm) or diffusers ControlNet file.")
    c, m = describe_unet_family(inner), describe_unet_family(base.unet)
    if (c["input_blocks"], c["context_dim"], c["adm_in_channels"]) != (m["input_blocks"], m["context_dim"], m["adm_in_channels"]):
        raise WrongFamilyError(f"{path}: this ControlNet is {c['text']}, the base checkpoint is {m['text']}. "
                               f"Start from a ControlNet of the base model's family.")
    hint_channels = inner.input_hint_block[0].weight.shape[1]
    cnet = build_controlnet(base.unet_config, hint_channels, device)
    missing, unexpected = cnet.load_state_dict({k: v.float() for k, v in inner.state_dict().items()}, strict=False)
    if missing:
        raise ValueError(f"{path}: {len(missing)} ControlNet weights are missing (first: {missing[0]}).")
    return cnet.float().to(device)


def save_controlnet(cnet: torch.nn.Module, path: str | Path, dtype: torch.dtype = torch.float16,
                    metadata: dict | None = None) -> Path:
    """Write the ControlNet in the ControlNet v1.1 (ldm) key layout, atomically."""
    from . import engine

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to("cpu", dtype) for k, v in unwrap(cnet).state_dict().items()}
    return engine.save_tensors_atomically(sd, path, {k: str(v) for k, v in (metadata or {}).items()})


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper."""
    return getattr(module, "module", module)


# --------------------------------------------------------------------------
# gradient checkpointing
# --------------------------------------------------------------------------

def _has_tangent(args) -> bool:
    from .objectives import _has_tangent as carries_tangent

    return any(carries_tangent(a) for a in args)


def enable_gradient_checkpointing(module: torch.nn.Module) -> int:
    """Recompute the activations of every ResBlock and SpatialTransformer in the
    backward pass instead of storing them.

    ComfyUI dispatches on the layer classes inside its blocks, so the layers
    are not wrapped; their bound ``forward`` is replaced on the instance.
    Non-reentrant checkpointing is used (it supports double backward). Blocks
    that carry forward-mode tangents in stage-2 steps are not recomputed, so
    checkpointing saves memory in stage 1 and in the UNet encoder. Returns
    the number of blocks."""
    import functools

    import torch.utils.checkpoint as tuc
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import ResBlock

    count = 0
    for m in module.modules():
        if isinstance(m, (ResBlock, SpatialTransformer)) and not getattr(m, "_bc_checkpointed", False):
            inner = m.forward

            @functools.wraps(inner)
            def forward(*args, _inner=inner, **kwargs):
                # Blocks carrying a forward-mode tangent (the L_QC pass) run
                # normally: the recomputation in backward happens after the
                # dual level closed and would not see the tangents.
                if not torch.is_grad_enabled() or _has_tangent(args):
                    return _inner(*args, **kwargs)
                return tuc.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

            m.forward = forward
            m._bc_checkpointed = True
            count += 1
    return count
