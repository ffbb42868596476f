"""ControlNeXt against the official code: module output, injected feature and
per-row scale of every variant equal golden outputs of the official classes.

The goldens in tests/goldens/controlnext/ (JSON, no tensors) were computed once
with the official repository (dvlab-research/ControlNeXt @ ab4b3ac, and
@ d1d16da for the first SDXL module) by tests/goldens/controlnext/make_goldens.py,
on inputs this test rebuilds from seeds: the synthetic module weights
``synthetic_state_dict(layout, seed)``, the control images ``golden_image`` and
the UNet feature before the injection ``golden_feature`` (the official UNet had
its feature there replaced by it). The official UNet recorded the feature just
after its injection on a [uncond, cond] CFG batch, with the official pipelines'
per-row scale; the test feeds the same feature through this extension's
injection (``ControlNeXtCall.prepare`` and ``inject``, what the UNet patches run)
and compares ``sketch``es (exact linear summaries, every position kept).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from model_patches import controlnext as cx

from controlnext_reference import (GOLDEN_MODULE_SEED, GOLDEN_SD_TIMESTEP, GOLDEN_SVD_SIGMA, SKETCH_WIDTH,
                                   golden_feature, golden_image, sketch, synthetic_state_dict)
from controlnext_common import model_for, sd15_model, sdxl_model, sdxl_wide_model, svd_model  # noqa: F401

GOLDENS = Path(__file__).parent / "goldens" / "controlnext"


def load_golden(variant: str) -> dict:
    """The JSON golden, with ``h_after`` and ``module_output`` as sketches ({"positions", "channels"})."""
    g = json.loads((GOLDENS / f"{variant}.json").read_text())
    g["row_scale"] = torch.tensor(g["row_scale"])
    for name, shape in (("h_after", g["feature_shape"]), ("module_output", g["module_output_shape"])):
        g[name] = {"positions": torch.tensor(g.pop(f"{name}_positions"), dtype=torch.float64).view(
                       shape[0], -1, SKETCH_WIDTH),
                   "channels": torch.tensor(g.pop(f"{name}_channels"), dtype=torch.float64).view(shape[0], shape[1])}
    return g


def sketches_close(got: dict, expected: dict, rows=slice(None), rtol=1e-4, atol=1e-4) -> bool:
    return all(torch.allclose(got[k][rows], expected[k][rows], rtol=rtol, atol=atol) for k in expected)


def sketch_error(got: dict, expected: dict, rows=slice(None)) -> dict:
    return {k: float((got[k][rows] - expected[k][rows]).abs().max()) for k in expected}


def test_every_variant_has_a_golden():
    assert {p.stem for p in GOLDENS.glob("*.json")} == set(cx.VARIANTS)


@pytest.mark.parametrize("variant", list(cx.VARIANTS))
def test_module_injection_and_row_scale_equal_the_official_code(variant, request):
    golden = load_golden(variant)
    seed = GOLDEN_MODULE_SEED[variant]
    v = cx.VARIANTS[variant]
    model = model_for(variant, request)
    image = golden_image(variant)
    weights = cx.ControlNeXtWeights(synthetic_state_dict(v.layout, seed), f"{variant}.bin")
    m = cx.apply_controlnext(model, weights, image.movedim(1, -1), strength=1.0)
    stack = m.model_options["transformer_options"][cx.STACK_KEY]

    h = golden_feature(variant, golden["feature_shape"])
    rows = h.shape[0]
    ms = model.model.model_sampling
    if v.family == "SVD":
        sigma = torch.full((rows,), GOLDEN_SVD_SIGMA)
    else:
        sigma = ms.sigmas[GOLDEN_SD_TIMESTEP].repeat(rows)
    assert float(ms.timestep(sigma[:1]).float()) == pytest.approx(golden["timestep"], rel=1e-6)
    x = torch.zeros(rows, 4, image.shape[-2] // 8, image.shape[-1] // 8)
    call = cx.ControlNeXtCall.prepare(stack, model.model, x, sigma, {"cond_or_uncond": [1, 0]})
    (prepared,) = call.points[v.injection]

    # per-row scale: uncond rows first
    assert torch.allclose(prepared.row_scale, golden["row_scale"], rtol=1e-5, atol=1e-6), \
        (prepared.row_scale, golden["row_scale"])
    # module output, on the rows it was evaluated for
    live = golden["row_scale"] != 0
    expected = {k: t.repeat(2, *[1] * (t.dim() - 1)) for k, t in golden["module_output"].items()}
    got = prepared.features.index_select(0, prepared.row_feature)
    assert list(got.shape) == [2 * golden["module_output_shape"][0], *golden["module_output_shape"][1:]]
    got = sketch(got, seed)
    assert sketches_close(got, expected, live), sketch_error(got, expected, live)
    # the injected feature
    out = call.inject(v.injection, h)
    assert out.shape == h.shape
    got = sketch(out, seed)
    assert sketches_close(got, golden["h_after"]), sketch_error(got, golden["h_after"])
    assert not sketches_close(sketch(h, seed), golden["h_after"], live, atol=1e-3)  # the golden does inject


def test_svd_v1_golden_uncond_rows_are_sigmoid_of_zero():
    """What the official SVD v1 UNet measured for the uncond half: sigmoid(0)·1.3."""
    golden = load_golden("svd_v1")
    scale = float(synthetic_state_dict("svd_v1", GOLDEN_MODULE_SEED["svd_v1"])["scale"])
    assert golden["row_scale"][:2].tolist() == pytest.approx([0.65, 0.65], rel=1e-5)
    assert golden["row_scale"][2:].tolist() == pytest.approx([1.3 / (1 + math.exp(-scale))] * 2, rel=1e-5)


def test_the_sketch_sees_a_small_error_anywhere():
    """The comparison's own power, on the widest feature (1280 channels): a change of 0.02
    (1 % of the feature's std) in any one of 200 random elements, one position's channels
    scaled by 1.001, two positions swapped, or two channels swapped moves the sketch beyond
    the tolerance the test above uses."""
    h = golden_feature("sd15", (2, 1280, 3, 3))
    base = sketch(h, 103)
    g = torch.Generator().manual_seed(0)
    for i in torch.randint(0, h.numel(), (200,), generator=g).tolist():
        one = h.clone()
        one.view(-1)[i] += 0.02
        assert not sketches_close(sketch(one, 103), base), i
    position = h.clone()
    position[1, :, 1, 2] *= 1.001
    positions = h.clone()
    positions[0, :, 0, 0], positions[0, :, 2, 2] = h[0, :, 2, 2], h[0, :, 0, 0]
    channels = h.clone()
    channels[0, 5], channels[0, 900] = h[0, 900], h[0, 5]
    for changed in (position, positions, channels):
        assert not sketches_close(sketch(changed, 103), base)
