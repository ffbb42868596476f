"""SD3 / SD3.5 ControlNets under MIControlNetApply through ComfyUI's own server.

Files in the released layouts (an SD3 single-file checkpoint, SD3 ControlNets
in the diffusers layout, an SD3.5 ControlNet in Stability's layout) are
loaded by ComfyUI's CheckpointLoaderSimple and ControlNetLoader.
"""

import io

import pytest
from PIL import Image

from headless import synthetic, synthetic_dit, synthetic_sd3
from headless.runtime import REPO
from headless.server import ComfyServer, copy_model

from conftest import cached_model

INPUTS = REPO / "example_workflows" / "inputs"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy-dit")
    ckpt = cached_model("tiny-sd3.safetensors", lambda p: synthetic_sd3.write_sd3_checkpoint(p), "sd3-base")
    cn_dir = base / "models" / "controlnet"
    names = {"ckpt": copy_model(ckpt, base / "models" / "checkpoints", "tiny-sd3.safetensors"), "cns": []}
    for k in (51, 52):
        name = f"tiny-sd3-cn-{k}.safetensors"
        synthetic.save(synthetic_sd3.sd3_controlnet_state_dict(num_blocks=2, latent_channels=16, seed=k,
                                                               residual_gain=3.0), cn_dir / name)
        names["cns"].append(name)
    names["sd35"] = "tiny-sd35-cn.safetensors"
    synthetic.save(synthetic_dit.sd35_controlnet_state_dict(seed=53, residual_gain=3.0), cn_dir / names["sd35"])
    (base / "input").mkdir(parents=True, exist_ok=True)
    for img in INPUTS.glob("*.png"):
        (base / "input" / img.name).write_bytes(img.read_bytes())
    with ComfyServer(base, extra_args=["--cache-none"]) as srv:
        srv.names = names
        yield srv


def prompt(server, apply="MIControlNetApply", mode="micontrolnet", second=None, balance_map=True):
    images = ["balancedcontrol_canny_left.png", "balancedcontrol_pose_right.png"]
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": server.names["ckpt"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a vase on the left, a dancer on the right",
                                                          "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": server.names["cns"][0]}},
        "5": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": second or server.names["cns"][1]}},
        "6": {"class_type": "LoadImage", "inputs": {"image": images[0]}},
        "7": {"class_type": "LoadImage", "inputs": {"image": images[1]}},
        "8": {"class_type": apply, "inputs": {"positive": ["2", 0], "negative": ["3", 0], "control_net": ["4", 0],
                                              "image": ["6", 0], "strength": 0.9, "start_percent": 0.0,
                                              "end_percent": 1.0, "vae": ["1", 2]}},
        "9": {"class_type": apply, "inputs": {"positive": ["8", 0], "negative": ["8", 1], "control_net": ["5", 0],
                                              "image": ["7", 0], "strength": 1.2, "start_percent": 0.0,
                                              "end_percent": 1.0, "vae": ["1", 2]}},
        "10": {"class_type": "MIControlNetSettings",
               "inputs": {"model": ["1", 0], "mode": mode, "granularity": "layer", "max_lambda": 20.0,
                          "record_balance": True, "strength_scaling": "paper", "lambda_convention": "as_written"}},
        "11": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "12": {"class_type": "KSampler", "inputs": {"model": ["10", 0], "positive": ["9", 0], "negative": ["9", 1],
                                                   "latent_image": ["11", 0], "seed": 3, "steps": 2, "cfg": 4.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "13": {"class_type": "VAEDecode", "inputs": {"samples": ["12", 0], "vae": ["1", 2]}},
        "14": {"class_type": "SaveImage", "inputs": {"images": ["13", 0], "filename_prefix": "dit"}},
        "15": {"class_type": "MIControlNetBalanceMap",
               "inputs": {"positive": ["9", 0], "samples": ["12", 0], "cell_size": 32, "batch_index": -1}},
        "16": {"class_type": "SaveImage", "inputs": {"images": ["15", 0], "filename_prefix": "dit_map"}},
    }
    if apply != "MIControlNetApply":  # core's graph: no node of this extension
        g["12"]["inputs"]["model"] = ["1", 0]
        for node in ("10", "15", "16"):
            del g[node]
    elif not balance_map:
        for node in ("15", "16"):
            del g[node]
    return g


def image(server, graph, node="14") -> bytes:
    data = server.output_images(server.run(graph))[node][0]
    img = Image.open(io.BytesIO(data))
    img.load()
    return img.tobytes()


@pytest.mark.parametrize("second", ["sd3", "sd35"])
def test_vanilla_gives_cores_image_and_micontrolnet_differs(server, second):
    name = server.names["cns"][1] if second == "sd3" else server.names["sd35"]
    core = image(server, prompt(server, "ControlNetApplyAdvanced", second=name))
    vanilla = image(server, prompt(server, mode="vanilla", second=name, balance_map=False))
    assert vanilla == core
    balanced = server.output_images(server.run(prompt(server, second=name)))
    assert Image.open(io.BytesIO(balanced["14"][0])).tobytes() != core
    balance_map = Image.open(io.BytesIO(balanced["16"][0]))
    assert balance_map.size[0] > 200


def test_core_graph_is_unchanged_by_a_prompt_with_these_nodes(server):
    before = image(server, prompt(server, "ControlNetApplyAdvanced"))
    server.run(prompt(server))
    assert image(server, prompt(server, "ControlNetApplyAdvanced")) == before
