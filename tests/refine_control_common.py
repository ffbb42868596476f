"""What the Refine-Control test modules share: tiny SD3 files, datasets, the
in-process SD3 runtime fixture, the node applied and sampled, training
arguments. Tiny SD3 configs built with ComfyUI's model code: a 4-block base
(width 256), a 3-layer teacher (wired like the 23-layer teacher on 24 blocks:
one-to-one, last block empty) and 2-layer students (wired like 12 on 24: pairs).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from balanced_control.nodes.refine_control import RefineControlInpaintApply
from headless import synthetic_sd3 as s3
from headless.runtime import REPO

from conftest import cached_model

import comfy.controlnet  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402


API_EXAMPLE = REPO / "example_workflows" / "api" / "refine_control_inpaint.json"
UI_EXAMPLE = REPO / "example_workflows" / "refine_control_inpaint.json"


@pytest.fixture(scope="module")
def sd3_runtime():
    model = s3.build_sd3_model()
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    vae_sd = {k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()}
    vae = comfy.sd.VAE(sd=vae_sd)
    student = comfy.controlnet.load_controlnet_state_dict(s3.sd3_controlnet_state_dict(num_blocks=2, seed=6))
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
    neg = [[torch.zeros(1, 7, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
    return {"patcher": patcher, "vae": vae, "student": student, "pos": pos, "neg": neg}


def _apply(rt_, mask, **kw):
    image = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(1))
    args = dict(convention="diffusers", wiring="diffusers_0.29", injection="add", max_lambda=20.0)
    args.update(kw)
    local = args.pop("local_prompt", None)
    out = RefineControlInpaintApply.execute(rt_["pos"], rt_["neg"], args.pop("control_net", rt_["student"]),
                                            rt_["vae"], image, mask, args.pop("strength", 1.0), 0.0, 1.0,
                                            local_prompt=local, **args)
    return out.args


def _sample(rt_, pos, neg):
    latent = torch.zeros(1, 16, 4, 4)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(rt_["patcher"], noise, 2, 3.0, "euler", "normal", pos, neg, latent, seed=0,
                               disable_pbar=True)


def _files():
    base = cached_model("tiny-sd3.safetensors", lambda p: s3.write_sd3_checkpoint(p), "sd3-base")
    teacher = cached_model("tiny-sd3-teacher3.safetensors",
                           lambda p: s3.write_sd3_controlnet(p, num_blocks=3, seed=5, residual_gain=0.5), "t3")
    return base, teacher


def _dataset(root, n=1, broken=True):
    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True, exist_ok=True)
    (root / "mask").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(root / "img" / f"{i}.png")
        m = np.zeros((32, 32), "uint8")
        m[8:24, 8:24] = 255
        Image.fromarray(m).save(root / "mask" / f"{i}.png")
        lines.append({"image": f"img/{i}.png", "mask": f"mask/{i}.png", "prompt": "a ball",
                      "local_prompt": "red ball"})
    if broken:
        lines.append({"image": "img/0.png", "prompt": "no mask"})
        lines.append({"image": "img/0.png", "mask": "mask/none.png", "prompt": "missing mask file"})
    (root / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    return root / "data.jsonl"


def _train_args(base, teacher, data, out, batch_size=2):
    return ["--base", str(base), "--teacher", str(teacher), "--data", str(data), "--unlabeled", str(data),
            "--layers", "2", "--stage1-steps", "4", "--stage2-steps", "4", "--batch-size", str(batch_size),
            "--resolution", "32", "--learning-rate", "2e-3", "--output", str(out), "--checkpoint-every", "2",
            "--fixed-noise", "--save-dtype", "fp32"]


def _train_env():
    import os
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def _with_metadata(src, dst, **changes):
    from safetensors import safe_open
    from safetensors.torch import save_file
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    save_file(tensors, str(dst), {k: v for k, v in meta.items() if v is not None})
    return dst


