"""End to end through ComfyUI's own server (main.py) with this extension loaded."""

import io
import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from headless import synthetic
from headless.runtime import REPO
from headless.server import ComfyServer, copy_model

API_EXAMPLE = REPO / "example_workflows" / "api" / "micontrolnet_two_controls.json"
INPUTS = REPO / "example_workflows" / "inputs"


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_sd15_files):
    base = tmp_path_factory.mktemp("comfy-base")
    names = {
        "ckpt": copy_model(small_sd15_files["checkpoint"], base / "models" / "checkpoints", "small-sd15.safetensors"),
        "cns": [copy_model(p, base / "models" / "controlnet", f"small-cn-{i}.safetensors")
                for i, p in enumerate(small_sd15_files["controlnets"])],
    }
    names["sdxl_cn"] = "tiny-sdxl-controlnet.safetensors"
    synthetic.save(synthetic.controlnet_state_dict(synthetic.TINY_SDXL_UNET, seed=9),
                   base / "models" / "controlnet" / names["sdxl_cn"])
    (base / "input").mkdir(parents=True, exist_ok=True)
    for img in INPUTS.glob("*.png"):
        (base / "input" / img.name).write_bytes(img.read_bytes())
    # --cache-none: every prompt re-executes, so a repeated prompt really re-runs.
    with ComfyServer(base, extra_args=["--cache-none"]) as srv:
        srv.names = names
        yield srv


def example_prompt(server, size=64, steps=2):
    prompt = json.loads(API_EXAMPLE.read_text())
    prompt["1"]["inputs"]["ckpt_name"] = server.names["ckpt"]
    prompt["4"]["inputs"]["control_net_name"] = server.names["cns"][0]
    prompt["5"]["inputs"]["control_net_name"] = server.names["cns"][1]
    prompt["11"]["inputs"].update(width=size, height=size)
    prompt["12"]["inputs"]["steps"] = steps
    return prompt


def core_only_prompt(server, size=64):
    """The same graph with core's ControlNetApplyAdvanced and no node of this extension."""
    prompt = example_prompt(server, size)
    for node in ("8", "9"):
        prompt[node]["class_type"] = "ControlNetApplyAdvanced"
    prompt["12"]["inputs"]["model"] = ["1", 0]
    for node in ("10", "15", "16"):
        del prompt[node]
    return prompt


def png(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_nodes_are_registered_with_their_contract(server):
    info = server.get_json("/object_info")
    for node in ("MIControlNetApply", "MIControlNetSettings", "MIControlNetBalanceMap"):
        assert node in info, f"{node} missing from /object_info; log:\n{server.log_tail()}"
    apply = info["MIControlNetApply"]["input"]
    assert list(apply["required"]) == ["positive", "negative", "control_net", "image", "strength",
                                       "start_percent", "end_percent"]
    assert set(apply["optional"]) == {"vae", "mask"}
    strength = apply["required"]["strength"][1]
    assert (strength["default"], strength["min"], strength["max"]) == (1.0, 0.0, 10.0)
    assert info["MIControlNetApply"]["output"] == ["CONDITIONING", "CONDITIONING"]
    assert info["MIControlNetBalanceMap"]["output"] == ["IMAGE"]
    assert "(IMPORT FAILED)" not in "\n".join(
        line for line in server.log_text().splitlines() if "BalancedControl" in line)


def test_example_workflow_runs_and_images_come_back(server):
    entry = server.run(example_prompt(server))
    images = server.output_images(entry)
    image = png(images["14"][0])
    assert image.size == (64, 64)
    balance_map = png(images["16"][0])
    assert balance_map.size[0] > 200 and balance_map.size[1] > 200
    # The map is not blank: it draws two controls' colours.
    assert len(set(balance_map.convert("RGB").tobytes()[i:i + 3] for i in range(0, balance_map.size[0] * balance_map.size[1] * 3, 3))) > 50


def test_core_graph_is_unchanged_by_a_prompt_with_these_nodes(server):
    before = server.output_images(server.run(core_only_prompt(server)))["14"][0]
    server.run(example_prompt(server))
    after = server.output_images(server.run(core_only_prompt(server)))["14"][0]
    assert png(before).tobytes() == png(after).tobytes()
    # ...and the minimal-impact graph really differs from core's plain sums.
    balanced = server.output_images(server.run(example_prompt(server)))["14"][0]
    assert png(balanced).tobytes() != png(after).tobytes()


MODEL_PATCH_NODES = {
    "FreeU": {"class_type": "FreeU", "inputs": {"model": ["1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
    "DeepShrink": {"class_type": "PatchModelAddDownscale",
                   "inputs": {"model": ["1", 0], "block_number": 1, "downscale_factor": 2.0, "start_percent": 0.0,
                              "end_percent": 0.6, "downscale_after_skip": True, "downscale_method": "bicubic",
                              "upscale_method": "bicubic"}},
    "FreeU_V2": {"class_type": "FreeU_V2", "inputs": {"model": ["1", 0], "b1": 1.3, "b2": 1.4, "s1": 0.9, "s2": 0.2}},
    "PAG": {"class_type": "PerturbedAttentionGuidance", "inputs": {"model": ["1", 0], "scale": 3.0}},
    "SAG": {"class_type": "SelfAttentionGuidance", "inputs": {"model": ["1", 0], "scale": 0.5, "blur_sigma": 2.0}},
}


@pytest.mark.parametrize("patch", list(MODEL_PATCH_NODES))
def test_model_patches_compose_through_the_server(server, patch):
    """FreeU, Deep Shrink, FreeU_V2, PAG, SAG on the model: vanilla gives core's image, micontrolnet runs
    and draws its map."""
    core = core_only_prompt(server)
    core["20"] = MODEL_PATCH_NODES[patch]
    core["12"]["inputs"]["model"] = ["20", 0]
    core_image = png(server.output_images(server.run(core))["14"][0])
    plain = core_only_prompt(server)
    assert core_image.tobytes() != png(server.output_images(server.run(plain))["14"][0]).tobytes()

    prompt = example_prompt(server)
    prompt["20"] = MODEL_PATCH_NODES[patch]
    prompt["10"]["inputs"]["model"] = ["20", 0]
    prompt["10"]["inputs"]["mode"] = "vanilla"
    images = server.output_images(server.run(prompt))
    assert png(images["14"][0]).tobytes() == core_image.tobytes()
    prompt["10"]["inputs"]["mode"] = "micontrolnet"
    images = server.output_images(server.run(prompt))
    assert png(images["14"][0]).tobytes() != core_image.tobytes()
    assert png(images["16"][0]).size[1] > 200


def test_template_browser_lists_the_example(server):
    templates = server.get_json("/workflow_templates")
    ours = [names for module, names in templates.items() if "BalancedControl" in module]
    assert ours and "micontrolnet_two_controls" in ours[0]


def test_wrong_family_error_reaches_the_user(server):
    """An SDXL ControlNet on the SD1.5 model fails with a message naming both, not a torch trace."""
    prompt = example_prompt(server)
    prompt["5"]["inputs"]["control_net_name"] = server.names["sdxl_cn"]
    with pytest.raises(RuntimeError) as err:
        server.run(prompt)
    msg = str(err.value)
    assert "does not fit the model" in msg and "SDXL" in msg and "SD1.5" in msg


def test_bad_percent_range_error_reaches_the_user(server):
    prompt = example_prompt(server)
    prompt["8"]["inputs"]["start_percent"] = 0.9
    prompt["8"]["inputs"]["end_percent"] = 0.1
    with pytest.raises(RuntimeError) as err:
        server.run(prompt)
    assert "Swap them" in str(err.value)


def run_demo(tmp_path, *flags):
    out = tmp_path / "out"
    env = dict(os.environ)
    proc = subprocess.run([sys.executable, "-m", "headless.demo", "--output", str(out),
                           "--base-directory", str(tmp_path / "base"), *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


def test_main_job_with_small_random_model(tmp_path):
    out, stdout = run_demo(tmp_path, "--small-random-model", "--size", "64", "--steps", "1")
    assert "RANDOMLY INITIALISED" in stdout
    assert png((out / "micontrolnet_image.png").read_bytes()).size == (64, 64)
    assert (out / "micontrolnet_balance_map.png").stat().st_size > 1000


def test_main_job_full_architecture_one_tiny_step(tmp_path):
    """The default main job: full-size SD1.5 architecture with random weights, one step at 64 px."""
    out, stdout = run_demo(tmp_path, "--size", "64", "--steps", "1")
    assert "full-architecture SD1.5" in stdout
    assert png((out / "micontrolnet_image.png").read_bytes()).size == (64, 64)
    balance_map = png((out / "micontrolnet_balance_map.png").read_bytes())
    # Full SD1.5: 12 skip layers + the middle block are drawn (13 rows of 64 px cells).
    assert balance_map.size[1] > 13 * 64
