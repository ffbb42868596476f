"""Options of ``refine-control`` and ``refine-control-eval`` (light imports only)."""

from __future__ import annotations

import argparse

from .. import conventions
from ..cli import add_deprecated_spelling, add_max_skipped_steps

PAPER_ABLATION = ("single-stage ablation: without --unlabeled there is no stage 2 (the paper reports "
                  "18.81 dB PSNR for it against 19.25 dB for the two-stage method)")

HELP = "distil an SD3 inpainting ControlNet into an N-layer student (Refine-Control, two stages)"
EVAL_HELP = "evaluate Refine-Control student vs teacher: masked PSNR/SSIM and ControlNet time per step"

DESCRIPTION = """\
Distil an SD3 inpainting ControlNet (teacher) into an N-layer student.

  python -m training refine-control --base sd3_medium.safetensors \\
      --teacher SD3-Controlnet-Inpainting.safetensors --data labelled.jsonl \\
      --unlabeled unlabelled.jsonl --output runs/student --layers 12 \\
      --stage1-steps 20000 --stage2-steps 5000

With --unlabeled, stage 2 runs by default (--stage2-steps defaults to a
quarter of --stage1-steps); without it the run is the single-stage ablation.

Multi-GPU: torchrun --nproc_per_node 8 -m training refine-control ...
(--batch-size is per rank). --resume latest continues from the last checkpoint.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION
    g = p.add_argument_group("models")
    g.add_argument("--base", required=True, help="single-file SD3 checkpoint (transformer, text encoders, VAE)")
    g.add_argument("--teacher", required=True, help="SD3 ControlNet file (diffusers SD3ControlNetModel keys)")
    g.add_argument("--layers", type=int, default=12, help="student depth N (default 12); must be below the base depth")
    g.add_argument("--teacher-wiring", default="diffusers_0.29",
                   help="how the teacher's residuals reach the base blocks (default diffusers_0.29: one-to-one "
                        "for the 23-layer teacher, as it was trained)")
    g.add_argument("--student-wiring", default="diffusers_0.29",
                   help="wiring the student is trained with; pass the same to the node (default diffusers_0.29; "
                        "for 12 layers on 24 blocks all wirings agree)")
    g.add_argument("--convention", default="diffusers", choices=["diffusers", "comfyui"],
                   help="inpainting conditioning convention (default diffusers: the teacher's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="stage-1 labelled data (JSONL or folder with metadata.jsonl)")
    g.add_argument("--unlabeled", default=None, help="stage-2 unlabelled masked images (same layout; prompts optional)")
    g.add_argument("--resolution", type=int, default=1024,
                   help="training resolution in pixels, images are resized and centre-cropped (default: 1024)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--stage1-steps", type=int, default=1000,
                   help="optimizer steps on the labelled data: task + distillation + alignment (default: 1000)")
    g.add_argument("--stage2-steps", type=int, default=None,
                   help="optimizer steps on --unlabeled after stage 1: distillation + alignment only (default: "
                        "stage1-steps // 4 when --unlabeled is given, else 0: the single-stage ablation)")
    g.add_argument("--batch-size", type=int, default=1, help="per rank")
    g.add_argument("--learning-rate", type=float, default=1e-5,
                   help="AdamW learning rate of the student (default: 1e-5)")
    add_deprecated_spelling(g, "--lr", "--learning-rate", "learning_rate", type=float)
    conventions.add_schedule_arguments(g, " (over both stages)")
    g.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    g.add_argument("--alpha", type=float, default=0.975, help="task-loss weight inside the mask (1-alpha outside)")
    g.add_argument("--w-task", type=float, default=1.0, help="weight of the mask-weighted task loss (default: 1)")
    g.add_argument("--w-kd", type=float, default=1.0,
                   help="weight of the distillation loss, student vs teacher prediction (default: 1)")
    g.add_argument("--w-af", type=float, default=1.0,
                   help="weight of the asymmetric feature alignment L_af (default: 1)")
    g.add_argument("--af-features", default="residuals", choices=["residuals", "hidden"],
                   help="what L_af aligns: residuals = each layer's output after its output projection, what is "
                        "injected into the base; hidden = the block hidden states before it (default: residuals)")
    g.add_argument("--af-normalise", default="teacher", choices=["teacher", "none"],
                   help="divide each L_af term by the mean square of its teacher feature, per row (scale-invariant; "
                        "each term is 1 while the student injects nothing), or not (default: teacher)")
    g.add_argument("--fixed-noise", action="store_true",
                   help="draw noise and sigma per dataset item instead of per sample position (for checks on a fixed batch)")
    g.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"],
                   help="no: base, teacher, VAE and text encoders in fp32, no autocast; bf16/fp16: base and "
                        "teacher in that dtype and the forwards under autocast, the student's weights in fp32 "
                        "(fp16 adds loss scaling on CUDA) (default: no)")
    add_deprecated_spelling(g, "--precision", "--mixed-precision", "mixed_precision", choices=["no", "bf16", "fp16"])
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default: 1)")
    add_deprecated_spelling(g, "--grad-clip", "--max-grad-norm", "max_grad_norm", type=float)
    add_max_skipped_steps(g)
    g.add_argument("--text-cache-size", type=int, default=256,
                   help="prompts whose embeddings are kept in memory, least recently used dropped first; an SD3 "
                        "prompt is about 2.5 MB in fp32 (default: 256)")
    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, help="output folder: checkpoints/, log.csv, NAME.safetensors")
    g.add_argument("--name", default="refine_control_student",
                   help="file name stem of the student ControlNet (default: refine_control_student)")
    g.add_argument("--checkpoint-every", type=int, default=500,
                   help="write a resumable checkpoint every N steps and at the end, 0 = off (default: 500)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="resumable checkpoints to keep (default: 3)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--seed", type=int, default=0, help="seed of the whole run (init, data order, noise) (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto; ranks use their LOCAL_RANK GPU)")
    g.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the exported student file (default: fp16)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar (the --report-to logs are still "
                   "written)")
    conventions.add_report_arguments(g)
    conventions.add_config_argument(g)

def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Inpaint held-out images with the teacher and the student through ComfyUI's sampler and the "
                     "RefineControlInpaintApply node; report PSNR/SSIM in the masked region and the ControlNet "
                     "forward time per step, student vs teacher, measured side by side.")
    p.add_argument("--base", required=True, help="single-file SD3 checkpoint (transformer, text encoders, VAE)")
    p.add_argument("--teacher", required=True, help="the teacher SD3 ControlNet file")
    p.add_argument("--student", required=True, help="the student SD3 ControlNet file (from refine-control)")
    p.add_argument("--data", required=True, help="held-out JSONL (image, mask, prompt[, local_prompt])")
    p.add_argument("--resolution", type=int, default=1024, help="inpainting resolution in pixels (default: 1024)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps per image (default: 28)")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default: 7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for teacher and student (default: 0)")
    p.add_argument("--convention", default="auto", choices=["auto", "diffusers", "comfyui"],
                   help="inpainting conditioning convention; auto: what each file says, else diffusers (the "
                        "teacher's) (default: auto)")
    p.add_argument("--teacher-wiring", default="auto",
                   help="how the teacher's residuals reach the base blocks; auto: what the file says, else "
                        "diffusers_0.29 (default: auto)")
    p.add_argument("--student-wiring", default="auto",
                   help="how the student's residuals reach the base blocks; auto: what the file says, else "
                        "diffusers_0.29 (default: auto)")
    p.add_argument("--timing-repeats", type=int, default=10,
                   help="timed ControlNet forwards per model for the student/teacher time ratio (default: 10)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")
    p.add_argument("--save-images", default=None, metavar="DIR",
                   help="also write each inpainted image as DIR/NNNNN_{teacher,student}.png (8-bit, as Save Image)")
    p.add_argument("--text-cache-size", type=int, default=256,
                   help="prompts whose embeddings are kept in memory, least recently used dropped (default: 256)")



def resolve_stages(args) -> list[str]:
    """Fill in the default of --stage2-steps; return notes about the stages to log."""
    notes = []
    if args.stage2_steps is None:
        args.stage2_steps = max(1, args.stage1_steps // 4) if args.unlabeled else 0
    if not args.unlabeled:
        notes.append(PAPER_ABLATION)
    problems = conventions.schedule_problems(args, args.stage1_steps + args.stage2_steps)
    if problems:
        raise SystemExit("training refine-control: " + "; ".join(problems))
    return notes
