"""Forward pass through add^inj, the diffusion loss and the conservativity loss.

The ControlNet's residuals reach the UNet through ``UNetInjection`` (the engine's UNet site) of
``model_patches.mi_control``: the object ComfyUI's sampler uses when a
MIControlNetApply control runs. It registers the same ``output_block_patch``
(middle output and skip features, add^inj per layer) on the call's
``transformer_options``, so the training forward is the sampling forward.

Noise, timesteps and scaling come from the checkpoint's own ComfyUI
``model_sampling`` (``noise_scaling``, ``calculate_input``, ``timestep``).

Conservativity (stage 2). The paper's term is on the score s_t(x_t) = −ε̂/σ_t
(eqs. 2, 6, 13, 18) and its Jacobian J = ∂s_t/∂x_t. Here J is restricted to
the ControlNet path: with ``r(x)`` the ControlNet residuals and ``D`` the
Jacobian of the score with respect to the residuals, ``J_c = D ∂r/∂x_t`` is
the part of ∂s_t/∂x_t that flows through the ControlNet (the frozen UNet's
own part is not trained). The loss, per row, is

    L_QC^simple = E_v[ vᵀ J_c J_cᵀ v − vᵀ J_c J_c v ] = tr(J_c J_cᵀ) − tr(J_c J_c),

a sum over the row's elements (not divided by their count), which is
‖J_c − J_cᵀ‖²_F / 2: zero exactly when the ControlNet's contribution to the
score is conservative. One Rademacher probe ``v`` per row gives the unbiased
Hutchinson estimate ``‖J_cᵀv‖² − ⟨J_cᵀv, J_c v⟩``, from one forward-mode pass
(J_c v, in the same forward that gives the diffusion loss) and one
reverse-mode pass (J_cᵀ v, without a graph: see ``qc_per_row_for_training``
for the gradient). Only the ControlNet input carries the probe and only the
ControlNet parameters require grad, so both products are restricted to the
ControlNet path and the loss is differentiated w.r.t. the ControlNet only.
How ComfyUI's variables map onto x_t and σ_t: ``score_jacobian_scale``.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

TRAINING_LABEL = "training"


@dataclass
class Batch:
    """One micro-batch on the training device. Rows are independent samples."""

    latents: torch.Tensor            # (B, 4, h, w) model-space latents (after latent_format.process_in)
    hint: torch.Tensor               # (B, C, 8h, 8w) control image in [0, 1]
    context: torch.Tensor            # (B, T, D) text embeddings
    y: torch.Tensor | None           # (B, adm) SDXL class embedding, None for SD1.5
    noise: torch.Tensor              # (B, 4, h, w)
    timestep_index: torch.Tensor     # (B,) long, index into model_sampling.sigmas
    probe: torch.Tensor | None = None  # (B, 4, h, w) Rademacher v for L_QC

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in
                       (self.latents, self.hint, self.context, self.y, self.noise, self.timestep_index, self.probe)))


def injection_options(granularity: str = "layer", max_lambda: float = 20.0, mode: str = "micontrolnet",
                      lambda_convention: str = "as_written") -> dict:
    """A fresh transformer_options dict for one model call, with the balance
    settings the sampler would find (no balance record). ``mode`` is
    ``micontrolnet`` (add^inj) or ``vanilla`` (plain add, for the warm-up);
    ``lambda_convention`` is balance.injection_coefficient's."""
    from model_patches import mi_control as mi

    return {"cond_or_uncond": [0], **attention_options(),
            mi.SETTINGS_KEY: mi.settings_dict(mode, granularity, max_lambda, record_balance=False,
                                              lambda_convention=lambda_convention)}


def unet_dtype(model) -> torch.dtype:
    """The dtype ComfyUI feeds the UNet (BaseModel._apply_model casts to it)."""
    return model.manual_cast_dtype or model.get_dtype()


def controlled_eps(model, cnet, x_unet: torch.Tensor, x_control: torch.Tensor, timestep: torch.Tensor,
                   context: torch.Tensor, y: torch.Tensor | None, hint: torch.Tensor,
                   granularity: str = "layer", max_lambda: float = 20.0, mode: str = "micontrolnet",
                   lambda_convention: str = "as_written") -> torch.Tensor:
    """UNet output with the ControlNet's residuals injected by add^inj.

    ``x_unet`` and ``x_control`` are the scaled model inputs the UNet and the
    ControlNet get (the same tensor in plain training; the ControlNet's may
    carry a forward-mode tangent for L_QC)."""
    from model_patches.injection.unet_sites import UNetInjection

    residuals = cnet(x=x_control, hint=hint, timesteps=timestep, context=context, y=y,
                     transformer_options=attention_options())
    options = injection_options(granularity, max_lambda, mode, lambda_convention)
    UNetInjection.for_call(options).add(TRAINING_LABEL, residuals, None)
    dtype = unet_dtype(model)
    return model.diffusion_model(x_unet.to(dtype), timestep, context=context.to(dtype),
                                 y=None if y is None else y.to(dtype), control=None, transformer_options=options)


def noisy_inputs(model, batch: Batch):
    """(sigma, x_noisy) with ComfyUI's noise scaling for the checkpoint's schedule."""
    ms = model.model_sampling
    sigma = ms.sigmas.to(batch.latents.device)[batch.timestep_index].to(torch.float32)
    x_noisy = ms.noise_scaling(sigma, batch.noise, batch.latents)
    return sigma, x_noisy


def per_row_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (pred.float() - target.float()).square().flatten(1).mean(1)


def _accumulate(t: torch.Tensor) -> torch.Tensor:
    """``t`` in its reduction dtype: fp32, or float64 where it already is."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def qc_per_row(jv: torch.Tensor, jtv: torch.Tensor) -> torch.Tensor:
    """Hutchinson estimate of tr(J Jᵀ) − tr(J J) per row: a sum over the row's
    elements, as the paper's L_QC^simple (no division by the element count).
    fp32 (float64 for float64 inputs)."""
    a = _accumulate(jv).flatten(1)
    b = _accumulate(jtv).flatten(1)
    return b.square().sum(1) - (b * a).sum(1)


def qc_per_row_for_training(jv: torch.Tensor, jtv: torch.Tensor) -> torch.Tensor:
    """``qc_per_row``'s value with an unbiased gradient that needs no double backward.

    With v Rademacher, E‖J v‖² = E‖Jᵀ v‖² = ‖J‖²_F for every parameter value,
    so their gradients agree; and ∇ tr(J J) = 2 tr(J ∂J) = 2 E[(∂(J v))·(Jᵀ v)],
    i.e. Jᵀ v may be held constant if the term through J v is doubled. The
    gradient of ‖Jv‖² − 2 (Jv)·sg(Jᵀv) is therefore an unbiased estimate of
    ∇(tr(JJᵀ) − tr(JJ)), differentiated through the forward-mode product only:
    Jᵀ v is computed without a graph and the second-order backward through the
    reverse-mode product disappears (a stage-2 step about 25 % faster)."""
    a = _accumulate(jv).flatten(1)
    b = _accumulate(jtv.detach()).flatten(1)
    value = b.square().sum(1) - (b * a.detach()).sum(1)
    surrogate = a.square().sum(1) - 2 * (a * b).sum(1)
    return value + (surrogate - surrogate.detach())


def score_jacobian_scale(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """Per-row factor ``k`` with ∂s_t/∂x_t = k · ∂ε̂/∂x_in, shaped (B, 1, 1, 1), fp32.

    ComfyUI's EPS sampling on the discrete VP schedule (``ModelSamplingDiscrete``
    + ``EPS``: SD1.5, SDXL) works with σ = √((1−ᾱ)/ᾱ) and

        x_noisy = x₀ + σ ε                      (EPS.noise_scaling)
        x_in    = x_noisy / √(1 + σ²)           (EPS.calculate_input, σ_data = 1)

    With ᾱ = 1/(1+σ²), x_in = √ᾱ x₀ + √(1−ᾱ) ε is the paper's x_t itself, and
    σ_t = √(1−ᾱ) = σ/√(1+σ²). The score is s_t = −ε̂/σ_t, so

        ∂s_t/∂x_t = −(1/σ_t) ∂ε̂/∂x_in = −(√(1+σ²)/σ) ∂ε̂/∂x_in,

    which is what the probes here are taken on (the ControlNet's input is
    x_in). For comparison, ∂ε̂/∂x_noisy = ∂ε̂/∂x_in / √(1+σ²) = −σ/(1+σ²) · ∂s_t/∂x_t:
    a loss on ε̂'s Jacobian w.r.t. x_noisy would weigh each row by (σ/(1+σ²))²
    (8.5e-4 at σ = 0.03, 0.25 at σ = 1), and tangents on x_noisy would need the
    factor −(1+σ²)/σ. The sign cancels in L_QC (quadratic in J).

    Other model samplings are refused: v-prediction (ε̂ = σ_t x_t + √ᾱ v̂ would
    change the diffusion loss too, and the trainers train ε only), EDM, x0,
    flow (CONST) and continuous schedules."""
    import comfy.model_sampling as cms

    name = type(model_sampling).__name__
    ok = (isinstance(model_sampling, cms.EPS) and isinstance(model_sampling, cms.ModelSamplingDiscrete)
          and not isinstance(model_sampling, (cms.V_PREDICTION, cms.X0, cms.ModelSamplingDiscreteEDM,
                                              cms.StableCascadeSampling))
          and float(getattr(model_sampling, "sigma_data", 1.0)) == 1.0)
    if not ok:
        raise ValueError(f"L_QC^simple: the model's sampling is {name} ({', '.join(c.__name__ for c in type(model_sampling).__mro__[1:-1])}); "
                         f"the score Jacobian is derived for ComfyUI's EPS prediction on the discrete VP "
                         f"schedule (SD1.5/SDXL epsilon checkpoints). Use such a base checkpoint or train "
                         f"stage 1 only (--stage 1).")
    sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
    return -(1.0 + sigma.square()).sqrt() / sigma


def jacobian_probes(f, x: torch.Tensor, v: torch.Tensor, create_graph: bool = False, retain_graph: bool = False):
    """(f(x), J v, Jᵀ v) of ``f`` at ``x``: one forward-mode and one reverse-mode
    product. ``retain_graph`` keeps f(x) and J v differentiable with respect to
    the parameters inside ``f`` (J v carries the forward-mode graph); Jᵀ v
    has no graph. ``create_graph`` also makes Jᵀ v differentiable, which needs
    ``f`` to be twice differentiable: not through ``forward_mode_attention``,
    whose primal comes from SDPA's fused kernel."""
    x = x.detach().contiguous().requires_grad_(True)
    with fwAD.dual_level(), ConstantWeightTangents():
        out_dual = f(fwAD.make_dual(x, v.to(x.dtype)))
        out, jv = fwAD.unpack_dual(out_dual)
    if jv is None:  # f does not depend on x along this path
        jv = torch.zeros_like(out)
    (jtv,) = torch.autograd.grad(out, x, v.to(out.dtype), create_graph=create_graph,
                                 retain_graph=create_graph or retain_graph, allow_unused=True)
    if jtv is None:
        jtv = torch.zeros_like(x)
    return out, jv, jtv


def _tangent(t) -> torch.Tensor | None:
    return fwAD.unpack_dual(t).tangent if isinstance(t, torch.Tensor) else None


class ConstantWeightTangents(TorchFunctionMode):
    """Forward-mode products of convolutions and linear layers whose weights
    carry no tangent, without the zero term.

    torch's forward-mode rule for these layers is f(x_t, W) + f(x, W_t, b_t)
    and it fills a missing weight tangent with zeros: every layer the probe
    passes through runs a third full convolution or matmul on zeros, and the
    training step's backward goes through it again. Inside this mode such a
    layer returns dual(f(x, W, b), f(x_t, W)) instead: the same primal, the
    same tangent and the same reverse-mode graph (a torch function mode, so
    it applies only to code run inside it; ComfyUI's layers are untouched).
    About a fifth of a stage-2 step on the small SD1.5 config."""

    LAYERS = (F.conv1d, F.conv2d, F.conv3d, F.linear)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.layer_norm:
            dual = _layer_norm_dual(*args, **kwargs)
            if dual is not None:
                return dual
        if func in self.LAYERS and len(args) >= 2:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            primal, tangent = fwAD.unpack_dual(x)
            if tangent is not None and _tangent(weight) is None and _tangent(bias) is None:
                out = func(primal, *args[1:], **kwargs)
                if len(args) > 2:
                    out_t = func(tangent, weight, None, *args[3:], **kwargs)
                else:
                    out_t = func(tangent, weight, **{**kwargs, "bias": None})
                return fwAD.make_dual(out, out_t)
        return func(*args, **kwargs)


def _layer_norm_dual(x, normalized_shape, weight=None, bias=None, eps=1e-5):
    """F.layer_norm of a dual input whose weight and bias carry no tangent, with
    the tangent written out from primal ops, or None where that does not apply.

    torch's own forward-mode rule for layer_norm gives the right tangent, but
    its reverse-mode derivative is wrong (measured in float64 on torch 2.14:
    the gradient of ‖J v‖² w.r.t. the parameters before an affine layer norm
    is off by 4 %), which would bias L_QC's gradient at every transformer
    block. With x̂ = (x − μ) r, r = (var + eps)^(-1/2) over the normalised dims,

        d(layer_norm) = w ⊙ r (dx − mean(dx) − x̂ mean(x̂ dx)),

    computed from x with ordinary differentiable ops; the primal is torch's."""
    primal, tangent = fwAD.unpack_dual(x)
    if tangent is None or _tangent(weight) is not None or _tangent(bias) is not None:
        return None
    out = F.layer_norm(primal, normalized_shape, weight, bias, eps)
    dims = tuple(range(-len(normalized_shape), 0))
    centred = primal - primal.mean(dims, keepdim=True)
    r = torch.rsqrt(centred.square().mean(dims, keepdim=True) + eps)
    x_hat = centred * r
    d = r * (tangent - tangent.mean(dims, keepdim=True) - x_hat * (x_hat * tangent).mean(dims, keepdim=True))
    if weight is not None:
        d = d * weight
    return fwAD.make_dual(out, d.to(out.dtype))


def forward_mode_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False,
                           skip_output_reshape=False, **kwargs):
    """softmax(q kᵀ/√d) v and its forward-mode tangent, with the calling
    convention of ComfyUI's ``attention_pytorch``; q, k and v may be dual tensors.

    The fused SDPA kernels have no forward-mode rule, and torch's generic rules
    on an exp/sum/div softmax build and differentiate a dozen n×n tensors per
    layer. Written out, with P = softmax(S), S = q kᵀ/√d and O = P v:

        dO = P dv + (P ⊙ dS) v − rowsum(P ⊙ dS) ⊙ O,   dS = (dq kᵀ + q dkᵀ)/√d

    which needs P, dS and P ⊙ dS as the only n×n tensors. Both O and dO are
    computed from the primals with ordinary (reverse-mode differentiable)
    ops and returned as one dual tensor, so the training loss differentiates
    through the tangent as before. fp32 inside, the input dtype outside."""
    (q, dq), (k, dk), (v, dv) = (fwAD.unpack_dual(t) for t in (q, k, v))
    if skip_reshape:
        b, _, _, dim_head = q.shape
    else:
        b, _, inner = q.shape
        dim_head = inner // heads

    def split_heads(t):
        if t is None or skip_reshape:
            return None if t is None else t.float()
        return t.view(b, -1, heads, dim_head).transpose(1, 2).float()

    out_dtype = v.dtype
    q, k, v, dq, dk, dv = (split_heads(t) for t in (q, k, v, dq, dk, dv))
    scale = dim_head ** -0.5
    # The primal through SDPA: the reverse-mode product J_cᵀ v and the task
    # loss backpropagate through its fused kernel.
    if mask is not None:  # as attention_pytorch: (n, m) or (b, n, m) masks gain the missing dims
        mask = mask.unsqueeze(0) if mask.ndim == 2 else mask
        mask = mask.unsqueeze(1) if mask.ndim == 3 else mask
        mask = mask if mask.dtype == torch.bool else mask.float()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    d_out = None
    if dq is not None or dk is not None or dv is not None:
        # P for the tangent. The scale goes on the n×d side, never on an n×n tensor.
        scores = (q * scale) @ k.transpose(-1, -2)
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        p = torch.softmax(scores, dim=-1)
        if mask is not None:  # a query with every key masked: SDPA gives 0, softmax NaN
            p = p.nan_to_num(0.0)
        if dq is not None or dk is not None:
            # dS = [dq, q] [k, dk]ᵀ/√d in one product; (P ⊙ dS) [v, 1] gives
            # (P ⊙ dS) v and rowsum(P ⊙ dS) in one more.
            left, right = [], []
            if dq is not None:
                left.append(dq * scale), right.append(k)
            if dk is not None:
                left.append(q * scale), right.append(dk)
            p_ds = p * (torch.cat(left, -1) @ torch.cat(right, -1).transpose(-1, -2))
            wide = p_ds @ torch.cat([v, torch.ones_like(v[..., :1])], -1)
            d_out = wide[..., :-1] - wide[..., -1:] * out
        if dv is not None:
            d_out = p @ dv if d_out is None else d_out + p @ dv

    def merge_heads(t):
        t = t.to(out_dtype)
        return t if skip_output_reshape else t.transpose(1, 2).reshape(b, -1, heads * dim_head)

    out = merge_heads(out)
    return out if d_out is None else fwAD.make_dual(out, merge_heads(d_out))


# How training forwards compute attention, set per step by training_attention():
# "plain" (SDPA), "forward_mode" (the written-out forward-mode rule where a tangent flows), or
# None (ComfyUI's own choice).
_TRAINING_ATTENTION: contextvars.ContextVar = contextvars.ContextVar("training_attention", default=None)


def attention_override(func, *args, **kwargs):
    """ComfyUI's public ``optimized_attention_override`` hook (a key of
    transformer_options that every attention call consults): route the call to
    the implementation training_attention() selected."""
    mode = _TRAINING_ATTENTION.get()
    if mode is None:
        return func(*args, **kwargs)
    import comfy.ldm.modules.attention as attention

    # Only attention that carries a forward-mode tangent (the ControlNet and the
    # UNet decoder in L_QC steps) needs the written-out rule; the rest keeps SDPA.
    if mode == "forward_mode" and any(_has_tangent(t) for t in args[:3]):
        return forward_mode_attention(*args, **kwargs)
    return attention.attention_pytorch(*args, **kwargs)


def _has_tangent(t) -> bool:
    return isinstance(t, torch.Tensor) and fwAD.unpack_dual(t).tangent is not None


def attention_options() -> dict:
    """transformer_options entries that make a forward use training's attention."""
    return {"optimized_attention_override": attention_override}


@contextlib.contextmanager
def training_attention(forward_mode: bool = False):
    """Run the forwards given ``attention_options()`` through a differentiable attention.

    ComfyUI picks its attention per machine: on CPU sub-quadratic attention,
    which exponentiates in place (no backward through it), elsewhere SDPA,
    xformers or sage (no double backward or forward-mode AD for the fused
    kernels). Training uses ``attention_pytorch`` (SDPA) for plain steps and
    ``forward_mode_attention`` where forward-mode tangents flow. The
    choice travels through ComfyUI's ``optimized_attention_override`` hook in
    transformer_options (the ControlNet gets them through
    ``models.TrainableControlNet``); nothing in ComfyUI's modules changes."""
    token = _TRAINING_ATTENTION.set("forward_mode" if forward_mode else "plain")
    try:
        yield
    finally:
        _TRAINING_ATTENTION.reset(token)


def loss_terms(model, cnet, batch: Batch, qc_weight: float = 0.0, granularity: str = "layer",
               max_lambda: float = 20.0, autocast=None, mode: str = "micontrolnet",
               lambda_convention: str = "as_written", task_weight: torch.Tensor | None = None) -> dict:
    """Per-row diffusion loss (ε-MSE, a mean over the row's elements as in
    diffusers' trainers) and, when ``qc_weight > 0`` and the batch has probes,
    per-row L_QC^simple (a sum over the row's elements, the paper's quantity on
    the score w.r.t. x_t). Returns fp32 per-row tensors ``task``, ``qc`` (zeros
    when off) and ``total`` = w·task + qc_weight·qc, with w the optional per-row
    ``task_weight`` (1 when None; ``pixel_space.loss_weights``)."""
    autocast = autocast or contextlib.nullcontext()
    ms = model.model_sampling
    sigma, x_noisy = noisy_inputs(model, batch)
    timestep = ms.timestep(sigma).float()
    x_in = ms.calculate_input(sigma, x_noisy)
    use_qc = qc_weight > 0 and batch.probe is not None

    if not use_qc:
        with autocast:
            eps = controlled_eps(model, cnet, x_in, x_in, timestep, batch.context, batch.y, batch.hint,
                                 granularity, max_lambda, mode, lambda_convention)
        task = per_row_mse(eps, batch.noise)
        return {"task": task, "qc": torch.zeros_like(task), "total": _weighted(task, task_weight)}

    k = score_jacobian_scale(ms, sigma).to(x_in.device)
    x_t = x_in.detach()

    def through_controlnet(x_t_probe):
        # The probe enters the ControlNet's input, x_t; the UNet's own input stays x_t without it.
        return controlled_eps(model, cnet, x_t, x_t_probe, timestep, batch.context, batch.y, batch.hint,
                              granularity, max_lambda, mode, lambda_convention)

    # No autocast here: autocast casts primals but not forward-mode tangents
    # (conv(tangent fp32, weight bf16) fails), and the L_QC terms want fp32.
    with training_attention(forward_mode=True):
        eps, jv, jtv = jacobian_probes(through_controlnet, x_t, batch.probe, create_graph=False,
                                       retain_graph=True)
    task = per_row_mse(eps, batch.noise)
    # ∂s_t/∂x_t = k ∂ε̂/∂x_t per row (score_jacobian_scale).
    qc = qc_per_row_for_training(k * _accumulate(jv), k * _accumulate(jtv))
    return {"task": task, "qc": qc, "total": _weighted(task, task_weight) + qc_weight * qc}


def _weighted(task: torch.Tensor, task_weight: torch.Tensor | None) -> torch.Tensor:
    return task if task_weight is None else task * task_weight


def rademacher(shape, generator: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 2, shape, generator=generator).float() * 2 - 1
