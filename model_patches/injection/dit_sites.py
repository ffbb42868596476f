"""DiT sites of the engine: the image tokens after each transformer block.

Where core adds a DiT ControlNet's residuals (ComfyUI 0.3.75):

* SD3 / SD3.5 (``MMDiT.forward_core_with_concat``,
  ``comfy/ldm/modules/diffusionmodules/mmdit.py:962-984``): slot
  ``control["output"][i]`` after joint block i, ``x += add`` on the whole
  image stream;
* Flux (``Flux.forward_orig``, ``comfy/ldm/flux/model.py:189-211`` and
  ``235-250``): ``control["input"][i]`` after double block i on
  ``img[:, :N]``; ``control["output"][i]`` after single block i on
  ``img[:, txt_len:txt_len+N]`` of the ``cat(txt, img)`` stream;
* Qwen-Image (``QwenImageTransformer2DModel._forward``,
  ``comfy/ldm/qwen_image/model.py:446-475``): ``control["input"][i]`` after
  block i on ``img[:, :N]``.

In each, core's add runs *after* the ``patches_replace["dit"]`` entry
``("double_block"|"single_block", i)``, in place on the tensor that entry
returned. ``DiTInjection`` registers such an entry, in the call's
``transformer_options`` only and only for the slots that hold residuals; it
runs the block (or the entry registered before it, as ``original_block``),
presents the first N image tokens to the engine as a ``(B, D, h, w)`` view of
the latent's patch grid (``(B, D, N, 1)`` where ``h·w != N``), so ``layer``
and ``pixel`` (per token) granularity and the balance map work as on a UNet,
and writes the injected tokens back.

Unlike the UNet (where core adds its residuals before the patch lists run),
the feature f_e that add^inj balances against here is the block output
*without* the core ControlNets' residuals of that block: core adds them
after the replace entry returns, and no public hook lies between the two.

``MMDiT`` has no ``DIFFUSION_MODEL`` wrapper, so the latent check and
``finish`` run in an ``APPLY_MODEL`` wrapper of the call
(``comfy/model_base.py:160-165``).
"""

from __future__ import annotations

import torch

import comfy.patcher_extension

from ..families import ARCHITECTURE_TITLES, architecture_of_base, architecture_of_control
from .engine import INJECTION_KEY, WRAPPER_KEY, BalancedInjection

# family -> {slot key: (replace-patch block name, layer name)}
SLOTS = {
    "sd3": {"output": ("double_block", "joint block")},
    "flux": {"input": ("double_block", "double block"), "output": ("single_block", "single block")},
    "qwen": {"input": ("double_block", "block")},
}
FAMILY_NAMES = ARCHITECTURE_TITLES  # the family table (model_patches/families.py)


def control_family(control_model) -> str | None:
    """The DiT family of a core control model, or None for a non-DiT one (families.py)."""
    inner = getattr(control_model, "inner", None)  # RefineControl's LayerMappedControlNet
    if inner is not None and architecture_of_control(inner) == "sd3":
        return "sd3"
    return architecture_of_control(control_model)


def base_family(diffusion_model) -> str | None:
    """The family of a base diffusion model (``BaseModel.diffusion_model``), or None if unknown (families.py)."""
    return architecture_of_base(diffusion_model)


def describe_module(module) -> str:
    """Class name and width / block counts of a DiT base or ControlNet, for messages."""
    parts = [type(module).__name__]
    width = getattr(module, "hidden_size", None) or getattr(module, "inner_dim", None)
    if width:
        parts.append(f"width {width}")
    for attr, what in (("joint_blocks", "joint blocks"), ("double_blocks", "double blocks"),
                       ("single_blocks", "single blocks"), ("transformer_blocks", "blocks")):
        blocks = getattr(module, attr, None)
        if blocks is not None:
            parts.append(f"{len(blocks)} {what}")
    return ", ".join(parts)


def check_dit_control_fits(family: str, diffusion_model, control_model, label: str) -> None:
    """pre_run: a DiT ControlNet of one family on a base of another fails naming both."""
    if family == "hunyuan":
        raise ValueError(
            f"{label}: HunyuanDiT ControlNets cannot be balanced: core folds their residual into the skip input "
            f"of the block (comfy/ldm/hydit/models.py:368-375), where no patch can separate it from the skip. "
            f"Use core's Apply ControlNet for it.")
    base = base_family(diffusion_model)
    if base != family:
        raise ValueError(
            f"{label}: this is a {FAMILY_NAMES[family]} ControlNet ({describe_module(control_model)}) but the model "
            f"is {FAMILY_NAMES.get(base, type(diffusion_model).__name__)} ({describe_module(diffusion_model)}). "
            f"Load a ControlNet made for the model's family, or the checkpoint the ControlNet was made for.")


def token_grid(latent_shape, tokens: int, patch: int = 2) -> tuple[int, int]:
    """(h, w) of the latent's patch grid when it holds ``tokens`` tokens, else (tokens, 1).

    All three families patchify 2x2 with padding (``comfy/ldm/flux/model.py``
    ``process_img``, ``comfy/ldm/qwen_image/model.py:348-366``, MMDiT's
    ``PatchEmbed``); a 5-D Qwen latent has T frames stacked along h."""
    if latent_shape is not None and len(latent_shape) >= 4:
        h = -(-int(latent_shape[-2]) // patch)
        w = -(-int(latent_shape[-1]) // patch)
        t = int(latent_shape[2]) if len(latent_shape) == 5 else 1
        if t * h * w == tokens:
            return t * h, w
    return tokens, 1


def tokens_as_grid(x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, N, D) tokens as a (B, D, h, w) view (no copy)."""
    return x.transpose(1, 2).unflatten(2, grid)


def grid_as_tokens(x: torch.Tensor) -> torch.Tensor:
    """(B, D, h, w) as (B, N, D) tokens."""
    return x.flatten(2).transpose(1, 2)


def _control_text(control) -> str:
    inner = getattr(control, "inner", control)
    model = getattr(inner, "control_model", None)
    return describe_module(getattr(model, "inner", model)) if model is not None else type(control).__name__


class DiTInjection(BalancedInjection):
    """The engine after a DiT's blocks, on their image tokens."""

    site = "transformer"

    def __init__(self, settings, transformer_options: dict, family: str, rules=None, latent_shape=None,
                 model_text: str | None = None):
        super().__init__(settings, transformer_options, rules)
        if family not in SLOTS:
            raise ValueError(f"no DiT site for family {family!r}; expected one of {sorted(SLOTS)}")
        self.family = family
        self.latent_shape = tuple(latent_shape) if latent_shape is not None else None
        self.model_text = model_text
        self._slots: set[tuple[str, int]] = set()
        self._txt_len: int | None = None

    # -- registration --------------------------------------------------------
    def register(self, transformer_options: dict) -> None:
        """This injection and its APPLY_MODEL wrapper on the call's options
        (nested containers replaced, never mutated)."""
        transformer_options[INJECTION_KEY] = self
        wrappers = dict(transformer_options.get("wrappers", {}))
        by_type = dict(wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}))
        by_type[WRAPPER_KEY] = list(by_type.get(WRAPPER_KEY, [])) + [self.apply_model_wrapper]
        wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL] = by_type
        transformer_options["wrappers"] = wrappers

    def add(self, label: str, control_dict: dict, control):
        entry = super().add(label, control_dict, control)
        self._register_slots(entry)
        return entry

    def _register_slots(self, entry) -> None:
        to = self.transformer_options
        replace = dict(to.get("patches_replace", {}))
        dit = dict(replace.get("dit", {}))
        slots = SLOTS[self.family]
        for key, values in entry.lists.items():
            if key not in slots:
                if any(v is not None for v in values):
                    raise ValueError(f"{entry.label}: the control returned '{key}' residuals, which a "
                                     f"{FAMILY_NAMES[self.family]} model has no place for.")
                continue
            block, _ = slots[key]
            for i, r in enumerate(values):
                if r is None or (block, i) in self._slots:
                    continue
                self._slots.add((block, i))
                dit[(block, i)] = self._patch(block, i, dit.get((block, i)))
        if self.family == "flux" and any(b == "single_block" for b, _ in self._slots) \
                and ("double_block", 0) not in self._slots:
            # The single blocks' image tokens start after the text; learn its length at double block 0.
            self._slots.add(("double_block", 0))
            dit[("double_block", 0)] = self._patch("double_block", 0, dit.get(("double_block", 0)))
        replace["dit"] = dit
        to["patches_replace"] = replace

    def _patch(self, block: str, index: int, previous):
        """The replace entry of one block: runs the block (or the entry registered
        before ours), then injects this call's residuals of the block's slot, if any."""
        key = next((k for k, (b, _) in SLOTS[self.family].items() if b == block), None)

        def patch(args, extra):
            out = previous(args, extra) if previous is not None else extra["original_block"](args)
            if previous is not None and out.get("img") is not None:
                # Another extension's entry may keep its output (a block cache): write into a copy.
                out = {**out, "img": out["img"].clone()}
            if block == "double_block" and out.get("txt") is not None:
                self._txt_len = out["txt"].shape[1]
            if key is not None:
                out = self._inject_block(out, args, block, index, key)
            return out
        return patch

    # -- the injection -------------------------------------------------------------
    def _start(self, args: dict, block: str) -> int:
        if block != "single_block":
            return 0
        to = args.get("transformer_options") or {}
        img_slice = to.get("img_slice")  # ComfyUI 0.28 (flux/model.py B:274)
        if img_slice:
            return int(img_slice[0])
        if self._txt_len is None:
            raise RuntimeError("Flux single block reached before double block 0: the text length is unknown")
        return self._txt_len

    def _inject_block(self, out: dict, args: dict, block: str, index: int, key: str) -> dict:
        """``out`` with the injected image tokens, written in place into the
        block's output (a new tensor unless a pass-through returned its input)."""
        items = []
        for e in self.entries:
            r = e.slot(key, index)
            if r is not None:
                items.append((e, r))
        if not items:
            return out
        img = out["img"]
        if img is args.get("img"):
            img = img.clone()
            out = {**out, "img": img}
        layer = f"{SLOTS[self.family][key][1]} {index}"
        start = self._start(args, block)
        n = items[0][1].shape[1] if items[0][1].ndim == 3 else -1
        for e, r in items:
            room = img.shape[1] - start
            if (r.ndim != 3 or r.shape[1] != n or r.shape[2] != img.shape[2] or n > room
                    or r.shape[0] not in (1, img.shape[0]) or (self.family == "sd3" and n != room)):
                shapes = ", ".join(f"{x.label} {tuple(y.shape)}" for x, y in items)
                raise ValueError(
                    f"{e.label}: its residual for {FAMILY_NAMES[self.family]} {layer} does not fit: residuals "
                    f"{shapes}; the block's image tokens are {(img.shape[0], room, img.shape[2])} (batch, tokens, "
                    f"width). ControlNet: {_control_text(e.control)}"
                    f"; model: {self.model_text or 'unknown'}. The ControlNet was made for a model of another "
                    f"width or resolution handling; use one made for this model.")
        seg = img[:, start:start + n]
        grid = token_grid(self.latent_shape, n)
        feature = tokens_as_grid(seg, grid)
        res = [(e, tokens_as_grid(r, grid)) for e, r in items]
        new = self.inject_items(feature, res, layer)
        seg.copy_(grid_as_tokens(new))
        return out

    # -- around the forward ---------------------------------------------------------
    def apply_model_wrapper(self, executor, x, *args, **kwargs):
        if isinstance(x, torch.Tensor):
            self.check("latent", None, "transformer input", x, first=True)
            if self.latent_shape is None:
                self.latent_shape = tuple(x.shape)
        out = executor(x, *args, **kwargs)
        self.finish()
        return out

    def other_patches_text(self) -> str:
        dit = (self.transformer_options.get("patches_replace") or {}).get("dit", {})
        n = len(dit) - len(self._slots)
        return f"; {n} other block replace patch(es) on this model" if n > 0 else ""


def core_merge(own: dict, prev: dict | None) -> dict:
    """Core's positional merge of one control's output with the previous
    controls' (``ControlBase.control_merge``, ``comfy/controlnet.py:179-193``):
    per slot ``prev + own`` as a new tensor, in the residuals' dtype; the
    longer list's extra entries kept. ``own`` is already strength-scaled."""
    out = {k: list(own.get(k, [])) for k in ("input", "middle", "output")}
    if prev is None:
        return out
    for key in ("input", "middle", "output"):
        o = out[key]
        for i, p in enumerate(prev.get(key, [])):
            if i >= len(o):
                o.append(p)
            elif p is not None:
                o[i] = p if o[i] is None else p + o[i]
    return out


def dit_injection_for_call(transformer_options: dict, family: str, latent_shape, settings,
                           model_text: str | None = None) -> DiTInjection:
    """The call's DiT injection; the first balanced DiT control of a call creates and registers it."""
    inj = transformer_options.get(INJECTION_KEY)
    if inj is None:
        inj = DiTInjection(settings, transformer_options, family, latent_shape=latent_shape, model_text=model_text)
        inj.register(transformer_options)
    elif not isinstance(inj, DiTInjection) or inj.family != family:
        raise ValueError(f"one model call holds controls of two families ({family} and "
                         f"{getattr(inj, 'family', 'UNet')}); use ControlNets of the model's family")
    return inj
