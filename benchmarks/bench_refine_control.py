"""ControlNet time per sampling step: a 12-layer Refine-Control student against
the 23-layer SD3 inpainting teacher, side by side in one process.

    python benchmarks/bench_refine_control.py [--width-depth 8] [--latent 64] [--repeats 5]
        [--device cuda] [--dtype fp16|bf16|fp32]

(SD3-medium's size at 1024x1024 pixels: --width-depth 24 --latent 128.)

(run with the project's environment: ``. scripts/bootstrap.sh`` then
``$BC_PYTHON benchmarks/bench_refine_control.py``.)

Both ControlNets are ComfyUI's own ``comfy.cldm.mmdit.ControlNet`` with the
17-channel inpainting input and random weights, loaded through core's loader
from the diffusers key layout, and run by the same layer function the node
uses (``model_patches.refine_control_runtime.controlnet_layers``) on one
sampling step's batch (cond + uncond rows), alternating so machine noise hits
both alike. The released teacher is 23 layers of width 1536 (SD3-medium's
64·24); here the width is 64·``--width-depth`` so that the CPU can run it; the
time ratio depends on how the fixed embedder cost compares with the blocks,
and the blocks' share only grows with the width. Target: ratio <= 0.55.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import add_device_arguments, device_and_dtype  # noqa: E402
from headless.runtime import import_comfy  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width-depth", type=int, default=8, help="ControlNet width = 64 x this (SD3-medium: 24)")
    p.add_argument("--latent", type=int, default=64, help="latent side (1024 px images: 128)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--teacher-layers", type=int, default=23)
    p.add_argument("--student-layers", type=int, default=12)
    add_device_arguments(p)
    args = p.parse_args(argv)

    import_comfy()
    import comfy.controlnet
    import comfy.model_management

    from headless import synthetic_sd3
    from training.refine_control.evaluation import median_controlnet_seconds

    config = dict(synthetic_sd3.TINY_SD3, depth=args.width_depth,
                  context_embedder_config={"target": "torch.nn.Linear",
                                           "params": {"in_features": 4096, "out_features": 64 * args.width_depth}},
                  pos_embed_max_size=max(32, args.latent // 2), num_patches=max(32, args.latent // 2) ** 2)
    device, dtype = device_and_dtype(args)
    if args.device == "auto":
        device = comfy.model_management.get_torch_device()
    nets = {}
    for name, layers in (("teacher", args.teacher_layers), ("student", args.student_layers)):
        print(f"building the {layers}-layer ControlNet (width {64 * args.width_depth}) ...", flush=True)
        sd = synthetic_sd3.sd3_controlnet_state_dict(config, num_blocks=layers, seed=layers)
        control = comfy.controlnet.load_controlnet_state_dict(sd)
        nets[name] = control.control_model.to(device, dtype)

    side = args.latent
    med = median_controlnet_seconds(nets, side, 4096, 2048, args.repeats,
                                    on_round=lambda i: print(f"  round {i}/{args.repeats}", flush=True))
    print(f"\nControlNet time per sampling step (batch 2: cond + uncond), latent {side}x{side}, "
          f"width {64 * args.width_depth}, {device} {dtype}, median of {args.repeats}:")
    print(f"  teacher ({args.teacher_layers} layers) {med['teacher'] * 1000:9.1f} ms")
    print(f"  student ({args.student_layers} layers) {med['student'] * 1000:9.1f} ms")
    print(f"\nstudent / teacher time ratio: {med['student'] / med['teacher']:.3f} (target <= 0.55; "
          f"block-count ratio {args.student_layers / args.teacher_layers:.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
