"""Our graphs under core's TorchCompileModel node: the compiled sample against
the uncompiled one, and how often torch.compile recompiles.

    python benchmarks/bench_compile.py [--steps 10] [--configs bare,micontrolnet,micontrolnet-sd3,controlnext,refine-control]
        [--backend inductor] [--json FILE]

Each configuration is sampled uncompiled, then through
``comfy_extras.nodes_torch_compile.TorchCompileModel`` (core's node: it
compiles ``diffusion_model`` and runs it from an APPLY_MODEL wrapper), ``--steps``
Euler steps with CFG, on tiny models (random weights, ComfyUI's own classes):

* bare: the UNet alone (core's own graph breaks and recompiles, the baseline),
* micontrolnet: two ControlNets through MIControlNetApply + MIControlNetSettings,
* controlnext: apply_controlnext with the 320-channel module,
* refine-control: RefineControlInpaintApply on a tiny SD3.

Counted from torch._dynamo's own records (``torch._logging`` artifacts
``recompiles`` and ``graph_breaks``, ``torch._dynamo.utils.counters``): the
graphs compiled during the first step, recompilations after the first step
(target: none), and each graph break's place, with the frames in this
project's code named file:line. ComfyUI runs with its PyTorch attention
(``--use-pytorch-cross-attention``, its default on CUDA); its CPU fallback
(sub-quadratic attention) asks psutil for free memory in every call, a graph
break of core's own. This is a benchmark, not a test: times depend on the
machine; tests/test_torch_compile.py runs it at 2 steps.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from headless.runtime import comfyui_path, import_extension  # noqa: E402

CONFIGS = ("bare", "micontrolnet", "micontrolnet-sd3", "controlnext", "refine-control")
OURS = re.compile(r'File "([^"]*/(?:model_patches|nodes)/[^"]+)", line (\d+)')


def _use_pytorch_attention() -> None:
    """ComfyUI's --use-pytorch-cross-attention, set before its modules read it."""
    root = str(comfyui_path())
    if root not in sys.path:
        sys.path.insert(0, root)
    import comfy.options  # noqa: F401
    import comfy.cli_args

    comfy.cli_args.args.use_pytorch_cross_attention = True


class DynamoRecords(logging.Handler):
    """torch._dynamo's recompile and graph-break records, with the step they came in."""

    def __init__(self):
        super().__init__()
        self.step = 0
        self.recompiles: list[dict] = []
        self.breaks: list[dict] = []

    def emit(self, record):
        text = record.getMessage()
        if "Recompiling function" in text:
            head = text.splitlines()[0]
            reasons = [line.strip() for line in text.splitlines()[1:] if line.strip().startswith("- ")][:3]
            self.recompiles.append({"step": self.step, "where": head.split("Recompiling function ", 1)[1],
                                    "why": reasons})
        elif "Graph break" in text and "in user code at" in text:
            at = text.split("in user code at ", 1)[1].splitlines()[0].strip()
            reason = next((line.strip() for line in text.splitlines() if "Explanation:" in line), "")
            ours = [f"{Path(f).relative_to(REPO) if f.startswith(str(REPO)) else f}:{n}"
                    for f, n in OURS.findall(text)]
            self.breaks.append({"step": self.step, "at": at, "reason": reason, "our_frames": ours})


def build(name: str):
    """(patcher, positive, negative, latent) of a configuration, uncompiled."""
    import comfy.controlnet
    import comfy.model_patcher

    from headless import synthetic as s

    cpu = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    if name == "micontrolnet-sd3":
        # Two SD3 ControlNets balanced per joint block (the DiT site: per-call patches_replace["dit"]).
        import comfy.sd

        from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings
        from headless import synthetic_sd3 as s3

        model = s3.build_sd3_model()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()})
        pos = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
        neg = [[torch.zeros(1, 7, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
        image = torch.rand(1, 32, 32, 3, generator=g)
        for seed in (31, 32):
            cn = comfy.controlnet.load_controlnet_state_dict(
                s3.sd3_controlnet_state_dict(num_blocks=2, latent_channels=16, seed=seed, residual_gain=3.0))
            pos, neg = MIControlNetApply.execute(pos, neg, cn, image.flip(2) if seed == 32 else image,
                                                 1.0, 0.0, 1.0, vae, None).args
        patcher = MIControlNetSettings.execute(patcher, "micontrolnet", "layer", 20.0, False).args[0]
        return patcher, pos, neg, torch.zeros(1, 16, 4, 4)
    if name == "refine-control":
        import comfy.sd

        from balanced_control.nodes.refine_control import RefineControlInpaintApply
        from headless import synthetic_sd3 as s3

        model = s3.build_sd3_model()
        patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
        vae = comfy.sd.VAE(sd={k[len("first_stage_model."):]: v for k, v in s3.sd3_vae_state_dict().items()})
        student = comfy.controlnet.load_controlnet_state_dict(s3.sd3_controlnet_state_dict(num_blocks=2, seed=6))
        pos = [[torch.randn(1, 7, 4096, generator=g), {"pooled_output": torch.randn(1, 2048, generator=g)}]]
        neg = [[torch.zeros(1, 7, 4096), {"pooled_output": torch.zeros(1, 2048)}]]
        image = torch.rand(1, 32, 32, 3, generator=g)
        mask = torch.zeros(1, 32, 32)
        mask[:, 8:24, 8:24] = 1
        pos, neg = RefineControlInpaintApply.execute(pos, neg, student, vae, image, mask, 1.0, 0.0, 1.0,
                                                     convention="diffusers", wiring="diffusers_0.29",
                                                     injection="add", max_lambda=20.0).args
        return patcher, pos, neg, torch.zeros(1, 16, 4, 4)

    config = s.SD15_UNET_SMALL if name == "controlnext" else s.TINY_SD15_UNET  # ControlNeXt injects 320 channels
    model = s.build_unet_model(config, seed=0)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    image = (torch.rand(1, 64, 64, 3, generator=g) > 0.7).float()
    latent = torch.zeros(1, 4, 8, 8)
    if name == "micontrolnet":
        from balanced_control.nodes.micontrolnet import MIControlNetApply, MIControlNetSettings

        for seed in (21, 22):
            cn = comfy.controlnet.load_controlnet_state_dict(s.controlnet_state_dict(config, seed=seed))
            pos, neg = MIControlNetApply.execute(pos, neg, cn, image.flip(2) if seed == 22 else image,
                                                 1.0, 0.0, 1.0, None, None).args
        patcher = MIControlNetSettings.execute(patcher, "micontrolnet", "layer", 20.0, False).args[0]
    elif name == "controlnext":
        from model_patches import controlnext as cx
        from model_patches.controlnext_arch import ControlNeXtModule

        module = ControlNeXtModule(cx.VARIANTS["sd15_training"].module_config)
        s.init_weights_(module, 1)
        patcher = cx.apply_controlnext(patcher, cx.ControlNeXtWeights(module.state_dict(), "bench"), image)
    return patcher, pos, neg, latent


def sample(patcher, pos, neg, latent, steps: int, callback=None) -> torch.Tensor:
    import comfy.sample

    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(patcher, noise, steps, 5.0, "euler", "normal", pos, neg, latent, seed=0,
                               disable_pbar=True, callback=callback)


def measure(name: str, steps: int, backend: str) -> dict:
    import torch._dynamo
    import torch._dynamo.utils
    from comfy_extras.nodes_torch_compile import TorchCompileModel

    patcher, pos, neg, latent = build(name)
    t0 = time.perf_counter()
    reference = sample(patcher, pos, neg, latent, steps)
    eager_s = time.perf_counter() - t0
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    records = DynamoRecords()
    compiled = TorchCompileModel.execute(patcher, backend).args[0]
    graphs_after, stamps = [], []

    def callback(step, x0, x, total):
        graphs_after.append(int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        stamps.append(time.perf_counter())
        records.step = step + 1

    # torch._logging keeps its registered loggers from propagating; the artifacts propagate up to this one.
    handler_logger = logging.getLogger("torch._dynamo")
    handler_logger.addHandler(records)
    try:
        t0 = time.perf_counter()
        out = sample(compiled, pos, neg, latent, steps, callback)
    finally:
        handler_logger.removeHandler(records)
    diff = (out - reference).abs().max().item()
    return {
        "config": name, "steps": steps, "backend": backend,
        "max_abs_diff": diff, "reference_max_abs": reference.abs().max().item(),
        "graphs_in_first_step": graphs_after[0] if graphs_after else None,
        "graphs_after_first_step": (graphs_after[-1] - graphs_after[0]) if graphs_after else None,
        "recompiles_after_first_step": [r for r in records.recompiles if r["step"] >= 1],
        "recompiles_in_first_step": len([r for r in records.recompiles if r["step"] == 0]),
        "graph_breaks": _unique_breaks(records.breaks),
        "graph_break_reasons": {k: int(v) for k, v in torch._dynamo.utils.counters["graph_break"].items()},
        "first_step_s": stamps[0] - t0 if stamps else None,
        "later_step_s": (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else None,
        "eager_s_per_step": eager_s / steps,
    }


def _unique_breaks(breaks: list[dict]) -> list[dict]:
    seen, out = set(), []
    for b in breaks:
        key = (b["at"], tuple(b["our_frames"]))
        if key not in seen:
            seen.add(key)
            out.append(b)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default: 10)")
    p.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated, of {', '.join(CONFIGS)}")
    p.add_argument("--backend", default="inductor", choices=["inductor", "cudagraphs", "eager", "aot_eager"],
                   help="torch.compile backend (TorchCompileModel offers inductor and cudagraphs) (default: inductor)")
    p.add_argument("--json", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in configs if c not in CONFIGS]
    if unknown:
        raise SystemExit(f"--configs: unknown {', '.join(unknown)}; expected some of {', '.join(CONFIGS)}")

    _use_pytorch_attention()
    import_extension()
    torch._logging.set_logs(recompiles=True, graph_breaks=True)
    results = []
    for name in configs:
        print(f"== {name}: {args.steps} steps, uncompiled then TorchCompileModel({args.backend}) ...", flush=True)
        r = measure(name, args.steps, args.backend)
        results.append(r)
        print(f"   max |compiled - uncompiled| = {r['max_abs_diff']:.3g} (sample max {r['reference_max_abs']:.3g}); "
              f"graphs compiled in step 1: {r['graphs_in_first_step']}, after it: {r['graphs_after_first_step']}; "
              f"recompiles after step 1: {len(r['recompiles_after_first_step'])} (target 0)", flush=True)
        for rec in r["recompiles_after_first_step"]:
            print(f"     recompile at step {rec['step'] + 1}: {rec['where']}  {'; '.join(rec['why'])}")
        for reason, n in r["graph_break_reasons"].items():
            print(f"     graph break x{n}: {reason[:200]}")
        for b in r["graph_breaks"]:
            print(f"     graph break at {b['at']}" + (f" (our frames: {', '.join(b['our_frames'])})"
                                                      if b["our_frames"] else "") + f": {b['reason'][:160]}")
        if r["later_step_s"]:
            print(f"   step 1 (with compiling) {r['first_step_s']:.1f}s, later steps {r['later_step_s']:.3f}s, "
                  f"uncompiled {r['eager_s_per_step']:.3f}s per step")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
