"""``--config FILE``: a subcommand's options from a TOML file or from the
``args.json`` an earlier run wrote, with the command line overriding them.

The file's values become the parser's defaults (a required option the file
gives is no longer required), so argparse still reads the command line as
usual and a flag given there wins. Repeatable options (``--validation-prompt``)
given on the command line replace the file's list rather than extend it.
Keys are option names with ``-`` or ``_``; unknown keys are an error that
names them with the closest known names."""

from __future__ import annotations

import argparse
import difflib
import json
from pathlib import Path

# Keys of args.json that are not options of the subcommand.
RUN_KEYS = ("command", "config")


def _option_actions(parser: argparse.ArgumentParser) -> dict:
    """dest -> action of every option the parser has (help excluded)."""
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"
            and a.default is not argparse.SUPPRESS}


def config_path(argv: list[str]) -> str | None:
    """The value of ``--config`` in ``argv``, if any (the last one wins, as argparse does)."""
    found = None
    for i, token in enumerate(argv):
        if token == "--config" and i + 1 < len(argv):
            found = argv[i + 1]
        elif token.startswith("--config="):
            found = token.split("=", 1)[1]
    return found


def read_config(path: str) -> dict:
    """The options in a TOML file or a JSON object (an earlier run's args.json)."""
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"--config {path}: no such file; expected a TOML file or an earlier run's args.json")
    text = p.read_text()
    if p.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--config {path}: not valid JSON ({e}); expected an earlier run's args.json") from e
    else:
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            raise SystemExit(f"--config {path}: not valid TOML ({e}); expected lines such as "
                             f"learning-rate = 1e-4") from e
    if not isinstance(data, dict):
        raise SystemExit(f"--config {path}: expected a table of options, found {type(data).__name__}")
    return data


def _repeatable(action: argparse.Action) -> bool:
    from .conventions import _ExtendUnique

    return isinstance(action, (argparse._AppendAction, _ExtendUnique))


def _typed(action: argparse.Action, key: str, value, path: str):
    """A file value as the option would have parsed it; a wrong one is an error."""
    where = f"--config {path}: {key} = {value!r}"
    if value is None:
        return None
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise SystemExit(f"{where}: expected true or false")
        return value
    if isinstance(value, list) and not _repeatable(action):
        raise SystemExit(f"{where}: expected one value, found a list")

    def one(v):
        if isinstance(v, str) and action.type is not None:
            try:
                v = action.type(v)
            except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
                raise SystemExit(f"{where}: {e}") from e
        elif action.type in (int, float):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or action.type is int and v != int(v):
                raise SystemExit(f"{where}: expected {'a whole number' if action.type is int else 'a number'}")
            v = action.type(v)
        elif action.type is None and not isinstance(v, str):
            raise SystemExit(f"{where}: expected a string")
        if action.choices is not None and v not in action.choices:
            raise SystemExit(f"{where}: expected one of {', '.join(map(str, action.choices))}")
        return v

    if not _repeatable(action):
        return one(value)
    out = []
    for v in value if isinstance(value, list) else [value]:
        v = one(v)
        out.extend(x for x in (v if isinstance(v, list) else [v]) if x not in out or
                   isinstance(action, argparse._AppendAction))
    return out


def apply_config(parser: argparse.ArgumentParser, subcommand: str, argv: list[str]) -> dict:
    """Make the values of the ``--config`` file in ``argv`` the parser's
    defaults; returns them (dest -> value), or {} without ``--config``."""
    path = config_path(argv)
    if path is None:
        return {}
    data = read_config(path)
    actions = _option_actions(parser)
    command = data.get("command")
    if command is not None and command != subcommand:
        raise SystemExit(f"--config {path} holds the options of 'training {command}', not of 'training "
                         f"{subcommand}'; run python -m training {command} --config {path}")
    values, unknown = {}, []
    for key, value in data.items():
        if key in RUN_KEYS:
            continue
        dest = key.replace("-", "_")
        if dest not in actions:
            unknown.append(key)
            continue
        values[dest] = _typed(actions[dest], key, value, path)
    if unknown:
        known = sorted(d.replace("_", "-") for d in actions if d not in RUN_KEYS)
        parts = []
        for key in unknown:
            close = difflib.get_close_matches(key.replace("_", "-"), known, n=3, cutoff=0.6)
            parts.append(f"{key!r}" + (f" (did you mean {' or '.join(close)}?)" if close else ""))
        raise SystemExit(f"--config {path}: unknown option(s) of 'training {subcommand}': {', '.join(parts)}. "
                         f"The keys are the option names of python -m training {subcommand} --help "
                         f"(with - or _): {', '.join(known)}")
    for dest, value in values.items():
        action = actions[dest]
        if action.required and value is not None:
            action.required = False
        if _repeatable(action):
            continue  # filled in after parsing, so that the command line replaces the list
        action.default = value
    return values


def fill_repeatable(parser: argparse.ArgumentParser, args: argparse.Namespace, values: dict) -> None:
    """Repeatable options the command line left out take the file's list."""
    actions = _option_actions(parser)
    for dest, value in values.items():
        if _repeatable(actions[dest]) and getattr(args, dest, None) is None:
            setattr(args, dest, value)
