"""V3 node schemas, one file per family."""

from .micontrolnet import NODES as MICONTROLNET_NODES

ALL_NODES = [*MICONTROLNET_NODES]
