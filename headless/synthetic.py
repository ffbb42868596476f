"""Randomly initialised checkpoints in the official formats.

No model weights can be downloaded on the machines this project is tested on,
so the demo and the tests build SD1.5 checkpoints (UNet + CLIP-L + VAE, the
single-file layout of the original release) and ControlNets (ControlNet v1.1
ldm layout) with ComfyUI's own model classes and random weights. They load
through ComfyUI's real loaders exactly like downloaded files; their images are
noise, which is what a random network draws.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from .runtime import import_comfy

# SD1.5 as comfy.model_detection describes the released checkpoint.
SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
    "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
    "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
    "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The SD1.5 family's detection keys (model_channels 320, context 768) with two
# levels and one res-block each: ComfyUI's loaders see an SD1.5 checkpoint,
# but a sampling step costs a small fraction of the full model's.
SD15_UNET_SMALL = dict(
    SD15_UNET, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
)

# A tiny SD1.5-style UNet for in-process tests (4 input blocks, ~4 M parameters).
TINY_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 64,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 1], "channel_mult": [1, 2],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 64,
    "transformer_depth_output": [1, 1, 1, 1], "use_temporal_attention": False, "use_temporal_resblock": False,
}

# The same, with SD1.5's text-context width, so it reads as SD1.5-family.
TINY_SD15_UNET = dict(TINY_UNET, context_dim=768)

# SDXL (base 1.0) as comfy.model_detection describes the released checkpoint (2.57 B parameters).
SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
    "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# A tiny SDXL-shaped UNet (9 input blocks, context 2048, class embedding 2816).
TINY_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
    "model_channels": 64, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 0, 0, 1, 1],
    "channel_mult": [1, 2, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
    "context_dim": 2048, "transformer_depth_output": [0, 0, 0, 0, 0, 0, 1, 1, 1],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@torch.no_grad()
def init_weights_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter deterministically. ComfyUI builds layers without
    initialisation (their memory may hold NaN), so everything is written here:
    norms to identity, biases to zero, weights ~ N(0, gain/fan_in)."""
    g = torch.Generator().manual_seed(seed)
    done = set()
    for sub in module.modules():
        if isinstance(sub, (torch.nn.GroupNorm, torch.nn.LayerNorm)):
            if sub.weight is not None:
                sub.weight.fill_(1.0)
                done.add(id(sub.weight))
            if sub.bias is not None:
                sub.bias.zero_()
                done.add(id(sub.bias))
        elif isinstance(sub, (torch.nn.Linear, torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
            fan_in = sub.weight[0].numel()
            w = torch.randn(sub.weight.shape, generator=g) * (gain / math.sqrt(fan_in))
            sub.weight.copy_(w)
            done.add(id(sub.weight))
            if sub.bias is not None:
                sub.bias.zero_()
                done.add(id(sub.bias))
    for p in module.parameters():
        if id(p) not in done:
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return module


def _half(sd: dict, dtype) -> dict:
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def build_unet_model(unet_config: dict, seed: int = 0):
    """A ComfyUI SD1.5-family BaseModel with random weights."""
    import_comfy()
    import comfy.supported_models

    model = comfy.supported_models.SD15(copy.deepcopy(unet_config)).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    return model


def build_sdxl_unet_model(unet_config: dict = TINY_SDXL_UNET, seed: int = 0):
    import_comfy()
    import comfy.supported_models

    model = comfy.supported_models.SDXL(copy.deepcopy(unet_config)).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    return model


def unet_state_dict(unet_config: dict, seed: int = 0) -> dict:
    model = build_unet_model(unet_config, seed)
    return {f"model.diffusion_model.{k}": v for k, v in model.diffusion_model.state_dict().items()}


def clip_l_state_dict(seed: int = 1) -> dict:
    import_comfy()
    import comfy.ops
    import comfy.sd1_clip

    clip = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32,
                                      model_options={"custom_operations": comfy.ops.disable_weight_init})
    init_weights_(clip.transformer, seed)
    sd = clip.transformer.state_dict()
    return {f"cond_stage_model.transformer.{k}": v for k, v in sd.items() if "position_ids" not in k}


def vae_state_dict(seed: int = 2) -> dict:
    import_comfy()
    import comfy.ldm.models.autoencoder

    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE), embed_dim=4)
    # A small gain keeps activations tame through the deep random decoder.
    init_weights_(vae, seed, gain=0.8)
    return {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}


def controlnet_state_dict(unet_config: dict, seed: int = 3, hint_channels: int = 3, residual_gain: float = 1.0) -> dict:
    """A ControlNet v1.1 (ldm) state dict for a UNet of ``unet_config``: the keys
    ComfyUI's ControlNetLoader reads (``zero_convs.*``, ``input_hint_block.*``,
    ``input_blocks.*``, ``middle_block.*``, ``middle_block_out.*``). The zero
    convolutions get random weights so that the residuals are not zero."""
    import_comfy()
    import comfy.cldm.cldm
    import comfy.ops

    cfg = {k: v for k, v in unet_config.items() if k not in ("out_channels", "transformer_depth_output")}
    cfg.setdefault("num_heads", -1)
    if cfg.get("num_heads", -1) == -1:
        cfg["num_head_channels"] = 64
    cnet = comfy.cldm.cldm.ControlNet(hint_channels=hint_channels, operations=comfy.ops.disable_weight_init,
                                      device="cpu", **cfg)
    init_weights_(cnet, seed)
    with torch.no_grad():
        for zc in list(cnet.zero_convs) + [cnet.middle_block_out]:
            for p in zc.parameters():
                if p.ndim > 1:
                    p.mul_(residual_gain)
    return cnet.state_dict()


def save(sd: dict, path: Path, dtype=torch.float16) -> Path:
    import safetensors.torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    safetensors.torch.save_file(_half(sd, dtype), str(tmp))
    tmp.replace(path)
    return path


def write_sd15_checkpoint(path: Path, unet_config: dict = SD15_UNET, seed: int = 0, dtype=torch.float16) -> Path:
    """A single-file SD1.5 checkpoint (model.diffusion_model / cond_stage_model / first_stage_model)."""
    sd = unet_state_dict(unet_config, seed)
    sd.update(clip_l_state_dict(seed + 1))
    sd.update(vae_state_dict(seed + 2))
    return save(sd, path, dtype)


def write_controlnet(path: Path, unet_config: dict = SD15_UNET, seed: int = 3, dtype=torch.float16) -> Path:
    return save(controlnet_state_dict(unet_config, seed), path, dtype)
