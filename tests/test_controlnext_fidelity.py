"""ControlNeXt as the official code runs it: SVD v1 guidance, per-row masks,
the UNet-subset mode (auto / difference / absolute) and LoRAs, the strength
stored in this project's exports, damaged files."""

from __future__ import annotations

import logging
import math

import pytest
import safetensors.torch
import torch

import comfy.sd

from model_patches import controlnext as cx

from controlnext_reference import synthetic_state_dict
from controlnext_common import (  # noqa: F401 (fixtures)
    CPU,
    patched_with_recorder,
    run_model,
    sd15_model,
    svd_model,
    weights_for,
)

# --------------------------------------------------------------------------------------------
# per-row scale under CFG
# --------------------------------------------------------------------------------------------


def _row_scales(model, weights, uncond, strength=0.8, rows=(1, 1, 0, 0)):
    m, rec = patched_with_recorder(model, (weights, torch.rand(1, 64, 64, 3), {"uncond": uncond,
                                                                                "strength": strength}))
    n = len(rows)
    labels = [rows[0], rows[-1]] if rows[0] != rows[-1] else [rows[0]]
    run_model(m, torch.randn(n, 4, 8, 8), torch.tensor([3.0] * n), labels)
    (prepared,) = next(iter(rec.calls[-1].points.values()))
    return prepared.row_scale.tolist()


def test_svd_v1_uncond_rows_get_sigmoid_of_zero(svd_model):
    """Official pipeline L576-579 zeroes the raw scale of the uncond half; the UNet (L472) then
    applies sigmoid(scale)·1.3: uncond rows 0.65 × strength, cond rows sigmoid(scale)·1.3 × strength."""
    sd = synthetic_state_dict("svd_v1", seed=50)
    sd["scale"] = torch.tensor(-0.4)
    w = cx.ControlNeXtWeights(sd, "svd_v1.bin")
    cond = 0.8 * 1.3 / (1 + math.exp(0.4))
    got = _row_scales(svd_model, w, "variant default")
    assert got == pytest.approx([0.8 * 0.65, 0.8 * 0.65, cond, cond], rel=1e-6)
    assert _row_scales(svd_model, w, "apply") == pytest.approx([cond] * 4, rel=1e-6)
    assert _row_scales(svd_model, w, "zero") == pytest.approx([0, 0, cond, cond], rel=1e-6, abs=1e-9)


def test_svd_v2_uncond_rows_zero(svd_model):
    w = weights_for("svd_v2", seed=51)
    assert _row_scales(svd_model, w, "variant default") == pytest.approx([0, 0, 0.16, 0.16], abs=1e-7)


# --------------------------------------------------------------------------------------------
# masks per latent row
# --------------------------------------------------------------------------------------------


def test_masks_follow_latent_rows_not_control_images(sd15_model):
    """One control image, a batch of two masks for two latents: row i of every cond/uncond chunk
    takes mask i (before, every row took mask 0)."""
    w = weights_for("sd15_training", seed=52)
    masks = torch.zeros(2, 64, 64)
    masks[0, :, :32] = 1.0  # latent 0: left half
    masks[1, :, 32:] = 1.0  # latent 1: right half
    m, rec = patched_with_recorder(sd15_model, (w, torch.rand(1, 64, 64, 3), {"mask": masks}))
    run_model(m, torch.randn(4, 4, 8, 8), torch.tensor([3.0] * 4), [1, 0])
    delta = rec.after[("input", 2)] - rec.before[("input", 2)]  # (4, 320, 4, 4)
    for row, latent in enumerate([0, 1, 0, 1]):
        kept, cut = (slice(0, 2), slice(2, 4)) if latent == 0 else (slice(2, 4), slice(0, 2))
        assert delta[row, :, :, kept].abs().sum() > 0, row
        assert torch.equal(delta[row, :, :, cut], torch.zeros_like(delta[row, :, :, cut])), row


def test_svd_masks_per_frame(svd_model):
    w = weights_for("svd_v2", seed=53)
    frames = 3
    masks = torch.zeros(frames, 64, 64)
    for f in range(frames):
        masks[f, f * 16:(f + 1) * 16, :] = 1.0
    m, rec = patched_with_recorder(svd_model, (w, torch.rand(1, 64, 64, 3), {"mask": masks, "uncond": "apply"}))
    run_model(m, torch.randn(2 * frames, 4, 8, 8), torch.tensor([3.0] * 2 * frames), [1, 0])
    delta = rec.after[("input", 2)] - rec.before[("input", 2)]  # (6, 320, 4, 4): 16 px of mask per row of 4
    for row in range(2 * frames):
        f = row % frames
        assert delta[row, :, f].abs().sum() > 0
        others = [i for i in range(4) if i != f]
        assert torch.equal(delta[row, :, others], torch.zeros_like(delta[row, :, others]))


def test_mask_batch_of_wrong_size_fails_clearly(sd15_model):
    w = weights_for("sd15_training", seed=54)
    m, _ = patched_with_recorder(sd15_model, (w, torch.rand(3, 64, 64, 3), {"mask": torch.ones(3, 64, 64)}))
    with pytest.raises(ValueError) as e:
        run_model(m, torch.randn(4, 4, 8, 8), torch.tensor([3.0] * 4), [1, 0])
    msg = str(e.value)
    assert "3 masks" in msg and "2 latents" in msg and "Expected 1 mask" in msg


# --------------------------------------------------------------------------------------------
# UNet subset: auto / difference / absolute, and LoRAs
# --------------------------------------------------------------------------------------------

TO_OUT = [f"input_blocks.1.1.transformer_blocks.0.{a}.to_out.0" for a in ("attn1", "attn2")]


def _base(model, key):
    return model.model.state_dict()[f"diffusion_model.{key}"].clone()


def _absolute_subset(model, seed, scale=0.01):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n in TO_OUT:
        for s in ("weight", "bias"):
            w = _base(model, f"{n}.{s}")
            out[f"{n}.{s}"] = w + scale * w.abs().mean() * torch.randn(w.shape, generator=g)
    return out


def _patched_weights(m):
    m.patch_model(device_to=CPU)
    try:
        return {k: v.clone() for k, v in m.model.state_dict().items()}
    finally:
        m.unpatch_model(device_to=CPU)


def _lora(seed, rank=4):
    g = torch.Generator().manual_seed(seed)
    lora, delta = {}, {}
    for n in TO_OUT:
        name = "lora_unet_" + n.replace(".", "_")
        down, up = torch.randn(rank, 320, generator=g) * 0.1, torch.randn(320, rank, generator=g) * 0.1
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = down, up
        lora[f"{name}.alpha"] = torch.tensor(float(rank))
        delta[f"diffusion_model.{n}.weight"] = up @ down
    return lora, delta


def test_auto_detects_absolute_and_difference_and_logs_why(sd15_model, caplog):
    absolute = _absolute_subset(sd15_model, 60)
    difference = {k: v - _base(sd15_model, k) for k, v in absolute.items()}
    caplog.set_level(logging.INFO)
    results = {}
    for name, sd in (("abs.safetensors", absolute), ("diff.safetensors", difference)):
        w = weights_for("sd15_training", seed=61, unet_sd=sd, unet_name=name)
        results[name] = _patched_weights(cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3)))
    assert "abs.safetensors applied as absolute weights" in caplog.text
    assert "diff.safetensors applied as difference" in caplog.text
    for k, v in absolute.items():
        assert torch.allclose(results["abs.safetensors"][f"diffusion_model.{k}"], v, atol=1e-6), k
        assert torch.allclose(results["diff.safetensors"][f"diffusion_model.{k}"], v, atol=1e-6), k


def test_auto_with_disagreeing_tensors_asks_the_user(sd15_model):
    absolute = _absolute_subset(sd15_model, 62)
    mixed = dict(absolute)
    k = f"{TO_OUT[1]}.weight"
    mixed[k] = absolute[k] - _base(sd15_model, k)  # one tensor is a difference
    w = weights_for("sd15_training", unet_sd=mixed, unet_name="mixed.safetensors")
    with pytest.raises(ValueError) as e:
        cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    msg = str(e.value)
    assert "mixed.safetensors" in msg and "1 look absolute" in msg and "1 look like differences" in msg
    assert "Set unet_weights" in msg
    # The user's choice is taken as it is.
    w = weights_for("sd15_training", unet_sd=mixed, unet_name="mixed.safetensors", unet_weights="difference")
    assert len(cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3)).patches) == 4


def test_export_metadata_decides_and_strength_is_the_default_scale(sd15_model, tmp_path, caplog):
    """Files of python -m training controlnext carry the UNet mode and the training strength."""
    absolute = _absolute_subset(sd15_model, 63)
    delta = {k: v - _base(sd15_model, k) for k, v in absolute.items()}
    meta = {"variant": "sd15_training", "strength": "0.35"}
    safetensors.torch.save_file(synthetic_state_dict("320", seed=64), str(tmp_path / "m.safetensors"),
                                {**meta, "format": "ControlNeXt control module (52 tensors)"})
    # Deltas that happen to look absolute would fool a comparison; the metadata is read first.
    tiny = {k: v * 0 + _base(sd15_model, k) * 0.9 for k, v in delta.items()}
    safetensors.torch.save_file(tiny, str(tmp_path / "u_delta.safetensors"),
                                {**meta, "format": "ControlNeXt UNet subset, delta"})
    caplog.set_level(logging.INFO)
    w = cx.ControlNeXtWeights.from_files(tmp_path / "m.safetensors", tmp_path / "u_delta.safetensors")
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3), strength=2.0)
    assert "u_delta.safetensors applied as difference (ΔW) weights: its metadata says so" in caplog.text
    got = _patched_weights(m)
    for k, v in tiny.items():
        assert torch.allclose(got[f"diffusion_model.{k}"], _base(sd15_model, k) + v, atol=1e-6)
    control = m.model_options["transformer_options"][cx.STACK_KEY].controls[-1]
    assert control.effective_scale == pytest.approx(2.0 * 0.35)
    # Without our metadata (an official SD1.5-Training file), the strength is the node's.
    plain = weights_for("sd15_training", seed=64)
    m = cx.apply_controlnext(sd15_model, plain, torch.rand(1, 64, 64, 3), strength=2.0)
    assert m.model_options["transformer_options"][cx.STACK_KEY].controls[-1].effective_scale == 2.0


@pytest.mark.parametrize("order", ["lora_then_controlnext", "controlnext_then_lora"])
def test_absolute_subset_keeps_a_lora_either_order(sd15_model, order):
    """The official scripts load the subset (absolute) first and the LoRA on top: W_file + ΔW_LoRA.
    Absolute weights applied as W_file − W_base keep that in both ComfyUI orders (a "set" patch
    would discard a LoRA applied before)."""
    absolute = _absolute_subset(sd15_model, 65)
    lora, lora_delta = _lora(66)
    w = weights_for("sd15_training", seed=67, unet_sd=absolute, unet_name="unet.safetensors",
                    unet_weights="absolute")
    image = torch.rand(1, 64, 64, 3)
    if order == "lora_then_controlnext":
        m = cx.apply_controlnext(comfy.sd.load_lora_for_models(sd15_model, None, lora, 0.7, 0)[0], w, image)
    else:
        m = comfy.sd.load_lora_for_models(cx.apply_controlnext(sd15_model, w, image), None, lora, 0.7, 0)[0]
    got = _patched_weights(m)
    for k, v in absolute.items():
        key = f"diffusion_model.{k}"
        expected = v + 0.7 * lora_delta.get(key, torch.zeros_like(v))
        assert torch.allclose(got[key], expected, atol=1e-5), (order, k, (got[key] - expected).abs().max())
    assert any(k in lora_delta for k in (f"diffusion_model.{n}" for n in absolute))


# --------------------------------------------------------------------------------------------
# damaged files
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".safetensors", ".bin"])
def test_truncated_file_is_named_and_called_damaged(tmp_path, suffix):
    path = tmp_path / f"controlnet{suffix}"
    sd = synthetic_state_dict("320", seed=68)
    if suffix == ".safetensors":
        safetensors.torch.save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        cx.ControlNeXtWeights.from_files(path)
    msg = str(e.value)
    assert f"controlnet{suffix}" in msg and "damaged or incomplete" in msg and "Download the file again" in msg
