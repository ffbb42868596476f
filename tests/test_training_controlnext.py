"""``python -m training controlnext``: the training forward is the sampling
forward of Apply ControlNeXt, only the regex-selected UNet weights and the
module train, at a 10× learning-rate ratio; runs as users start them
(subprocesses on a small SD1.5-family checkpoint), a SIGKILLed run resumes to
the same losses, and the written files load through ControlNeXtLoader and
sample in ComfyUI's server."""

import copy
import json
import os
import signal

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import comfy.model_patcher
import comfy.utils

from model_patches import controlnext as cx
from headless import synthetic as s
from headless.server import ComfyServer, copy_model
from training import controlnext_trainer as T
from training import engine, objectives as O

from conftest import assert_same_up_to_fp32_order
from test_controlnext_server import api_prompt, saved_image
from test_training_data import write_dataset
from training_subprocess import kill_at_first_checkpoint, remove_checkpoints, run_training, training_command

CPU = torch.device("cpu")
STEPS = 4


# --- in process, on the small SD1.5-family UNet --------------------------------------------------

@pytest.fixture(scope="module")
def small():
    model = s.build_unet_model(s.SD15_UNET_SMALL, seed=0)
    model.diffusion_model.requires_grad_(False)
    return model


def fixed_batch(b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    hint = torch.zeros(b, 3, 64, 64)
    for r in range(b):  # a bright block per row, at different places
        hint[r, :, 8 + 8 * r: 40 + 8 * r, 16:48] = 1.0
    return O.Batch(latents=torch.randn(b, 4, 8, 8, generator=g), hint=hint,
                   context=torch.randn(b, 77, 768, generator=g), y=None, noise=torch.randn(b, 4, 8, 8, generator=g),
                   timestep_index=torch.tensor([200, 700][:b]))


def trainable(model, pattern="to_out", seed=0):
    model = copy.deepcopy(model)
    selected = T.select_unet_parameters(model.diffusion_model, pattern)
    for p in selected.values():
        p.requires_grad_(True)
    variant = cx.VARIANTS["sd15_training"]
    return model, T.ControlledUNet(model, variant, T.new_module(seed), selected), selected


def test_training_forward_equals_the_apply_controlnext_sampling_forward(small):
    model, net, _ = trainable(small)
    batch = fixed_batch()
    ms = model.model_sampling
    sigma, x_noisy = O.noisy_inputs(model, batch)
    with O.training_attention(), torch.no_grad():
        eps = net(ms.calculate_input(sigma, x_noisy), ms.timestep(sigma).float(), batch.context, None, batch.hint)
        trained = ms.calculate_denoised(sigma, eps, x_noisy)
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
        weights = cx.ControlNeXtWeights(net.control.state_dict(), "trained.safetensors")
        assert cx.resolve_variant(weights, patcher).key == "sd15_training"
        m = cx.apply_controlnext(patcher, weights, batch.hint.movedim(1, -1))
        to = dict(m.model_options["transformer_options"])
        to["wrappers"] = {k: {k1: list(v1) for k1, v1 in v.items()} for k, v in m.wrappers.items()}
        to.update(cond_or_uncond=[0], sigmas=sigma)
        sampled = model.apply_model(x_noisy, sigma, c_crossattn=batch.context, transformer_options=to)
        plain = model.apply_model(x_noisy, sigma, c_crossattn=batch.context)
    assert_same_up_to_fp32_order(trained, sampled)
    assert (trained - plain).abs().max() > 1e-3  # the control acts


def test_a_few_steps_lower_the_loss_and_only_the_module_and_the_regex_subset_change(small):
    model, net, selected = trainable(small)
    frozen_before = {k: v.clone() for k, v in model.diffusion_model.state_dict().items() if k not in selected}
    selected_before = {k: p.detach().clone() for k, p in selected.items()}
    module_before = {k: v.clone() for k, v in net.control.state_dict().items()}
    lr, ratio = 1e-4, 10.0
    opt = torch.optim.AdamW(T.param_groups(net.control, selected, lr, ratio), lr=lr, weight_decay=0.0)
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(lr * ratio), pytest.approx(lr)]
    batch = fixed_batch(seed=1)
    losses = []
    with O.training_attention():
        for step in range(4):
            loss = T.per_row_loss(net, model, batch).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            if step == 0:
                # Adam's first step moves every weight by about lr·sign(g): the largest
                # move of each group is its learning rate.
                module_move = max(float((v - module_before[k]).abs().max())
                                  for k, v in net.control.state_dict().items())
                unet_move = max(float((p.detach() - selected_before[k]).abs().max()) for k, p in selected.items())
                assert module_move / unet_move == pytest.approx(ratio, rel=0.02), (module_move, unet_move)
    assert losses[-1] < 0.9 * losses[0], losses
    after = model.diffusion_model.state_dict()
    for k, v in frozen_before.items():
        assert torch.equal(after[k], v), f"{k} is outside the regex but changed"
    assert all(not torch.equal(p.detach(), selected_before[k]) for k, p in selected.items())
    assert all(not torch.equal(v, module_before[k]) for k, v in net.control.state_dict().items())
    assert selected and all("to_out" in k for k in selected)
    assert all(p.dtype == torch.float32 for p in net.parameters())


def test_the_regex_selects_the_trainable_subset(small):
    unet = small.diffusion_model
    cross = T.select_unet_parameters(unet, r"attn2\.to_out")
    every = T.select_unet_parameters(unet, "to_out")
    n_blocks = sum(1 for k in dict(unet.named_parameters()) if k.endswith("attn1.to_q.weight"))
    assert len(cross) == 2 * n_blocks and len(every) == 4 * n_blocks  # weight + bias per projection
    assert set(cross) < set(every) and all(".attn2.to_out." in k for k in cross)
    assert T.select_unet_parameters(unet, "none") == {}


# --- as users run it -------------------------------------------------------------------------------

def common_args(base, data, out):
    return ["--base", str(base), "--data", str(data), "--output", str(out), "--condition", "canny",
            "--resolution", "64", "--max-steps", str(STEPS), "--checkpoint-every", "2", "--batch-size", "2",
            "--learning-rate", "1e-4", "--seed", "3", "--cache-latents", "--save-dtype", "fp32", "--no-progress",
            "--validate-every", str(STEPS), "--validation-steps", "2"]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="2")


def command(args):
    return training_command("controlnext", args)


def train(args, log):
    run_training(command(args), log, env())


def losses(out):
    return [(int(r["step"]), r["loss"]) for r in engine.read_csv_log(out / "log.csv")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_sd15_files):
    root = tmp_path_factory.mktemp("cnx-train")
    data = write_dataset(root / "data", n=4)
    base = small_sd15_files["checkpoint"]
    ref = root / "reference"
    train(common_args(base, data, ref) + ["--unet-weights", "absolute"], root / "reference.log")
    yield {"root": root, "data": data, "base": base, "reference": ref}
    remove_checkpoints(root)


def test_reference_run_writes_the_loader_formats(runs):
    ref = runs["reference"]
    assert [r[0] for r in losses(ref)] == list(range(1, STEPS + 1))
    rows = engine.read_csv_log(ref / "log.csv")
    assert all(float(r["module_lr"]) == pytest.approx(10 * float(r["lr"])) for r in rows)
    assert sorted(p.name for p in (ref / "checkpoints").iterdir())[-1] == f"step-{STEPS:08d}"
    module = safetensors.torch.load_file(str(ref / "controlnext.safetensors"))
    assert cx.detect_layout(module) == "320" and len(module) == 52
    unet = safetensors.torch.load_file(str(ref / "controlnext_unet.safetensors"))
    # diffusers names, every one a to_out projection, as the official SD1.5 files
    to_comfy = comfy.utils.unet_to_diffusers(s.SD15_UNET_SMALL)
    assert unet and all(k in to_comfy and ".to_out." in k for k in unet)
    assert not (ref / "controlnext_unet_delta.safetensors").exists()
    # The validation image: the condition beside a sample through ControlNeXtApply's code path.
    sample = np.asarray(Image.open(ref / "validation" / f"step-{STEPS:08d}.png").convert("RGB"), dtype=np.float32)
    assert sample.shape == (64, 128, 3) and sample[:, 64:].std() > 1.0


def test_sigkill_and_resume_gives_identical_losses_and_delta_equals_absolute(runs, small_sd15_files):
    out = runs["root"] / "killed"
    args = common_args(runs["base"], runs["data"], out) + ["--unet-weights", "delta"]
    returncode = kill_at_first_checkpoint(command(args), out, runs["root"] / "killed.log", env())
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "controlnext.safetensors").exists()
    train(args + ["--resume", "latest"], runs["root"] / "resumed.log")
    assert losses(out) == losses(runs["reference"])
    a = safetensors.torch.load_file(str(out / "controlnext.safetensors"))
    b = safetensors.torch.load_file(str(runs["reference"] / "controlnext.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Both UNet files load through the loader's code path onto the same weights.
    model = s.build_unet_model(s.SD15_UNET_SMALL, seed=0)
    sd = comfy.utils.load_torch_file(str(small_sd15_files["checkpoint"]), safe_load=True)
    model.load_model_weights(sd, "model.diffusion_model.")
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=CPU, offload_device=CPU)
    patched = {}
    for run, unet_name in ((runs["reference"], "controlnext_unet.safetensors"),
                           (out, "controlnext_unet_delta.safetensors")):
        w = cx.ControlNeXtWeights.from_files(run / "controlnext.safetensors", run / unet_name)
        m = cx.apply_controlnext(patcher, w, torch.rand(1, 64, 64, 3))
        m.patch_model(device_to=CPU)
        try:
            patched[unet_name] = {k: v.clone() for k, v in m.model.state_dict().items() if k in m.patches}
        finally:
            m.unpatch_model(device_to=CPU)
        assert patched[unet_name], unet_name
    absolute, delta = patched["controlnext_unet.safetensors"], patched["controlnext_unet_delta.safetensors"]
    assert set(absolute) == set(delta)
    trained = safetensors.torch.load_file(str(runs["reference"] / "checkpoints" / f"step-{STEPS:08d}"
                                              / "unet_subset.safetensors"))
    for k, v in absolute.items():
        # Absolute weights are applied as W_file - W_base diff patches (which keep LoRAs): equal to rounding.
        assert torch.allclose(v, trained[k[len("diffusion_model."):]], rtol=0, atol=1e-6), k
        assert torch.allclose(delta[k], v, atol=1e-6), k
    assert any((v - model.state_dict()[k]).abs().max() > 0 for k, v in absolute.items())  # it trained


def test_the_validation_image_is_what_the_exported_files_sample(runs, tmp_path):
    """The end-of-run validation image of the ΔW run equals a sample from its exported
    module and ΔW file applied to a freshly loaded base through apply_controlnext:
    the trained UNet subset is in the validation sample exactly once."""
    from types import SimpleNamespace

    from training import data, models, validation

    run = runs["root"] / "killed"  # the --unet-weights delta run of the test above
    if not (run / "controlnext_unet_delta.safetensors").is_file():
        pytest.skip("needs the delta run of test_sigkill_and_resume_gives_identical_losses_and_delta_equals_absolute")
    args = SimpleNamespace(**json.loads((run / "args.json").read_text()))
    args.output = str(tmp_path)
    trainer = SimpleNamespace(args=args, base=models.load_base_model(args.base), dist=SimpleNamespace(device=CPU),
                              records=data.scan_dataset(args.data, need_condition=False).records)
    weights = cx.ControlNeXtWeights.from_files(run / "controlnext.safetensors",
                                               run / "controlnext_unet_delta.safetensors")
    image, prompt = validation._condition_image(trainer)
    # The SD1.5-training export carries args.strength as its default scale: strength 1 reproduces training.
    patcher = cx.apply_controlnext(trainer.base.patcher, weights, image, 1.0)
    resampled = validation._sample_and_save(trainer, patcher, validation._encode(trainer.base, prompt),
                                            validation._encode(trainer.base, ""), image, STEPS)
    during = np.asarray(Image.open(run / "validation" / f"step-{STEPS:08d}.png"), dtype=np.float32)
    after = np.asarray(Image.open(resampled), dtype=np.float32)
    assert np.abs(during - after).max() <= 2, np.abs(during - after).max()


def test_trained_files_sample_through_the_nodes_in_comfyui(runs, tmp_path, small_sd15_files):
    base = tmp_path / "comfy"
    ckpt = copy_model(small_sd15_files["checkpoint"], base / "models" / "checkpoints", "small-sd15.safetensors")
    for name in ("controlnext.safetensors", "controlnext_unet.safetensors"):
        copy_model(runs["reference"] / name, base / "models" / "controlnext", f"trained_{name}")
    (base / "input").mkdir(parents=True, exist_ok=True)
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 12:40] = 255
    from PIL import Image
    Image.fromarray(img).save(base / "input" / "controlnext_control.png")
    with ComfyServer(base, extra_args=["--cache-none"]) as server:
        server.names = {"ckpt": ckpt}
        prompt = api_prompt(server, "controlnext_sd15")
        prompt["2"]["inputs"].update(control_file="trained_controlnext.safetensors",
                                     unet_file="trained_controlnext_unet.safetensors")
        with_cnx = saved_image(server, server.run(prompt, timeout=600))
        bare = json.loads(json.dumps(prompt))
        bare["8"]["inputs"]["model"] = ["1", 0]
        without = saved_image(server, server.run(bare, timeout=600))
        assert with_cnx.shape == (64, 64, 3)
        assert np.abs(with_cnx - without).mean() > 0.5, "the trained ControlNeXt left the image unchanged"
        assert "did not land" not in server.log_text()
