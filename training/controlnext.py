"""``python -m training controlnext``: train a ControlNeXt control module and
a selected subset of the base UNet.

The control module (the 52-tensor, 320-channel architecture of
``model_patches.controlnext_arch``) is injected with Cross Normalization at
the place ``model_patches.controlnext`` injects it at sampling (SDXL: after
input block 0; SD1.5: after the first level's downsample), through the same
``ControlNeXtCall`` and UNet patch functions, so what is trained is what
samples. The outputs are the files ``ControlNeXtLoader`` reads.
"""

from __future__ import annotations

import argparse
import re

from . import cli
from .controlnext_defaults import NO_UNET

HELP = "train a ControlNeXt control module and a regex-selected subset of the UNet"

DESCRIPTION = """\
Train a ControlNeXt control module (52 tensors, 320 channels) together with a
small subset of the base UNet's weights, on an SD1.5 or SDXL checkpoint.

The module's feature is added to the UNet once, after Cross Normalization, at
the place the Apply ControlNeXt node injects it for that base model:
SDXL after input block 0 (conv_in), SD1.5 after the first level's downsample.
The UNet parameters whose ComfyUI names match --unet-pattern are trained
(default: attn2.to_out for SDXL, to_out for SD1.5) with --learning-rate; the
module is trained with --learning-rate x --module-lr-scale (default 10x).

Outputs in OUTPUT/ (load both with the Load ControlNeXt node from
models/controlnext):
  NAME.safetensors              the control module (official key layout)
  NAME_unet.safetensors         the UNet subset as absolute weights, or
  NAME_unet_delta.safetensors   the UNet subset as W_trained - W_base
Both files carry their kind and the training strength in their metadata: the
loader applies the UNet file as written (difference or absolute) and uses the
training strength as the module's default scale (SD1.5).

Multi-GPU / multi-node: torchrun --nproc_per_node 8 -m training controlnext ...
--batch-size is per rank; the global batch is batch-size x ranks x
--gradient-accumulation. See docs/training.md for the data layout.
"""



def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION
    g = p.add_argument_group("model")
    g.add_argument("--base", required=True, help="single-file SD1.5 or SDXL checkpoint (.safetensors); its text "
                   "encoder, VAE and the UNet outside --unet-pattern stay frozen")
    cli.add_family_argument(g)
    g.add_argument("--init-module", default=None, metavar="FILE",
                   help="start from this 52-tensor ControlNeXt module (.safetensors) instead of a fresh one")
    g.add_argument("--unet-pattern", default=None, metavar="REGEX",
                   help="regular expression (re.search) over the UNet's ComfyUI parameter names, e.g. "
                        "'input_blocks.1.1.transformer_blocks.0.attn2.to_out.0.weight'; matching parameters are "
                        "trained. 'none' trains the module only (default: attn2\\.to_out for SDXL, to_out for SD1.5)")
    g.add_argument("--unet-weights", default="auto", choices=["auto", "delta", "absolute"],
                   help="write the UNet subset as W_trained - W_base (delta, transfers across bases of the family) "
                        "or as absolute weights; the file's metadata tells the loader which "
                        "(default: auto = delta for SDXL, absolute for SD1.5, as the official releases)")
    g.add_argument("--strength", type=float, default=1.0,
                   help="scale of the injected control while training (the official SD1.5 canny run used 0.35). "
                        "An SD1.5 export stores it as the module's default scale (Apply ControlNeXt strength 1 "
                        "reproduces it); for SDXL use the same strength in Apply ControlNeXt (default: 1)")

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset folder (images/, conditions/) or JSONL file")
    cli.add_condition_arguments(g)
    g.add_argument("--empty-prompt-prob", type=float, default=0.0,
                   help="fraction of samples trained with an empty prompt (official SDXL runs: 0.2) (default: 0)")
    g.add_argument("--cache-latents", action="store_true",
                   help="encode each target image with the VAE once and keep the latent in memory")
    g.add_argument("--num-workers", type=int, default=0, help="data loading processes per rank (default: 0)")

    g = p.add_argument_group("optimisation")
    cli.add_batch_arguments(g)
    g.add_argument("--learning-rate", type=float, default=1e-5,
                   help="AdamW learning rate of the UNet subset (default: 1e-5)")
    g.add_argument("--module-lr-scale", type=float, default=10.0,
                   help="the control module's learning rate is --learning-rate times this (default: 10)")
    cli.add_schedule_arguments(g, " (both rates)")
    cli.add_regularisation_arguments(g)
    g.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="compute precision; the frozen UNet is stored in it, the module and the trained UNet "
                        "subset stay fp32 (fp16 adds loss scaling) (default: no)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the UNet's block activations in backward to save memory")
    g.add_argument("--seed", type=int, default=0, help="seed of the whole run (init, data order, noise) (default: 0)")
    cli.add_device_arguments(g)

    g = p.add_argument_group("output")
    g.add_argument("--output", required=True,
                   help="output folder: checkpoints/, log.csv, validation/, NAME*.safetensors")
    g.add_argument("--name", default="controlnext", help="file name stem of the outputs (default: controlnext)")
    g.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the exported files (default: fp16)")
    cli.add_run_arguments(g)


def run(args) -> int:
    cli.configure_logging()
    _check_args(args)
    from .controlnext_trainer import ControlNeXtTrainer

    return ControlNeXtTrainer(args).train()


def _check_args(args) -> None:
    problems = cli.common_problems(args)
    if args.module_lr_scale <= 0:
        problems.append(f"--module-lr-scale must be > 0, got {args.module_lr_scale}")
    if args.unet_pattern not in (None, NO_UNET):
        try:
            re.compile(args.unet_pattern)
        except re.error as e:
            problems.append(f"--unet-pattern {args.unet_pattern!r} is not a regular expression ({e})")
    cli.stop_on_problems("controlnext", problems)
