"""ControlNeXt on the real ComfyUI runtime: formats, module, injection, weight patches, errors.

Models are small ComfyUI UNets whose widths at the injection points are the
real ones (320 after conv_in / level 0, 1280 at the bottom), so every
variant's feature lands on a tensor of its trained shape.
"""

from __future__ import annotations

import copy
import math
import os
import pickle

import pytest
import safetensors.torch
import torch

import comfy.model_patcher
import comfy.supported_models as sm

from model_patches import controlnext as cx
from model_patches.balance import add_com
from model_patches.unet_patches import prepend_model_patch
from headless import synthetic as syn

from controlnext_reference import (
    OFFICIAL_PARAMS,
    official_shapes,
    reference_injection,
    reference_module,
    synthetic_state_dict,
)

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


# --------------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["320", "sd15", "svd_v1", "sdxl_early"])
@pytest.mark.parametrize("fmt", ["fp32.safetensors", "fp16.safetensors", "fp32.bin", "fp16.pth"])
def test_official_files_load(tmp_path, layout, fmt):
    dtype = torch.float16 if fmt.startswith("fp16") else torch.float32
    sd = synthetic_state_dict(layout, seed=1, dtype=dtype)
    path = tmp_path / f"controlnet.{fmt.split('.')[1]}"
    if path.suffix == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    w = cx.ControlNeXtWeights.from_files(path)
    assert w.layout == layout
    assert w.source_dtype == dtype
    for variant in w.candidates:
        module = w.module(variant, CPU)
        assert sum(p.numel() for p in module.parameters()) == OFFICIAL_PARAMS[layout]
        got = module.state_dict()
        assert {k: tuple(v.shape) for k, v in got.items()} == official_shapes(layout)
        for k, v in sd.items():
            assert torch.equal(got[k], v.to(torch.float32)), k
    expected_candidates = {"320": {"sdxl", "sd15_training", "svd_v2"}, "sd15": {"sd15"}, "svd_v1": {"svd_v1"},
                           "sdxl_early": {"sdxl_early"}}
    assert {v.key for v in w.candidates} == expected_candidates[layout]


def test_prefixed_keys_load():
    sd = {f"controlnet.{k}": v for k, v in synthetic_state_dict("320").items()}
    assert cx.ControlNeXtWeights(sd).layout == "320"


# --------------------------------------------------------------------------------------------
# module forward
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(cx.VARIANTS))
def test_module_matches_reference(variant):
    sd = synthetic_state_dict(LAYOUT_OF[variant], seed=2)
    w = cx.ControlNeXtWeights(sd)
    module = w.module(cx.VARIANTS[variant], CPU)
    g = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 64, 48, generator=g)
    t = torch.tensor([-1.2, 1.5]) if variant.startswith("svd") else torch.tensor([999.0, 17.0])
    with torch.no_grad():
        got = module(image, t)
    ref = reference_module(sd, variant, image, t)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4), (got - ref).abs().max()
    # The timestep matters: the feature differs between two timesteps of one image.
    with torch.no_grad():
        other = module(image, t.flip(0))
    assert not torch.allclose(other, got, atol=1e-3)


@pytest.mark.parametrize("variant,size,expected", [
    ("sdxl", (1024, 1024), (320, 128, 128)),
    ("sd15_training", (512, 512), (320, 64, 64)),
    ("svd_v2", (1024, 576), (320, 127, 71)),
    ("sd15", (512, 512), (1280, 64, 64)),
])
def test_module_output_shapes_at_official_sizes(variant, size, expected):
    with torch.device("meta"):
        module = cx.ControlNeXtModule(cx.VARIANTS[variant].module_config)
        out = module(torch.empty(1, 3, *size), torch.empty(1))
    assert tuple(out.shape[1:]) == expected


# --------------------------------------------------------------------------------------------
# injection
# --------------------------------------------------------------------------------------------


def test_injection_blocks_of_full_size_unets():
    def ids(model_config_cls, unet_config):
        model = model_config_cls(copy.deepcopy(unet_config)).get_model({}, device=torch.device("meta"))
        return cx.injection_block_ids(model.diffusion_model)

    sd15 = ids(sm.SD15, syn.SD15_UNET)
    assert (sd15["conv_in"], sd15["level0"], sd15["last_input"]) == (0, 3, 11)
    sdxl_full = dict(syn.SD15_UNET, num_classes="sequential", adm_in_channels=2816, context_dim=2048,
                     num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
                     transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                     use_linear_in_transformer=True)
    sdxl = ids(sm.SDXL, sdxl_full)
    assert (sdxl["conv_in"], sdxl["level0"], sdxl["last_input"]) == (0, 3, 8)


@pytest.mark.parametrize("variant", list(cx.VARIANTS))
def test_injection_lands_at_documented_block_and_matches_reference(variant, request):
    model = model_for(variant, request)
    v = cx.VARIANTS[variant]
    sd = synthetic_state_dict(LAYOUT_OF[variant], seed=4)
    w = cx.ControlNeXtWeights(sd, f"{variant}.safetensors")
    latent = 8
    g = torch.Generator().manual_seed(5)
    image = torch.rand(1, latent * 8, latent * 8, 3, generator=g)
    strength = 0.8
    m, rec = patched_with_recorder(model, (w, image, {"strength": strength}))
    x = torch.randn(2, 4, latent, latent, generator=g)
    sigma = sigmas_for(variant).repeat(2)
    run_model(m, x, sigma, [1, 0])  # uncond rows first, as ComfyUI batches them

    documented = {"conv_in": ("input", 0), "level0": ("input", 2), "last_input": ("input", 3),
                  "middle": "middle"}[v.injection]
    assert documented in rec.before
    for place, before in rec.before.items():
        if place != documented:
            assert torch.equal(rec.after[place], before), f"{variant}: {place} changed"
    h = rec.before[documented]
    hint = image.movedim(-1, 1)
    t = model.model.model_sampling.timestep(sigma[:1])
    if v.family == "SVD":
        assert torch.allclose(t, 0.25 * sigma[:1].log())
    control = reference_module(sd, variant, hint, t)
    # Row 0 is uncond: it takes the variant's uncond scale (SVD v2 zero, SVD v1 sigmoid(0)·1.3).
    expected = reference_injection(variant, sd, h, control.expand(2, -1, -1, -1), strength, uncond_rows=1)
    got = rec.after[documented]
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-4), (got - expected).abs().max()
    if variant == "svd_v2":
        assert torch.equal(got[:1], h[:1])
    else:
        assert not torch.allclose(got[:1], h[:1], atol=1e-3)
    assert not torch.allclose(got[1:], h[1:], atol=1e-3)
    assert rec.calls[-1].module_evaluations == 1


@pytest.mark.parametrize("variant", ["sdxl", "sd15_training"])
def test_cond_uncond_share_one_evaluation_and_equal_two_runs(variant, request):
    model = model_for(variant, request)
    w = weights_for(variant, seed=8)
    g = torch.Generator().manual_seed(9)
    image = torch.rand(2, 64, 64, 3, generator=g)  # two images: one per row of each chunk
    m, rec = patched_with_recorder(model, (w, image, {}))
    x = torch.randn(4, 4, 8, 8, generator=g)
    sigma = torch.tensor([4.0, 4.0, 4.0, 4.0])
    together = run_model(m, x, sigma, [1, 0])
    assert rec.calls[-1].module_evaluations == 2  # 2 images × 1 timestep, not 4 rows
    uncond = run_model(m, x[:2], sigma[:2], [1])
    cond = run_model(m, x[2:], sigma[2:], [0])
    assert rec.calls[-1].module_evaluations == 2  # separate calls: 2 more evaluations each
    assert together.shape == x.shape and uncond.shape == cond.shape == x[:2].shape
    # One feature per image, shared by the cond and the uncond rows of the batched call:
    feats = rec.calls[0].points[cx.VARIANTS[variant].injection][0]
    assert feats.features.shape[0] == 2
    assert feats.row_feature.tolist() == [0, 1, 0, 1]


def test_batched_equals_separate_outputs(sdxl_model):
    """The whole UNet output of a [uncond, cond] batch equals two separate calls."""
    w = weights_for("sdxl", seed=10)
    g = torch.Generator().manual_seed(11)
    image = torch.rand(1, 64, 64, 3, generator=g)
    m, rec = patched_with_recorder(sdxl_model, (w, image, {}))
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = torch.tensor([5.0, 5.0])
    base = m.model
    to = dict(m.model_options["transformer_options"])
    to["wrappers"] = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in m.wrappers.items()}
    ctx = torch.randn(2, 4, 2048, generator=g)
    y = torch.randn(2, 2816, generator=g)

    def call(rows, labels):
        t = dict(to, cond_or_uncond=labels, sigmas=sigma[rows])
        with torch.no_grad():
            return base.apply_model(x[rows], sigma[rows], c_crossattn=ctx[rows], transformer_options=t, y=y[rows])

    together = call(slice(0, 2), [1, 0])
    assert rec.calls[-1].module_evaluations == 1
    separate = torch.cat([call(slice(0, 1), [1]), call(slice(1, 2), [0])])
    assert torch.allclose(together, separate, rtol=1e-4, atol=1e-5), (together - separate).abs().max()


def test_start_end_percent_and_strength_zero(sd15_model):
    w = weights_for("sd15_training", seed=12)
    image = torch.rand(1, 64, 64, 3)
    ms = sd15_model.model.model_sampling
    # Active only for the last half of the schedule (small sigmas).
    m, rec = patched_with_recorder(sd15_model, (w, image, {"start_percent": 0.5, "end_percent": 1.0}))
    x = torch.randn(1, 4, 8, 8)
    high = torch.tensor([float(ms.percent_to_sigma(0.2))])
    low = torch.tensor([float(ms.percent_to_sigma(0.8))])
    run_model(m, x, high, [0])
    assert torch.equal(rec.after[("input", 2)], rec.before[("input", 2)])
    run_model(m, x, low, [0])
    assert not torch.equal(rec.after[("input", 2)], rec.before[("input", 2)])
    m0 = cx.apply_controlnext(sd15_model, w, image, strength=0.0)
    assert cx.STACK_KEY not in m0.model_options.get("transformer_options", {})


def test_mask_limits_the_region(sd15_model):
    w = weights_for("sd15_training", seed=13)
    image = torch.rand(1, 64, 64, 3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0  # left half
    m, rec = patched_with_recorder(sd15_model, (w, image, {"mask": mask}))
    run_model(m, torch.randn(1, 4, 8, 8), torch.tensor([3.0]), [0])
    delta = rec.after[("input", 2)] - rec.before[("input", 2)]  # (1, 320, 4, 4)
    assert delta[..., :2].abs().sum() > 0
    assert torch.equal(delta[..., 2:], torch.zeros_like(delta[..., 2:]))


def test_uncond_override(svd_model):
    w = weights_for("svd_v2", seed=14)
    image = torch.rand(1, 64, 64, 3)
    m, rec = patched_with_recorder(svd_model, (w, image, {"uncond": "apply"}))
    run_model(m, torch.randn(2, 4, 8, 8), torch.tensor([3.0, 3.0]), [1, 0])
    delta = rec.after[("input", 2)] - rec.before[("input", 2)]
    assert delta[0].abs().sum() > 0 and delta[1].abs().sum() > 0


@pytest.mark.parametrize("combine", ["add_com", "sum"])
def test_two_controls_combine_at_one_point(sdxl_model, combine):
    sd_a, sd_b = synthetic_state_dict("320", seed=20), synthetic_state_dict("320", seed=21)
    w_a, w_b = cx.ControlNeXtWeights(sd_a), cx.ControlNeXtWeights(sd_b)
    g = torch.Generator().manual_seed(22)
    img_a, img_b = torch.rand(1, 64, 64, 3, generator=g), torch.rand(1, 64, 64, 3, generator=g)
    m, rec = patched_with_recorder(sdxl_model, (w_a, img_a, {"strength": 1.0}), (w_b, img_b, {"strength": 0.5}),
                                   combine=combine)
    sigma = torch.tensor([6.0, 6.0])
    run_model(m, torch.randn(2, 4, 8, 8, generator=g), sigma, [0, 1])
    h = rec.before[("input", 0)]
    t = sdxl_model.model.model_sampling.timestep(sigma)
    r_a = reference_injection("sdxl", sd_a, h, reference_module(sd_a, "sdxl", img_a.movedim(-1, 1).expand(2, -1, -1, -1), t), 1.0) - h
    r_b = reference_injection("sdxl", sd_b, h, reference_module(sd_b, "sdxl", img_b.movedim(-1, 1).expand(2, -1, -1, -1), t), 0.5) - h
    expected = h + (add_com([r_a, r_b]) if combine == "add_com" else r_a + r_b)
    assert torch.allclose(rec.after[("input", 0)], expected, rtol=1e-4, atol=1e-4)
    assert rec.calls[-1].module_evaluations == 2  # one per control


def test_model_without_controlnext_is_untouched(sd15_model):
    w = weights_for("sd15_training", seed=23)
    before = copy.deepcopy(sd15_model.model_options)
    cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    assert sd15_model.model_options == before
    assert not sd15_model.get_wrappers("apply_model", cx.WRAPPER_KEY)
    x = torch.randn(1, 4, 8, 8)
    out1 = run_model(sd15_model, x, torch.tensor([2.0]), [0])
    out2 = run_model(sd15_model.clone(), x, torch.tensor([2.0]), [0])
    assert torch.equal(out1, out2)


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


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_controlnet_file_is_refused_with_expected_and_found(tmp_path):
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    safetensors.torch.save_file(syn.controlnet_state_dict(syn.TINY_UNET, seed=1), str(path))
    with pytest.raises(ValueError) as e:
        cx.ControlNeXtWeights.from_files(path)
    msg = str(e.value)
    assert "Expected one of" in msg and "52 tensors" in msg and "51 tensors" in msg and "65 tensors" in msg
    assert "looks like a ControlNet" in msg and "154 tensors" in msg


def test_lora_file_is_refused(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    safetensors.torch.save_file({
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
    }, str(path))
    with pytest.raises(ValueError, match="LoRA") as e:
        cx.ControlNeXtWeights.from_files(path)
    assert "2 tensors" in str(e.value) and "Expected one of" in str(e.value)


def test_near_miss_lists_missing_keys():
    sd = synthetic_state_dict("320")
    del sd["mid_convs.1.bias"]
    with pytest.raises(ValueError, match="missing \\['mid_convs.1.bias'\\]"):
        cx.ControlNeXtWeights(sd)


def test_sdxl_module_and_delta_on_sd15_model_names_both(sd15_model):
    delta = {k: torch.zeros(v.shape) for k, v in list(_official_sdxl_unet_names().items())[:6]}
    w = weights_for("sdxl", unet_sd=delta, unet_name="unet.safetensors")
    with pytest.raises(ValueError) as e:
        cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    msg = str(e.value)
    assert "SDXL" in msg and "SD1.5" in msg and "unet.safetensors" in msg


def test_sd15_module_on_sdxl_model_names_both(sdxl_model):
    w = weights_for("sd15")
    with pytest.raises(ValueError) as e:
        cx.apply_controlnext(sdxl_model, w, torch.rand(1, 64, 64, 3))
    msg = str(e.value)
    assert "SD1.5" in msg and "the model is SDXL" in msg


def test_svd_module_on_sd15_model_is_refused(sd15_model):
    with pytest.raises(ValueError, match="SVD v1 -> SVD models; the model is SD1.5"):
        cx.apply_controlnext(sd15_model, weights_for("svd_v1"), torch.rand(1, 64, 64, 3))


def test_module_on_a_model_of_other_width_is_refused():
    small = _patcher(syn.build_unet_model(syn.TINY_UNET, seed=1))  # 64 channels where 320 are needed
    with pytest.raises(ValueError, match="outputs 320 channels"):
        cx.apply_controlnext(small, weights_for("sd15_training"), torch.rand(1, 64, 64, 3))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "controlnet.bin"
    with open(path, "wb") as f:
        pickle.dump({"scale": _Exploit(str(marker))}, f)
    with pytest.raises(ValueError, match="weights-only"):
        cx.ControlNeXtWeights.from_files(path)
    assert not marker.exists()


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "controlnet.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported file type"):
        cx.ControlNeXtWeights.from_files(path)


def test_svd_unet_file_must_be_a_full_unet(svd_model):
    w = weights_for("svd_v2", unet_sd={"x": torch.zeros(1)}, unet_name="unet.bin")
    with pytest.raises(ValueError, match="unet.bin is not a full SVD UNet") as e:
        cx.apply_controlnext(svd_model, w, torch.rand(1, 64, 64, 3))
    assert "['x']" in str(e.value) and "missing from the file" in str(e.value)


def test_call_transformer_options_puts_the_patches_first_once():
    """A direct UNet call (training) orders the injection as the sampler does:
    first in each list, once, even when the given options already hold it;
    the given lists are not changed."""
    def other(h, hsp, transformer_options):
        return h, hsp

    given = {"patches": {"output_block_patch": [other, cx.output_block_patch]}}
    options = cx.call_transformer_options(cx.ControlNeXtCall("sum", {}), given)
    assert options["patches"]["output_block_patch"] == [cx.output_block_patch, other]
    assert options["patches"]["input_block_patch_after_skip"] == [cx.input_block_patch_after_skip]
    assert given["patches"]["output_block_patch"] == [other, cx.output_block_patch]


def test_bad_mask_message_names_what_was_found(sd15_model):
    w = weights_for("sd15_training", seed=13)
    with pytest.raises(ValueError, match=r"MASK shaped \(B, H, W\) or \(H, W\), got a tensor shaped \(1, 1, 8, 8\)"):
        cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3), mask=torch.ones(1, 1, 8, 8))
