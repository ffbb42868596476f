"""Shared fixtures: the real ComfyUI runtime, in-process and as a server.

Everything here runs ComfyUI's own code (the tree scripts/bootstrap.sh
fetched, or $COMFYUI_PATH): models are built with comfy.supported_models and
loaded with comfy's loaders; servers are ComfyUI's main.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from headless.runtime import cache_dir, import_extension  # noqa: E402

# Import ComfyUI (with --cpu on machines without CUDA) before any test module
# imports comfy; model_patches is then importable by its own name, and the
# extension (for its node classes) is loaded as the package "balanced_control".
import_extension()


def model_cache_dir() -> Path:
    d = cache_dir() / "test-models"
    d.mkdir(parents=True, exist_ok=True)
    return d


def cached_model(name: str, build, *key) -> Path:
    """Build a synthetic model file once per (name, key, builder source) and reuse it."""
    import inspect
    import headless.synthetic as synthetic

    digest = hashlib.sha256(json.dumps([name, key], sort_keys=True, default=str).encode()
                            + inspect.getsource(synthetic).encode()).hexdigest()[:12]
    path = model_cache_dir() / f"{Path(name).stem}-{digest}{Path(name).suffix}"
    if not path.exists():
        # Build under a private name and rename: several test processes may share one cache.
        partial = path.with_name(f"{path.stem}.partial-{os.getpid()}{path.suffix}")
        try:
            build(partial)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    return path


def assert_same_up_to_fp32_order(actual, expected, rel: float = 2e-5) -> None:
    """Assert two float32 results of the same computation agree up to accumulation order.

    A batched call and per-row calls run different BLAS kernels, whose sums differ in
    order; the error scales with the output's magnitude, not with each element's (an
    element near zero can differ by more than a fixed atol while the output is exact to
    about 1e-6 of its scale). So the bound is ``rel`` times the largest expected value:
    2e-5 is ~6x the worst seen on CI hardware (3.3e-6), and far below any real
    difference between rows (cond/uncond mixing, a dropped control), which is O(1e-2) or more.
    """
    assert actual.shape == expected.shape, f"shapes differ: {tuple(actual.shape)} vs {tuple(expected.shape)}"
    scale = float(expected.abs().max())
    err = float((actual - expected).abs().max())
    assert err <= rel * scale, f"max |difference| {err:.3g} exceeds {rel:g} x output scale {scale:.3g}"


def give_nonzero_outputs(cnet, seed: int = 5) -> None:
    """Make a fresh (zero-output) ControlNet a stand-in for a trained one: random zero convs,
    middle output and last hint conv, so its residuals are non-zero."""
    import torch

    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for zc in list(cnet.zero_convs) + [cnet.middle_block_out]:
            for p in zc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        last = [m for m in cnet.input_hint_block.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last.weight.copy_(torch.randn(last.weight.shape, generator=g) * 0.05)


@pytest.fixture(scope="session")
def small_sd15_files():
    """A small SD1.5-family checkpoint (detected as SD15 by ComfyUI) and two ControlNets for it."""
    from headless import synthetic as s

    ckpt = cached_model("small-sd15.safetensors", lambda p: s.write_sd15_checkpoint(p, s.SD15_UNET_SMALL), "ckpt")
    cn_a = cached_model("small-cn-a.safetensors", lambda p: s.write_controlnet(p, s.SD15_UNET_SMALL, seed=11), "a")
    cn_b = cached_model("small-cn-b.safetensors", lambda p: s.write_controlnet(p, s.SD15_UNET_SMALL, seed=12), "b")
    return {"checkpoint": ckpt, "controlnets": [cn_a, cn_b]}
