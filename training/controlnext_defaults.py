"""ControlNeXt training defaults per base family, read by the CLI (``controlnext.py``)
and the trainer (``controlnext_trainer.py``); kept apart so neither imports the other."""

# The variant of model_patches.controlnext that a base family trains.
VARIANT_OF_FAMILY = {"SD1.5": "sd15_training", "SDXL": "sdxl"}
DEFAULT_UNET_PATTERN = {"SD1.5": r"to_out", "SDXL": r"attn2\.to_out"}
DEFAULT_UNET_WEIGHTS = {"SD1.5": "absolute", "SDXL": "delta"}
NO_UNET = "none"
