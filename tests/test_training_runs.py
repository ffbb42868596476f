"""``python -m training micontrolnet`` as users run it: subprocesses on a small
SD1.5-family checkpoint. One uninterrupted reference run; a run killed with
SIGKILL after a checkpoint and resumed must log the same losses; a 2-rank gloo
run (torchrun) with the same global batch must reach the same weights; the
trained file must sample through MIControlNetApply in ComfyUI's server."""

import json
import os
import signal
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from headless import synthetic
from headless.runtime import REPO
from headless.server import ComfyServer, copy_model
from training import engine

from test_training_data import write_dataset
from training_subprocess import kill_at_first_checkpoint, remove_checkpoints, run_training, training_command

STEPS = 6


def common_args(base, data, out, init):
    return ["--base", str(base), "--init-controlnet", str(init), "--data", str(data), "--output", str(out), "--condition", "canny",
            "--resolution", "64", "--max-steps", str(STEPS), "--checkpoint-every", "2", "--stage", "2",
            "--qc-every", "3", "--plain-add-warmup-steps", "2", "--learning-rate", "1e-4", "--seed", "1",
            "--cache-latents", "--save-dtype", "fp32", "--no-progress", "--validate-every", str(STEPS),
            "--validation-steps", "2", "--keep-checkpoints", "1"]


def env():
    return dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def train(args, log: Path, torchrun_ranks: int = 0, timeout=600):
    command = training_command("micontrolnet", args, torchrun_ranks, _free_port() if torchrun_ranks else 0)
    run_training(command, log, env(), timeout)


def _free_port():
    from headless.server import free_port

    return free_port()


def losses(out: Path):
    return [(int(r["step"]), r["loss"], r["qc_loss"]) for r in engine.read_csv_log(out / "log.csv")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, small_sd15_files):
    root = tmp_path_factory.mktemp("train")
    data = write_dataset(root / "data", n=4)
    base = small_sd15_files["checkpoint"]
    init = small_sd15_files["controlnets"][0]  # stage 2 continues a stage-1 ControlNet
    ref = root / "reference"
    train(common_args(base, data, ref, init) + ["--batch-size", "2"], root / "reference.log")
    yield {"root": root, "data": data, "base": base, "reference": ref, "init": init}
    remove_checkpoints(root)


def test_reference_run_outputs(runs):
    ref = runs["reference"]
    rows = losses(ref)
    assert [r[0] for r in rows] == list(range(1, STEPS + 1))
    # L_QC ran on steps 1 and 4 (qc-every 3) and is part of the loss there.
    assert float(rows[3][2]) != 0 and float(rows[1][2]) == 0
    # Checkpoints at steps 2, 4 and 6; --keep-checkpoints 1 pruned all but the last.
    assert sorted(p.name for p in (ref / "checkpoints").iterdir()) == [f"step-{STEPS:08d}"]
    assert (ref / "validation" / f"step-{STEPS:08d}.png").is_file()
    sd = safetensors.torch.load_file(str(ref / "micontrolnet.safetensors"))
    expected = set(synthetic.controlnet_state_dict(synthetic.SD15_UNET_SMALL))
    assert set(sd) == expected  # ControlNet v1.1 (ldm) keys, nothing else
    start = safetensors.torch.load_file(str(runs["init"]))
    assert any(not torch.equal(sd[k], start[k].to(sd[k].dtype)) for k in sd if k.startswith("zero_convs."))  # it trained
    with safetensors.safe_open(str(ref / "micontrolnet.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["lambda_convention"] == "as_written" and meta["stage"] == "2"


def test_sigkill_and_resume_gives_identical_losses(runs):
    out = runs["root"] / "killed"
    args = common_args(runs["base"], runs["data"], out, runs["init"]) + ["--batch-size", "2"]
    returncode = kill_at_first_checkpoint(training_command("micontrolnet", args), out,
                                          runs["root"] / "killed.log", env())
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "micontrolnet.safetensors").exists()
    train(args + ["--resume", "latest"], runs["root"] / "resumed.log")
    assert losses(out) == losses(runs["reference"])
    a = safetensors.torch.load_file(str(out / "micontrolnet.safetensors"))
    b = safetensors.torch.load_file(str(runs["reference"] / "micontrolnet.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_two_gloo_ranks_equal_one_rank_with_the_same_global_batch(runs):
    out = runs["root"] / "ddp"
    train(common_args(runs["base"], runs["data"], out, runs["init"]) + ["--batch-size", "1"], runs["root"] / "ddp.log",
          torchrun_ranks=2)
    one, two = losses(runs["reference"]), losses(out)
    assert [r[0] for r in two] == [r[0] for r in one]
    for (_, l1, q1), (_, l2, q2) in zip(one, two):
        assert float(l2) == pytest.approx(float(l1), rel=1e-4, abs=1e-6)
    a = safetensors.torch.load_file(str(out / "micontrolnet.safetensors"))
    b = safetensors.torch.load_file(str(runs["reference"] / "micontrolnet.safetensors"))
    moved = max(float((b[k] - a[k]).abs().max()) for k in a)
    update = max(float(b[k].abs().max()) for k in b if k.startswith("zero_convs."))
    # Adam divides by the gradient scale, so float-rounding differences of the
    # all-reduce show up at about 1% of the update; a different batch would be ~100%.
    assert moved < 5e-2 * update, (moved, update)


def test_trained_controlnet_samples_through_the_node_in_comfyui(runs, tmp_path, small_sd15_files):
    base = tmp_path / "comfy"
    ckpt = copy_model(small_sd15_files["checkpoint"], base / "models" / "checkpoints", "small-sd15.safetensors")
    trained = copy_model(runs["reference"] / "micontrolnet.safetensors", base / "models" / "controlnet",
                         "trained-micontrolnet.safetensors")
    (base / "input").mkdir(parents=True, exist_ok=True)
    for img in (REPO / "example_workflows" / "inputs").glob("*.png"):
        (base / "input" / img.name).write_bytes(img.read_bytes())
    prompt = json.loads((REPO / "example_workflows" / "api" / "micontrolnet_two_controls.json").read_text())
    prompt["1"]["inputs"]["ckpt_name"] = ckpt
    prompt["4"]["inputs"]["control_net_name"] = trained
    prompt["5"]["inputs"]["control_net_name"] = trained
    prompt["11"]["inputs"].update(width=64, height=64)
    prompt["12"]["inputs"]["steps"] = 2
    with ComfyServer(base, extra_args=["--cache-none"]) as server:
        entry = server.run(prompt)
        images = server.output_images(entry)
        assert images["14"], server.log_tail()
        assert "missing controlnet keys" not in server.log_text()
