"""``python -m training refine-control``: distil an SD3 inpainting ControlNet
into a shallower student (Refine-Control), and ``refine-control-eval``.

Teacher: any SD3 ControlNet file ComfyUI loads (the 23-layer 17-channel
inpainting one included). Base: an SD3 single-file checkpoint ComfyUI loads.
The student (N layers, default 12) starts from the base transformer's first N
joint blocks and embedders plus the teacher's conditioning embedder
(``pos_embed_input``); its output projections start at zero.

Stage 1 (labelled data): w_task·L_task + w_kd·L_kd + w_af·L_af.
Stage 2 (unlabelled masked images): w_kd·L_kd + w_af·L_af; the noisy input is
built from the image itself. Losses: ``model_patches/refine_control.py``.

Data (JSONL, paths relative to the file; or a folder with metadata.jsonl)::

    {"image": "img/0001.png", "mask": "mask/0001.png", "prompt": "a cat",
     "local_prompt": "a cat's head"}

``mask`` is white where to inpaint. Items whose mask is missing or unreadable
are reported and skipped (never trained as unmasked).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("training.refine_control")

HELP = "distil an SD3 inpainting ControlNet into an N-layer student (Refine-Control, two stages)"
EVAL_HELP = "evaluate Refine-Control student vs teacher: masked PSNR/SSIM and ControlNet time per step"

DESCRIPTION = """\
Distil an SD3 inpainting ControlNet (teacher) into an N-layer student.

  python -m training refine-control --base sd3_medium.safetensors \\
      --teacher SD3-Controlnet-Inpainting.safetensors --data labelled.jsonl \\
      --unlabeled unlabelled.jsonl --output runs/student --layers 12 \\
      --stage1-steps 20000 --stage2-steps 5000

Multi-GPU: torchrun --nproc_per_node 8 -m training refine-control ...
(--batch-size is per rank). --resume latest continues from the last checkpoint.
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.description = DESCRIPTION
    g = p.add_argument_group("models")
    g.add_argument("--base", required=True, help="single-file SD3 checkpoint (transformer, text encoders, VAE)")
    g.add_argument("--teacher", required=True, help="SD3 ControlNet file (diffusers SD3ControlNetModel keys)")
    g.add_argument("--layers", type=int, default=12, help="student depth N (default 12); must be below the base depth")
    g.add_argument("--teacher-wiring", default="diffusers_0.29",
                   help="how the teacher's residuals reach the base blocks (default diffusers_0.29: one-to-one "
                        "for the 23-layer teacher, as it was trained)")
    g.add_argument("--student-wiring", default="diffusers_0.29",
                   help="wiring the student is trained with; pass the same to the node (default diffusers_0.29; "
                        "for 12 layers on 24 blocks all wirings agree)")
    g.add_argument("--convention", default="diffusers", choices=["diffusers", "comfyui"],
                   help="inpainting conditioning convention (default diffusers: the teacher's)")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="stage-1 labelled data (JSONL or folder with metadata.jsonl)")
    g.add_argument("--unlabeled", default=None, help="stage-2 unlabelled masked images (same layout; prompts optional)")
    g.add_argument("--resolution", type=int, default=1024,
                   help="training resolution in pixels, images are resized and centre-cropped (default: 1024)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--stage1-steps", type=int, default=1000,
                   help="optimizer steps on the labelled data: task + distillation + alignment (default: 1000)")
    g.add_argument("--stage2-steps", type=int, default=0,
                   help="optimizer steps on --unlabeled after stage 1: distillation + alignment only (default: 0)")
    g.add_argument("--batch-size", type=int, default=1, help="per rank")
    g.add_argument("--lr", type=float, default=1e-5, help="AdamW learning rate of the student (default: 1e-5)")
    g.add_argument("--alpha", type=float, default=0.975, help="task-loss weight inside the mask (1-alpha outside)")
    g.add_argument("--w-task", type=float, default=1.0, help="weight of the mask-weighted task loss (default: 1)")
    g.add_argument("--w-kd", type=float, default=1.0,
                   help="weight of the distillation loss, student vs teacher prediction (default: 1)")
    g.add_argument("--w-af", type=float, default=1.0,
                   help="weight of the asymmetric feature alignment L_af (default: 1)")
    g.add_argument("--fixed-noise", action="store_true",
                   help="draw noise and sigma per dataset item instead of per sample position (for checks on a fixed batch)")
    g.add_argument("--precision", default="no", choices=["no", "bf16", "fp16"],
                   help="compute precision under autocast; the student's weights stay fp32 (fp16 adds loss "
                        "scaling on CUDA) (default: no)")
    g.add_argument("--grad-clip", type=float, default=1.0, help="gradient clipping norm, 0 = off (default: 1)")
    g = p.add_argument_group("run")
    g.add_argument("--output", required=True, help="output folder: checkpoints/, log.csv, NAME.safetensors")
    g.add_argument("--name", default="refine_control_student",
                   help="file name stem of the student ControlNet (default: refine_control_student)")
    g.add_argument("--checkpoint-every", type=int, default=500,
                   help="write a resumable checkpoint every N steps, 0 = off (default: 500)")
    g.add_argument("--keep-checkpoints", type=int, default=3, help="resumable checkpoints to keep (default: 3)")
    g.add_argument("--resume", default=None, help="'latest' or a checkpoint folder")
    g.add_argument("--seed", type=int, default=0, help="seed of the whole run (init, data order, noise) (default: 0)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto; ranks use their LOCAL_RANK GPU)")
    g.add_argument("--save-dtype", default="fp16", choices=["fp16", "bf16", "fp32"],
                   help="dtype of the exported student file (default: fp16)")


# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


@dataclass
class InpaintRecord:
    name: str
    image: Path
    mask: Path
    prompt: str = ""
    local_prompt: str | None = None


def scan_inpaint_data(root: str | Path) -> tuple[list[InpaintRecord], list[tuple[str, str]]]:
    """Records with an image and a mask; the rest is reported as (item, reason)."""
    from PIL import Image

    root = Path(root)
    path = root / "metadata.jsonl" if root.is_dir() else root
    if not path.is_file():
        raise FileNotFoundError(f"no dataset at {root}: expected a .jsonl file or a folder with metadata.jsonl "
                                f"(lines like {{\"image\": ..., \"mask\": ..., \"prompt\": ...}})")
    records, skipped = [], []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append((f"{path}:{n}", f"not JSON ({e})"))
            continue
        name = str(item.get("image", f"line {n}"))
        if not item.get("image"):
            skipped.append((f"{path}:{n}", "no image given"))
            continue
        if not item.get("mask"):
            skipped.append((name, "no mask given"))
            continue
        image, mask = path.parent / item["image"], path.parent / item["mask"]
        problem = None
        for f, what in ((image, "image"), (mask, "mask")):
            if not f.is_file():
                problem = f"{what} file missing: {f}"
                break
            try:
                with Image.open(f) as im:
                    im.verify()
            except Exception as e:  # noqa: BLE001 - any decoder error means unusable
                problem = f"{what} unreadable: {f} ({type(e).__name__})"
                break
        if problem:
            skipped.append((name, problem))
            continue
        records.append(InpaintRecord(name, image, mask, str(item.get("prompt", item.get("text", "")) or ""),
                                     item.get("local_prompt")))
    for item, why in skipped:
        log.warning("dataset %s: skipped %s: %s", path, item, why)
    if not records:
        raise ValueError(f"dataset {path}: no usable items ({len(skipped)} skipped, listed above)")
    return records, skipped


def load_pair(rec: InpaintRecord, resolution: int):
    """(image (H, W, 3) float32 in [0,1], mask (H, W) float32 in [0,1]) as torch tensors."""
    import numpy as np
    import torch
    from PIL import Image

    from .data import load_rgb, resize_crop

    image = load_rgb(rec.image, resolution).astype(np.float32) / 255.0
    with Image.open(rec.mask) as im:
        mask = np.asarray(resize_crop(im.convert("L"), resolution, Image.Resampling.NEAREST), dtype=np.float32) / 255.0
    return torch.from_numpy(image.copy()), torch.from_numpy(mask.copy())


# --------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------


def load_sd3_base(path: str | Path):
    """(model_patcher, clip, vae) of an SD3 single-file checkpoint, through ComfyUI's loader."""
    import comfy.sd
    import comfy.utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint not found: {path}")
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    patcher, clip, vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True,
                                                                  metadata=metadata)
    if patcher is None or not hasattr(patcher.model.diffusion_model, "joint_blocks") \
            or type(patcher.model.model_config).__name__ != "SD3":
        found = type(patcher.model.model_config).__name__ if patcher is not None else "nothing ComfyUI recognises"
        raise ValueError(f"{path}: expected an SD3 checkpoint (MMDiT transformer), found {found}. "
                         f"Pass an SD3 single-file checkpoint with --base.")
    if clip is None or vae is None:
        raise ValueError(f"{path}: the checkpoint has no text encoder or VAE; pass a full SD3 single-file checkpoint.")
    patcher.model.diffusion_model.requires_grad_(False).eval()
    return patcher, clip, vae


def load_sd3_controlnet(path: str | Path, label: str):
    import comfy.controlnet
    from balanced_control.model_patches.refine_control_runtime import sd3_control_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} not found: {path}")
    control = comfy.controlnet.load_controlnet(str(path))
    if control is None:
        raise ValueError(f"{label} {path}: ComfyUI does not recognise this file as a ControlNet.")
    return sd3_control_model(control, f"{label} {path.name}")


def build_student(base_dm, teacher, n_layers: int):
    """An N-layer ``comfy.cldm.mmdit.ControlNet``: embedders and blocks 0..N-1
    from the base transformer, conditioning embedder from the teacher, zero
    output projections. Parameters in fp32."""
    import comfy.cldm.mmdit
    import comfy.ops
    import torch

    depth = len(base_dm.joint_blocks)
    if not 1 <= n_layers < depth:
        raise ValueError(f"--layers {n_layers}: expected 1 <= N < {depth} (the base's last block is "
                         f"context_pre_only and cannot be a ControlNet block)")
    cfg = dict(base_dm_config(base_dm))
    latent_channels = teacher.pos_embed_input.proj.weight.shape[1]
    student = comfy.cldm.mmdit.ControlNet(num_blocks=n_layers, control_latent_channels=latent_channels,
                                          operations=comfy.ops.disable_weight_init, device="cpu",
                                          dtype=torch.float32, **cfg)
    base_sd = base_dm.state_dict()
    own = student.state_dict()
    load = {}
    for k in own:
        if k.startswith(("controlnet_blocks.", "pos_embed_input.")):
            continue
        if k in base_sd and base_sd[k].shape == own[k].shape:
            load[k] = base_sd[k].float()
    missing = [k for k in own if k not in load and not k.startswith(("controlnet_blocks.", "pos_embed_input."))]
    if missing:
        raise ValueError(f"student init: {len(missing)} keys not found in the base transformer, e.g. {missing[:3]}")
    t_sd = teacher.state_dict()
    for k in ("pos_embed_input.proj.weight", "pos_embed_input.proj.bias"):
        load[k] = t_sd[k].float()
    with torch.no_grad():
        for proj in student.controlnet_blocks:
            load[f"{_name(student, proj)}.weight"] = torch.zeros_like(proj.weight, dtype=torch.float32)
            load[f"{_name(student, proj)}.bias"] = torch.zeros_like(proj.bias, dtype=torch.float32)
    student.load_state_dict(load, strict=True)
    return student.float()


def _name(root, module) -> str:
    for n, m in root.named_modules():
        if m is module:
            return n
    raise KeyError(module)


def base_dm_config(base_dm) -> dict:
    """The MMDiT constructor arguments of a loaded base (what ComfyUI detected)."""
    import comfy.model_detection

    sd = base_dm.state_dict()
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    cfg.pop("out_channels", None)
    return cfg


def save_student(student, path: Path, depth: int, dtype, metadata: dict) -> Path:
    from balanced_control.model_patches.refine_control_runtime import mmdit_controlnet_to_diffusers

    from . import engine

    sd = mmdit_controlnet_to_diffusers({k: v.detach() for k, v in student.state_dict().items()}, depth,
                                       len(student.joint_blocks))
    path.parent.mkdir(parents=True, exist_ok=True)
    return engine.save_tensors_atomically({k: v.to(dtype) for k, v in sd.items()}, path,
                                          {k: str(v) for k, v in metadata.items()})


# --------------------------------------------------------------------------
# training
# --------------------------------------------------------------------------


LOG_FIELDS = ["step", "stage", "loss", "task_loss", "kd_loss", "af_loss", "lr", "samples_per_s", "elapsed_s"]


class TextCache:
    def __init__(self, clip):
        self.clip = clip
        self.cache = {}

    def __call__(self, text: str):
        if text not in self.cache:
            import torch

            with torch.no_grad():
                cond, pooled = self.clip.encode_from_tokens(self.clip.tokenize(text), return_pooled=True)
            self.cache[text] = (cond.float().cpu(), pooled.float().cpu())
        return self.cache[text]


class RefineControlTrainer:
    def __init__(self, args):
        self.args = args

    def run(self) -> int:
        import torch

        from . import engine
        from .runtime import extension, setup_comfy

        args = self.args
        self.dist = dist = engine.init_distributed(args.device)
        setup_comfy(force_cpu=dist.device.type == "cpu")
        extension()
        from balanced_control.model_patches import refine_control as rc

        try:
            engine.seed_everything(args.seed)
            self.rc = rc
            self.output = Path(args.output)
            self.store = engine.CheckpointStore(self.output / "checkpoints", keep=args.keep_checkpoints)
            total = args.stage1_steps + args.stage2_steps
            if total <= 0:
                raise ValueError("nothing to train: --stage1-steps and --stage2-steps are both 0")
            self.labelled, self.skipped = scan_inpaint_data(args.data)
            self.unlabelled = None
            if args.stage2_steps > 0:
                if not args.unlabeled:
                    raise ValueError("--stage2-steps > 0 needs --unlabeled (masked images for stage 2)")
                self.unlabelled, skipped2 = scan_inpaint_data(args.unlabeled)
                self.skipped += skipped2
            self.conv = rc.convention(args.convention)

            self.patcher, clip, self.vae = load_sd3_base(args.base)
            self.base = self.patcher.model
            dm = self.base.diffusion_model
            dm.to(dist.device)
            self.depth = len(dm.joint_blocks)
            self.teacher = load_sd3_controlnet(args.teacher, "teacher").to(dist.device).eval().requires_grad_(False)
            if self.teacher.hidden_size != dm.hidden_size:
                raise ValueError(f"teacher width {self.teacher.hidden_size} does not match the base's "
                                 f"{dm.hidden_size}: the teacher was trained for another SD3 model")
            if self.teacher.pos_embed_input.proj.weight.shape[1] != 17:
                raise ValueError("teacher: expected an inpainting ControlNet with 17 input channels (16 latent + mask), "
                                 f"found {self.teacher.pos_embed_input.proj.weight.shape[1]}")
            self.text = TextCache(clip)
            self.student = build_student(dm, self.teacher, args.layers).to(dist.device).train()
            self.t_map = rc.block_map(args.teacher_wiring, len(self.teacher.joint_blocks), self.depth)
            self.s_map = rc.block_map(args.student_wiring, args.layers, self.depth)
            self.plan = rc.alignment_plan(self.s_map, self.t_map)
            self.student_module = self.student
            self.optimizer = torch.optim.AdamW(self.student_module.parameters(), lr=args.lr, weight_decay=0.0)
            self.scaler = torch.amp.GradScaler(enabled=args.precision == "fp16" and dist.device.type == "cuda")
            start = 0
            if args.resume:
                start = self.load_checkpoint(self.store.resolve(args.resume))
            self.train(start, total)
            if dist.main:
                out = save_student(self.student_module, self.output / f"{args.name}.safetensors", self.depth,
                                   engine.SAVE_DTYPES[args.save_dtype],
                                   {"format": "diffusers SD3ControlNetModel", "layers": args.layers,
                                    "convention": args.convention, "wiring": args.student_wiring,
                                    "trained_with": "ComfyUI-BalancedControl training refine-control"})
                log.info("student saved: %s", out)
                print(f"student: {out}")
            dist.barrier()
            return 0
        finally:
            engine.shutdown_distributed()

    # ------------------------------------------------------------------ batches
    def batch(self, step: int, stage: int):
        import torch

        from .data import epoch_order

        args, dist = self.args, self.dist
        records = self.labelled if stage == 1 else self.unlabelled
        n = len(records)
        images, masks, ctx, pooled, ctx_cn, gens = [], [], [], [], [], []
        global_batch = args.batch_size * dist.world
        for k in range(args.batch_size):
            position = step * global_batch + dist.rank * args.batch_size + k
            index = int(epoch_order(n, args.seed + stage, position // n)[position % n])
            rec = records[index]
            image, mask = load_pair(rec, args.resolution)
            images.append(image)
            masks.append(mask)
            c, p = self.text(rec.prompt)
            cc, _ = self.text(rec.local_prompt) if rec.local_prompt else (c, p)
            ctx.append(c)
            pooled.append(p)
            ctx_cn.append(cc)
            key = index if args.fixed_noise else position
            gens.append(torch.Generator().manual_seed((args.seed * 1_000_003 + stage * 7919 + key) % 2**63))
        return images, masks, _stack_text(ctx), torch.cat(pooled), _stack_text(ctx_cn), gens

    @staticmethod
    def _encode(vae, images):
        import torch

        with torch.no_grad():
            return vae.encode(torch.stack(images)).float()

    def step_losses(self, step: int, stage: int) -> dict:
        import torch

        from balanced_control.model_patches.refine_control_runtime import controlnet_layers

        rc, args, dev = self.rc, self.args, self.dist.device
        images, masks, ctx, pooled, ctx_cn, gens = self.batch(step, stage)
        mask = torch.stack(masks)
        raw = self._encode(self.vae, images)
        raw_masked = self._encode(self.vae, list(rc.masked_image(torch.stack(images), mask, self.conv)))
        x0 = self.base.latent_format.process_in(raw).to(dev)
        hint = rc.conditioning_latent(raw_masked, mask, self.conv).to(dev)
        m_lat = rc.latent_mask(mask, x0.shape[-2:], self.conv).to(dev)
        noise = torch.stack([torch.randn(x0.shape[1:], generator=g) for g in gens]).to(dev)
        # logit-normal timesteps, then SD3's shift (the base's own schedule)
        u = torch.sigmoid(torch.stack([torch.randn((), generator=g) for g in gens])).to(dev)
        shift = float(getattr(self.base.model_sampling, "shift", 3.0))
        sigma = shift * u / (1 + (shift - 1) * u)
        s = sigma.view(-1, 1, 1, 1)
        x_t = (1 - s) * x0 + s * noise
        target = noise - x0
        t = self.base.model_sampling.timestep(sigma).float()
        ctx, ctx_cn, pooled = ctx.to(dev), ctx_cn.to(dev), pooled.to(dev)
        dm = self.base.diffusion_model
        from . import engine

        with engine.autocast_context(dev, args.precision):
            with torch.no_grad():
                f_t, r_t = controlnet_layers(self.teacher, x_t, hint, t, ctx_cn, pooled)
                v_t = dm(x_t, t, context=ctx, y=pooled,
                         control={"output": rc.residuals_for_blocks(r_t, self.t_map)})
            f_s, r_s = controlnet_layers(self.student_module, x_t, hint, t, ctx_cn, pooled)
            v_s = dm(x_t, t, context=ctx, y=pooled, control={"output": rc.residuals_for_blocks(r_s, self.s_map)})
        losses = {"kd_loss": rc.distillation_loss(v_s, v_t), "af_loss": rc.feature_alignment_loss(f_s, f_t, self.plan)}
        total = args.w_kd * losses["kd_loss"] + args.w_af * losses["af_loss"]
        if stage == 1:
            losses["task_loss"] = rc.task_loss(v_s, target, m_lat, args.alpha)
            total = total + args.w_task * losses["task_loss"]
        losses["loss"] = total
        return losses

    def train(self, start: int, total: int) -> None:
        import torch

        from . import engine

        args, dist = self.args, self.dist
        csv = engine.CsvLog(self.output / "log.csv", start if args.resume else None, LOG_FIELDS) if dist.main else None
        bar = engine.progress_bar(total, start, dist.main)
        timer, t0 = engine.StepTimer(), time.time()
        try:
            for step in range(start, total):
                stage = 1 if step < args.stage1_steps else 2
                losses = self.step_losses(step, stage)
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(losses["loss"]).backward()
                if dist.enabled:
                    # Data parallel: average the gradients over ranks. Parameters that feed no
                    # loss (the last block's text stream) have no gradient on every rank alike.
                    for p in self.student_module.parameters():
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= dist.world
                self.scaler.unscale_(self.optimizer)
                if args.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(self.student_module.parameters(), args.grad_clip)
                self.scaler.step(self.optimizer)
                self.scaler.update()
                dt = timer.lap()
                values = {k: dist.all_reduce_mean(float(v.detach())) for k, v in losses.items()}
                if not all(math.isfinite(v) for v in values.values()):
                    raise FloatingPointError(f"step {step + 1}: non-finite loss {values}; lower --lr or use "
                                             f"--precision bf16/no")
                if csv is not None:
                    csv.write({"step": step + 1, "stage": stage, **values, "lr": args.lr,
                               "samples_per_s": args.batch_size * dist.world / max(dt, 1e-9),
                               "elapsed_s": time.time() - t0})
                bar.update(1)
                bar.set_postfix(stage=stage, loss=f"{values['loss']:.4g}")
                if args.checkpoint_every > 0 and (step + 1) % args.checkpoint_every == 0 and step + 1 < total:
                    self.save_checkpoint(step + 1)
        finally:
            bar.close()
            if csv is not None:
                csv.close()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, step: int) -> None:
        from . import engine

        if self.dist.main:
            tmp = self.store.begin(step)
            try:
                opt_tensors, opt_rest = engine.optimizer_tensors(self.optimizer)
                engine.save_tensors({k: v.float() for k, v in self.student_module.state_dict().items()},
                                    tmp / "student.safetensors")
                engine.save_tensors(opt_tensors, tmp / "optimizer.safetensors")
                engine.write_json(tmp / "state.json", {"step": step, "optimizer": opt_rest, "args": vars(self.args)})
                self.store.commit(step)
            except OSError as e:
                self.store.abort(step)
                log.error("checkpoint at step %d not written (%s); the previous one is intact", step, e)
        self.dist.barrier()

    def load_checkpoint(self, folder: Path) -> int:
        from . import engine

        state = json.loads((folder / "state.json").read_text())
        sd = engine.load_tensors(folder / "student.safetensors")
        self.student_module.load_state_dict({k: v.to(self.dist.device) for k, v in sd.items()})
        engine.load_optimizer(self.optimizer, engine.load_tensors(folder / "optimizer.safetensors"), state["optimizer"])
        log.info("resumed from %s (step %d)", folder, state["step"])
        return int(state["step"])


def _stack_text(conds):
    """Stack per-item text embeddings, padding shorter ones by repetition like ComfyUI."""
    import torch

    n = max(c.shape[1] for c in conds)
    out = []
    for c in conds:
        if c.shape[1] != n:
            c = c.repeat(1, math.ceil(n / c.shape[1]), 1)[:, :n]
        out.append(c)
    return torch.cat(out)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return RefineControlTrainer(args).run()


# --------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    p.description = ("Inpaint held-out images with the teacher and the student through ComfyUI's sampler and the "
                     "RefineControlInpaintApply node; report PSNR/SSIM in the masked region and the ControlNet "
                     "forward time per step, student vs teacher, measured side by side.")
    p.add_argument("--base", required=True, help="single-file SD3 checkpoint (transformer, text encoders, VAE)")
    p.add_argument("--teacher", required=True, help="the teacher SD3 ControlNet file")
    p.add_argument("--student", required=True, help="the student SD3 ControlNet file (from refine-control)")
    p.add_argument("--data", required=True, help="held-out JSONL (image, mask, prompt[, local_prompt])")
    p.add_argument("--resolution", type=int, default=1024, help="inpainting resolution in pixels (default: 1024)")
    p.add_argument("--steps", type=int, default=28, help="sampling steps per image (default: 28)")
    p.add_argument("--cfg", type=float, default=7.0, help="CFG scale (default: 7)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed, the same for teacher and student (default: 0)")
    p.add_argument("--convention", default="diffusers", choices=["diffusers", "comfyui"],
                   help="inpainting conditioning convention both ControlNets were trained with (default: diffusers)")
    p.add_argument("--teacher-wiring", default="diffusers_0.29",
                   help="how the teacher's residuals reach the base blocks (default: diffusers_0.29)")
    p.add_argument("--student-wiring", default="diffusers_0.29",
                   help="how the student's residuals reach the base blocks (default: diffusers_0.29)")
    p.add_argument("--timing-repeats", type=int, default=10,
                   help="timed ControlNet forwards per model for the student/teacher time ratio (default: 10)")
    p.add_argument("--output", default=None, help="write the figures as JSON here")


def run_eval(args) -> int:

    from .runtime import extension, setup_comfy

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    setup_comfy()
    extension()
    import comfy.controlnet
    import comfy.sample
    from balanced_control.model_patches import refine_control as rc
    from balanced_control.nodes.refine_control import RefineControlInpaintApply

    records, skipped = scan_inpaint_data(args.data)
    patcher, clip, vae = load_sd3_base(args.base)
    text = TextCache(clip)
    nets = {"teacher": (comfy.controlnet.load_controlnet(args.teacher), args.teacher_wiring),
            "student": (comfy.controlnet.load_controlnet(args.student), args.student_wiring)}
    for name, (c, _) in nets.items():
        if c is None:
            raise ValueError(f"--{name}: ComfyUI does not recognise the file as a ControlNet")
    scores = {k: {"psnr": [], "ssim": []} for k in nets}
    empty = 0
    for i, rec in enumerate(records):
        image, mask = load_pair(rec, args.resolution)
        image, mask = image[None], mask[None]
        if float((mask > 0.5).sum()) == 0:
            empty += 1
            log.warning("eval: %s has an empty mask; nothing to inpaint, left out of the scores", rec.name)
            continue
        c, p = text(rec.prompt)
        pos = [[c, {"pooled_output": p}]]
        cn_, pn_ = text("")
        neg = [[cn_, {"pooled_output": pn_}]]
        local = [[text(rec.local_prompt)[0], {}]] if rec.local_prompt else None
        latent = patcher.model.latent_format.process_in(vae.encode(image))
        for name, (control, wiring) in nets.items():
            out = RefineControlInpaintApply.execute(pos, neg, control, vae, image, mask, 1.0, 0.0, 1.0,
                                                    args.convention, wiring, "add", 20.0, local_prompt=local)
            p_c, n_c = out.args
            noise = comfy.sample.prepare_noise(latent, args.seed + i)
            noise_mask = mask[:, None]
            samples = comfy.sample.sample(patcher, noise, args.steps, args.cfg, "euler", "normal", p_c, n_c, latent,
                                          denoise=1.0, noise_mask=noise_mask, seed=args.seed + i,
                                          disable_pbar=True)
            decoded = vae.decode(patcher.model.latent_format.process_out(samples))[..., :3].float().cpu()
            scores[name]["psnr"].append(float(rc.masked_psnr(decoded, image, mask)[0]))
            scores[name]["ssim"].append(float(rc.masked_ssim(decoded, image, mask)[0]))

    timing = controlnet_timing(nets, patcher, args)
    report = {"images": len(scores["student"]["psnr"]), "skipped_items": len(skipped), "empty_masks": empty,
              **{f"{k}_{m}": (statistics.fmean(v[m]) if v[m] else None) for k, v in scores.items() for m in v},
              **timing}
    for k, v in report.items():
        print(f"{k}: {v}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=1))
    return 0


def controlnet_timing(nets: dict, patcher, args) -> dict:
    """Median ControlNet forward time of the student and the teacher at the
    evaluation resolution (``median_controlnet_seconds``)."""
    import comfy.model_management
    import torch

    dev = comfy.model_management.get_torch_device()
    dm = patcher.model.diffusion_model
    dtype = comfy.model_management.unet_dtype() if dev.type == "cuda" else torch.float32
    models = {name: control.control_model.to(dev, dtype) for name, (control, _) in nets.items()}
    ctx_dim = dm.context_embedder.in_features if hasattr(dm.context_embedder, "in_features") else 4096
    adm = dm.y_embedder.mlp[0].in_features if dm.y_embedder is not None else 2048
    med = median_controlnet_seconds(models, args.resolution // 8, ctx_dim, adm, args.timing_repeats)
    return {"teacher_layers": len(models["teacher"].joint_blocks),
            "student_layers": len(models["student"].joint_blocks),
            "teacher_ms": med["teacher"] * 1000, "student_ms": med["student"] * 1000,
            "time_ratio": med["student"] / med["teacher"], "device": str(dev)}


def median_controlnet_seconds(models: dict, latent_side: int, ctx_dim: int, adm: int, repeats: int,
                              on_round=None) -> dict:
    """Median forward time of each SD3 ControlNet in ``models`` (name -> module,
    on its device and dtype) for one sampling step: batch 2 (cond + uncond
    rows), run by the node's own layer function. The models alternate within
    every round so that all see the same machine state; the first round warms
    up. ``on_round(i)`` is called after each round."""
    import torch

    from balanced_control.model_patches.refine_control_runtime import controlnet_layers

    g = torch.Generator().manual_seed(0)
    inputs = {}
    for name, cn in models.items():
        p = next(cn.parameters())
        hint_channels = cn.pos_embed_input.proj.weight.shape[1]
        inputs[name] = [t.to(p.device, p.dtype) for t in (
            torch.randn(2, 16, latent_side, latent_side, generator=g),
            torch.randn(2, hint_channels, latent_side, latent_side, generator=g),
            torch.full((2,), 500.0),
            torch.randn(2, 154, ctx_dim, generator=g),
            torch.randn(2, adm, generator=g))]

    def sync(device):
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times = {name: [] for name in models}
    with torch.inference_mode():
        for rep in range(repeats + 1):
            for name, cn in models.items():
                device = inputs[name][0].device
                sync(device)
                t0 = time.perf_counter()
                controlnet_layers(cn, *inputs[name])
                sync(device)
                if rep > 0:
                    times[name].append(time.perf_counter() - t0)
            if on_round:
                on_round(rep)
    return {name: statistics.median(v) for name, v in times.items()}
