"""The pixel-space base, the procedural canvases and in-memory ControlNet
training (training/pixel_space.py, procedural.py, pixel_controlnet.py), on
ComfyUI's own model classes, loader and sampler path."""

import numpy as np
import pytest
import torch

import comfy.latent_formats

from conftest import assert_same_up_to_fp32_order, give_nonzero_outputs
from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings
from training import models, objectives as O
from training import pixel_controlnet as pc
from training import pixel_space as ps
from training import procedural as pr


@pytest.fixture(scope="module")
def small():
    canvases = pr.make_canvases(12, 16, seed=3)
    base = ps.build_pixel_base(seed=0)
    return {"canvases": canvases, "base": base, "canny": pr.control("canny", canvases),
            "regions": pr.control("regions", canvases)}


def test_fold_is_a_lossless_2x2_fold_to_four_channels():
    g = torch.rand(3, 8, 6, generator=torch.Generator().manual_seed(0))
    z = ps.fold(g)
    assert z.shape == (3, 4, 4, 3)
    # Channel c of latent pixel (i, j) is image pixel (2i + c // 2, 2j + c % 2), mapped to [-1, 1].
    assert torch.equal(z[:, 1, 2, 1], g[:, 4, 3] * 2 - 1)
    assert torch.equal(z[:, 2, 0, 2], g[:, 1, 4] * 2 - 1)
    assert torch.allclose(ps.unfold(z), g, atol=1e-6)
    with pytest.raises(ValueError, match="even H and W"):
        ps.fold(torch.rand(1, 5, 4))
    with pytest.raises(ValueError, match=r"\(B, 4, h, w\)"):
        ps.unfold(torch.rand(1, 3, 4, 4))


def test_the_base_is_comfyuis_sd15_unet_with_an_identity_latent_format(small):
    import comfy.model_base
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = small["base"]
    assert isinstance(base.model, comfy.model_base.BaseModel)
    assert isinstance(base.unet, UNetModel)
    assert type(base.model.latent_format) is comfy.latent_formats.LatentFormat
    z = torch.randn(2, 4, 8, 8)
    assert torch.equal(base.model.process_latent_in(z), z)
    # SD1.5's discrete ε schedule.
    import comfy.supported_models
    sd15 = comfy.supported_models.SD15(ps.pixel_unet_config()).get_model({})
    assert torch.equal(base.model.model_sampling.sigmas, sd15.model_sampling.sigmas)
    again = ps.build_pixel_base(seed=0)
    assert all(torch.equal(a, b) for a, b in zip(base.unet.state_dict().values(), again.unet.state_dict().values()))
    assert torch.equal(base.context, again.context)


def test_training_the_base_lowers_its_loss_on_a_held_out_batch():
    c = pr.make_canvases(32, 16, seed=1)
    base = ps.build_pixel_base(seed=2)
    g = torch.Generator().manual_seed(7)
    z = base.model.process_latent_in(ps.fold(torch.from_numpy(pr.make_canvases(8, 16, seed=99).images)))
    noise, t = torch.randn(z.shape, generator=g), torch.randint(0, 1000, (8,), generator=g)
    with torch.no_grad():
        before = ps.eps_loss(base.model, z, noise, t, base.context).mean()
    ps.train_pixel_base(base, torch.from_numpy(c.images), steps=60, batch_size=8, seed=0, log_every=0)
    with torch.no_grad():
        after = ps.eps_loss(base.model, z, noise, t, base.context).mean()
    assert after < 0.8 * before, (before, after)
    assert not any(p.requires_grad for p in base.unet.parameters())


def test_canvases_are_seeded_and_every_half_has_flat_and_textured_regions():
    a, b = pr.make_canvases(6, 16, seed=5), pr.make_canvases(6, 16, seed=5)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, pr.make_canvases(6, 16, seed=6).images)
    for k in range(6):
        for half in (a.kinds[k][:, :8], a.kinds[k][:, 8:]):
            assert (half == 0).any() and (half > 0).any()
        flat = a.kinds[k] == 0
        # Flat regions are one grey level per region; textured ones vary.
        for r in np.unique(a.labels[k]):
            m = a.labels[k] == r
            assert (np.ptp(a.images[k][m]) == 0) == bool(flat[m].all())
    assert {int(v) for v in np.unique(np.concatenate([c.kinds.ravel() for c in (a,)]))} <= set(range(len(pr.TEXTURES)))


def test_the_two_control_kinds_are_different_conditions(small):
    canny, regions, c = small["canny"], small["regions"], small["canvases"]
    assert canny.shape == regions.shape == (12, 16, 16, 3)
    assert set(np.unique(canny)) <= {0.0, 1.0}
    assert regions.min() >= 0.2  # never the silent value 0
    # A region map is constant on each region; canny marks lines inside textured regions too.
    for k in range(len(c)):
        for r in np.unique(c.labels[k]):
            m = c.labels[k] == r
            assert np.ptp(regions[k][m], axis=0).max() == 0
    assert canny[c.kinds > 0].mean() > canny[c.kinds == 0].mean()
    with pytest.raises(ValueError, match="unknown control kind"):
        pr.control("depth", c)


def test_rebalancing_silences_whole_regions(small):
    c, hints = small["canvases"], small["regions"]
    cfg = pc.ControlTraining(rebalance_prob=1.0, keep_prob=0.5)
    out = pc.rebalanced(hints, c.labels, np.random.default_rng(0), cfg)
    for k in range(len(c)):
        silent = (out[k] == 0).all(-1)
        assert silent.any() and not silent.all()
        for r in np.unique(c.labels[k]):
            m = c.labels[k] == r
            assert silent[m].all() or not silent[m].any()
        assert np.array_equal(out[k][~silent], hints[k][~silent])
    same = pc.rebalanced(hints, c.labels, np.random.default_rng(0), pc.ControlTraining(rebalance_prob=0.0))
    assert np.array_equal(same, hints)


def test_a_trained_controlnet_samples_through_the_node_path_as_it_trained(small):
    """The training forward (objectives.controlled_eps, add^inj, mgda convention) against
    ComfyUI's loader + MIControlNetApply + MIControlNetSettings + model.apply_model."""
    base, c = small["base"], small["canvases"]
    cfg = pc.ControlTraining(steps=3, batch_size=4, mode="micontrolnet", lambda_convention="mgda_weight_of_control",
                             lr=1e-2)
    cnet, losses = pc.train_controlnet(base, c.images, small["canny"], c.labels, cfg, log_every=0)
    assert len(losses) == 3 and any(p.any() for p in cnet.zero_convs[0].parameters())
    model, ms = base.model, base.model.model_sampling
    g = torch.Generator().manual_seed(1)
    z = model.process_latent_in(ps.fold(torch.from_numpy(c.images[:2])))
    sigma = ms.sigmas[torch.tensor([300, 700])].float()
    x_noisy = ms.noise_scaling(sigma, torch.randn(z.shape, generator=g), z)
    hint = torch.from_numpy(small["canny"][:2])
    ctx = base.context.expand(2, -1, -1)
    with torch.no_grad(), O.training_attention():
        x_in = ms.calculate_input(sigma, x_noisy)
        eps = O.controlled_eps(model, cnet, x_in, x_in, ms.timestep(sigma), ctx, None,
                               pc.upscale_hint(hint, (8, 8)), mode="micontrolnet",
                               lambda_convention="mgda_weight_of_control")
        trained = ms.calculate_denoised(sigma, eps, x_noisy)
    patched = MIControlNetSettings.execute(base.patcher(), "micontrolnet", "layer", 20.0, False,
                                           lambda_convention="mgda_weight_of_control").args[0]
    settings = patched.model_options["transformer_options"]
    loaded = pc.comfy_controlnet(cnet)
    rows = []
    with torch.no_grad():
        for r in range(2):
            control = MIControlNetApply.execute(base.conditioning(), base.conditioning(), loaded, hint[r:r + 1],
                                                1.0, 0.0, 1.0, None, None).args[0][0][1]["control"]
            control.pre_run(model, ms.percent_to_sigma)
            to = {"cond_or_uncond": [0], "sigmas": sigma[r:r + 1], **settings}
            cc = {"c_crossattn": base.context, "transformer_options": to}
            ctrl = control.get_control(x_noisy[r:r + 1], sigma[r:r + 1], cc, 1, to)
            rows.append(model.apply_model(x_noisy[r:r + 1], sigma[r:r + 1], c_crossattn=base.context, control=ctrl,
                                          transformer_options=to))
            control.cleanup()
        plain = model.apply_model(x_noisy, sigma, c_crossattn=ctx)
    sampled = torch.cat(rows)
    assert_same_up_to_fp32_order(trained, sampled)
    assert (trained - plain).abs().max() > 1e-4


def test_as_written_from_zero_warms_up_with_a_plain_add(small):
    """The trainer's rule: under as_written a zero-initialised ControlNet has no gradient
    through add^inj, so the first steps inject with a plain add and the zero convs move."""
    base, c = small["base"], small["canvases"]
    cfg = pc.ControlTraining(steps=1, batch_size=2, mode="micontrolnet", lambda_convention="as_written")
    cnet, _ = pc.train_controlnet(base, c.images, small["canny"], c.labels, cfg, log_every=0)
    assert any(p.any() for p in cnet.zero_convs[0].parameters())
    cfg = pc.ControlTraining(steps=1, batch_size=2, mode="micontrolnet", lambda_convention="as_written",
                             plain_add_warmup_steps=0)
    cnet, _ = pc.train_controlnet(base, c.images, small["canny"], c.labels, cfg, log_every=0)
    assert not any(p.any() for p in cnet.zero_convs[0].parameters())


def test_v_weighting_is_the_v_prediction_loss_of_the_eps_model(small):
    """loss_weights("v") · ε-MSE equals the v-MSE (Salimans & Ho 2022) computed from its
    definition in VP variables, up to the one constant (mean weight over the schedule)."""
    ms = small["base"].model.model_sampling
    g = torch.Generator().manual_seed(4)
    t = torch.tensor([0, 10, 250, 500, 750, 999])
    x0, eps, eps_hat = (torch.randn(6, 4, 5, 5, generator=g, dtype=torch.float64) for _ in range(3))
    sigma = ms.sigmas[t].double().view(-1, 1, 1, 1)
    alpha, s = 1 / (1 + sigma ** 2).sqrt(), sigma / (1 + sigma ** 2).sqrt()   # x_vp = α x0 + s ε
    x = x0 + sigma * eps                                                     # ComfyUI's unscaled x
    x0_hat = x - sigma * eps_hat
    v, v_hat = alpha * eps - s * x0, alpha * eps_hat - s * x0_hat
    v_mse = (v_hat - v).square().flatten(1).mean(1)
    eps_mse = (eps_hat - eps).square().flatten(1).mean(1)
    mean_w = (1 + ms.sigmas.double() ** 2).mean()
    w = ps.loss_weights(ms, t, "v").double()
    assert torch.allclose(w * eps_mse * mean_w, v_mse, rtol=1e-5)
    assert torch.equal(ps.loss_weights(ms, t, "eps"), torch.ones(6))
    with pytest.raises(ValueError, match="expected one of"):
        ps.loss_weights(ms, t, "snr")


def test_latent_scale_is_the_latent_formats_and_the_trainer_applies_it():
    base = ps.build_pixel_base(seed=0, latent_scale=2.5)
    z = ps.fold(torch.from_numpy(pr.make_canvases(2, 16, seed=1).images))
    assert torch.equal(base.model.process_latent_in(z), z * 2.5)
    assert torch.allclose(base.model.process_latent_out(base.model.process_latent_in(z)), z)
    assert ps.build_pixel_base(seed=0).model.latent_format.scale_factor == 1.0  # one instance per model
    for bad in (0.0, -1.0, float("inf"), float("nan"), True, "2.5"):
        with pytest.raises(ValueError, match=r"latent_scale: expected a finite number > 0.*got"):
            ps.build_pixel_base(seed=0, latent_scale=bad)
    # The trainers feed the UNet model-space latents: the same loss as eps_loss on scaled latents.
    losses = ps.train_pixel_base(base, torch.from_numpy(pr.make_canvases(4, 16, seed=2).images), steps=1,
                                 batch_size=2, lr=0.0, seed=5, log_every=0)
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, 4, (2,), generator=g)
    noise = torch.randn((2, 4, 8, 8), generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    zz = base.model.process_latent_in(ps.fold(torch.from_numpy(pr.make_canvases(4, 16, seed=2).images)))
    with torch.no_grad():
        expected = ps.eps_loss(base.model, zz[idx], noise, t, base.context).mean()
    assert losses[0] == pytest.approx(float(expected), rel=1e-5)


def test_the_denoising_report_is_the_x0_error_of_the_eps_prediction():
    base = ps.build_pixel_base(seed=1, latent_scale=2.0)
    imgs = torch.from_numpy(pr.make_canvases(6, 16, seed=4).images)
    rows = ps.denoising_report(base, imgs, timesteps=(100, 900), seed=3)
    z = base.model.process_latent_in(ps.fold(imgs))
    g = torch.Generator().manual_seed(3)
    for row in rows:
        noise = torch.randn(z.shape, generator=g)
        ms = base.model.model_sampling
        sigma = ms.sigmas[row["t"]].float()
        x = ms.noise_scaling(sigma, noise, z)
        with torch.no_grad():
            eps = base.model.diffusion_model(ms.calculate_input(sigma, x), ms.timestep(sigma).expand(6).float(),
                                             context=base.context.expand(6, -1, -1))
        x0_hat = x - sigma * eps   # ComfyUI's EPS calculate_denoised
        assert row["x0_mse"] == pytest.approx(float((x0_hat - z).square().mean()), rel=1e-4)
        assert row["x0_mse_mean"] == pytest.approx(float((z - z.mean(0)).square().mean()), rel=1e-5)


def _recording_backward(monkeypatch) -> list:
    """Record the value of every tensor ``backward()`` is called on (then run it)."""
    seen, original = [], torch.Tensor.backward

    def backward(self, *args, **kwargs):
        seen.append(self.detach().clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", backward)
    return seen


def _weights_by_definition(ms, t: torch.Tensor, weighting: str) -> torch.Tensor:
    """1 for "eps"; (1 + σ²) over its schedule mean for "v", in float64."""
    if weighting == "eps":
        return torch.ones(t.shape, dtype=torch.float64)
    w = 1 + ms.sigmas.double() ** 2
    return (w / w.mean())[t]


def test_base_training_backpropagates_the_weighted_loss(small, monkeypatch):
    base = ps.build_pixel_base(seed=2)
    imgs = torch.from_numpy(small["canvases"].images)
    with pytest.raises(ValueError, match=r"expected one of \('eps', 'v'\).*got 'snr'"):
        ps.train_pixel_base(base, imgs, steps=1, weighting="snr")
    rows, original = [], ps.eps_loss

    def eps_loss(model, latents, noise, timestep_index, context):
        rows.append((timestep_index, original(model, latents, noise, timestep_index, context)))
        return rows[-1][1]

    monkeypatch.setattr(ps, "eps_loss", eps_loss)
    seen = _recording_backward(monkeypatch)
    for weighting in ("eps", "v"):
        rows.clear(), seen.clear()
        losses = ps.train_pixel_base(base, imgs, steps=1, batch_size=4, lr=0.0, seed=1, log_every=0,
                                     weighting=weighting)
        (t, per_row), = rows
        w = _weights_by_definition(base.model.model_sampling, t, weighting)
        assert float(seen[-1]) == pytest.approx(float((per_row.detach().double() * w).mean()), rel=1e-5)
        assert losses[0] == pytest.approx(float(per_row.detach().mean()), rel=1e-6)  # reported: unweighted
    assert not torch.allclose(w, torch.ones_like(w))  # the v batch really is weighted


def test_controlnet_training_backpropagates_the_weighted_task_loss(small, monkeypatch):
    base, c = small["base"], small["canvases"]
    with pytest.raises(ValueError, match="expected one of"):
        pc.train_controlnet(base, c.images, small["canny"], c.labels, pc.ControlTraining(steps=1, weighting="snr"))
    terms_seen, original = [], O.loss_terms

    def loss_terms(model, cnet, batch, *args, **kwargs):
        terms_seen.append((batch.timestep_index, original(model, cnet, batch, *args, **kwargs)))
        return terms_seen[-1][1]

    monkeypatch.setattr(O, "loss_terms", loss_terms)  # train_controlnet looks it up per call
    seen = _recording_backward(monkeypatch)
    ms = base.model.model_sampling
    start = models.controlnet_from_unet(base.unet, base.unet_config, seed=0)
    give_nonzero_outputs(start)  # non-zero residuals, so L_QC is non-zero
    for weighting, qc_weight in (("eps", 0.0), ("v", 0.0), ("v", 0.5)):
        terms_seen.clear(), seen.clear()
        cfg = pc.ControlTraining(steps=1, batch_size=4, lr=1e-2, seed=3, weighting=weighting,
                                 qc_weight=qc_weight, plain_add_warmup_steps=0)
        pc.train_controlnet(base, c.images, small["canny"], c.labels, cfg, init=start, log_every=0)
        (t, terms), = terms_seen
        w = _weights_by_definition(ms, t, weighting)
        task, qc = terms["task"].detach().double(), terms["qc"].detach().double()
        if qc_weight:
            assert float(qc.abs().max()) > 0  # stage 2's term is in the loss
        assert float(seen[-1]) == pytest.approx(float((w * task + qc_weight * qc).mean()), rel=1e-5)


def test_timestep_indices_outside_the_schedule_are_refused(small):
    ms = small["base"].model.model_sampling
    for bad in (torch.tensor([-1, 5]), torch.tensor([1000])):
        with pytest.raises(ValueError, match=r"expected integers in \[0, 999\]"):
            ps.loss_weights(ms, bad, "v")
    with pytest.raises(ValueError, match="timestep index"):
        ps.denoising_report(small["base"], torch.from_numpy(small["canvases"].images[:2]), timesteps=(1000,))
