"""Import ComfyUI for training; the one way training reaches the extension.

Training runs outside ComfyUI's server, so ComfyUI is put on ``sys.path`` (and
told ``--cpu`` on machines without CUDA) before anything imports
``comfy.model_management``; the repository root goes on ``sys.path`` after
it. Training then imports ``model_patches`` as the ordinary package it is
(``from model_patches import mi_control``), the same modules the nodes sample
with. Node classes, where training samples exactly as a node does, come from
``nodes()``.
"""

from __future__ import annotations

import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:
    sys.path.insert(0, str(_REPO))


def setup_comfy(force_cpu: bool | None = None):
    """ComfyUI importable and configured, ``model_patches`` importable; returns ComfyUI's root."""
    from headless.runtime import import_comfy

    return import_comfy(force_cpu)


def nodes():
    """The extension's ``nodes`` package (loaded as ComfyUI loads the extension)."""
    from headless.runtime import import_extension

    return import_extension().nodes
