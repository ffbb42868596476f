"""Import ComfyUI as a library (for building models, tests and benchmarks)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGE_NAME = "balanced_control"


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
    """Put ComfyUI on sys.path and configure it before comfy.model_management is imported.

    On a machine without CUDA, ComfyUI must be told --cpu before its model
    management module is imported, or that import fails on CUDA builds of torch.
    """
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
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
    """Import this repository as the package ``balanced_control`` (the way ComfyUI
    imports a custom-node folder: a package with relative imports)."""
    import_comfy()
    if PACKAGE_NAME in sys.modules:
        return sys.modules[PACKAGE_NAME]
    spec = importlib.util.spec_from_file_location(
        PACKAGE_NAME, REPO / "__init__.py", submodule_search_locations=[str(REPO)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACKAGE_NAME] = module
    spec.loader.exec_module(module)
    return module
