"""MIControlNet with Qwen-Image InstantX ControlNets in a real ComfyUI Qwen-Image forward.

ComfyUI's own classes at their fixed width 3072 (one block each, bf16, in
memory); the ControlNets in the InstantX layout loaded by core's loader. The
hint latent is set on the controls directly (a Qwen latent is 5-D and needs
the Wan VAE, which is out of scope here); everything after it is core's path.
"""

import pytest
import torch

import comfy.controlnet

from model_patches import mi_control
from headless import synthetic_dit as sd

from test_dit_flux import _recording, ref_combine, ref_inject

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def qwen():
    with torch.no_grad():
        model = sd.build_qwen_model()
        load = comfy.controlnet.load_controlnet_state_dict
        cns = [load(sd.qwen_instantx_state_dict(seed=k, residual_gain=4.0), model_options={"dtype": torch.bfloat16})
               for k in (61, 62)]
    g = torch.Generator().manual_seed(0)
    hints = [torch.randn(1, 16, 1, 8, 8, generator=g), torch.randn(1, 16, 1, 8, 8, generator=g)]
    hints[0][..., 4:] = 0  # the first control is silent on the right, the second on the left
    hints[1][..., :4] = 0
    context = torch.randn(2, 5, 3584, generator=g)
    x = torch.randn(2, 16, 1, 8, 8, generator=g)
    return {"model": model, "cns": cns, "hints": hints, "context": context, "x": x}


def _with_hint(control, hint):
    """A control whose hint latent is ``hint`` (core would VAE-encode an image to it)."""
    target = getattr(control, "inner", control)
    target.cond_hint = hint.to(target.manual_cast_dtype or target.control_model.dtype)
    return control


def _core_chain(rt, strengths):
    prev = None
    for cn, hint, s in zip(rt["cns"], rt["hints"], strengths):
        c = cn.copy().set_cond_hint(torch.zeros(1, 3, 64, 64), s, (0.0, 1.0))
        c.set_previous_controlnet(prev)
        prev = _with_hint(c, hint)
    return prev


def _mi_chain(rt, strengths):
    prev = None
    for cn, hint, s in zip(rt["cns"], rt["hints"], strengths):
        c = mi_control.MinimalImpactControl.create(cn, torch.zeros(1, 3, 64, 64), s, (0.0, 1.0))
        c.set_previous_controlnet(prev)
        prev = _with_hint(c, hint)
    return prev


def _forward(rt, control, settings=None, record=None):
    model, x, context = rt["model"], rt["x"], rt["context"]
    sigma = torch.full((2,), 0.6)
    control.pre_run(model, model.model_sampling.percent_to_sigma)
    to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1]}
    if settings:
        to["balanced_control_settings"] = mi_control.settings_dict(*settings)
    cond = {"c_crossattn": context, "transformer_options": to}
    ctrl = control.get_control(x, sigma, cond, 2, to)
    if record is not None:
        _recording(to, ("double_block", 0), record)
    return model.apply_model(x, sigma, c_crossattn=context, control=ctrl, transformer_options=to), ctrl


def test_vanilla_equals_core_chain_bit_for_bit(qwen):
    core, _ = _forward(qwen, _core_chain(qwen, (0.8, 1.1)))
    ours, _ = _forward(qwen, _mi_chain(qwen, (0.8, 1.1)), ("vanilla", "layer", 20.0))
    assert torch.equal(ours, core)


@pytest.mark.parametrize("granularity,dims", [("layer", (1, 2)), ("pixel", (2,))])
def test_block_injection_matches_the_equations(qwen, granularity, dims):
    state = {}
    out, ctrl = _forward(qwen, _mi_chain(qwen, (0.8, 1.1)), ("micontrolnet", granularity, 20.0), record=state)
    assert ctrl is None
    # each control alone, through core's get_control
    own = []
    for cn, hint, s in zip(qwen["cns"], qwen["hints"], (0.8, 1.1)):
        c = _with_hint(cn.copy().set_cond_hint(torch.zeros(1, 3, 64, 64), s, (0.0, 1.0)), hint)
        c.pre_run(qwen["model"], qwen["model"].model_sampling.percent_to_sigma)
        sigma = torch.full((2,), 0.6)
        own.append(c.get_control(qwen["x"], sigma, {"c_crossattn": qwen["context"]}, 2,
                                 {"cond_or_uncond": [1, 0], "sigmas": sigma[:1]})["input"][0])
    n = own[0].shape[1]
    assert n == 16
    ref = ref_inject(state["pre"][:, :n], ref_combine(own[0], own[1], dims), dims)
    scale = ref.abs().max()
    assert (state["post"][:, :n].double() - ref).abs().max() < 2e-2 * scale
    assert (state["post"][:, :n] - state["pre"][:, :n]).abs().max() > 1e-2 * scale
    assert torch.isfinite(out).all()
