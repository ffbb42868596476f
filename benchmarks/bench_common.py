"""Options the benchmarks share: the device, the dtype, and the base family
(SD1.5 or SDXL, at the real architecture or a small one for quick runs)."""

from __future__ import annotations

import argparse

DTYPES = ("auto", "fp32", "fp16", "bf16")


def add_device_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda when available, else cpu), cpu, cuda, cuda:N "
                   "(default: auto)")
    p.add_argument("--dtype", default="auto", choices=DTYPES,
                   help="weights and activations: auto = fp16 on CUDA, fp32 on CPU (default: auto)")


def device_and_dtype(args):
    """(torch.device, torch.dtype) of ``--device``/``--dtype``."""
    import torch

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          "cpu" if args.device == "auto" else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch sees no CUDA device (torch {torch.__version__})")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())  # as ComfyUI names its device
    if args.dtype == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    return device, dtype


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def add_family_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--family", default="sd15", choices=["sd15", "sdxl"],
                   help="base architecture: SD1.5 or SDXL (with --small: a small UNet of that family) "
                        "(default: sd15)")


def unet_config(family: str, small: bool) -> dict:
    from headless import synthetic as s

    if family == "sdxl":
        # SDXL's 320 channels at conv_in (where ControlNeXt injects), on the tiny UNet's levels.
        return dict(s.TINY_SDXL_UNET, model_channels=320) if small else s.SDXL_UNET
    return s.SD15_UNET_SMALL if small else s.SD15_UNET


def build_model(family: str, config: dict, seed: int = 0, dtype=None):
    """A ComfyUI BaseModel of the family with random weights (``headless.synthetic``'s
    init) whose inference dtype is ``dtype``, so ComfyUI casts its inputs to it."""
    import copy

    import torch

    from headless import synthetic as s

    s.import_comfy()
    import comfy.supported_models

    model_config = (comfy.supported_models.SDXL if family == "sdxl" else comfy.supported_models.SD15)(
        copy.deepcopy(config))
    model_config.set_inference_dtype(dtype or torch.float32, None)
    model = model_config.get_model({}, device=torch.device("cpu"))
    s.init_weights_(model.diffusion_model, seed)
    return model.to(dtype or torch.float32)


def text_conditioning(family: str, config: dict, generator, rows: int = 1) -> tuple:
    """(context, pooled or None) of random prompts for a base of ``config``."""
    import torch

    context = torch.randn(rows, 77, config["context_dim"], generator=generator)
    pooled = torch.randn(rows, 1280, generator=generator) if family == "sdxl" else None
    return context, pooled


def time_rotated(configs: dict, step, repeats: int) -> dict:
    """Seconds per call of ``step(*configs[name])`` for each configuration: one warm-up call
    each, then ``repeats`` rounds whose order rotates (each configuration takes each slot
    equally often, so the cost of a round's first slot falls on all alike)."""
    import time

    import torch

    times = {name: [] for name in configs}
    names = list(configs)
    with torch.inference_mode():
        for name in names:  # warm-up
            step(*configs[name])
        for r in range(repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                step(*configs[name])
                times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}/{repeats}", flush=True)
    return times


def print_ratio_table(times: dict, header: str, core_name: str = "core (plain sum)",
                      target_name: str = "MIControlNet layer", target: float = 1.02) -> None:
    """Median ms per configuration and its per-round ratio to ``core_name`` (median, min-max)."""
    import statistics

    print(f"\n{header}")
    print(f"  {'configuration':32s} {'median ms':>10s}   {'ratio to core: median':>21s} {'min-max (per round)':>20s}")
    for name, ts in times.items():
        ratios = [t / c for t, c in zip(ts, times[core_name])]
        print(f"  {name:32s} {statistics.median(ts) * 1000:10.1f}   {statistics.median(ratios):21.3f} "
              f"{min(ratios):9.3f}-{max(ratios):.3f}")
    ratios = [t / c for t, c in zip(times[target_name], times[core_name])]
    print(f"\nMIControlNet / core ratio: median {statistics.median(ratios):.3f}, "
          f"min-max {min(ratios):.3f}-{max(ratios):.3f} (target <= {target:g})")
