"""ControlNeXt UNet weight patches on the real ComfyUI runtime: weight differences and absolute
weights round-trip, official UNet subsets map onto full-size models."""

from __future__ import annotations

import copy
import math

import torch

import comfy.supported_models as sm

from model_patches import controlnext as cx
from headless import synthetic as syn

from controlnext_common import CPU, _patcher, sd15_model, sdxl_model, weights_for  # noqa: F401 (fixtures)


# --------------------------------------------------------------------------------------------
# UNet weight patches
# --------------------------------------------------------------------------------------------

# Diffusers names of the attention output projections of the test UNets, written out by hand.
SDXL_CNX_DIFFUSERS_TO_OUT = [
    "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0",
    "up_blocks.0.attentions.1.transformer_blocks.0.attn2.to_out.0",
]
SDXL_CNX_COMFY_TO_OUT = [
    "input_blocks.3.1.transformer_blocks.0.attn2.to_out.0",
    "middle_block.1.transformer_blocks.0.attn2.to_out.0",
    "output_blocks.0.1.transformer_blocks.0.attn2.to_out.0",
    "output_blocks.1.1.transformer_blocks.0.attn2.to_out.0",
]
SD15_CNX_DIFFUSERS_TO_OUT = [
    f"{block}.transformer_blocks.0.{attn}.to_out.0"
    for block in ("down_blocks.0.attentions.0", "up_blocks.1.attentions.0", "up_blocks.1.attentions.1")
    for attn in ("attn1", "attn2")
]


def _to_out_sd(names, width, seed, dtype=torch.float16):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for n in names:
        sd[f"{n}.weight"] = (0.01 * torch.randn(width, width, generator=g)).to(dtype)
        sd[f"{n}.bias"] = (0.01 * torch.randn(width, generator=g)).to(dtype)
    return sd


def test_sdxl_weight_difference_round_trip(sdxl_model):
    delta = _to_out_sd(SDXL_CNX_DIFFUSERS_TO_OUT, 640, seed=30)
    w = weights_for("sdxl", seed=31, unet_sd=delta, unet_name="unet.safetensors")
    original = {k: v.clone() for k, v in sdxl_model.model.state_dict().items()}
    m = cx.apply_controlnext(sdxl_model, w, torch.rand(1, 64, 64, 3))
    assert len(m.patches) == 8
    m.patch_model(device_to=CPU)
    try:
        patched = m.model.state_dict()
        for dn, cn in zip(SDXL_CNX_DIFFUSERS_TO_OUT, SDXL_CNX_COMFY_TO_OUT):
            for suffix in ("weight", "bias"):
                key = f"diffusion_model.{cn}.{suffix}"
                expected = original[key] + delta[f"{dn}.{suffix}"].to(torch.float32)
                assert torch.allclose(patched[key], expected, atol=1e-6), key
    finally:
        m.unpatch_model(device_to=CPU)
    restored = sdxl_model.model.state_dict()
    for k, v in original.items():
        assert torch.equal(restored[k], v), f"{k} not restored bit for bit"


def test_sd15_absolute_weights_round_trip(sd15_model):
    absolute = _to_out_sd(SD15_CNX_DIFFUSERS_TO_OUT, 320, seed=32, dtype=torch.float32)
    w = weights_for("sd15_training", seed=33, unet_sd=absolute, unet_name="unet.safetensors",
                    unet_weights="absolute")
    original = {k: v.clone() for k, v in sd15_model.model.state_dict().items()}
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    assert len(m.patches) == 12
    m.patch_model(device_to=CPU)
    try:
        patched = m.model.state_dict()
        # Absolute weights are applied as W_file − W_base ("diff" patches, which keep LoRAs): equal up to rounding.
        key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_out.0.weight"
        assert torch.allclose(patched[key],
                              absolute["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight"],
                              rtol=0, atol=1e-6)
        key = "diffusion_model.output_blocks.3.1.transformer_blocks.0.attn2.to_out.0.bias"
        assert torch.allclose(patched[key],
                              absolute["up_blocks.1.attentions.1.transformer_blocks.0.attn2.to_out.0.bias"],
                              rtol=0, atol=1e-6)
    finally:
        m.unpatch_model(device_to=CPU)
    for k, v in sd15_model.model.state_dict().items():
        assert torch.equal(v, original[k]), k


def _official_sd15_unet_names():
    blocks = ["down_blocks.0.attentions.0", "down_blocks.0.attentions.1", "down_blocks.1.attentions.0",
              "down_blocks.1.attentions.1", "down_blocks.2.attentions.0", "down_blocks.2.attentions.1",
              "mid_block.attentions.0"] + [f"up_blocks.{u}.attentions.{a}" for u in (1, 2, 3) for a in (0, 1, 2)]
    width = {"down_blocks.0": 320, "down_blocks.1": 640, "down_blocks.2": 1280, "mid_block": 1280,
             "up_blocks.1": 1280, "up_blocks.2": 640, "up_blocks.3": 320}
    out = {}
    for b in blocks:
        c = width[".".join(b.split(".")[:2]) if not b.startswith("mid") else "mid_block"]
        for attn in ("attn1", "attn2"):
            out[f"{b}.transformer_blocks.0.{attn}.to_out.0.weight"] = torch.empty(c, c, device="meta")
            out[f"{b}.transformer_blocks.0.{attn}.to_out.0.bias"] = torch.empty(c, device="meta")
    return out


def _official_sdxl_unet_names():
    out = {}
    spec = [("down_blocks.1", 2, 2, 640), ("down_blocks.2", 2, 10, 1280), ("mid_block", 1, 10, 1280),
            ("up_blocks.0", 3, 10, 1280), ("up_blocks.1", 3, 2, 640)]
    for block, n_att, depth, c in spec:
        for a in range(n_att):
            for t in range(depth):
                p = f"{block}.attentions.{a}.transformer_blocks.{t}.attn2.to_out.0"
                out[p + ".weight"] = torch.empty(c, c, device="meta")
                out[p + ".bias"] = torch.empty(c, device="meta")
    return out


def test_official_unet_subsets_map_onto_full_size_models():
    sd15_names = _official_sd15_unet_names()
    assert len(sd15_names) == 64 and sum(math.prod(v.shape) for v in sd15_names.values()) == 24_805_760
    sdxl_names = _official_sdxl_unet_names()
    assert len(sdxl_names) == 140 and sum(math.prod(v.shape) for v in sdxl_names.values()) == 102_483_200
    sd15 = _patcher(sm.SD15(copy.deepcopy(syn.SD15_UNET)).get_model({}, device=torch.device("meta")))
    patches, kind = cx.unet_weight_patches(sd15_names, cx.VARIANTS["sd15"], sd15, "unet.safetensors",
                                           mode="difference")
    assert kind == "difference" and len(patches) == 64
    assert "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_out.0.weight" in patches
    sdxl_full = dict(syn.SD15_UNET, num_classes="sequential", adm_in_channels=2816, context_dim=2048,
                     num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                     transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                     use_linear_in_transformer=True)
    sdxl = _patcher(sm.SDXL(copy.deepcopy(sdxl_full)).get_model({}, device=torch.device("meta")))
    patches, kind = cx.unet_weight_patches(sdxl_names, cx.VARIANTS["sdxl"], sdxl, "unet.safetensors",
                                           mode="difference")
    assert kind == "difference" and len(patches) == 140
    assert "diffusion_model.input_blocks.8.1.transformer_blocks.9.attn2.to_out.0.weight" in patches
    assert all(len(p) == 1 for p in patches.values())


