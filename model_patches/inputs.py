"""Checks of the inputs the Apply nodes share, with messages that say what was
expected, what was found and what to do. Raised at node execution."""

from __future__ import annotations

import torch


def check_image(image, label: str, channels: tuple[int, ...] = (1, 3, 4)) -> None:
    """An IMAGE batch (B, H, W, C) with C in ``channels``."""
    if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[-1] not in channels:
        shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
        raise ValueError(f"{label}: expected an IMAGE batch shaped (B, H, W, 3), got {shape}. "
                         f"Connect an image output (e.g. Load Image or a preprocessor).")


def check_percent_range(start_percent: float, end_percent: float, label: str) -> None:
    if start_percent > end_percent:
        raise ValueError(f"{label}: start_percent ({start_percent}) is after end_percent ({end_percent}); "
                         f"the control would never run. Swap them.")
