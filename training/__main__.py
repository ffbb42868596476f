"""``python -m training <subcommand>``."""

import argparse
import sys

SUBCOMMANDS: dict = {}


def _register():
    # Heavy modules (torch, ComfyUI) are imported by each subcommand's run(),
    # so --help answers at once.
    from . import controlnext, download, evaluate, micontrolnet, refine_control

    SUBCOMMANDS["micontrolnet"] = (micontrolnet.HELP, micontrolnet.add_arguments, micontrolnet.run)
    SUBCOMMANDS["controlnext"] = (controlnext.HELP, controlnext.add_arguments, controlnext.run)
    SUBCOMMANDS["eval"] = (evaluate.HELP, evaluate.add_arguments, evaluate.run)
    SUBCOMMANDS["refine-control"] = (refine_control.HELP, refine_control.add_arguments, refine_control.run)
    SUBCOMMANDS["refine-control-eval"] = (refine_control.EVAL_HELP, refine_control.add_eval_arguments,
                                          refine_control.run_eval)
    SUBCOMMANDS["download"] = (download.HELP, download.add_arguments, download.run)


_register()


def main(argv=None) -> int:
    args = parse_args(argv)
    if args is None:
        return 0
    return SUBCOMMANDS[args.command][2](args)


def parse_args(argv=None):
    """The options of ``python -m training ...`` (with ``--config`` read), or
    None when no subcommand was named (the help is printed)."""
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Headless training for ComfyUI-BalancedControl checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    subparsers = {}
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        subparsers[name] = sub.add_parser(name, help=help_text)
        add_args(subparsers[name])
    argv = list(sys.argv[1:] if argv is None else argv)
    from_file = {}
    if argv and argv[0] in subparsers:
        # --config FILE: its values become the subcommand's defaults; the command line overrides them.
        from .config import apply_config

        from_file = apply_config(subparsers[argv[0]], argv[0], argv[1:])
    args = parser.parse_args(argv)
    if from_file:
        from .config import fill_repeatable

        fill_repeatable(subparsers[args.command], args, from_file)
    if args.command is None:
        parser.print_help()
        return None
    return args


if __name__ == "__main__":
    sys.exit(main())
