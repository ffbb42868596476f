"""Small DiT ControlNets in the released key layouts, for tests and benchmarks.

Each builder makes a ComfyUI module with a small config, fills it with
deterministic random weights and renames its state dict to the layout of the
released files, so ``comfy.controlnet.load_controlnet_state_dict`` takes the
same branch it takes for the real files (``comfy/controlnet.py:612-702``):

* SD3, diffusers ``SD3ControlNetModel`` layout (InstantX SD3):
  ``sd3_controlnet_state_dict`` in ``synthetic_sd3``;
* SD3.5, Stability layout (SD3.5 Large blur/canny/depth):
  ``sd35_controlnet_state_dict``;
* Flux, diffusers / InstantX layout, Union with ``controlnet_mode_embedder``:
  ``flux_instantx_state_dict``; Flux XLabs (BFL names):
  ``flux_xlabs_state_dict``;
* Qwen-Image InstantX: ``qwen_instantx_state_dict``.

On ComfyUI 0.3.75 Flux and Qwen ControlNets are 3072 wide whatever the file
holds (heads fixed at 24, ``comfy/model_detection.py:219-226``;
``comfy/ldm/qwen_image/model.py:293-305``): those builders keep one block
and work in memory.
"""

from __future__ import annotations

import copy

import torch

from .runtime import import_comfy
from .synthetic import init_weights_
from .synthetic_sd3 import TINY_SD3, _fill_buffers_, sd3_controlnet_state_dict  # noqa: F401

# --- SD3.5 (Stability layout) ----------------------------------------------------------


def sd35_controlnet_state_dict(unet_config: dict = TINY_SD3, num_layers: int = 1, seed: int = 8,
                               control_type: int | None = 0, residual_gain: float = 1.0) -> dict:
    """A ``ControlNetEmbedder`` as Stability ships SD3.5 ControlNets: diffusers
    names for the embedders (``utils.MMDIT_MAP_BASIC``), comfy names for the
    blocks, no ``x_embedder`` (``ControlNetSD35.pre_run`` copies the base's),
    and the ``control_type`` scalar (0 blur, 1 canny, 2 depth)."""
    import_comfy()
    import comfy.cldm.dit_embedder
    import comfy.ops
    import comfy.utils

    depth = unet_config["depth"]
    cn = comfy.cldm.dit_embedder.ControlNetEmbedder(
        img_size=None, patch_size=2, in_chans=16, attention_head_dim=64, num_attention_heads=depth,
        adm_in_channels=unet_config["adm_in_channels"], num_layers=num_layers, main_model_double=depth,
        double_y_emb=False, device="cpu", dtype=torch.float32, operations=comfy.ops.disable_weight_init)
    init_weights_(cn, seed)
    _fill_buffers_(cn, seed)
    with torch.no_grad():
        for proj in cn.controlnet_blocks:
            proj.weight.mul_(residual_gain)
    names = {comfy_name: file_name for comfy_name, file_name, *_ in comfy.utils.MMDIT_MAP_BASIC}
    out = {}
    for k, v in cn.state_dict().items():
        if k.startswith("x_embedder."):
            continue
        out[names.get(k, k)] = v
    if control_type is not None:
        out["control_type"] = torch.tensor(float(control_type))
    return out


# --- Flux --------------------------------------------------------------------------------

FLUX_SMALL = {
    # ComfyUI 0.3.75 fixes 24 heads and axes (16, 56, 56): width 3072.
    "in_channels": 16, "vec_in_dim": 32, "context_in_dim": 64, "hidden_size": 3072, "mlp_ratio": 4.0,
    "num_heads": 24, "depth": 1, "depth_single_blocks": 1, "axes_dim": [16, 56, 56], "theta": 10000,
    "patch_size": 2, "qkv_bias": True, "guidance_embed": False, "out_channels": 16,
}


def build_flux_model(config: dict = FLUX_SMALL, seed: int = 0, dtype=torch.bfloat16):
    """A ComfyUI Flux BaseModel with random weights (``supported_models.Flux``)."""
    import_comfy()
    import comfy.supported_models

    cfg = dict(copy.deepcopy(config), image_model="flux")
    model_config = comfy.supported_models.Flux(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    return model


def build_flux_controlnet(config: dict = FLUX_SMALL, depth: int = 1, depth_single: int = 1, seed: int = 3,
                          latent_input: bool = True, union_modes: int = 0, residual_gain: float = 1.0,
                          dtype=torch.bfloat16):
    import_comfy()
    import comfy.ldm.flux.controlnet
    import comfy.ops

    cfg = {k: v for k, v in config.items() if k not in ("depth", "depth_single_blocks", "out_channels")}
    cn = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=latent_input, num_union_modes=union_modes, control_latent_channels=16 if latent_input else None,
        depth=depth, depth_single_blocks=depth_single, out_channels=16, operations=comfy.ops.disable_weight_init,
        device="cpu", dtype=dtype, **cfg)
    init_weights_(cn, seed)
    with torch.no_grad():
        for proj in list(cn.controlnet_blocks) + list(cn.controlnet_single_blocks):
            proj.weight.mul_(residual_gain)
    return cn


def flux_instantx_state_dict(config: dict = FLUX_SMALL, depth: int = 1, depth_single: int = 1, seed: int = 3,
                             union_modes: int = 10, residual_gain: float = 1.0, dtype=torch.bfloat16) -> dict:
    """InstantX / diffusers ``FluxControlNetModel`` keys (Union: ``controlnet_mode_embedder``),
    through the inverse of ``comfy.utils.flux_to_diffusers``."""
    import comfy.utils

    cn = build_flux_controlnet(config, depth, depth_single, seed, True, union_modes, residual_gain, dtype)
    sd = cn.state_dict()
    key_map = comfy.utils.flux_to_diffusers({"depth": depth, "depth_single_blocks": depth_single,
                                             "hidden_size": config["hidden_size"]}, output_prefix="")
    from model_patches.refine_control_runtime import invert_key_map

    return invert_key_map(sd, key_map, ("controlnet_blocks.", "controlnet_single_blocks.", "controlnet_mode_embedder."),
                          "flux_instantx_state_dict")


def flux_xlabs_state_dict(config: dict = FLUX_SMALL, depth: int = 1, seed: int = 4,
                          residual_gain: float = 1.0, dtype=torch.bfloat16) -> dict:
    """XLabs Flux ControlNet keys: BFL names (the module's own), image hint encoder."""
    cn = build_flux_controlnet(config, depth, 0, seed, False, 0, residual_gain, dtype)
    return dict(cn.state_dict())


# --- Qwen-Image ----------------------------------------------------------------------------

def build_qwen_model(num_layers: int = 1, seed: int = 0, dtype=torch.bfloat16):
    import_comfy()
    import comfy.supported_models

    cfg = {"image_model": "qwen_image", "in_channels": 64, "num_layers": num_layers}
    model_config = comfy.supported_models.QwenImage(cfg)
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    init_weights_(model.diffusion_model, seed)
    return model


def qwen_instantx_state_dict(num_layers: int = 1, seed: int = 5, residual_gain: float = 1.0,
                             dtype=torch.bfloat16) -> dict:
    """InstantX Qwen-Image ControlNet keys (diffusers ``QwenImageControlNetModel``, unchanged)."""
    import_comfy()
    import comfy.ldm.qwen_image.controlnet
    import comfy.ops

    cn = comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel(
        in_channels=64, num_layers=num_layers, extra_condition_channels=0, device="cpu", dtype=dtype,
        operations=comfy.ops.disable_weight_init)
    init_weights_(cn, seed)
    with torch.no_grad():
        for proj in cn.controlnet_blocks:
            proj.weight.mul_(residual_gain)
    return dict(cn.state_dict())
