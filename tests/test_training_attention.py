"""Training's forward-mode attention (the L_QC tangent through ComfyUI's attention hook) against
torch's own differentiation rules."""

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from training import objectives as O


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
