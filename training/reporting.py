"""Where a run's per-step figures go (``--report-to``): ``OUTPUT/log.csv``
and/or TensorBoard event files in ``OUTPUT/tensorboard`` (scalars under
``train/<field>``, validation images under ``validation/<k>``). On resume
both drop what the interrupted run wrote after the checkpoint's step (the
CSV by rewriting it, TensorBoard through ``purge_step``)."""

from __future__ import annotations

import logging
from pathlib import Path

from . import engine
from .conventions import reporters

log = logging.getLogger("training")

NOT_SCALARS = ("step",)


class Reporters:
    def __init__(self, args, output: Path, fields: list[str], resume_step: int | None):
        names = reporters(args)
        self.csv = engine.CsvLog(output / "log.csv", resume_step, fields) if "csv" in names else None
        self.tensorboard = None
        if "tensorboard" in names:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:  # tensorboard is in requirements-training.txt
                raise SystemExit(f"--report-to tensorboard needs the tensorboard package ({e}); install it with "
                                 f"pip install -r requirements-training.txt, or use --report-to csv") from e
            # purge_step: events at or after it (an interrupted run's) are dropped when this run writes its first.
            self.tensorboard = SummaryWriter(log_dir=str(output / "tensorboard"),
                                             purge_step=None if resume_step is None else resume_step + 1)

    def write(self, row: dict) -> None:
        """One optimizer step's fields (``step`` included)."""
        if self.csv is not None:
            self.csv.write(row)
        if self.tensorboard is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key in NOT_SCALARS:
                    continue
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                self.tensorboard.add_scalar(f"train/{key}", number, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        """A validation image file (HWC, 8-bit) under ``tag``."""
        if self.tensorboard is None:
            return
        import numpy as np
        from PIL import Image

        pixels = np.asarray(Image.open(path).convert("RGB"))
        self.tensorboard.add_image(tag, pixels, step, dataformats="HWC")
        self.tensorboard.flush()

    def close(self) -> None:
        if self.csv is not None:
            self.csv.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
