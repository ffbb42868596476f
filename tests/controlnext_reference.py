"""An independent reference for ControlNeXt, for the tests.

The official state-dict keys and shapes (one line per tensor, as the released
model classes produce them), and a functional forward written from the
published architecture on the raw state dict (no nn.Module of the extension
is used), plus Cross Normalization written out from its definition.
"""

from __future__ import annotations

import math

import torch
from torch.nn import functional as F

KEYS_320 = """
time_embedding.linear_1.weight [256,128]
time_embedding.linear_1.bias [256]
time_embedding.linear_2.weight [256,256]
time_embedding.linear_2.bias [256]
embedding.0.weight [64,3,3,3]
embedding.0.bias [64]
embedding.1.weight [64]
embedding.1.bias [64]
embedding.3.weight [64,64,3,3]
embedding.3.bias [64]
embedding.4.weight [64]
embedding.4.bias [64]
embedding.6.weight [128,64,3,3]
embedding.6.bias [128]
embedding.7.weight [128]
embedding.7.bias [128]
down_res.0.norm1.weight [128]
down_res.0.norm1.bias [128]
down_res.0.conv1.weight [128,128,3,3]
down_res.0.conv1.bias [128]
down_res.0.time_emb_proj.weight [128,256]
down_res.0.time_emb_proj.bias [128]
down_res.0.norm2.weight [128]
down_res.0.norm2.bias [128]
down_res.0.conv2.weight [128,128,3,3]
down_res.0.conv2.bias [128]
down_res.1.norm1.weight [128]
down_res.1.norm1.bias [128]
down_res.1.conv1.weight [256,128,3,3]
down_res.1.conv1.bias [256]
down_res.1.time_emb_proj.weight [256,256]
down_res.1.time_emb_proj.bias [256]
down_res.1.norm2.weight [256]
down_res.1.norm2.bias [256]
down_res.1.conv2.weight [256,256,3,3]
down_res.1.conv2.bias [256]
down_res.1.conv_shortcut.weight [256,128,1,1]
down_res.1.conv_shortcut.bias [256]
down_sample.0.conv.weight [128,128,3,3]
down_sample.0.conv.bias [128]
down_sample.1.conv.weight [256,256,3,3]
down_sample.1.conv.bias [256]
mid_convs.0.0.weight [256,256,3,3]
mid_convs.0.0.bias [256]
mid_convs.0.2.weight [256]
mid_convs.0.2.bias [256]
mid_convs.0.3.weight [256,256,3,3]
mid_convs.0.3.bias [256]
mid_convs.0.4.weight [256]
mid_convs.0.4.bias [256]
mid_convs.1.weight [320,256,1,1]
mid_convs.1.bias [320]
"""

KEYS_SD15 = """
scale []
time_embedding.linear_1.weight [256,128]
time_embedding.linear_1.bias [256]
time_embedding.linear_2.weight [256,256]
time_embedding.linear_2.bias [256]
down_res.0.norm1.weight [3]
down_res.0.norm1.bias [3]
down_res.0.conv1.weight [128,3,3,3]
down_res.0.conv1.bias [128]
down_res.0.time_emb_proj.weight [128,256]
down_res.0.time_emb_proj.bias [128]
down_res.0.norm2.weight [128]
down_res.0.norm2.bias [128]
down_res.0.conv2.weight [128,128,3,3]
down_res.0.conv2.bias [128]
down_res.0.conv_shortcut.weight [128,3,1,1]
down_res.0.conv_shortcut.bias [128]
down_res.1.norm1.weight [128]
down_res.1.norm1.bias [128]
down_res.1.conv1.weight [256,128,3,3]
down_res.1.conv1.bias [256]
down_res.1.time_emb_proj.weight [256,256]
down_res.1.time_emb_proj.bias [256]
down_res.1.norm2.weight [256]
down_res.1.norm2.bias [256]
down_res.1.conv2.weight [256,256,3,3]
down_res.1.conv2.bias [256]
down_res.1.conv_shortcut.weight [256,128,1,1]
down_res.1.conv_shortcut.bias [256]
down_res.2.norm1.weight [256]
down_res.2.norm1.bias [256]
down_res.2.conv1.weight [256,256,3,3]
down_res.2.conv1.bias [256]
down_res.2.time_emb_proj.weight [256,256]
down_res.2.time_emb_proj.bias [256]
down_res.2.norm2.weight [256]
down_res.2.norm2.bias [256]
down_res.2.conv2.weight [256,256,3,3]
down_res.2.conv2.bias [256]
down_sample.0.conv.weight [128,128,3,3]
down_sample.0.conv.bias [128]
down_sample.1.conv.weight [256,256,3,3]
down_sample.1.conv.bias [256]
down_sample.2.conv.weight [256,256,3,3]
down_sample.2.conv.bias [256]
mid_convs.0.0.weight [256,256,3,3]
mid_convs.0.0.bias [256]
mid_convs.0.2.weight [256,256,3,3]
mid_convs.0.2.bias [256]
mid_convs.1.weight [1280,256,1,1]
mid_convs.1.bias [1280]
"""

KEYS_SVD_V1 = """
scale []
time_embedding.linear_1.weight [256,128]
time_embedding.linear_1.bias [256]
time_embedding.linear_2.weight [256,256]
time_embedding.linear_2.bias [256]
embedding.0.weight [64,3,3,3]
embedding.0.bias [64]
embedding.1.weight [64]
embedding.1.bias [64]
embedding.3.weight [64,64,3,3]
embedding.3.bias [64]
embedding.4.weight [64]
embedding.4.bias [64]
embedding.6.weight [128,64,3,3]
embedding.6.bias [128]
embedding.7.weight [128]
embedding.7.bias [128]
down_res.0.norm1.weight [128]
down_res.0.norm1.bias [128]
down_res.0.conv1.weight [128,128,3,3]
down_res.0.conv1.bias [128]
down_res.0.time_emb_proj.weight [128,256]
down_res.0.time_emb_proj.bias [128]
down_res.0.norm2.weight [128]
down_res.0.norm2.bias [128]
down_res.0.conv2.weight [128,128,3,3]
down_res.0.conv2.bias [128]
down_res.1.norm1.weight [128]
down_res.1.norm1.bias [128]
down_res.1.conv1.weight [256,128,3,3]
down_res.1.conv1.bias [256]
down_res.1.time_emb_proj.weight [256,256]
down_res.1.time_emb_proj.bias [256]
down_res.1.norm2.weight [256]
down_res.1.norm2.bias [256]
down_res.1.conv2.weight [256,256,3,3]
down_res.1.conv2.bias [256]
down_res.1.conv_shortcut.weight [256,128,1,1]
down_res.1.conv_shortcut.bias [256]
down_res.2.norm1.weight [256]
down_res.2.norm1.bias [256]
down_res.2.conv1.weight [256,256,3,3]
down_res.2.conv1.bias [256]
down_res.2.time_emb_proj.weight [256,256]
down_res.2.time_emb_proj.bias [256]
down_res.2.norm2.weight [256]
down_res.2.norm2.bias [256]
down_res.2.conv2.weight [256,256,3,3]
down_res.2.conv2.bias [256]
down_sample.0.conv.weight [128,128,3,3]
down_sample.0.conv.bias [128]
down_sample.1.conv.weight [256,256,3,3]
down_sample.1.conv.bias [256]
down_sample.2.conv.weight [256,256,3,3]
down_sample.2.conv.bias [256]
mid_convs.0.0.weight [256,256,3,3]
mid_convs.0.0.bias [256]
mid_convs.0.2.weight [256]
mid_convs.0.2.bias [256]
mid_convs.0.3.weight [256,256,3,3]
mid_convs.0.3.bias [256]
mid_convs.0.4.weight [256]
mid_convs.0.4.bias [256]
mid_convs.1.weight [1280,256,1,1]
mid_convs.1.bias [1280]
"""

# The first SDXL module (commit d1d16da) has the SVD v1 keys without ``scale``.
KEYS_SDXL_EARLY = "\n".join(line for line in KEYS_SVD_V1.splitlines() if not line.startswith("scale "))

OFFICIAL_KEYS = {"320": KEYS_320, "sd15": KEYS_SD15, "svd_v1": KEYS_SVD_V1, "sdxl_early": KEYS_SDXL_EARLY}
OFFICIAL_PARAMS = {"320": 3_526_400, "sd15": 5_352_327, "svd_v1": 5_610_177, "sdxl_early": 5_610_176}


def official_shapes(layout: str) -> dict[str, tuple[int, ...]]:
    out = {}
    for line in OFFICIAL_KEYS[layout].strip().splitlines():
        name, shape = line.split()
        out[name] = tuple(int(s) for s in shape.strip("[]").split(",") if s)
    return out


def synthetic_state_dict(layout: str, seed: int = 0, dtype=torch.float32) -> dict[str, torch.Tensor]:
    """Random tensors with the official keys and shapes. Norm weights are
    around 1 and biases non-zero, so every parameter matters."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in official_shapes(layout).items():
        if name == "scale":
            t = torch.tensor(0.7)
        elif len(shape) == 1 and name.endswith(".weight"):  # GroupNorm weights
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) == 1:
            t = 0.05 * torch.randn(shape, generator=g)
        else:
            fan_in = math.prod(shape[1:])
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        sd[name] = t.to(dtype)
    return sd


# -- golden inputs and sketches (tests/goldens/controlnext/make_goldens.py and test_controlnext_goldens.py) --

GOLDEN_SEED = 7
GOLDEN_PIXELS = 48  # control image size; latents are 48 / 8 (48: SVD v1 still ends at 2x2)
GOLDEN_FRAMES = 2
GOLDEN_SVD_SIGMA = 3.0
GOLDEN_SD_TIMESTEP = 500
GOLDEN_MODULE_SEED = {"sdxl": 101, "sd15_training": 102, "sd15": 103, "svd_v2": 104, "svd_v1": 105, "sdxl_early": 106}
SKETCH_WIDTH = 8


def golden_image(variant: str) -> torch.Tensor:
    """The control images (F or 1, 3, 48, 48) in [0, 1] the goldens were made with."""
    n = GOLDEN_FRAMES if variant.startswith("svd") else 1
    return torch.rand(n, 3, GOLDEN_PIXELS, GOLDEN_PIXELS, generator=torch.Generator().manual_seed(GOLDEN_SEED + 1))


def golden_feature(variant: str, shape) -> torch.Tensor:
    """The UNet feature just before the injection (rows, C, H, W): the goldens' official UNet had
    its output there replaced by this tensor (mean 0.5, std 2, so Cross Normalization's
    statistics are not trivial), so the test can rebuild it."""
    g = torch.Generator().manual_seed(GOLDEN_MODULE_SEED[variant] + 1000)
    return 0.5 + 2.0 * torch.randn(tuple(shape), generator=g)


def sketch(x: torch.Tensor, seed: int) -> dict[str, torch.Tensor]:
    """A small exact summary of a (rows, C, *spatial) tensor, in float64, linear in x:

    * ``positions`` (rows, P, SKETCH_WIDTH): at every row and position, the C channels
      projected on ``SKETCH_WIDTH`` seeded Gaussian directions (scaled by 1/sqrt(C));
    * ``channels`` (rows, C): at every row and channel, the P positions projected on one
      seeded Gaussian direction (scaled by 1/sqrt(P)).

    An error spread over the tensor moves the entries by about its RMS; an error in one
    element moves its channel's entry by about δ/sqrt(P) and its position's entries by
    about δ/sqrt(C), so the ``channels`` part is what sees a single wrong channel."""
    x = x.double().flatten(2)                          # (rows, C, P)
    c, n = x.shape[1], x.shape[2]
    g = torch.Generator().manual_seed(seed)
    rc = torch.randn(c, SKETCH_WIDTH, generator=g, dtype=torch.float64) / math.sqrt(c)
    rp = torch.randn(n, generator=g, dtype=torch.float64) / math.sqrt(n)
    return {"positions": torch.einsum("bcp,ck->bpk", x, rc), "channels": torch.einsum("bcp,p->bc", x, rp)}


# -- functional reference forward --------------------------------------------------------------

# (stem padding of the 2nd/3rd convs or None, stage groups, mid with GN+residual, max-pool)
REFERENCE_LAYOUTS = {
    "sdxl": (1, (4, 8), True, False),
    "sd15_training": (1, (4, 8), True, False),
    "svd_v2": (0, (4, 8), True, False),
    "sd15": (None, (1, 8, 8), False, False),
    "svd_v1": (0, (4, 8, 8), True, True),
    "sdxl_early": (0, (4, 8, 8), True, True),
}


def _timestep_features(t: torch.Tensor) -> torch.Tensor:
    # Timesteps(128, flip_sin_to_cos=True, downscale_freq_shift=0)
    freqs = torch.tensor([10000.0 ** (-k / 64.0) for k in range(64)], dtype=torch.float64)
    a = t.to(torch.float64)[:, None] * freqs[None]
    return torch.cat([a.cos(), a.sin()], dim=1).to(torch.float32)


def _resnet(sd, p, x, temb, groups):
    h = F.group_norm(x, groups, sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
    h = F.conv2d(F.silu(h), sd[p + "conv1.weight"], sd[p + "conv1.bias"], padding=1)
    h = h + F.linear(F.silu(temb), sd[p + "time_emb_proj.weight"], sd[p + "time_emb_proj.bias"])[..., None, None]
    h = F.group_norm(h, groups, sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
    h = F.conv2d(F.silu(h), sd[p + "conv2.weight"], sd[p + "conv2.bias"], padding=1)
    if p + "conv_shortcut.weight" in sd:
        x = F.conv2d(x, sd[p + "conv_shortcut.weight"], sd[p + "conv_shortcut.bias"])
    return x + h


def reference_module(sd: dict, variant: str, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    sd = {k: v.to(torch.float32) for k, v in sd.items()}
    stem_pad, groups, mid_gn, maxpool = REFERENCE_LAYOUTS[variant]
    t = _timestep_features(timesteps)
    temb = F.linear(F.silu(F.linear(t, sd["time_embedding.linear_1.weight"], sd["time_embedding.linear_1.bias"])),
                    sd["time_embedding.linear_2.weight"], sd["time_embedding.linear_2.bias"])
    x = image
    if stem_pad is not None:
        for i, (idx, stride, pad) in enumerate([(0, 2, 1), (3, 1, stem_pad), (6, 1, stem_pad)]):
            x = F.conv2d(x, sd[f"embedding.{idx}.weight"], sd[f"embedding.{idx}.bias"], stride=stride, padding=pad)
            x = F.relu(F.group_norm(x, 2, sd[f"embedding.{idx + 1}.weight"], sd[f"embedding.{idx + 1}.bias"]))
        if maxpool:
            x = F.max_pool2d(x, 2, 2)
    for i, g in enumerate(groups):
        x = _resnet(sd, f"down_res.{i}.", x, temb, g)
        x = F.conv2d(x, sd[f"down_sample.{i}.conv.weight"], sd[f"down_sample.{i}.conv.bias"], stride=2, padding=1)
    if mid_gn:
        y = F.relu(F.conv2d(x, sd["mid_convs.0.0.weight"], sd["mid_convs.0.0.bias"], padding=1))
        y = F.group_norm(y, 8, sd["mid_convs.0.2.weight"], sd["mid_convs.0.2.bias"])
        y = F.conv2d(y, sd["mid_convs.0.3.weight"], sd["mid_convs.0.3.bias"], padding=1)
        y = F.group_norm(y, 8, sd["mid_convs.0.4.weight"], sd["mid_convs.0.4.bias"])
        x = x + y
    else:
        x = F.relu(F.conv2d(x, sd["mid_convs.0.0.weight"], sd["mid_convs.0.0.bias"], padding=1))
        x = F.conv2d(x, sd["mid_convs.0.2.weight"], sd["mid_convs.0.2.bias"], padding=1)
    return F.conv2d(x, sd["mid_convs.1.weight"], sd["mid_convs.1.bias"])


REFERENCE_INJECTION = {
    # eps, statistics before pooling, fixed scale, scale rule, uncond rows under CFG
    "sdxl": (1e-12, True, 1.0, None, "apply"),
    "sd15_training": (1e-12, False, 1.0, None, "apply"),
    "svd_v2": (1e-5, True, 0.2, None, "zero"),
    "sd15": (1e-12, False, 1.0, "learned", "apply"),
    # the official pipeline zeroes the raw scale of the uncond half, the UNet then takes sigmoid(scale)·1.3
    "svd_v1": (1e-5, True, 1.0, "sigmoid", "raw scale zeroed"),
    "sdxl_early": (1e-12, False, 1.0, None, "apply"),
}


def _row_stats(x):
    n = x[0].numel()
    flat = x.reshape(x.shape[0], -1).to(torch.float64)
    mean = flat.sum(1) / n
    std = (((flat - mean[:, None]) ** 2).sum(1) / (n - 1)).sqrt()
    return mean.view(-1, 1, 1, 1), std.view(-1, 1, 1, 1)


def reference_scale(variant: str, sd: dict, strength: float, uncond: bool = False) -> float:
    """The scale of a cond row, or of an uncond row of a CFG batch."""
    _, _, fixed, rule, uncond_rule = REFERENCE_INJECTION[variant]
    if uncond and uncond_rule == "zero":
        return 0.0
    raw = 0.0 if uncond and uncond_rule == "raw scale zeroed" else float(sd.get("scale", torch.tensor(1.0)))
    s = strength * fixed
    if rule == "learned":
        s *= raw
    elif rule == "sigmoid":
        s *= 1.3 / (1.0 + math.exp(-raw))
    return s


def reference_injection(variant: str, sd: dict, h: torch.Tensor, control: torch.Tensor, strength: float,
                        uncond_rows: int = 0):
    """h + s·Pool(CrossNorm(control)) (or CrossNorm(Pool(control))), per row;
    the first ``uncond_rows`` rows take the uncond scale."""
    eps, before_pool = REFERENCE_INJECTION[variant][:2]
    s = torch.full((h.shape[0], 1, 1, 1), reference_scale(variant, sd, strength), dtype=torch.float64)
    s[:uncond_rows] = reference_scale(variant, sd, strength, uncond=True)
    c = control.to(torch.float64)
    if not before_pool:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    mh, sh = _row_stats(h)
    mc, sc = _row_stats(c)
    c = (c - mc) * (sh / (sc + eps)) + mh
    if before_pool:
        c = F.adaptive_avg_pool2d(c, h.shape[-2:])
    return (h.to(torch.float64) + s * c).to(h.dtype)
