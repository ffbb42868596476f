"""Per-step cost of MIControlNet on a Flux-architecture DiT against core's plain sum.

    python benchmarks/bench_dit.py [--latent 32] [--double 1] [--single 1] [--repeats 7]

(run with the project's environment: ``. scripts/bootstrap.sh`` then
``$BC_PYTHON benchmarks/bench_dit.py``.)

One "step" is one batched model call on cond and uncond rows with the control
chain evaluated for it, as ComfyUI's sampler makes it per CFG step. The base is
ComfyUI's Flux class at its fixed width 3072 (``--double`` / ``--single``
blocks), the controls are two ControlNets in the released layouts (InstantX
Union with one double and one single block, XLabs with one double block),
loaded by ComfyUI's loader, all in bf16 on the CPU (fp16 on CUDA; ``--dtype``). Timed in
one process, interleaved, with the order of the configurations rotated every
round:

* core: two ``ControlNetApplyAdvanced`` (plain per-slot sum, added by core),
* MIControlNet layer / pixel: two ``MIControlNetApply`` (add^com + add^inj at
  every block with residuals; the balance record off, as when no map is drawn),
* MIControlNet layer + recording: the same with the balance record on,

and the median and min-max of the per-round ratios to core are printed.
This is a benchmark, not a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_common import print_ratio_table, time_rotated  # noqa: E402
from headless.runtime import import_extension  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--latent", type=int, default=32, help="latent side (image side / 8)")
    p.add_argument("--double", type=int, default=1, help="double blocks of the base")
    p.add_argument("--single", type=int, default=1, help="single blocks of the base")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: leave torch's default)")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                   help="weights and compute (auto: fp16 on CUDA, bf16 on the CPU)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import_extension()
    import comfy.controlnet
    import comfy.sd
    import nodes as comfy_nodes
    from comfy_extras.nodes_controlnet import SetUnionControlNetType

    from model_patches import mi_control
    from balanced_control.nodes.micontrolnet import MIControlNetApply
    from headless import synthetic_dit as sd
    from headless import synthetic_sd3 as s3

    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.bfloat16)
    config = dict(sd.FLUX_SMALL, depth=args.double, depth_single_blocks=args.single)
    print(f"building Flux ({args.double} double, {args.single} single blocks, width 3072) and two ControlNets "
          f"on {device} ({dtype}) ...", flush=True)
    model = sd.build_flux_model(config, dtype=dtype).to(device)
    vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()})
    load = comfy.controlnet.load_controlnet_state_dict
    union = load(sd.flux_instantx_state_dict(seed=1, residual_gain=4.0, dtype=dtype), model_options={"dtype": dtype})
    union = SetUnionControlNetType.execute(union, "depth").args[0]
    xlabs = load(sd.flux_xlabs_state_dict(seed=2, residual_gain=4.0, dtype=dtype), model_options={"dtype": dtype})
    cns = [union, xlabs]
    for cn in cns:
        cn.control_model.to(device)

    g = torch.Generator().manual_seed(0)
    side = args.latent
    ctx = torch.randn(2, 16, config["context_in_dim"], generator=g).to(device, dtype)
    y = torch.randn(2, config["vec_in_dim"], generator=g).to(device, dtype)
    pos, neg = [[ctx[1:], {}]], [[ctx[:1], {}]]
    images = [torch.rand(1, side * 8, side * 8, 3, generator=g) for _ in cns]
    x = torch.randn(2, 16, side, side, generator=g).to(device, dtype)
    sigma = torch.full((2,), 0.7, device=device)

    def chain(apply):
        p_, n_ = pos, neg
        for cn, img in zip(cns, images):
            p_, n_ = apply(p_, n_, cn, img)
        control = p_[0][1]["control"]
        control.pre_run(model, model.model_sampling.percent_to_sigma)
        return control

    core = chain(lambda p_, n_, cn, img: comfy_nodes.ControlNetApplyAdvanced().apply_controlnet(
        p_, n_, cn, img, 1.0, 0.0, 1.0, vae=vae))
    mi = chain(lambda p_, n_, cn, img: MIControlNetApply.execute(p_, n_, cn, img, 1.0, 0.0, 1.0, vae).args)

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
        cond = {"c_crossattn": ctx, "y": y, "transformer_options": to}
        c = control.get_control(x, sigma, cond, 2, to)
        out = model.apply_model(x, sigma, c_crossattn=ctx, y=y, control=c, transformer_options=to)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return out

    times = time_rotated(configs, step, args.repeats)
    header = (f"per-step time, Flux {args.double}+{args.single} blocks (width 3072) + 2 ControlNets, batch 2 "
              f"(cond+uncond), latent {side}x{side} ({(side // 2) ** 2} image tokens), {device}, {args.repeats} rounds, "
              f"order rotated:")
    print_ratio_table(times, header)
    return 0


if __name__ == "__main__":
    sys.exit(main())
