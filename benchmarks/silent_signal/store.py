"""Save a run's samples and per-image metrics, and load them back to redraw
the table and figures without retraining (``--replot DIR``).

``run.npz`` holds every array (test canvases, conditions, samples, per-image
metrics); ``run.json`` the rest (preset, variants, noise digests, losses)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .sampling import PairSamples, Variant


def save_run(run: dict, out: Path) -> Path:
    arrays = {f"test/{k}": getattr(run["test"], k) for k in ("images", "labels", "kinds", "periods", "levels")}
    arrays.update({f"test_cond/{k}": v for k, v in run["test_conditions"].items()})
    keys = ("preset", "device", "base_loss", "controlnet_loss", "base_denoising", "seconds")
    meta = {k: run[k] for k in keys if k in run}
    meta["preset_name"] = run.get("preset_name")
    meta["variants"] = [asdict(v) for v in run["variants"]]
    meta["results"] = []
    for i, r in enumerate(run["results"]):
        ps = r["samples"]
        meta["results"].append({"seed": ps.seed, "pairing": ps.pairing, "noise": ps.noise,
                                "variants": list(ps.images)})
        arrays[f"r{i}/cond_a"], arrays[f"r{i}/cond_b"] = r["conditions"]
        for name, img in ps.images.items():
            arrays[f"r{i}/img/{name}"] = img
        for group, metrics in (("m", r["metrics"]), ("t", r.get("target_metrics", {}))):
            for name, per_kind in metrics.items():
                for kind, per_metric in per_kind.items():
                    for m, v in per_metric.items():
                        arrays[f"r{i}/{group}/{name}/{kind}/{m}"] = v
    np.savez_compressed(out / "run.npz", **arrays)
    (out / "run.json").write_text(json.dumps(meta, indent=1))
    return out / "run.npz"


def load_run(folder: Path) -> dict:
    from training.procedural import Canvases

    meta = json.loads((folder / "run.json").read_text())
    z = np.load(folder / "run.npz")
    test = Canvases(**{k: z[f"test/{k}"] for k in ("images", "labels", "kinds", "periods", "levels")})
    results = []
    for i, r in enumerate(meta["results"]):
        ps = PairSamples(r["seed"], r["pairing"], {n: z[f"r{i}/img/{n}"] for n in r["variants"]}, r["noise"])
        metrics, target = {}, {}
        for key in z.files:
            parts = key.split("/")
            if parts[0] != f"r{i}" or parts[1] not in ("m", "t"):
                continue
            name, kind, m = "/".join(parts[2:-2]), parts[-2], parts[-1]
            dest = metrics if parts[1] == "m" else target
            dest.setdefault(name, {}).setdefault(kind, {})[m] = z[key]
        results.append({"samples": ps, "metrics": metrics, "conditions": (z[f"r{i}/cond_a"], z[f"r{i}/cond_b"]),
                        "target_metrics": target})
    run = dict(meta)
    run.update(variants=[Variant(**v) for v in meta["variants"]], results=results, test=test,
               test_conditions={k.split("/", 1)[1]: z[k] for k in z.files if k.startswith("test_cond/")})
    return run
