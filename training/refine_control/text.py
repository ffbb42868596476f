"""Prompt embeddings for Refine-Control: a bounded cache and ComfyUI's stacking."""

from __future__ import annotations

from collections import OrderedDict


class TextCache:
    """(text embeddings, pooled) per prompt, encoded with ComfyUI's CLIP and
    kept on the CPU in ``dtype``; at most ``max_entries`` prompts, the least
    recently used dropped first (0 = keep none: encode on every use).

    An SD3 prompt is (1, ≥154, 4096): 2.5 MB in fp32, so an unbounded cache of
    the paper's 130k prompts (plus local prompts) would not fit in memory."""

    def __init__(self, clip, max_entries: int = 256, dtype=None):
        if max_entries < 0:
            raise ValueError(f"text cache size must be >= 0, got {max_entries}")
        self.clip = clip
        self.max_entries = max_entries
        self.dtype = dtype
        self.cache: OrderedDict = OrderedDict()
        self.encoded = 0

    def encode(self, text: str):
        import torch

        with torch.no_grad():
            cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
        self.encoded += 1
        dtype = self.dtype if self.dtype is not None else cond.dtype
        return cond.to("cpu", dtype), pooled.to("cpu", dtype)

    def __call__(self, text: str):
        hit = self.cache.get(text)
        if hit is not None:
            self.cache.move_to_end(text)
            return hit
        value = self.encode(text)
        if self.max_entries > 0:
            self.cache[text] = value
            while len(self.cache) > self.max_entries:
                self.cache.popitem(last=False)
        return value


def stack_text(conds):
    """Stack per-item text embeddings (1, Lᵢ, C) into one batch the way
    ComfyUI batches conditionings: every item repeated along the tokens to the
    least common multiple of the lengths (``comfy/conds.py``
    ``CONDCrossAttn.concat``), so each prompt keeps equal weight in attention."""
    import comfy.conds

    first, *rest = [comfy.conds.CONDCrossAttn(c) for c in conds]
    return first.concat(rest) if rest else first.cond
