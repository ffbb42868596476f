"""The MGDA rules of model_patches/balance.py against hand-computed values."""

import itertools

import pytest
import torch

from model_patches.balance import (
    add_com,
    add_inj,
    combination_weights,
    injection_lambda,
    mgda_coefficient,
)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


# --- mgda_coefficient -----------------------------------------------------------

def test_mgda_coefficient_hand_computed():
    # v1 = (1, 0), v2 = (0, 1): (v2-v1)·v2 = 1, |v2-v1|^2 = 2 -> 0.5
    # v1 = (2, 0), v2 = (1, 0): (v2-v1)·v2 = -1 -> clipped to 0
    # v1 = (0, 0), v2 = (3, 4): 25 / 25 = 1
    # v1 = (1, 1), v2 = (3, 1): (2,0)·(3,1) = 6, |(2,0)|^2 = 4 -> 1.5 -> clipped to 1
    # v1 = (1, 2), v2 = (2, 0): (1,-2)·(2,0) = 2, |(1,-2)|^2 = 5 -> 0.4
    v1 = t([1, 0], [2, 0], [0, 0], [1, 1], [1, 2])
    v2 = t([0, 1], [1, 0], [3, 4], [3, 1], [2, 0])
    lam = mgda_coefficient(v1, v2)
    assert lam.shape == (5, 1)
    assert torch.allclose(lam.flatten(), torch.tensor([0.5, 0.0, 1.0, 1.0, 0.4]))


def test_mgda_is_the_min_norm_weight_of_v1():
    g = torch.Generator().manual_seed(0)
    v1, v2 = torch.randn(3, 8, generator=g), torch.randn(3, 8, generator=g)
    lam = mgda_coefficient(v1, v2)
    grid = torch.linspace(0, 1, 2001)
    for r in range(3):
        norms = ((grid[:, None] * v1[r] + (1 - grid[:, None]) * v2[r]) ** 2).sum(1)
        assert abs(float(grid[norms.argmin()]) - float(lam[r])) < 1e-3


def test_identical_and_zero_rows_give_one_half():
    v = t([1, 2, 3], [0, 0, 0])
    assert torch.equal(mgda_coefficient(v, v.clone()).flatten(), torch.tensor([0.5, 0.5]))


def test_rows_are_independent():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    full = mgda_coefficient(a, b)
    assert full.shape == (4, 1, 1, 1)
    for r in range(4):
        assert torch.equal(full[r:r + 1], mgda_coefficient(a[r:r + 1], b[r:r + 1]))
    # Changing one row leaves the others untouched.
    b2 = b.clone()
    b2[2] *= -7
    changed = mgda_coefficient(a, b2)
    assert torch.equal(changed[[0, 1, 3]], full[[0, 1, 3]])
    assert not torch.equal(changed[2], full[2])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_reduce_in_fp32(dtype):
    g = torch.Generator().manual_seed(2)
    # Large activations: sums of squares overflow fp16 (max 65504) if accumulated there.
    a = (torch.randn(2, 64, 16, 16, generator=g) * 40).to(dtype)
    b = (torch.randn(2, 64, 16, 16, generator=g) * 60).to(dtype)
    lam = mgda_coefficient(a, b)
    assert lam.dtype == torch.float32
    ref = mgda_coefficient(a.float(), b.float())
    assert torch.isfinite(lam).all()
    assert torch.allclose(lam, ref, atol=1e-6)


def test_pixel_granularity_reduces_over_channels_only():
    g = torch.Generator().manual_seed(3)
    a, b = torch.randn(2, 4, 3, 5, generator=g), torch.randn(2, 4, 3, 5, generator=g)
    lam = mgda_coefficient(a, b, "pixel")
    assert lam.shape == (2, 1, 3, 5)
    for (r, y, x) in [(0, 0, 0), (1, 2, 4), (1, 1, 3)]:
        expect = mgda_coefficient(a[r:r + 1, :, y, x], b[r:r + 1, :, y, x])
        assert torch.allclose(lam[r, 0, y, x], expect.flatten()[0])


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="one shape"):
        mgda_coefficient(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="granularity"):
        mgda_coefficient(torch.zeros(2, 3), torch.zeros(2, 3), "channel")


# --- add_inj --------------------------------------------------------------------

def test_injection_lambda_hand_computed():
    lam_star = torch.tensor([0.0, 0.5, 0.8, 0.99, 1.0])
    lam = injection_lambda(lam_star, max_lambda=20.0)
    assert torch.allclose(lam, torch.tensor([0.0, 1.0, 4.0, 20.0, 20.0]))  # 0.99/0.01 = 99 -> 20


def test_add_inj_hand_computed():
    f_e = t([1, 0], [1, 2], [0, 0], [2, 0])
    f_c = t([0, 1], [2, 0], [3, 4], [0, 0])
    out = add_inj(f_e, f_c, max_lambda=20.0)
    # row 0: λ* = 0.5 -> λ = 1 -> (1, 1)
    # row 1: λ* = 0.4 -> λ = 2/3 -> (1 + 4/3, 2)
    # row 2: λ* = 1 -> λ = max_lambda -> 20 * (3, 4)
    # row 3: silent control: (0-2,0)·0 = 0 -> λ = 0 -> f_e
    expect = t([1, 1], [1 + 4 / 3, 2], [60, 80], [2, 0])
    assert torch.allclose(out, expect)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_add_inj_keeps_dtype(dtype):
    g = torch.Generator().manual_seed(4)
    f_e = torch.randn(2, 8, 4, 4, generator=g).to(dtype)
    f_c = torch.randn(2, 8, 4, 4, generator=g).to(dtype)
    out = add_inj(f_e, f_c)
    assert out.dtype == dtype
    lam = injection_lambda(mgda_coefficient(f_e.float(), f_c.float()))
    assert torch.allclose(out.float(), f_e.float() + lam * f_c.float(), rtol=2e-2, atol=2e-2)


def test_add_inj_max_lambda_clip():
    f_e = t([0, 0])
    f_c = t([1, 1])
    assert torch.allclose(add_inj(f_e, f_c, max_lambda=3.0), t([3, 3]))


# --- add_com --------------------------------------------------------------------

def test_add_com_single_is_identity():
    x = torch.randn(2, 3, 4, 4)
    assert add_com([x]) is x


def test_add_com_two_is_eq_12():
    g = torch.Generator().manual_seed(5)
    f1, f2 = torch.randn(3, 4, 6, 6, generator=g), torch.randn(3, 4, 6, 6, generator=g) * 2
    lam = mgda_coefficient(f1, f2)
    assert torch.allclose(add_com([f1, f2]), (1 - lam) * f1 + lam * f2)


def test_add_com_silent_control_does_not_suppress():
    # The point of MIControlNet: a silent (zero) control must not halve the other one.
    f1 = torch.zeros(1, 4, 3, 3)
    f2 = torch.randn(1, 4, 3, 3)
    assert torch.allclose(add_com([f1, f2]), f2)
    assert torch.allclose(add_com([f2, f1]), f2)
    assert torch.allclose(add_com([f1, f2, f1.clone()]), f2, atol=1e-6)
    # Adding a silent control to a pair changes nothing.
    f3 = torch.randn(1, 4, 3, 3)
    assert torch.allclose(add_com([f3, f1, f2]), add_com([f3, f2]), atol=1e-6)


def test_add_com_hand_computed_two():
    f1 = t([1, 2])
    f2 = t([2, 0])
    # λ* = 0.4 (see above) -> 0.6*(1,2) + 0.4*(2,0) = (1.4, 1.2)
    assert torch.allclose(add_com([f1, f2]), t([1.4, 1.2]))


def test_add_com_three_is_order_invariant_and_convex():
    g = torch.Generator().manual_seed(6)
    fs = [torch.randn(2, 5, 4, 4, generator=g) * s for s in (0.5, 1.0, 3.0)]
    ref = add_com(fs)
    for perm in itertools.permutations(range(3)):
        assert torch.allclose(add_com([fs[i] for i in perm]), ref, atol=1e-5)
    w = combination_weights(fs)
    assert torch.allclose(sum(w), torch.ones_like(w[0]))
    assert all(((x >= 0) & (x <= 1)).all() for x in w)


def test_add_com_three_hand_computed():
    # f1 = (1,0), f2 = (0,1), f3 = (0,0):
    # s(1|2) = s(2|1) = 0.5; the silent f3 loses both duels: s(1|3) = s(2|3) = 1, s(3|.) = 0.
    # P = (0.5, 0.5, 0) -> w = (0.5, 0.5, 0)
    out = add_com([t([1, 0]), t([0, 1]), t([0, 0])])
    assert torch.allclose(out, t([0.5, 0.5]))
    # f1 = (1,2), f2 = (2,0), f3 = (1,1):
    # s(2|1) = λ*(f1,f2) = 0.4, s(1|2) = 0.6
    # s(3|1) = λ*(f1,f3) = (0,-1)·(1,1)/1 = -1 -> 0, s(1|3) = 1
    # s(3|2) = λ*(f2,f3) = (-1,1)·(1,1)/2 = 0, s(2|3) = 1
    # P = (0.6, 0.4, 0) -> (1.4, 1.2)
    assert torch.allclose(add_com([t([1, 2]), t([2, 0]), t([1, 1])]), t([1.4, 1.2]))
    # Three identical controls: 1/3 each, i.e. the feature itself.
    assert torch.allclose(add_com([t([3, 1])] * 3), t([3, 1]))


def test_add_com_pixel_granularity_per_location():
    # Control 1 active only on the left column, control 2 only on the right:
    # per pixel each wins where it is active, so nothing is halved.
    f1 = torch.zeros(1, 2, 1, 2)
    f2 = torch.zeros(1, 2, 1, 2)
    f1[..., 0] = 1.0
    f2[..., 1] = 2.0
    out = add_com([f1, f2], "pixel")
    assert torch.allclose(out, f1 + f2)
    # Layer granularity mixes them with one weight each instead.
    assert not torch.allclose(add_com([f1, f2], "layer"), f1 + f2)


def test_add_com_mixed_shapes_raise():
    with pytest.raises(ValueError, match="control 1"):
        add_com([torch.zeros(1, 2, 3, 3), torch.zeros(1, 2, 4, 4)])
    with pytest.raises(ValueError, match="at least one"):
        add_com([])


def test_granularity_has_one_canonical_name_and_reads_the_deprecated_one():
    from model_patches.balance import canonical_granularity
    from model_patches.injection.settings import BalanceSettings

    assert canonical_granularity("layer") == "layer" and canonical_granularity("pixel") == "pixel"
    with pytest.warns(DeprecationWarning, match="'token' is a deprecated spelling of 'pixel'"):
        assert canonical_granularity("token", "X") == "pixel"
    with pytest.warns(DeprecationWarning):
        assert BalanceSettings(granularity="token").granularity == "pixel"
    with pytest.raises(ValueError, match=r"granularity must be one of \('layer', 'pixel'\).*got 'row'"):
        canonical_granularity("row")
    # the canonical name gives exactly the deprecated one's numbers
    f, c = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    with pytest.warns(DeprecationWarning):
        g = canonical_granularity("token")
    assert torch.equal(add_inj(f, c, 20.0, g), add_inj(f, c, 20.0, "pixel"))
