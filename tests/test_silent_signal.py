"""The silent-signal benchmark end to end at its tiny preset (about half a minute):
outputs and their shapes, paired differences on the same noise, and the
statistics recomputed independently from the saved per-image arrays."""

import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.silent_signal import __main__ as cli
from benchmarks.silent_signal import metrics as M
from benchmarks.silent_signal.pipeline import PRESETS
from benchmarks.silent_signal.sampling import half_conditions, variants


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("silent")
    assert cli.main(["--preset", "tiny", "--output", str(out)]) == 0
    return out


def test_the_tiny_pipeline_writes_every_output(tiny_run):
    p = PRESETS["tiny"]
    for name in ("silent_signal.md", "silent_signal.json", "samples.png", "recall_vs_flat_tv.png", "run.npz",
                 "run.json"):
        assert (tiny_run / name).is_file(), name
    summary = json.loads((tiny_run / "silent_signal.json").read_text())
    names = [v.name for v in variants(with_stage2=True)]
    rows = [n for n in names if n not in ("left control alone", "right control alone")]
    rows[rows.index("sum x2") + 1:rows.index("sum x2") + 1] = ["own control alone", "other control alone"]
    assert summary["variants"] == rows and summary["kinds"] == ["canny", "regions"]
    for name in rows:
        for kind in ("canny", "regions"):
            cell = summary["table"][name][kind]
            for m in ("tv_texture", "tv_flat", "recall", "precision", "d_tv_texture", "d_recall"):
                assert len(cell[m]) == 2, (name, kind, m)  # (mean over seeds, SE)
            assert cell["tv_texture"][0] is not None and cell["tv_texture"][1] is not None
    # The canny halves have the paper's TV-in-silent-region and cycle metrics; the region halves do not.
    assert summary["table"]["sum x1"]["canny"]["cycle"][0] is not None
    assert summary["table"]["sum x1"]["regions"]["cycle"][0] is None
    # The reference's paired difference with itself is exactly zero.
    assert summary["table"]["sum x1"]["canny"]["d_recall"] == [0.0, 0.0]
    md = (tiny_run / "silent_signal.md").read_text()
    assert md.count("| sum x1 |") == 2 and "MIControlNet mgda layer, stage 2" in md
    z = np.load(tiny_run / "run.npz")
    run = json.loads((tiny_run / "run.json").read_text())
    assert len(run["results"]) == p.seeds * 2  # seeds x two pairings
    # The base's denoising report is stored and printed (one row per timestep).
    assert [d["t"] for d in run["base_denoising"]] == [50, 200, 400, 600, 800, 950, 999]
    assert md.count("| 999 |") == 1
    for i in range(len(run["results"])):
        for name in names:
            assert z[f"r{i}/img/{name}"].shape == (p.n_test, p.size, p.size)
            assert z[f"r{i}/m/{name}/canny/recall"].shape == (p.n_test,)
    grid = Image.open(tiny_run / "samples.png")
    assert grid.width > (3 + len(names)) * 64
    assert Image.open(tiny_run / "recall_vs_flat_tv.png").size[0] > 2 * 500


def test_every_variant_of_a_seed_and_pairing_starts_from_the_same_noise(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    digests = []
    for r in run["results"]:
        assert len(set(r["noise"].values())) == 1, r["noise"]
        digests.append(next(iter(r["noise"].values())))
    assert len(set(digests)) == len(digests)  # a fresh noise per (seed, pairing)
    assert json.loads((tiny_run / "silent_signal.json").read_text())["same_noise_within_each_seed_and_pairing"]


def test_paired_differences_are_per_image_differences_averaged_per_seed(tiny_run):
    """Recompute Δ recall and Δ TV flat of one variant against the reference from the
    saved per-image arrays: per seed the mean of per-image differences, then mean and SE over seeds."""
    z = np.load(tiny_run / "run.npz")
    run = json.loads((tiny_run / "run.json").read_text())
    summary = json.loads((tiny_run / "silent_signal.json").read_text())
    for metric in ("recall", "tv_flat"):
        per_seed = {}
        for i, r in enumerate(run["results"]):
            a = z[f"r{i}/m/MIControlNet mgda layer/regions/{metric}"]
            b = z[f"r{i}/m/sum x1/regions/{metric}"]
            per_seed.setdefault(r["seed"], []).append(a - b)
        d = np.array([np.nanmean(np.concatenate(v)) for _, v in sorted(per_seed.items())])
        want = [d.mean(), d.std(ddof=1) / np.sqrt(len(d))]
        got = summary["table"]["MIControlNet mgda layer"]["regions"][f"d_{metric}"]
        assert np.allclose(got, want, rtol=1e-9, atol=1e-12), (metric, got, want)


def test_one_control_rows_are_read_per_half(tiny_run):
    """'own control alone' on the canny halves is the canny-only sample of each pairing."""
    z = np.load(tiny_run / "run.npz")
    run = json.loads((tiny_run / "run.json").read_text())
    summary = json.loads((tiny_run / "silent_signal.json").read_text())
    per_seed = {}
    for i, r in enumerate(run["results"]):
        alone = "left control alone" if r["pairing"].startswith("canny|") else "right control alone"
        per_seed.setdefault(r["seed"], []).append(z[f"r{i}/m/{alone}/canny/tv_texture"])
    want = np.mean([np.nanmean(np.concatenate(v)) for _, v in sorted(per_seed.items())])
    assert np.isclose(summary["table"]["own control alone"]["canny"]["tv_texture"][0], want, rtol=1e-12)


def test_replot_redraws_the_same_table_from_the_saved_run(tiny_run, tmp_path):
    assert cli.main(["--replot", str(tiny_run), "--output", str(tmp_path)]) == 0
    assert (tmp_path / "silent_signal.md").read_text() == (tiny_run / "silent_signal.md").read_text()


def test_metrics_against_hand_computed_values():
    # Edges at 1 px: a generated edge one pixel off still counts; two pixels off does not.
    t = np.zeros((8, 8), bool)
    t[:, 3] = True
    within = np.ones((8, 8), bool)
    g1 = np.roll(t, 1, axis=1)
    assert M.edge_recall_precision(g1, t, within) == (1.0, 1.0)
    g2 = np.roll(t, 2, axis=1)
    assert M.edge_recall_precision(g2, t, within) == (0.0, 0.0)
    # The gain line: a point above the interpolated sweep is positive, outside its range NaN.
    assert M.gain_line_gap([0.1, 0.3], [0.5, 0.7], 0.2, 0.65) == pytest.approx(0.05)
    assert np.isnan(M.gain_line_gap([0.1, 0.3], [0.5, 0.7], 0.5, 0.9))
    assert M.seed_mean_se([1.0, 3.0]) == (2.0, 1.0)


def test_half_conditions_silence_the_other_half():
    left = np.ones((2, 8, 8, 3), np.float32)
    right = np.full((2, 8, 8, 3), 0.5, np.float32)
    a, b = half_conditions(left, right)
    assert (a[:, :, :4] == 1).all() and (a[:, :, 4:] == 0).all()
    assert (b[:, :, :4] == 0).all() and (b[:, :, 4:] == 0.5).all()


def test_bad_options_stop_with_a_message(tmp_path, capsys):
    assert cli.main(["--preset", "tiny", "--seeds", "1", "--output", str(tmp_path)]) == 2
    assert "at least 2" in capsys.readouterr().err
    import torch
    if not torch.cuda.is_available():
        assert cli.main(["--preset", "tiny", "--device", "cuda", "--output", str(tmp_path)]) == 2
        assert "no CUDA device" in capsys.readouterr().err
