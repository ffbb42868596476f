"""Per-step cost of ControlNeXt against the bare UNet and against a ControlNet.

    python benchmarks/bench_controlnext.py [--size 256] [--steps 3] [--repeats 3] [--small] [--full]
        [--family sd15|sdxl] [--device cuda] [--dtype fp16|bf16|fp32]

(run with the project's environment, e.g. ``BC_CACHE=... $BC_PYTHON benchmarks/bench_controlnext.py``.)

One "step" is what ComfyUI's sampler does per sampling step with CFG: one
batched model call on the cond and uncond rows. Each configuration samples
``--steps`` + 1 Euler steps with ``comfy.sample.sample`` and is timed between
the first and the last step callback (model loading stays out), on the same
SD1.5-architecture UNet (random weights, ComfyUI's own classes), in one
process, interleaved over ``--repeats`` rounds; the time per step is
reported (the minimum over rounds, and the median) for:

* bare: the UNet alone,
* ControlNeXt: ``apply_controlnext`` with the 320-channel module (the
  SD1.5-Training/SDXL/SVD-v2 layout, injected after input block 3) and, as a
  second line, the SD1.5 released module (injected after the middle block;
  its first ResNet runs at full pixel resolution, so it costs more),
* ControlNet: one core ``ControlNetApplyAdvanced`` (a ControlNet v1.1 for the
  same UNet, through core's loader).

It prints ControlNeXt/bare and ControlNeXt's overhead divided by the
ControlNet's overhead. The UNet weight subset is patched once before sampling
and costs nothing per step, so it is left out. This is a benchmark, not a
test: the figures depend on the machine.

Default: the full SD1.5 architecture at 256x256 pixels (latent 32), 3 steps,
3 rounds. ``--small``: the two-level SD1.5-family UNet (seconds). ``--full``:
512x512 pixels (latent 64), the official resolution.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import add_device_arguments, add_family_argument, device_and_dtype, synchronize  # noqa: E402
from bench_common import build_model, text_conditioning, unet_config as family_config  # noqa: E402
from headless.runtime import import_comfy  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    p.add_argument("--steps", type=int, default=3, help="sampling steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (minimum and median reported)")
    p.add_argument("--small", action="store_true", help="a small UNet of the family (SD1.5: two levels)")
    p.add_argument("--full", action="store_true", help="the family's resolution: 512x512 pixels for SD1.5, "
                   "1024x1024 for SDXL (overrides --size)")
    add_family_argument(p)
    add_device_arguments(p)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.full:
        args.size = 1024 if args.family == "sdxl" else 512
    if args.threads:
        torch.set_num_threads(args.threads)

    import_comfy()
    import comfy.controlnet
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample
    import nodes as comfy_nodes

    from headless import synthetic as syn

    from model_patches import controlnext as cx
    from model_patches.controlnext_arch import ControlNeXtModule

    device, dtype = device_and_dtype(args)
    if args.device == "auto":
        device = comfy.model_management.get_torch_device()
    unet_config = family_config(args.family, args.small)
    family = {"sd15": "SD1.5", "sdxl": "SDXL"}[args.family]
    print(f"device {device} {dtype}, torch threads {torch.get_num_threads()}, "
          f"{'small ' + family + '-family' if args.small else family} UNet, {args.size}x{args.size} px, "
          f"{args.steps} steps x {args.repeats} rounds", flush=True)

    t0 = time.perf_counter()
    model = build_model(args.family, unet_config, seed=0, dtype=dtype)
    bare = comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=torch.device("cpu"))
    control_net = comfy.controlnet.load_controlnet_state_dict(syn.controlnet_state_dict(unet_config, seed=3),
                                                              model_options={"dtype": dtype})

    def module_weights(layout_config, seed):
        m = ControlNeXtModule(layout_config)
        syn.init_weights_(m, seed)
        sd = m.state_dict()
        if "scale" in sd:
            sd["scale"] = torch.tensor(1.0)
        return cx.ControlNeXtWeights(sd, f"bench-{layout_config.name}")

    g = torch.Generator().manual_seed(0)
    image = torch.rand(1, args.size, args.size, 3, generator=g)
    variant = cx.VARIANTS["sdxl" if args.family == "sdxl" else "sd15_training"]
    cnx_320 = cx.apply_controlnext(bare, module_weights(variant.module_config, 1), image)
    where = "after input block 0" if args.family == "sdxl" else "after input block 3"
    configs = {"bare": (bare, None), f"ControlNeXt (320-ch module, {where})": (cnx_320, None)}
    if args.family == "sd15" and unet_config["model_channels"] * unet_config["channel_mult"][-1] == 1280:
        cnx_sd15 = cx.apply_controlnext(bare, module_weights(cx.VARIANTS["sd15"].module_config, 2), image)
        configs["ControlNeXt (SD1.5 released module, after middle)"] = (cnx_sd15, None)
    configs["ControlNet (core ControlNetApplyAdvanced)"] = (bare, control_net)
    print(f"built models in {time.perf_counter() - t0:.1f}s", flush=True)

    texts = [text_conditioning(args.family, unet_config, g) for _ in range(2)]
    positive, negative = ([[c, {} if p is None else {"pooled_output": p}]] for c, p in texts)
    latent = torch.zeros(1, 4, args.size // 8, args.size // 8)
    noise = comfy.sample.prepare_noise(latent, 0)

    def conds(control_net):
        if control_net is None:
            return positive, negative
        return comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, image,
                                                                      1.0, 0.0, 1.0)

    def run(name, steps):
        """Seconds per step between the first and the last step's callback: model
        loading and sampler setup (which differ between patchers) stay out."""
        patcher, cn = configs[name]
        pos, neg = conds(cn)
        stamps = []

        def callback(step, x0, x, total):
            synchronize(device)
            stamps.append(time.perf_counter())

        comfy.sample.sample(patcher, noise, steps + 1, 5.0, "euler", "normal", pos, neg, latent,
                            denoise=1.0, disable_pbar=True, seed=0, callback=callback)
        return (stamps[-1] - stamps[0]) / (len(stamps) - 1)

    for name in configs:  # warm-up (first loads, allocator)
        run(name, 1)
    per_step = {name: [] for name in configs}
    names = list(configs)
    for r in range(args.repeats):
        # The order rotates every round, so no configuration always runs first or after a given one.
        for name in names[r % len(names):] + names[:r % len(names)]:
            per_step[name].append(run(name, args.steps))
        print(f"round {r + 1}/{args.repeats}: " + ", ".join(f"{n.split(' (')[0]} {v[-1]:.3f}s" for n, v in per_step.items()),
              flush=True)

    # The minimum over rounds estimates the cost itself where other processes share
    # the machine; the median is printed beside it.
    med = {n: min(v) for n, v in per_step.items()}
    medians = {n: statistics.median(v) for n, v in per_step.items()}
    t_bare = med["bare"]
    t_cn = med["ControlNet (core ControlNetApplyAdvanced)"]
    print()
    print(f"{'configuration':55s} {'min s/step':>10s} {'x bare':>8s} {'median':>8s} {'x bare':>8s} {'spread':>15s}")
    for name, t in med.items():
        v = per_step[name]
        print(f"{name:55s} {t:10.3f} {t / t_bare:8.3f} {medians[name]:8.3f} {medians[name] / medians['bare']:8.3f} "
              f"{min(v):7.3f}-{max(v):.3f}")
    print()
    cn_over = t_cn - t_bare
    for name, t in med.items():
        if name.startswith("ControlNeXt"):
            ratio = (t - t_bare) / cn_over if cn_over > 0 else float("nan")
            print(f"{name}: {t / t_bare:.3f}x bare (target <= 1.05); overhead / ControlNet overhead = "
                  f"{ratio:.3f} (target <= 0.25)")
    print(f"ControlNet: {t_cn / t_bare:.3f}x bare")


if __name__ == "__main__":
    main()
