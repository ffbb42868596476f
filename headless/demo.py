"""The main job: run the two-ControlNet MIControlNet example through a headless ComfyUI.

    python -m headless.demo [--checkpoint FILE] [--controlnet CANNY POSE] [--output DIR] ...

(``scripts/run_demo.sh`` sets everything up first and then runs this.)

It starts ComfyUI's own server with this extension, queues
``example_workflows/api/micontrolnet_two_controls.json`` through the HTTP API,
writes the generated image and the balance map into the output folder, and
stops the server.

Weights: files named with the flags are used; otherwise the files the example
names are looked up in ComfyUI's models folders (``$COMFYUI_PATH/models``);
if they are not there either, randomly initialised full-architecture SD1.5
checkpoint and ControlNets are built (cached) and the run says so: their
images are noise, but every node, loader and sampling step is the real one.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from .runtime import REPO, cache_dir, comfyui_path

WORKFLOW = REPO / "example_workflows" / "api" / "micontrolnet_two_controls.json"
INPUTS = REPO / "example_workflows" / "inputs"
CHECKPOINT_NODE, CANNY_NODE, POSE_NODE = "1", "4", "5"
CANNY_IMAGE_NODE, POSE_IMAGE_NODE = "6", "7"
LATENT_NODE, SAMPLER_NODE, SETTINGS_NODE = "11", "12", "10"
IMAGE_SAVE_NODE, MAP_SAVE_NODE = "14", "16"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m headless.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", type=Path, help="an SD1.5 single-file checkpoint (.safetensors/.ckpt)")
    p.add_argument("--controlnet", type=Path, nargs=2, metavar=("CANNY", "POSE"),
                   help="two SD1.5 ControlNet files: the first for the canny image, the second for the pose image")
    p.add_argument("--canny-image", type=Path, default=INPUTS / "balancedcontrol_canny_left.png")
    p.add_argument("--pose-image", type=Path, default=INPUTS / "balancedcontrol_pose_right.png")
    p.add_argument("--prompt", help="positive prompt (default: the example's)")
    p.add_argument("--output", type=Path, default=Path("output"), help="folder for the image and the balance map")
    p.add_argument("--mode", choices=["micontrolnet", "controlnet_star", "vanilla"], default="micontrolnet")
    p.add_argument("--granularity", choices=["layer", "pixel"], default="layer")
    p.add_argument("--max-lambda", type=float, default=20.0)
    p.add_argument("--size", type=int, help="image width and height (default 512 with real weights, 256 with random ones)")
    p.add_argument("--steps", type=int, help="sampling steps (default 20 with real weights, 2 with random ones)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--small-random-model", action="store_true",
                   help="with no weights given: build a small SD1.5-family UNet instead of the full architecture "
                        "(much faster on CPU; used by the tests)")
    p.add_argument("--base-directory", type=Path,
                   help="ComfyUI base directory for this run (default: a folder in the cache)")
    p.add_argument("--keep-server-log", action="store_true", help="copy ComfyUI's log into the output folder")
    return p.parse_args(argv)


def resolve_weights(args) -> tuple[Path, list[Path], bool]:
    """(checkpoint, [canny_cn, pose_cn], random?)"""
    prompt = json.loads(WORKFLOW.read_text())
    if args.checkpoint or args.controlnet:
        if not (args.checkpoint and args.controlnet):
            sys.exit("give both --checkpoint and --controlnet CANNY POSE, or neither")
        for f in [args.checkpoint, *args.controlnet]:
            if not f.is_file():
                sys.exit(f"no such file: {f}")
        return args.checkpoint, list(args.controlnet), False

    models = comfyui_path() / "models"
    ckpt = models / "checkpoints" / prompt[CHECKPOINT_NODE]["inputs"]["ckpt_name"]
    cns = [models / "controlnet" / prompt[n]["inputs"]["control_net_name"] for n in (CANNY_NODE, POSE_NODE)]
    if ckpt.is_file() and all(c.is_file() for c in cns):
        print(f"Using the example's weights from {models}")
        return ckpt, cns, False

    from . import synthetic

    kind = "small SD1.5-family" if args.small_random_model else "full-architecture SD1.5"
    config = synthetic.SD15_UNET_SMALL if args.small_random_model else synthetic.SD15_UNET
    tag = "small" if args.small_random_model else "full"
    folder = cache_dir() / "demo-models"
    ckpt = folder / f"random-sd15-{tag}.safetensors"
    cns = [folder / f"random-controlnet-{tag}-{i}.safetensors" for i in (1, 2)]
    print("=" * 78)
    print(f"NO MODEL WEIGHTS GIVEN: using RANDOMLY INITIALISED {kind} weights.")
    print("The pipeline is real (ComfyUI's loaders, sampler and these nodes), the picture is noise.")
    print("Pass --checkpoint and --controlnet, or put the example's files into ComfyUI's models folders,")
    print(f"  {prompt[CHECKPOINT_NODE]['inputs']['ckpt_name']} -> models/checkpoints/")
    for n in (CANNY_NODE, POSE_NODE):
        print(f"  {prompt[n]['inputs']['control_net_name']} -> models/controlnet/")
    print("=" * 78)
    if not ckpt.is_file():
        print(f"building {ckpt} ...", flush=True)
        synthetic.write_sd15_checkpoint(ckpt, config, seed=0)
    for i, c in enumerate(cns):
        if not c.is_file():
            print(f"building {c} ...", flush=True)
            synthetic.write_controlnet(c, config, seed=10 + i)
    return ckpt, cns, True


def build_prompt(args, ckpt_name: str, cn_names: list[str], image_names: list[str], random_weights: bool) -> dict:
    prompt = json.loads(WORKFLOW.read_text())
    size = args.size or (256 if random_weights else 512)
    steps = args.steps or (2 if random_weights else 20)
    prompt[CHECKPOINT_NODE]["inputs"]["ckpt_name"] = ckpt_name
    prompt[CANNY_NODE]["inputs"]["control_net_name"] = cn_names[0]
    prompt[POSE_NODE]["inputs"]["control_net_name"] = cn_names[1]
    prompt[CANNY_IMAGE_NODE]["inputs"]["image"] = image_names[0]
    prompt[POSE_IMAGE_NODE]["inputs"]["image"] = image_names[1]
    prompt[LATENT_NODE]["inputs"].update(width=size, height=size)
    prompt[SAMPLER_NODE]["inputs"].update(steps=steps, seed=args.seed)
    prompt[SETTINGS_NODE]["inputs"].update(mode=args.mode, granularity=args.granularity, max_lambda=args.max_lambda)
    if args.prompt:
        prompt["2"]["inputs"]["text"] = args.prompt
    return prompt


def main(argv=None) -> int:
    args = parse_args(argv)
    from .server import ComfyServer, copy_model, prepare_base_directory

    ckpt, cns, random_weights = resolve_weights(args)
    base = prepare_base_directory(args.base_directory or cache_dir() / "demo-base")
    ckpt_name = copy_model(ckpt, base / "models" / "checkpoints")
    cn_names = [copy_model(c, base / "models" / "controlnet") for c in cns]
    image_names = []
    for img in (args.canny_image, args.pose_image):
        if not img.is_file():
            sys.exit(f"no such control image: {img}")
        shutil.copy2(img, base / "input" / img.name)
        image_names.append(img.name)
    prompt = build_prompt(args, ckpt_name, cn_names, image_names, random_weights)

    args.output.mkdir(parents=True, exist_ok=True)
    print(f"starting ComfyUI ({comfyui_path()}) headless ...", flush=True)
    t0 = time.time()
    with ComfyServer(base) as server:
        info = server.get_json("/object_info/MIControlNetApply")
        if "MIControlNetApply" not in info:
            sys.exit(f"ComfyUI did not load this extension; see its log:\n{server.log_tail()}")
        print(f"queueing the example workflow (mode {args.mode}, {prompt[SAMPLER_NODE]['inputs']['steps']} steps, "
              f"{prompt[LATENT_NODE]['inputs']['width']} px) ...", flush=True)
        entry = server.run(prompt)
        images = server.output_images(entry)
        written = []
        for node, stem in ((IMAGE_SAVE_NODE, "image"), (MAP_SAVE_NODE, "balance_map")):
            for i, png in enumerate(images.get(node, [])):
                path = args.output / f"micontrolnet_{stem}{'' if i == 0 else f'_{i}'}.png"
                path.write_bytes(png)
                written.append(path)
        if args.keep_server_log:
            (args.output / "comfyui.log").write_text(server.log_text())
    if len(written) < 2:
        sys.exit(f"expected an image and a balance map, got {written}")
    print(f"done in {time.time() - t0:.1f}s; wrote:")
    for p in written:
        print(f"  {p}")
    if random_weights:
        print("(random weights: the image is noise by construction)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
