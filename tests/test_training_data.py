"""Training data, checkpoints, base-checkpoint checks, eval metrics and the command line, in process.
Tiny models built with ComfyUI's own classes."""

import contextlib
import errno
import json
import resource
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from headless import synthetic as s
from training import data, engine, models

from test_training import make_batch, tiny  # noqa: F401 (tiny is a fixture)


def write_dataset(root: Path, n=3, with_segmentation=True):
    import skimage.data

    (root / "images").mkdir(parents=True)
    (root / "segmentation").mkdir()
    for i, name in enumerate(["astronaut", "chelsea", "coffee", "rocket"][:n]):
        img = getattr(skimage.data, name)()
        Image.fromarray(img).save(root / "images" / f"{name}.png")
        (root / "images" / f"{name}.txt").write_text(f"a photo, {name}")
        if with_segmentation:
            seg = np.zeros(img.shape[:2], np.uint8)
            seg[:, img.shape[1] // 2:] = 1
            seg[: img.shape[0] // 2] += 2
            Image.fromarray(seg * 60).save(root / "segmentation" / f"{name}.png")
    return root


def test_corrupt_and_missing_files_are_reported_by_name_and_skipped(tmp_path, caplog):
    root = write_dataset(tmp_path / "ds")
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png" * 10)
    (root / "images" / "broken.txt").write_text("broken")
    jsonl = tmp_path / "ds.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in [
        {"image": "ds/images/astronaut.png", "prompt": "ok"},
        {"image": "ds/images/missing.png", "prompt": "gone"},
        {"image": "ds/images/broken.png"},
    ]))
    with caplog.at_level("WARNING"):
        folder = data.scan_dataset(root, need_condition=False)
        lines = data.scan_dataset(jsonl, need_condition=False)
    assert [r.name for r in folder.records] == ["astronaut", "chelsea", "coffee"]
    assert len(folder.skipped) == 1 and folder.skipped[0][0].endswith("broken.png")
    assert [r.prompt for r in lines.records] == ["ok"] and len(lines.skipped) == 2
    assert "missing.png" in caplog.text and "broken.png" in caplog.text and "skipped 2 of 3" in caplog.text
    # A condition image is required unless conditions are computed (canny).
    with pytest.raises(ValueError, match="no usable samples"):
        data.scan_dataset(root, need_condition=True)

    # A file that breaks after the scan is skipped at load time, by name, and the run goes on.
    samples = data.TrainingSamples(folder.records, data.SampleOptions(resolution=64, condition="canny"), seed=0)
    (root / "images" / "chelsea.png").write_bytes((root / "images" / "chelsea.png").read_bytes()[:200])
    with caplog.at_level("WARNING"):
        item = samples[(5, 1)]
    assert item["index"] == 2 and samples.bad == {1}
    assert "chelsea.png" in caplog.text


def test_samples_are_reproducible_and_rebalanced(tmp_path):
    root = write_dataset(tmp_path / "ds")
    recs = data.scan_dataset(root, need_condition=False).records
    opts = data.SampleOptions(resolution=64, condition="canny", rebalance_prob=1.0, probes=True)
    a = data.TrainingSamples(recs, opts, seed=3)
    b = data.TrainingSamples(recs, opts, seed=3)
    x, y = a[(7, 0)], b[(7, 0)]
    for k in ("hint", "noise", "probe", "mask", "timestep_index"):
        assert torch.equal(x[k], y[k]), k
    assert not torch.equal(a[(8, 0)]["noise"], x["noise"])
    # Some regions are silent and some keep the condition; the target stays whole.
    m = x["mask"]
    assert 0 < m.mean() < 1 and set(m.unique().tolist()) <= {0.0, 1.0}
    assert (x["hint"][:, m == 0] == 0).all()
    full = data.canny(data.load_rgb(recs[0].image, 64))
    assert torch.equal(x["hint"], torch.from_numpy(full).permute(2, 0, 1).float() / 255 * m)
    assert x["probe"].abs().eq(1).all()
    # Without segmentation maps the fallback superpixels give several regions.
    labels = data.superpixels(data.load_rgb(recs[0].image, 64), 12)
    assert len(np.unique(labels)) >= 4


def test_data_order_is_the_same_for_one_and_two_ranks():
    one = list(data.PositionSampler(10, 0, 0, 5, micro_batch=2, accumulation=1, world=1, rank=0))
    two = [list(data.PositionSampler(10, 0, 0, 5, micro_batch=1, accumulation=1, world=2, rank=r)) for r in (0, 1)]
    assert [sum(pair, []) for pair in zip(*two)] == one
    resumed = list(data.PositionSampler(10, 0, 3, 5, micro_batch=2, accumulation=1, world=1, rank=0))
    assert resumed == one[3:]


@contextlib.contextmanager
def file_size_limit(max_bytes: int):
    """Writes past ``max_bytes`` fail with a real I/O error (EFBIG), as on a
    full disk: the kernel's per-process file-size limit, SIGXFSZ ignored."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_failed_checkpoint_write_leaves_the_previous_one_intact(tmp_path):
    store = engine.CheckpointStore(tmp_path / "checkpoints", keep=2)
    tmp = store.begin(2)
    engine.save_tensors({"w": torch.ones(3)}, tmp / "controlnet.safetensors")
    engine.write_json(tmp / "state.json", {"step": 2})
    good = store.commit(2)

    tmp = store.begin(4)
    # The real safetensors writer fails part way; it must surface as OSError,
    # the one error the trainer handles by logging and going on.
    with file_size_limit(64 * 1024), pytest.raises(OSError) as failure:
        engine.save_tensors({"w": torch.zeros(1 << 20)}, tmp / "controlnet.safetensors")
    assert failure.value.errno == errno.EFBIG and "controlnet.safetensors" in str(failure.value)
    store.abort(4)
    assert store.latest() == good and store.resolve("latest") == good
    assert torch.equal(engine.load_tensors(good / "controlnet.safetensors")["w"], torch.ones(3))
    assert not list(store.root.glob(".tmp-*"))

    # A process killed mid-write leaves a .tmp folder: ignored, then cleaned by the next save.
    (store.root / ".tmp-step-00000006").mkdir()
    (store.root / ".tmp-step-00000006" / "state.json").write_text("{}")
    assert store.latest() == good
    store.begin(8)
    assert not (store.root / ".tmp-step-00000006").exists()


def test_wrong_family_base_checkpoint_fails_at_start(tmp_path, small_sd15_files):
    sd2_like = dict(s.SD15_UNET_SMALL, context_dim=1024, use_linear_in_transformer=True, num_res_blocks=[1],
                    channel_mult=[1], transformer_depth=[1], transformer_depth_output=[1, 1])
    path = s.save(s.unet_state_dict(sd2_like), tmp_path / "sd2-like.safetensors")
    with pytest.raises(models.WrongFamilyError, match=r"SD20 checkpoint, but training supports SD1.5 and SDXL"):
        models.load_base_model(path)
    with pytest.raises(models.WrongFamilyError, match=r"expected a sdxl checkpoint .* found SD1.5"):
        models.load_base_model(small_sd15_files["checkpoint"], "sdxl")
    cn = small_sd15_files["controlnets"][0]
    with pytest.raises(models.WrongFamilyError, match="no diffusion-model weights"):
        models.load_base_model(cn)


def test_eval_metrics_measure_what_they_claim(tmp_path, tiny):
    from training import evaluate

    flat = np.full((32, 32, 3), 0.5)
    noisy = flat + np.random.default_rng(0).uniform(-0.2, 0.2, flat.shape)
    silent = np.zeros((32, 32), bool)
    silent[:, :16] = True
    assert evaluate.total_variation(flat, silent) == (0.0, 0.0)
    tv_sum, tv_mean = evaluate.total_variation(noisy, silent)
    assert tv_mean > 0.05 and tv_sum == pytest.approx(tv_mean * (32 * 15 + 31 * 16))  # a sum over the pairs
    # Canny of an image that is its own edge map: cycle consistency is ~perfect.
    cond = np.zeros((64, 64, 3))
    cond[20:44, 20:44] = 1.0
    edges = data.canny((cond * 255).astype(np.uint8))[..., :] / 255.0
    region = np.ones((64, 64), bool)
    assert evaluate.canny_l1(cond, edges, region) < evaluate.canny_l1(flat.repeat(2, 0).repeat(2, 1), edges, region)

    # Asym: zero for a ControlNet with zero outputs, positive for a trained one.
    model = tiny["model"]
    batch = make_batch(b=1, seed=11)
    for name, positive in (("fresh", False), ("trained", True)):
        levels = evaluate.asym_metric(model, tiny[name], batch.hint, batch.context, batch=2, levels=2)
        assert len(levels) == 2
        assert all((lv["asym"] > 0) if positive else (lv["asym"] == 0) for lv in levels), levels
    evaluate.bar_chart({"asym": 1.0, "tv_silent": 0.5}, tmp_path / "c.png")
    assert Image.open(tmp_path / "c.png").size[0] > 100


@pytest.mark.parametrize("subcommand", ["micontrolnet", "controlnext", "eval", "refine-control",
                                        "refine-control-eval"])
def test_help_explains_every_option(subcommand):
    import argparse
    import subprocess
    import sys

    from headless.runtime import REPO
    from training.__main__ import SUBCOMMANDS

    out = subprocess.run([sys.executable, "-m", "training", subcommand, "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parser = argparse.ArgumentParser()
    SUBCOMMANDS[subcommand][1](parser)
    for action in parser._actions:
        assert action.help, f"{subcommand}: --{action.dest} has no help"
        assert action.option_strings[0] in out.stdout
