"""ComfyUI-BalancedControl: balanced multi-ControlNet sampling for ComfyUI.

Registered through the V3 entry point; see README.md.

Import layout (docs/architecture.md): ``model_patches`` is an ordinary
top-level package with the repository root on ``sys.path``; the nodes,
training, tests and benchmarks all import it by that one name, so a process
holds one copy of it. ComfyUI loads this folder as a package of its own
(``custom_nodes/<folder>``); the extension's own modules (this file and
``nodes/``) import each other relatively.
"""

import os
import sys

_ROOT = os.path.dirname(os.path.abspath(__file__))
if _ROOT not in sys.path:
    # Appended, so ComfyUI's own top-level modules (``nodes``, ``server``...) keep precedence.
    sys.path.append(_ROOT)

import model_patches  # noqa: E402

if os.path.realpath(os.path.dirname(os.path.dirname(model_patches.__file__))) != os.path.realpath(_ROOT):
    raise ImportError(
        f"ComfyUI-BalancedControl expected its package 'model_patches' from {_ROOT}, found "
        f"{model_patches.__file__} (another custom node or site package with that name was imported first); "
        "remove or rename the other package, or install this extension alone")

from typing_extensions import override  # noqa: E402

from comfy_api.latest import ComfyExtension, io  # noqa: E402

from .nodes import ALL_NODES  # noqa: E402
from .nodes.downloads import NODES as DOWNLOAD_NODES  # noqa: E402


class BalancedControlExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES) + DOWNLOAD_NODES


async def comfy_entrypoint() -> BalancedControlExtension:
    return BalancedControlExtension()
