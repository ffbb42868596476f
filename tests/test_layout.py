"""The repository's layout rules: no import cycles, one way into ``model_patches``,
and the extension loading through ComfyUI's own custom-node loader."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys

from headless.runtime import REPO, comfyui_path


def _import_graph():
    spec = importlib.util.spec_from_file_location("import_graph", REPO / "scripts" / "import_graph.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_no_import_cycles_in_the_repository_packages():
    ig = _import_graph()
    g = ig.graph()
    assert "training.controlnext" in g and "model_patches.mi_control" in g  # the graph sees the packages
    assert ig.cycles(g) == []


def test_the_cycle_finder_finds_a_cycle():
    ig = _import_graph()
    assert ig.cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_model_patches_is_imported_by_its_own_name_only():
    """No alias package (``balanced_control.model_patches``) and no relative hop from the
    extension into it: one module object per process, for nodes and training alike."""
    bad = re.compile(r"balanced_control\.model_patches|from \.\.+model_patches|import_extension\(\)\.model_patches")
    offenders = [f"{p.relative_to(REPO)}:{i}" for pkg in ("model_patches", "training", "nodes", "headless",
                                                          "tests", "benchmarks", "scripts")
                 for p in (REPO / pkg).rglob("*.py") if p.name != "test_layout.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if bad.search(line)]
    assert offenders == []


_LOAD_LIKE_COMFYUI = r"""
import asyncio, json, sys
sys.argv = ["main.py", "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.cli_args
comfy.cli_args.args.cpu = True
import nodes
ok = asyncio.run(nodes.load_custom_node(REPO_PATH))
ext = [m for n, m in sys.modules.items() if n.endswith(".nodes.micontrolnet")]
import model_patches.mi_control, model_patches.balance
import training.objectives
opts = training.objectives.injection_options()
print(json.dumps({
    "loaded": ok,
    "node_modules": len(ext),
    "same_mi_control": all(m.mi_control is model_patches.mi_control for m in ext if hasattr(m, "mi_control"))
                       and all(getattr(m, "MinimalImpactControl", None) is model_patches.mi_control.MinimalImpactControl
                               for m in ext),
    "copies": sorted(n for n in sys.modules if n.endswith(".mi_control")),
    "training_key": model_patches.mi_control.SETTINGS_KEY in opts,
    "shadowed_nodes": not hasattr(nodes, "NODE_CLASS_MAPPINGS"),
}))
"""


def test_comfyui_loads_the_extension_from_custom_nodes_with_one_model_patches():
    """ComfyUI's own loader (nodes.load_custom_node, as for a folder in custom_nodes/) runs
    the extension; its nodes, training and a plain import share one ``model_patches``."""
    env = {**os.environ, "PYTHONPATH": str(comfyui_path())}
    code = _LOAD_LIKE_COMFYUI.replace("REPO_PATH", repr(str(REPO)))
    done = subprocess.run([sys.executable, "-c", code], cwd=comfyui_path(), env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] is True, done.stderr[-3000:]
    assert result["node_modules"] == 1
    assert result["same_mi_control"] is True
    assert result["copies"] == ["model_patches.mi_control"]
    assert result["training_key"] is True
    assert result["shadowed_nodes"] is False
