"""Step time of MIControlNet training: stage 2 (with L_QC^simple) against stage 1.

    python benchmarks/bench_training.py [--config small|tiny] [--batch 2] [--latent 8] [--repeats 5]

One step is what ``python -m training micontrolnet`` does per optimizer step
on a prepared batch: the forward through the ControlNet and the UNet with
add^inj, the loss and the backward into the ControlNet, and the AdamW update.
Stage 2 adds the forward-mode product J_c v (in the same forward), the
reverse-mode product J_cᵀ v (no graph), and the backward through J_c v.
Both stages are timed interleaved in one process on the same models (random
weights, ComfyUI's classes); the median ratio and samples/s are printed.
Data loading, VAE encoding and text encoding are not part of the step (the
trainer caches text embeddings and, with --cache-latents, latents).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.runtime import extension  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="small", choices=["small", "tiny", "sd15"],
                   help="UNet config: small SD1.5-family (320 channels, 2 levels), tiny (64 channels), full SD1.5")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=8, help="latent side (image side / 8)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--compare-layer-norm", action="store_true",
                   help="time stage-2 steps with layer_norm's written-out tangent against torch's rule")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    extension()
    from headless import synthetic as s
    from training import models, objectives as O

    cfg = {"small": s.SD15_UNET_SMALL, "tiny": s.TINY_SD15_UNET, "sd15": s.SD15_UNET}[args.config]
    device = torch.device(args.device)
    model = s.build_unet_model(cfg, seed=0)
    model.diffusion_model.requires_grad_(False).to(device)
    base_cnet = models.controlnet_from_unet(model.diffusion_model, model.model_config.unet_config, device=device)
    with torch.no_grad():  # non-zero outputs, as after the warm-up
        g = torch.Generator().manual_seed(1)
        for prm in base_cnet.parameters():
            if not prm.any():
                prm.copy_((torch.randn(prm.shape, generator=g) * 0.02).to(device))
    b, h = args.batch, args.latent
    g = torch.Generator().manual_seed(0)
    batch = O.Batch(torch.randn(b, 4, h, h, generator=g), torch.rand(b, 3, 8 * h, 8 * h, generator=g),
                    torch.randn(b, 77, cfg["context_dim"], generator=g), None, torch.randn(b, 4, h, h, generator=g),
                    torch.randint(0, 1000, (b,), generator=g), O.rademacher((b, 4, h, h), g)).to(device)
    nets = {stage: copy.deepcopy(base_cnet) for stage in (1, 2)}
    opts = {stage: torch.optim.AdamW(nets[stage].parameters(), 1e-5) for stage in (1, 2)}

    def step(stage):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        terms = O.loss_terms(model, nets[stage], batch, 0.01 if stage == 2 else 0.0)
        terms["total"].mean().backward()
        opts[stage].step()
        opts[stage].zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    if args.compare_layer_norm:
        return compare_layer_norm(args, O, step)
    times = {1: [], 2: []}
    with O.training_attention():
        step(1), step(2)  # warm-up
        for r in range(args.repeats):
            # The order alternates round by round: each stage takes each slot equally often.
            for stage in ((1, 2) if r % 2 == 0 else (2, 1)):
                times[stage].append(step(stage))
    m1, m2 = statistics.median(times[1]), statistics.median(times[2])
    ratios = [t2 / t1 for t1, t2 in zip(times[1], times[2])]
    print(f"config={args.config} batch={b} latent={h}x{h} device={device} threads={torch.get_num_threads()}, "
          f"{args.repeats} rounds, order alternated")
    print(f"stage 1 step: {m1 * 1000:.1f} ms  ({b / m1:.2f} samples/s; min-max {min(times[1]) * 1000:.1f}-"
          f"{max(times[1]) * 1000:.1f})")
    print(f"stage 2 step: {m2 * 1000:.1f} ms  ({b / m2:.2f} samples/s; min-max {min(times[2]) * 1000:.1f}-"
          f"{max(times[2]) * 1000:.1f})")
    print(f"stage 2 / stage 1 per round: median {statistics.median(ratios):.2f}, "
          f"min-max {min(ratios):.2f}-{max(ratios):.2f}  (target <= 2.5)")


def compare_layer_norm(args, O, step) -> None:
    """Stage-2 steps with layer_norm's written-out tangent (the default) against
    torch's own rule (whose reverse-mode derivative is wrong), order rotated."""
    real = O._layer_norm_dual
    configs = {"written-out": real, "torch rule": lambda *a, **k: None}
    times = {name: [] for name in configs}
    with O.training_attention():
        for r in range(args.repeats + 1):
            names = list(configs)[r % 2:] + list(configs)[:r % 2]
            for name in names:
                O._layer_norm_dual = configs[name]
                try:
                    t = step(2)
                finally:
                    O._layer_norm_dual = real
                if r:  # the first round warms up
                    times[name].append(t)
    for name, ts in times.items():
        print(f"stage 2, layer norm {name}: median {statistics.median(ts) * 1000:.1f} ms "
              f"(min {min(ts) * 1000:.1f}, max {max(ts) * 1000:.1f}, n={len(ts)})")


if __name__ == "__main__":
    main()
