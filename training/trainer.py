"""The MIControlNet trainer (see ``micontrolnet.py`` for the options) on
the shared loop of ``loop.py``; ``controlnext_trainer.py`` reuses its text and
latent caches and batches."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from . import engine
from .loop import TrainingLoop

log = logging.getLogger("training")


class MIControlNetTrainer(TrainingLoop):
    def __init__(self, args):
        super().__init__(args)
        self._text_cache: dict[str, tuple] = {}
        self._latent_cache: dict[int, torch.Tensor] = {}

    # ------------------------------------------------------------------ setup
    def _setup(self):
        from . import data, models

        a, dist = self.args, self.dist
        engine.seed_everything(a.seed, a.deterministic)
        self.base = models.load_base_model(a.base, a.family, **engine.network_dtypes(a.mixed_precision))
        if dist.main:
            log.info("base checkpoint: %s (%s)", a.base, self.base.family)
        # Rank 0 scans (and writes the dataset index); the others then read the index.
        if not dist.main:
            dist.barrier()
        report = data.scan_dataset(a.data, need_condition=a.condition == "file")
        if dist.main:
            dist.barrier()
        self.skipped_at_scan = len(report.skipped)
        if dist.main:
            log.info("dataset: %d samples, %d skipped", len(report.records), len(report.skipped))
        self.records = report.records
        options = data.SampleOptions(
            resolution=a.resolution, condition=a.condition, canny_low=a.canny_low, canny_high=a.canny_high,
            rebalance_prob=a.rebalance_prob, keep_prob=a.keep_prob, superpixels=a.superpixels,
            empty_prompt_prob=a.empty_prompt_prob, probes=a.stage == 2,
            min_region_area=getattr(a, "min_region_area", 0), silent_value=getattr(a, "silent_value", 0.0),
            latent_channels=self.base.model.latent_format.latent_channels,
            num_timesteps=int(self.base.model.model_sampling.sigmas.shape[0]),
        )
        self.samples = data.TrainingSamples(self.records, options, a.seed)

        if a.init_controlnet:
            cnet = models.controlnet_from_file(a.init_controlnet, self.base)
            if dist.main:
                log.info("ControlNet: from %s", a.init_controlnet)
        else:
            cnet = models.controlnet_from_unet(self.base.unet, self.base.unet_config, seed=a.seed)
            if dist.main:
                log.info("ControlNet: encoder copied from the base UNet, zero convolutions zeroed")

        if a.plain_add_warmup_steps < 0:
            # As written, add^inj has zero gradient at zero residuals (λ = 0 there), so a
            # ControlNet with zeroed outputs first learns with a plain add; read as the
            # control's MGDA weight, λ = max_lambda there and no warm-up is needed.
            from_zero = not a.init_controlnet and getattr(a, "lambda_convention", "as_written") == "as_written"
            a.plain_add_warmup_steps = 500 if from_zero else 0
        if dist.main and a.plain_add_warmup_steps:
            log.info("the first %d steps inject with a plain add, then add^inj", a.plain_add_warmup_steps)
        ckpt, resume_state = self._read_resume()
        if ckpt is not None:
            cnet.load_state_dict(engine.load_tensors(ckpt / "controlnet.safetensors"))

        device = dist.device
        self.base.unet.to(device=device)
        cnet = cnet.to(device=device, dtype=torch.float32)  # fp32 master weights
        if a.gradient_checkpointing:
            n = models.enable_gradient_checkpointing(cnet) + models.enable_gradient_checkpointing(self.base.unet)
            if dist.main:
                log.info("gradient checkpointing on %d blocks", n)
        self._wrap_and_optimize(cnet, cnet.parameters(), ckpt, resume_state, self.loss_scaler_enabled())

    def loss_scaler_enabled(self) -> bool:
        from .objectives import unet_dtype

        return engine.needs_loss_scaler(self.args.mixed_precision, unet_dtype(self.base.model))

    def _check_resume_compatible(self, state: dict) -> None:
        saved = state["args"]
        for key in ("seed", "batch_size", "gradient_accumulation", "stage", "resolution", "condition",
                    "lambda_convention"):
            if key in saved and saved[key] != getattr(self.args, key):
                log.warning("resume: --%s was %s in the checkpoint and is %s now; the run will not repeat "
                            "the interrupted one exactly", key.replace("_", "-"), saved[key], getattr(self.args, key))
        super()._check_resume_compatible(state)

    # ------------------------------------------------------------------ batches
    def _text(self, prompt: str):
        """(context, pooled) of a prompt, encoded once with the checkpoint's text encoder."""
        hit = self._text_cache.get(prompt)
        if hit is None:
            clip = self.base.clip
            with torch.no_grad():
                cond, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
            hit = (cond.float().cpu(), None if pooled is None else pooled.float().cpu())
            if len(self._text_cache) < 4096:
                self._text_cache[prompt] = hit
        return hit

    def _latents(self, items: dict) -> torch.Tensor:
        """VAE latents of the target images; with --cache-latents each sample is
        encoded once (images are deterministic: resize and centre crop only)."""
        model, vae = self.base.model, self.base.vae
        if not self.args.cache_latents:
            with torch.no_grad():
                return model.process_latent_in(vae.encode(items["image"]).float())
        cache = self._latent_cache
        todo = [i for i, idx in enumerate(items["index"]) if idx not in cache]
        if todo:
            with torch.no_grad():
                fresh = model.process_latent_in(vae.encode(items["image"][todo]).float())
            for i, z in zip(todo, fresh):
                cache[items["index"][i]] = z.cpu()
        return torch.stack([cache[idx] for idx in items["index"]])

    def _batch(self, items: dict, probes: bool):
        from .objectives import Batch

        device, model = self.dist.device, self.base.model
        latents = self._latents(items).to(device)
        texts = [self._text(p) for p in items["prompt"]]
        context = torch.cat([c for c, _ in texts]).to(device)
        y = None
        if self.base.family == "SDXL":
            res = self.args.resolution
            y = torch.cat([model.encode_adm(pooled_output=pooled, width=res, height=res, target_width=res,
                                            target_height=res, crop_w=0, crop_h=0, device=device)
                           for _, pooled in texts]).to(device)
        return Batch(latents=latents, hint=items["hint"].to(device), context=context, y=y,
                     noise=items["noise"].to(device), timestep_index=items["timestep_index"].to(device),
                     probe=items["probe"].to(device) if probes and "probe" in items else None)

    # ------------------------------------------------------------------ loop
    LOG_FIELDS = engine.CsvLog.FIELDS

    def micro_batches(self):
        """This rank's DataLoader, resumed at the current position."""
        from . import data

        a, dist = self.args, self.dist
        sampler = data.PositionSampler(len(self.records), a.seed, self.start_step, a.max_steps,
                                       a.batch_size, a.gradient_accumulation, dist.world, dist.rank)
        loader = torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, collate_fn=data.collate,
                                             num_workers=a.num_workers)
        return loader, sampler.global_batch

    def loop_context(self):
        """Training's differentiable attention (both UNet trainers)."""
        from . import objectives

        return objectives.training_attention()

    def micro_step_terms(self, items, step: int, autocast) -> dict:
        """Per-row fp32 loss tensors of one micro-batch: ``total`` (trained) and
        any others to log (``task``, ``qc``)."""
        from . import objectives

        a = self.args
        use_qc = a.stage == 2 and step % a.qc_every == 0
        batch = self._batch(items, probes=use_qc)
        mode = "vanilla" if step < a.plain_add_warmup_steps else "micontrolnet"
        # On every k-th step only, weighted k times: the expected weight per step stays --qc-weight.
        qc_weight = a.qc_weight * a.qc_every if use_qc else 0.0
        terms = objectives.loss_terms(self.base.model, self.cnet, batch, qc_weight, a.granularity, a.max_lambda,
                                      autocast, mode, a.lambda_convention)
        return {k: terms[k] for k in ("total", "task", "qc")}

    def log_fields(self, means: dict, lr: float) -> tuple[dict, dict]:
        """(CSV fields, progress-bar postfix) of one optimizer step."""
        fields = {"loss": f"{means['total']:.8g}", "task_loss": f"{means['task']:.8g}",
                  "qc_loss": f"{means['qc']:.8g}"}
        return fields, {"loss": f"{means['total']:.4f}", "qc": f"{means['qc']:.3g}"}

    # ------------------------------------------------------------------ outputs
    def export(self) -> Path:
        from . import models

        meta = {"format": "ControlNet v1.1 (ldm)", "trained_with": "ComfyUI-BalancedControl training micontrolnet",
                "stage": self.args.stage, "granularity": self.args.granularity, "base_family": self.base.family,
                "lambda_convention": self.args.lambda_convention, "max_lambda": str(self.args.max_lambda)}
        return models.save_controlnet(self.cnet_module, self.output / f"{self.args.name}.safetensors",
                                      engine.SAVE_DTYPES[self.args.save_dtype], meta)

    def checkpoint_weights(self) -> dict:
        """File name -> (fp32 tensors, metadata) of the trained weights in a resumable checkpoint."""
        return {"controlnet.safetensors": ({k: v.float() for k, v in self.cnet_module.state_dict().items()},
                                           {"format": "ControlNet v1.1 (ldm)",
                                            "lambda_convention": self.args.lambda_convention})}

    def report_written(self, written: list) -> None:
        log.info("wrote %s (%d samples skipped: %d at scan, %d at load)", ", ".join(map(str, written)),
                 self.skipped_at_scan + len(self.samples.bad), self.skipped_at_scan, len(self.samples.bad))

    def sample_validation(self, step: int) -> list[Path]:
        """Sample with ComfyUI's sampler through the MIControlNetApply node,
        from the current weights loaded by ComfyUI's ControlNet loader."""
        from .validation import sample_micontrolnet

        return sample_micontrolnet(self, step)
