"""Table (Markdown + JSON) and the two figures of a silent-signal run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .metrics import METRICS, gain_line_gap, paired_difference, seed_mean_se

REFERENCE = "sum x1"
DIFF_METRICS = ("tv_texture", "tv_flat", "recall", "precision")


OWN_ALONE = "own control alone"
OTHER_ALONE = "other control alone"
ALONE = {"left control alone", "right control alone"}


def _nanmean(x: np.ndarray) -> float:
    x = np.asarray(x, np.float64)
    return float(x[np.isfinite(x)].mean()) if np.isfinite(x).any() else float("nan")


def summary_variants(run: dict) -> list[str]:
    """The run's variants, with the two one-control samples read per half: the half's own
    control alone (the unsuppressed reference) and the other control alone (this half
    then sees only that control's black, silent half)."""
    out = []
    for v in run["variants"]:
        if v.name in ALONE:
            if OWN_ALONE not in out:
                out += [OWN_ALONE, OTHER_ALONE]
        else:
            out.append(v.name)
    return out


def _sampled_name(result: dict, variant: str, kind: str) -> str:
    lk, _ = result["samples"].pairing.split("|")
    if variant == OWN_ALONE:
        return "left control alone" if kind == lk else "right control alone"
    if variant == OTHER_ALONE:
        return "right control alone" if kind == lk else "left control alone"
    return variant


def _per_seed(run: dict, variant: str, kind: str, metric: str) -> list[np.ndarray]:
    """Per-seed arrays of one metric on the halves of ``kind``, both pairings concatenated."""
    out = {}
    for r in run["results"]:
        out.setdefault(r["samples"].seed, []).append(r["metrics"][_sampled_name(r, variant, kind)][kind][metric])
    return [np.concatenate(v) for _, v in sorted(out.items())]


def summarise(run: dict) -> dict:
    kinds = sorted({k for r in run["results"] for k in next(iter(r["metrics"].values()))})
    names = summary_variants(run)
    gains = [v for v in run["variants"] if v.group == "gain"]
    table = {}
    for name in names:
        row = {}
        for kind in kinds:
            cell = {}
            for m in METRICS:
                cell[m] = seed_mean_se([_nanmean(x) for x in _per_seed(run, name, kind, m)])
            for m in DIFF_METRICS:
                cell[f"d_{m}"] = paired_difference(_per_seed(run, name, kind, m), _per_seed(run, REFERENCE, kind, m))
            row[kind] = cell
        table[name] = row
    # Gap to the gain line at the same flat TV, once every gain row exists.
    for name in names:
        for kind in kinds:
            gx = [table[g.name][kind]["tv_flat"][0] for g in gains]
            gy = [table[g.name][kind]["recall"][0] for g in gains]
            c = table[name][kind]
            c["recall_above_gain_line"] = gain_line_gap(gx, gy, c["tv_flat"][0], c["recall"][0])
    targets = {}
    for kind in kinds:
        vals = [r["target_metrics"]["target"][kind] for r in run["results"] if r.get("target_metrics")]
        if vals:
            targets[kind] = {m: _nanmean(np.concatenate([v[m] for v in vals])) for m in METRICS}
    paired = all(len(set(r["samples"].noise.values())) == 1 for r in run["results"])
    return {"preset": run["preset"], "device": run["device"], "seconds": run["seconds"], "kinds": kinds,
            "variants": names, "reference": REFERENCE, "table": table, "targets": targets,
            "same_noise_within_each_seed_and_pairing": paired, "base_loss": run["base_loss"],
            "controlnet_loss": run["controlnet_loss"], "base_denoising": run.get("base_denoising")}


def _fmt(ms) -> str:
    m, s = ms
    if not np.isfinite(m):
        return "–"
    return f"{m:.3f} ± {s:.3f}" if np.isfinite(s) else f"{m:.3f}"


def markdown(summary: dict) -> str:
    lines = []
    if summary.get("base_denoising"):
        lines += ["### Base model: denoising of the test canvases", "",
                  "| t | σ | ε-MSE | x0-MSE | x0-MSE of the data mean |", "|---|---|---|---|---|"]
        lines += [f"| {d['t']} | {d['sigma']:.3f} | {d['eps_mse']:.4f} | {d['x0_mse']:.3f} | {d['x0_mse_mean']:.3f} |"
                  for d in summary["base_denoising"]]
        lines.append("")
    for kind in summary["kinds"]:
        lines += [f"### Halves given the {kind} control", "",
                  "| variant | TV texture | TV flat | recall@1px | precision@1px | paper TV silent | cycle L1 "
                  "| Δ TV texture | Δ TV flat | Δ recall | recall − gain line |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        t = summary["targets"].get(kind)
        if t:
            lines.append("| *target canvases* | " + " | ".join(_fmt((t[m], float("nan"))) for m in METRICS)
                         + " | | | | |")
        for name in summary["variants"]:
            c = summary["table"][name][kind]
            gap = c["recall_above_gain_line"]
            lines.append(f"| {name} | " + " | ".join(_fmt(c[m]) for m in METRICS) + " | "
                         + " | ".join(_fmt(c[f"d_{m}"]) for m in ("tv_texture", "tv_flat", "recall"))
                         + (f" | {gap:+.3f} |" if np.isfinite(gap) else " | – |"))
        lines.append("")
    return "\n".join(lines)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, float) and not np.isfinite(x):
        return None
    if isinstance(x, (np.floating, np.integer)):
        return _jsonable(x.item())
    return x


def write_tables(summary: dict, out: Path) -> tuple[Path, Path]:
    md, js = out / "silent_signal.md", out / "silent_signal.json"
    md.write_text(markdown(summary))
    js.write_text(json.dumps(_jsonable(summary), indent=1))
    return md, js
