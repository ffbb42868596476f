"""V3 node schemas, one file per family."""

from .controlnext import NODES as CONTROLNEXT_NODES
from .micontrolnet import NODES as MICONTROLNET_NODES

ALL_NODES = [*MICONTROLNET_NODES, *CONTROLNEXT_NODES]
