"""ComfyUI-BalancedControl: balanced multi-ControlNet sampling for ComfyUI.

Registered through the V3 entry point; see README.md.
"""

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .nodes import ALL_NODES
from .nodes.downloads import NODES as DOWNLOAD_NODES


class BalancedControlExtension(ComfyExtension):
    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return list(ALL_NODES) + DOWNLOAD_NODES


async def comfy_entrypoint() -> BalancedControlExtension:
    return BalancedControlExtension()
