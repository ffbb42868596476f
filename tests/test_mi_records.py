"""The balance record and map, non-finite diagnostics, reduction memory and
strength scaling of minimal-impact controls, on the real ComfyUI runtime."""

import types

import pytest
import torch

import comfy.sample
import comfy.samplers
from comfy_extras.nodes_freelunch import FreeU_V2
from comfy_extras.nodes_pag import PerturbedAttentionGuidance
from comfy_extras.nodes_sag import SelfAttentionGuidance

from model_patches import balance, mi_control
from model_patches.injection import unet_sites
from model_patches.balance_map import _cell_shape, render_balance_map
from balanced_control.nodes.micontrolnet import MIControlNetBalanceMap, MIControlNetSettings

from test_mi_sampling import mi_apply, tiny, with_settings  # noqa: F401


def run(patcher, pos, neg, steps=2, latent=None, seed=0, cfg=5.0, **kw):
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patcher, noise, steps, cfg, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True, **kw)


def two_controls(tiny, ranges=((0.0, 1.0), (0.0, 1.0))):
    cns, imgs = tiny["cns"], tiny["images"]
    p, n = mi_apply(tiny["pos"], tiny["neg"], cns[0], imgs[0], start=ranges[0][0], end=ranges[0][1])
    return mi_apply(p, n, cns[1], imgs[1], start=ranges[1][0], end=ranges[1][1])


def sigmas(tiny, steps):
    return comfy.samplers.calculate_sigmas(tiny["model"].model_sampling, "normal", steps)


# --- where the record is taken ---------------------------------------------------------

def test_record_when_every_control_ends_early(tiny):
    p, n = two_controls(tiny, ((0.0, 0.5), (0.0, 0.5)))
    run(tiny["patcher"], p, n, steps=4)
    rec = mi_control.find_balance_record(p)
    assert rec is not None
    lo = float(tiny["model"].model_sampling.percent_to_sigma(0.5))
    inputs = [float(s) for s in sigmas(tiny, 4)[:-1]]
    last_active = min(s for s in inputs if s >= lo)
    assert last_active > min(inputs)  # the control really ended before the last step
    assert rec.sigma == pytest.approx(last_active, rel=1e-5)
    assert MIControlNetBalanceMap.execute(p, {"samples": None}, 32).args[0].shape[0] == 1


def test_record_with_a_partial_schedule(tiny):
    """KSamplerAdvanced end_at_step < steps: the schedule never reaches its last positive sigma."""
    p, n = two_controls(tiny)
    run(tiny["patcher"], p, n, steps=4, start_step=0, last_step=2, force_full_denoise=False)
    rec = mi_control.find_balance_record(p)
    assert rec is not None and rec.sigma == pytest.approx(float(sigmas(tiny, 4)[1]), rel=1e-5)


@pytest.mark.parametrize("guidance", ["pag", "sag"])
def test_record_comes_from_the_main_pass_not_the_guidance_pass(tiny, guidance):
    if guidance == "pag":
        model = PerturbedAttentionGuidance.execute(tiny["patcher"], 2.0).args[0]
    else:
        model = SelfAttentionGuidance.execute(tiny["patcher"], 0.5, 2.0).args[0]
    p, n = two_controls(tiny)
    seen = []
    wrapper = lambda apply_model, args: (seen.append(list(args["cond_or_uncond"])), apply_model(  # noqa: E731
        args["input"], args["timestep"], **args["c"]))[1]
    model = model.clone()
    model.set_model_unet_function_wrapper(wrapper)
    run(model, p, n, steps=2)
    assert seen[-1] == [0] and len(seen) == 4  # per step: main pass (both rows), then the guidance pass
    rec = mi_control.find_balance_record(p)
    assert sorted(rec.cond_or_uncond) == [0, 1]
    assert rec.sigma == pytest.approx(float(sigmas(tiny, 2)[1]), rel=1e-5)


def test_inactive_controls_are_named(tiny):
    p, n = two_controls(tiny, ((0.0, 1.0), (0.0, 0.4)))
    run(tiny["patcher"], p, n, steps=4)
    rec = mi_control.find_balance_record(p)
    labels = {lab for layer in rec.layers for lab in layer["controls"]}
    assert len(labels) == 1 and len(rec.inactive) == 1 and rec.inactive[0] not in labels
    assert rec.inactive[0].startswith("Apply ControlNet (Minimal Impact)")


def test_one_map_per_latent_in_the_latents_aspect_ratio(tiny):
    p, n = two_controls(tiny)
    latent = torch.zeros(2, 4, 8, 16)
    out = run(tiny["patcher"], p, n, latent=latent)
    rec = mi_control.find_balance_record(p)
    assert _cell_shape(rec, 64) == (32, 64)
    maps = MIControlNetBalanceMap.execute(p, {"samples": out}, 64).args[0]
    assert maps.shape[0] == 2 and not torch.equal(maps[0], maps[1])
    one = MIControlNetBalanceMap.execute(p, {"samples": out}, 64, 1).args[0]
    assert torch.equal(one[0], maps[1])
    with pytest.raises(ValueError, match="had 2 latent"):
        render_balance_map(rec, batch_index=2)


def test_missing_record_says_why(tiny):
    p, n = two_controls(tiny)
    with pytest.raises(ValueError, match="never called by a sampler"):
        MIControlNetBalanceMap.execute(p, {"samples": None}, 32)
    off = MIControlNetSettings.execute(tiny["patcher"], "micontrolnet", "layer", 20.0, False).args[0]
    run(off, p, n)
    with pytest.raises(ValueError, match="record_balance is off"):
        MIControlNetBalanceMap.execute(p, {"samples": None}, 32)
    late = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], start=0.6, end=0.61)
    run(tiny["patcher"], *late)
    with pytest.raises(ValueError, match="no sampling step fell"):
        MIControlNetBalanceMap.execute(late[0], {"samples": None}, 32)


# --- non-finite values -------------------------------------------------------------

def test_nan_from_another_patch_is_named(tiny):
    """FreeU_V2 divides by zero on a 1x1 middle block: reported as the UNet feature, naming FreeU_V2."""
    model = FreeU_V2().patch(tiny["patcher"], 1.3, 1.4, 0.9, 0.2)[0]
    p, n = two_controls(tiny)
    with pytest.raises(FloatingPointError) as err:
        run(model, p, n, latent=torch.zeros(1, 4, 2, 2))
    msg = str(err.value)
    assert "already held NaN or Inf" in msg and "FreeU_V2" in msg and "not from a ControlNet residual" in msg


def _control(strength):
    return types.SimpleNamespace(strength=strength, last_balance_record=None)


def test_fp16_injection_overflow_names_strength_and_max_lambda():
    settings = mi_control.BalanceSettings(mode="micontrolnet", max_lambda=1000.0, record_balance=False)
    inj = unet_sites.UNetInjection(settings, {"cond_or_uncond": [0]})
    feature = torch.full((1, 4, 2, 2), 1.0, dtype=torch.float16)
    inj.add("strong", {"output": [torch.full((1, 4, 2, 2), 200.0, dtype=torch.float16)]}, _control(3.0))
    out = inj._inject(feature, "output", "output 0 skip")
    assert not torch.isfinite(out).all()
    with pytest.raises(FloatingPointError) as err:
        inj.finish()
    msg = str(err.value)
    assert "injection" in msg and "max_lambda 1000" in msg and "strong strength 3" in msg


def test_nonfinite_latent_is_reported_as_an_earlier_step():
    inj = unet_sites.UNetInjection(mi_control.BalanceSettings(record_balance=False), {"cond_or_uncond": [0]})
    x = torch.full((1, 4, 2, 2), float("nan"))
    with pytest.raises(FloatingPointError, match="latent entering the UNet already holds NaN"):
        inj.diffusion_model_wrapper(lambda *a, **k: a[0], x)


# --- memory of the reductions ------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_chunked_reductions_equal_the_exact_ones(monkeypatch, granularity):
    monkeypatch.setattr(balance, "REDUCTION_CHUNK_ELEMENTS", 100)  # several channel slices per tensor
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 16, 5, 7, generator=g), torch.randn(2, 16, 5, 7, generator=g)
    assert len(balance._channel_chunks(a)) > 4
    dims = (1, 2, 3) if granularity == "layer" else (1,)
    d = b.double() - a.double() * 0.5
    ref = ((d * b.double()).sum(dims, keepdim=True) / d.square().sum(dims, keepdim=True)).clamp(0, 1)
    got = balance.mgda_coefficient(a, b, granularity, scale1=0.5)
    assert torch.allclose(got.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(balance.channel_norm(a).double(), a.double().norm(dim=1), rtol=1e-5)


def test_reduction_memory_is_counted(tiny):
    control = mi_control.MinimalImpactControl.create(tiny["cns"][0], torch.zeros(1, 3, 64, 64), 1.0, (0.0, 1.0))
    inner = tiny["cns"][0].inference_memory_requirements(torch.float32)
    assert control.inference_memory_requirements(torch.float32) == inner + balance.reduction_memory_bytes()


# --- strength scaling ----------------------------------------------------------------------

def _injected(scaling, strength, r, feature):
    settings = mi_control.BalanceSettings(mode="micontrolnet", max_lambda=1000.0, strength_scaling=scaling,
                                          record_balance=False)
    inj = unet_sites.UNetInjection(settings, {"cond_or_uncond": [0]})
    inj.add("c", {"output": [strength * r]}, _control(strength))
    return inj._inject(feature, "output", "output 0 skip") - feature


def test_linear_strength_scaling_is_linear_and_paper_is_not():
    g = torch.Generator().manual_seed(5)
    feature, r = torch.randn(2, 8, 4, 4, generator=g), 0.3 * torch.randn(2, 8, 4, 4, generator=g)
    for s in (0.5, 2.0):
        assert torch.allclose(_injected("linear", s, r, feature), s * _injected("linear", 1.0, r, feature),
                              rtol=1e-4, atol=1e-6)
    ratio = (_injected("paper", 2.0, r, feature).norm() / _injected("paper", 1.0, r, feature).norm()).item()
    assert ratio > 4.0  # roughly cubic while λ is far below max_lambda


def test_linear_strength_scaling_keeps_the_weights_of_strength_one():
    g = torch.Generator().manual_seed(6)
    feature = torch.randn(2, 8, 4, 4, generator=g)
    a, b = torch.randn(2, 8, 4, 4, generator=g), torch.randn(2, 8, 4, 4, generator=g)

    def weights(scaling, sa):
        settings = mi_control.BalanceSettings(mode="micontrolnet", strength_scaling=scaling)
        inj = unet_sites.UNetInjection(settings, {"cond_or_uncond": [0]})
        inj.add("a", {"output": [sa * a]}, _control(sa))
        inj.add("b", {"output": [b]}, _control(1.0))
        inj._inject(feature, "output", "output 0 skip")
        return inj.record.layers[0]["weights"][0]

    assert torch.allclose(weights("linear", 2.0), weights("linear", 1.0), atol=1e-6)
    assert not torch.allclose(weights("paper", 2.0), weights("paper", 1.0), atol=1e-3)


def test_strength_scaling_option_reaches_sampling(tiny):
    p, n = two_controls(tiny)
    paper = run(with_settings(tiny["patcher"], "micontrolnet"), p, n)
    linear = MIControlNetSettings.execute(tiny["patcher"], "micontrolnet", "layer", 20.0, True,
                                          strength_scaling="linear").args[0]
    assert mi_control.BalanceSettings.from_transformer_options(
        linear.model_options["transformer_options"]).strength_scaling == "linear"
    out = run(linear, p, n)
    # Both controls at strength 1: the two scalings agree.
    assert torch.allclose(out, paper, atol=1e-5)
    p2, n2 = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], 2.0)
    assert not torch.allclose(run(linear, p2, n2), run(with_settings(tiny["patcher"], "micontrolnet"), p2, n2),
                              atol=1e-3)


def test_same_sigma_main_pass_replaces_and_guidance_pass_keeps():
    """Heun evaluates the sigma of its correction again at the next step (both main passes,
    cond + uncond rows): the later one is kept; a guidance pass ([0] only) after it is not."""
    control = _control(1.0)
    records = []
    for labels in ([1, 0], [1, 0], [0]):
        to = {"cond_or_uncond": labels, "sigmas": torch.tensor([0.5])}
        inj = unet_sites.UNetInjection(mi_control.BalanceSettings(mode="vanilla"), to)
        rows = len(labels)
        inj.add("c", {"output": [torch.randn(rows, 4, 2, 2)]}, control)
        inj._inject(torch.randn(rows, 4, 2, 2), "output", "output 0 skip")
        inj.finish()
        records.append(inj.record)
    assert control.last_balance_record is records[1]
