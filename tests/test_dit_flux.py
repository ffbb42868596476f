"""MIControlNet with Flux ControlNets (InstantX Union and XLabs layouts) in real
ComfyUI Flux forwards.

On ComfyUI 0.3.75 Flux is 3072 wide whatever the config, so the base has one
double and one single block, the ControlNets one double block (InstantX also
one single block), everything in bf16 and in memory. The references are
core's chain (vanilla) and the paper's equations written here.
"""

import pytest
import torch

import comfy.controlnet
import comfy.model_patcher
import comfy.sample
import comfy.sd
import nodes as comfy_nodes
from comfy_extras.nodes_controlnet import SetUnionControlNetType

from model_patches import mi_control
from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings
from headless import synthetic_dit as sd
from headless import synthetic_sd3 as s3

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_grad():
    """Forwards as the sampler runs them: without autograd (ComfyUI's weights require grad)."""
    with torch.no_grad():
        yield
BF16 = {"dtype": torch.bfloat16}


@pytest.fixture(scope="module")
def flux():
    model = sd.build_flux_model()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()})
    load = comfy.controlnet.load_controlnet_state_dict
    union = load(sd.flux_instantx_state_dict(seed=41, residual_gain=4.0), model_options=BF16)
    union = SetUnionControlNetType.execute(union, "depth").args[0]
    xlabs = load(sd.flux_xlabs_state_dict(seed=42, residual_gain=4.0), model_options=BF16)
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 4, 64, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    neg = [[torch.randn(1, 4, 64, generator=g) * 0.5, {"pooled_output": torch.zeros(1, 32)}]]
    left = torch.zeros(1, 64, 64, 3)
    left[:, 8:56, 4:28] = torch.rand(1, 48, 24, 3, generator=g)
    right = torch.zeros(1, 64, 64, 3)
    right[:, 8:56, 36:60] = torch.rand(1, 48, 24, 3, generator=g)
    yield {"model": model, "patcher": patcher, "vae": vae, "union": union, "xlabs": xlabs, "pos": pos,
           "neg": neg, "images": [left, right]}


def with_settings(patcher, mode, granularity="layer"):
    return MIControlNetSettings.execute(patcher, mode, granularity, 20.0, True).args[0]


def chain(rt, apply):
    left, right = rt["images"]
    p, n = apply(rt["pos"], rt["neg"], rt["union"], left, 0.9)
    return apply(p, n, rt["xlabs"], right, 1.2)


def mi(rt):
    return lambda p, n, cn, img, s: MIControlNetApply.execute(p, n, cn, img, s, 0.0, 1.0, rt["vae"], None).args


def core(rt):
    return lambda p, n, cn, img, s: comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        p, n, cn, img, s, 0.0, 1.0, vae=rt["vae"])


def sample(patcher, pos, neg, steps=1):
    latent = torch.zeros(1, 16, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(patcher, noise, steps, 3.0, "euler", "simple", pos, neg, latent, seed=0,
                               disable_pbar=True)


def test_vanilla_equals_core_chain_bit_for_bit(flux):
    p, n = chain(flux, core(flux))
    ref = sample(flux["patcher"], p, n)
    p, n = chain(flux, mi(flux))
    assert torch.equal(sample(with_settings(flux["patcher"], "vanilla"), p, n), ref)
    balanced = sample(with_settings(flux["patcher"], "micontrolnet"), p, n)
    assert torch.isfinite(balanced).all() and not torch.equal(balanced, ref)


# --- one forward against the equations ----------------------------------------------------

def _lam_star(v1, v2, dims):
    v1, v2 = v1.double(), v2.double()
    d = v2 - v1
    den = (d * d).sum(dims, keepdim=True)
    return torch.where(den > 0, (d * v2).sum(dims, keepdim=True) / torch.where(den > 0, den, 1), 0.5).clamp(0, 1)


def ref_combine(f1, f2, dims):
    ls = _lam_star(f1, f2, dims)
    return (1 - ls) * f1.double() + ls * f2.double()


def ref_inject(fe, fc, dims, max_lambda=20.0):
    ls = _lam_star(fe, fc, dims)
    lam = torch.where(ls < 1, ls / (1 - ls), torch.full_like(ls, max_lambda)).clamp(0, max_lambda)
    return fe.double() + lam * fc.double()


def core_output(rt, cn, image, strength, x, sigma, cond, labels):
    c = cn.copy().set_cond_hint(image.movedim(-1, 1), strength, (0.0, 1.0), vae=rt["vae"])
    c.pre_run(rt["model"], rt["model"].model_sampling.percent_to_sigma)
    return c.get_control(x, sigma, cond, len(labels), {"cond_or_uncond": list(labels), "sigmas": sigma[:1]})


def _inputs(rt, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    sigma = torch.full((2,), 0.7)
    context = torch.cat([rt["neg"][0][0], rt["pos"][0][0]])
    y = torch.cat([rt["neg"][0][1]["pooled_output"], rt["pos"][0][1]["pooled_output"]])
    return x, sigma, context, y


def _recording(to, key, state):
    """Wrap our replace patch at ``key``: record the block output before and after it."""
    ours = to["patches_replace"]["dit"][key]

    def outer(args, extra):
        def original(a):
            o = extra["original_block"](a)
            state["pre"] = o["img"].detach().clone()
            return o
        out = ours(args, {"original_block": original})
        state["post"] = out["img"].detach().clone()
        return out

    replace = dict(to["patches_replace"])
    replace["dit"] = {**replace["dit"], key: outer}
    to["patches_replace"] = replace


@pytest.mark.parametrize("granularity,dims", [("layer", (1, 2)), ("pixel", (2,))])
def test_double_and_single_block_injection_match_the_equations(flux, granularity, dims):
    x, sigma, context, y = _inputs(flux)
    p, n = chain(flux, mi(flux))
    control = p[0][1]["control"]
    control.pre_run(flux["model"], flux["model"].model_sampling.percent_to_sigma)
    labels = [1, 0]
    to = {"cond_or_uncond": labels, "sigmas": sigma[:1],
          "balanced_control_settings": mi_control.settings_dict("micontrolnet", granularity, 20.0)}
    cond = {"c_crossattn": context, "y": y, "guidance": None, "transformer_options": to}
    ctrl = control.get_control(x, sigma, cond, 2, to)
    assert ctrl is None  # both controls are ours: core adds nothing
    double, single = {}, {}
    _recording(to, ("double_block", 0), double)
    _recording(to, ("single_block", 0), single)
    flux["model"].apply_model(x, sigma, c_crossattn=context, y=y, control=ctrl, transformer_options=to)

    cond_plain = {"c_crossattn": context, "y": y}
    ru = core_output(flux, flux["union"], flux["images"][0], 0.9, x, sigma, cond_plain, labels)
    rx = core_output(flux, flux["xlabs"], flux["images"][1], 1.2, x, sigma, cond_plain, labels)
    n_img = ru["input"][0].shape[1]
    assert n_img == 16  # the 4x4 patch grid of an 8x8 latent

    ref = ref_inject(double["pre"][:, :n_img], ref_combine(ru["input"][0], rx["input"][0], dims), dims)
    scale = ref.abs().max()
    assert (double["post"][:, :n_img].double() - ref).abs().max() < 2e-2 * scale
    assert (double["post"][:, :n_img] - double["pre"][:, :n_img]).abs().max() > 1e-2 * scale

    txt = context.shape[1]
    assert torch.equal(single["post"][:, :txt], single["pre"][:, :txt])  # text tokens untouched
    ref = ref_inject(single["pre"][:, txt:txt + n_img], ru["output"][0].double(), dims)
    scale = ref.abs().max()
    assert (single["post"][:, txt:txt + n_img].double() - ref).abs().max() < 2e-2 * scale
    rec = control.last_balance_record
    assert [layer["layer"] for layer in rec.layers] == ["double block 0", "single block 0"]
    assert rec.layers[0]["feature_magnitude"].shape == (2, 4, 4)


def test_flux_controlnet_on_sd3_fails_naming_both(flux):
    base = s3.build_sd3_model()
    p, n = chain(flux, mi(flux))
    with pytest.raises(ValueError, match=r"this is a Flux ControlNet \(ControlNetFlux, width 3072.*the model is "
                                         r"SD3/SD3.5 \(MMDiT\) \(OpenAISignatureMMDITWrapper"):
        p[0][1]["control"].pre_run(base, base.model_sampling.percent_to_sigma)


def test_flux_site_slices_and_late_double_slots():
    """Single-block residuals land on img[:, txt_len:txt_len+N] (txt_len learnt at double block 0), and a
    double-block slot added after a singles-only control is still injected."""
    from model_patches.injection import dit_sites

    to = {"cond_or_uncond": [0]}
    settings = mi_control.BalanceSettings(mode="controlnet_star", record_balance=False)
    inj = dit_sites.DiTInjection(settings, to, "flux", latent_shape=(1, 16, 4, 4))
    g = torch.Generator().manual_seed(0)
    r_single, r_double = torch.randn(1, 4, 8, generator=g), torch.randn(1, 4, 8, generator=g)
    inj.add("singles only", {"input": [None], "output": [r_single]}, None)
    inj.add("doubles", {"input": [r_double], "output": []}, None)
    img, txt = torch.randn(1, 4, 8, generator=g), torch.randn(1, 3, 8, generator=g)
    dit = to["patches_replace"]["dit"]
    out = dit[("double_block", 0)]({"img": img, "txt": txt}, {"original_block": lambda a: dict(a)})
    assert torch.equal(out["img"], img + r_double)
    stream = torch.cat([txt, img], 1)
    out = dit[("single_block", 0)]({"img": stream, "transformer_options": {}}, {"original_block": lambda a: dict(a)})
    assert torch.equal(out["img"][:, :3], txt) and torch.equal(out["img"][:, 3:], img + r_single)
    inj.finish()
