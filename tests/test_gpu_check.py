"""``benchmarks/gpu_check.sh --dry-run``: the GPU check's every stage on the
CPU at tiny sizes, as the shell script starts it (the benchmarks print their
ratios, each trainer takes a bf16 step, the dtype/device tests are selected),
and nothing in it installs from an index."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from headless.runtime import REPO, comfyui_path

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("gpu-check")
    env = dict(os.environ, PYTHON=sys.executable, COMFYUI_PATH=str(comfyui_path()), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--work", str(work), "--budget", "1500"], cwd=REPO,
                          capture_output=True, text=True, timeout=1800, env=env)
    return proc, work


def _section(text: str, name: str) -> str:
    """The summary lines of one stage."""
    summary = text.split("=" * 100, 1)[1]
    start = summary.index(f"] {name}")
    end = summary.find("\n[", start)
    return summary[start: end if end > 0 else None]


def test_every_stage_runs_and_prints_its_ratios(dry_run):
    proc, work = dry_run
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"(\d+)/\1 stages ok", out), out[-3000:]
    for name, ratio in [("MIControlNet SD1.5", "MIControlNet / core ratio: median"),
                        ("MIControlNet SDXL", "MIControlNet / core ratio: median"),
                        ("ControlNeXt SD1.5", "overhead / ControlNet overhead"),
                        ("ControlNeXt SDXL", "overhead / ControlNet overhead"),
                        ("Refine-Control SD3", "student / teacher time ratio")]:
        section = _section(out, name)
        assert ratio in section, section
        assert re.search(r"\d+\.\d{3}", section.split(ratio, 1)[1]), section  # a measured figure
    assert "SDXL small UNet" in out and "torch.bfloat16" in out  # the flags reached the benchmarks
    for trainer in ("micontrolnet", "controlnext", "refine-control"):
        section = _section(out, f"training step: {trainer} bf16")
        assert re.search(r"step 1: loss \d", section), section
        assert (work / f"train-{trainer}" / "args.json").is_file()
    assert re.search(r"\d+ tests? collected|\d+/\d+ tests collected", _section(out, "dtype/device tests"))


def test_nothing_is_installed_from_an_index():
    text = SCRIPT.read_text()
    installs = [line for line in text.splitlines() if "pip install" in line and not line.lstrip().startswith("#")]
    assert installs and all("--no-index" in line and "--find-links" in line for line in installs), installs
    requirements = (REPO / "benchmarks" / "gpu_requirements.txt").read_text()
    names = {re.split(r"[<>=~ ]", line)[0].lower() for line in requirements.splitlines()
             if line.strip() and not line.startswith("#")}
    assert "torch" not in names and {"tensorboard", "pytest", "einops", "safetensors"} <= names


def test_without_a_gpu_the_full_check_says_to_use_dry_run():
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")  # a machine without CUDA, wherever the test runs
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py")], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode != 0 and "sees no CUDA device" in proc.stderr and "--dry-run" in proc.stderr
