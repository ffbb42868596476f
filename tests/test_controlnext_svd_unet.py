"""Official ControlNeXt SVD UNets (diffusers UNetSpatioTemporalConditionModel keys) on ComfyUI's SVD UNet.

A small spatio-temporal config with the official key names: diffusers' own
``UNetSpatioTemporalConditionModel`` (the class the official
``UNetSpatioTemporalConditionControlNeXtModel`` copies, same parameter names)
with seeded weights, saved as the official files are (.bin fp16/fp32), loaded
through Load ControlNeXt's ``unet_file`` onto a ComfyUI SVD model of the same
config: every key maps, none is left over, and the two UNets' forwards agree.
"""

from __future__ import annotations

import copy

import pytest
import torch

import comfy.model_patcher
import comfy.supported_models as sm

from model_patches import controlnext as cx
from model_patches.controlnext_svd_unet import convert_svd_unet

from controlnext_reference import synthetic_state_dict
from headless import synthetic as syn

CPU = torch.device("cpu")
FRAMES = 3
COMFY_CONFIG = {
    "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True, "legacy": False,
    "num_classes": "sequential", "adm_in_channels": 768, "in_channels": 8, "model_channels": 64,
    "num_res_blocks": [1, 1], "transformer_depth": [1, 0], "channel_mult": [1, 2], "transformer_depth_middle": 1,
    "use_linear_in_transformer": True, "context_dim": 32, "transformer_depth_output": [1, 1, 0, 0],
    "extra_ff_mix_layer": True, "use_spatial_context": True, "merge_strategy": "learned_with_images",
    "merge_factor": 0.0, "video_kernel_size": [3, 1, 1], "use_temporal_resblock": True,
    "use_temporal_attention": True, "disable_temporal_crossattention": False,
}
DIFFUSERS_CONFIG = dict(
    sample_size=8, in_channels=8, out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"), block_out_channels=(64, 128),
    addition_time_embed_dim=256, projection_class_embeddings_input_dim=768, layers_per_block=1,
    cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=(1, 2), num_frames=FRAMES)


@pytest.fixture(scope="module")
def diffusers_unet():
    from diffusers import UNetSpatioTemporalConditionModel

    torch.manual_seed(0)
    unet = UNetSpatioTemporalConditionModel(**DIFFUSERS_CONFIG).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in unet.named_parameters():  # every weight matters, zero-initialised ones included
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return unet


@pytest.fixture(scope="module")
def svd_patcher():
    model = sm.SVD_img2vid(copy.deepcopy(COMFY_CONFIG)).get_model({}, device=CPU)
    syn.init_weights_(model.diffusion_model, 7)  # the stock SVD weights the official UNet replaces
    model.diffusion_model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)


def test_every_key_maps_and_none_is_left_over(diffusers_unet, svd_patcher):
    sd = diffusers_unet.state_dict()
    converted = convert_svd_unet(sd, svd_patcher)
    model_keys = {k for k in svd_patcher.model.state_dict() if k.startswith("diffusion_model.")}
    assert len(converted) == len(sd) == len(model_keys)
    assert set(converted) == model_keys
    # a one-to-one mapping: no two diffusers tensors land on one ComfyUI weight
    assert len({id(v) for v in converted.values()}) == len(sd)


@pytest.mark.parametrize("fmt", ["fp32.bin", "fp16.bin"])
def test_converted_unet_forward_equals_diffusers(diffusers_unet, svd_patcher, tmp_path, fmt):
    dtype = torch.float16 if fmt.startswith("fp16") else torch.float32
    unet_path = tmp_path / "unet.bin"
    torch.save({k: v.to(dtype) for k, v in diffusers_unet.state_dict().items()}, str(unet_path))
    control_path = tmp_path / "controlnet.bin"
    torch.save(synthetic_state_dict("320", seed=3), str(control_path))
    weights = cx.ControlNeXtWeights.from_files(control_path, unet_path)
    # The loader's path for SVD variants (the test UNet is narrower than SVD, so no control is applied).
    patches, mode = cx.unet_weight_patches(weights, cx.VARIANTS["svd_v2"], svd_patcher)
    assert mode == "absolute" and len(patches) == len(diffusers_unet.state_dict())
    m = svd_patcher.clone()
    cx.add_unet_patches(m, patches, "unet.bin")

    g = torch.Generator().manual_seed(2)
    b, h = 2, 8
    sample = torch.randn(b, FRAMES, 8, h, h, generator=g)
    t = torch.tensor(0.25 * torch.log(torch.tensor(3.0)).item())  # the EDM timestep SVD is trained with
    context = torch.randn(b, 1, 32, generator=g)
    time_ids = torch.tensor([[6.0, 127.0, 0.02], [7.0, 128.0, 0.02]])
    reference_unet = diffusers_unet
    if dtype == torch.float16:  # diffusers running the same (rounded) weights
        reference_unet = copy.deepcopy(diffusers_unet)
        reference_unet.load_state_dict({k: v.half().float() for k, v in diffusers_unet.state_dict().items()})
    with torch.no_grad():
        reference = reference_unet(sample, t, context, time_ids, return_dict=False)[0]
        y = diffusers_unet.add_time_proj(time_ids.flatten()).reshape(b, -1).repeat_interleave(FRAMES, 0)
        m.patch_model(device_to=CPU)
        try:
            out = m.model.diffusion_model(
                sample.flatten(0, 1), t.repeat(b * FRAMES), context=context.repeat_interleave(FRAMES, 0), y=y,
                num_video_frames=FRAMES, image_only_indicator=torch.zeros(b, FRAMES))
        finally:
            m.unpatch_model(device_to=CPU)
    out = out.reshape(b, FRAMES, *out.shape[1:])
    assert torch.allclose(out, reference, rtol=1e-3, atol=1e-3), (out - reference).abs().max()
    assert reference.abs().mean() > 1e-2


def test_missing_and_extra_keys_are_named(diffusers_unet, svd_patcher):
    sd = dict(diffusers_unet.state_dict())
    del sd["mid_block.resnets.1.temporal_res_block.conv2.weight"]
    sd["down_blocks.0.attentions.0.bogus.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as e:
        convert_svd_unet(sd, svd_patcher, "unet.bin")
    msg = str(e.value)
    assert "unet.bin" in msg and "down_blocks.0.attentions.0.bogus.weight" in msg
    assert "middle_block.2.time_stack.out_layers.3.weight" in msg and "missing from the file" in msg


def test_comfyui_keyed_full_unet_also_loads(diffusers_unet, svd_patcher):
    converted = convert_svd_unet(diffusers_unet.state_dict(), svd_patcher)
    again = convert_svd_unet({"model." + k: v for k, v in converted.items()}, svd_patcher)
    assert set(again) == set(converted)
