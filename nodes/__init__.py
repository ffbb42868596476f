"""V3 node schemas, one file per family."""

from .controlnext import NODES as CONTROLNEXT_NODES
from .micontrolnet import NODES as MICONTROLNET_NODES
from .refine_control import NODES as REFINE_CONTROL_NODES

ALL_NODES = [*MICONTROLNET_NODES, *CONTROLNEXT_NODES, *REFINE_CONTROL_NODES]
