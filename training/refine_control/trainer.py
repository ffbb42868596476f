"""The Refine-Control distillation trainer (stages 1 and 2) on the shared loop."""

from __future__ import annotations

import logging

from ..loop import TrainingLoop
from . import losses as refine_losses
from .data import load_pair, scan_inpaint_data
from .models import build_student, load_sd3_base, load_sd3_controlnet, save_diffusers_folder, save_student
from .text import TextCache, stack_text

log = logging.getLogger("training.refine_control")

STUDENT_FILE = "student.safetensors"
LOG_FIELDS = ["step", "stage", "loss", "task_loss", "kd_loss", "af_loss", "lr", "samples_per_s", "elapsed_s"]


class RefineControlTrainer(TrainingLoop):
    """Stage 1 then stage 2 on the shared loop (``training/loop.py``). Each
    optimizer step is one batch per rank, built from (seed, stage, position)
    alone; the student's layers are run by the node's layer function, not a
    DDP-wrapped forward, so the loop averages the gradients over ranks."""

    LOG_FIELDS = LOG_FIELDS
    average_gradients_by_hand = True

    def __init__(self, args):
        super().__init__(args)

    def total_steps(self) -> int:
        return self.args.stage1_steps + self.args.stage2_steps

    def _setup(self) -> None:
        import torch

        from .. import engine
        from .cli import resolve_stages
        from model_patches import refine_control as rc

        args, dist = self.args, self.dist
        for note in resolve_stages(args):
            log.warning(note)
        engine.seed_everything(args.seed)
        self.rc = rc
        if self.total_steps() <= 0:
            raise ValueError("nothing to train: --stage1-steps and --stage2-steps are both 0")
        self.labelled, self.skipped = scan_inpaint_data(args.data)
        self.unlabelled = None
        if args.stage2_steps > 0:
            if not args.unlabeled:
                raise ValueError("--stage2-steps > 0 needs --unlabeled (masked images for stage 2)")
            self.unlabelled, skipped2 = scan_inpaint_data(args.unlabeled)
            self.skipped += skipped2
        self.conv = rc.convention(args.convention)

        # --mixed-precision no: every model in fp32 (ComfyUI would pick fp16/bf16 on a GPU);
        # bf16/fp16: the frozen models in that dtype, forwards under autocast.
        frozen_dtype = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.mixed_precision]
        self.patcher, clip, self.vae = load_sd3_base(args.base, frozen_dtype)
        self.base = self.patcher.model
        dm = self.base.diffusion_model
        dm.to(dist.device)
        self.depth = len(dm.joint_blocks)
        self.teacher = load_sd3_controlnet(args.teacher, "teacher", frozen_dtype).to(dist.device).eval().requires_grad_(False)
        if self.teacher.hidden_size != dm.hidden_size:
            raise ValueError(f"teacher width {self.teacher.hidden_size} does not match the base's "
                             f"{dm.hidden_size}: the teacher was trained for another SD3 model")
        if self.teacher.pos_embed_input.proj.weight.shape[1] != 17:
            raise ValueError("teacher: expected an inpainting ControlNet with 17 input channels (16 latent + mask), "
                             f"found {self.teacher.pos_embed_input.proj.weight.shape[1]}")
        self.text = TextCache(clip, max_entries=args.text_cache_size, dtype=torch.float32)
        student = build_student(dm, self.teacher, args.layers).to(dist.device).train()
        self.t_map = rc.block_map(args.teacher_wiring, len(self.teacher.joint_blocks), self.depth)
        self.s_map = rc.block_map(args.student_wiring, args.layers, self.depth)
        self.plan = rc.alignment_plan(self.s_map, self.t_map)
        ckpt, resume_state = self._read_resume()
        if ckpt is not None:
            sd = engine.load_tensors(ckpt / STUDENT_FILE)
            student.load_state_dict({k: v.to(dist.device) for k, v in sd.items()})
        self._wrap_and_optimize(student, student.parameters(), ckpt, resume_state,
                                args.mixed_precision == "fp16" and dist.device.type == "cuda")
        self.student_module = student

    def micro_batches(self):
        """Optimizer step indices: each step's batch is a function of the step."""
        return range(self.start_step, self.total_steps()), self.args.batch_size * self.dist.world

    def micro_step_terms(self, items, step: int, autocast) -> dict:
        self._stage = 1 if step < self.args.stage1_steps else 2
        losses = self.step_losses(step, self._stage, autocast)
        return {"total": losses.pop("loss"), **losses}

    def log_fields(self, means: dict, lr: float) -> tuple[dict, dict]:
        fields = {"stage": self._stage, "loss": means["total"],
                  **{k: means[k] for k in ("task_loss", "kd_loss", "af_loss") if k in means}}
        return fields, {"stage": self._stage, "loss": f"{means['total']:.4g}"}

    def checkpoint_weights(self) -> dict:
        return {STUDENT_FILE: ({k: v.float() for k, v in self.student_module.state_dict().items()},
                               {"format": "diffusers SD3ControlNetModel"})}

    def export(self) -> list:
        from .. import engine

        args = self.args
        out = save_student(self.student_module, self.output / f"{args.name}.safetensors", self.depth,
                           engine.SAVE_DTYPES[args.save_dtype],
                           {"format": "diffusers SD3ControlNetModel", "layers": args.layers, "depth": self.depth,
                            "convention": args.convention, "wiring": args.student_wiring,
                            "trained_with": "ComfyUI-BalancedControl training refine-control"})
        print(f"student: {out}")
        folder = save_diffusers_folder(self.student_module, self.output / f"{args.name}_diffusers", self.depth,
                                       engine.SAVE_DTYPES[args.save_dtype])
        return [out, folder]

    def report_written(self, written: list) -> None:
        log.info("student saved: %s; for diffusers (SD3ControlNetModel.from_pretrained): %s", *written)

    # ------------------------------------------------------------------ batches
    def batch(self, step: int, stage: int):
        import torch

        from ..data import epoch_order

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
        return images, masks, stack_text(ctx), torch.cat(pooled), stack_text(ctx_cn), gens

    @staticmethod
    def _encode(vae, images):
        import torch

        with torch.no_grad():
            return vae.encode(torch.stack(images)).float()

    def step_losses(self, step: int, stage: int, autocast) -> dict:
        import torch

        from model_patches.refine_control_runtime import controlnet_layers

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
        with autocast:
            with torch.no_grad():
                f_t, r_t = controlnet_layers(self.teacher, x_t, hint, t, ctx_cn, pooled)
                v_t = dm(x_t, t, context=ctx, y=pooled,
                         control={"output": rc.residuals_for_blocks(r_t, self.t_map)})
            f_s, r_s = controlnet_layers(self.student_module, x_t, hint, t, ctx_cn, pooled)
            v_s = dm(x_t, t, context=ctx, y=pooled, control={"output": rc.residuals_for_blocks(r_s, self.s_map)})
        # L_af on what is injected (residuals after the output projections) unless --af-features hidden
        a_s, a_t = (r_s, r_t) if args.af_features == "residuals" else (f_s, f_t)
        losses = {"kd_loss": refine_losses.distillation_loss(v_s, v_t),
                  "af_loss": refine_losses.feature_alignment_loss(a_s, a_t, self.plan, args.af_normalise)}
        total = args.w_kd * losses["kd_loss"] + args.w_af * losses["af_loss"]
        if stage == 1:
            losses["task_loss"] = refine_losses.task_loss(v_s, target, m_lat, args.alpha)
            total = total + args.w_task * losses["task_loss"]
        losses["loss"] = total
        return losses

    # Options that change what the checkpoint's student is: a resume with other values is an error.
    RESUME_MUST_MATCH = ("layers", "teacher_wiring", "student_wiring", "convention")
    # Options that change the run's course: a resume with other values is allowed, with a warning.
    RESUME_SHOULD_MATCH = ("seed", "batch_size", "resolution", "stage1_steps", "af_features", "af_normalise",
                           "fixed_noise", "w_task", "w_kd", "w_af", "alpha")

    def _check_resume_compatible(self, state: dict) -> None:
        saved = state.get("args", {})
        wrong = [f"--{k.replace('_', '-')} {saved[k]} in the checkpoint, {getattr(self.args, k)} now"
                 for k in self.RESUME_MUST_MATCH if k in saved and saved[k] != getattr(self.args, k)]
        if wrong:
            raise ValueError("resume: the checkpoint's student was built differently (" + "; ".join(wrong) +
                             "); pass the checkpoint's values or start a new --output")
        for k in self.RESUME_SHOULD_MATCH:
            if k in saved and saved[k] != getattr(self.args, k):
                log.warning("resume: --%s was %s in the checkpoint and is %s now; the run will not repeat the "
                            "interrupted one exactly", k.replace("_", "-"), saved[k], getattr(self.args, k))
        super()._check_resume_compatible(state)


def run(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return RefineControlTrainer(args).train()


