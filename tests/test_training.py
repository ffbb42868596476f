"""Training, in process: the conservativity estimator, the add^inj training
forward against the sampling forward, the stages on a fixed batch, data and
checkpoint handling. Tiny models built with ComfyUI's own classes."""

import contextlib
import copy
import errno
import json
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
from PIL import Image

import comfy.controlnet

from balanced_control.nodes.micontrolnet import MIControlNetApply
from conftest import give_nonzero_outputs
from headless import synthetic as s
from training import data, engine, models, objectives as O

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


def _reference_attention(q, k, v, heads, mask=None):
    """softmax(q kᵀ/√d) v in float64, differentiated by torch's own forward-mode rules
    (softmax as exp / sum: torch's softmax jvp cannot be differentiated again)."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.double().view(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / d ** 0.5
    if mask is not None:
        mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape)) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask.double()
    e = (scores - scores.amax(-1, keepdim=True).detach()).exp()
    return ((e / e.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(b, -1, inner)


def _attention_mask(kind: str, b: int, n: int, m: int, g: torch.Generator):
    """The mask shapes and kinds ComfyUI's attention accepts; key 0 always visible."""
    if kind == "none":
        return None
    shape = {"bool 2d": (n, m), "bool 3d": (b, n, m), "bool 4d": (b, 1, n, m), "additive": (b, 1, n, m)}[kind]
    keep = (torch.rand(shape, generator=g) > 0.3) | (torch.arange(m) == 0)
    if kind == "additive":
        return torch.where(keep, torch.randn(shape, generator=g), torch.tensor(float("-inf")))
    return keep


def _dual_attention(attention, primals, tangent, heads, mask, cast=lambda t: t, **kwargs):
    with fwAD.dual_level():
        args = [fwAD.make_dual(cast(primals[x]), cast(tangent[x])) if x in tangent else cast(primals[x])
                for x in "qkv"]
        return fwAD.unpack_dual(attention(*args, heads, mask=mask, **kwargs))


@pytest.mark.parametrize("tangents", ["qkv", "q", "kv"])
@pytest.mark.parametrize("mask_kind", ["none", "bool 2d", "bool 3d", "bool 4d", "additive"])
def test_forward_mode_attention_matches_torchs_rules_and_differentiates_through_the_tangent(tangents, mask_kind):
    """Self-attention (all of q, k, v carry the probe), cross-attention (q only) and
    key/value tangents, with every mask form; primal, tangent and the reverse-mode
    gradient of a loss on both against float64 forward-mode AD of a plain softmax attention."""
    g = torch.Generator().manual_seed(3)
    b, n, m, heads, d = 2, 5, 7, 2, 4
    primals = {name: torch.randn(b, n if name == "q" else m, heads * d, generator=g, requires_grad=True)
               for name in "qkv"}
    tangent = {name: torch.randn(b, n if name == "q" else m, heads * d, generator=g) for name in tangents}
    mask = _attention_mask(mask_kind, b, n, m, g)

    def run(attention, cast):
        out, d_out = _dual_attention(attention, primals, tangent, heads, mask, cast)
        loss = out.sum() + (d_out * torch.linspace(-1, 1, d_out.shape[-1], dtype=d_out.dtype)).square().sum()
        return out, d_out, torch.autograd.grad(loss, [primals[x] for x in "qkv"])

    ours = run(O.forward_mode_attention, lambda t: t)
    ref = run(_reference_attention, lambda t: t.double())
    assert torch.allclose(ours[0].double(), ref[0], atol=1e-5)
    assert torch.allclose(ours[1].double(), ref[1], atol=1e-5)
    for a, r in zip(ours[2], ref[2]):
        assert torch.allclose(a, r, atol=1e-4), (a - r).abs().max()


def test_forward_mode_attention_head_layouts_dtypes_and_fully_masked_queries():
    g = torch.Generator().manual_seed(5)
    b, n, heads, d = 2, 6, 2, 4
    primals = {x: torch.randn(b, n, heads * d, generator=g) for x in "qkv"}
    tangent = {x: torch.randn(b, n, heads * d, generator=g) for x in "qkv"}
    out, d_out = _dual_attention(O.forward_mode_attention, primals, tangent, heads, None)

    # skip_reshape / skip_output_reshape: (b, heads, n, d) in and out, as ComfyUI passes them
    def split(t):
        return t.view(b, n, heads, d).transpose(1, 2)

    split_primals = {x: split(t) for x, t in primals.items()}
    split_tangent = {x: split(t) for x, t in tangent.items()}
    out4, d_out4 = _dual_attention(O.forward_mode_attention, split_primals, split_tangent, heads, None,
                                   skip_reshape=True, skip_output_reshape=True)
    assert out4.shape == (b, heads, n, d)
    assert torch.allclose(out4, split(out), atol=1e-6) and torch.allclose(d_out4, split(d_out), atol=1e-6)

    # Low-precision inputs: fp32 inside, the input dtype outside.
    half_out, half_d_out = _dual_attention(O.forward_mode_attention, primals, tangent, heads, None,
                                           cast=lambda t: t.to(torch.bfloat16))
    assert half_out.dtype == half_d_out.dtype == torch.bfloat16
    assert torch.allclose(half_d_out.float(), d_out, atol=0.1, rtol=0.05)

    # A query whose keys are all masked gets 0 (as SDPA gives) and a zero tangent, never NaN.
    mask = torch.ones(b, 1, n, n, dtype=torch.bool)
    mask[:, :, 2] = False
    out, d_out = _dual_attention(O.forward_mode_attention, primals, tangent, heads, mask)
    assert torch.isfinite(out).all() and torch.isfinite(d_out).all()
    assert d_out[:, 2].abs().max() == 0


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

def write_dataset(root: Path, n=3, with_segmentation=True):
    import skimage.data

    (root / "images").mkdir(parents=True)
    (root / "segmentation").mkdir()
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"][:n]):
        img = getattr(skimage.data, name)()
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a photo, {name}")
        if with_segmentation:
            seg = np.zeros(img.shape[:2], np.uint8)
            seg[:, img.shape[1] // 2:] = 1
            seg[: img.shape[0] // 2] += 2
            Image.fromarray(seg * 60).save(root / "segmentation" / f"{name}.png")
    return root


def test_corrupt_and_missing_files_are_reported_by_name_and_skipped(tmp_path, caplog):
    root = write_dataset(tmp_path / "ds")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "images" / "broken.txt").write_text("broken")
    jsonl = tmp_path / "ds.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"image": "ds/images/astronaut.png", "prompt": "ok"},
        {"image": "ds/images/missing.png", "prompt": "gone"},
        {"image": "ds/images/broken.png"},
    ]))
    with caplog.at_level("WARNING"):
        folder = data.scan_dataset(root, need_condition=False)
        lines = data.scan_dataset(jsonl, need_condition=False)
    assert [r.name for r in folder.records] == ["astronaut", "chelsea", "coffee"]
    assert len(folder.skipped) == 1 and folder.skipped[0][0].endswith("broken.png")
    assert [r.prompt for r in lines.records] == ["ok"] and len(lines.skipped) == 2
    assert "missing.png" in caplog.text and "broken.png" in caplog.text and "skipped 2 of 3" in caplog.text
    # A condition image is required unless conditions are computed (canny).
    with pytest.raises(ValueError, match="no usable samples"):
        data.scan_dataset(root, need_condition=True)

    # A file that breaks after the scan is skipped at load time, by name, and the run goes on.
    samples = data.TrainingSamples(folder.records, data.SampleOptions(resolution=64, condition="canny"), seed=0)
    (root / "images" / "chelsea.png").write_bytes((root / "images" / "chelsea.png").read_bytes()[:200])
    with caplog.at_level("WARNING"):
        item = samples[(5, 1)]
    assert item["index"] == 2 and samples.bad == {1}
    assert "chelsea.png" in caplog.text


def test_samples_are_reproducible_and_rebalanced(tmp_path):
    root = write_dataset(tmp_path / "ds")
    recs = data.scan_dataset(root, need_condition=False).records
    opts = data.SampleOptions(resolution=64, condition="canny", rebalance_prob=1.0, probes=True)
    a = data.TrainingSamples(recs, opts, seed=3)
    b = data.TrainingSamples(recs, opts, seed=3)
    x, y = a[(7, 0)], b[(7, 0)]
    for k in ("hint", "noise", "probe", "mask", "timestep_index"):
        assert torch.equal(x[k], y[k]), k
    assert not torch.equal(a[(8, 0)]["noise"], x["noise"])
    # Some regions are silent and some keep the condition; the target stays whole.
    m = x["mask"]
    assert 0 < m.mean() < 1 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (x["hint"][:, m == 0] == 0).all()
    full = data.canny(data.load_rgb(recs[0].image, 64))
    assert torch.equal(x["hint"], torch.from_numpy(full).permute(2, 0, 1).float() / 255 * m)
    assert x["probe"].abs().eq(1).all()
    # Without segmentation maps the fallback superpixels give several regions.
    labels = data.superpixels(data.load_rgb(recs[0].image, 64), 12)
    assert len(np.unique(labels)) >= 4


def test_data_order_is_the_same_for_one_and_two_ranks():
    one = list(data.PositionSampler(10, 0, 0, 5, micro_batch=2, accumulation=1, world=1, rank=0))
    two = [list(data.PositionSampler(10, 0, 0, 5, micro_batch=1, accumulation=1, world=2, rank=r)) for r in (0, 1)]
    assert [sum(pair, []) for pair in zip(*two)] == one
    resumed = list(data.PositionSampler(10, 0, 3, 5, micro_batch=2, accumulation=1, world=1, rank=0))
    assert resumed == one[3:]


# --- checkpoints ---------------------------------------------------------------------------------

@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Writes past ``max_bytes`` fail with a real I/O error (EFBIG), as on a
    full disk: the kernel's per-process file-size limit, SIGXFSZ ignored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    store = engine.CheckpointStore(tmp_path / "checkpoints", keep=2)
    tmp = store.begin(2)
    engine.save_tensors({"w": torch.ones(3)}, tmp / "controlnet.safetensors")
    engine.write_json(tmp / "state.json", {"step": 2})
    good = store.commit(2)

    tmp = store.begin(4)
    # The real safetensors writer fails part way; it must surface as OSError,
    # the one error the trainer handles by logging and going on.
    with file_size_limit(64 * 1024), pytest.raises(OSError) as failure:
        engine.save_tensors({"w": torch.zeros(1 << 20)}, tmp / "controlnet.safetensors")
    assert failure.value.errno == errno.EFBIG and "controlnet.safetensors" in str(failure.value)
    store.abort(4)
    assert store.latest() == good and store.resolve("latest") == good
    assert torch.equal(engine.load_tensors(good / "controlnet.safetensors")["w"], torch.ones(3))
    assert not list(store.root.glob(".tmp-*"))

    # A process killed mid-write leaves a .tmp folder: ignored, then cleaned by the next save.
    (store.root / ".tmp-step-00000006").mkdir()
    (store.root / ".tmp-step-00000006" / "state.json").write_text("{}")
    assert store.latest() == good
    store.begin(8)
    assert not (store.root / ".tmp-step-00000006").exists()


# --- base checkpoint checks -----------------------------------------------------------------------

def test_wrong_family_base_checkpoint_fails_at_start(tmp_path, small_sd15_files):
    sd2_like = dict(s.SD15_UNET_SMALL, context_dim=1024, use_linear_in_transformer=True, num_res_blocks=[1],
                    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])
    path = s.save(s.unet_state_dict(sd2_like), tmp_path / "sd2-like.safetensors")
    with pytest.raises(models.WrongFamilyError, match=r"SD20 checkpoint, but training supports SD1.5 and SDXL"):
        models.load_base_model(path)
    with pytest.raises(models.WrongFamilyError, match=r"expected a sdxl checkpoint .* found SD1.5"):
        models.load_base_model(small_sd15_files["checkpoint"], "sdxl")
    cn = small_sd15_files["controlnets"][0]
    with pytest.raises(models.WrongFamilyError, match="no diffusion-model weights"):
        models.load_base_model(cn)


# --- eval ------------------------------------------------------------------------------------------

def test_eval_metrics_measure_what_they_claim(tmp_path, tiny):
    from training import evaluate

    flat = np.full((32, 32, 3), 0.5)
    noisy = flat + np.random.default_rng(0).uniform(-0.2, 0.2, flat.shape)
    silent = np.zeros((32, 32), bool)
    silent[:, :16] = True
    assert evaluate.total_variation(flat, silent) == (0.0, 0.0)
    tv_sum, tv_mean = evaluate.total_variation(noisy, silent)
    assert tv_mean > 0.05 and tv_sum == pytest.approx(tv_mean * (32 * 15 + 31 * 16))  # a sum over the pairs
    # Canny of an image that is its own edge map: cycle consistency is ~perfect.
    cond = np.zeros((64, 64, 3))
    cond[20:44, 20:44] = 1.0
    edges = data.canny((cond * 255).astype(np.uint8))[..., :] / 255.0
    region = np.ones((64, 64), bool)
    assert evaluate.canny_l1(cond, edges, region) < evaluate.canny_l1(flat.repeat(2, 0).repeat(2, 1), edges, region)

    # Asym: zero for a ControlNet with zero outputs, positive for a trained one.
    model = tiny["model"]
    batch = make_batch(b=1, seed=11)
    for name, positive in (("fresh", False), ("trained", True)):
        levels = evaluate.asym_metric(model, tiny[name], batch.hint, batch.context, batch=2, levels=2)
        assert len(levels) == 2
        assert all((lv["asym"] > 0) if positive else (lv["asym"] == 0) for lv in levels), levels
    evaluate.bar_chart({"asym": 1.0, "tv_silent": 0.5}, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 100


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

@pytest.mark.parametrize("subcommand", ["micontrolnet", "controlnext", "eval", "refine-control",
                                        "refine-control-eval"])
def test_help_explains_every_option(subcommand):
    import argparse
    import subprocess
    import sys

    from headless.runtime import REPO
    from training.__main__ import SUBCOMMANDS

    out = subprocess.run([sys.executable, "-m", "training", subcommand, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parser = argparse.ArgumentParser()
    SUBCOMMANDS[subcommand][1](parser)
    for action in parser._actions:
        assert action.help, f"{subcommand}: --{action.dest} has no help"
        assert action.option_strings[0] in out.stdout
