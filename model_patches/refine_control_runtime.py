"""SD3 ControlNets of any depth inside ComfyUI, with an explicit block wiring.

How a ``RefineControl`` reaches the SD3 transformer, through public
extension points only:

1. It is a ``ControlBase`` subclass in the conditioning's control chain. It
   wraps a copy of the core SD3 ControlNet that ComfyUI's loader produced; the
   copy's ``control_model`` is a ``LayerMappedControlNet``, a thin module of
   this package that runs the same ComfyUI ControlNet layers but returns one
   residual per base block according to the chosen wiring (core repeats
   layers by its own rule, which drops the last layer of a 23-layer teacher).
   Core's hint pipeline (VAE encode, latent format, mask channel, resizing,
   cond/uncond broadcasting, strength) is reused unchanged.
2. Plain injection: the per-block list is summed with the previous controls'
   output and handed back to core, which adds entry i after base block i.
   An optional local prompt is held by the control itself and substituted,
   inside its own ``get_control``, for the text of the positive rows only
   (``transformer_options["cond_or_uncond"]``); the conditioning dicts are
   never changed, so other controls and the base model see the global text
   and ComfyUI keeps cond and uncond in one batch.
3. Balanced injection: the residuals go to this model call's
   ``BlockInjection`` (in the call's fresh ``transformer_options``), the
   engine's SD3 site (``injection.dit_sites``), which registers, on that
   dict only, a ``patches_replace["dit"][("double_block", i)]`` patch per
   block that runs the block (or the patch registered before it) and then
   applies add^inj to the block's image tokens; it checks finiteness once
   per forward and records the balance.

Nothing is stored on the model or in ComfyUI's modules, so a graph without
these controls runs exactly as before, and nothing survives a model call.
"""

from __future__ import annotations

import logging
import math

import torch

import comfy.cldm.mmdit
import comfy.controlnet
import comfy.latent_formats
import comfy.utils

from .balance import GRANULARITIES, canonical_granularity
from .injection.dit_sites import DiTInjection
from .injection.settings import BalanceSettings
from .injection.engine import INJECTION_KEY as MI_INJECTION_KEY
from .mi_control import WrappedControl
from .refine_control import block_map, convention, residuals_for_blocks

log = logging.getLogger(__name__)

INJECTION_KEY = "refine_control_injection"
INJECTION_GRANULARITIES = GRANULARITIES  # "pixel": one coefficient per image token


class NotSD3ControlNetError(ValueError):
    pass


def sd3_control_model(control, label: str = "RefineControl"):
    """The ``comfy.cldm.mmdit.ControlNet`` inside a loaded CONTROL_NET, or a clear error."""
    model = getattr(control, "control_model", None)
    if isinstance(model, LayerMappedControlNet):
        model = model.inner
    if not isinstance(model, comfy.cldm.mmdit.ControlNet):
        found = type(model).__module__ + "." + type(model).__name__ if model is not None else type(control).__name__
        raise NotSD3ControlNetError(
            f"{label}: expected an SD3 (MMDiT) ControlNet as loaded by Load ControlNet Model "
            f"(diffusers SD3ControlNetModel keys: transformer_blocks.*, controlnet_blocks.*, pos_embed_input.*), "
            f"found {found}. Load an SD3 ControlNet (e.g. an SD3 inpainting ControlNet or a student trained "
            f"with `python -m training refine-control`)."
        )
    return model


def controlnet_layers(cn: comfy.cldm.mmdit.ControlNet, x, hint, timesteps, context=None, y=None):
    """Run an SD3 ControlNet and return (features, residuals), one per layer.

    ``features[j]`` is the hidden state after ControlNet block j (before its
    zero-initialised output projection), ``residuals[j]`` the projection.
    Same computation as ComfyUI's ``ControlNet.forward``, without its repeats.
    """
    if y is not None:
        y = torch.zeros_like(y)  # SD3 ControlNets are trained with zero pooled projections
    if cn.context_processor is not None:
        context = cn.context_processor(context)
    hw = x.shape[-2:]
    h = cn.x_embedder(x) + cn.cropped_pos_embed(hw, device=x.device).to(dtype=x.dtype, device=x.device)
    h = h + cn.pos_embed_input(hint)
    c = cn.t_embedder(timesteps, dtype=h.dtype)
    if y is not None and cn.y_embedder is not None:
        c = c + cn.y_embedder(y)
    if context is not None:
        context = cn.context_embedder(context)
    features, residuals = [], []
    for block, proj in zip(cn.joint_blocks, cn.controlnet_blocks):
        context, h = block(context, h, c=c, use_checkpoint=cn.use_checkpoint)
        features.append(h)
        residuals.append(proj(h))
    return features, residuals


class LayerMappedControlNet(torch.nn.Module):
    """Stands in for the core control model: same layers, explicit wiring.

    ``depth`` is the base transformer's block count, set at ``pre_run``."""

    def __init__(self, inner: comfy.cldm.mmdit.ControlNet, wiring: str):
        super().__init__()
        self.inner = inner
        self.wiring = wiring
        self.depth = len(inner.joint_blocks) + 1

    @property
    def dtype(self):
        return self.inner.dtype

    @property
    def n_layers(self) -> int:
        return len(self.inner.joint_blocks)

    def mapping(self) -> list:
        return block_map(self.wiring, self.n_layers, self.depth)

    def forward(self, x, hint, timesteps, context=None, y=None, **kwargs):
        _, residuals = controlnet_layers(self.inner, x, hint, timesteps, context, y)
        return {"output": residuals_for_blocks(residuals, self.mapping())}


def merge_outputs(own: dict, prev: dict | None) -> dict:
    """Element-wise sum of two control outputs (core's merge without its strength step)."""
    if prev is None:
        return own
    out = {}
    for key in set(own) | set(prev):
        a, b = list(own.get(key, [])), list(prev.get(key, []))
        n = max(len(a), len(b))
        merged = []
        for i in range(n):
            x = a[i] if i < len(a) else None
            y = b[i] if i < len(b) else None
            merged.append(y if x is None else (x if y is None else x + y))
        out[key] = merged
    return out


def context_with_local_prompt(context: torch.Tensor, local: torch.Tensor, cond_or_uncond: list) -> torch.Tensor:
    """The text a ControlNet with a local prompt sees in one model call.

    ``context`` (B, L, C) is the call's text (chunks of B/len(cond_or_uncond)
    rows, chunk j labelled ``cond_or_uncond[j]``: 0 positive, 1 negative);
    the rows of positive chunks are replaced by ``local`` (1 or B/chunks rows,
    Lₗ tokens). Both are repeated along the tokens to lcm(L, Lₗ), which is how
    ComfyUI stacks texts of different lengths (``comfy/conds.py``
    ``CONDCrossAttn.concat``): repeating every token the same number of times
    leaves attention unchanged. A call without positive rows gets ``context``
    itself."""
    if 0 not in cond_or_uncond:
        return context
    chunks = len(cond_or_uncond)
    if context.shape[0] % chunks:
        raise ValueError(f"local prompt: {context.shape[0]} text rows do not split into {chunks} cond/uncond chunks")
    per = context.shape[0] // chunks
    if local.shape[-1] != context.shape[-1]:
        raise ValueError(f"local prompt: its embeddings are {local.shape[-1]} wide but the prompt's are "
                         f"{context.shape[-1]}; encode the local prompt with the same CLIP as the prompt.")
    if local.shape[0] not in (1, per):
        raise ValueError(f"local prompt: {local.shape[0]} rows for a batch of {per}; give one local prompt "
                         f"(or one per image).")
    n = math.lcm(context.shape[1], local.shape[1])
    ctx = context.repeat(1, n // context.shape[1], 1) if n != context.shape[1] else context
    loc = local.to(device=context.device, dtype=context.dtype)
    loc = loc.repeat(1, n // loc.shape[1], 1) if n != loc.shape[1] else loc
    loc = loc.expand(per, -1, -1) if loc.shape[0] != per else loc
    parts = [loc if label == 0 else ctx[j * per:(j + 1) * per] for j, label in enumerate(cond_or_uncond)]
    return torch.cat(parts)


class BlockInjection(DiTInjection):
    """Per model call: the residuals of every balanced RefineControl, summed
    per block and injected with add^inj into the block's image tokens. The
    engine's SD3 site (``injection.dit_sites``) with the fixed rule
    ``("sum", "add_inj")``: it checks finiteness once per forward like
    MIControlNet (no balance record: no node draws one for Refine-Control)."""

    name = "RefineControl"

    def __init__(self, granularity: str, max_lambda: float, label: str = "RefineControl",
                 transformer_options: dict | None = None, latent_shape=None):
        granularity = canonical_granularity(granularity, label)
        # No node draws a map for Refine-Control: no record (its per-block norms would cost every call).
        settings = BalanceSettings(granularity=granularity, max_lambda=max_lambda, record_balance=False)
        super().__init__(settings, transformer_options if transformer_options is not None else {}, "sd3",
                         rules=("sum", "add_inj"), latent_shape=latent_shape)
        self.granularity = granularity
        self.max_lambda = max_lambda
        self.label = label  # the control whose settings these are, for messages

    @classmethod
    def for_call(cls, transformer_options: dict, granularity: str, max_lambda: float,
                 label: str = "RefineControl", latent_shape=None) -> "BlockInjection":
        """The call's injection; the first balanced control creates it, later
        ones must ask for the same settings (their residuals are summed per
        block before the one add^inj)."""
        granularity = canonical_granularity(granularity, label)
        inj = transformer_options.get(INJECTION_KEY)
        if inj is None:
            inj = cls(granularity, max_lambda, label, transformer_options, latent_shape)
            inj.register(transformer_options)
            transformer_options[INJECTION_KEY] = inj
        elif (inj.granularity, inj.max_lambda) != (granularity, max_lambda):
            raise ValueError(
                f"{label}: balanced injection with granularity {granularity!r} and max_lambda {max_lambda:g}, but "
                f"{inj.label} on the same model call uses granularity {inj.granularity!r} and max_lambda "
                f"{inj.max_lambda:g}. Their residuals are summed per block before one add^inj; give every "
                f"balanced RefineControl of a model the same injection and max_lambda.")
        return inj

    def register(self, transformer_options: dict) -> None:
        # Kept under this family's own key: MIControlNet controls of the same call have their own injection.
        mi = transformer_options.get(MI_INJECTION_KEY)
        super().register(transformer_options)
        if mi is None:
            transformer_options.pop(MI_INJECTION_KEY, None)
        else:
            transformer_options[MI_INJECTION_KEY] = mi

    def add(self, block_residuals: list, transformer_options: dict | None = None, control=None):
        """Queue one control's per-block residuals (``None`` where a block gets nothing)."""
        if transformer_options is not None:
            self.transformer_options = transformer_options
        label = getattr(control, "label", self.label)
        return super().add(label, {"output": list(block_residuals)}, control)


class RefineControl(WrappedControl):
    """An SD3 ControlNet of any depth with an explicit block wiring and, optionally,
    balanced (add^inj) injection per transformer block."""

    def __init__(self, inner: comfy.controlnet.ControlNet, wiring: str, balanced: bool = False,
                 granularity: str = "layer", max_lambda: float = 20.0, label: str = "RefineControl",
                 local_context: torch.Tensor | None = None, expected_depth: int | None = None):
        granularity = canonical_granularity(granularity, label)
        super().__init__(inner, label)
        self.wiring = wiring
        self.balanced = balanced
        self.granularity = granularity
        self.max_lambda = max_lambda
        self.local_context = local_context
        self.expected_depth = expected_depth

    @classmethod
    def create(cls, control_net, image, keep, strength, percent_range, vae, convention_name: str,
               wiring: str, balanced=False, granularity="layer", max_lambda=20.0, label="RefineControl",
               local_context: torch.Tensor | None = None, expected_depth: int | None = None):
        """``image`` is the already masked IMAGE; ``keep`` (B, 1, H, W) the keep channel;
        ``local_context`` (1, L, C) the encoded local prompt for the positive rows, or None;
        ``expected_depth`` the base depth the file says it was trained for, or None."""
        cn_model = sd3_control_model(control_net, label)
        block_map(wiring, len(cn_model.joint_blocks), len(cn_model.joint_blocks) + 1)  # validates the name
        conv = convention(convention_name)
        inner = control_net.copy()
        inner.set_previous_controlnet(None)
        inner.control_model = LayerMappedControlNet(cn_model, wiring)
        latent_format = comfy.latent_formats.SD3()
        latent_format.shift_factor = conv.shift
        latent_format.scale_factor = conv.scale
        inner.latent_format = latent_format
        extra = [keep] if inner.concat_mask else []
        inner.set_cond_hint(image, strength, percent_range, vae=vae, extra_concat=extra)
        return cls(inner, wiring, balanced, granularity, max_lambda, label, local_context, expected_depth)

    # -- ControlBase protocol ------------------------------------------------------
    def inner_cond(self, cond, transformer_options):
        """Only this control's inner ControlNet sees the local prompt."""
        if self.local_context is None:
            return cond
        labels = transformer_options.get("cond_or_uncond")
        if labels is None:
            raise ValueError(f"{self.label}: a local prompt needs transformer_options['cond_or_uncond'] "
                             f"(set by ComfyUI's sampler) to know which rows are positive.")
        text = cond.get("crossattn_controlnet", cond["c_crossattn"])
        return {**cond, "crossattn_controlnet": context_with_local_prompt(text, self.local_context, labels)}

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options):
        own, control_prev = self.run_chain(x_noisy, t, cond, batched_number, transformer_options)
        if own is None:
            return control_prev
        if self.balanced:
            BlockInjection.for_call(transformer_options, self.granularity, self.max_lambda, self.label,
                                    tuple(x_noisy.shape)).add(own.get("output", []), transformer_options, self)
            return control_prev
        return merge_outputs(own, control_prev)

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        unet = getattr(model, "diffusion_model", None)
        blocks = getattr(unet, "joint_blocks", None)
        if blocks is None:
            raise NotSD3ControlNetError(
                f"{self.label}: the model is {type(unet).__name__}, not an SD3 (MMDiT) transformer. "
                f"An SD3 ControlNet only works with an SD3 model; load an SD3 checkpoint.")
        cn = self.inner.control_model.inner
        if cn.hidden_size != unet.hidden_size:
            raise NotSD3ControlNetError(
                f"{self.label}: the ControlNet's width is {cn.hidden_size} but the model's is {unet.hidden_size}. "
                f"Use a ControlNet trained for this SD3 model.")
        if self.expected_depth is not None and self.expected_depth != len(blocks):
            raise NotSD3ControlNetError(
                f"{self.label}: the ControlNet was trained for an SD3 model with {self.expected_depth} transformer "
                f"blocks (its file says so), but this model has {len(blocks)}. Use the base it was trained for.")
        self.inner.control_model.depth = len(blocks)

    def copy(self):
        inner = self.inner.copy()
        inner.control_model = self.inner.control_model  # core's copy keeps the reference; keep the wiring too
        c = RefineControl(inner, self.wiring, self.balanced, self.granularity, self.max_lambda, self.label,
                          self.local_context, self.expected_depth)
        self.copy_to(c)
        return c


# --------------------------------------------------------------------------
# state-dict formats
# --------------------------------------------------------------------------


def invert_key_map(sd: dict, key_map: dict, keep_prefixes: tuple[str, ...], what: str) -> dict:
    """``sd`` (ComfyUI names) in the file layout of ComfyUI's own diffusers key map
    (``comfy.utils.mmdit_to_diffusers`` / ``flux_to_diffusers``: file key -> ComfyUI key, or
    (ComfyUI key, narrow offset, function)), keys starting with ``keep_prefixes`` unchanged.
    Fused ComfyUI tensors are split by the map's offsets; its functions (swap_scale_shift)
    are their own inverses. A ComfyUI key the map does not reach raises, naming ``what``."""
    out, used = {}, set()
    for dkey, target in key_map.items():
        if isinstance(target, str):
            if target in sd:
                out[dkey] = sd[target]
                used.add(target)
            continue
        src, offset = target[0], target[1]
        fun = target[2] if len(target) > 2 else None
        if src not in sd:
            continue
        t = sd[src]
        if offset is not None:
            t = t.narrow(offset[0], offset[1], offset[2])
        if fun is not None:
            t = fun(t)
        out[dkey] = t.contiguous()
        used.add(src)
    for k, v in sd.items():
        if k.startswith(keep_prefixes):
            out[k] = v
            used.add(k)
    left = [k for k in sd if k not in used]
    if left:
        raise ValueError(f"{what}: {len(left)} keys have no diffusers name, e.g. {left[:3]}")
    return out


def mmdit_controlnet_to_diffusers(sd: dict, depth: int, num_blocks: int) -> dict:
    """A ComfyUI MMDiT ControlNet state dict in diffusers ``SD3ControlNetModel``
    key layout (what ComfyUI's ControlNetLoader and diffusers read), using the
    inverse of ComfyUI's own key map. ``controlnet_blocks.*`` and
    ``pos_embed_input.*`` have the same names in both."""
    key_map = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": num_blocks})
    return invert_key_map(sd, key_map, ("controlnet_blocks.", "pos_embed_input."), "mmdit_controlnet_to_diffusers")
