"""The GPU check that ``benchmarks/gpu_check.sh`` runs (see there for the
environment): every benchmark at real sizes in fp16/bf16 with random
full-architecture weights, the dtype/device tests, and one bf16 training step
of each trainer, each in its own process with a time limit, then every ratio
in one summary. ``--dry-run``: the same stages on the CPU at tiny sizes.

    python benchmarks/gpu_check.py [--dry-run] [--budget 480] [--work DIR]
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = REPO / "benchmarks"
# Where a benchmark's table of figures starts: from there on its output is the result.
RESULTS = re.compile(r"^\s*(configuration|per-step time|ControlNet time per sampling step)")
# The tests whose subject is dtypes, precision or devices.
DTYPE_TEST_FILES = ["tests/test_balance_math.py", "tests/test_mi_compose.py", "tests/test_mi_records.py",
                    "tests/test_refine_control.py", "tests/test_training.py", "tests/test_training_paper.py"]
DTYPE_TEST_SELECTION = "dtype or precision or fp16 or bf16 or device"


def stages(dry: bool, work: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, time limit in s) of every stage, in order."""
    py = sys.executable
    dev = ["--device", "cpu" if dry else "cuda"]
    out = []

    def bench(name, script, full, tiny, limit):
        # "MIControlNet SD1.5 512px fp16" names the full size; a dry run says it is not that.
        name = " ".join(name.split()[:2]) + " (tiny, CPU)" if dry else name
        out.append((name, [py, str(BENCH / script), *dev, *(tiny if dry else full)], limit))

    bench("MIControlNet SD1.5 512px fp16", "bench_micontrolnet.py",
          ["--family", "sd15", "--latent", "64", "--dtype", "fp16", "--repeats", "5"],
          ["--small", "--latent", "8", "--repeats", "1"], 60)
    bench("MIControlNet SDXL 1024px bf16", "bench_micontrolnet.py",
          ["--family", "sdxl", "--latent", "128", "--dtype", "bf16", "--repeats", "5"],
          ["--small", "--family", "sdxl", "--latent", "8", "--repeats", "1", "--dtype", "bf16"], 150)
    bench("ControlNeXt SD1.5 512px fp16", "bench_controlnext.py",
          ["--family", "sd15", "--full", "--dtype", "fp16", "--steps", "5", "--repeats", "3"],
          ["--small", "--size", "64", "--steps", "1", "--repeats", "1"], 60)
    bench("ControlNeXt SDXL 1024px bf16", "bench_controlnext.py",
          ["--family", "sdxl", "--full", "--dtype", "bf16", "--steps", "5", "--repeats", "3"],
          ["--small", "--family", "sdxl", "--size", "64", "--steps", "1", "--repeats", "1", "--dtype", "bf16"], 150)
    bench("Refine-Control SD3 medium-width 1024px bf16", "bench_refine_control.py",
          ["--width-depth", "24", "--latent", "128", "--dtype", "bf16", "--repeats", "5"],
          ["--width-depth", "2", "--latent", "16", "--teacher-layers", "4", "--student-layers", "2",
           "--repeats", "1"], 60)
    if (BENCH / "bench_dit.py").is_file():
        extra = os.environ.get("BC_BENCH_DIT_ARGS", "").split()
        # The DiT benchmark's own options; a dry run only checks that it starts.
        out.append(("DiT ControlNets (bench_dit.py)", [py, str(BENCH / "bench_dit.py"),
                                                       *(["--help"] if dry else dev + extra)], 90))
    pytest = [py, "-m", "pytest", *DTYPE_TEST_FILES, "-q", "-p", "no:cacheprovider", "-k", DTYPE_TEST_SELECTION,
              "--basetemp", str(work / "pytest")]
    # In a dry run these tests are part of the suite already: only their selection is checked.
    out.append(("dtype/device tests", pytest + (["--collect-only"] if dry else []), 120))
    for trainer in ("micontrolnet", "controlnext", "refine-control"):
        out.append((f"training step: {trainer} bf16", training_command(trainer, work, dry), 120))
    return out


def training_command(trainer: str, work: Path, dry: bool) -> list[str]:
    out = work / f"train-{trainer}"
    common = ["--output", str(out), "--mixed-precision", "bf16", "--device", "cpu" if dry else "cuda",
              "--checkpoint-every", "1", "--no-progress", "--report-to", "csv,tensorboard", "--seed", "0"]
    if trainer == "refine-control":
        return [sys.executable, "-m", "training", trainer, "--base", str(work / "sd3.safetensors"),
                "--teacher", str(work / "sd3-teacher.safetensors"), "--data", str(work / "inpaint.jsonl"),
                "--layers", "2", "--stage1-steps", "1", "--stage2-steps", "0", "--resolution", "64" if dry else "256",
                *common]
    args = ["--base", str(work / "sd15.safetensors"), "--data", str(work / "unet-data"), "--condition", "canny",
            "--resolution", "64" if dry else "512", "--max-steps", "1", *common]
    if trainer == "micontrolnet":
        args += ["--plain-add-warmup-steps", "0"]
    return [sys.executable, "-m", "training", trainer, *args]


def prepare(work: Path, dry: bool) -> None:
    """The training stages' inputs: an SD1.5 checkpoint (full architecture, or
    the small one for a dry run), an SD3 base and teacher (small), and images."""
    import numpy as np
    from PIL import Image

    sys.path.insert(0, str(REPO))
    from headless import synthetic as s
    from headless import synthetic_sd3 as s3

    work.mkdir(parents=True, exist_ok=True)
    s.write_sd15_checkpoint(work / "sd15.safetensors", s.SD15_UNET_SMALL if dry else s.SD15_UNET)
    s3.write_sd3_checkpoint(work / "sd3.safetensors")
    s3.write_sd3_controlnet(work / "sd3-teacher.safetensors", num_blocks=3, seed=5)
    rng = np.random.default_rng(0)
    for folder in ("images", "masks", "unet-data/images"):
        (work / folder).mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(2):
        img = (rng.random((96, 96, 3)) * 255).astype(np.uint8)
        img[20:70, 10 + 20 * i:60 + 20 * i] = 255
        Image.fromarray(img).save(work / "images" / f"{i}.png")
        Image.fromarray(img).save(work / "unet-data" / "images" / f"{i}.png")
        (work / "unet-data" / "images" / f"{i}.txt").write_text(f"a white square, {i}")
        mask = np.zeros((96, 96), np.uint8)
        mask[24:72, 24:72] = 255
        Image.fromarray(mask).save(work / "masks" / f"{i}.png")
        lines.append(f'{{"image": "images/{i}.png", "mask": "masks/{i}.png", "prompt": "a white square"}}')
    (work / "inpaint.jsonl").write_text("\n".join(lines) + "\n")


def run_stage(name: str, command: list[str], limit: float) -> dict:
    t0 = time.perf_counter()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    try:
        proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=limit, env=env)
        status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
        text = proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as e:
        status = f"timed out after {limit:.0f}s"
        text = "".join(t.decode(errors="replace") if isinstance(t, bytes) else t
                       for t in (e.stdout or "", e.stderr or ""))
    seconds = time.perf_counter() - t0
    return {"name": name, "status": status, "seconds": seconds, "text": text}


def bench_results(text: str) -> list[str]:
    """A benchmark's result lines (its table and ratios), without progress lines."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if RESULTS.search(line)), len(lines))
    return [line.rstrip() for line in lines[start:] if line.strip() and not line.lstrip().startswith("round")]


def training_figures(work: Path, trainer: str) -> list[str]:
    log = work / f"train-{trainer}" / "log.csv"
    if not log.is_file():
        return []
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    return [f"step {r['step']}: loss {r['loss']}, {r['samples_per_s']} samples/s, {r['elapsed_s']} s"
            for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="the same stages on the CPU at tiny sizes")
    p.add_argument("--budget", type=float, default=480, help="seconds for everything; a stage that would not fit "
                   "is reported as not run (default: 480 = 8 minutes)")
    p.add_argument("--work", default=None, help="folder for the generated checkpoints and runs (default: a "
                   "temporary folder)")
    p.add_argument("--prepare", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.prepare:
        prepare(Path(args.prepare), args.dry_run)
        return 0
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"gpu_check: torch {torch.__version__} sees no CUDA device; run on a GPU machine, "
                             f"or pass --dry-run for the CPU check at tiny sizes")
        print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bc-gpu-check-"))
    start = time.perf_counter()
    results = [run_stage("prepare checkpoints", [sys.executable, str(Path(__file__).resolve()), "--prepare",
                                                 str(work), *(["--dry-run"] if args.dry_run else [])], 180)]
    for name, command, limit in stages(args.dry_run, work):
        left = args.budget - (time.perf_counter() - start)
        if results[0]["status"] != "ok" and name.startswith("training step"):
            results.append({"name": name, "status": "not run (prepare failed)", "seconds": 0.0, "text": ""})
            continue
        if left < 10:
            results.append({"name": name, "status": "not run (time budget spent)", "seconds": 0.0, "text": ""})
            continue
        print(f"== {name}", flush=True)
        # The limits are the GPU's; a dry run's CPU (perhaps shared) is the slow side.
        result = run_stage(name, command, min(limit * 5 if args.dry_run else limit, left))
        print(f"   {result['status']} in {result['seconds']:.1f}s", flush=True)
        results.append(result)

    print("\n" + "=" * 100)
    print(f"GPU check{' (dry run, CPU, tiny sizes)' if args.dry_run else ''}: "
          f"{time.perf_counter() - start:.0f}s in all, work folder {work}")
    for r in results:
        print(f"\n[{r['status']}] {r['name']} ({r['seconds']:.1f}s)")
        lines = bench_results(r["text"])
        if r["name"].startswith("training step"):
            lines = training_figures(work, r["name"].split(": ")[1].split()[0])
        elif r["name"] == "dtype/device tests":
            lines = [line for line in r["text"].splitlines() if re.search(r"passed|failed|error|selected", line)][-2:]
        for line in lines:
            print(f"    {line}")
        if r["status"] != "ok" and not r["status"].startswith("not run"):
            print("    --- last lines of its output:")
            for line in r["text"].splitlines()[-15:]:
                print(f"    | {line}")
    failed = [r["name"] for r in results if r["status"] != "ok"]
    print(f"\n{len(results) - len(failed)}/{len(results)} stages ok" + (f"; not ok: {', '.join(failed)}" if failed
                                                                        else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
