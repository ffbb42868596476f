"""The balancing settings shared by every control family (one place).

``BalanceSettings`` is what ``MIControlNetSettings`` stores on a model
(``model_options["transformer_options"][SETTINGS_KEY]``, as ``settings_dict``
gives it) and what every per-call injection reads. A mode names a pair of
rules (``MODE_RULES``): how the residuals of one layer are combined (plain
``sum`` or ``add_com``, eq. 12) and how the result enters the feature
(plain ``add`` or ``add_inj``, eqs. 9-10).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ..balance import LAMBDA_CONVENTIONS, canonical_granularity

MODES = ("micontrolnet", "controlnet_star", "vanilla")
MODE_DESCRIPTIONS = {
    "micontrolnet": "add^com to combine, add^inj to inject (MIControlNet)",
    "controlnet_star": "add^com to combine, plain add to inject (ControlNet*)",
    "vanilla": "plain sum to combine, plain add to inject (core behaviour)",
}
# mode -> (combination rule, injection rule).
COMBINE_RULES = ("sum", "add_com")
INJECT_RULES = ("add", "add_inj")
MODE_RULES = {
    "micontrolnet": ("add_com", "add_inj"),
    "controlnet_star": ("add_com", "add"),
    "vanilla": ("sum", "add"),
}

# Key in model_options["transformer_options"] set by the MIControlNetSettings node.
SETTINGS_KEY = "balanced_control_settings"
# How a control's strength enters the balancing (MIControlNetSettings' strength_scaling).
STRENGTH_SCALINGS = ("paper", "linear")
STRENGTH_SCALING_DESCRIPTIONS = {
    "paper": "the residuals are scaled by the strength before add^com and add^inj, as in the paper and in "
             "core: strength also moves the weights and λ, so the effect is strongly non-linear",
    "linear": "weights and λ are computed at strength 1 and the control's term is then scaled by its "
              "strength: a single control's injected term is proportional to its strength",
}


@dataclasses.dataclass(frozen=True)
class BalanceSettings:
    """One model's balancing settings.

    ``granularity`` "layer" gives one coefficient per row and layer (the
    paper); "pixel" one per row and position (UNet pixel, DiT image token)."""
    mode: str = "micontrolnet"
    granularity: str = "layer"
    max_lambda: float = 20.0
    record_balance: bool = True
    strength_scaling: str = "paper"
    lambda_convention: str = "as_written"  # balance.injection_coefficient

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        object.__setattr__(self, "granularity", canonical_granularity(self.granularity, "BalanceSettings"))
        if not self.max_lambda >= 0:
            raise ValueError(f"max_lambda must be >= 0, got {self.max_lambda}")
        if self.strength_scaling not in STRENGTH_SCALINGS:
            raise ValueError(f"strength_scaling must be one of {STRENGTH_SCALINGS}, got {self.strength_scaling!r}")
        if self.lambda_convention not in LAMBDA_CONVENTIONS:
            raise ValueError(f"lambda_convention must be one of {LAMBDA_CONVENTIONS}, got {self.lambda_convention!r}")

    @property
    def rules(self) -> tuple[str, str]:
        """(combination rule, injection rule) of the mode."""
        return MODE_RULES[self.mode]

    @classmethod
    def from_transformer_options(cls, transformer_options: dict) -> "BalanceSettings":
        raw = transformer_options.get(SETTINGS_KEY)
        if raw is None:
            return cls()
        return cls(**raw)


def settings_dict(mode: str, granularity: str, max_lambda: float, record_balance: bool = True,
                  strength_scaling: str = "paper", lambda_convention: str = "as_written") -> dict[str, Any]:
    """Validated settings in the form stored in model_options."""
    return dataclasses.asdict(BalanceSettings(mode, granularity, float(max_lambda), bool(record_balance),
                                              strength_scaling=strength_scaling,
                                              lambda_convention=lambda_convention))
