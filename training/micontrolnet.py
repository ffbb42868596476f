"""``python -m training micontrolnet``: train a Minimal Impact ControlNet.

Stage 1 trains on silent-signal rebalanced data through add^inj; stage 2
adds the conservativity loss L_QC^simple. The output is a ControlNet v1.1
(ldm) safetensors file that ComfyUI's ControlNetLoader and the
MIControlNetApply node load as is.
"""

from __future__ import annotations

import argparse

from . import cli

# balance.LAMBDA_CONVENTIONS (kept equal by a test; --help must not import ComfyUI).
LAMBDA_CONVENTIONS = ("as_written", "mgda_weight_of_control")

HELP = "train a MIControlNet (stage 1: balanced data through add^inj; stage 2: + conservativity loss)"

DESCRIPTION = """\
Train a Minimal Impact ControlNet on a base SD1.5 or SDXL checkpoint.

Stage 1: every sample keeps its target image whole, while (with probability
--rebalance-prob) a random subset of the segmentation regions keeps the
condition and the rest of the condition becomes silent (black), so the
ControlNet learns that silent areas may hold texture. The residuals are
injected with add^inj exactly as the MIControlNetApply node does at sampling.

Stage 2 (--stage 2) adds L_QC^simple = E_v vT(Jc JcT - Jc Jc)v, the Hutchinson
estimate of the asymmetry of the ControlNet-induced Jacobian, weighted by
--qc-weight. L_QC^simple is taken on the score s = -eps/sigma_t w.r.t. x_t
and summed over each sample's latent elements (the paper's quantity); the
diffusion loss is the per-element mean squared error, so --qc-weight is the
ratio of the two as they are written here. Stage 2 starts from a stage-1
result: pass its fp32 checkpoint with --init-controlnet (or --resume).

Multi-GPU / multi-node: start with torchrun, e.g.
  torchrun --nproc_per_node 8 -m training micontrolnet ...
--batch-size is per rank; the global batch is batch-size x ranks x
--gradient-accumulation. See docs/training.md for the data layout.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION
    g = p.add_argument_group("model")
    g.add_argument("--base", required=True, help="single-file SD1.5 or SDXL checkpoint (.safetensors) to train on; "
                   "its UNet, text encoder and VAE stay frozen")
    cli.add_family_argument(g)
    g.add_argument("--init-controlnet", default=None, metavar="FILE",
                   help="start from this ControlNet (v1.1 ldm or diffusers file, e.g. a ControlNet v1.1 or a "
                        "stage-1 result) instead of copying the base UNet's encoder")
    g.add_argument("--stage", type=int, default=1, choices=[1, 2], help="1: rebalanced data + add^inj; "
                   "2: stage 1 plus the conservativity loss (default: 1)")
    g.add_argument("--qc-weight", type=float, default=0.01, help="weight of L_QC^simple in stage 2 (default: 0.01)")
    g.add_argument("--qc-every", type=int, default=1, help="compute L_QC on every k-th step only, to amortise its "
                   "cost; the term is then weighted by k x --qc-weight, so its expected weight per step stays "
                   "(default: 1, every step)")
    g.add_argument("--granularity", default="layer", choices=["layer", "pixel"],
                   help="add^inj coefficient per layer (paper) or per pixel; use the same at sampling (default: layer)")
    g.add_argument("--lambda-convention", default="as_written", choices=list(LAMBDA_CONVENTIONS),
                   help="how add^inj reads the paper's lambda*: as_written (eqs. 8-10 literally: lambda* is the "
                        "MGDA weight of the UNet feature) or mgda_weight_of_control (lambda* is the control's MGDA "
                        "weight); stored in the exported file, use the same at sampling (default: as_written)")
    g.add_argument("--plain-add-warmup-steps", type=int, default=-1,
                   help="inject with a plain add (h + r) for the first N steps, then add^inj (this project's own "
                        "step, not the paper's). Under --lambda-convention as_written add^inj gives a ControlNet "
                        "with zero outputs no gradient (its coefficient is 0 at zero residuals), so a ControlNet "
                        "initialised from the UNet needs this warm-up; mgda_weight_of_control does not (default: "
                        "500 when initialising from the UNet under as_written, else 0)")
    g.add_argument("--max-lambda", type=float, default=20.0, help="clip of the add^inj coefficient (default: 20)")

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="dataset folder (images/, conditions/, segmentation/) or JSONL file")
    cli.add_condition_arguments(g)
    g.add_argument("--rebalance-prob", type=float, default=0.5,
                   help="fraction of samples whose condition is partly silenced (default: 0.5)")
    g.add_argument("--keep-prob", type=float, default=0.5,
                   help="probability that a region keeps its condition in a rebalanced sample (default: 0.5)")
    g.add_argument("--min-region-area", type=int, default=64,
                   help="connected one-colour regions of a segmentation map smaller than this many pixels (at "
                        "--resolution) are merged into the neighbour with the longest shared border, so "
                        "anti-aliased or JPEG maps do not make thousands of speck regions; 0 = one region per "
                        "colour as found (default: 64)")
    g.add_argument("--silent-value", type=float, default=0.0,
                   help="condition value ([0, 1], all channels) that means 'no signal', given to silenced "
                        "regions: 0 (black) for edges/pose/segmentation; e.g. 1 or 0 for depth, whichever your "
                        "depth maps use for 'far' (default: 0)")
    g.add_argument("--superpixels", type=int, default=12, help="SLIC superpixels used as regions for samples "
                   "without a segmentation map (weaker than real masks) (default: 12)")
    g.add_argument("--empty-prompt-prob", type=float, default=0.0,
                   help="fraction of samples trained with an empty prompt (default: 0)")
    g.add_argument("--cache-latents", action="store_true",
                   help="encode each target image with the VAE once and keep the latent in memory "
                        "(images are only resized and centre-cropped, so latents do not change)")
    g.add_argument("--num-workers", type=int, default=0, help="data loading processes per rank (default: 0)")

    g = p.add_argument_group("optimisation")
    cli.add_batch_arguments(g)
    g.add_argument("--learning-rate", type=float, default=1e-5, help="AdamW learning rate (default: 1e-5)")
    cli.add_schedule_arguments(g)
    cli.add_regularisation_arguments(g)
    g.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="compute precision. no: every network (UNet, text encoder, VAE, ControlNet) in fp32, "
                        "whatever ComfyUI would pick on the device; bf16: the frozen networks in bf16; fp16: "
                        "UNet and text encoder in fp16, VAE fp32, with loss scaling. The trained ControlNet "
                        "always keeps fp32 weights (default: no)")
    g.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute activations in backward to save memory (ControlNet and UNet blocks)")
    g.add_argument("--seed", type=int, default=0, help="seed of the whole run (data order, noise, masks) (default: 0)")
    cli.add_device_arguments(g)

    g = p.add_argument_group("output")
    g.add_argument("--output", required=True, help="output folder: checkpoints/, log.csv, validation/, NAME.safetensors")
    g.add_argument("--name", default="micontrolnet", help="file name of the final ControlNet (default: micontrolnet)")
    g.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the exported ControlNet file (default: fp16)")
    cli.add_run_arguments(g)


def run(args) -> int:
    from .trainer import MIControlNetTrainer

    cli.configure_logging()
    _check_args(args)
    return MIControlNetTrainer(args).train()


def _check_args(args) -> None:
    problems = cli.common_problems(args)
    if args.qc_every < 1:
        problems.append(f"--qc-every must be >= 1, got {args.qc_every}")
    if args.stage == 2 and not (args.init_controlnet or args.resume):
        problems.append("--stage 2 continues a stage-1 ControlNet: pass --init-controlnet with stage 1's fp32 "
                        "checkpoint (OUTPUT/checkpoints/step-N/controlnet.safetensors of the stage-1 run) or "
                        "--resume a stage-2 run; without one it would start from a zero ControlNet")
    if args.min_region_area < 0:
        problems.append(f"--min-region-area must be >= 0, got {args.min_region_area}")
    for name in ("rebalance_prob", "keep_prob", "silent_value"):
        v = getattr(args, name)
        if not 0.0 <= v <= 1.0:
            problems.append(f"--{name.replace('_', '-')} must be in [0, 1], got {v}")
    cli.stop_on_problems("micontrolnet", problems)


__all__ = ["HELP", "add_arguments", "run"]
