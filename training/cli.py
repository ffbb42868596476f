"""Command-line pieces the UNet training subcommands (micontrolnet,
controlnext) share: the options both have, added at the same place in each
``--help``, and the checks of their values (the options every subcommand,
Refine-Control included, spells the same way: ``conventions.py``). Light imports only, so ``--help`` answers at once."""

from __future__ import annotations

import argparse
import logging
import sys

from . import conventions


def add_family_argument(group) -> None:
    group.add_argument("--family", default="auto", choices=["auto", "sd1.5", "sdxl"],
                       help="expected family of --base; the run stops at start if the checkpoint is another "
                            "(default: auto)")


def add_condition_arguments(group) -> None:
    """How condition images are made, and the training resolution."""
    group.add_argument("--condition", default="file", choices=["file", "canny"],
                       help="condition images from the dataset, or canny edges computed on the fly (default: file)")
    group.add_argument("--canny-low", type=int, default=100, help="canny lower threshold (default: 100)")
    group.add_argument("--canny-high", type=int, default=200, help="canny upper threshold (default: 200)")
    group.add_argument("--resolution", type=int, default=512,
                       help="training resolution, divisible by 64 (default: 512)")


def add_batch_arguments(group) -> None:
    group.add_argument("--max-steps", type=int, default=1000, help="optimizer steps to train to (default: 1000)")
    group.add_argument("--batch-size", type=int, default=1, help="samples per rank per micro-step (default: 1)")
    group.add_argument("--gradient-accumulation", type=int, default=1,
                       help="micro-steps per optimizer step (default: 1)")


def add_regularisation_arguments(group) -> None:
    group.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay (default: 0)")
    group.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm, 0 = off (default: 1)")
    add_max_skipped_steps(group)


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_max_skipped_steps(group) -> None:
    """The non-finite-step option every trainer has (training/loop.py skips such steps)."""
    group.add_argument("--max-skipped-steps", type=_non_negative_int, default=20,
                       help="a step whose loss or gradients are not finite is skipped (weights unchanged, logged); "
                            "stop after this many in a row, 0 = never (default: 20)")


def add_device_arguments(group) -> None:
    group.add_argument("--deterministic", action="store_true", help="use deterministic kernels (slower on GPU)")
    group.add_argument("--device", default="auto",
                       help="auto, cpu, cuda (default: auto; ranks use their LOCAL_RANK GPU)")


def add_run_arguments(group) -> None:
    """Checkpoints, resume, validation and progress options, added to ``group``."""
    group.add_argument("--checkpoint-every", type=int, default=500, help="write a resumable checkpoint every N "
                       "steps (default: 500; one is always written at the end)")
    group.add_argument("--keep-checkpoints", type=int, default=3,
                       help="resumable checkpoints to keep, 0 = all (default: 3)")
    group.add_argument("--resume", default=None, metavar="latest|DIR",
                       help="continue from the newest checkpoint in OUTPUT/checkpoints, or from a checkpoint folder")
    group.add_argument("--validate-every", type=int, default=0,
                       help="sample a validation image with ComfyUI's sampler every N steps and at the end, "
                            "0 = off (default: 0)")
    conventions.add_validation_pair_arguments(group)
    group.add_argument("--validation-steps", type=int, default=20, help="sampling steps of validation (default: 20)")
    group.add_argument("--validation-cfg", type=float, default=7.0, help="CFG scale of validation (default: 7)")
    group.add_argument("--no-progress", action="store_true", help="no progress bar (the --report-to logs are still "
                       "written)")
    conventions.add_report_arguments(group)
    conventions.add_config_argument(group)


def add_schedule_arguments(group, what: str = "") -> None:
    """--lr-scheduler, --lr-warmup-steps, --lr-power (every trainer; formula: conventions.lr_at)."""
    conventions.add_schedule_arguments(group, what)


def common_problems(args) -> list[str]:
    """What is wrong with the options both subcommands have, one sentence each."""
    problems = []
    if args.resolution % 64:
        problems.append(f"--resolution must be divisible by 64, got {args.resolution}")
    for name in ("max_steps", "batch_size", "gradient_accumulation", "checkpoint_every", "validation_steps"):
        if getattr(args, name) < 1:
            problems.append(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("keep_checkpoints", "validate_every"):
        if getattr(args, name) < 0:
            problems.append(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    if not 0.0 <= args.empty_prompt_prob <= 1.0:
        problems.append(f"--empty-prompt-prob must be in [0, 1], got {args.empty_prompt_prob}")
    problems += conventions.validation_problems(args)
    problems += conventions.schedule_problems(args, args.max_steps)
    return problems


def stop_on_problems(subcommand: str, problems: list[str]) -> None:
    if problems:
        raise SystemExit(f"training {subcommand}: " + "; ".join(problems))


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


class _DeprecatedSpelling(argparse.Action):
    """An old option name: stores into the new option's ``dest`` and says so."""

    def __init__(self, option_strings, dest, new_spelling: str, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.new_spelling = new_spelling

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated and will be removed; use {self.new_spelling} "
              f"(same meaning)", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_spelling(group, old: str, new: str, dest: str, **kwargs) -> None:
    """Accept ``old`` as a spelling of the option ``new`` (which stores into
    ``dest``), listed in ``--help`` as deprecated, with a deprecation note on
    stderr when used. ``kwargs`` are the new option's ``type``/``choices``/``nargs``."""
    group.add_argument(old, dest=dest, action=_DeprecatedSpelling, new_spelling=new, default=argparse.SUPPRESS,
                       metavar="", help=f"deprecated spelling of {new}", **kwargs)
