"""ControlNeXt against the official code: module output, injected feature and
per-row scale of every variant equal golden outputs of the official classes.

The goldens in tests/goldens/controlnext/ were computed once with the official
repository (dvlab-research/ControlNeXt @ ab4b3ac, and @ d1d16da for the first
SDXL module) by tests/goldens/controlnext/make_goldens.py, on the synthetic
module weights ``synthetic_state_dict(layout, seed)`` that this test rebuilds.
The official UNet recorded the feature just before and just after its
injection on a [uncond, cond] CFG batch, with the official pipelines' per-row
scale; the test feeds the same feature through this extension's injection
(``ControlNeXtCall.prepare`` and ``inject``, what the UNet patches run).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model_patches import controlnext as cx

from controlnext_reference import synthetic_state_dict
from controlnext_common import model_for, sd15_model, sdxl_model, sdxl_wide_model, svd_model  # noqa: F401

GOLDENS = Path(__file__).parent / "goldens" / "controlnext"
# Must match make_goldens.py.
MODULE_SEED = {"sdxl": 101, "sd15_training": 102, "sd15": 103, "svd_v2": 104, "svd_v1": 105, "sdxl_early": 106}
SVD_SIGMA = 3.0
SD_TIMESTEP = 500


def test_every_variant_has_a_golden():
    assert {p.stem for p in GOLDENS.glob("*.safetensors")} == set(cx.VARIANTS)


@pytest.mark.parametrize("variant", list(cx.VARIANTS))
def test_module_injection_and_row_scale_equal_the_official_code(variant, request):
    golden = safetensors.torch.load_file(str(GOLDENS / f"{variant}.safetensors"))
    v = cx.VARIANTS[variant]
    model = model_for(variant, request)
    weights = cx.ControlNeXtWeights(synthetic_state_dict(v.layout, MODULE_SEED[variant]), f"{variant}.bin")
    m = cx.apply_controlnext(model, weights, golden["image"].movedim(1, -1), strength=1.0)
    stack = m.model_options["transformer_options"][cx.STACK_KEY]

    rows = golden["h_before"].shape[0]
    ms = model.model.model_sampling
    if v.family == "SVD":
        sigma = torch.full((rows,), SVD_SIGMA)
    else:
        sigma = ms.sigmas[SD_TIMESTEP].repeat(rows)
    assert torch.allclose(ms.timestep(sigma[:1]).float(), golden["timestep"], rtol=1e-6)
    x = torch.zeros(rows, 4, golden["image"].shape[-2] // 8, golden["image"].shape[-1] // 8)
    call = cx.ControlNeXtCall.prepare(stack, model.model, x, sigma, {"cond_or_uncond": [1, 0]})
    (prepared,) = call.points[v.injection]

    # per-row scale: uncond rows first
    assert torch.allclose(prepared.row_scale, golden["row_scale"], rtol=1e-5, atol=1e-6), \
        (prepared.row_scale, golden["row_scale"])
    # module output, on the rows it was evaluated for
    live = golden["row_scale"] != 0
    expected = golden["module_output"].repeat(2, 1, 1, 1)
    got = prepared.features.index_select(0, prepared.row_feature)
    assert got.shape == expected.shape
    assert torch.allclose(got[live], expected[live], rtol=1e-4, atol=1e-4), (got[live] - expected[live]).abs().max()
    # the injected feature
    h = golden["h_before"]
    out = call.inject(v.injection, h)
    assert torch.allclose(out, golden["h_after"], rtol=1e-4, atol=1e-4), (out - golden["h_after"]).abs().max()
    assert not torch.allclose(golden["h_after"][live], h[live], atol=1e-3)  # the golden does inject


def test_svd_v1_golden_uncond_rows_are_sigmoid_of_zero():
    """What the official SVD v1 UNet measured for the uncond half: sigmoid(0)·1.3."""
    golden = safetensors.torch.load_file(str(GOLDENS / "svd_v1.safetensors"))
    scale = float(synthetic_state_dict("svd_v1", MODULE_SEED["svd_v1"])["scale"])
    assert golden["row_scale"][:2].tolist() == pytest.approx([0.65, 0.65], rel=1e-5)
    assert golden["row_scale"][2:].tolist() == pytest.approx([1.3 / (1 + math.exp(-scale))] * 2, rel=1e-5)
