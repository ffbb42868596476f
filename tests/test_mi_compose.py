"""Minimal-impact controls composed with ComfyUI's own model patches.

FreeU, FreeU_V2, Deep Shrink (PatchModelAddDownscale), PAG and SAG are
applied with ComfyUI's node classes to a tiny SD1.5-style model; sampling
runs through comfy.sample. ``vanilla`` mode must give core's image bit for
bit, because our injections run where core adds its residuals.
"""

import logging

import pytest
import torch

import nodes as comfy_nodes
from comfy_extras.nodes_freelunch import FreeU, FreeU_V2
from comfy_extras.nodes_model_downscale import PatchModelAddDownscale
from comfy_extras.nodes_pag import PerturbedAttentionGuidance
from comfy_extras.nodes_sag import SelfAttentionGuidance

from model_patches import mi_control
from model_patches.injection import unet_sites
from model_patches.injection import engine
from model_patches.unet_patches import HAS_MIDDLE_BLOCK_AFTER_PATCH

from test_mi_sampling import batch_inputs, mi_apply, one_forward, prepare, sample, tiny, with_settings  # noqa: F401

PATCHES = {
    "freeu": lambda m: FreeU().patch(m, 1.3, 1.4, 0.9, 0.2)[0],
    "freeu_v2": lambda m: FreeU_V2().patch(m, 1.3, 1.4, 0.9, 0.2)[0],
    "deep_shrink": lambda m: PatchModelAddDownscale.execute(m, 1, 2.0, 0.0, 0.6, False, "bicubic", "bicubic").args[0],
    "deep_shrink_after_skip": lambda m: PatchModelAddDownscale.execute(m, 1, 2.0, 0.0, 0.6, True, "bilinear",
                                                                       "bilinear").args[0],
    "pag": lambda m: PerturbedAttentionGuidance.execute(m, 2.0).args[0],
    "sag": lambda m: SelfAttentionGuidance.execute(m, 0.5, 2.0).args[0],
}


def core_and_mi_conditionings(tiny, strengths=(0.8, 1.2)):
    cns, imgs = tiny["cns"], tiny["images"]
    apply = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
    cp, cn_ = apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], strengths[0], 0.0, 1.0)
    cp, cn_ = apply(cp, cn_, cns[1], imgs[1], strengths[1], 0.0, 1.0)
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], strengths[0])
    p, n = mi_apply(p, n, cns[1], imgs[1], strengths[1])
    return (cp, cn_), (p, n)


@pytest.mark.parametrize("name", list(PATCHES))
def test_vanilla_equals_core_with_model_patches(tiny, name):
    patched = PATCHES[name](tiny["patcher"])
    lists_before = {k: list(v) for k, v in patched.model_options["transformer_options"].get("patches", {}).items()}
    (cp, cn_), (p, n) = core_and_mi_conditionings(tiny)
    core = sample(patched, cp, cn_, steps=3)
    # The patch really changes core's image (the comparison below is not vacuous).
    assert not torch.equal(core, sample(tiny["patcher"], cp, cn_, steps=3))
    vanilla = sample(with_settings(patched, "vanilla"), p, n, steps=3)
    assert torch.equal(vanilla, core), (vanilla - core).abs().max()
    for mode in ("micontrolnet", "controlnet_star"):
        out = sample(with_settings(patched, mode), p, n, steps=3)
        assert torch.isfinite(out).all()
        assert not torch.allclose(out, core, atol=1e-3)
    # The model's own patch lists are untouched by the sampling runs.
    assert patched.model_options["transformer_options"].get("patches", {}) == lists_before


def test_our_patches_run_first_and_others_stay(tiny):
    patched = PATCHES["freeu"](tiny["patcher"])
    freeu_patch = patched.model_options["transformer_options"]["patches"]["output_block_patch"][0]
    p, _ = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0])
    control = p[0][1]["control"]
    prepare(tiny["model"], control)
    to = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0])
    x, sigma, context = batch_inputs(tiny)
    to["sigmas"] = sigma[:1]
    control.get_control(x, sigma, {"c_crossattn": context}, 2, to)
    inj = to[unet_sites.INJECTION_KEY]
    assert to["patches"]["output_block_patch"] == [inj.output_block_patch, freeu_patch]
    assert to["patches"]["input_block_patch"][0] == inj.input_block_patch
    if HAS_MIDDLE_BLOCK_AFTER_PATCH:
        assert to["patches"]["middle_block_after_patch"][0] == inj.middle_block_after_patch
    # The model's own lists are not mutated.
    assert patched.model_options["transformer_options"]["patches"]["output_block_patch"] == [freeu_patch]


def _our_warnings(caplog):
    return [r for r in caplog.records if r.name == engine.__name__ and "not applied" in r.getMessage()]


def test_deep_shrink_skips_resized_residuals_with_one_warning_per_call(tiny, caplog):
    """Channels fit, sizes differ: skipped like core's apply_control, one warning for the whole call."""
    patched = PATCHES["deep_shrink"](tiny["patcher"])
    model = tiny["model"]
    p, _ = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0])
    control = p[0][1]["control"]
    prepare(model, control)
    x, sigma, context = batch_inputs(tiny)
    sigma = torch.full((2,), float(model.model_sampling.percent_to_sigma(0.1)))  # inside Deep Shrink's range
    to = dict(patched.model_options["transformer_options"], cond_or_uncond=[1, 0], sigmas=sigma[:1],
              **{mi_control.SETTINGS_KEY: mi_control.settings_dict("micontrolnet", "layer", 20.0, True)})
    with caplog.at_level(logging.WARNING):
        out = one_forward(model, control, to, x, sigma, context)
    assert torch.isfinite(out).all()
    warnings = _our_warnings(caplog)
    assert len(warnings) == 1
    msg = warnings[0].getMessage()
    # Input blocks 1-3 run at half size: the middle and the skips they feed (output blocks 0-2).
    assert "middle" in msg and "output 0 skip" in msg and "output 2 skip" in msg and "Deep Shrink" in msg
    # The residual whose size fits (input block 0's skip, used by output block 3) is still injected.
    layers = [layer["layer"] for layer in control.last_balance_record.layers]
    assert layers == ["output 3 skip"]


def test_channel_mismatch_keeps_the_family_error(tiny):
    inj = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla", record_balance=False),
                                         {"cond_or_uncond": [0]})
    inj.add("cn", {"output": [torch.zeros(1, 32, 4, 4)]}, None)
    with pytest.raises(ValueError, match="made for another base model"):
        inj._inject(torch.zeros(1, 64, 4, 4), "output", "output 0 skip")


def test_hsp_none_and_middle_block_after_patch(tiny, caplog):
    """ComfyUI 0.28's protocol: middle_block_after_patch gets a dict; an output_block_patch
    before ours may have returned hsp=None (its skip merged into h)."""
    inj = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla", record_balance=False),
                                         {"cond_or_uncond": [0]})
    middle, skip0, skip1 = torch.randn(1, 8, 2, 2), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4)
    inj.add("cn", {"middle": [middle], "output": [skip1, skip0]}, None)
    h = torch.randn(1, 8, 2, 2)
    out = inj.middle_block_after_patch({"h": h, "x": None, "transformer_options": {}})
    assert torch.equal(out["h"], h + middle)
    # The middle residual was used once: output block 0 does not add it again.
    h0, hsp0 = inj.output_block_patch(out["h"], torch.zeros(1, 4, 4, 4), {"block": ("output", 0)})
    assert torch.equal(h0, out["h"]) and torch.equal(hsp0, skip0)
    h1, hsp1 = inj.output_block_patch(h0, None, {"block": ("output", 1)})
    assert hsp1 is None and torch.equal(h1, h0)
    with caplog.at_level(logging.WARNING):
        inj.finish()
    msg = " ".join(r.getMessage() for r in _our_warnings(caplog))
    assert "output 1 skip" in msg and "merged it into h" in msg


def test_t2i_adapter_none_entries_do_not_warn(tiny, caplog):
    """SDXL T2I-Adapters give 10 'input' entries for 9 blocks, the last None: no warning."""
    inj = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla", record_balance=False),
                                         {"cond_or_uncond": [0]})
    r = torch.randn(1, 4, 4, 4)
    inj.add("t2i", {"input": [None, r]}, None)  # popped from the end: r goes to input block 0
    inj.input_block_patch(torch.zeros(1, 4, 4, 4), {"block": ("input", 0)})
    with caplog.at_level(logging.WARNING):
        inj.finish()
    assert not [rec for rec in caplog.records if "more layers than the model" in rec.getMessage()]
    inj2 = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla", record_balance=False),
                                          {"cond_or_uncond": [0]})
    inj2.add("cn", {"input": [r, r]}, None)
    inj2.input_block_patch(torch.zeros(1, 4, 4, 4), {"block": ("input", 0)})
    with caplog.at_level(logging.WARNING):
        inj2.finish()
    assert [rec for rec in caplog.records if "more layers than the model" in rec.getMessage()]


def test_controlnext_injection_runs_before_freeu():
    """ControlNeXt's middle injection shares the output-block-0 place: it runs first too,
    whichever order FreeU and ControlNeXt were applied in."""
    from model_patches import controlnext as cx
    from controlnext_common import SD15_CNX_UNET, _patcher, run_model, weights_for
    from headless import synthetic as syn

    model = _patcher(syn.build_unet_model(SD15_CNX_UNET, seed=5))
    w = weights_for("sd15", seed=3)
    assert cx.VARIANTS["sd15"].injection == "middle"
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(4))
    freeu = lambda m: FreeU().patch(m, 1.3, 1.4, 0.9, 0.2)[0]  # noqa: E731
    cnx_then_freeu = freeu(cx.apply_controlnext(model, w, image))
    freeu_then_cnx = cx.apply_controlnext(freeu(model), w, image)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    sigma = torch.full((2,), 2.5)
    a = run_model(cnx_then_freeu, x, sigma, [1, 0])
    b = run_model(freeu_then_cnx, x, sigma, [1, 0])
    assert torch.equal(a, b)
    assert not torch.equal(b, run_model(freeu(model), x, sigma, [1, 0]))


def test_vanilla_arithmetic_is_cores_with_mixed_dtypes():
    """fp32 residuals on an fp16 feature: summed like control_merge (prev + new, residual dtype) and
    added like apply_control's in-place `h += ctrl` (one rounding to fp16)."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import apply_control

    g = torch.Generator().manual_seed(11)
    feature = (torch.randn(2, 8, 4, 4, generator=g) * 30).to(torch.float16)
    r1, r2 = torch.randn(2, 8, 4, 4, generator=g) * 7, torch.randn(1, 8, 4, 4, generator=g) * 7
    core = apply_control(feature.clone(), {"output": [r1 + r2]}, "output")
    inj = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla", record_balance=False),
                                         {"cond_or_uncond": [1, 0]})
    inj.add("a", {"output": [r1]}, None)
    inj.add("b", {"output": [r2]}, None)
    ours = inj._inject(feature, "output", "output 0 skip")
    assert ours.dtype == torch.float16 and torch.equal(ours, core)
    # Casting each residual to fp16 first (the former arithmetic) rounds differently.
    assert not torch.equal(feature + r1.half() + r2.half(), core)
