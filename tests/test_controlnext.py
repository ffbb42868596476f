"""ControlNeXt on the real ComfyUI runtime: formats, module, injection.

Models are small ComfyUI UNets whose widths at the injection points are the
real ones (320 after conv_in / level 0, 1280 at the bottom), so every
variant's feature lands on a tensor of its trained shape (tests/controlnext_common.py).
UNet weight patches: test_controlnext_unet_weights.py; refusals: test_controlnext_bad_input.py.
"""

from __future__ import annotations

import copy

import pytest
import safetensors.torch
import torch

import comfy.supported_models as sm

from model_patches import controlnext as cx
from model_patches.balance import add_com
from headless import synthetic as syn

from conftest import assert_same_up_to_fp32_order
from controlnext_reference import OFFICIAL_PARAMS, official_shapes, reference_injection, reference_module, synthetic_state_dict

from controlnext_common import CPU, LAYOUT_OF, sd15_model, sdxl_model, sdxl_wide_model, svd_model, model_for, weights_for, patched_with_recorder, run_model, sigmas_for  # noqa: F401 (fixtures)


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
    assert_same_up_to_fp32_order(together, separate)


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
