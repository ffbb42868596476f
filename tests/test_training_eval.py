"""``python -m training eval`` as the paper measures: the silent region with its
margin, TV as a sum, cycle L1 over the non-silent region, the two-condition
protocol, and Asym for every injection on noised dataset latents (tiny models
built with ComfyUI's own classes)."""

import argparse
import copy

import numpy as np
import pytest
import torch
from PIL import Image

from headless import synthetic as s
from training import data, eval_images as E, evaluate, models, objectives as O


def _args(**kw):
    p = argparse.ArgumentParser()
    evaluate.add_arguments(p)
    return p.parse_args(["--output", "unused", *sum(([f"--{k.replace('_', '-')}", str(v)] for k, v in kw.items()), [])])


def test_silent_region_keeps_a_margin_from_every_non_silent_pixel_and_knows_non_black_silence():
    cond = np.zeros((40, 40, 3))
    cond[18:22, 18:22] = 1.0
    silent = E.silent_region(cond, margin=3)
    ys, xs = np.nonzero(~silent)
    # the non-silent square grown by 3 px (Euclidean), nothing else
    assert ys.min() == 15 and ys.max() == 24 and xs.min() == 15 and xs.max() == 24
    assert silent[14, 20] and not silent[15, 20] and silent[0, 0]
    assert (E.silent_region(cond, margin=0) == (cond.max(-1) == 0)).all()
    # a depth map: white is far (silent)
    assert (E.silent_region(1 - cond, margin=3, silent_value=1.0) == silent).all()


def test_tv_is_a_sum_over_silent_pairs_and_cycle_l1_skips_the_silent_region():
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 1, (32, 32, 3))
    half = np.zeros((32, 32), bool)
    half[:, :16] = True
    tv_half, mean_half = E.total_variation(img, half)
    tv_all, mean_all = E.total_variation(img, np.ones((32, 32), bool))
    assert tv_half == pytest.approx(mean_half * (32 * 15 + 31 * 16))
    assert tv_all > 1.9 * tv_half and mean_all == pytest.approx(mean_half, rel=0.1)  # a sum, not a mean
    # An image that is its condition's edge map plus texture in the silent part:
    cond = np.zeros((64, 64, 3))
    cond[20:44, 20] = 1.0
    made = np.full((64, 64, 3), 0.5)
    made[20:44, :21] = 1.0  # an edge on the condition's line
    made[:, 40:] = rng.uniform(0, 1, (64, 24, 3))  # texture in a silent area
    args = _args()
    default = E.image_metrics(made, cond, args)
    everywhere = E.image_metrics(made, cond, _args(cycle_region="all"))
    non_silent = cond.max(-1) > 0.02
    assert default["canny_l1"] == E.canny_l1(made, cond, non_silent)
    assert everywhere["canny_l1"] == E.canny_l1(made, cond, np.ones((64, 64), bool))
    # the texture's edges count as errors only when the silent region is included
    assert everywhere["canny_l1"] > 3 * default["canny_l1"], (default["canny_l1"], everywhere["canny_l1"])
    assert default["tv_silent_1e4"] == pytest.approx(default["tv_silent"] / 1e4) and default["tv_silent"] > 100


def test_pair_scores_each_half_against_its_own_condition(tmp_path):
    rng = np.random.default_rng(1)
    left_cond = np.zeros((64, 64, 3), np.uint8)
    left_cond[10:50, 5:28] = 255  # a block in the left half
    right_cond = np.zeros((64, 64, 3), np.uint8)
    right_cond[10:50, 36:60] = 255
    img = np.full((64, 64, 3), 128, np.uint8)
    img[:, :32] = (rng.uniform(0, 1, (64, 32, 3)) * 255).astype(np.uint8)  # texture left, flat right
    paths = {}
    for name, a in (("l", left_cond), ("r", right_cond), ("img", img)):
        paths[name] = tmp_path / f"{name}.png"
        Image.fromarray(a).save(paths[name])
    args = _args(output=tmp_path)
    args.images, args.pair = [str(paths["img"])], [str(paths["l"]), str(paths["r"])]
    m = E.measure_images(args)
    assert m["left_tv_silent"] > 50 and m["right_tv_silent"] == 0  # each half only sees its own pixels
    row = m["images"][0]
    assert row["left"]["silent_fraction"] < 0.5 and row["right"]["silent_fraction"] < 0.5


@pytest.fixture(scope="module")
def tiny():
    model = s.build_unet_model(s.TINY_SD15_UNET, seed=0)
    model.diffusion_model.requires_grad_(False)
    fresh = models.controlnet_from_unet(model.diffusion_model, model.model_config.unet_config, seed=0)
    trained = copy.deepcopy(fresh)
    with torch.no_grad():
        g = torch.Generator().manual_seed(5)
        for p in trained.parameters():
            if not p.any():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model, fresh, trained


@pytest.mark.parametrize("mode,granularity,convention", [
    ("vanilla", "layer", "as_written"), ("micontrolnet", "pixel", "as_written"),
    ("micontrolnet", "layer", "mgda_weight_of_control")])
def test_asym_on_noised_latents_for_every_injection(tiny, mode, granularity, convention):
    model, fresh, trained = tiny
    g = torch.Generator().manual_seed(3)
    hint = (torch.rand(2, 3, 64, 64, generator=g) > 0.8).float()
    context = torch.randn(2, 77, 768, generator=g)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    kw = dict(batch=2, levels=2, latents=latents, mode=mode, granularity=granularity, lambda_convention=convention)
    zero = evaluate.asym_metric(model, fresh, hint, context, **kw)
    levels = evaluate.asym_metric(model, trained, hint, context, **kw)
    assert [lv["timestep_index"] for lv in levels] == [20, 999]
    assert all(lv["asym"] > 0 and 0 < lv["nasym"] <= 1 for lv in levels), levels
    # A zero ControlNet adds nothing to the score's Jacobian under a plain add or as written.
    if mode == "vanilla" or convention == "as_written":
        assert all(lv["asym"] == 0 for lv in zero), zero


def test_eval_refuses_fid_without_a_feature_extractor(tmp_path):
    args = _args(output=tmp_path)
    args.images, args.fid_reference, args.condition = [], [str(tmp_path / "a.png")], None
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(SystemExit, match="FID needs Inception-type weights"):
        evaluate.run(args)


# --- data at scale -----------------------------------------------------------------------------------

def test_speck_regions_of_an_anti_aliased_map_merge_into_their_neighbours():
    from training.regions import merge_small_regions

    rng = np.random.default_rng(0)
    labels = np.zeros((128, 128), np.int64)
    labels[:, 64:] = 1
    labels[40:60, 10:30] = 2  # a real region of 400 px inside region 0
    specks = rng.random(labels.shape) < 0.03
    noisy = np.where(specks, rng.integers(3, 200, labels.shape), labels)
    assert len(np.unique(noisy)) > 150
    merged = merge_small_regions(noisy, min_area=32)
    assert len(np.unique(merged)) == 3
    for (y, x), (y2, x2) in (((0, 0), (127, 63)), ((0, 127), (127, 64)), ((45, 15), (55, 25))):
        assert merged[y, x] == merged[y2, x2]
    # every merged pixel joined the region around it
    agree = np.mean([(merged[labels == v] == np.bincount(merged[labels == v]).argmax()).mean() for v in range(3)])
    assert agree > 0.99
    # two separate patches of one colour are two regions
    two = np.zeros((20, 20), np.int64)
    two[2:8, 2:8] = 1
    two[12:18, 12:18] = 1
    assert len(np.unique(merge_small_regions(two, 4))) == 3


def test_silenced_regions_take_the_silent_value(tmp_path):
    from test_training_data import write_dataset

    root = write_dataset(tmp_path / "d", n=1)
    records = data.scan_dataset(root, need_condition=False).records
    opts = data.SampleOptions(resolution=64, condition="canny", rebalance_prob=1.0, keep_prob=0.5, silent_value=1.0)
    item = data.TrainingSamples(records, opts, seed=0)[(0, 0)]
    silenced = item["mask"] == 0
    assert silenced.any() and (item["hint"][:, silenced] == 1.0).all()


def test_the_dataset_index_is_built_once_and_read_fast_for_20k_files(tmp_path):
    import io
    import time

    root = tmp_path / "big"
    (root / "images").mkdir(parents=True)
    buf = io.BytesIO()
    Image.new("RGB", (6, 4), (10, 20, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    n = 20000
    for i in range(n):
        (root / "images" / f"{i:05d}.png").write_bytes(png)
        if i % 10 == 3:
            (root / "images" / f"{i:05d}.txt").write_text(f"caption {i}")
    t0 = time.perf_counter()
    built = data.scan_dataset(root, need_condition=False)
    t_build = time.perf_counter() - t0
    assert (root / ".bc-index.json").is_file()
    t0 = time.perf_counter()
    cached = data.scan_dataset(root, need_condition=False)
    t_read = time.perf_counter() - t0
    print(f"20k files: scan {t_build:.2f} s, index {t_read:.2f} s")
    assert len(cached.records) == n and cached.records == built.records
    assert cached.records[123].size == (6, 4) and cached.records[123].prompt == "caption 123"
    assert t_read < 0.25 * t_build, (t_build, t_read)  # (both grow with the machine's load; the ratio less)
    # a file added to the folder changes its mtime: the index is rebuilt
    (root / "images" / "extra.png").write_bytes(png)
    assert len(data.scan_dataset(root, need_condition=False).records) == n + 1
