"""The losses of Refine-Control's two training stages: mask-weighted task loss,
output distillation and feature alignment over ``alignment_plan``'s terms
(model_patches/refine_control.py derives the plan from the two wirings)."""

from __future__ import annotations

from typing import Sequence

import torch

from model_patches.refine_control import AlignmentTerm


def inpaint_weights(mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """w = α·M + (1 − α)·(1 − M), fp32; M = 1 where to inpaint."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    m = mask.to(torch.float32)
    return alpha * m + (1.0 - alpha) * (1.0 - m)


def task_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, alpha: float = 0.975) -> torch.Tensor:
    """mean(w ⊙ (pred − target)²) over every element; ``mask`` (B, 1, h, w)
    at latent resolution broadcasts over channels."""
    if mask.ndim != pred.ndim or mask.shape[0] not in (1, pred.shape[0]) or mask.shape[-2:] != pred.shape[-2:]:
        raise ValueError(f"task_loss: mask shaped {tuple(mask.shape)} does not fit predictions {tuple(pred.shape)}; "
                         f"expected (B, 1, {pred.shape[-2]}, {pred.shape[-1]})")
    err = (pred.float() - target.float()).square()
    return (inpaint_weights(mask, alpha) * err).mean()


def distillation_loss(student_pred: torch.Tensor, teacher_pred: torch.Tensor) -> torch.Tensor:
    """mean((v_S − sg(v_T))²)."""
    return (student_pred.float() - teacher_pred.detach().float()).square().mean()


AF_NORMALISATIONS = ("teacher", "none")


def feature_alignment_loss(student_features: Sequence[torch.Tensor], teacher_features: Sequence[torch.Tensor],
                           plan: Sequence[AlignmentTerm], normalise: str = "teacher",
                           eps: float = 1e-12) -> torch.Tensor:
    """L_af = Σ_j e_j over ``alignment_plan``'s terms, with, per batch row b,

        d_j = |B_j|·f^S_j − sg(Σ_{k∈T_j} f^T_k)          (what each injects into blocks B_j)
        e_j = mean_b( mean(d_j²) / (mean((Σ_k f^T_k)²) + eps) )   normalise="teacher"
        e_j = mean(d_j²)                                       normalise="none"

    With ``"teacher"`` each term is the student's error relative to the
    teacher's own signal in that row: unchanged when both features are scaled
    by the same factor, so layers whose residuals differ by orders of
    magnitude weigh alike and L_af cannot swamp L_kd by scale alone (each
    term is 1 when the student injects nothing). The features are what the
    caller passes: the trainer passes the residuals after each layer's output
    projection (what is injected), see ``--af-features``. Reductions in fp32."""
    if normalise not in AF_NORMALISATIONS:
        raise ValueError(f"feature_alignment_loss: normalise must be one of {AF_NORMALISATIONS}, got {normalise!r}")
    total = None
    for term in plan:
        if not term.teacher_layers:
            continue
        fs = student_features[term.student_layer].float() * term.count
        ft = sum(teacher_features[k].detach().float() for k in term.teacher_layers)
        err = (fs - ft).square()
        if normalise == "teacher":
            per_row = err.flatten(1).mean(dim=1) / (ft.square().flatten(1).mean(dim=1) + eps)
            value = per_row.mean()
        else:
            value = err.mean()
        total = value if total is None else total + value
    if total is None:
        raise ValueError("feature_alignment_loss: the plan pairs no student layer with a teacher layer")
    return total
