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

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "example_workflows"

# API input name -> the models folder its file comes from.
MODEL_INPUT_FOLDERS = {
    "ckpt_name": "checkpoints", "control_net_name": "controlnet", "vae_name": "vae",
    "unet_name": "diffusion_models", "control_file": "controlnext", "unet_file": "controlnext",
    "clip_name1": "text_encoders", "clip_name2": "text_encoders", "clip_name": "text_encoders",
}


def example_model_files() -> dict[str, set[str]]:
    """models folder -> the file names the example workflows' API twins use."""
    out: dict[str, set[str]] = {}
    for path in sorted((EXAMPLES / "api").glob("*.json")):
        for spec in json.loads(path.read_text()).values():
            for name, value in spec.get("inputs", {}).items():
                if name in MODEL_INPUT_FOLDERS and isinstance(value, str) and value != "none":
                    out.setdefault(MODEL_INPUT_FOLDERS[name], set()).add(value)
    return out


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
    """Fill a ComfyUI base directory (see headless.server) for loading the examples in the UI.

    The frontend only needs the model file names (they fill the combo lists of
    /object_info), so empty placeholders stand in for the weights; the control
    images are the real ones shipped in example_workflows/inputs."""
    base = Path(base)
    for folder, names in example_model_files().items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / folder / name).touch()
    (base / "input").mkdir(parents=True, exist_ok=True)
    for image in (EXAMPLES / "inputs").glob("*.png"):
        shutil.copy2(image, base / "input" / image.name)
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
