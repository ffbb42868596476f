"""Regenerate the UI-format example workflow from its API-format twin.

    BC_CACHE=... python scripts/make_ui_workflow.py

Starts ComfyUI with this extension, builds the API prompt's graph in the real
frontend with its LiteGraph API (so node sizes, slots, widget order and the
serialized format are exactly what the frontend saves), places the nodes by
LAYOUTS[name] and writes example_workflows/<name>.json. tests/test_browser.py checks
that the two files still describe the same prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from headless.browser import launch_chromium, open_app, prepare_frontend_base  # noqa: E402
from headless.server import ComfyServer  # noqa: E402

# Node id -> [x, y], per example (--name). Columns run left to right in data-flow
# order: loaders and prompts, then the two control branches (each a ControlNet
# loader over its control image, followed by its Apply node), the sampler, and
# the outputs. At the saved zoom (0.6) the node text still renders.
LAYOUTS = {
    "micontrolnet_two_controls": {
        "1": [0, 0],         # Load Checkpoint
        "10": [0, 160],      # MIControlNet Settings
        "2": [0, 400],       # Positive prompt
        "3": [0, 630],       # Negative prompt
        "4": [420, 0],       # ControlNet: canny (left)
        "6": [420, 110],     # Canny edges, left half
        "8": [760, 0],       # Apply ControlNet (Minimal Impact): canny
        "5": [1140, 0],      # ControlNet: openpose (right)
        "7": [1140, 110],    # Pose skeleton, right half
        "9": [1480, 0],      # Apply ControlNet (Minimal Impact): pose
        "12": [1840, 0],     # KSampler
        "11": [1840, 320],   # Empty Latent Image
        "13": [2150, 0],     # VAE Decode
        "14": [2150, 100],   # Save Image
        "15": [2150, 440],   # MIControlNet Balance Map
        "16": [2150, 610],   # Save Balance Map
    },
    "micontrolnet_flux_two_controls": {
        "1": [0, 0],         # Load Diffusion Model (Flux.1 dev)
        "13": [0, 130],      # MIControlNet Settings
        "2": [0, 380],       # DualCLIPLoader (Flux)
        "3": [0, 560],       # Load VAE (Flux)
        "4": [380, 0],       # Positive prompt
        "6": [380, 210],     # FluxGuidance
        "5": [380, 330],     # Negative prompt (empty; cfg 1)
        "7": [800, 0],       # Flux ControlNet: canny (left)
        "9": [800, 110],     # Canny edges, left half
        "11": [1140, 0],     # Apply ControlNet (Minimal Impact): canny
        "8": [800, 470],     # Flux ControlNet: depth (right)
        "10": [800, 580],    # Depth map, right half
        "12": [1140, 470],   # Apply ControlNet (Minimal Impact): depth
        "15": [1520, 0],     # KSampler
        "14": [1520, 320],   # EmptySD3LatentImage
        "16": [1860, 0],     # VAE Decode
        "17": [1860, 100],   # Save Image
        "18": [1860, 440],   # MIControlNet Balance Map
        "19": [1860, 610],   # Save Balance Map
    },
}
# Sizes that leave room for previews (LoadImage shows the image, SaveImage the
# result) and for the Apply nodes' full titles.
SIZES = {"LoadImage": [300, 320], "SaveImage": [300, 280], "CLIPTextEncode": [380, 170],
         "MIControlNetApply": [340, 206]}
# What KSampler's seed widget does after each run: keep the example's seed.
SEED_CONTROL = "fixed"

BUILD_JS = """
async ([prompt, layout, sizes, seedControl]) => {
  const app = window.app, LiteGraph = window.LiteGraph;
  await app.loadGraphData({last_node_id: 0, last_link_id: 0, nodes: [], links: [], groups: [],
                           config: {}, extra: {}, version: 0.4}, true, false, null);
  const graph = app.graph;
  const ids = Object.keys(prompt).sort((a, b) => Number(a) - Number(b));
  for (const id of ids) {
    const spec = prompt[id];
    const node = LiteGraph.createNode(spec.class_type);
    if (!node) throw new Error(`unknown node type ${spec.class_type}`);
    node.id = Number(id);
    if (spec._meta?.title) node.title = spec._meta.title;
    graph.add(node);
  }
  for (const id of ids) {
    const spec = prompt[id], node = graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(spec.inputs)) {
      if (Array.isArray(value)) {
        const slot = node.inputs.findIndex((i) => i.name === name);
        if (slot < 0) throw new Error(`${spec.class_type} has no input ${name}`);
        graph.getNodeById(Number(value[0])).connect(value[1], node, slot);
      } else {
        const widget = node.widgets?.find((w) => w.name === name);
        if (!widget) throw new Error(`${spec.class_type} has no widget ${name}`);
        widget.value = value;
        widget.callback?.(value);
      }
    }
    const control = node.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = seedControl;
    if (sizes[node.type]) node.size = [...sizes[node.type]];
    if (layout[id]) node.pos = [...layout[id]];
  }
  graph.updateExecutionOrder();
  return JSON.stringify(graph.serialize());
}
"""

# Frontend run-time fields that a plain export does not need to carry.
# (The graph id is a fresh UUID per session; the frontend assigns one on load.)
DROP_GRAPH_KEYS = ("id", "revision", "floatingLinks", "definitions")


def tidy(workflow: dict, view: dict) -> dict:
    for key in DROP_GRAPH_KEYS:
        workflow.pop(key, None)
    workflow["extra"] = {"ds": view}
    for node in workflow["nodes"]:
        # Core output nodes get no S&R name from the frontend; give every node one.
        node.setdefault("properties", {}).setdefault("Node name for S&R", node["type"])
        node["pos"] = [round(v, 1) for v in node["pos"]]
        node["size"] = [round(v, 1) for v in node["size"]]
        # Older frontends wrote slot_index on every output; keep the classic format.
        for index, output in enumerate(node.get("outputs", [])):
            output["slot_index"] = index
    return workflow


def build(api_path: Path, out_path: Path) -> dict:
    from playwright.sync_api import sync_playwright

    prompt = json.loads(api_path.read_text())
    layout = LAYOUTS.get(api_path.stem)
    if layout is None:
        raise SystemExit(f"no LAYOUTS entry for {api_path.stem}; add one (node id -> [x, y])")
    missing = sorted(set(prompt) - set(layout))
    if missing:
        raise SystemExit(f"no LAYOUTS position for node(s) {missing}")
    with tempfile.TemporaryDirectory() as tmp:
        base = prepare_frontend_base(Path(tmp))
        with ComfyServer(base) as server, sync_playwright() as p:
            browser = launch_chromium(p)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            open_app(page, server.url)
            workflow = json.loads(page.evaluate(BUILD_JS, [prompt, layout, SIZES, SEED_CONTROL]))
            browser.close()
    # Show the whole graph (about 2450 x 940 units) in a 1600 x 1000 window, clear of the
    # side bar and the top bars; below a zoom of about 0.57 LiteGraph drops node text.
    workflow = tidy(workflow, {"scale": 0.6, "offset": [120, 270]})
    out_path.write_text(json.dumps(workflow, indent=2) + "\n")
    return workflow


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="micontrolnet_two_controls")
    args = parser.parse_args()
    api = REPO / "example_workflows" / "api" / f"{args.name}.json"
    out = REPO / "example_workflows" / f"{args.name}.json"
    workflow = build(api, out)
    print(f"wrote {out.relative_to(REPO)}: {len(workflow['nodes'])} nodes, {len(workflow['links'])} links")


if __name__ == "__main__":
    main()
