"""python -m benchmarks.silent_signal: the silent-signal proof-of-effect benchmark.

Trains, on procedural canvases, a pixel-space base and two kinds of ControlNet
(canny, region map; plain add, rebalanced, add^inj in each λ convention,
stage 2) for several seeds, samples the paper's two-condition protocol for
every combination/injection variant from the same noise, and writes a table
(Markdown + JSON), a sample grid and recall-vs-flat-TV curves. See
docs/evidence.md.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def parse(argv=None):
    from .pipeline import PRESETS

    p = argparse.ArgumentParser(prog="python -m benchmarks.silent_signal", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="default",
                   help="tiny: seconds (the test); small: a reduced run (24 px, fewer steps and canvases); "
                        "default: the full run (76 min on 2 CPU cores)")
    p.add_argument("--output", default="runs/silent_signal", help="folder for the table and figures")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda also scales the preset up, see --scale)")
    p.add_argument("--scale", type=float, default=None,
                   help="multiply training steps, training canvases and test canvases (default 1 on cpu, 4 on cuda)")
    p.add_argument("--seeds", type=int, default=None, help="ControlNet seeds (default: the preset's)")
    p.add_argument("--replot", metavar="DIR", default=None,
                   help="redraw the table and figures from a finished run's run.npz/run.json in DIR (no training)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p.parse_args(argv)


def add_target_metrics(result: dict) -> None:
    """The metrics of the target canvases themselves, per pairing (the table's reference row)."""
    import numpy as np

    from .metrics import batch_metrics

    for r in result["results"]:
        lk, rk = r["samples"].pairing.split("|")
        r["target_metrics"] = {"target": batch_metrics(result["test"].images, result["test"],
                                                       np.arange(len(result["test"])), result["test_conditions"],
                                                       lk, rk)}


def main(argv=None) -> int:
    args = parse(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import torch

    from training.runtime import nodes, setup_comfy

    setup_comfy()
    nodes()  # the extension package, for the node classes the sampling runs (sampling.py)
    from . import figures, report
    from .pipeline import PRESETS, run

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda: no CUDA device is visible to torch; use --device cpu", file=sys.stderr)
        return 2
    preset = PRESETS[args.preset]
    scale = args.scale if args.scale is not None else (4.0 if args.device.startswith("cuda") else 1.0)
    if scale != 1.0:
        preset = replace(preset, **{k: max(1, int(round(getattr(preset, k) * scale)))
                                    for k in ("base_steps", "cn_steps", "ft_steps", "s2_steps", "n_test", "n_train")})
    if args.seeds:
        if args.seeds < 2:
            print("--seeds must be at least 2 (standard errors are over seeds)", file=sys.stderr)
            return 2
        preset = replace(preset, seeds=args.seeds)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    if args.replot:
        from .store import load_run

        result = load_run(Path(args.replot))
    else:
        print(f"preset {args.preset} (scale {scale:g}) on {args.device}: {preset}", flush=True)
        result = run(preset, device=args.device, progress=lambda s: print(s, flush=True))
        result["preset_name"] = args.preset
        add_target_metrics(result)
        from .store import save_run

        save_run(result, out)
    summary = report.summarise(result)
    summary["preset_name"] = result.get("preset_name", args.preset)
    md, js = report.write_tables(summary, out)
    grid = figures.sample_grid(result, out / "samples.png")
    curves = figures.tradeoff_plot(summary, result, out / "recall_vs_flat_tv.png")
    print(report.markdown(summary))
    print(f"same noise within each seed and pairing: {summary['same_noise_within_each_seed_and_pairing']}")
    print(f"wrote {md}, {js}, {grid}, {curves} in {result['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
