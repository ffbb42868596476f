"""The options every training subcommand spells the same way (diffusers'
and kohya's habits): where the run reports (``--report-to``), the learning
rate schedule (``--lr-scheduler`` with ``--lr-warmup-steps``), the validation
prompt/image pairs, and ``--config``. Light imports only (``--help`` answers
at once); the schedule's formula is here too, so that the loop and the tests
read the same one."""

from __future__ import annotations

import argparse
import math

REPORTERS = ("csv", "tensorboard")
SCHEDULERS = ("constant", "cosine", "polynomial")


# ---------------------------------------------------------------------------------------------- options
def _reporters(text: str) -> list[str]:
    """``csv``, ``tensorboard``, ``all`` or a comma-separated list of them."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    out = []
    for name in names:
        if name == "all":
            out.extend(REPORTERS)
        elif name in REPORTERS:
            out.append(name)
        else:
            raise argparse.ArgumentTypeError(f"unknown reporter {name!r}; expected {', '.join(REPORTERS)} or all "
                                             f"(comma-separated, or the option repeated)")
    if not out:
        raise argparse.ArgumentTypeError("expected at least one of " + ", ".join(REPORTERS))
    return out


class _ExtendUnique(argparse.Action):
    """Repeated or comma-separated values, each once, in the order given."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = list(getattr(namespace, self.dest, None) or [])
        setattr(namespace, self.dest, current + [v for v in values if v not in current])


def add_report_arguments(group) -> None:
    group.add_argument("--report-to", action=_ExtendUnique, type=_reporters, default=None, metavar="csv|tensorboard|all",
                       help="where each step's scalars (and the validation images) go: csv = OUTPUT/log.csv, "
                            "tensorboard = event files in OUTPUT/tensorboard (view with tensorboard --logdir "
                            "OUTPUT/tensorboard), all = both; comma-separated or repeated, e.g. --report-to "
                            "csv,tensorboard (default: csv)")


def add_schedule_arguments(group, what: str = "") -> None:
    """--lr-scheduler, --lr-warmup-steps, --lr-power (the formula: ``lr_at``)."""
    group.add_argument("--lr-scheduler", default="constant", choices=list(SCHEDULERS),
                       help="learning rate after the warm-up: constant; cosine (half a cosine from --learning-rate "
                            "down to 0 at the last step); polynomial ((1 - progress)^--lr-power, 1 = linear decay to "
                            "0). The rate of step s (0-based) is in docs/training.md (default: constant)")
    group.add_argument("--lr-warmup-steps", type=int, default=0,
                       help=f"linear warm-up over the first N optimizer steps{what}: step s (0-based) runs at "
                            "(s+1)/N of the rate (default: 0)")
    group.add_argument("--lr-power", type=float, default=1.0,
                       help="exponent of --lr-scheduler polynomial (default: 1, a linear decay)")


def add_validation_pair_arguments(group) -> None:
    group.add_argument("--validation-image", action="append", default=None, metavar="FILE",
                       help="condition image for validation; repeat for several validation pairs, each with the "
                            "--validation-prompt at the same position (one image serves every prompt) (default: "
                            "the first sample's full condition)")
    group.add_argument("--validation-prompt", action="append", default=None, metavar="TEXT",
                       help="prompt for validation; repeat for several pairs (one prompt serves every image) "
                            "(default: the first sample's)")


def add_config_argument(group) -> None:
    group.add_argument("--config", default=None, metavar="FILE",
                       help="read the options from a TOML file (keys are the option names, e.g. learning-rate = "
                            "1e-4 or learning_rate = 1e-4) or from the args.json of an earlier run; options on the "
                            "command line override it, unknown keys are an error")


def add_convention_arguments(group, warmup_what: str = "") -> None:
    """Every subcommand's --report-to, schedule options and --config."""
    add_report_arguments(group)
    add_schedule_arguments(group, warmup_what)
    add_config_argument(group)


# ---------------------------------------------------------------------------------------------- values
def reporters(args) -> list[str]:
    return list(getattr(args, "report_to", None) or ["csv"])


def validation_pairs(prompts: list[str] | None, images: list[str] | None) -> list[tuple[str | None, str | None]]:
    """(prompt, image) pairs; None means the run's default. The same rule as
    diffusers' ControlNet scripts: equal counts pair up by position, a single
    prompt or image serves all of the other kind."""
    prompts = _as_list(prompts)
    images = _as_list(images)
    if not prompts and not images:
        return [(None, None)]
    if not images:
        return [(p, None) for p in prompts]
    if not prompts:
        return [(None, i) for i in images]
    if len(images) == 1:
        return [(p, images[0]) for p in prompts]
    if len(prompts) == 1:
        return [(prompts[0], i) for i in images]
    if len(prompts) != len(images):
        raise ValueError(f"--validation-prompt was given {len(prompts)} times and --validation-image {len(images)} "
                         f"times: give them in pairs (the same count), or a single one of either to serve all")
    return list(zip(prompts, images))


def _as_list(v):
    if v is None:
        return []
    return [v] if isinstance(v, str) else list(v)


def schedule_problems(args, total_steps: int | None = None) -> list[str]:
    problems = []
    warmup = getattr(args, "lr_warmup_steps", 0)
    if warmup < 0:
        problems.append(f"--lr-warmup-steps must be >= 0, got {warmup}")
    if total_steps is not None and warmup > total_steps:
        problems.append(f"--lr-warmup-steps {warmup} is more than the run's {total_steps} steps")
    if getattr(args, "lr_power", 1.0) <= 0:
        problems.append(f"--lr-power must be > 0, got {args.lr_power}")
    return problems


def validation_problems(args) -> list[str]:
    from pathlib import Path

    problems = []
    try:
        validation_pairs(getattr(args, "validation_prompt", None), getattr(args, "validation_image", None))
    except ValueError as e:
        problems.append(str(e))
    for image in _as_list(getattr(args, "validation_image", None)):
        if not Path(image).is_file():
            problems.append(f"--validation-image {image}: no such file")
    return problems


def lr_at(step: int, base_lr: float, scheduler: str = "constant", warmup: int = 0, total: int = 1,
          power: float = 1.0) -> float:
    """The learning rate of optimizer step ``step`` (0-based) of a ``total``-step run.

    Warm-up: step s < warmup runs at base·(s+1)/warmup (its first step already
    learns; diffusers' schedulers start at 0). After it, with
    progress p = (s − warmup)/(total − warmup) ∈ [0, 1):
    constant: base; cosine: base·½(1 + cos πp); polynomial: base·(1 − p)^power
    (diffusers' ``get_cosine_schedule_with_warmup`` with one half-cycle and
    ``get_polynomial_decay_schedule_with_warmup`` with lr_end = 0)."""
    if scheduler not in SCHEDULERS:
        raise ValueError(f"--lr-scheduler must be one of {', '.join(SCHEDULERS)}, got {scheduler!r}")
    if warmup > 0 and step < warmup:
        return base_lr * (step + 1) / warmup
    if scheduler == "constant":
        return base_lr
    progress = min(1.0, max(0.0, (step - warmup) / max(1, total - warmup)))
    if scheduler == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (1.0 - progress) ** power
