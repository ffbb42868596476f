"""The one mask helper (model_patches/masks.py) and the one family table (model_patches/families.py)."""

from __future__ import annotations

import types

import pytest
import torch

import comfy.controlnet
import comfy.supported_models as sm
import comfy.utils

from model_patches import families, masks


def test_normalise_mask_shapes_range_and_nan():
    m = masks.normalise_mask(torch.tensor([[2.0, -1.0], [float("nan"), 0.25]]))
    assert m.shape == (1, 2, 2) and m.dtype == torch.float32
    assert m.tolist() == [[[1.0, 0.0], [0.0, 0.25]]]
    assert masks.normalise_mask(None) is None
    with pytest.raises(ValueError, match=r"X: expected a MASK shaped \(B, H, W\) or \(H, W\), got a tensor shaped "
                                         r"\(1, 1, 2, 2\); connect a MASK"):
        masks.normalise_mask(torch.zeros(1, 1, 2, 2), "X")
    with pytest.raises(ValueError, match="got list"):
        masks.normalise_mask([[0.0]], "X")


def test_mask_for_rows_is_cores_hint_resize_and_repeat():
    """Core resizes a hint with common_upscale(bilinear, center) and repeats it with
    broadcast_image_to over the cond/uncond chunks (comfy/controlnet.py ControlBase /
    ControlNet.get_control); a mask follows the same path, per row."""
    mask = masks.normalise_mask(torch.rand(2, 16, 12, generator=torch.Generator().manual_seed(0)))
    like = torch.zeros(4, 3, 8, 6, dtype=torch.float16)
    got = masks.mask_for_rows(mask, like, batched_number=2)
    ref = comfy.utils.common_upscale(mask.unsqueeze(1), 6, 8, "bilinear", "center")
    ref = comfy.controlnet.broadcast_image_to(ref, 4, 2).to(torch.float16)
    assert got.shape == (4, 1, 8, 6) and got.dtype == torch.float16
    assert torch.equal(got, ref)
    assert torch.equal(got[0], got[2]) and torch.equal(got[1], got[3])  # the same mask in both chunks


def test_mask_index_per_row():
    assert masks.mask_index_per_row(1, 4, 2).tolist() == [0, 0, 0, 0]
    assert masks.mask_index_per_row(2, 4, 2).tolist() == [0, 1, 0, 1]
    with pytest.raises(ValueError, match=r"L: the mask batch has 3 masks, but the latent batch has 2 latents "
                                         r"\(video frames\)"):
        masks.mask_index_per_row(3, 4, 2, "L", "video frames")


def _model(config_class, unet_config):
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=config_class(unet_config)))


@pytest.mark.parametrize("config_class, name", [
    (sm.SD15, "SD1.5"), (sm.SD15_instructpix2pix, "SD1.5"), (sm.SDXL, "SDXL"), (sm.SSD1B, "SDXL"),
    (sm.SDXLRefiner, "SDXL refiner"), (sm.SD20, "SD2.x"), (sm.SD21UnclipL, "SD2.x unCLIP"),
    (sm.SVD_img2vid, "SVD"), (sm.SD3, "SD3"), (sm.Flux, "Flux"), (sm.FluxSchnell, "Flux"), (sm.Flux2, "Flux.2"),
    (sm.QwenImage, "Qwen-Image"), (sm.HunyuanDiT1, "HunyuanDiT"),
])
def test_family_of_a_model_by_comfyuis_config_class(config_class, name):
    assert families.family_name(_model(config_class, dict(config_class.unet_config))) == name


def test_unknown_family_is_named_by_its_config_class():
    assert families.family_of(_model(sm.AuraFlow, dict(sm.AuraFlow.unet_config))) is None
    assert families.family_name(_model(sm.AuraFlow, dict(sm.AuraFlow.unet_config))) == "AuraFlow"


def test_unet_signature_table_and_controlnext_and_micontrolnet_read_it():
    from model_patches import controlnext_files, mi_control

    assert families.family_of_signature(2048, 2816).name == "SDXL"
    assert families.family_of_signature(768, None).name == "SD1.5"
    assert families.family_of_signature(768, 2816) is None
    m = _model(sm.SDXL, dict(sm.SDXL.unet_config))
    assert controlnext_files.model_family(m) == families.family_name(m) == "SDXL"
    assert mi_control.describe_unet_family is not None
    assert mi_control.describe_unet_family(torch.nn.Linear(2, 2)) == families.describe_unet(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("base, control, key", [
    ("comfy.ldm.modules.diffusionmodules.mmdit.MMDiT", "comfy.cldm.mmdit.ControlNet", "sd3"),
    ("comfy.ldm.flux.model.Flux", "comfy.ldm.flux.controlnet.ControlNetFlux", "flux"),
    ("comfy.ldm.qwen_image.model.QwenImageTransformer2DModel",
     "comfy.ldm.qwen_image.controlnet.QwenImageControlNetModel", "qwen"),
    ("comfy.ldm.hydit.models.HunYuanDiT", "comfy.ldm.hydit.controlnet.HunYuanControlNet", "hunyuan"),
])
def test_architecture_table_names_core_bases_and_their_controlnets(base, control, key):
    """The DiT sites' family checks read the table: ComfyUI's own classes (instances made
    without running their constructors: only the class matters)."""
    import importlib

    from model_patches.injection import dit_sites

    def blank(path):
        module, _, name = path.rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls.__new__(cls)

    assert families.architecture_of_base(blank(base)) == key == dit_sites.base_family(blank(base))
    assert families.architecture_of_control(blank(control)) == key == dit_sites.control_family(blank(control))
    assert families.architecture_of_control(blank(base)) is None
    assert dit_sites.FAMILY_NAMES[key] == families.ARCHITECTURE_TITLES[key]


def test_unet_is_an_architecture_without_dit_controlnets():
    import comfy.ldm.modules.diffusionmodules.openaimodel as om

    assert families.architecture_of_base(om.UNetModel.__new__(om.UNetModel)) == "unet"
    assert families.architecture_of_base(torch.nn.Linear(2, 2)) is None


def test_a_compiled_diffusion_model_keeps_its_architecture():
    """torch.compile's wrapper (e.g. set as an object patch) is judged by the module it wraps,
    so a compiled SD1.5 UNet is still a UNet and MIControlNet does not refuse it."""
    import torch

    from headless import synthetic as s
    from model_patches.families import architecture_of_base

    unet = s.build_unet_model(s.TINY_SD15_UNET, seed=0).diffusion_model
    assert architecture_of_base(unet) == "unet"
    assert architecture_of_base(torch.compile(unet)) == "unet"  # lazy: nothing is compiled here
    assert architecture_of_base(torch.nn.Linear(2, 2)) is None
