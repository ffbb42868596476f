"""MIControlNet with SD3 / SD3.5 ControlNets in real ComfyUI MMDiT forwards.

The base is ComfyUI's own SD3 model class (small config), the ControlNets are
state dicts in the released layouts (diffusers ``SD3ControlNetModel`` and
Stability's SD3.5 layout) loaded by ``comfy.controlnet.load_controlnet_state_dict``.
References for the balancing are written here from the paper's equations
(eq. 8, 9-10, 12), independently of model_patches/balance.py; core's own
chain is the reference for ``vanilla``.
"""

import pytest
import torch

import comfy.controlnet
import comfy.model_patcher
import comfy.sample
import comfy.sd
import nodes as comfy_nodes

from model_patches import mi_control
from model_patches.injection import dit_sites
from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings
from headless import synthetic_dit as sd
from headless import synthetic_sd3 as s3

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_grad():
    """Forwards as the sampler runs them: without autograd (ComfyUI's weights require grad)."""
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def sd3():
    model = s3.build_sd3_model()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()})
    load = comfy.controlnet.load_controlnet_state_dict
    cns = [load(s3.sd3_controlnet_state_dict(num_blocks=2, latent_channels=16, seed=k, residual_gain=3.0))
           for k in (31, 32)]
    cn35 = load(sd.sd35_controlnet_state_dict(seed=33, residual_gain=3.0))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    neg = [[torch.randn(1, 7, 4096, generator=g) * 0.5, {"pooled_output": torch.zeros(1, 2048)}]]
    left = torch.zeros(1, 64, 64, 3)
    left[:, 8:56, 4:28] = torch.rand(1, 48, 24, 3, generator=g)
    right = torch.zeros(1, 64, 64, 3)
    right[:, 8:56, 36:60] = torch.rand(1, 48, 24, 3, generator=g)
    return {"model": model, "patcher": patcher, "vae": vae, "cns": cns, "cn35": cn35, "pos": pos, "neg": neg,
            "images": [left, right]}


def with_settings(patcher, mode, granularity="layer", max_lambda=20.0, record=True):
    return MIControlNetSettings.execute(patcher, mode, granularity, max_lambda, record).args[0]


def mi_apply(rt, pos, neg, cn, image, strength=1.0, mask=None):
    return MIControlNetApply.execute(pos, neg, cn, image, strength, 0.0, 1.0, rt["vae"], mask).args


def core_apply(rt, pos, neg, cn, image, strength=1.0):
    return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(pos, neg, cn, image, strength, 0.0, 1.0,
                                                                  vae=rt["vae"])


def sample(patcher, pos, neg, steps=2, seed=0):
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, 4.0, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


def batch(rt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    sigma = torch.full((2,), 0.8)
    context = torch.cat([rt["neg"][0][0], rt["pos"][0][0]])  # uncond rows first
    y = torch.cat([rt["neg"][0][1]["pooled_output"], rt["pos"][0][1]["pooled_output"]])
    return x, sigma, context, y


def forward(model, control, x, sigma, context, y, labels=(1, 0), patches_replace=None):
    """One batched model call the way the sampler makes it (samplers.py:302-326)."""
    to = {"cond_or_uncond": list(labels), "sigmas": sigma[:1]}
    if patches_replace is not None:
        to["patches_replace"] = patches_replace
    cond = {"c_crossattn": context, "y": y, "transformer_options": to}
    ctrl = control.get_control(x, sigma, cond, len(labels), to) if control is not None else None
    return model.apply_model(x, sigma, c_crossattn=context, y=y, control=ctrl, transformer_options=to)


def prepare(rt, control, mode="micontrolnet", granularity="layer"):
    control.pre_run(rt["model"], rt["model"].model_sampling.percent_to_sigma)
    return {"balanced_control_settings": mi_control.settings_dict(mode, granularity, 20.0)}


# --- independent reference (eqs. 8, 9-10, 12) -----------------------------------------

def ref_lambda_star(v1, v2, dims):
    v1, v2 = v1.double(), v2.double()
    d = v2 - v1
    den = (d * d).sum(dims, keepdim=True)
    lam = torch.where(den > 0, (d * v2).sum(dims, keepdim=True) / torch.where(den > 0, den, 1), 0.5)
    return lam.clamp(0, 1)


def ref_combine(f1, f2, dims):
    ls = ref_lambda_star(f1, f2, dims)
    return (1 - ls) * f1.double() + ls * f2.double()


def ref_inject(fe, fc, dims, max_lambda=20.0):
    ls = ref_lambda_star(fe, fc, dims)
    lam = torch.where(ls < 1, ls / (1 - ls), torch.full_like(ls, max_lambda)).clamp(0, max_lambda)
    return (fe.double() + lam * fc.double()).to(fe.dtype)


def core_residuals(rt, cn, image, strength, x, sigma, context, y, labels=(1, 0)):
    """A core ControlNet's own output dict, through core's get_control."""
    c = cn.copy().set_cond_hint(image.movedim(-1, 1), strength, (0.0, 1.0), vae=rt["vae"])
    c.pre_run(rt["model"], rt["model"].model_sampling.percent_to_sigma)
    to = {"cond_or_uncond": list(labels), "sigmas": sigma[:1]}
    return c.get_control(x, sigma, {"c_crossattn": context, "y": y}, len(labels), to)


def reference_forward(rt, x, sigma, context, y, residuals, dims):
    """MMDiT forward with the two controls' slot-i residuals combined (eq. 12) and
    injected (eqs. 9-10) after joint block i by replace patches written here."""
    n_blocks = len(rt["model"].diffusion_model.joint_blocks)

    def patch_for(i):
        def patch(args, extra):
            out = extra["original_block"](args)
            rs = [d["output"][i] for d in residuals if i < len(d["output"]) and d["output"][i] is not None]
            if rs:
                fc = rs[0].double() if len(rs) == 1 else ref_combine(rs[0], rs[1], dims)
                out = {**out, "img": ref_inject(out["img"], fc, dims)}
            return out
        return patch

    replace = {"dit": {("double_block", i): patch_for(i) for i in range(n_blocks)}}
    return forward(rt["model"], None, x, sigma, context, y, patches_replace=replace)


# --- vanilla = core ----------------------------------------------------------------------

@pytest.mark.parametrize("which", ["two_sd3", "sd3_and_sd35"])
def test_vanilla_equals_core_chain_bit_for_bit(sd3, which):
    """Two DiT ControlNets under vanilla give core's image exactly (before: the MI
    residuals reached no MMDiT block and the image was neither core's nor balanced)."""
    a, b = sd3["cns"][0], (sd3["cns"][1] if which == "two_sd3" else sd3["cn35"])
    left, right = sd3["images"]
    plain_before = sample(sd3["patcher"], sd3["pos"], sd3["neg"])
    p, n = core_apply(sd3, sd3["pos"], sd3["neg"], a, left, 0.9)
    p, n = core_apply(sd3, p, n, b, right, 1.2)
    core = sample(sd3["patcher"], p, n)
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], a, left, 0.9)
    p, n = mi_apply(sd3, p, n, b, right, 1.2)
    ours = sample(with_settings(sd3["patcher"], "vanilla"), p, n)
    assert torch.equal(ours, core)
    balanced = sample(with_settings(sd3["patcher"], "micontrolnet"), p, n)
    assert torch.isfinite(balanced).all() and not torch.allclose(balanced, core, atol=1e-4)
    # nothing leaks: a graph without our nodes afterwards equals the same graph run before ours
    assert torch.equal(sample(sd3["patcher"], sd3["pos"], sd3["neg"]), plain_before)
    assert not sd3["patcher"].model_options.get("transformer_options", {}).get("patches_replace")


def test_nothing_leaks_between_prompts(sd3):
    plain = sample(sd3["patcher"], sd3["pos"], sd3["neg"])
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    p, n = mi_apply(sd3, p, n, sd3["cns"][1], sd3["images"][1])
    sample(with_settings(sd3["patcher"], "micontrolnet"), p, n)
    assert torch.equal(sample(sd3["patcher"], sd3["pos"], sd3["neg"]), plain)


# --- combination and injection against the equations ------------------------------------

@pytest.mark.parametrize("granularity,dims", [("layer", (1, 2)), ("pixel", (2,))])
def test_balanced_forward_matches_the_equations(sd3, granularity, dims):
    x, sigma, context, y = batch(sd3)
    left, right = sd3["images"]
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], left, 0.9)
    p, n = mi_apply(sd3, p, n, sd3["cns"][1], right, 1.3)
    control = p[0][1]["control"]
    settings = prepare(sd3, control, granularity=granularity)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **settings}
    cond = {"c_crossattn": context, "y": y, "transformer_options": to}
    ctrl = control.get_control(x, sigma, cond, 2, to)
    out = sd3["model"].apply_model(x, sigma, c_crossattn=context, y=y, control=ctrl, transformer_options=to)

    r0 = core_residuals(sd3, sd3["cns"][0], left, 0.9, x, sigma, context, y)
    r1 = core_residuals(sd3, sd3["cns"][1], right, 1.3, x, sigma, context, y)
    ref = reference_forward(sd3, x, sigma, context, y, [r0, r1], dims)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()
    no_control = forward(sd3["model"], None, x, sigma, context, y)
    assert (out - no_control).abs().max() > 1e-3
    rec = control.last_balance_record
    assert [layer["layer"] for layer in rec.layers] == ["joint block 0", "joint block 1", "joint block 2"]
    # the record is drawn at the latent's 4x4 patch grid
    assert rec.layers[0]["feature_magnitude"].shape == (2, 4, 4)


def test_core_control_in_the_chain_stays_a_plain_sum(sd3):
    """A core ControlNet before two MI ones: core adds its residual after our block
    patch, so f_e excludes it (unlike the UNet)."""
    x, sigma, context, y = batch(sd3, seed=4)
    left, right = sd3["images"]
    p, n = core_apply(sd3, sd3["pos"], sd3["neg"], sd3["cn35"], left, 0.7)
    p, n = mi_apply(sd3, p, n, sd3["cns"][0], left)
    p, n = mi_apply(sd3, p, n, sd3["cns"][1], right)
    control = p[0][1]["control"]
    settings = prepare(sd3, control)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **settings}
    cond = {"c_crossattn": context, "y": y, "transformer_options": to}
    ctrl = control.get_control(x, sigma, cond, 2, to)
    out = sd3["model"].apply_model(x, sigma, c_crossattn=context, y=y, control=ctrl, transformer_options=to)

    core = core_residuals(sd3, sd3["cn35"], left, 0.7, x, sigma, context, y)
    r0 = core_residuals(sd3, sd3["cns"][0], left, 1.0, x, sigma, context, y)
    r1 = core_residuals(sd3, sd3["cns"][1], right, 1.0, x, sigma, context, y)
    n_blocks = len(sd3["model"].diffusion_model.joint_blocks)

    def patch_for(i):
        def patch(args, extra):
            out_ = extra["original_block"](args)
            rs = [d["output"][i] for d in (r0, r1) if i < len(d["output"])]
            if rs:
                out_ = {**out_, "img": ref_inject(out_["img"], ref_combine(rs[0], rs[1], (1, 2)), (1, 2))}
            return out_
        return patch

    to2 = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1],
           "patches_replace": {"dit": {("double_block", i): patch_for(i) for i in range(n_blocks)}}}
    ref = sd3["model"].apply_model(x, sigma, c_crossattn=context, y=y, control=core, transformer_options=to2)
    assert torch.allclose(out, ref, rtol=1e-4, atol=1e-4), (out - ref).abs().max()


def test_rows_are_balanced_independently(sd3):
    """Changing the uncond row's input leaves the cond row's output unchanged."""
    x, sigma, context, y = batch(sd3, seed=2)
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    p, n = mi_apply(sd3, p, n, sd3["cns"][1], sd3["images"][1])
    control = p[0][1]["control"]
    for granularity in ("layer", "pixel"):
        settings = prepare(sd3, control, granularity=granularity)

        def run(x_):
            to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **settings}
            cond = {"c_crossattn": context, "y": y, "transformer_options": to}
            ctrl = control.get_control(x_, sigma, cond, 2, to)
            return sd3["model"].apply_model(x_, sigma, c_crossattn=context, y=y, control=ctrl,
                                            transformer_options=to)

        a = run(x)
        x2 = x.clone()
        x2[0] = torch.randn_like(x2[0]) * 3
        b = run(x2)
        assert not torch.allclose(a[0], b[0])
        assert torch.allclose(a[1], b[1], rtol=1e-5, atol=1e-5), (a[1] - b[1]).abs().max()


# --- bad input ------------------------------------------------------------------------------

def test_wrong_base_fails_in_pre_run_naming_both(sd3):
    from headless import synthetic as s

    unet = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    with pytest.raises(ValueError, match=r"SD3/SD3.5 \(MMDiT\) ControlNet \(ControlNet, width 256.*"
                                         r"the model is UNet \(SD1.5/SDXL\) \(UNetModel"):
        p[0][1]["control"].pre_run(unet, unet.model_sampling.percent_to_sigma)


def test_a_control_without_a_dit_site_is_refused_on_a_dit_model(sd3):
    """A UNet ControlNet (or any control the DiT sites cannot place, e.g. ComfyUI 0.28's
    Qwen-Image "Fun" ControlNet) on an SD3 model fails in pre_run instead of being left unused."""
    from headless import synthetic as s

    unet_cn = comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(s.TINY_SD15_UNET, seed=5))
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], unet_cn, sd3["images"][0])
    with pytest.raises(ValueError, match=r"this control \(ControlNet\) cannot be balanced on this model "
                                         r"\(SD3/SD3.5 \(MMDiT\)\).*Use core's Apply ControlNet"):
        p[0][1]["control"].pre_run(sd3["model"], sd3["model"].model_sampling.percent_to_sigma)


def test_residual_that_does_not_fit_fails_at_the_first_step(sd3):
    x, sigma, context, y = batch(sd3)
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    control = p[0][1]["control"]
    settings = prepare(sd3, control)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **settings}
    inj = dit_sites.dit_injection_for_call(to, "sd3", x.shape, mi_control.BalanceSettings(), "the model")
    inj.add("wide", {"output": [torch.zeros(2, 16, 300)]}, None)
    with pytest.raises(ValueError, match=r"wide: its residual for SD3/SD3.5 \(MMDiT\) joint block 0 does not fit: "
                                         r"residuals wide \(2, 16, 300\); the block's image tokens are "
                                         r"\(2, 16, 256\).*model: the model"):
        sd3["model"].apply_model(x, sigma, c_crossattn=context, y=y, control=None, transformer_options=to)


def test_hunyuan_is_refused_with_a_reason():
    import comfy.ldm.hydit.controlnet

    class Fake(comfy.ldm.hydit.controlnet.HunYuanControlNet):
        def __init__(self):
            torch.nn.Module.__init__(self)

    cn = comfy.controlnet.ControlNet(Fake(), load_device=CPU)
    with pytest.raises(ValueError, match=r"HunyuanDiT ControlNets cannot be balanced: core folds their residual "
                                         r"into the skip input"):
        mi_control.MinimalImpactControl.create(cn, torch.zeros(1, 3, 8, 8), 1.0, (0.0, 1.0))


def test_balance_map_draws_each_joint_block_at_the_patch_grid(sd3):
    from balanced_control.nodes.micontrolnet import MIControlNetBalanceMap

    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    p, n = mi_apply(sd3, p, n, sd3["cns"][1], sd3["images"][1])
    out = sample(with_settings(sd3["patcher"], "micontrolnet", granularity="pixel"), p, n)
    rec = mi_control.find_balance_record(p)
    assert rec.site == "transformer" and len(rec.layers) == 3
    for layer in rec.layers:
        assert layer["feature_magnitude"].shape[-2:] == (4, 4)
        assert layer["weights"][0].shape[-2:] == (4, 4)  # one weight per token in pixel granularity
    image = MIControlNetBalanceMap.execute(p, {"samples": out}, 32).args[0]
    assert image.ndim == 4 and image.shape[-1] == 3
    # the controls cover the left / right halves: their colours dominate on opposite sides of a block
    assert (image[0, ..., 0] > 0.5).any() and (image[0, ..., 1] > 0.5).any()


def test_mask_limits_the_residual_tokens(sd3):
    """A mask over the left half zeroes the residual tokens of the right half (2x2 patch grid)."""
    x, sigma, context, y = batch(sd3)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :32] = 1.0
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0], mask=mask)
    control = p[0][1]["control"]
    settings = prepare(sd3, control)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **settings}
    cond = {"c_crossattn": context, "y": y, "transformer_options": to}
    control.get_control(x, sigma, cond, 2, to)
    inj = to[mi_control.INJECTION_KEY]
    r = inj.entries[0].lists["output"][0]
    grid = r.view(2, 4, 4, -1)
    assert grid[:, :, 2:].abs().max() == 0 and grid[:, :, :2].abs().max() > 0


def test_refine_control_injection_checks_finiteness():
    """Refine-Control's per-block add^inj is the engine's: NaN residuals are named after the forward."""
    from model_patches import refine_control_runtime as rt

    to = {"cond_or_uncond": [0], "sigmas": torch.tensor([0.5])}
    inj = rt.BlockInjection.for_call(to, "token", 20.0, "RC", (1, 16, 4, 4))
    good = torch.randn(1, 4, 8)
    inj.add([good], to)
    img = torch.randn(1, 4, 8)
    out = to["patches_replace"]["dit"][("double_block", 0)]({"img": img, "txt": None},
                                                          {"original_block": lambda a: dict(a)})
    assert not torch.equal(out["img"], img)
    inj.finish()
    assert inj.record is None  # no node draws a map for Refine-Control

    to = {"cond_or_uncond": [0]}
    inj = rt.BlockInjection.for_call(to, "layer", 20.0, "RC")
    inj.add([torch.full((1, 4, 8), float("nan"))], to)
    to["patches_replace"]["dit"][("double_block", 0)]({"img": img, "txt": None}, {"original_block": lambda a: dict(a)})
    with pytest.raises(FloatingPointError, match=r"RC: its residual for transformer layer 'joint block 0'.* holds NaN or Inf"):
        inj.finish()


def test_balance_map_after_vanilla_on_a_dit_says_why_there_is_none(sd3):
    p, n = mi_apply(sd3, sd3["pos"], sd3["neg"], sd3["cns"][0], sd3["images"][0])
    sample(with_settings(sd3["patcher"], "vanilla"), p, n, steps=1)
    assert mi_control.find_balance_record(p) is None
    assert "mode is vanilla on a DiT model" in mi_control.explain_missing_record(p)
