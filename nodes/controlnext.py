"""ControlNeXt nodes: load the official control modules (SD1.5, SDXL, SVD) and
apply them to a MODEL.

Thin V3 schemas; the logic lives in ``model_patches.controlnext``.
"""

from __future__ import annotations

import os

import comfy.utils
import folder_paths
from comfy_api.latest import io

from model_patches.controlnext import (
    COMBINE_MODES,
    FOLDER_NAME,
    UNCOND_MODES,
    UNET_WEIGHT_MODES,
    ControlNeXtWeights,
    apply_controlnext,
)
from .common import LABEL_HIDDEN, node_label

CATEGORY = "conditioning/controlnext"
EXTENSIONS = {".safetensors", ".bin", ".pth", ".pt"}
NO_UNET = "none"

ControlNeXtType = io.Custom("CONTROLNEXT")


def register_model_folder() -> None:
    """models/controlnext (plus any extra_model_paths entries for it)."""
    if FOLDER_NAME not in folder_paths.folder_names_and_paths:
        folder_paths.folder_names_and_paths[FOLDER_NAME] = (
            [os.path.join(folder_paths.models_dir, FOLDER_NAME)], set(EXTENSIONS))
    else:
        paths, exts = folder_paths.folder_names_and_paths[FOLDER_NAME]
        folder_paths.folder_names_and_paths[FOLDER_NAME] = (paths, set(exts) | EXTENSIONS)


register_model_folder()


class ControlNeXtLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        files = folder_paths.get_filename_list(FOLDER_NAME)
        return io.Schema(
            node_id="ControlNeXtLoader",
            display_name="Load ControlNeXt",
            category=CATEGORY,
            description=(
                "Load an official ControlNeXt control module (SDXL, the first SDXL module, SD1.5, "
                "SD1.5-Training, SVD v1/v2; .safetensors, or .bin/.pth read without code execution) from "
                "models/controlnext, and optionally the UNet weights released with it (a subset of attention "
                "output projections, as differences or absolute weights; for SVD the full UNet). The variant "
                "is resolved from the file, and for the modules with shared keys from the model it is "
                "applied to."
            ),
            inputs=[
                io.Combo.Input("control_file", options=files,
                               tooltip="The control module (often named controlnet.safetensors or controlnext.bin)."),
                io.Combo.Input("unet_file", options=[NO_UNET] + files, default=NO_UNET, optional=True,
                               tooltip="The UNet weights released with the module (often unet.safetensors): a "
                                       "subset for SD1.5/SDXL; for SVD the full official UNet (unet.bin, "
                                       "finetune/unet_fp16.bin; diffusers keys are converted)."),
                io.Combo.Input("unet_weights", options=list(UNET_WEIGHT_MODES), default="auto", optional=True,
                               tooltip="How the UNet subset is applied: 'difference' adds it (W + ΔW); "
                                       "'absolute' makes the weights equal to the file's (applied as a "
                                       "difference to the model, so LoRAs keep their effect); 'auto' reads it "
                                       "from this project's export metadata, or else compares every tensor "
                                       "with the model's weight and logs the choice. The file name is never "
                                       "used."),
            ],
            outputs=[ControlNeXtType.Output(display_name="controlnext")],
        )

    @classmethod
    def execute(cls, control_file, unet_file=NO_UNET, unet_weights="auto") -> io.NodeOutput:
        control_path = folder_paths.get_full_path_or_raise(FOLDER_NAME, control_file)
        unet_path = None
        if unet_file and unet_file != NO_UNET:
            unet_path = folder_paths.get_full_path_or_raise(FOLDER_NAME, unet_file)
        bar = comfy.utils.ProgressBar(2)
        weights = ControlNeXtWeights.from_files(control_path, unet_path, progress=lambda: bar.update(1),
                                                unet_weights=unet_weights)
        return io.NodeOutput(weights)


class ControlNeXtApply(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="ControlNeXtApply",
            display_name="Apply ControlNeXt",
            category=CATEGORY,
            description=(
                "Patch a copy of the model with a ControlNeXt control: its UNet weights as reversible weight "
                "patches, and its control feature injected with Cross Normalization at the place the variant "
                "was trained for. Several ControlNeXt controls on one model combine per injection point with "
                "add^com (or a plain sum); they work together with ControlNets on the conditioning."
            ),
            inputs=[
                io.Model.Input("model"),
                ControlNeXtType.Input("controlnext"),
                io.Image.Input("image", tooltip="The control image in [0, 1]; for SVD, one frame per video frame."),
                io.Float.Input("strength", default=1.0, min=0.0, max=10.0, step=0.01,
                               tooltip="Multiplies the variant's trained scale (SVD-v2: 0.2; SD1.5 released "
                                       "module: its learned scale; SVD v1: sigmoid(scale)·1.3)."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="add_com", optional=True,
                               tooltip="How ControlNeXt controls that meet at one injection point combine "
                                       "(the newest Apply node decides): add^com (balanced) or a plain sum."),
                io.Combo.Input("uncond", options=list(UNCOND_MODES), default="variant default", optional=True,
                               tooltip="Control on the unconditional rows of CFG: 'variant default' as the "
                                       "official pipelines run it (SD1.5/SDXL: as on cond rows; SVD v2: zero; "
                                       "SVD v1: sigmoid(0)·1.3 = 0.65 × strength, cond rows sigmoid(scale)·1.3 "
                                       "× strength), 'apply' (as on cond rows) or 'zero'."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Limits the control to a region (1 = full effect): one mask for every "
                                      "latent, or one per latent of the batch (per video frame for SVD)."),
            ],
            outputs=[io.Model.Output()],
            hidden=LABEL_HIDDEN,
        )

    @classmethod
    def execute(cls, model, controlnext, image, strength, start_percent, end_percent, combine="add_com",
                uncond="variant default", mask=None) -> io.NodeOutput:
        label = node_label(cls, "controlnext")
        return io.NodeOutput(apply_controlnext(model, controlnext, image, strength, start_percent, end_percent,
                                               mask=mask, combine=combine, uncond=uncond, label=label))


NODES = [ControlNeXtLoader, ControlNeXtApply]
