"""Running ``python -m training <subcommand>`` in a subprocess, for the tests
that need a real process: torchrun ranks, and SIGKILL in the middle of a run."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from headless.runtime import REPO


def training_command(subcommand: str, args: list[str], torchrun_ranks: int = 0, master_port: int = 0) -> list[str]:
    if torchrun_ranks:
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(torchrun_ranks),
                "--master_port", str(master_port), "-m", "training", subcommand, *args]
    return [sys.executable, "-m", "training", subcommand, *args]


def run_training(command: list[str], log: Path, env: dict, timeout: float = 600) -> None:
    """Run to the end; fail with the log's tail otherwise."""
    with open(log, "w") as f:
        proc = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout)
    assert proc.returncode == 0, log.read_text()[-4000:]


def kill_at_first_checkpoint(command: list[str], out: Path, log: Path, env: dict, timeout: float = 300) -> int:
    """Start a run, SIGKILL it as soon as its first checkpoint (step 2) is on
    disk, and return its exit code (-SIGKILL if it was killed mid-run)."""
    with open(log, "w") as f:
        proc = subprocess.Popen(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env=env)
        first = out / "checkpoints" / "step-00000002" / "state.json"
        deadline = time.time() + timeout
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    return proc.returncode


def remove_checkpoints(root: Path) -> None:
    """Delete the resumable checkpoints (weights plus optimizer state, the bulk
    of a run's disk use) under ``root`` once a module's tests are done with them."""
    for folder in Path(root).rglob("checkpoints"):
        if folder.is_dir():
            shutil.rmtree(folder, ignore_errors=True)
