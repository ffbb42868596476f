"""Validation samples: the weights being trained, sampled through the node path.

MIControlNet runs: the ControlNet goes through ComfyUI's own ControlNet loader
(as the exported file would) and the MIControlNetApply node. ControlNeXt
runs: the control module goes through ``ControlNeXtWeights`` and the
ControlNeXtApply code path. Both then sample with ComfyUI's sampler, so a
validation image is what a user of the nodes would get at that step. Each
image is the condition beside the sample, ``OUTPUT/validation/step-N.png``; with several prompt/image
pairs (``--validation-prompt``/``--validation-image`` repeated) pair k is
``step-N-k.png``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import engine


def pairs(args) -> list[tuple[str | None, str | None]]:
    """The run's (prompt, image) validation pairs, None = the first sample's."""
    from .conventions import validation_pairs

    return validation_pairs(getattr(args, "validation_prompt", None), getattr(args, "validation_image", None))


def _condition_image(trainer, index: int = 0) -> tuple[torch.Tensor, str]:
    from . import data

    a = trainer.args
    rec = trainer.records[0]
    prompt, image_file = pairs(a)[index]
    prompt = prompt if prompt is not None else rec.prompt
    if image_file:
        cond = data.load_rgb(Path(image_file), a.resolution)
    elif a.condition == "canny":
        cond = data.canny(data.load_rgb(rec.image, a.resolution), a.canny_low, a.canny_high)
    else:
        cond = data.load_rgb(rec.condition, a.resolution)
    return torch.from_numpy(cond.copy()).float().unsqueeze(0) / 255.0, prompt


def _encode(base, text: str) -> list:
    cond, pooled = base.clip.encode_from_tokens(base.clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


@torch.no_grad()
def _sample_and_save(trainer, patcher, positive, negative, image: torch.Tensor, step: int,
                     suffix: str = "") -> Path:
    import comfy.sample

    a, base = trainer.args, trainer.base
    h = a.resolution // 8
    latent = torch.zeros(1, base.model.latent_format.latent_channels, h, h)
    noise = comfy.sample.prepare_noise(latent, a.seed)
    with engine.autocast_context(trainer.dist.device, a.mixed_precision):
        samples = comfy.sample.sample(patcher, noise, a.validation_steps, a.validation_cfg, "euler", "normal",
                                      positive, negative, latent, seed=a.seed, disable_pbar=True)
        decoded = base.vae.decode(samples.float())
    # ComfyUI may have moved the UNet while sampling; training continues on the run's device.
    base.unet.to(trainer.dist.device)
    row = torch.cat([image[0], decoded[0].float().cpu().clamp(0, 1)], dim=1)
    out = Path(a.output) / "validation" / f"step-{step:08d}{suffix}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((row.numpy() * 255).round().astype(np.uint8)).save(out)
    return out


def _each_pair(trainer, step: int, sample_one) -> list[Path]:
    """``sample_one(image, prompt, suffix)`` for every validation pair."""
    n = len(pairs(trainer.args))
    return [sample_one(*_condition_image(trainer, k), "" if n == 1 else f"-{k}") for k in range(n)]


@torch.no_grad()
def sample_micontrolnet(trainer, step: int) -> list[Path]:
    import comfy.controlnet

    from .runtime import nodes

    MIControlNetApply, MIControlNetSettings = nodes().micontrolnet.MIControlNetApply, nodes().micontrolnet.MIControlNetSettings

    a, base = trainer.args, trainer.base
    sd = {k: v.detach().to("cpu", torch.float32).clone() for k, v in trainer.cnet_module.state_dict().items()}
    control_net = comfy.controlnet.load_controlnet_state_dict(sd)
    patcher = MIControlNetSettings.execute(base.patcher, "micontrolnet", a.granularity, a.max_lambda, False,
                                         lambda_convention=a.lambda_convention).args[0]

    def one(image, prompt, suffix):
        positive, negative = MIControlNetApply.execute(_encode(base, prompt), _encode(base, ""), control_net, image,
                                                       1.0, 0.0, 1.0, None, None).args
        return _sample_and_save(trainer, patcher, positive, negative, image, step, suffix)

    return _each_pair(trainer, step, one)


@torch.no_grad()
def sample_controlnext(trainer, step: int) -> list[Path]:
    from model_patches import controlnext as cx

    a, base = trainer.args, trainer.base
    module_sd = {k: v.detach().to("cpu", torch.float32).clone()
                 for k, v in trainer.cnet_module.control.state_dict().items()}
    # The UNet subset is trained in place: the base model already holds it, so
    # only the module is handed over (a UNet file here would apply it twice).
    weights = cx.ControlNeXtWeights(module_sd, f"validation module at step {step}")

    def one(image, prompt, suffix):
        patcher = cx.apply_controlnext(base.patcher, weights, image, a.strength, label="validation")
        return _sample_and_save(trainer, patcher, _encode(base, prompt), _encode(base, ""), image, step, suffix)

    return _each_pair(trainer, step, one)
