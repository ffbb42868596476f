"""MIControlNet inside real ComfyUI UNet forwards and real sampling runs.

Models are built with comfy.supported_models (tiny SD1.5-style configs),
ControlNets go through comfy.controlnet's real loader, sampling through
comfy.sample. References for the balancing are written here from the
paper's formulas, independently of model_patches/balance.py.
"""

import copy

import pytest
import torch

import comfy.controlnet
import comfy.model_patcher
import comfy.sample
import comfy.samplers
import nodes as comfy_nodes

from model_patches import mi_control
from model_patches.injection.unet_sites import UNetInjection
from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetBalanceMap, MIControlNetSettings
from headless import synthetic as s

CPU = torch.device("cpu")


# --- fixtures -------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    cns = [comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(s.TINY_SD15_UNET, seed=k))
           for k in (21, 22, 23)]
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    # Control images: edges on the left half / on the right half (silent elsewhere).
    left = torch.zeros(1, 64, 64, 3)
    left[:, 8:56, 4:28] = (torch.rand(1, 48, 24, 3, generator=g) > 0.7).float()
    right = torch.zeros(1, 64, 64, 3)
    right[:, 8:56, 36:60] = (torch.rand(1, 48, 24, 3, generator=g) > 0.7).float()
    return {"model": model, "patcher": patcher, "cns": cns, "pos": pos, "neg": neg, "images": [left, right, left.flip(1)]}


def with_settings(patcher, mode, granularity="layer", max_lambda=20.0):
    return MIControlNetSettings.execute(patcher, mode, granularity, max_lambda, True).args[0]


def mi_apply(pos, neg, cn, image, strength=1.0, mask=None, start=0.0, end=1.0):
    return MIControlNetApply.execute(pos, neg, cn, image, strength, start, end, None, mask).args


def sample(patcher, pos, neg, steps=2, seed=0, cfg=5.0):
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def one_forward(model, control, transformer_options, x, sigma, context):
    """What the sampler does for one batched model call."""
    batched = len(transformer_options["cond_or_uncond"])
    cond = {"c_crossattn": context, "transformer_options": transformer_options}
    ctrl = control.get_control(x, sigma, cond, batched, transformer_options)
    return model.apply_model(x, sigma, c_crossattn=context, control=ctrl, transformer_options=transformer_options)


def prepare(model, control):
    control.pre_run(model, model.model_sampling.percent_to_sigma)


# --- independent reference --------------------------------------------------------

def ref_lambda_star(v1, v2):
    v1, v2 = v1.double().flatten(1), v2.double().flatten(1)
    d = v2 - v1
    den = (d * d).sum(1)
    lam = torch.where(den > 0, (d * v2).sum(1) / torch.where(den > 0, den, 1), 0.5)
    return lam.clamp(0, 1).view(-1, 1, 1, 1)


def ref_inject(fe, fc, max_lambda=20.0):
    ls = ref_lambda_star(fe, fc)
    lam = torch.where(ls < 1, ls / (1 - ls), torch.full_like(ls, max_lambda)).clamp(0, max_lambda)
    return (fe.double() + lam * fc.double()).to(fe.dtype)


def ref_combine(f1, f2):
    ls = ref_lambda_star(f1, f2)
    return ((1 - ls) * f1.double() + ls * f2.double()).to(f1.dtype)


def core_residuals(cn, image, strength, model, x, sigma, context, cond_or_uncond):
    """The residuals a core ControlNet produces, through core's own get_control."""
    c = cn.copy().set_cond_hint(image.movedim(-1, 1), strength, (0.0, 1.0))
    c.pre_run(model, model.model_sampling.percent_to_sigma)
    to = {"cond_or_uncond": list(cond_or_uncond), "sigmas": sigma[:1]}
    return c.get_control(x, sigma, {"c_crossattn": context}, len(cond_or_uncond), to)


def reference_forward(model, x, sigma, context, core_sum, mi_list, inject):
    """UNet forward where core's control dict is summed in (core semantics) and the
    minimal-impact residuals are combined with eq. 12 and injected with `inject`,
    by patches defined here."""
    mi = [{k: list(v) for k, v in d.items()} for d in mi_list]
    state = {"first": True}

    def combine(key):
        rs = [d[key].pop() for d in mi if d.get(key)]
        rs = [r for r in rs if r is not None]
        if not rs:
            return None
        return rs[0] if len(rs) == 1 else ref_combine(rs[0], rs[1])

    def out_patch(h, hsp, to):
        if state["first"]:
            state["first"] = False
            c = combine("middle")
            if c is not None:
                h = inject(h, c)
        c = combine("output")
        if c is not None:
            hsp = inject(hsp, c)
        return h, hsp

    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], "patches": {"output_block_patch": [out_patch]}}
    return model.apply_model(x, sigma, c_crossattn=context, control=core_sum, transformer_options=to)


def batch_inputs(tiny, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, 8, 8, generator=g) * 3
    sigma = torch.full((2,), 4.0)
    context = torch.cat([tiny["neg"][0][0], tiny["pos"][0][0]])  # uncond rows first, as observed in ComfyUI
    return x, sigma, context


# --- tests ----------------------------------------------------------------------------

def test_add_inj_inside_a_real_unet_forward(tiny):
    model, cns, imgs = tiny["model"], tiny["cns"], tiny["images"]
    x, sigma, context = batch_inputs(tiny)
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], 0.9)
    p, n = mi_apply(p, n, cns[1], imgs[1], 1.3)
    control = p[0][1]["control"]
    prepare(model, control)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1]}
    out = one_forward(model, control, to, x, sigma, context)

    r0 = core_residuals(cns[0], imgs[0], 0.9, model, x, sigma, context, [1, 0])
    r1 = core_residuals(cns[1], imgs[1], 1.3, model, x, sigma, context, [1, 0])
    ref = reference_forward(model, x, sigma, context, None, [r0, r1], ref_inject)
    plain = reference_forward(model, x, sigma, context, None, [r0, r1], lambda fe, fc: fe + fc)

    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()
    # The balanced injection must differ measurably from a plain add.
    assert (out - plain).abs().max() > 1e-2
    # Per-row λ: cond and uncond rows get their own coefficients.
    rec = control.last_balance_record
    lam = rec.layers[0]["injection_lambda"].flatten()
    assert lam.shape == (2,) and not torch.allclose(lam[0], lam[1])


def test_rows_are_balanced_independently(tiny):
    """A batched [uncond, cond] call equals two single-row calls."""
    model, cns, imgs = tiny["model"], tiny["cns"], tiny["images"]
    x, sigma, context = batch_inputs(tiny, seed=2)
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0])
    p, n = mi_apply(p, n, cns[1], imgs[1])
    control = p[0][1]["control"]
    prepare(model, control)
    both = one_forward(model, control, {"cond_or_uncond": [1, 0], "sigmas": sigma[:1]}, x, sigma, context)
    rows = [one_forward(model, control, {"cond_or_uncond": [lab], "sigmas": sigma[:1]},
                        x[r:r + 1], sigma[r:r + 1], context[r:r + 1]) for r, lab in ((0, 1), (1, 0))]
    assert torch.allclose(both, torch.cat(rows), rtol=1e-4, atol=1e-4)


def test_core_control_in_the_chain_stays_a_plain_sum(tiny):
    model, cns, imgs = tiny["model"], tiny["cns"], tiny["images"]
    x, sigma, context = batch_inputs(tiny, seed=3)
    # core ControlNet first, then two minimal-impact ones
    p, n = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(tiny["pos"], tiny["neg"], cns[2], imgs[2], 0.7, 0.0, 1.0)
    p, n = mi_apply(p, n, cns[0], imgs[0])
    p, n = mi_apply(p, n, cns[1], imgs[1])
    control = p[0][1]["control"]
    assert isinstance(control.previous_controlnet.previous_controlnet, comfy.controlnet.ControlNet)
    prepare(model, control)
    out = one_forward(model, control, {"cond_or_uncond": [1, 0], "sigmas": sigma[:1]}, x, sigma, context)

    core = core_residuals(cns[2], imgs[2], 0.7, model, x, sigma, context, [1, 0])
    r0 = core_residuals(cns[0], imgs[0], 1.0, model, x, sigma, context, [1, 0])
    r1 = core_residuals(cns[1], imgs[1], 1.0, model, x, sigma, context, [1, 0])
    ref = reference_forward(model, x, sigma, context, core, [r0, r1], ref_inject)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4)


def test_vanilla_mode_matches_core_chain(tiny):
    """mode=vanilla must reproduce ComfyUI's own multi-ControlNet sum exactly."""
    cns, imgs = tiny["cns"], tiny["images"]
    cp, cn_ = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(tiny["pos"], tiny["neg"], cns[0], imgs[0], 0.8, 0.0, 1.0)
    cp, cn_ = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(cp, cn_, cns[1], imgs[1], 1.2, 0.0, 1.0)
    core_out = sample(tiny["patcher"], cp, cn_)

    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], 0.8)
    p, n = mi_apply(p, n, cns[1], imgs[1], 1.2)
    vanilla = sample(with_settings(tiny["patcher"], "vanilla"), p, n)
    balanced = sample(with_settings(tiny["patcher"], "micontrolnet"), p, n)
    star = sample(with_settings(tiny["patcher"], "controlnet_star"), p, n)

    assert torch.allclose(vanilla, core_out, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(balanced, core_out, atol=1e-3)
    assert not torch.allclose(star, core_out, atol=1e-3)
    assert not torch.allclose(star, balanced, atol=1e-3)


def test_silent_control_does_not_suppress_the_other(tiny):
    """ControlNet*: a control with an all-black image contributes (almost) nothing,
    instead of halving the other control as a plain mean would."""
    model, cns, imgs = tiny["model"], tiny["cns"], tiny["images"]
    x, sigma, context = batch_inputs(tiny, seed=4)
    r = core_residuals(cns[0], imgs[0], 1.0, model, x, sigma, context, [1, 0])
    silent = {k: [torch.zeros_like(t) for t in v] for k, v in r.items()}
    inj = UNetInjection(mi_control.BalanceSettings(mode="controlnet_star", record_balance=False),
                                       {"cond_or_uncond": [1, 0]})
    inj.add("a", r, None)
    inj.add("b", silent, None)
    feature = torch.randn_like(r["output"][-1])
    out = inj._inject(feature, "output", "test")
    assert torch.allclose(out, feature + r["output"][-1], atol=1e-5)


def test_mask_limits_the_control_and_is_resized(tiny):
    cns, imgs = tiny["cns"], tiny["images"]
    base = sample(tiny["patcher"], tiny["pos"], tiny["neg"])
    # A mask of another size and aspect than the latent: resized like hints.
    zero_mask = torch.zeros(1, 37, 53)
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], mask=zero_mask)
    assert torch.allclose(sample(tiny["patcher"], p, n), base, atol=1e-5)

    half = torch.zeros(1, 37, 53)
    half[:, :, :26] = 1.0
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], mask=half)
    masked = sample(tiny["patcher"], p, n)
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0])
    unmasked = sample(tiny["patcher"], p, n)
    assert not torch.allclose(masked, base, atol=1e-3)
    assert not torch.allclose(masked, unmasked, atol=1e-3)


def test_sdxl_controlnet_on_sd15_model_names_both(tiny):
    sdxl_cn = comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(s.TINY_SDXL_UNET, seed=5))
    p, n = mi_apply(tiny["pos"], tiny["neg"], sdxl_cn, tiny["images"][0])
    with pytest.raises(ValueError) as err:
        sample(tiny["patcher"], p, n)
    msg = str(err.value)
    assert "does not fit the model" in msg and "SDXL" in msg and "SD1.5" in msg


def test_nonfinite_residual_names_control_and_layer(tiny):
    sd = s.controlnet_state_dict(s.TINY_SD15_UNET, seed=6)
    sd["zero_convs.2.0.weight"][0, 0] = float("inf")
    broken = comfy.controlnet.load_controlnet_state_dict(sd)
    p, n = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0])
    p, n = MIControlNetApply.execute(p, n, broken, tiny["images"][1], 1.0, 0.0, 1.0).args
    with pytest.raises(FloatingPointError) as err:
        sample(tiny["patcher"], p, n)
    msg = str(err.value)
    assert "Apply ControlNet (Minimal Impact)" in msg and "skip" in msg and "NaN or Inf" in msg


def test_nothing_leaks_between_prompts(tiny):
    patcher = tiny["patcher"]
    options_before = copy.deepcopy(patcher.model_options)
    before = sample(patcher, tiny["pos"], tiny["neg"], seed=3)
    p, n = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0])
    p, n = mi_apply(p, n, tiny["cns"][1], tiny["images"][1])
    sample(with_settings(patcher, "micontrolnet", "pixel"), p, n, seed=3)
    after = sample(patcher, tiny["pos"], tiny["neg"], seed=3)
    assert torch.equal(before, after)
    assert patcher.model_options == options_before
    assert "control" not in tiny["pos"][0][1]


def test_pixel_granularity_and_balance_map(tiny):
    p, n = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0])
    p, n = mi_apply(p, n, tiny["cns"][1], tiny["images"][1])
    out = sample(with_settings(tiny["patcher"], "micontrolnet", "pixel"), p, n)
    assert torch.isfinite(out).all()
    rec = mi_control.find_balance_record(p)
    assert rec is not None and rec.settings.granularity == "pixel"
    # Recorded on the last sampling step only (the one the map shows).
    sigmas = comfy.samplers.calculate_sigmas(tiny["model"].model_sampling, "normal", 2)
    assert rec.sigma == pytest.approx(float(sigmas[-2]), rel=1e-4)
    layer = rec.layers[-1]
    assert layer["weights"][0].shape[-2:] == layer["feature_magnitude"].shape[-2:]
    assert len(layer["controls"]) == 2 and layer["controls"][0] != layer["controls"][1]
    image = MIControlNetBalanceMap.execute(p, {"samples": out}, 32).args[0]
    assert image.ndim == 4 and image.shape[-1] == 3 and image.shape[1] > 100
    assert 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # Two controls -> two legend colours present (red and green channels dominate somewhere).
    assert (image[0, ..., 0] > 0.7).any() and (image[0, ..., 1] > 0.7).any()


def test_balance_map_without_record_explains(tiny):
    with pytest.raises(ValueError, match="no balance was recorded"):
        MIControlNetBalanceMap.execute(tiny["pos"], {"samples": torch.zeros(1, 4, 8, 8)}, 32)


def test_node_input_errors(tiny):
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\)"):
        MIControlNetApply.execute(tiny["pos"], tiny["neg"], tiny["cns"][0], torch.zeros(64, 64, 3), 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="Swap"):
        MIControlNetApply.execute(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], 1.0, 0.8, 0.2)
    with pytest.raises(ValueError, match="CONTROL_NET"):
        MIControlNetApply.execute(tiny["pos"], tiny["neg"], "not a controlnet", tiny["images"][0], 1.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="MASK"):
        MIControlNetApply.execute(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], 1.0, 0.0, 1.0,
                                  None, torch.zeros(1, 1, 8, 8))


def test_sdxl_model_with_two_sdxl_controlnets():
    """SDXL-family UNet (class embedding from pooled text + sizes) with two minimal-impact SDXL ControlNets."""
    model = s.build_sdxl_unet_model(s.TINY_SDXL_UNET, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    cns = [comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(s.TINY_SDXL_UNET, seed=k))
           for k in (31, 32)]
    g = torch.Generator().manual_seed(7)
    pos = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    neg = [[torch.randn(1, 77, 2048, generator=g), {"pooled_output": torch.randn(1, 1280, generator=g)}]]
    img = torch.rand(1, 64, 64, 3, generator=g)
    plain = sample(patcher, pos, neg)
    p, n = mi_apply(pos, neg, cns[0], img)
    p, n = mi_apply(p, n, cns[1], img.flip(2))
    balanced = sample(patcher, p, n)
    assert torch.isfinite(balanced).all()
    assert not torch.allclose(balanced, plain, atol=1e-3)
    rec = mi_control.find_balance_record(p)
    # SDXL: 9 skips + the middle block.
    assert len(rec.layers) == 10


class _InputResidualControl(comfy.controlnet.ControlBase):
    """A control that, like a T2I-Adapter, returns 'input' residuals (added before the skip is stored)."""

    def __init__(self, residuals):
        super().__init__()
        self.residuals = residuals

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        return {"input": [r.clone() for r in self.residuals], "middle": [], "output": []}

    def copy(self):
        c = _InputResidualControl(self.residuals)
        self.copy_to(c)
        return c


def test_input_residuals_land_where_core_puts_them(tiny):
    model = tiny["model"]
    x, sigma, context = batch_inputs(tiny, seed=8)
    shapes = []

    def capture(h, to):
        shapes.append(h.shape)
        return h

    model.apply_model(x, sigma, c_crossattn=context,
                      transformer_options={"cond_or_uncond": [1, 0], "patches": {"input_block_patch": [capture]}})
    g = torch.Generator().manual_seed(9)
    # core pops from the end: list[-1] goes to input block 0.
    residuals = [torch.randn(shp, generator=g) for shp in reversed(shapes)]
    core_out = model.apply_model(x, sigma, c_crossattn=context, control={"input": [r.clone() for r in residuals]},
                                 transformer_options={"cond_or_uncond": [1, 0]})
    control = mi_control.MinimalImpactControl(_InputResidualControl(residuals), label="t2i-like")
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1],
          mi_control.SETTINGS_KEY: mi_control.settings_dict("vanilla", "layer", 20.0, True)}
    out = one_forward(model, control, to, x, sigma, context)
    assert torch.allclose(out, core_out, rtol=1e-5, atol=1e-5)
    assert [l["layer"] for l in control.last_balance_record.layers[:2]] == ["input 0", "input 1"]
