"""Refine-Control node: SD3 inpainting ControlNets of any depth (teacher or
distilled student), with explicit conventions and optional balanced injection.

Thin V3 schema; the logic lives in ``model_patches.refine_control`` (pure
torch) and ``model_patches.refine_control_runtime`` (ComfyUI side).
"""

from __future__ import annotations

import torch

import comfy.controlnet
import folder_paths
from comfy_api.latest import io

from model_patches.inputs import check_image, check_percent_range
from model_patches.refine_control import (
    BLOCK_MAP_DESCRIPTIONS,
    BLOCK_MAPS,
    CONVENTIONS,
    convention as inpaint_convention,
    keep_mask,
    masked_image,
    normalise_mask,
)
from model_patches.refine_control_files import AUTO, load_refine_control, resolve_settings
from model_patches.refine_control_runtime import RefineControl, sd3_control_model
from .common import LABEL_HIDDEN, attach_controls, node_label

CATEGORY = "conditioning/controlnet/balanced"

INJECTIONS = {
    "add": (False, "layer"),
    "add_inj (per block)": (True, "layer"),
    "add_inj (per token)": (True, "pixel"),
}


def _local_context(local_prompt, label: str) -> torch.Tensor | None:
    """The text embeddings of a one-entry CONDITIONING (its pooled output is
    not used: SD3 ControlNets get zero pooled projections)."""
    if local_prompt is None:
        return None
    if not isinstance(local_prompt, list) or not local_prompt or not isinstance(local_prompt[0], (list, tuple)) \
            or not isinstance(local_prompt[0][0], torch.Tensor) or local_prompt[0][0].ndim != 3:
        raise ValueError(f"{label}: local_prompt must be a CONDITIONING (e.g. from CLIP Text Encode), "
                         f"got {type(local_prompt).__name__}.")
    if len(local_prompt) != 1:
        raise ValueError(f"{label}: local_prompt must be one text (one CONDITIONING entry), got {len(local_prompt)} "
                         f"entries; connect a single CLIP Text Encode.")
    return local_prompt[0][0]


class RefineControlInpaintApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RefineControlInpaintApply",
            display_name="Apply SD3 Inpainting ControlNet (Refine-Control)",
            category=CATEGORY,
            description=(
                "Apply an SD3 inpainting ControlNet of any depth (the 23-layer teacher or a distilled student) "
                "with the inpainting convention and the layer-to-block wiring it was trained with, an optional "
                "local prompt for the ControlNet only, and optional balanced (add^inj) injection per "
                "transformer block."
            ),
            inputs=[
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.ControlNet.Input("control_net", tooltip="An SD3 ControlNet (17-channel inpainting input)."),
                io.Vae.Input("vae", tooltip="The SD3 VAE; encodes the masked image for the ControlNet."),
                io.Image.Input("image", tooltip="The image to inpaint."),
                io.Mask.Input("mask", tooltip="1 = region to inpaint."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Combo.Input("convention", options=[AUTO, *CONVENTIONS], default=AUTO,
                               tooltip="auto: what the file says (load it with Load Refine-Control Model), else "
                                       "diffusers | " + " | ".join(f"{k}: {v.description}"
                                                                   for k, v in CONVENTIONS.items())),
                io.Combo.Input("wiring", options=[AUTO, *BLOCK_MAPS], default=AUTO,
                               tooltip="auto: what the file says (load it with Load Refine-Control Model), else "
                                       "diffusers_0.29 | " + " | ".join(f"{k}: {v}"
                                                                        for k, v in BLOCK_MAP_DESCRIPTIONS.items())),
                io.Combo.Input("injection", options=list(INJECTIONS), default="add",
                               tooltip="add: plain sum (core); add_inj: balanced injection f + λ·r per "
                                       "transformer block (one λ per block and row, or per token)."),
                io.Float.Input("max_lambda", default=20.0, min=0.0, max=1000.0, step=0.1,
                               tooltip="Upper clip of the add^inj weight λ."),
                io.Conditioning.Input("local_prompt", optional=True,
                                      tooltip="Text for this ControlNet only, describing just the masked region: "
                                              "it replaces the prompt of the positive rows inside this ControlNet; "
                                              "the negative rows, other ControlNets and the model keep their text."),
            ],
            outputs=[
                io.Conditioning.Output(display_name="positive"),
                io.Conditioning.Output(display_name="negative"),
            ],
            hidden=LABEL_HIDDEN,
        )

    @classmethod
    def execute(cls, positive, negative, control_net, vae, image, mask, strength, start_percent, end_percent,
                convention=AUTO, wiring=AUTO, injection="add", max_lambda=20.0,
                local_prompt=None) -> io.NodeOutput:
        label = node_label(cls, "control_net")
        if not isinstance(control_net, comfy.controlnet.ControlBase):
            raise ValueError(f"{label}: control_net must be a CONTROL_NET from Load ControlNet Model, "
                             f"got {type(control_net).__name__}.")
        cn_model = sd3_control_model(control_net, label)
        if not control_net.concat_mask:
            channels = cn_model.pos_embed_input.proj.weight.shape[1]
            raise ValueError(f"{label}: expected an SD3 inpainting ControlNet (17 input channels: 16 latent + "
                             f"1 mask), found {channels} input channels. Use a ControlNet trained for inpainting, "
                             f"or core's Apply ControlNet for other SD3 ControlNets.")
        if vae is None:
            raise ValueError(f"{label}: a VAE is required (it encodes the masked image); connect the SD3 VAE.")
        check_image(image, label, channels=(3, 4))
        check_percent_range(start_percent, end_percent, label)
        if injection not in INJECTIONS:
            raise ValueError(f"{label}: injection must be one of {list(INJECTIONS)}, got {injection!r}.")
        settings = resolve_settings(control_net, convention, wiring, label)
        conv = inpaint_convention(settings.convention)
        wiring = settings.wiring
        mask = normalise_mask(mask)
        local = _local_context(local_prompt, label)

        # Empty mask: nothing to inpaint, the keep channel is all ones; full
        # mask: everything, a black image and an all-zero keep channel. Both
        # are plain tensors, no division anywhere.
        hint_image = masked_image(image[..., :3].float(), mask, conv)
        keep = keep_mask(mask, conv).unsqueeze(1)
        hint = hint_image.movedim(-1, 1)
        balanced, granularity = INJECTIONS[injection]
        del cn_model

        if strength == 0:
            # Nothing attached, with or without a local prompt (it belongs to this control only).
            return io.NodeOutput(positive, negative)

        def make_control():
            return RefineControl.create(control_net, hint, keep, strength, (start_percent, end_percent), vae,
                                        conv.name, wiring, balanced, granularity, max_lambda, label,
                                        local_context=local, expected_depth=settings.depth)

        return io.NodeOutput(*attach_controls(positive, negative, make_control))


class RefineControlLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RefineControlLoader",
            display_name="Load Refine-Control Model",
            category=CATEGORY,
            description=(
                "Load an SD3 ControlNet from models/controlnet with ComfyUI's loader and read the convention, "
                "wiring, layer count and base depth a `training refine-control` student stores in its file, so "
                "that the Apply node's 'auto' choices follow them. Files without them (third-party ControlNets, "
                "the public teacher) load as with Load ControlNet Model."
            ),
            inputs=[io.Combo.Input("control_net_name", options=folder_paths.get_filename_list("controlnet"))],
            outputs=[io.ControlNet.Output()],
            hidden=LABEL_HIDDEN,
        )

    @classmethod
    def execute(cls, control_net_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("controlnet", control_net_name)
        return io.NodeOutput(load_refine_control(path, node_label(cls)))


NODES = [RefineControlInpaintApply, RefineControlLoader]
