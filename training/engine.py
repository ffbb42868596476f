"""Run infrastructure shared by the training subcommands: distributed setup,
precision, seeding, resumable checkpoints, CSV log and progress bar."""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import logging
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger("training")

PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
SAVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


# --------------------------------------------------------------------------
# distributed
# --------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self):
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_mean(self, value: float) -> float:
        if not self.enabled:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self.device if self.device.type == "cuda" else "cpu")
        torch.distributed.all_reduce(t)
        return float(t) / self.world


def init_distributed(device_arg: str = "auto") -> Dist:
    """One process per rank, as started by ``torchrun`` (RANK/WORLD_SIZE/LOCAL_RANK
    in the environment). NCCL on CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                             rank=rank, world_size=world)
    return Dist(rank, world, local_rank, device)


def shutdown_distributed():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------
# seeding and precision
# --------------------------------------------------------------------------

def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False


def network_dtypes(precision: str) -> dict:
    """The dtype each frozen network of the base checkpoint is loaded in under
    ``--mixed-precision precision``, as ``models.load_base_model`` keywords.

    Passed explicitly, since ComfyUI otherwise picks fp16 on CUDA whatever was
    asked for. ``no``: everything fp32. ``bf16``: everything bf16. ``fp16``:
    UNet and text encoder fp16, the VAE fp32 (SD VAEs overflow in fp16:
    NaN latents, diffusers #9422). Trained networks are always fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"--mixed-precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    dtype = PRECISIONS[precision] or torch.float32
    return {"dtype": dtype, "text_encoder_dtype": dtype,
            "vae_dtype": torch.float32 if dtype == torch.float16 else dtype}


def needs_loss_scaler(precision: str, unet_compute_dtype: torch.dtype) -> bool:
    """Gradients that pass through fp16 activations underflow without loss
    scaling: on whenever the UNet computes in fp16 or fp16 autocast is on;
    bf16 and fp32 need none."""
    return precision == "fp16" or unet_compute_dtype == torch.float16


def autocast_context(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": json.dumps(random.getstate()),
        "numpy": json.dumps([v.tolist() if isinstance(v, np.ndarray) else v for v in np.random.get_state()]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    py = json.loads(state["python"])
    random.setstate((py[0], tuple(py[1]), py[2]))
    npst = json.loads(state["numpy"])
    np.random.set_state((npst[0], np.array(npst[1], dtype=np.uint32), *npst[2:]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------

def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(str(path), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_tensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    """Write a safetensors file and sync it to disk.

    safetensors reports a failed write (full disk, quota, I/O error) as its own
    ``SafetensorError``, not as ``OSError``; such a failure is raised here as
    ``OSError`` with the errno of the underlying error, so callers handle
    every failed write in one place. Other safetensors errors pass unchanged."""
    import safetensors
    import safetensors.torch

    try:
        safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path),
                                    metadata=metadata)
    except safetensors.SafetensorError as e:
        message = str(e)
        # "I/O error: ... (os error 28)" (safetensors 0.5+) or "IoError(Os { code: 28, ... })" (0.4)
        found = re.search(r"os error (\d+)|code: (\d+)", message)
        if not found and not re.search(r"i/o error|ioerror", message, re.IGNORECASE):
            raise
        code = int(found.group(1) or found.group(2)) if found else errno.EIO
        raise OSError(code, f"{os.strerror(code)} while writing {path} ({message})") from e
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def save_tensors_atomically(tensors: dict, path: Path, metadata: dict | None = None) -> Path:
    """``save_tensors`` into ``path.partial``, then renamed onto ``path``: a
    failed write never leaves a truncated file under the final name."""
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    try:
        save_tensors(tensors, tmp, metadata)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    tmp.replace(path)
    return path


def load_tensors(path: Path) -> dict:
    import safetensors.torch

    return safetensors.torch.load_file(str(path))


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """An optimizer state as (flat tensors for safetensors, JSON-able rest)."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict, rest: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    for key, v in rest["scalars"].items():
        idx, k = key.split(".", 1)
        state.setdefault(int(idx), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": rest["param_groups"]})


class CheckpointStore:
    """``OUTPUT/checkpoints/step-NNNNNNNN/`` folders, written atomically.

    A checkpoint is written into ``.tmp-step-N`` and renamed into place only
    when every file is complete and synced, so a crash or a full disk during
    the write leaves the previous checkpoints untouched; leftovers of an
    interrupted write are removed at the next save. ``state.json`` is the last
    file written, and only folders holding it count as checkpoints."""

    def __init__(self, root: Path, keep: int = 3):
        self.root = Path(root)
        self.keep = keep

    def completed(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.glob("step-*") if p.is_dir() and (p / "state.json").is_file()]
        return sorted(found, key=lambda p: int(p.name.split("-")[1]))

    def latest(self) -> Path | None:
        done = self.completed()
        return done[-1] if done else None

    def resolve(self, spec: str) -> Path:
        """``latest`` or a checkpoint folder."""
        if spec == "latest":
            p = self.latest()
            if p is None:
                raise FileNotFoundError(f"--resume latest: no checkpoint in {self.root} yet")
            return p
        p = Path(spec)
        if not (p / "state.json").is_file():
            raise FileNotFoundError(f"--resume {spec}: not a complete checkpoint folder (no state.json)")
        return p

    def tmp_path(self, step: int) -> Path:
        return self.root / f".tmp-step-{step:08d}"

    def begin(self, step: int) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        for stale in self.root.glob(".tmp-step-*"):
            shutil.rmtree(stale, ignore_errors=True)
        tmp = self.tmp_path(step)
        tmp.mkdir()
        return tmp

    def commit(self, step: int) -> Path:
        tmp, final = self.tmp_path(step), self.root / f"step-{step:08d}"
        if final.exists():  # a re-run of the same step after a resume
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        for old in self.completed()[:-self.keep] if self.keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def abort(self, step: int) -> None:
        shutil.rmtree(self.tmp_path(step), ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=1, default=str)
        f.flush()
        os.fsync(f.fileno())


# --------------------------------------------------------------------------
# logging
# --------------------------------------------------------------------------

class CsvLog:
    """``log.csv``: one row per optimizer step. On resume, rows after the
    checkpoint's step (written by the interrupted run) are dropped first."""

    FIELDS = ["step", "loss", "task_loss", "qc_loss", "lr", "samples_per_s", "elapsed_s"]

    def __init__(self, path: Path, resume_step: int | None, fields: list[str] | None = None):
        self.fields = list(fields or self.FIELDS)
        self.path = Path(path)
        rows = []
        if resume_step is not None and self.path.is_file():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "w", newline="")
        self._w = csv.DictWriter(self._f, fieldnames=self.fields)
        self._w.writeheader()
        for r in rows:
            self._w.writerow(r)
        self._f.flush()

    def write(self, row: dict) -> None:
        self._w.writerow({k: row.get(k, "") for k in self.fields})
        self._f.flush()

    def close(self):
        self._f.close()


def read_csv_log(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def progress_bar(total: int, initial: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True,
                desc="training")


def gradients_finite(optimizer: torch.optim.Optimizer, loss_finite: bool, dist: "Dist") -> bool:
    """Whether every rank's loss and every gradient of ``optimizer`` are finite
    (one fp32 reduction per tensor, one all-reduce); checked before a step so
    that no non-finite value ever reaches the weights."""
    ok = bool(loss_finite)
    if ok:
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            total = torch.stack([g.sum(dtype=torch.float32) for g in grads]).sum()
            ok = bool(torch.isfinite(total))
    return dist.all_reduce_mean(1.0 if ok else 0.0) == 1.0


class SkippedSteps:
    """Counts consecutive optimizer steps skipped for non-finite values and ends
    the run, with what to do about it, after ``limit`` of them in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    def record(self, step: int, skipped: bool, fp16: bool) -> None:
        if not skipped:
            self.consecutive = 0
            return
        self.consecutive += 1
        self.total += 1
        log.warning("step %d skipped: non-finite loss or gradients (%d in a row, %d in all); the weights are "
                    "unchanged", step, self.consecutive, self.total)
        if self.limit and self.consecutive >= self.limit:
            hint = ("fp16 loss scaling could not recover; use --mixed-precision bf16 or no"
                    if fp16 else "lower --learning-rate, keep --max-grad-norm on, or check the data")
            raise SystemExit(f"training: {self.consecutive} consecutive steps (up to step {step}) had non-finite "
                             f"loss or gradients and were skipped; stopping. The weights of the last checkpoint "
                             f"are finite. To continue: {hint}, then --resume latest.")


class StepTimer:
    def __init__(self):
        self.t = time.perf_counter()

    def lap(self) -> float:
        now = time.perf_counter()
        dt, self.t = now - self.t, now
        return dt
