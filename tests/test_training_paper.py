"""MIControlNet training as the paper defines it, against exact computations:
L_QC^simple on the score's Jacobian w.r.t. x_t (built row by row in float64),
the two λ conventions against a brute-force MGDA solve, the network dtypes
each --mixed-precision loads, the non-finite step guard. Tiny models built
with ComfyUI's own classes."""

import copy

import pytest
import torch
from torch.overrides import TorchFunctionMode

import comfy.ldm.modules.attention as attention
import comfy.supported_models

from conftest import give_nonzero_outputs
from headless import synthetic as s
from training import models, objectives as O

F64 = torch.float64


def _float64_unet():
    """The tiny SD1.5-style UNet as ComfyUI builds it for dtype float64."""
    config = comfy.supported_models.SD15(dict(s.TINY_SD15_UNET))
    config.set_inference_dtype(F64, None)
    model = config.get_model({}, device=torch.device("cpu"))
    model.diffusion_model.load_state_dict(s.build_unet_model(s.TINY_SD15_UNET, seed=0).diffusion_model.state_dict())
    model.diffusion_model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def tiny64():
    model = _float64_unet()
    assert next(model.diffusion_model.parameters()).dtype == F64 and O.unet_dtype(model) == F64
    cnet = models.controlnet_from_unet(model.diffusion_model, model.model_config.unet_config, seed=0)
    give_nonzero_outputs(cnet)  # a stand-in for a trained ControlNet: non-zero residuals
    return model, cnet.double()


def _one_sample(seed: int, timestep_index: int):
    g = torch.Generator().manual_seed(seed)
    return dict(latents=torch.randn(1, 4, 2, 2, generator=g, dtype=F64),
                hint=(torch.rand(1, 3, 16, 16, generator=g) > 0.7).to(F64),
                context=torch.randn(1, 77, 768, generator=g, dtype=F64),
                noise=torch.randn(1, 4, 2, 2, generator=g, dtype=F64),
                timestep_index=torch.tensor([timestep_index]))


def _hadamard(n: int) -> torch.Tensor:
    """Sylvester's n×n Hadamard matrix (n a power of two): ±1 entries, HᵀH = n·I."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _sd_alphas_cumprod() -> torch.Tensor:
    """ᾱ of SD1.5's schedule from its definition (LDM's "linear" betas: √β evenly spaced
    from √0.00085 to √0.012 over 1000 steps), in float64."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=F64) ** 2
    return torch.cumprod(1 - betas, 0)


class LayerNormByDefinition(TorchFunctionMode):
    """F.layer_norm as (x − μ)/√(var + eps)·w + b in elementary ops. torch's fused
    layer_norm has a wrong double backward (measured against finite differences in
    float64: 4 % off), so the exact reference builds its Jacobian's graph through this."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.layer_norm:
            x, shape, weight, bias, eps = (list(args) + [None, None, 1e-5][len(args) - 2:])[:5]
            weight, bias, eps = kwargs.get("weight", weight), kwargs.get("bias", bias), kwargs.get("eps", eps)
            dims = tuple(range(-len(shape), 0))
            centred = x - x.mean(dims, keepdim=True)
            y = centred / (centred.square().mean(dims, keepdim=True) + eps).sqrt()
            y = y if weight is None else y * weight
            return y if bias is None else y + bias
        return func(*args, **kwargs)


def _basic_attention(func, *args, **kwargs):
    # ComfyUI's attention_basic (einsum + softmax): twice differentiable in float64.
    return attention.attention_basic(*args, **kwargs)


def _exact_score_asymmetry(model, cnet, sample, monkeypatch):
    """tr(JJᵀ) − tr(JJ) of J = ∂s_t/∂x_t through the ControlNet, s_t = −ε̂/σ_t, built
    from the paper's definitions (x_t = √ᾱ x₀ + √(1−ᾱ) ε, σ_t = √(1−ᾱ), ᾱ from the
    schedule's definition), one reverse-mode row at a time, with a graph."""
    ms = model.model_sampling
    i = sample["timestep_index"]
    abar = _sd_alphas_cumprod()[i].reshape(-1, 1, 1, 1)
    x_t = abar.sqrt() * sample["latents"] + (1 - abar).sqrt() * sample["noise"]
    sigma_t = (1 - abar).sqrt()
    # The model's timestep of this schedule index (ComfyUI's own mapping).
    t = ms.timestep(ms.sigmas[i]).to(F64)
    monkeypatch.setattr(O, "attention_override", _basic_attention)  # the project's own hook function
    x = x_t.detach().clone().requires_grad_(True)
    with LayerNormByDefinition():
        score = -O.controlled_eps(model, cnet, x_t, x, t, sample["context"], None, sample["hint"]) / sigma_t
        flat = score.flatten()
        rows = [torch.autograd.grad(flat[k], x, create_graph=True)[0].flatten() for k in range(flat.numel())]
    j = torch.stack(rows)
    monkeypatch.undo()
    return torch.trace(j @ j.T) - torch.trace(j @ j)


def _estimator(model, cnet, sample, probes):
    """Per-probe L_QC^simple from loss_terms, every probe on a copy of the one sample."""
    n = probes.shape[0]
    batch = O.Batch(latents=sample["latents"].expand(n, -1, -1, -1), hint=sample["hint"].expand(n, -1, -1, -1),
                    context=sample["context"].expand(n, -1, -1), y=None,
                    noise=sample["noise"].expand(n, -1, -1, -1),
                    timestep_index=sample["timestep_index"].expand(n), probe=probes.reshape(n, 4, 2, 2))
    return O.loss_terms(model, cnet, batch, qc_weight=1.0)["qc"]


@pytest.mark.parametrize("timestep_index", [60])
def test_qc_is_the_score_jacobian_asymmetry_in_expectation_and_gradient(tiny64, timestep_index, monkeypatch):
    """E_v of the training estimator and of its gradient equal tr(JJᵀ) − tr(JJ) of the exact
    score Jacobian and its gradient. The estimator is a quadratic form in v, so its mean over
    any probe set with (1/N) Σ v vᵀ = I is its expectation exactly: the rows of a
    Hadamard matrix are such a set (16 = the latent's 4×2×2 elements) of Rademacher vectors."""
    model, cnet = tiny64
    sample = _one_sample(seed=3, timestep_index=timestep_index)
    params = [p for p in cnet.parameters()]
    exact = _exact_score_asymmetry(model, cnet, sample, monkeypatch)
    assert exact.item() > 1e-3  # a clearly non-conservative ControlNet
    g_exact = torch.cat([g.flatten() for g in torch.autograd.grad(exact, params)])

    qc = _estimator(model, cnet, sample, _hadamard(16))
    g_est = torch.cat([g.flatten() for g in torch.autograd.grad(qc.mean(), params)])
    assert torch.allclose(qc.mean().double(), exact, rtol=1e-5), (qc.mean().item(), exact.item())
    assert torch.allclose(g_est.double(), g_exact, rtol=1e-4, atol=1e-6 * g_exact.abs().max().item())
    assert qc.std() > 1e-3 * qc.mean().abs()  # single probes differ: only the mean is exact

    # i.i.d. Rademacher probes: the mean within four standard errors.
    n = 256
    draws = O.rademacher((n, 16), torch.Generator().manual_seed(7)).to(F64)
    qc_mc = _estimator(model, cnet, sample, draws).detach()
    se = qc_mc.std() / n ** 0.5
    assert abs(qc_mc.mean() - exact.item()) < 4 * se, (qc_mc.mean().item(), exact.item(), se.item())


def test_score_jacobian_scale_matches_the_paper_variables():
    """k = −1/σ_t with σ_t = √(1−ᾱ) from the schedule's definition, on ComfyUI's SD1.5 sampling; x_in is x_t."""
    model = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    ms = model.model_sampling
    idx = torch.tensor([0, 10, 500, 999])
    sigma = ms.sigmas[idx]
    abar = _sd_alphas_cumprod()[idx]
    k = O.score_jacobian_scale(ms, sigma).flatten().double()
    assert torch.allclose(k, -1 / (1 - abar).sqrt(), rtol=1e-5)
    x0, eps = torch.randn(4, 4, 2, 2, dtype=F64), torch.randn(4, 4, 2, 2, dtype=F64)
    x_in = ms.calculate_input(sigma.double(), ms.noise_scaling(sigma.double(), eps, x0))
    a = abar.reshape(-1, 1, 1, 1)
    assert torch.allclose(x_in, a.sqrt() * x0 + (1 - a).sqrt() * eps, rtol=1e-6)


def test_qc_refuses_model_samplings_it_is_not_derived_for():
    import comfy.model_sampling as cms

    class VSampling(cms.ModelSamplingDiscrete, cms.V_PREDICTION):
        pass

    with pytest.raises(ValueError, match="EPS prediction on the discrete VP schedule"):
        O.score_jacobian_scale(VSampling(), torch.tensor([1.0]))


# --- λ's two conventions --------------------------------------------------------------------------

def _min_norm_weight_of_first(v1: torch.Tensor, v2: torch.Tensor, n: int = 200001) -> float:
    """MGDA's two-vector problem min_γ∈[0,1] ‖γ v1 + (1−γ) v2‖² by brute force over γ (float64)."""
    gamma = torch.linspace(0, 1, n, dtype=F64)
    a, b, c = v1.double().square().sum(), (v1.double() * v2.double()).sum(), v2.double().square().sum()
    norms = gamma ** 2 * a + 2 * gamma * (1 - gamma) * b + (1 - gamma) ** 2 * c
    return float(gamma[norms.argmin()])


def _pairs():
    g = torch.Generator().manual_seed(0)
    f_e = torch.randn(6, 8, 3, 3, generator=g, dtype=F64)
    r = torch.randn(6, 8, 3, 3, generator=g, dtype=F64)
    f_c = torch.stack([0.3 * r[0],                 # small residual: damped as written, amplified read the other way
                       2.0 * r[1],                 # larger than f_e
                       f_e[2] * 0.5 + 0.1 * r[2],  # nearly parallel and shorter: λ* clips
                       f_e[3] * 3.0,               # parallel and longer
                       r[4],
                       -f_e[5] + 0.2 * r[5]])      # opposed
    return f_e, f_c


@pytest.mark.parametrize("granularity", ["layer", "pixel"])
def test_both_lambda_conventions_against_a_brute_force_min_norm_solve(granularity):
    from model_patches import balance

    f_e, f_c = _pairs()
    max_lambda = 20.0
    got = {c: balance.injection_coefficient(f_e, f_c, max_lambda, granularity, c).double()
           for c in balance.LAMBDA_CONVENTIONS}
    for row in range(f_e.shape[0]):
        cells = [(slice(None),)] if granularity == "layer" else [(slice(None), i, j) for i in range(3) for j in range(3)]
        for cell in cells:
            e, c = f_e[row][cell], f_c[row][cell]
            gamma_e = _min_norm_weight_of_first(e, c)  # the min-norm point is gamma_e·f_e + (1 − gamma_e)·f_c
            gamma_c = 1 - gamma_e
            expected = {"as_written": gamma_e / max(1 - gamma_e, 1e-300),
                        "mgda_weight_of_control": gamma_c / max(1 - gamma_c, 1e-300)}
            for conv, want in expected.items():
                want = min(want, max_lambda)
                lam = got[conv][row].flatten()[0] if granularity == "layer" else got[conv][row, 0, cell[1], cell[2]]
                # the grid's spacing bounds the error: dλ = dγ/(1−γ)²
                tol = 2e-5 / max(1 - (gamma_e if conv == "as_written" else gamma_c), 1 / (1 + max_lambda)) ** 2
                assert abs(float(lam) - want) <= tol + 1e-5 * want, (granularity, row, conv, float(lam), want)
    # The two readings really differ (the small residual of row 0).
    if granularity == "layer":
        assert got["as_written"][0].max() < 0.2 < 5 < got["mgda_weight_of_control"][0].min()


def test_zero_controlnet_trains_from_step_0_only_under_mgda_weight_of_control():
    """A zero-initialised ControlNet: its zero convolutions get a gradient at step 0 under
    mgda_weight_of_control (λ = max_lambda at zero residuals), none as written (λ = 0)."""
    model = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    model.diffusion_model.requires_grad_(False)
    fresh = models.controlnet_from_unet(model.diffusion_model, model.model_config.unet_config, seed=0)
    g = torch.Generator().manual_seed(6)
    batch = O.Batch(latents=torch.randn(2, 4, 8, 8, generator=g), hint=(torch.rand(2, 3, 64, 64, generator=g) > 0.8).float(),
                    context=torch.randn(2, 77, 768, generator=g), y=None, noise=torch.randn(2, 4, 8, 8, generator=g),
                    timestep_index=torch.tensor([100, 700]))
    grads = {}
    for convention in ("as_written", "mgda_weight_of_control"):
        cnet = copy.deepcopy(fresh)
        with O.training_attention():
            O.loss_terms(model, cnet, batch, lambda_convention=convention)["total"].mean().backward()
        zero_convs = list(cnet.zero_convs) + [cnet.middle_block_out]
        grads[convention] = [float(p.grad.abs().sum()) if p.grad is not None else 0.0
                             for zc in zero_convs for p in zc.parameters()]
    assert all(v == 0.0 for v in grads["as_written"])
    assert all(v > 0 for v in grads["mgda_weight_of_control"]), grads["mgda_weight_of_control"]


def test_lambda_convention_reaches_the_node_settings_and_the_cli():
    from model_patches import balance, mi_control
    from balanced_control.nodes.micontrolnet import MIControlNetSettings
    from training import micontrolnet

    assert micontrolnet.LAMBDA_CONVENTIONS == balance.LAMBDA_CONVENTIONS

    class Patcher:
        model_options: dict = {}

        def clone(self):
            c = Patcher()
            c.model_options = {}
            return c

    out = MIControlNetSettings.execute(Patcher(), "micontrolnet", "layer", 20.0, False,
                                       lambda_convention="mgda_weight_of_control").args[0]
    settings = mi_control.BalanceSettings.from_transformer_options(out.model_options["transformer_options"])
    assert settings.lambda_convention == "mgda_weight_of_control"
    with pytest.raises(ValueError, match="lambda_convention must be one of"):
        mi_control.settings_dict("micontrolnet", "layer", 20.0, lambda_convention="swapped")


# --- precision ------------------------------------------------------------------------------------

def _dtype_of(module: torch.nn.Module) -> set:
    """Dtypes of the network's linear and convolution weights (the bulk of it)."""
    return {m.weight.dtype for m in module.modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and m.weight is not None}


@pytest.mark.parametrize("precision,unet,text,vae,scaled", [
    ("no", torch.float32, torch.float32, torch.float32, False),
    ("bf16", torch.bfloat16, torch.bfloat16, torch.bfloat16, False),
    ("fp16", torch.float16, torch.float16, torch.float32, True),
])
def test_each_precision_loads_each_network_in_its_dtype_where_comfyui_would_pick_fp16(
        precision, unet, text, vae, scaled, small_sd15_files, monkeypatch):
    """As on a CUDA machine, ComfyUI's own choice is made fp16 for every network; each
    --mixed-precision must override it with the dtypes it names."""
    import comfy.model_management as mm
    from training import engine

    fp16 = lambda *a, **k: torch.float16  # noqa: E731 - ComfyUI's pick on CUDA
    for name in ("unet_dtype", "text_encoder_dtype", "vae_dtype"):
        monkeypatch.setattr(mm, name, fp16)
    ckpt = small_sd15_files["checkpoint"]
    if precision == "no":  # the forced pick is real: without explicit dtypes everything comes out fp16
        plain = models.load_base_model(ckpt)
        assert _dtype_of(plain.unet) == {torch.float16}
        assert _dtype_of(plain.clip.cond_stage_model) == {torch.float16}
        assert _dtype_of(plain.vae.first_stage_model) == {torch.float16}
        del plain
    base = models.load_base_model(ckpt, **engine.network_dtypes(precision))
    assert _dtype_of(base.unet) == {unet}
    assert _dtype_of(base.clip.cond_stage_model) == {text}
    assert _dtype_of(base.vae.first_stage_model) == {vae} and base.vae.vae_dtype == vae
    assert engine.needs_loss_scaler(precision, O.unet_dtype(base.model)) is scaled
    # An fp16 UNet always gets the scaler, whatever the option says.
    assert engine.needs_loss_scaler("no", torch.float16) and engine.needs_loss_scaler("bf16", torch.float16)


# --- nothing non-finite is written ----------------------------------------------------------------

def _step_owner(limit=3):
    import types

    from training import engine
    from training.trainer import MIControlNetTrainer

    net = torch.nn.Linear(3, 2)
    owner = MIControlNetTrainer.__new__(MIControlNetTrainer)
    owner.args = types.SimpleNamespace(learning_rate=0.1, lr_warmup_steps=0, max_grad_norm=1.0)
    owner.dist = engine.Dist()
    owner.optimizer = torch.optim.AdamW(net.parameters(), lr=0.1)
    owner.scaler = torch.amp.GradScaler("cpu", enabled=False)
    owner.skipped_steps = engine.SkippedSteps(limit)
    return owner, net


def test_a_non_finite_gradient_or_loss_skips_the_step_before_anything_is_written():
    owner, net = _step_owner()
    before = copy.deepcopy(net.state_dict())
    net(torch.ones(1, 3)).sum().backward()
    net.weight.grad[0, 0] = float("nan")
    lr, skipped = owner.optimizer_step(0)
    assert skipped and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert owner.optimizer.state == {} and net.weight.grad is None  # no moment holds the NaN either
    net(torch.ones(1, 3)).sum().backward()
    assert owner.optimizer_step(1, loss_finite=False)[1]  # a non-finite loss alone skips too
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    net(torch.ones(1, 3)).sum().backward()
    assert owner.optimizer_step(2) == (0.1, False)
    assert not torch.equal(before["weight"], net.weight)


def test_training_stops_after_n_consecutive_skipped_steps(caplog):
    from training import engine

    guard = engine.SkippedSteps(3)
    for step, skipped in enumerate([True, True, False, True, True]):
        guard.record(step, skipped, fp16=False)  # a finite step in between resets the count
    assert "step 4 skipped" in caplog.text
    with pytest.raises(SystemExit, match="3 consecutive steps .* were skipped; stopping"):
        guard.record(5, True, fp16=False)


# --- stage 2 -------------------------------------------------------------------------------------

def test_stage_2_needs_a_stage_1_controlnet_and_qc_every_keeps_the_expected_weight(monkeypatch):
    import argparse
    import types

    from training import micontrolnet
    from training.trainer import MIControlNetTrainer

    p = argparse.ArgumentParser()
    micontrolnet.add_arguments(p)
    args = p.parse_args(["--base", "b.safetensors", "--data", "d", "--output", "o", "--stage", "2"])
    with pytest.raises(SystemExit, match="--stage 2 continues a stage-1 ControlNet: pass --init-controlnet"):
        micontrolnet._check_args(args)
    micontrolnet._check_args(p.parse_args(["--base", "b", "--data", "d", "--output", "o", "--stage", "2",
                                           "--resume", "latest"]))

    seen = []
    monkeypatch.setattr(O, "loss_terms", lambda model, cnet, batch, qc_weight, *a: seen.append(qc_weight) or
                        {"total": torch.zeros(1), "task": torch.zeros(1), "qc": torch.zeros(1)})
    owner = MIControlNetTrainer.__new__(MIControlNetTrainer)
    owner.args = types.SimpleNamespace(stage=2, qc_every=4, qc_weight=0.01, plain_add_warmup_steps=0,
                                       granularity="layer", max_lambda=20.0, lambda_convention="as_written")
    owner.base, owner.cnet = types.SimpleNamespace(model=None), None
    owner._batch = lambda items, probes: None
    for step in range(8):
        owner.micro_step_terms({}, step, None)
    assert seen == [0.04, 0, 0, 0, 0.04, 0, 0, 0]  # k × weight on every k-th step: 0.01 per step on average
