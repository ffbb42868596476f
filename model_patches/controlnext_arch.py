"""ControlNeXt control modules, pure torch.

Written from the published architecture (Peng et al., "ControlNeXt",
arXiv 2408.06070, and the released model classes' configurations). The
parameter names reproduce the official state-dict keys, so the released files
load with ``load_state_dict(strict=True)``.

Four module layouts exist (one ``ModuleConfig`` each):

* ``CONFIG_320``: stem + 2 ResNet stages, 320-channel output
  (SDXL, SD1.5-Training, SVD-v2; 52 tensors). SVD-v2's stem has unpadded
  second and third convolutions.
* ``CONFIG_SD15``: no stem, 3 ResNet stages from full pixel resolution,
  1280-channel output and a learned ``scale`` (SD1.5 released; 51 tensors).
* ``CONFIG_SVD_V1``: unpadded stem with a max-pool, 3 stages, 1280-channel
  output and a learned ``scale`` (SVD v1; 65 tensors).
* ``CONFIG_SDXL_EARLY``: the SVD v1 layout without ``scale`` (the first SDXL
  module, before 2024-08-10; 64 tensors).

All operations act on each batch row independently (GroupNorm is per sample),
so running the module on a subset of rows gives exactly those rows of a full
run: that is what lets the injection evaluate it once per distinct
(hint, timestep).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn
from torch.nn import functional as F

TIME_PROJ_DIM = 128
TIME_EMBED_DIM = 256


def sinusoidal_timestep_embedding(timesteps: torch.Tensor, dim: int = TIME_PROJ_DIM) -> torch.Tensor:
    """diffusers ``Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=0)``.

    Frequencies ``exp(-ln(10000) * k / (dim/2))`` for k < dim/2; the result is
    ``[cos, sin]`` (the flip), in fp32.
    """
    half = dim // 2
    k = torch.arange(half, dtype=torch.float32, device=timesteps.device)
    freqs = torch.exp(-math.log(10000.0) * k / half)
    angles = timesteps.to(torch.float32)[:, None] * freqs[None, :]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Linear -> SiLU -> Linear (diffusers ``TimestepEmbedding``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock2D(nn.Module):
    """Pre-norm residual block with a time-embedding bias (diffusers defaults:
    GroupNorm eps 1e-6, SiLU, output scale 1, 1x1 shortcut only when the
    channel count changes)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, temb_channels: int = TIME_EMBED_DIM):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        shortcut = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        return shortcut + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution; the weights live under ``.conv`` like diffusers'."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


@dataclasses.dataclass(frozen=True)
class ModuleConfig:
    name: str
    # None: no stem; "padded": 3 padded convs; "unpadded": the 2nd and 3rd
    # convs without padding (SVD-v2); "unpadded_maxpool": the same plus a 2x2 max-pool (SVD v1).
    stem: str | None
    in_channels: tuple[int, ...]
    out_channels: tuple[int, ...]
    groups: tuple[int, ...]
    # mid_convs[0]: conv-ReLU-GN-conv-GN with a residual (True) or conv-ReLU-conv without one.
    mid_norm_residual: bool
    final_channels: int
    learned_scale: bool


CONFIG_320 = ModuleConfig("320", "padded", (128, 128), (128, 256), (4, 8), True, 320, False)
CONFIG_320_SVD = dataclasses.replace(CONFIG_320, name="320-svd", stem="unpadded")
CONFIG_SD15 = ModuleConfig("sd15", None, (3, 128, 256), (128, 256, 256), (1, 8, 8), False, 1280, True)
CONFIG_SVD_V1 = ModuleConfig("svd-v1", "unpadded_maxpool", (128, 128, 256), (128, 256, 256), (4, 8, 8), True, 1280, True)
# The first SDXL module (ControlNeXt-SDXL/models/controlnet.py at commit d1d16da, L355-437): the SVD v1
# layout with a plain ``scale = 1`` instead of a learned one (64 tensors).
CONFIG_SDXL_EARLY = dataclasses.replace(CONFIG_SVD_V1, name="sdxl-early", learned_scale=False)


def _stem(kind: str) -> nn.Sequential:
    pad = 1 if kind == "padded" else 0
    layers = [
        nn.Conv2d(3, 64, 3, stride=2, padding=1), nn.GroupNorm(2, 64), nn.ReLU(),
        nn.Conv2d(64, 64, 3, padding=pad), nn.GroupNorm(2, 64), nn.ReLU(),
        nn.Conv2d(64, 128, 3, padding=pad), nn.GroupNorm(2, 128), nn.ReLU(),
    ]
    if kind == "unpadded_maxpool":
        layers.append(nn.MaxPool2d(2, 2))
    return nn.Sequential(*layers)


class ControlNeXtModule(nn.Module):
    """The control module: (B, 3, H, W) image in [0, 1] and (B,) timesteps ->
    (B, final_channels, h, w) control feature.

    ``scale`` (a 0-dim parameter) exists only in the layouts that learned it.
    """

    def __init__(self, config: ModuleConfig):
        super().__init__()
        self.config = config
        self.time_embedding = TimestepEmbedding(TIME_PROJ_DIM, TIME_EMBED_DIM)
        if config.stem is not None:
            self.embedding = _stem(config.stem)
        else:
            self.embedding = None
        self.down_res = nn.ModuleList(
            ResnetBlock2D(i, o, g) for i, o, g in zip(config.in_channels, config.out_channels, config.groups)
        )
        self.down_sample = nn.ModuleList(Downsample2D(o) for o in config.out_channels)
        c = config.out_channels[-1]
        if config.mid_norm_residual:
            mid0 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.GroupNorm(8, c),
                                 nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(8, c))
        else:
            mid0 = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.mid_convs = nn.ModuleList([mid0, nn.Conv2d(c, config.final_channels, 1)])
        if config.learned_scale:
            self.scale = nn.Parameter(torch.tensor(1.0))
        else:
            self.scale = None

    @property
    def dtype(self) -> torch.dtype:
        return self.time_embedding.linear_1.weight.dtype

    def forward(self, image: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        temb = self.time_embedding(sinusoidal_timestep_embedding(timesteps).to(image.dtype))
        x = self.embedding(image) if self.embedding is not None else image
        for res, down in zip(self.down_res, self.down_sample):
            x = down(res(x, temb))
        if self.config.mid_norm_residual:
            x = self.mid_convs[0](x) + x
        else:
            x = self.mid_convs[0](x)
        return self.mid_convs[1](x)


def cross_normalize(h: torch.Tensor, control: torch.Tensor, eps: float, normalize_before_pool: bool) -> torch.Tensor:
    """Cross Normalization: ``control`` re-scaled per sample to the mean and
    (unbiased) standard deviation of ``h`` over C, H, W, and average-pooled to
    ``h``'s spatial size, in the variant's order. eps is added to the
    control's std only. Computed in fp32; returns fp32.
    """
    hf = h.to(torch.float32)
    c = control.to(torch.float32)
    if not normalize_before_pool:
        c = F.adaptive_avg_pool2d(c, hf.shape[-2:])
    dims = tuple(range(1, hf.ndim))
    mean_h = hf.mean(dim=dims, keepdim=True)
    std_h = hf.std(dim=dims, keepdim=True)
    mean_c = c.mean(dim=dims, keepdim=True)
    std_c = c.std(dim=dims, keepdim=True)
    c = (c - mean_c) * (std_h / (std_c + eps)) + mean_h
    if normalize_before_pool:
        c = F.adaptive_avg_pool2d(c, hf.shape[-2:])
    return c
