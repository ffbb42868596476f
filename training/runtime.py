"""Import ComfyUI and this extension's ``model_patches`` for training.

Training runs outside ComfyUI's server, so ComfyUI is put on ``sys.path`` (and
told ``--cpu`` on machines without CUDA) before anything imports
``comfy.model_management``. The extension is imported as the package the
tests and benchmarks use, so training injects with the very module the
nodes sample with.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def setup_comfy(force_cpu: bool | None = None):
    from headless.runtime import import_comfy

    return import_comfy(force_cpu)


def extension():
    from headless.runtime import import_extension

    return import_extension()


def mi_control():
    extension()
    from balanced_control.model_patches import mi_control as module

    return module


def balance():
    extension()
    from balanced_control.model_patches import balance as module

    return module


def controlnext():
    extension()
    from balanced_control.model_patches import controlnext as module

    return module
