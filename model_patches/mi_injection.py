"""Compatibility names: the UNet injection now lives in ``injection.unet_sites``."""

from .injection.engine import INACTIVE_KEY, BalanceRecord, ControlEntry as _ControlEntry  # noqa: F401
from .injection.unet_sites import INJECTION_KEY, WRAPPER_KEY, UNetInjection as BalancedInjection  # noqa: F401
