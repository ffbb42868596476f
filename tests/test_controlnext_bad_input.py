"""ControlNeXt bad input: wrong files, wrong base models, pickles with code, bad masks; every
refusal names what was expected and what was found."""

from __future__ import annotations

import os
import pickle

import pytest
import safetensors.torch
import torch

from model_patches import controlnext as cx
from headless import synthetic as syn

from controlnext_reference import synthetic_state_dict

from test_controlnext_unet_weights import _official_sdxl_unet_names
from controlnext_common import _patcher, sd15_model, sdxl_model, svd_model, weights_for  # noqa: F401 (fixtures)


# --------------------------------------------------------------------------------------------
# bad input
# --------------------------------------------------------------------------------------------


def test_controlnet_file_is_refused_with_expected_and_found(tmp_path):
    path = tmp_path / "control_v11p_sd15_canny.safetensors"
    safetensors.torch.save_file(syn.controlnet_state_dict(syn.TINY_UNET, seed=1), str(path))
    with pytest.raises(ValueError) as e:
        cx.ControlNeXtWeights.from_files(path)
    msg = str(e.value)
    assert "Expected one of" in msg and "52 tensors" in msg and "51 tensors" in msg and "65 tensors" in msg
    assert "looks like a ControlNet" in msg and "154 tensors" in msg


def test_lora_file_is_refused(tmp_path):
    path = tmp_path / "some_lora.safetensors"
    safetensors.torch.save_file({
        "lora_unet_input_blocks_1_1_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_input_blocks_1_1_proj_in.lora_up.weight": torch.zeros(320, 4),
    }, str(path))
    with pytest.raises(ValueError, match="LoRA") as e:
        cx.ControlNeXtWeights.from_files(path)
    assert "2 tensors" in str(e.value) and "Expected one of" in str(e.value)


def test_near_miss_lists_missing_keys():
    sd = synthetic_state_dict("320")
    del sd["mid_convs.1.bias"]
    with pytest.raises(ValueError, match="missing \\['mid_convs.1.bias'\\]"):
        cx.ControlNeXtWeights(sd)


def test_sdxl_module_and_delta_on_sd15_model_names_both(sd15_model):
    delta = {k: torch.zeros(v.shape) for k, v in list(_official_sdxl_unet_names().items())[:6]}
    w = weights_for("sdxl", unet_sd=delta, unet_name="unet.safetensors")
    with pytest.raises(ValueError) as e:
        cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    msg = str(e.value)
    assert "SDXL" in msg and "SD1.5" in msg and "unet.safetensors" in msg


def test_sd15_module_on_sdxl_model_names_both(sdxl_model):
    w = weights_for("sd15")
    with pytest.raises(ValueError) as e:
        cx.apply_controlnext(sdxl_model, w, torch.rand(1, 64, 64, 3))
    msg = str(e.value)
    assert "SD1.5" in msg and "the model is SDXL" in msg


def test_svd_module_on_sd15_model_is_refused(sd15_model):
    with pytest.raises(ValueError, match="SVD v1 -> SVD models; the model is SD1.5"):
        cx.apply_controlnext(sd15_model, weights_for("svd_v1"), torch.rand(1, 64, 64, 3))


def test_module_on_a_model_of_other_width_is_refused():
    small = _patcher(syn.build_unet_model(syn.TINY_UNET, seed=1))  # 64 channels where 320 are needed
    with pytest.raises(ValueError, match="outputs 320 channels"):
        cx.apply_controlnext(small, weights_for("sd15_training"), torch.rand(1, 64, 64, 3))


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_never_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "controlnet.bin"
    with open(path, "wb") as f:
        pickle.dump({"scale": _Exploit(str(marker))}, f)
    with pytest.raises(ValueError, match="weights-only"):
        cx.ControlNeXtWeights.from_files(path)
    assert not marker.exists()


def test_unknown_file_type_is_refused(tmp_path):
    path = tmp_path / "controlnet.onnx"
    path.write_bytes(b"\0")
    with pytest.raises(ValueError, match="unsupported file type"):
        cx.ControlNeXtWeights.from_files(path)


def test_svd_unet_file_must_be_a_full_unet(svd_model):
    w = weights_for("svd_v2", unet_sd={"x": torch.zeros(1)}, unet_name="unet.bin")
    with pytest.raises(ValueError, match="unet.bin is not a full SVD UNet") as e:
        cx.apply_controlnext(svd_model, w, torch.rand(1, 64, 64, 3))
    assert "['x']" in str(e.value) and "missing from the file" in str(e.value)


def test_call_transformer_options_puts_the_patches_first_once():
    """A direct UNet call (training) orders the injection as the sampler does:
    first in each list, once, even when the given options already hold it;
    the given lists are not changed."""
    def other(h, hsp, transformer_options):
        return h, hsp

    given = {"patches": {"output_block_patch": [other, cx.output_block_patch]}}
    options = cx.call_transformer_options(cx.ControlNeXtCall("sum", {}), given)
    assert options["patches"]["output_block_patch"] == [cx.output_block_patch, other]
    assert options["patches"]["input_block_patch_after_skip"] == [cx.input_block_patch_after_skip]
    assert given["patches"]["output_block_patch"] == [other, cx.output_block_patch]


def test_bad_mask_message_names_what_was_found(sd15_model):
    w = weights_for("sd15_training", seed=13)
    with pytest.raises(ValueError, match=r"MASK shaped \(B, H, W\) or \(H, W\), got a tensor shaped \(1, 1, 8, 8\)"):
        cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3), mask=torch.ones(1, 1, 8, 8))


def test_nonfinite_control_is_named_after_the_forward(sd15_model):
    """The shared engine checks ControlNeXt's residuals too: a control image holding NaN fails
    after the model call naming the control and the layer (one device read per call), instead of
    returning a NaN image."""
    from controlnext_common import run_model

    w = weights_for("sd15_training", seed=14)
    image = torch.rand(1, 64, 64, 3)
    image[0, 10, 10, 0] = float("nan")
    m = cx.apply_controlnext(sd15_model, w, image, 1.0, label="Canny NaN #4")
    x = torch.randn(2, 4, 8, 8)
    sigma = torch.tensor([1.0, 1.0])
    with pytest.raises(FloatingPointError, match=r"Canny NaN #4: its residual for UNet layer 'level0' holds NaN or Inf: check the control image"):
        run_model(m, x, sigma, [1, 0])
    clean = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3), 1.0, label="clean")
    assert torch.isfinite(run_model(clean, x, sigma, [1, 0])).all()
