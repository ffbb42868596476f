"""Per-step cost of MIControlNet against ComfyUI's plain multi-ControlNet sum.

    python benchmarks/bench_micontrolnet.py [--small] [--latent 16] [--repeats 5]
        [--family sd15|sdxl] [--device cuda] [--dtype fp16|bf16|fp32]

(run with the project's environment: ``. scripts/bootstrap.sh`` then
``$BC_PYTHON benchmarks/bench_micontrolnet.py``.)

One "step" is what ComfyUI's sampler does per sampling step with CFG: one
batched model call on cond and uncond rows, with the control chain evaluated
for that batch. The same SD1.5-architecture UNet and the same two ControlNets
(random weights, ComfyUI's own classes and loader) are timed in one process,
interleaved with the order rotated every round, under:

* core: two ``ControlNetApplyAdvanced`` (plain per-layer sum, ``h += r``),
* MIControlNet layer: two ``MIControlNetApply`` (add^com + add^inj),
* MIControlNet pixel: the same with pixel granularity,

and the median and min-max of the per-round ratios to core are printed. The balance map's recording
(``record_balance``, on by default) runs on every model call that has positive
rows; the "+ recording" configuration measures that cost.
This is a benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import add_device_arguments, add_family_argument, device_and_dtype, synchronize  # noqa: E402
from bench_common import build_model, text_conditioning, unet_config  # noqa: E402
from bench_common import print_ratio_table, time_rotated  # noqa: E402
from headless.runtime import import_extension  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="small UNet of the family instead of the full architecture")
    add_family_argument(p)
    add_device_arguments(p)
    p.add_argument("--latent", type=int, default=16, help="latent side (image side / 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import_extension()
    import comfy.controlnet
    import nodes as comfy_nodes

    from model_patches import mi_control
    from balanced_control.nodes.micontrolnet import MIControlNetApply
    from headless import synthetic as s

    config = unet_config(args.family, args.small)
    family = {"sd15": "SD1.5", "sdxl": "SDXL"}[args.family]
    device, dtype = device_and_dtype(args)
    print(f"building {'small' if args.small else 'full'} {family} UNet and two ControlNets on {device} ({dtype}) ...",
          flush=True)
    model = build_model(args.family, config, seed=0, dtype=dtype).to(device=device)
    cns = []
    for k in (1, 2):
        cn = comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(config, seed=k),
                                                         model_options={"dtype": dtype})
        cn.control_model.to(device=device, dtype=dtype)
        cns.append(cn)

    g = torch.Generator().manual_seed(0)
    side = args.latent
    ctx, pooled = text_conditioning(args.family, config, g, rows=2)
    ctx = ctx.to(device, dtype)
    # SDXL's class embedding input (pooled text + size embeddings), as the model builds it.
    y = (None if pooled is None else
         torch.cat([model.encode_adm(pooled_output=pooled[i:i + 1], width=side * 8, height=side * 8)
                    for i in range(2)]).to(device, dtype))
    pos, neg = [[ctx[1:], {}]], [[ctx[:1], {}]]
    images = [torch.rand(1, side * 8, side * 8, 3, generator=g) for _ in cns]
    x = torch.randn(2, 4, side, side, generator=g).to(device, dtype)
    sigma = torch.full((2,), 5.0, device=device)

    def chain(apply):
        p_, n_ = pos, neg
        for cn, img in zip(cns, images):
            p_, n_ = apply(p_, n_, cn, img)
        control = p_[0][1]["control"]
        control.pre_run(model, model.model_sampling.percent_to_sigma)
        return control

    core = chain(lambda p_, n_, cn, img: comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(p_, n_, cn, img, 1.0, 0.0, 1.0))
    mi = chain(lambda p_, n_, cn, img: MIControlNetApply.execute(p_, n_, cn, img, 1.0, 0.0, 1.0).args)

    def settings(mode, granularity, record=False):
        return {mi_control.SETTINGS_KEY: mi_control.settings_dict(mode, granularity, 20.0, record)}

    configs = {
        "core (plain sum)": (core, {}),
        "MIControlNet layer": (mi, settings("micontrolnet", "layer")),
        "MIControlNet pixel": (mi, settings("micontrolnet", "pixel")),
        "MIControlNet layer + recording": (mi, settings("micontrolnet", "layer", True)),
    }

    def step(control, extra):
        to = {"cond_or_uncond": [1, 0], "sigmas": sigma[:1], **extra}
        cond = {"c_crossattn": ctx, "transformer_options": to, **({} if y is None else {"y": y})}
        c = control.get_control(x, sigma, cond, 2, to)
        out = model.apply_model(x, sigma, c_crossattn=ctx, y=y, control=c, transformer_options=to)
        synchronize(device)
        return out

    times = time_rotated(configs, step, args.repeats)
    header = (f"per-step time, {family} {'small' if args.small else 'full'} UNet + 2 ControlNets, batch 2 "
              f"(cond+uncond), latent {side}x{side}, {device} {dtype}, {args.repeats} rounds, order rotated:")
    print_ratio_table(times, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
