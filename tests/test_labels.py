"""Readable labels: messages and the balance map name a node as the user sees
it (its canvas title, else its display name, with its id) and the file its
CONTROL_NET / CONTROLNEXT was loaded from, never V3's internal class clone.

In-process tests give the node the hidden inputs the way ComfyUI's executor
does (``PREPARE_CLASS_CLONE``); the server tests post prompts with and without
the saved workflow (``extra_data.extra_pnginfo``) to ComfyUI's own server."""

from __future__ import annotations

import copy
import inspect
import json

import numpy as np
import pytest
import safetensors.torch
from PIL import Image

from comfy_api.latest import io

from balanced_control.nodes.common import display_name, loaded_file, node_label
from balanced_control.nodes.controlnext import ControlNeXtApply
from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetBalanceMap
from headless import synthetic
from headless.runtime import REPO
from headless.server import ComfyServer, copy_model

from controlnext_reference import synthetic_state_dict
from test_mi_sampling import mi_control, sample, tiny, with_settings  # noqa: F401

API_EXAMPLE = REPO / "example_workflows" / "api" / "micontrolnet_two_controls.json"
UI_EXAMPLE = REPO / "example_workflows" / "micontrolnet_two_controls.json"
INPUTS = REPO / "example_workflows" / "inputs"


def _prompt():
    return json.loads(API_EXAMPLE.read_text())


def _workflow(**titles):
    ui = json.loads(UI_EXAMPLE.read_text())
    for node in ui["nodes"]:
        if str(node["id"]) in titles:
            node["title"] = titles[str(node["id"])]
            if node["title"] is None:
                del node["title"]
    return ui


def _as_run(cls, uid, prompt=None, workflow=None):
    """The class as ComfyUI's executor runs it: a clone carrying the hidden inputs."""
    cls.GET_SCHEMA()
    hidden = {io.Hidden.unique_id: uid, io.Hidden.prompt: prompt,
              io.Hidden.extra_pnginfo: None if workflow is None else {"workflow": workflow}}
    if "v3_data" in inspect.signature(cls.PREPARE_CLASS_CLONE).parameters:  # ComfyUI 0.28
        return cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden})
    return cls.PREPARE_CLASS_CLONE(hidden)


def test_title_file_and_fallbacks():
    prompt = _prompt()
    run = _as_run(MIControlNetApply, "8", prompt, _workflow(**{"8": "Edges on the left"}))
    assert node_label(run, "control_net") == "Edges on the left #8 (control_v11p_sd15_canny)"
    # Without the saved workflow (API prompt): the title in the prompt's _meta.
    run = _as_run(MIControlNetApply, "9", prompt)
    assert node_label(run, "control_net") == "Apply ControlNet (Minimal Impact): pose #9 (control_v11p_sd15_openpose)"
    # Untitled node: the display name; a CONTROL_NET that is not from a loader in the prompt: no file.
    del prompt["9"]["_meta"]
    prompt["9"]["inputs"]["control_net"] = ["2", 0]  # not a loader
    run = _as_run(MIControlNetApply, "9", prompt, _workflow(**{"9": None}))
    assert node_label(run, "control_net") == "Apply ControlNet (Minimal Impact) #9"
    # Called directly, without hidden inputs.
    assert node_label(MIControlNetApply, "control_net") == display_name(MIControlNetApply) == \
        "Apply ControlNet (Minimal Impact)"
    assert display_name(ControlNeXtApply) == "Apply ControlNeXt"


def test_title_inside_a_subgraph():
    """A node in a subgraph runs as ``outer:inner``; its title is in the subgraph's definition."""
    workflow = {"nodes": [{"id": 12, "type": "a1b2-subgraph", "title": "My ControlNet group"}],
                "definitions": {"subgraphs": [{"id": "a1b2-subgraph", "nodes": [
                    {"id": 3, "type": "MIControlNetApply", "title": "Canny inside the group"}]}]}}
    prompt = {"12:3": {"class_type": "MIControlNetApply", "_meta": {"title": "Apply ControlNet (Minimal Impact)"},
                       "inputs": {"control_net": ["12:1", 0]}},
              "12:1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "canny.safetensors"}}}
    run = _as_run(MIControlNetApply, "12:3", prompt, workflow)
    assert node_label(run, "control_net") == "Canny inside the group #12:3 (canny)"
    # An id the workflow does not hold: the prompt's title.
    prompt["12:4"] = dict(prompt["12:3"], _meta={"title": "From the prompt"})
    assert node_label(_as_run(MIControlNetApply, "12:4", prompt, workflow), "control_net") == \
        "From the prompt #12:4 (canny)"


def test_file_is_followed_through_pass_through_nodes():
    prompt = {
        "1": {"class_type": "ControlNetLoader", "inputs": {"control_net_name": "sub/union_promax.safetensors"}},
        "2": {"class_type": "SetUnionControlNetType", "inputs": {"control_net": ["1", 0], "type": "canny"}},
        "3": {"class_type": "RefineControlInpaintApply", "inputs": {"control_net": ["2", 0]}},
        "4": {"class_type": "ControlNeXtLoader", "inputs": {"control_file": "controlnext_sdxl.bin"}},
        "5": {"class_type": "ControlNeXtApply", "inputs": {"controlnext": ["4", 0]}},
        "6": {"class_type": "Loop", "inputs": {"control_net": ["6", 0]}},
    }
    assert loaded_file(prompt, "3", "control_net") == "sub/union_promax"
    assert loaded_file(prompt, "5", "controlnext") == "controlnext_sdxl"
    assert loaded_file(prompt, "6", "control_net") is None  # a cycle ends, it does not hang
    assert loaded_file(None, "3", "control_net") is None


def test_labels_reach_errors_and_the_balance_map(tiny):
    prompt = _prompt()
    workflow = _workflow(**{"8": "Canny on the left", "9": "Pose on the right"})
    p, n = _as_run(MIControlNetApply, "8", prompt, workflow).execute(
        tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], 1.0, 0.0, 1.0).args
    p, n = _as_run(MIControlNetApply, "9", prompt, workflow).execute(
        p, n, tiny["cns"][1], tiny["images"][1], 1.0, 0.0, 1.0).args
    labels = [c.label for c in mi_control.iter_chain(p[0][1]["control"])]
    assert labels == ["Pose on the right #9 (control_v11p_sd15_openpose)",
                      "Canny on the left #8 (control_v11p_sd15_canny)"]
    out = sample(with_settings(tiny["patcher"], "micontrolnet"), p, n)
    rec = mi_control.find_balance_record(p)
    assert set(rec.layers[-1]["controls"]) == set(labels)
    image = MIControlNetBalanceMap.execute(p, {"samples": out}, 32).args[0]
    # The legend column grows to hold the longest label (the default 250 px would cut it).
    from PIL import ImageFont
    need = ImageFont.load_default().getlength(labels[0]) + 18 + 8
    assert need > 250 and image.shape[2] >= need + 2 * 32

    with pytest.raises(ValueError) as err:
        _as_run(MIControlNetApply, "8", prompt, workflow).execute(
            tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], 1.0, 0.9, 0.1)
    assert str(err.value).startswith("Canny on the left #8 (control_v11p_sd15_canny): ")
    assert "Clone" not in str(err.value)


# --- through ComfyUI's server ---------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_sd15_files):
    base = tmp_path_factory.mktemp("comfy-labels")
    names = {
        "ckpt": copy_model(small_sd15_files["checkpoint"], base / "models" / "checkpoints", "small-sd15.safetensors"),
        "cns": [copy_model(p, base / "models" / "controlnet", f"small-cn-{i}.safetensors")
                for i, p in enumerate(small_sd15_files["controlnets"])],
        "sdxl_cn": "tiny-sdxl-controlnet.safetensors",
        "cnx": "my_controlnext_sd15.safetensors",
    }
    synthetic.save(synthetic.controlnet_state_dict(synthetic.TINY_SDXL_UNET, seed=9),
                   base / "models" / "controlnet" / names["sdxl_cn"])
    (base / "models" / "controlnext").mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(synthetic_state_dict("320", seed=40),
                                str(base / "models" / "controlnext" / names["cnx"]))
    (base / "input").mkdir(parents=True, exist_ok=True)
    for img in INPUTS.glob("*.png"):
        (base / "input" / img.name).write_bytes(img.read_bytes())
    Image.fromarray(np.full((64, 64, 4), 255, np.uint8)).save(base / "input" / "labels_rgba.png")
    with ComfyServer(base, extra_args=["--cache-none"]) as srv:
        srv.names = names
        yield srv


def _server_prompt(server):
    prompt = _prompt()
    prompt["1"]["inputs"]["ckpt_name"] = server.names["ckpt"]
    prompt["4"]["inputs"]["control_net_name"] = server.names["cns"][0]
    prompt["5"]["inputs"]["control_net_name"] = server.names["sdxl_cn"]  # the wrong family: an error to read
    prompt["11"]["inputs"].update(width=64, height=64)
    prompt["12"]["inputs"]["steps"] = 1
    return prompt


def _error(server, prompt, workflow=None) -> str:
    """Post ``prompt`` (with the saved workflow, as the frontend sends it) and return
    ComfyUI's exception message for it."""
    payload = {"prompt": prompt, "client_id": server.client_id}
    if workflow is not None:
        payload["extra_data"] = {"extra_pnginfo": {"workflow": workflow}}
    prompt_id = server.post_json("/prompt", payload)["prompt_id"]
    with pytest.raises(RuntimeError):
        server.wait(prompt_id)
    status = server.get_json(f"/history/{prompt_id}")[prompt_id]["status"]
    errors = [m[1] for m in status["messages"] if m[0] == "execution_error"]
    assert errors, status
    return errors[0]["exception_message"]


def test_server_error_names_canvas_title_and_file(server):
    prompt = _server_prompt(server)
    msg = _error(server, prompt, _workflow(**{"9": "Pose on the right"}))
    assert msg.startswith("Pose on the right #9 (tiny-sdxl-controlnet): this ControlNet does not fit the model"), msg
    assert "MIControlNetApply" not in msg
    # The API prompt alone: its _meta title.
    msg = _error(server, prompt)
    assert msg.startswith("Apply ControlNet (Minimal Impact): pose #9 (tiny-sdxl-controlnet): "), msg


def test_server_controlnext_and_refine_control_labels(server):
    base = _server_prompt(server)
    loader = {"1": base["1"], "2": base["2"], "3": base["3"]}
    cnx = dict(copy.deepcopy(loader), **{
        "20": {"class_type": "ControlNeXtLoader", "_meta": {"title": "Load ControlNeXt"},
               "inputs": {"control_file": server.names["cnx"]}},
        "21": {"class_type": "LoadImage", "inputs": {"image": "balancedcontrol_canny_left.png"}},
        "22": {"class_type": "ControlNeXtApply", "_meta": {"title": "ControlNeXt: depth"},
               "inputs": {"model": ["1", 0], "controlnext": ["20", 0], "image": ["21", 0], "strength": 1.0,
                          "start_percent": 0.9, "end_percent": 0.1}},
        "23": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "24": {"class_type": "KSampler", "inputs": {
            "model": ["22", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["23", 0], "seed": 0,
            "steps": 1, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "25": {"class_type": "PreviewImage", "inputs": {"images": [
            "26", 0]}},
        "26": {"class_type": "VAEDecode", "inputs": {"samples": ["24", 0], "vae": ["1", 2]}},
    })
    msg = _error(server, cnx, {"nodes": [{"id": 22, "type": "ControlNeXtApply", "title": "Depth, softly"}]})
    assert msg.startswith("Depth, softly #22 (my_controlnext_sd15): "), msg

    refine = dict(copy.deepcopy(loader), **{
        "30": {"class_type": "ControlNetLoader", "_meta": {"title": "Load ControlNet Model"},
               "inputs": {"control_net_name": server.names["cns"][1]}},
        "31": {"class_type": "LoadImage", "inputs": {"image": "labels_rgba.png"}},
        "32": {"class_type": "RefineControlInpaintApply", "_meta": {"title": "Refine-Control: fill the vase"},
               "inputs": {"positive": ["2", 0], "negative": ["3", 0], "control_net": ["30", 0], "vae": ["1", 2],
                          "image": ["31", 0], "mask": ["31", 1], "strength": 1.0, "start_percent": 0.0,
                          "end_percent": 1.0, "convention": "diffusers", "wiring": "diffusers_0.29",
                          "injection": "add", "max_lambda": 20.0}},
        "33": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["32", 0], "negative": ["32", 1], "latent_image": ["34", 0], "seed": 0,
            "steps": 1, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "34": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "35": {"class_type": "PreviewImage", "inputs": {"images": ["36", 0]}},
        "36": {"class_type": "VAEDecode", "inputs": {"samples": ["33", 0], "vae": ["1", 2]}},
    })
    msg = _error(server, refine)
    assert msg.startswith("Refine-Control: fill the vase #32 (small-cn-1): "), msg
    assert "RefineControlInpaintApply" not in msg
