"""The options every trainer spells alike: ``--lr-scheduler`` against
diffusers' own schedulers, ``--report-to tensorboard`` read back with
TensorBoard's EventAccumulator, several validation pairs, ``--config`` (TOML
and an earlier run's args.json) with the command line overriding it, and
short CPU runs of the three trainers (subprocesses, as users start them)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training import engine
from training.__main__ import SUBCOMMANDS, parse_args
from training.conventions import lr_at

from refine_control_common import _dataset, _files
from test_training_data import write_dataset
from training_subprocess import remove_checkpoints, run_training, training_command

TRAINERS = ("micontrolnet", "controlnext", "refine-control")
# Options whose names and meaning every trainer shares.
SHARED = ("--report-to", "--lr-scheduler", "--lr-warmup-steps", "--lr-power", "--config", "--learning-rate",
          "--weight-decay", "--mixed-precision", "--max-grad-norm", "--max-skipped-steps", "--batch-size",
          "--resolution", "--seed", "--device", "--output", "--name", "--resume", "--checkpoint-every",
          "--keep-checkpoints", "--save-dtype", "--no-progress")


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


# --- the schedule against diffusers -------------------------------------------------------------------

def _diffusers_rates(kind: str, base: float, warmup: int, total: int, power: float) -> list[float]:
    """Rates from diffusers' schedulers (its step k's rate serves our step k-1
    during the warm-up: our first step already runs at base/warmup, diffusers' at 0)."""
    import torch
    from diffusers.optimization import (get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup,
                                        get_polynomial_decay_schedule_with_warmup)

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    if kind == "constant":
        sched = get_constant_schedule_with_warmup(opt, warmup)
    elif kind == "cosine":
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    else:
        sched = get_polynomial_decay_schedule_with_warmup(opt, warmup, total, lr_end=0.0, power=power)
    rates = []
    for _ in range(total + 1):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return [rates[s + 1] if s < warmup else rates[s] for s in range(total)]


@pytest.mark.parametrize("kind,warmup,power", [("constant", 3, 1.0), ("cosine", 0, 1.0), ("cosine", 4, 1.0),
                                               ("polynomial", 2, 1.0), ("polynomial", 0, 2.5)])
def test_the_schedules_are_diffusers_schedules(kind, warmup, power):
    total, base = 17, 3e-4
    ours = [lr_at(s, base, kind, warmup, total, power) for s in range(total)]
    assert ours == pytest.approx(_diffusers_rates(kind, base, warmup, total, power), rel=1e-12, abs=1e-18)
    if warmup:
        assert ours[0] == pytest.approx(base / warmup) and ours[warmup - 1] == pytest.approx(base)
    if kind != "constant":
        assert ours[-1] < ours[warmup] / 10  # it decays


# --- command line and --config ----------------------------------------------------------------------

def _required(subcommand: str, tmp: Path) -> list[str]:
    common = ["--base", str(tmp / "base.safetensors"), "--data", str(tmp / "data"), "--output", str(tmp / "out")]
    return common + (["--teacher", str(tmp / "teacher.safetensors")] if subcommand == "refine-control" else [])


@pytest.mark.parametrize("subcommand", TRAINERS)
def test_every_trainer_has_the_shared_options(subcommand):
    import argparse

    parser = argparse.ArgumentParser()
    SUBCOMMANDS[subcommand][1](parser)
    names = {s for a in parser._actions for s in a.option_strings}
    assert not set(SHARED) - names, f"{subcommand} lacks {sorted(set(SHARED) - names)}"


def _toml(values: dict) -> str:
    """A flat TOML table (JSON strings, numbers, booleans and arrays are TOML too)."""
    return "\n".join(f"{k.replace('_', '-')} = {json.dumps(v)}" for k, v in values.items() if v is not None)


@pytest.mark.parametrize("subcommand", TRAINERS)
def test_config_files_read_back_every_option_and_the_command_line_wins(subcommand, tmp_path):
    flags = _required(subcommand, tmp_path) + [
        "--learning-rate", "3e-4", "--lr-scheduler", "polynomial", "--lr-power", "2", "--lr-warmup-steps", "5",
        "--report-to", "csv,tensorboard", "--seed", "7", "--no-progress", "--save-dtype", "bf16"]
    if subcommand != "refine-control":
        flags += ["--validation-prompt", "a red ball", "--validation-prompt", "a blue cube", "--validate-every", "3"]
    original = vars(parse_args([subcommand, *flags]))
    # Every option of the subcommand is in the namespace, so each is written and read back below.
    assert original["report_to"] == ["csv", "tensorboard"] and original["lr_power"] == 2.0

    toml = tmp_path / "run.toml"
    toml.write_text(_toml({k: v for k, v in original.items() if k not in ("command", "config")}))
    assert vars(parse_args([subcommand, "--config", str(toml)])) == {**original, "config": str(toml)}

    # args.json as a run writes it (training/loop.py), then command-line flags on top of it.
    args_json = tmp_path / "args.json"
    args_json.write_text(json.dumps(original, indent=1, default=str))
    again = vars(parse_args([subcommand, "--config", str(args_json), "--learning-rate", "0.5",
                             "--report-to", "tensorboard", "--lr-scheduler", "cosine"]))
    expected = {**original, "config": str(args_json), "learning_rate": 0.5, "report_to": ["tensorboard"],
                "lr_scheduler": "cosine"}
    assert again == expected
    if subcommand != "refine-control":
        # A repeatable option on the command line replaces the file's list.
        one = vars(parse_args([subcommand, "--config", str(toml), "--validation-prompt", "only this"]))
        assert one["validation_prompt"] == ["only this"]


def test_config_with_unknown_or_wrong_keys_names_them(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('learning_rat = 1e-4\nlr-sheduler = "cosine"\nfrobnicate = 1\n')
    with pytest.raises(SystemExit) as e:
        parse_args(["controlnext", "--config", str(bad)])
    message = str(e.value)
    assert "'learning_rat' (did you mean learning-rate?)" in message
    assert "'lr-sheduler' (did you mean lr-scheduler?)" in message and "'frobnicate'" in message
    wrong = tmp_path / "wrong.toml"
    wrong.write_text('lr-scheduler = "linear"\n')
    with pytest.raises(SystemExit, match="lr-scheduler = 'linear': expected one of constant, cosine, polynomial"):
        parse_args(["micontrolnet", "--config", str(wrong)])
    other = tmp_path / "args.json"
    other.write_text(json.dumps({"command": "refine-control", "layers": 4}))
    with pytest.raises(SystemExit, match="not of 'training micontrolnet'"):
        parse_args(["micontrolnet", "--config", str(other)])


def test_a_validation_count_mismatch_names_both_counts(tmp_path):
    from training import controlnext, micontrolnet

    images = []
    for i in range(2):
        images += ["--validation-image", str(tmp_path / f"c{i}.png")]
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / f"c{i}.png")
    prompts = ["--validation-prompt", "a", "--validation-prompt", "b", "--validation-prompt", "c"]
    for name, module in (("micontrolnet", micontrolnet), ("controlnext", controlnext)):
        args = parse_args([name, *_required(name, tmp_path), *prompts, *images])
        with pytest.raises(SystemExit, match="--validation-prompt was given 3 times and --validation-image 2 times"):
            module._check_args(args)
        # Pairs of equal counts, or one image for every prompt, are accepted.
        module._check_args(parse_args([name, *_required(name, tmp_path), *prompts[:4], *images]))
        module._check_args(parse_args([name, *_required(name, tmp_path), *prompts, *images[:2]]))


# --- short runs --------------------------------------------------------------------------------------

def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag: str) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.fixture(scope="module")
def unet_runs(tmp_path_factory, small_sd15_files):
    root = tmp_path_factory.mktemp("conventions")
    data = write_dataset(root / "data", n=2)
    for i, (y, x) in enumerate([(8, 8), (24, 30)]):
        img = np.zeros((64, 64, 3), np.uint8)
        img[y:y + 24, x:x + 24] = 255
        Image.fromarray(img).save(root / f"val{i}.png")
    yield {"root": root, "data": data, "base": small_sd15_files["checkpoint"],
           "init": small_sd15_files["controlnets"][0]}
    remove_checkpoints(root)


def _unet_args(runs, out, steps):
    return ["--base", str(runs["base"]), "--data", str(runs["data"]), "--output", str(out), "--condition", "canny",
            "--resolution", "64", "--max-steps", str(steps), "--checkpoint-every", str(steps), "--seed", "1",
            "--save-dtype", "fp32", "--no-progress", "--keep-checkpoints", "1"]


def test_micontrolnet_run_reports_to_csv_and_tensorboard_with_a_cosine_schedule(unet_runs):
    runs, steps, base_lr = unet_runs, 5, 1e-3
    out = runs["root"] / "micontrolnet"
    val = []
    for i, prompt in enumerate(["a red ball", "a blue cube"]):
        val += ["--validation-prompt", prompt, "--validation-image", str(runs["root"] / f"val{i}.png")]
    args = _unet_args(runs, out, steps) + [
        "--init-controlnet", str(runs["init"]), "--plain-add-warmup-steps", "0", "--learning-rate", str(base_lr),
        "--lr-scheduler", "cosine", "--lr-warmup-steps", "2", "--report-to", "csv", "--report-to", "tensorboard",
        "--validate-every", str(steps), "--validation-steps", "1", *val]
    run_training(training_command("micontrolnet", args), runs["root"] / "micontrolnet.log", env())

    rows = engine.read_csv_log(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, steps + 1))
    expected = _diffusers_rates("cosine", base_lr, 2, steps, 1.0)
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)  # the CSV prints 6 digits

    acc = _events(out / "tensorboard")
    lr, loss = _scalars(acc, "train/lr"), _scalars(acc, "train/loss")
    assert sorted(lr) == list(range(1, steps + 1))
    assert [lr[s] for s in sorted(lr)] == pytest.approx(expected, rel=1e-5)
    assert [loss[s] for s in sorted(loss)] == pytest.approx([float(r["loss"]) for r in rows], rel=1e-6)
    assert {"train/task_loss", "train/qc_loss", "train/samples_per_s"} <= set(acc.Tags()["scalars"])

    # Two validation pairs: two files, each the pair's condition beside its sample, both in TensorBoard.
    files = [out / "validation" / f"step-{steps:08d}-{k}.png" for k in range(2)]
    pictures = [np.asarray(Image.open(f), dtype=np.float32) for f in files]
    for k, pic in enumerate(pictures):
        condition = np.asarray(Image.open(runs["root"] / f"val{k}.png"), dtype=np.float32)
        assert np.abs(pic[:, :64] - condition).max() <= 1
    assert np.abs(pictures[0] - pictures[1]).max() > 100
    for k in range(2):
        (event,) = acc.Images(f"validation/{k}")
        assert event.step == steps and (event.width, event.height) == (128, 64)


def test_controlnext_run_tensorboard_only_with_a_polynomial_schedule(unet_runs):
    runs, steps, base_lr = unet_runs, 4, 2e-4
    out = runs["root"] / "controlnext"
    args = _unet_args(runs, out, steps) + ["--learning-rate", str(base_lr), "--lr-scheduler", "polynomial",
                                           "--lr-power", "2", "--report-to", "tensorboard"]
    run_training(training_command("controlnext", args), runs["root"] / "controlnext.log", env())
    assert not (out / "log.csv").exists()  # --report-to names every log the run writes
    lr = _scalars(_events(out / "tensorboard"), "train/lr")
    # The UNet subset runs at the scheduled rate (the module at 10x it).
    assert [lr[s] for s in sorted(lr)] == pytest.approx(_diffusers_rates("polynomial", base_lr, 0, steps, 2.0),
                                                        rel=1e-5)
    assert (out / "controlnext.safetensors").is_file()


def test_refine_control_run_from_a_config_file(tmp_path):
    base, teacher = _files()
    data = _dataset(tmp_path, n=1, broken=False)
    out = tmp_path / "run"
    config = tmp_path / "run.toml"
    config.write_text(_toml({"base": str(base), "teacher": str(teacher), "data": str(data), "output": str(out),
                             "layers": 2, "stage1-steps": 3, "stage2-steps": 0, "resolution": 32,
                             "learning-rate": 1e-3, "lr-scheduler": "cosine", "lr-warmup-steps": 1,
                             "report-to": ["csv", "tensorboard"], "checkpoint-every": 0, "save-dtype": "fp32",
                             "no-progress": True, "fixed-noise": True}))
    # The command line overrides the file: 4 steps, not 3.
    run_training(training_command("refine-control", ["--config", str(config), "--stage1-steps", "4"]),
                 tmp_path / "rc.log", env())
    rows = engine.read_csv_log(out / "log.csv")
    expected = _diffusers_rates("cosine", 1e-3, 1, 4, 1.0)
    assert [float(r["lr"]) for r in rows] == pytest.approx(expected, rel=1e-5)
    lr = _scalars(_events(out / "tensorboard"), "train/lr")
    assert [lr[s] for s in sorted(lr)] == pytest.approx(expected, rel=1e-5)
    written = json.loads((out / "args.json").read_text())
    assert written["stage1_steps"] == 4 and written["lr_scheduler"] == "cosine" and written["config"] == str(config)
