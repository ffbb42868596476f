"""Drive ComfyUI's own frontend in a real browser (Playwright + the system's chromium).

Used by the browser test and by scripts/make_ui_workflow.py. Playwright's
bundled browsers are never downloaded: a system chromium is launched instead
($BC_CHROMIUM, else ``chromium`` on PATH, else /usr/bin/chromium).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

# Without the background-networking flags chromium keeps retrying Google
# services, which on a machine without internet only adds noise and delay.
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]

# Model files and input images the example workflow names. The frontend only
# needs the names (they fill the combo lists of /object_info); nothing is run.
EXAMPLE_MODELS = {
    "checkpoints": ["v1-5-pruned-emaonly.safetensors"],
    "controlnet": ["control_v11p_sd15_canny.safetensors", "control_v11p_sd15_openpose.safetensors"],
}
EXAMPLE_INPUTS = ["balancedcontrol_canny_left.png", "balancedcontrol_pose_right.png"]

# A first start (no settings yet) opens the template browser over the canvas;
# a profile that has been used once does not.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}


def chromium_executable() -> str:
    chosen = os.environ.get("BC_CHROMIUM")
    if chosen:
        if not Path(chosen).is_file():
            raise FileNotFoundError(f"BC_CHROMIUM={chosen} is not a file")
        return chosen
    for candidate in (shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and Path(candidate).is_file():
            return candidate
    raise FileNotFoundError("no chromium found: install Debian's chromium (scripts/run_tests.sh does) "
                            "or set BC_CHROMIUM to a chromium executable")


def launch_chromium(playwright):
    """A headless chromium; Playwright gives each launch a fresh temporary profile."""
    return playwright.chromium.launch(executable_path=chromium_executable(), args=CHROMIUM_ARGS)


def prepare_frontend_base(base: Path) -> Path:
    """Fill a ComfyUI base directory (see headless.server) for loading the example in the UI."""
    from PIL import Image

    base = Path(base)
    for folder, names in EXAMPLE_MODELS.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).touch()
    (base / "input").mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(EXAMPLE_INPUTS):
        if not (base / "input" / name).exists():
            Image.new("RGB", (64, 64), (40 * i, 0, 0)).save(base / "input" / name)
    user = base / "user" / "default"
    # The frontend lists these folders on start; a missing folder answers 404.
    for sub in ("workflows", "subgraphs"):
        (user / sub).mkdir(parents=True, exist_ok=True)
    settings = user / "comfy.settings.json"
    if not settings.exists():
        settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=1))
    return base


def open_app(page, url: str, timeout_ms: float = 120_000) -> None:
    """Open the frontend and wait until the app, its graph and the node definitions are there."""
    page.goto(url)
    page.wait_for_function(
        "() => window.app && window.app.graph && window.app.canvas && window.LiteGraph"
        " && Object.keys(window.LiteGraph.registered_node_types).length > 0",
        timeout=timeout_ms,
    )
