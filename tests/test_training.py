"""Training, in process: the conservativity estimator, the add^inj training
forward against the sampling forward, the stages on a fixed batch, data and
checkpoint handling (test_training_data.py), forward-mode attention
(test_training_attention.py). Tiny models built with ComfyUI's own classes."""

import contextlib
import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

import comfy.controlnet

from balanced_control.nodes.micontrolnet import MIControlNetApply
from conftest import give_nonzero_outputs
from headless import synthetic as s
from training import engine, models, objectives as O

CPU = torch.device("cpu")


# --- the estimator on a network whose Jacobian is known exactly --------------------

class RowMLP(torch.nn.Module):
    def __init__(self, d=6, hidden=9, seed=0, symmetric=False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = torch.nn.Parameter(torch.randn(hidden, d, generator=g) / d ** 0.5)
        self.w2 = torch.nn.Parameter(torch.randn(d, hidden, generator=g) / hidden ** 0.5)
        self.symmetric = symmetric

    def forward(self, x):  # (N, d) -> (N, d), rows independent
        h = torch.tanh(x @ self.w1.T)
        # symmetric: the gradient of a scalar potential, so J is symmetric (conservative)
        return h @ self.w1 if self.symmetric else h @ self.w2.T


def exact_asymmetry(net, x):
    j = torch.autograd.functional.jacobian(lambda z: net(z[None])[0], x, create_graph=True)
    return torch.trace(j @ j.T) - torch.trace(j @ j)


def test_qc_estimator_is_unbiased_against_the_exact_jacobian():
    torch.manual_seed(0)
    net = RowMLP()
    x = torch.randn(6)
    exact = exact_asymmetry(net, x)
    assert exact.item() > 0.05  # a clearly non-conservative field

    n = 40000
    probes = O.rademacher((n, 6), torch.Generator().manual_seed(1))
    _, jv, jtv = O.jacobian_probes(net, x.expand(n, 6), probes, create_graph=True)
    est = O.qc_per_row(jv, jtv)  # a sum per row, as the paper
    mean, se = est.mean(), est.std() / n ** 0.5
    assert abs(mean - exact.detach()) < 4 * se, (mean.item(), exact.item(), se.item())
    assert est.std() > 0.01  # single draws vary: the test is about the mean

    # Its gradient w.r.t. the parameters is unbiased too (the loss is trained on it).
    g_est = torch.autograd.grad(est.mean(), list(net.parameters()))
    g_exact = torch.autograd.grad(exact, list(net.parameters()))
    a, b = torch.cat([g.flatten() for g in g_est]), torch.cat([g.flatten() for g in g_exact])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.995
    assert abs(a.norm() / b.norm() - 1) < 0.03


def test_qc_estimator_vanishes_for_a_conservative_field():
    net = RowMLP(symmetric=True)
    x = torch.randn(64, 6)
    probes = O.rademacher((64, 6), torch.Generator().manual_seed(2))
    _, jv, jtv = O.jacobian_probes(net, x, probes)
    assert exact_asymmetry(net, x[0]).abs() < 1e-5
    assert O.qc_per_row(jv, jtv).abs().max() < 1e-5  # J = Jᵀ: zero for every probe, not just on average


# --- the training forward is the sampling forward ---------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    model = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    model.diffusion_model.requires_grad_(False)
    cfg = model.model_config.unet_config
    cnet = models.controlnet_from_unet(model.diffusion_model, cfg, seed=0)
    trained = copy.deepcopy(cnet)
    give_nonzero_outputs(trained)  # a stand-in for a trained ControlNet: non-zero residuals
    return {"model": model, "cfg": cfg, "fresh": cnet, "trained": trained}


def make_batch(b=2, seed=0, probes=True, context_dim=768):
    g = torch.Generator().manual_seed(seed)
    return O.Batch(latents=torch.randn(b, 4, 8, 8, generator=g), hint=(torch.rand(b, 3, 64, 64, generator=g) > 0.8).float(),
                   context=torch.randn(b, 77, context_dim, generator=g), y=None,
                   noise=torch.randn(b, 4, 8, 8, generator=g),
                   timestep_index=torch.randint(0, 1000, (b,), generator=g),
                   probe=O.rademacher((b, 4, 8, 8), g) if probes else None)


def test_controlnet_from_unet_copies_the_encoder_and_zeroes_the_outputs(tiny):
    cnet, unet = tiny["fresh"], tiny["model"].diffusion_model
    usd = unet.state_dict()
    for k, v in cnet.state_dict().items():
        if k.startswith(("input_blocks.", "middle_block.", "time_embed.")):
            assert torch.equal(v, usd[k]), k
        if k.startswith(("zero_convs.", "middle_block_out.")):
            assert not v.any(), k
    # The layout is ControlNet v1.1's: the keys ComfyUI's loader reads, nothing else.
    assert set(cnet.state_dict()) == set(s.controlnet_state_dict(s.TINY_SD15_UNET))
    assert all(p.dtype == torch.float32 for p in cnet.parameters())


def test_training_forward_equals_the_node_sampling_forward():
    """controlled_eps (training) against MIControlNetApply + model.apply_model
    (what ComfyUI's sampler runs), on the same weights loaded by ComfyUI's loader.
    An SD1.5-family config, so that ComfyUI's loader detects the ControlNet's
    attention layout (heads) exactly as the training built it."""
    model = s.build_unet_model(s.SD15_UNET_SMALL, seed=0)
    model.diffusion_model.requires_grad_(False)
    cnet = models.controlnet_from_unet(model.diffusion_model, model.model_config.unet_config, seed=0)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in cnet.parameters():
            if not p.any():  # zero convs, last hint conv
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    batch = make_batch(b=2, seed=3, probes=False)
    sigma, x_noisy = O.noisy_inputs(model, batch)
    ms = model.model_sampling
    with O.training_attention():
        x_in = ms.calculate_input(sigma, x_noisy)
        eps = O.controlled_eps(model, cnet, x_in, x_in, ms.timestep(sigma), batch.context, None, batch.hint)
        trained_denoised = ms.calculate_denoised(sigma, eps, x_noisy)

        loaded = comfy.controlnet.load_controlnet_state_dict({k: v.clone() for k, v in cnet.state_dict().items()})
        cond = [[batch.context[:1], {}]]
        rows = []
        for r in range(2):  # one sampler call per row; the hint is per row
            c = MIControlNetApply.execute(cond, cond, loaded, batch.hint[r:r + 1].movedim(1, -1), 1.0, 0.0, 1.0,
                                          None, None).args[0][0][1]["control"]
            c.pre_run(model, ms.percent_to_sigma)
            to = {"cond_or_uncond": [0], "sigmas": sigma[r:r + 1]}
            ctx = batch.context[r:r + 1]
            ctrl = c.get_control(x_noisy[r:r + 1], sigma[r:r + 1], {"c_crossattn": ctx, "transformer_options": to}, 1, to)
            rows.append(model.apply_model(x_noisy[r:r + 1], sigma[r:r + 1], c_crossattn=ctx, control=ctrl,
                                          transformer_options=to))
        sampled = torch.cat(rows)
        plain = model.apply_model(x_noisy, sigma, c_crossattn=batch.context)
    assert torch.allclose(trained_denoised, sampled, rtol=1e-4, atol=1e-4), (trained_denoised - sampled).abs().max()
    assert (trained_denoised - plain).abs().max() > 1e-3  # the control really acts


def test_controlnet_path_jacobian_products_are_consistent(tiny):
    """J_c v (forward mode) against finite differences of the ControlNet path,
    and the adjoint identity uᵀ(J_c v) = (J_cᵀ u)ᵀ v with the reverse-mode product."""
    model, cnet = tiny["model"], tiny["trained"]
    batch = make_batch(b=2, seed=4)
    ms = model.model_sampling
    sigma, x_noisy = O.noisy_inputs(model, batch)
    x_unet = ms.calculate_input(sigma, x_noisy)
    t = ms.timestep(sigma)

    def f(xp):
        return O.controlled_eps(model, cnet, x_unet, ms.calculate_input(sigma, xp), t, batch.context, None, batch.hint)

    v = batch.probe
    u = torch.randn(v.shape, generator=torch.Generator().manual_seed(9))
    with O.training_attention(forward_mode=True):
        _, jv, _ = O.jacobian_probes(f, x_noisy, v, create_graph=False)
        _, _, jtu = O.jacobian_probes(f, x_noisy, u, create_graph=False)
        with torch.no_grad():
            h = 1e-2
            fd = (f(x_noisy + h * v) - f(x_noisy - h * v)) / (2 * h)
    assert jv.abs().max() > 1e-3
    assert torch.allclose(jv, fd, rtol=1e-2, atol=1e-3 * jv.abs().max().item())
    lhs, rhs = (u * jv).sum(), (jtu * v).sum()
    assert torch.allclose(lhs, rhs, rtol=1e-4), (lhs, rhs)


def _dual_forward(f, x, v, params, fast: bool):
    """(f(x), J v, d(Σ f(x) + Σ (J v)²)/d params) with or without ConstantWeightTangents."""
    x = x.detach().requires_grad_(True)
    mode = O.ConstantWeightTangents() if fast else contextlib.nullcontext()
    with fwAD.dual_level(), mode:
        out, jv = fwAD.unpack_dual(f(fwAD.make_dual(x, v)))
    grads = torch.autograd.grad(out.sum() + jv.square().sum(), params)
    return out, jv, grads


def test_constant_weight_tangents_give_torchs_products_without_the_zero_convolution():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 5, 3, padding=1)
    lin = torch.nn.Linear(5, 4, bias=False)
    conv1d = torch.nn.Conv1d(4, 2, 1)

    def f(x):
        h = torch.nn.functional.silu(conv(x))                         # bias given positionally
        h = lin(h.permute(0, 2, 3, 1))                                # no bias
        h = torch.nn.functional.conv1d(h.flatten(1, 2).transpose(1, 2), conv1d.weight, bias=conv1d.bias)
        return h

    x, v = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    params = [*conv.parameters(), *lin.parameters(), *conv1d.parameters()]
    reference = _dual_forward(f, x, v, params, fast=False)
    fast = _dual_forward(f, x, v, params, fast=True)
    assert torch.allclose(reference[0], fast[0], atol=1e-6) and torch.allclose(reference[1], fast[1], atol=1e-6)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(reference[2], fast[2]))

    # torch's own rule runs one convolution more per layer: on the zero weight tangent.
    def convolutions(fast):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            _dual_forward(lambda x: conv(x), x, v, list(conv.parameters()), fast)
        return sum(e.count for e in prof.key_averages() if e.key == "aten::convolution")

    assert convolutions(fast=True) < convolutions(fast=False)


def test_add_inj_gives_a_zero_output_controlnet_no_gradient_hence_the_plain_add_warm_up(tiny):
    model, batch = tiny["model"], make_batch(b=2, seed=6, probes=False)
    grads = {}
    for mode in ("micontrolnet", "vanilla"):
        cnet = copy.deepcopy(tiny["fresh"])
        with O.training_attention():
            O.loss_terms(model, cnet, batch, mode=mode)["total"].mean().backward()
        grads[mode] = sum(float(p.grad.abs().sum()) for p in cnet.parameters() if p.grad is not None)
    assert grads["micontrolnet"] == 0.0 and grads["vanilla"] > 0


@pytest.mark.parametrize("stage,start,mode", [(1, "fresh", "vanilla"), (1, "trained", "micontrolnet"),
                                              (2, "trained", "micontrolnet")])
def test_each_stage_lowers_its_loss_on_a_fixed_batch(tiny, stage, start, mode):
    model = tiny["model"]
    cnet = copy.deepcopy(tiny[start])
    opt = torch.optim.AdamW(cnet.parameters(), lr=2e-3 if stage == 1 else 1e-3)
    batch = make_batch(b=2, seed=6, probes=stage == 2)
    # Stage 2 uses a large weight so the conservativity term visibly moves in a few steps.
    weight = 0.0 if stage == 1 else 1000.0
    history = []
    with O.training_attention():
        for _ in range(6):
            terms = O.loss_terms(model, cnet, batch, weight, mode=mode)
            terms["total"].mean().backward()
            opt.step()
            opt.zero_grad()
            history.append({k: float(v.detach().mean()) for k, v in terms.items()})
    assert history[-1]["total"] < 0.97 * history[0]["total"], history
    if stage == 1:
        assert all(h["qc"] == 0 for h in history)
    else:
        assert history[0]["qc"] > 0 and history[-1]["qc"] < 0.8 * history[0]["qc"], history
    # fp32 master weights
    assert all(p.dtype == torch.float32 and p.grad is None for p in cnet.parameters())


def test_bf16_mixed_precision_keeps_fp32_controlnet_weights_and_grads(tiny):
    import comfy.supported_models

    # The UNet as ComfyUI's loader builds it for dtype=bf16 on CPU: bf16 weights, fp32 compute casts.
    config = comfy.supported_models.SD15(dict(s.TINY_SD15_UNET))
    config.set_inference_dtype(torch.bfloat16, torch.float32)
    model = config.get_model({}, device=CPU)
    model.diffusion_model.load_state_dict(tiny["model"].diffusion_model.state_dict())
    model.diffusion_model.requires_grad_(False)
    assert next(model.diffusion_model.parameters()).dtype == torch.bfloat16
    cnet = copy.deepcopy(tiny["trained"])
    batch = make_batch(b=2, seed=7)
    with O.training_attention():
        terms = O.loss_terms(model, cnet, batch, 0.01, autocast=engine.autocast_context(CPU, "bf16"))
    terms["total"].mean().backward()
    assert torch.isfinite(terms["total"]).all() and terms["qc"].abs().sum() > 0
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in cnet.parameters())


def test_gradient_checkpointing_gives_the_same_gradients(tiny):
    model = tiny["model"]
    batch = make_batch(b=1, seed=8)
    grads = []
    for checkpointing in (False, True):
        cnet = copy.deepcopy(tiny["trained"])
        if checkpointing:
            assert models.enable_gradient_checkpointing(cnet) > 0
        with O.training_attention():
            O.loss_terms(model, cnet, batch, 0.0)["total"].mean().backward()
            O.loss_terms(model, cnet, batch, 0.01)["total"].mean().backward()  # stage 2 runs with it too
        grads.append(torch.cat([p.grad.flatten() for p in cnet.parameters()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-7)


# --- data -------------------------------------------------------------------------------------


# --- checkpoints ---------------------------------------------------------------------------------


# --- base checkpoint checks -----------------------------------------------------------------------


# --- eval ------------------------------------------------------------------------------------------


def test_training_attention_goes_through_comfyui_hook_and_leaves_its_module_alone(tiny, monkeypatch):
    """Training picks its attention through transformer_options' optimized_attention_override,
    for the UNet and the ControlNet alike; ComfyUI's module attributes stay untouched. In L_QC
    steps only the attention layers a forward-mode tangent reaches use the written-out rule."""
    import comfy.ldm.modules.attention as attention

    before = (attention.optimized_attention, attention.optimized_attention_masked)
    calls = []
    real = O.forward_mode_attention

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(O, "forward_mode_attention", counting)  # the project's own function
    model, cnet = tiny["model"], tiny["trained"]
    batch = make_batch(b=1, seed=4, probes=True)
    sigma, x_noisy = O.noisy_inputs(model, batch)
    ms = model.model_sampling
    x_in = ms.calculate_input(sigma, x_noisy)

    def through_controlnet(xp):
        return O.controlled_eps(model, cnet, x_in.detach(), ms.calculate_input(sigma, xp), ms.timestep(sigma),
                                batch.context, None, batch.hint)

    with O.training_attention(forward_mode=True):
        assert (attention.optimized_attention, attention.optimized_attention_masked) == before
        O.jacobian_probes(through_controlnet, x_noisy, batch.probe, create_graph=False)
    n_cnet = sum(1 for n, _ in cnet.named_modules() if n.endswith(("attn1", "attn2")))
    n_unet = sum(1 for n, _ in model.diffusion_model.named_modules() if n.endswith(("attn1", "attn2")))
    # every ControlNet layer carries the tangent; the UNet's encoder (detached input) does not
    assert n_cnet <= len(calls) < n_cnet + n_unet
    calls.clear()
    O.jacobian_probes(through_controlnet, x_noisy, batch.probe, create_graph=False)
    assert calls == []  # outside the context ComfyUI's own choice runs


def test_training_qc_loss_has_the_estimator_value_and_an_unbiased_gradient():
    """qc_per_row_for_training: the same per-probe value as qc_per_row, and a gradient
    (through J v only, no double backward) whose mean is the exact gradient."""
    torch.manual_seed(0)
    net = RowMLP(seed=3)
    x = torch.randn(6)
    exact = exact_asymmetry(net, x)
    n = 40000
    probes = O.rademacher((n, 6), torch.Generator().manual_seed(4))
    _, jv, jtv = O.jacobian_probes(net, x.expand(n, 6), probes, create_graph=False, retain_graph=True)
    trained = O.qc_per_row_for_training(jv, jtv)
    assert torch.allclose(trained.detach(), O.qc_per_row(jv.detach(), jtv.detach()))
    assert jtv.grad_fn is None  # the reverse-mode product carries no graph
    g_est = torch.autograd.grad(trained.mean(), list(net.parameters()))
    g_exact = torch.autograd.grad(exact, list(net.parameters()))
    a, b = torch.cat([g.flatten() for g in g_est]), torch.cat([g.flatten() for g in g_exact])
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert abs(a.norm() / b.norm() - 1) < 0.05


# --- command line ----------------------------------------------------------------------------------

