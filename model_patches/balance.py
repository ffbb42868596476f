"""MGDA rules of Minimal Impact ControlNet (Sun et al., ICLR 2025), in pure torch.

Two rules replace ComfyUI's plain sums:

* ``add_com`` combines the residuals that several ControlNets produce for one
  UNet layer (core: ``r1 + r2 + ...``).
* ``add_inj`` injects the combined residual into the UNet feature at that layer
  (core: ``h + r``).

Both are built on ``mgda_coefficient``, the closed-form two-task MGDA weight.

Conventions shared by every function here:

* Tensors are ``(B, C, ...)``. Batch rows are independent: ComfyUI batches the
  cond and uncond rows of classifier-free guidance together, so every
  reduction is per row, never over dim 0.
* ``granularity="layer"`` (the paper) reduces over every non-batch dim and
  gives one coefficient per row, shaped ``(B, 1, ..., 1)``.
  ``granularity="pixel"`` reduces over channels only and gives one
  coefficient per row and location, shaped ``(B, 1, H, W)``.
* Reductions are accumulated in fp32 whatever the input dtype (fp16 sums of
  squares of UNet features overflow); the outputs keep the input dtype and
  device.
"""

from __future__ import annotations

import logging
import warnings
from typing import Sequence

import torch

GRANULARITIES = ("layer", "pixel")
# Older spellings still read: "token" (Refine-Control's name for one coefficient per DiT image token).
DEPRECATED_GRANULARITIES = {"token": "pixel"}
# How eq. 9's λ* is read; see ``injection_coefficient``.
LAMBDA_CONVENTIONS = ("as_written", "mgda_weight_of_control")
LAMBDA_CONVENTION_DESCRIPTIONS = {
    "as_written": "eqs. 8-10 literally: λ* is the MGDA weight of the UNet feature f_e, λ = λ*/(1-λ*); "
                  "a zero control gets λ = 0 (no gradient), small residuals are damped",
    "mgda_weight_of_control": "λ* is the MGDA weight of the control f_c, λ = λ*/(1-λ*) keeps f_e's "
                              "coefficient at 1 (Appendix E); a zero control gets λ = max_lambda",
}

__all__ = [
    "GRANULARITIES",
    "canonical_granularity",
    "LAMBDA_CONVENTIONS",
    "injection_coefficient",
    "mgda_coefficient",
    "injection_lambda",
    "add_inj",
    "combination_weights",
    "add_com",
    "channel_norm",
    "reduction_memory_bytes",
]


def canonical_granularity(granularity: str, what: str = "granularity") -> str:
    """The canonical name of a granularity: "layer" or "pixel" (one coefficient per
    row and position: a UNet pixel or a DiT image token). The deprecated spelling
    "token" is read as "pixel", with a warning."""
    if granularity in GRANULARITIES:
        return granularity
    if granularity in DEPRECATED_GRANULARITIES:
        new = DEPRECATED_GRANULARITIES[granularity]
        warnings.warn(f"{what}: granularity {granularity!r} is a deprecated spelling of {new!r}; use {new!r}",
                      DeprecationWarning, stacklevel=3)
        logging.getLogger(__name__).warning("%s: granularity %r is a deprecated spelling of %r; use %r",
                                            what, granularity, new, new)
        return new
    raise ValueError(f"{what}: granularity must be one of {GRANULARITIES} (or the deprecated "
                     f"{sorted(DEPRECATED_GRANULARITIES)}), got {granularity!r}")


def _reduce_dims(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    if x.ndim < 2:
        raise ValueError(
            f"expected a batched feature tensor (B, C, ...), got shape {tuple(x.shape)}"
        )
    if granularity == "layer":
        return tuple(range(1, x.ndim))
    if granularity == "pixel":
        return (1,)
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def mgda_coefficient(v1: torch.Tensor, v2: torch.Tensor, granularity: str = "layer",
                     scale1: float = 1.0, scale2: float = 1.0) -> torch.Tensor:
    """λ* of eq. 8: ``clip((v2 - v1)ᵀ v2 / ‖v2 - v1‖², 0, 1)``, per batch row.

    This is Sener and Koltun's two-task MGDA step: λ* is the weight of ``v1``
    in the minimum-norm point ``λ v1 + (1 - λ) v2`` of the segment between
    the two vectors. Where a row has ``v1 == v2`` (zero rows included) every
    λ is a minimiser and λ* = 0.5 is returned.

    ``scale1``/``scale2`` multiply the inputs first (λ* of ``scale1·v1`` and
    ``scale2·v2``) without a full-size copy of either.

    Memory: the fp32 temporaries are made for at most
    ``REDUCTION_CHUNK_ELEMENTS`` elements at a time (a slice of channels), so
    a large fp16 feature costs ``reduction_memory_bytes()`` extra, not 4-5
    fp32 copies of itself. The chunked sums equal the one-pass sums up to fp32
    summation order.

    Returns an fp32 tensor shaped ``(B, 1, ..., 1)`` (layer) or
    ``(B, 1, H, W)`` (pixel), on the inputs' device. Non-finite inputs give
    non-finite coefficients; callers that must not propagate them check.
    """
    if v1.shape != v2.shape:
        raise ValueError(
            f"mgda_coefficient needs two tensors of one shape, got {tuple(v1.shape)} and {tuple(v2.shape)}"
        )
    dims = _reduce_dims(v1, granularity)
    num = den = None
    # fp32 copies of a bounded slice of channels at a time (see REDUCTION_CHUNK_ELEMENTS).
    for c0, c1 in _channel_chunks(v1):
        a = v1[:, c0:c1].to(torch.float32)
        b = v2[:, c0:c1].to(torch.float32)
        if scale1 != 1.0:
            a = a * scale1
        if scale2 != 1.0:
            b = b * scale2
        diff = b - a
        n_part = (diff * b).sum(dim=dims, keepdim=True)
        d_part = diff.square().sum(dim=dims, keepdim=True)
        num = n_part if num is None else num + n_part
        den = d_part if den is None else den + d_part
        del a, b, diff
    degenerate = den == 0
    lam = num / torch.where(degenerate, torch.ones_like(den), den)
    lam = torch.where(degenerate, torch.full_like(lam, 0.5), lam)
    return lam.clamp(0.0, 1.0)


def injection_lambda(lam_star: torch.Tensor, max_lambda: float = 20.0) -> torch.Tensor:
    """λ = λ*/(1 - λ*) of eqs. 9-10, clipped to [0, max_lambda].

    λ* = 1 divides by zero; the resulting +inf clips to ``max_lambda``, which
    is the value the paper's clip gives in the limit.
    """
    if max_lambda < 0:
        raise ValueError(f"max_lambda must be >= 0, got {max_lambda}")
    return (lam_star / (1.0 - lam_star)).clamp(0.0, float(max_lambda))


def _check_convention(lambda_convention: str) -> None:
    if lambda_convention not in LAMBDA_CONVENTIONS:
        raise ValueError(f"lambda_convention must be one of {LAMBDA_CONVENTIONS}, got {lambda_convention!r}")


def injection_coefficient(f_e: torch.Tensor, f_c: torch.Tensor, max_lambda: float = 20.0,
                          granularity: str = "layer", lambda_convention: str = "as_written") -> torch.Tensor:
    """add^inj's λ (fp32, per row or per row and location) under one reading of eqs. 8-10.

    The paper is ambiguous here. Eq. 8 is Sener and Koltun's closed form for
    the MGDA weight of its first vector, v1 = f_e; eq. 9 then injects
    ``f_e + λ f_c`` with λ = λ*/(1 - λ*), which is "the min-norm point
    γ_e f_e + γ_c f_c rescaled so that f_e's coefficient is 1" (Appendix E)
    only if λ* is γ_c, the weight of v2 = f_c. The two readings:

    * ``as_written``: λ* = ``mgda_coefficient(f_e, f_c)`` (= γ_e), eqs. 8-10
      literally. A zero control (f_c = 0) gives λ* = 0, λ = 0 and no gradient
      to the ControlNet; for a residual r orthogonal to f_e, λ ≈ ‖r‖²/‖f_e‖²
      (small residuals are damped), and residuals larger than f_e are
      amplified up to ``max_lambda``.
    * ``mgda_weight_of_control``: λ* = ``mgda_coefficient(f_c, f_e)`` (= γ_c
      = 1 - γ_e, clipping included). The opposite: a zero control gives
      λ* = 1, λ = ``max_lambda`` (so a zero-initialised ControlNet gets a
      gradient at once); small residuals are amplified (λ ≈ ‖f_e‖²/‖r‖², up to
      the clip) and large ones damped.

    Both give λ = 1 where f_e = f_c (the degenerate λ* = 0.5)."""
    _check_convention(lambda_convention)
    if lambda_convention == "as_written":
        lam_star = mgda_coefficient(f_e, f_c, granularity)
    else:
        lam_star = mgda_coefficient(f_c, f_e, granularity)
    return injection_lambda(lam_star, max_lambda)


def add_inj(
    f_e: torch.Tensor,
    f_c: torch.Tensor,
    max_lambda: float = 20.0,
    granularity: str = "layer",
    lambda_convention: str = "as_written",
) -> torch.Tensor:
    """Balanced injection ``f_e + λ·f_c`` (eqs. 9-10).

    ``f_e`` is the UNet feature (a skip connection or the middle-block
    output), ``f_c`` the control residual for that layer, λ is
    ``injection_coefficient`` under ``lambda_convention``. As written (the
    default), λ* = ``mgda_coefficient(f_e, f_c)`` and λ = λ*/(1-λ*) clipped to
    ``[0, max_lambda]``: a silent control (``f_c = 0``) gives λ* = 0, so the
    UNet feature passes unchanged; a control that dominates the feature is
    amplified up to ``max_lambda``.

    The result has ``f_e``'s dtype and device.
    """
    return add_inj_with_lambda(f_e, f_c, max_lambda, granularity, lambda_convention)[0]


def add_inj_with_lambda(f_e: torch.Tensor, f_c: torch.Tensor, max_lambda: float = 20.0,
                        granularity: str = "layer",
                        lambda_convention: str = "as_written") -> tuple[torch.Tensor, torch.Tensor]:
    """``add_inj``'s result and the fp32 λ it used (for the balance record)."""
    lam = injection_coefficient(f_e, f_c, max_lambda, granularity, lambda_convention)
    return torch.addcmul(f_e, lam.to(f_e.dtype), f_c.to(f_e.dtype)), lam


def combination_weights(features: Sequence[torch.Tensor], granularity: str = "layer",
                        scales: Sequence[float] | None = None) -> list[torch.Tensor]:
    """The fp32 weights ``w_i`` with which ``add_com`` mixes ``features``
    (of ``scales[i]·features[i]`` when ``scales`` is given: the weights at
    another strength, without scaled copies).

    N = 1: ``[1]``.

    N = 2 (eq. 12): ``[1 - λ*, λ*]`` with ``λ* = mgda_coefficient(f1, f2)``.
    Note the assignment: eq. 8 defines λ* as the MGDA weight of ``v1``, but
    eq. 12 applies it to ``f2``. This is what the paper writes and it is
    implemented as written: the weights are the *swapped* minimum-norm
    weights, so the stronger signal dominates. A silent control (all zeros)
    gets λ* = 1 against a non-silent one, i.e. weight 0, which is exactly
    what stops silent regions of one control from suppressing another.

    N > 2: product of pairwise shares. For an ordered pair write
    ``s(i|j) = mgda_coefficient(f_j, f_i)``, the weight eq. 12 gives ``f_i``
    when it is combined with ``f_j`` alone; ``s(i|j) + s(j|i) = 1``, the
    clipping and the degenerate 0.5 included. Then

        w_i = P_i / Σ_k P_k,   P_i = Π_{j≠i} s(i|j)

    i.e. each control is weighted by how completely it wins all its two-way
    eq.-12 duels (as if the duels were independent).

    * N = 2: ``w_1 = s(1|2) / (s(1|2) + s(2|1)) = 1 - λ*`` and ``w_2 = λ*``:
      exactly eq. 12 (and computed with eq. 12's own formula).
    * Silent controls get weight 0 (they lose every duel against a
      non-silent control) *and do not dilute the others*: adding any number of
      silent controls to a set leaves the result unchanged, since every other
      P_i is multiplied by 1. (A simpler mean of the pairwise shares would
      cap a dominating control at 2/N.)
    * Two equal controls share equally; N identical controls get 1/N each.
    * Σ_k P_k > 0: a control with P_i = 0 lost some duel completely, and a
      cycle of complete losses would need ‖f_1‖ ≤ ‖f_2‖ ≤ ... ≤ ‖f_1‖ with
      each pair parallel, i.e. identical features, which give 0.5, not 0.
      (Should rounding ever make the sum vanish, the weights fall back to 1/N.)
    * The formula is symmetric under permutations of the controls, so the
      result does not depend on their order (up to float rounding), and it
      needs only N(N-1)/2 reductions, in closed form (no iterative min-norm
      solve whose result could depend on order).
    """
    n = len(features)
    if n == 0:
        raise ValueError("add_com needs at least one feature tensor, got none")
    first = features[0]
    for i, f in enumerate(features[1:], start=1):
        if f.shape != first.shape:
            raise ValueError(
                f"add_com needs features of one shape, got {tuple(first.shape)} (control 0) "
                f"and {tuple(f.shape)} (control {i})"
            )
    if n == 1:
        return [torch.ones(_weight_shape(first, granularity), dtype=torch.float32, device=first.device)]
    k = [1.0] * n if scales is None else [float(v) for v in scales]
    if n == 2:
        lam = mgda_coefficient(features[0], features[1], granularity, k[0], k[1])
        return [1.0 - lam, lam]
    wins = [None] * n  # P_i
    for i in range(n):
        for j in range(i + 1, n):
            lam = mgda_coefficient(features[i], features[j], granularity, k[i], k[j])  # s(j|i)
            wins[j] = lam if wins[j] is None else wins[j] * lam
            wins[i] = (1.0 - lam) if wins[i] is None else wins[i] * (1.0 - lam)
    total = sum(wins)
    uniform = torch.full_like(total, 1.0 / n)
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    return [torch.where(total > 0, p / safe_total, uniform) for p in wins]


# Elements of one fp32 temporary in the chunked reductions (mgda_coefficient,
# channel_norm): 2**21 elements = 8 MiB; at most four live at once.
REDUCTION_CHUNK_ELEMENTS = 1 << 21


def reduction_memory_bytes() -> int:
    """Upper bound of the extra memory the chunked reductions use at a time."""
    return 4 * 4 * REDUCTION_CHUNK_ELEMENTS


def _channel_chunks(x: torch.Tensor):
    """(start, stop) ranges of channels whose slices hold at most
    ``REDUCTION_CHUNK_ELEMENTS`` elements (at least one channel each)."""
    channels = x.shape[1]
    per_channel = max(x.numel() // max(channels, 1), 1)
    step = max(REDUCTION_CHUNK_ELEMENTS // per_channel, 1)
    return [(c, min(c + step, channels)) for c in range(0, channels, step)]


def channel_norm(x: torch.Tensor) -> torch.Tensor:
    """fp32 ``‖x‖`` over channels, shaped ``(B, ...)`` without the channel dim,
    computed over bounded channel slices (no full fp32 copy of ``x``)."""
    total = None
    for c0, c1 in _channel_chunks(x):
        part = x[:, c0:c1].to(torch.float32).square().sum(dim=1)
        total = part if total is None else total + part
    return total.sqrt()


def _weight_shape(x: torch.Tensor, granularity: str) -> tuple[int, ...]:
    dims = set(_reduce_dims(x, granularity))
    return tuple(1 if d in dims else s for d, s in enumerate(x.shape))


def add_com(features: Sequence[torch.Tensor], granularity: str = "layer") -> torch.Tensor:
    """Balanced combination of the residuals of N >= 1 controls at one layer.

    N = 1 returns the tensor itself; N = 2 is eq. 12,
    ``(1 - λ*)·f1 + λ*·f2``; N > 2 uses the order-independent pairwise
    weights derived in ``combination_weights``. The result has the first
    feature's dtype and device.
    """
    if len(features) == 1:
        return features[0]
    return weighted_sum(features, combination_weights(features, granularity))


def weighted_sum(features: Sequence[torch.Tensor], weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """Σ w_i·f_i in the first feature's dtype: ``add_com`` with its weights given."""
    dtype = features[0].dtype
    out = None
    for w, f in zip(weights, features):
        term = w.to(dtype) * f.to(dtype)
        out = term if out is None else out + term
    return out
