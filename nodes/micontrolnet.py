"""MIControlNet nodes: balanced multi-ControlNet sampling (add^com / add^inj).

Thin V3 schemas; the logic lives in ``model_patches.mi_control``.
"""

from __future__ import annotations

import comfy.controlnet
from comfy_api.latest import io

from model_patches.balance import GRANULARITIES, LAMBDA_CONVENTION_DESCRIPTIONS, LAMBDA_CONVENTIONS
from model_patches.balance_map import render_balance_map
from model_patches.inputs import check_image, check_percent_range
from model_patches.masks import normalise_mask
from model_patches.mi_control import (
    MODE_DESCRIPTIONS,
    MODES,
    SETTINGS_KEY,
    STRENGTH_SCALING_DESCRIPTIONS,
    STRENGTH_SCALINGS,
    MinimalImpactControl,
    explain_missing_record,
    find_balance_record,
    settings_dict,
)
from .common import attach_controls, node_label

CATEGORY = "conditioning/controlnet/balanced"

# Figures and their derivation: README.md, section Strength.
STRENGTH_TOOLTIP = (
    "Scales this control's residuals. With the default strength_scaling 'paper' the effect is strongly "
    "non-linear: under add^com the strength also moves the weights (control A's weight 0.21 / 0.50 / 0.80 at "
    "strength 0.5 / 1 / 2 against B at 1), and under add^inj (default lambda_convention 'as_written') "
    "λ ≈ ‖f_c‖²/‖f_e‖², so a single control's injected term grows about with the cube of its strength until "
    "λ reaches max_lambda ('mgda_weight_of_control' inverts this: λ ≈ ‖f_e‖²/‖f_c‖²). "
    "strength_scaling 'linear' (MIControlNetSettings) makes the injected term proportional to the strength."
)


class MIControlNetApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MIControlNetApply",
            display_name="Apply ControlNet (Minimal Impact)",
            category=CATEGORY,
            description=(
                "Apply a ControlNet whose residuals are balanced with the other minimal-impact controls "
                "on the same conditioning: combined per layer with add^com and injected into the UNet "
                "with add^inj (MIControlNet), so the silent parts of one control do not suppress another. "
                "Core ControlNets in the same chain keep their plain sum, and they are part of the UNet "
                "feature f_e that add^inj balances against: λ is about 1 for a control alone, about 0.5 beside "
                "an unrelated core ControlNet, and about 0.02 when the same ControlNet is also applied "
                "through core. Runs where core adds its controls, before FreeU, Deep Shrink and other patches. "
                "DiT ControlNets (SD3/SD3.5, Flux InstantX/Union/XLabs, Qwen-Image InstantX) are balanced per "
                "transformer block on the image tokens; there core's ControlNets of the block are added after "
                "the balancing, so f_e excludes them. HunyuanDiT ControlNets are refused (docs/dit.md)."
            ),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.ControlNet.Input("control_net"),
                io.Image.Input("image", tooltip="The control image (edges, pose, depth...); resized to the latent like core hints."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01, tooltip=STRENGTH_TOOLTIP),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Vae.Input("vae", optional=True, tooltip="Only for ControlNets that take a VAE-encoded hint."),
                io.Mask.Input("mask", optional=True, tooltip="Limits this control's effect to a region (1 = full effect)."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, positive, negative, control_net, image, strength, start_percent, end_percent,
                vae=None, mask=None) -> io.NodeOutput:
        label = node_label(cls)
        if not isinstance(control_net, comfy.controlnet.ControlBase):
            raise ValueError(f"{label}: control_net must be a CONTROL_NET from a ControlNet loader, "
                             f"got {type(control_net).__name__}.")
        check_image(image, label)
        mask = normalise_mask(mask, label)
        check_percent_range(start_percent, end_percent, label)
        if strength == 0:
            return io.NodeOutput(positive, negative)

        hint = image[..., :3].movedim(-1, 1)
        return io.NodeOutput(*attach_controls(positive, negative, lambda: MinimalImpactControl.create(
            control_net, hint, strength, (start_percent, end_percent), vae=vae, mask=mask, label=label)))


class MIControlNetSettings(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MIControlNetSettings",
            display_name="MIControlNet Settings",
            category=CATEGORY,
            description=(
                "Pick, for sampling runs with this model, how minimal-impact controls are combined and injected. "
                + " ".join(f"{m}: {d}." for m, d in MODE_DESCRIPTIONS.items())
                + " add^inj balances against the UNet feature f_e, which includes the residuals of core "
                  "ControlNets on the same layer."
            ),
            inputs=[
                io.Model.Input("model"),
                io.Combo.Input("mode", options=list(MODES), default="micontrolnet"),
                io.Combo.Input("granularity", options=list(GRANULARITIES), default="layer",
                               tooltip="layer: one weight per layer (the paper); pixel: one weight per location."),
                io.Float.Input("max_lambda", default=20.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Upper clip of the add^inj weight λ = λ*/(1-λ*)."),
                io.Boolean.Input("record_balance", default=True,
                                 tooltip="Keep the weights of the last model call the minimal-impact controls "
                                         "took part in, for MIControlNetBalanceMap."),
                io.Combo.Input("strength_scaling", options=list(STRENGTH_SCALINGS), default="paper", optional=True,
                               tooltip="How a control's strength enters the balancing. "
                                       + " ".join(f"{k}: {d}." for k, d in STRENGTH_SCALING_DESCRIPTIONS.items())),
                io.Combo.Input("lambda_convention", options=list(LAMBDA_CONVENTIONS), default="as_written",
                               optional=True, tooltip="How add^inj reads the paper's λ* (use the one the ControlNet was trained "
                                       "with; its file's metadata says which). "
                                       + " ".join(f"{c}: {d}." for c, d in LAMBDA_CONVENTION_DESCRIPTIONS.items())),
            ],
            outputs=[io.Model.Output()],
        )

    @classmethod
    def execute(cls, model, mode, granularity, max_lambda, record_balance, strength_scaling="paper",
                lambda_convention="as_written") -> io.NodeOutput:
        settings = settings_dict(mode, granularity, max_lambda, record_balance, strength_scaling=strength_scaling,
                                 lambda_convention=lambda_convention)
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})[SETTINGS_KEY] = settings
        return io.NodeOutput(m)


class MIControlNetBalanceMap(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MIControlNetBalanceMap",
            display_name="MIControlNet Balance Map",
            category=CATEGORY,
            description=(
                "Show, per UNet layer and location, how much each minimal-impact control and the UNet "
                "feature contributed on the last model call the controls took part in (positive rows of the "
                "main pass, not a PAG/SAG guidance pass): dominance colours per control, the control/UNet "
                "share of the injected feature, and the λ values. One image per latent of the batch."
            ),
            inputs=[
                io.Conditioning.Input("positive", tooltip="The positive conditioning that went into the sampler."),
                io.Latent.Input("samples", tooltip="The sampler's output; makes this node run after sampling."),
                io.Int.Input("cell_size", default=64, min=16, max=512, step=8,
                             tooltip="Width of a map cell in pixels; its height follows the latent's aspect ratio."),
                io.Int.Input("batch_index", default=-1, min=-1, max=4095, optional=True,
                             tooltip="Which latent of the batch to draw; -1 draws every latent (one image each)."),
            ],
            outputs=[io.Image.Output(display_name="balance_map")],
        )

    @classmethod
    def execute(cls, positive, samples, cell_size, batch_index=-1) -> io.NodeOutput:
        record = find_balance_record(positive)
        if record is None:
            raise ValueError("MIControlNetBalanceMap: no balance was recorded for this conditioning: "
                             + explain_missing_record(positive))
        return io.NodeOutput(render_balance_map(record, cell=cell_size,
                                                batch_index=None if batch_index < 0 else batch_index))


NODES = [MIControlNetApply, MIControlNetSettings, MIControlNetBalanceMap]
