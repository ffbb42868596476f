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
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Headless training for ComfyUI-BalancedControl checkpoints.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<subcommand>")
    for name, (help_text, add_args, _) in SUBCOMMANDS.items():
        add_args(sub.add_parser(name, help=help_text))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return SUBCOMMANDS[args.command][2](args)


if __name__ == "__main__":
    sys.exit(main())
