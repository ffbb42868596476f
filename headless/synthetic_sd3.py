"""Small randomly initialised SD3 files in the released formats.

* A single-file SD3 checkpoint (``model.diffusion_model.*`` MMDiT,
  ``text_encoders.clip_l.*``, ``first_stage_model.*`` 16-channel VAE) that
  ComfyUI's CheckpointLoaderSimple detects as SD3. The MMDiT is narrow
  (width 64·depth, as ComfyUI derives it) and shallow; the text encoder is
  CLIP-L only (ComfyUI's SD3 text model fills the missing CLIP-G/T5 parts
  with zeros).
* SD3 ControlNets in the diffusers ``SD3ControlNetModel`` key layout, of any
  depth, with the 17-channel inpainting input.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from .runtime import import_comfy
from .synthetic import SD_VAE, clip_l_state_dict, init_weights_, save

# depth 4 -> width 256, 4 heads; the base has 4 joint blocks. A 3-layer
# ControlNet on it is wired like the 23-layer teacher on SD3-medium's 24
# blocks (one-to-one, the last block gets nothing) and a 2-layer one like the
# 12-layer student (pairs).
TINY_SD3 = {
    "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 4, "input_size": None,
    "adm_in_channels": 2048,
    "context_embedder_config": {"target": "torch.nn.Linear", "params": {"in_features": 4096, "out_features": 256}},
    "num_patches": 1024, "pos_embed_max_size": 32, "pos_embed_scaling_factor": None,
    "x_block_self_attn_layers": [],
}


@torch.no_grad()
def _fill_buffers_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """ComfyUI allocates the positional-embedding table with torch.empty (it is
    loaded from the file); fill it deterministically so it never holds NaN."""
    g = torch.Generator().manual_seed(seed + 7)
    for _, buf in module.named_buffers():
        if buf.is_floating_point():
            buf.copy_(torch.randn(buf.shape, generator=g) * 0.02)
    return module


def build_sd3_model(unet_config: dict = TINY_SD3, seed: int = 0):
    """A ComfyUI SD3 BaseModel (flow matching, shift 3) with random weights."""
    import_comfy()
    import comfy.supported_models

    model = comfy.supported_models.SD3(copy.deepcopy(unet_config)).get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    _fill_buffers_(model.diffusion_model, seed)
    return model


def build_mmdit_controlnet(unet_config: dict = TINY_SD3, num_blocks: int = 2, latent_channels: int = 17,
                           seed: int = 3, residual_gain: float = 1.0):
    """A ``comfy.cldm.mmdit.ControlNet`` with random weights (output projections included)."""
    import_comfy()
    import comfy.cldm.mmdit
    import comfy.ops

    cfg = {k: v for k, v in unet_config.items() if k not in ("out_channels",)}
    cn = comfy.cldm.mmdit.ControlNet(num_blocks=num_blocks, control_latent_channels=latent_channels,
                                     operations=comfy.ops.disable_weight_init, device="cpu", dtype=torch.float32,
                                     **cfg)
    init_weights_(cn, seed)
    _fill_buffers_(cn, seed)
    with torch.no_grad():
        for proj in cn.controlnet_blocks:
            proj.weight.mul_(residual_gain)
    return cn


def sd3_controlnet_state_dict(unet_config: dict = TINY_SD3, num_blocks: int = 2, latent_channels: int = 17,
                              seed: int = 3, residual_gain: float = 1.0) -> dict:
    """Diffusers-layout keys of a random SD3 ControlNet."""
    from .runtime import import_comfy

    import_comfy()
    from model_patches.refine_control_runtime import mmdit_controlnet_to_diffusers

    cn = build_mmdit_controlnet(unet_config, num_blocks, latent_channels, seed, residual_gain)
    return mmdit_controlnet_to_diffusers(cn.state_dict(), unet_config["depth"], num_blocks)


def sd3_vae_state_dict(seed: int = 2) -> dict:
    """A 16-channel KL VAE without quant convs (SD3's layout)."""
    import_comfy()
    import comfy.ldm.models.autoencoder

    ddconfig = dict(SD_VAE, z_channels=16)
    vae = comfy.ldm.models.autoencoder.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    init_weights_(vae, seed, gain=0.8)
    return {f"first_stage_model.{k}": v for k, v in vae.state_dict().items()}


def write_sd3_checkpoint(path: Path, unet_config: dict = TINY_SD3, seed: int = 0, dtype=torch.float16) -> Path:
    model = build_sd3_model(unet_config, seed)
    sd = {f"model.diffusion_model.{k}": v for k, v in model.diffusion_model.state_dict().items()}
    clip = clip_l_state_dict(seed + 1)
    sd.update({k.replace("cond_stage_model.", "text_encoders.clip_l.", 1): v for k, v in clip.items()})
    sd.update(sd3_vae_state_dict(seed + 2))
    return save(sd, path, dtype)


def write_sd3_controlnet(path: Path, unet_config: dict = TINY_SD3, num_blocks: int = 2, seed: int = 3,
                         residual_gain: float = 1.0, dtype=torch.float16) -> Path:
    return save(sd3_controlnet_state_dict(unet_config, num_blocks, 17, seed, residual_gain), path, dtype)
