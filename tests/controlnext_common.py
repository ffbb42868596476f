"""Shared ControlNeXt test models and helpers (the small ComfyUI UNets whose widths at the
injection points are the real ones, recorders, one model call)."""

from __future__ import annotations

import copy

import pytest
import torch

import comfy.model_patcher
import comfy.supported_models as sm

from model_patches import controlnext as cx
from model_patches.unet_patches import prepend_model_patch
from headless import synthetic as syn

from controlnext_reference import synthetic_state_dict


CPU = torch.device("cpu")


LAYOUT_OF = {"sdxl": "320", "sd15_training": "320", "svd_v2": "320", "sd15": "sd15", "svd_v1": "svd_v1",
             "sdxl_early": "sdxl_early"}


# SD1.5 family: 320 channels at level 0, 1280 at the bottom (one res-block middle);
# attention at level 0 only (transformer_depth_output is consumed from its end).
SD15_CNX_UNET = dict(syn.TINY_UNET, model_channels=320, channel_mult=[1, 4], transformer_depth=[1, 0],
                     transformer_depth_middle=-1, transformer_depth_output=[1, 1, 0, 0], context_dim=64)


# SDXL family: conv_in width 320, attention at level 1 and in the middle.
SDXL_CNX_UNET = dict(syn.TINY_SDXL_UNET, model_channels=320, channel_mult=[1, 2], num_res_blocks=[1, 1],
                     transformer_depth=[0, 1], transformer_depth_output=[0, 0, 1, 1], transformer_depth_middle=1)


SDXL_EARLY_CNX_UNET = dict(SDXL_CNX_UNET, channel_mult=[1, 4])


SVD_CNX_UNET = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 768, "in_channels": 8, "model_channels": 320,
    "num_res_blocks": [1, 1], "transformer_depth": [0, 0], "channel_mult": [1, 4], "transformer_depth_middle": -1,
    "use_linear_in_transformer": True, "context_dim": 64, "transformer_depth_output": [0, 0, 0, 0],
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


def _patcher(model):
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


@pytest.fixture(scope="module")
def sd15_model():
    return _patcher(syn.build_unet_model(SD15_CNX_UNET, seed=5))


@pytest.fixture(scope="module")
def sdxl_model():
    return _patcher(syn.build_sdxl_unet_model(SDXL_CNX_UNET, seed=6))


@pytest.fixture(scope="module")
def svd_model():
    model = sm.SVD_img2vid(copy.deepcopy(SVD_CNX_UNET)).get_model({}, device=CPU)
    syn.init_weights_(model.diffusion_model, 7)
    return _patcher(model)


@pytest.fixture(scope="module")
def sdxl_wide_model():
    """SDXL family with 1280 channels at the bottom (the first SDXL module injects on the middle block)."""
    return _patcher(syn.build_sdxl_unet_model(SDXL_EARLY_CNX_UNET, seed=6))


def model_for(variant, request):
    if variant == "sdxl_early":
        return request.getfixturevalue("sdxl_wide_model")
    family = cx.VARIANTS[variant].family
    return request.getfixturevalue({"SD1.5": "sd15_model", "SDXL": "sdxl_model", "SVD": "svd_model"}[family])


def weights_for(variant, seed=0, unet_sd=None, unet_name=None, unet_weights="auto"):
    return cx.ControlNeXtWeights(synthetic_state_dict(LAYOUT_OF[variant], seed), f"{variant}.safetensors",
                                 unet_sd, unet_name, unet_weights)


class Recorder:
    """Records the UNet feature at every injection place, before and after ControlNeXt."""

    def __init__(self):
        self.before, self.after, self.calls = {}, {}, []

    def __deepcopy__(self, memo):
        return self  # model_options are deep-copied by clones; keep one recorder

    def pre_input(self, h, to):
        self.before[("input", to["block"][1])] = h.clone()
        return h

    def post_input(self, h, to):
        self.after[("input", to["block"][1])] = h.clone()
        if cx.CALL_KEY in to and (not self.calls or self.calls[-1] is not to[cx.CALL_KEY]):
            self.calls.append(to[cx.CALL_KEY])
        return h

    def pre_output(self, h, hsp, to):
        if to["block"][1] == 0:
            self.before["middle"] = h.clone()
        return h, hsp

    def post_output(self, h, hsp, to):
        if to["block"][1] == 0:
            self.after["middle"] = h.clone()
        return h, hsp


def patched_with_recorder(model, *controls, combine="add_com"):
    rec = Recorder()
    m = model.clone()
    for weights, image, kwargs in controls:
        m = cx.apply_controlnext(m, weights, image, combine=combine, **kwargs)
    # ControlNeXt puts its patches first in the lists; the "before" recorders go in front of them.
    prepend_model_patch(m, rec.pre_input, "input_block_patch_after_skip")
    prepend_model_patch(m, rec.pre_output, "output_block_patch")
    m.set_model_input_block_patch_after_skip(rec.post_input)
    m.set_model_output_block_patch(rec.post_output)
    return m, rec


def run_model(m, x, sigma, cond_or_uncond, seed=0):
    """One model call the way the sampler makes it: transformer_options from
    model_options, the patcher's wrappers, cond_or_uncond and sigmas."""
    g = torch.Generator().manual_seed(seed)
    base = m.model
    to = dict(m.model_options.get("transformer_options", {}))
    to["wrappers"] = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in m.wrappers.items()}
    to["cond_or_uncond"] = list(cond_or_uncond)
    to["sigmas"] = sigma
    n = x.shape[0]
    unet_config = base.model_config.unet_config
    context = torch.randn(n, 4, unet_config["context_dim"], generator=g)
    extra = {}
    if unet_config.get("adm_in_channels"):
        extra["y"] = torch.randn(n, unet_config["adm_in_channels"], generator=g)
    if unet_config["in_channels"] == 8:
        extra["c_concat"] = torch.randn(n, 4, *x.shape[-2:], generator=g)
    with torch.no_grad():
        return base.apply_model(x, sigma, c_crossattn=context, transformer_options=to, **extra)


def sigmas_for(variant):
    return torch.tensor([3.0]) if cx.VARIANTS[variant].family == "SVD" else torch.tensor([2.5])
