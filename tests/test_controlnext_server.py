"""ControlNeXt end to end through ComfyUI's own server (main.py), with the
example workflows' API twins and synthetic files in the models folders."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import safetensors.torch
import torch
from PIL import Image

import comfy.utils

from headless import synthetic as syn
from headless.runtime import REPO
from headless.server import ComfyServer, copy_model

from controlnext_reference import synthetic_state_dict

WORKFLOWS = REPO / "example_workflows"
NAMES = ["controlnext_sd15", "controlnext_with_controlnet"]


def _sd15_small_unet_subset(seed: int) -> dict:
    """Absolute attention output projections for the small SD1.5 checkpoint, in
    diffusers names (the layout of the released SD1.5 unet.safetensors)."""
    unet = syn.build_unet_model(syn.SD15_UNET_SMALL, seed=0).diffusion_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for diffusers_name, comfy_name in comfy.utils.unet_to_diffusers(syn.SD15_UNET_SMALL).items():
        if ".to_out.0." in diffusers_name:
            w = unet[comfy_name]
            out[diffusers_name] = (w + 0.01 * torch.randn(w.shape, generator=g)).to(torch.float16)
    return out


def _png(path, seed):
    rng = np.random.default_rng(seed)
    img = np.zeros((64, 64, 3), np.uint8)
    img[16:48, 8 + 8 * seed: 24 + 8 * seed] = 255  # a bright block on black, like a mask or depth map
    img[rng.random((64, 64)) > 0.9] = 128
    Image.fromarray(img).save(path)


@pytest.fixture(scope="module")
def server(tmp_path_factory, small_sd15_files):
    base = tmp_path_factory.mktemp("comfy-cnx")
    names = {
        "ckpt": copy_model(small_sd15_files["checkpoint"], base / "models" / "checkpoints", "small-sd15.safetensors"),
        "cn": copy_model(small_sd15_files["controlnets"][0], base / "models" / "controlnet", "small-cn.safetensors"),
    }
    cnx_dir = base / "models" / "controlnext"
    cnx_dir.mkdir(parents=True, exist_ok=True)
    safetensors.torch.save_file(synthetic_state_dict("320", seed=40, dtype=torch.float16),
                                str(cnx_dir / "controlnext_sd15.safetensors"))
    safetensors.torch.save_file(_sd15_small_unet_subset(41), str(cnx_dir / "controlnext_sd15_unet.safetensors"))
    # A ControlNet put into the ControlNeXt folder by mistake.
    copy_model(small_sd15_files["controlnets"][1], cnx_dir, "wrong_folder_controlnet.safetensors")
    # An interrupted download: the first half of a module file.
    whole = (cnx_dir / "controlnext_sd15.safetensors").read_bytes()
    (cnx_dir / "truncated_controlnext.safetensors").write_bytes(whole[: len(whole) // 2])
    (base / "input").mkdir(parents=True, exist_ok=True)
    _png(base / "input" / "controlnext_control.png", 0)
    _png(base / "input" / "controlnet_control.png", 3)
    with ComfyServer(base, extra_args=["--cache-none"]) as srv:
        srv.names = names
        yield srv


def api_prompt(server, name, size=64, steps=2):
    prompt = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = server.names["ckpt"]
        elif node["class_type"] == "ControlNetLoader":
            inputs["control_net_name"] = server.names["cn"]
        elif node["class_type"] == "EmptyLatentImage":
            inputs.update(width=size, height=size)
        elif node["class_type"] == "KSampler":
            inputs["steps"] = steps
    return prompt


def saved_image(server, entry) -> np.ndarray:
    images = server.output_images(entry)
    assert images, f"no image was saved: {entry.get('outputs')}"
    (data,) = next(iter(images.values()))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16)


def test_nodes_and_folder_are_registered(server):
    info = server.get_json("/object_info/ControlNeXtLoader")["ControlNeXtLoader"]
    spec = info["input"]["required"]["control_file"]
    files = spec[1]["options"] if spec[0] == "COMBO" else spec[0]  # V3 and V1 combo formats
    assert {"controlnext_sd15.safetensors", "controlnext_sd15_unet.safetensors"} <= set(files)
    apply = server.get_json("/object_info/ControlNeXtApply")["ControlNeXtApply"]
    assert apply["output"] == ["MODEL"]
    assert {"model", "controlnext", "image", "strength", "start_percent", "end_percent"} <= set(apply["input"]["required"])
    assert "mask" in apply["input"]["optional"]


@pytest.mark.parametrize("name", NAMES)
def test_api_workflow_runs_and_controlnext_changes_the_image(server, name):
    prompt = api_prompt(server, name)
    with_cnx = saved_image(server, server.run(prompt, timeout=600))
    assert with_cnx.shape == (64, 64, 3)
    # The same graph with the model taken straight from the checkpoint.
    bare = api_prompt(server, name)
    sampler = next(n for n in bare.values() if n["class_type"] == "KSampler")
    sampler["inputs"]["model"] = ["1", 0]
    without = saved_image(server, server.run(bare, timeout=600))
    assert np.abs(with_cnx - without).mean() > 0.5, "ControlNeXt left the image unchanged"
    assert "control could not be applied" not in server.log_text()


def test_controlnext_with_core_controlnet(server):
    prompt = api_prompt(server, "controlnext_with_controlnet")
    node = next(n for n in prompt.values() if n["class_type"] == "MIControlNetApply")
    node["class_type"] = "ControlNetApplyAdvanced"
    img = saved_image(server, server.run(prompt, timeout=600))
    assert img.shape == (64, 64, 3)


def test_wrong_file_fails_with_a_clear_error(server):
    prompt = api_prompt(server, "controlnext_sd15")
    loader = next(n for n in prompt.values() if n["class_type"] == "ControlNeXtLoader")
    loader["inputs"]["control_file"] = "wrong_folder_controlnet.safetensors"
    with pytest.raises(RuntimeError) as e:
        server.run(prompt, timeout=600)
    assert "not a ControlNeXt control module" in str(e.value)
    assert "looks like a ControlNet" in str(e.value)


def test_truncated_file_names_it_and_says_what_to_do(server):
    prompt = api_prompt(server, "controlnext_sd15")
    loader = next(n for n in prompt.values() if n["class_type"] == "ControlNeXtLoader")
    loader["inputs"]["control_file"] = "truncated_controlnext.safetensors"
    with pytest.raises(RuntimeError) as e:
        server.run(prompt, timeout=600)
    msg = str(e.value)
    assert "truncated_controlnext.safetensors" in msg and "damaged or incomplete" in msg
    assert "Download the file again" in msg


def test_unet_subset_auto_decision_is_logged(server):
    server.run(api_prompt(server, "controlnext_sd15"), timeout=600)
    assert "controlnext_sd15_unet.safetensors applied as absolute weights" in server.log_text()


@pytest.mark.parametrize("name", NAMES)
def test_ui_workflow_matches_its_api_twin(name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert {"last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"} <= set(ui)
    ui_nodes = {str(n["id"]): n for n in ui["nodes"]}
    assert set(ui_nodes) == set(api)
    links = {l[0]: l for l in ui["links"]}
    for nid, node in api.items():
        u = ui_nodes[nid]
        assert u["type"] == node["class_type"]
        assert u["properties"]["Node name for S&R"] == node["class_type"]
        linked = {i["name"]: links[i["link"]] for i in u["inputs"] if i["link"] is not None}
        for key, value in node["inputs"].items():
            if isinstance(value, list):
                link = linked[key]
                assert [str(link[1]), link[2]] == value and str(link[3]) == nid
            else:
                assert value in u["widgets_values"], (nid, key, value)
