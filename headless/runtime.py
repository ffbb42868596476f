"""Import ComfyUI as a library (for building models, tests and benchmarks)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "balanced_control"  # the extension package's name outside ComfyUI (ComfyUI names it by its folder)


def cache_dir() -> Path:
    """Where the setup scripts and the tests cache things: $BC_CACHE, else .cache/."""
    return Path(os.environ.get("BC_CACHE", REPO / ".cache"))


def comfyui_path() -> Path:
    """The ComfyUI tree: $COMFYUI_PATH, else the one scripts/bootstrap.sh caches."""
    env = os.environ.get("COMFYUI_PATH")
    path = Path(env) if env else cache_dir() / "ComfyUI"
    if not (path / "main.py").is_file():
        raise RuntimeError(f"no ComfyUI tree at {path}; run scripts/bootstrap.sh or set COMFYUI_PATH")
    return path.resolve()


def import_comfy(force_cpu: bool | None = None):
    """Put ComfyUI and this repository on sys.path and configure ComfyUI before
    comfy.model_management is imported.

    ComfyUI's root goes first, so its top-level modules (``nodes``, ``server``)
    are never shadowed by this repository's folders; the repository root after
    it makes ``model_patches`` (and ``training``, ``headless``) importable as
    ordinary top-level packages. On a machine without CUDA, ComfyUI must be
    told --cpu before its model management module is imported, or that import
    fails on CUDA builds of torch.
    """
    root = str(comfyui_path())
    if str(REPO) in sys.path:
        sys.path.remove(str(REPO))
    if root in sys.path:
        sys.path.remove(root)
    sys.path[0:0] = [root, str(REPO)]
    import torch
    import comfy.options  # noqa: F401  (must come before comfy.cli_args parses)
    import comfy.cli_args

    if force_cpu is None:
        force_cpu = not torch.cuda.is_available()
    if force_cpu and "comfy.model_management" not in sys.modules:
        comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401
    return Path(root)


def import_extension():
    """The extension package (``__init__.py`` and ``nodes/``), loaded the way ComfyUI
    loads a custom-node folder: a package of its own, here named ``balanced_control``.

    Only the node classes are reached through it (tests, benchmarks, training's
    validation images); ``model_patches`` is imported by its own name everywhere,
    the nodes included, so there is one copy of it per process.
    """
    import_comfy()
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[PACKAGE_NAME]
        raise
    return module
