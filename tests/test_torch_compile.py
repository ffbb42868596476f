"""Our graphs under core's TorchCompileModel node (inductor, CPU): the compiled
sample equals the uncompiled one within float tolerance, and nothing is
compiled again after the first sampling step. Run through
``benchmarks/bench_compile.py`` in a subprocess (ComfyUI's attention is chosen
at import, and the compile must not leak into other tests); tiny models,
2 steps."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from headless.runtime import REPO

CONFIGS = ("micontrolnet", "micontrolnet-sd3", "controlnext", "refine-control")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile") / "figures.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_compile.py"), "--steps", "2", "--backend",
               "inductor", "--configs", ",".join(CONFIGS), "--json", str(out)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=3000,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {r["config"]: r for r in json.loads(out.read_text())}, proc.stdout


@pytest.mark.parametrize("config", CONFIGS)
def test_compiled_sample_equals_uncompiled(compiled, config):
    r = compiled[0][config]
    assert r["graphs_in_first_step"] >= 1, r  # the diffusion model really ran compiled
    # inductor reorders fp32 reductions: equal up to rounding, relative to the sample's scale
    assert r["max_abs_diff"] <= 1e-3 * max(1.0, r["reference_max_abs"]), r


@pytest.mark.parametrize("config", CONFIGS)
def test_nothing_recompiles_after_the_first_step(compiled, config):
    r = compiled[0][config]
    assert r["recompiles_after_first_step"] == [] and r["graphs_after_first_step"] == 0, compiled[1]
