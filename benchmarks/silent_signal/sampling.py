"""The two-condition protocol, sampled through the nodes' code path.

Each variant is a list of (ControlNet, condition, strength) attached with
``MIControlNetApply`` and a mode set with ``MIControlNetSettings`` (the
``model_patches`` path the nodes run), then ComfyUI's sampler. Every variant
of one (seed, pairing) starts from the same noise (``comfy.sample.prepare_noise``
with the same seed), so differences between variants are paired; the noise's
digest is returned with each sample to make that checkable.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

GAINS = (0.5, 0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class Variant:
    name: str
    nets: str                  # which trained ControlNets: plain, plain_reb, inj_as_written, ...
    mode: str = "vanilla"
    granularity: str = "layer"
    lambda_convention: str = "as_written"
    strength: float = 1.0
    which: str = "both"        # both | left | right (one control only: the unsuppressed reference)
    group: str = ""            # "gain" for the gain sweep of the plain sum


def variants(with_stage2: bool) -> list[Variant]:
    v = [Variant(f"sum x{g:g}", "plain", strength=g, group="gain") for g in GAINS]
    v += [Variant("left control alone", "plain", which="left"), Variant("right control alone", "plain", which="right")]
    v += [Variant("ControlNet* layer", "plain", "controlnet_star", "layer"),
          Variant("ControlNet* position", "plain", "controlnet_star", "pixel"),
          Variant("sum, rebalanced nets", "plain_reb")]
    for conv, short in (("as_written", "as_written"), ("mgda_weight_of_control", "mgda")):
        for gran, gname in (("layer", "layer"), ("pixel", "position")):
            v.append(Variant(f"MIControlNet {short} {gname}", f"inj_{conv}", "micontrolnet", gran, conv))
    if with_stage2:
        v.append(Variant("MIControlNet mgda layer, stage 2", "inj_mgda_weight_of_control_s2", "micontrolnet",
                         "layer", "mgda_weight_of_control"))
    return v


def half_conditions(left_cond: np.ndarray, right_cond: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The protocol's inputs: the first control sees only its condition's left
    half, the second only its right half; the other half is black (silent)."""
    w = left_cond.shape[2]
    a, b = left_cond.copy(), right_cond.copy()
    a[:, :, w // 2:] = 0
    b[:, :, : w // 2] = 0
    return torch.from_numpy(a), torch.from_numpy(b)


def noise_digest(noise: torch.Tensor) -> str:
    return hashlib.sha256(noise.contiguous().numpy().tobytes()).hexdigest()[:16]


@torch.no_grad()
def sample_variant(base, patcher, controls: list, variant: Variant, steps: int, seed: int,
                   latent_shape: tuple, max_lambda: float = 20.0) -> tuple[torch.Tensor, str]:
    """(grayscale images (B, S, S), noise digest). ``controls`` = [(comfy ControlNet, hint (B,S,S,3))]
    for the left and right control."""
    import comfy.sample

    from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings

    from training.pixel_space import unfold

    pos, neg = base.conditioning(), base.conditioning()
    chosen = {"both": controls, "left": controls[:1], "right": controls[1:]}[variant.which]
    for cn, hint in chosen:
        pos, neg = MIControlNetApply.execute(pos, neg, cn, hint, variant.strength, 0.0, 1.0, None, None).args
    model = MIControlNetSettings.execute(patcher, variant.mode, variant.granularity, max_lambda, False,
                                         lambda_convention=variant.lambda_convention).args[0]
    latent = torch.zeros(latent_shape)
    noise = comfy.sample.prepare_noise(latent, seed)
    out = comfy.sample.sample(model, noise, steps, 1.0, "euler", "normal", pos, neg, latent, seed=seed,
                              disable_pbar=True)
    return unfold(out.cpu()), noise_digest(noise)


@dataclass
class PairSamples:
    """All variants of one (network seed, pairing), from one noise."""
    seed: int
    pairing: str                                   # e.g. "canny|regions": left kind | right kind
    images: dict = field(default_factory=dict)     # variant name -> (B, S, S) numpy
    noise: dict = field(default_factory=dict)      # variant name -> noise digest
