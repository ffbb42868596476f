"""The MIControlNet training loop (see ``micontrolnet.py`` for the options)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from . import engine
from .runtime import setup_comfy

log = logging.getLogger("training")

STATE_VERSION = 1


class MIControlNetTrainer:
    def __init__(self, args):
        self.args = args
        self.dist = engine.init_distributed(args.device)
        # ComfyUI must know about --cpu before comfy.model_management is imported.
        setup_comfy(force_cpu=self.dist.device.type == "cpu")
        if self.dist.device.type == "cpu" and self.dist.enabled:
            # Ranks share the machine's cores.
            torch.set_num_threads(max(1, (torch.get_num_threads()) // self.dist.world))
        self.output = Path(args.output)
        self.store = engine.CheckpointStore(self.output / "checkpoints", args.keep_checkpoints)
        self.skipped_steps = engine.SkippedSteps(getattr(args, "max_skipped_steps", 20))
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
        self._wrap_and_optimize(cnet, cnet.parameters(), ckpt, resume_state)

    def _read_resume(self) -> tuple[Path | None, dict | None]:
        """(checkpoint folder, state.json) of --resume, or (None, None); sets ``start_step``."""
        self.start_step = 0
        if not self.args.resume:
            return None, None
        ckpt = self.store.resolve(self.args.resume)
        state = json.loads((ckpt / "state.json").read_text())
        self.start_step = int(state["step"])
        self._check_resume_compatible(state)
        if self.dist.main:
            log.info("resuming from %s (step %d)", ckpt, self.start_step)
        return ckpt, state

    def _wrap_and_optimize(self, net: torch.nn.Module, params, ckpt: Path | None, resume_state: dict | None) -> None:
        """DDP around ``net`` (on several ranks), AdamW over ``params`` (tensors or
        groups), the loss scaler, and on resume their saved state."""
        a, device = self.args, self.dist.device
        self.cnet_module = net
        if self.dist.enabled:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            self.cnet = torch.nn.parallel.DistributedDataParallel(net, **ddp_kwargs)
        else:
            self.cnet = net
        self.optimizer = torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=a.weight_decay)
        from .objectives import unet_dtype

        self.scaler = torch.amp.GradScaler(device.type, enabled=engine.needs_loss_scaler(
            a.mixed_precision, unet_dtype(self.base.model)))
        if ckpt is not None:
            self._restore_run_state(ckpt, resume_state)

    def _restore_run_state(self, ckpt: Path, resume_state: dict) -> None:
        """Optimizer, loss scaler and this rank's RNG from a checkpoint folder."""
        engine.load_optimizer(self.optimizer, engine.load_tensors(ckpt / "optimizer.safetensors"),
                              resume_state["optimizer"])
        if resume_state.get("scaler") and self.scaler.is_enabled():
            self.scaler.load_state_dict(resume_state["scaler"])
        rng_file = ckpt / f"rng-rank{self.dist.rank}.safetensors"
        if rng_file.is_file():
            rng = engine.load_tensors(rng_file)
            engine.set_rng_state({"torch": rng["torch"], **resume_state["rng"][str(self.dist.rank)],
                                  **({"cuda": rng["cuda"]} if "cuda" in rng else {})})

    def _check_resume_compatible(self, state: dict) -> None:
        saved = state["args"]
        for key in ("seed", "batch_size", "gradient_accumulation", "stage", "resolution", "condition",
                    "lambda_convention"):
            if key in saved and saved[key] != getattr(self.args, key):
                log.warning("resume: --%s was %s in the checkpoint and is %s now; the run will not repeat "
                            "the interrupted one exactly", key.replace("_", "-"), saved[key], getattr(self.args, key))
        world = state.get("world")
        if world is not None and world != self.dist.world:
            log.warning("resume: the checkpoint ran on %d rank(s), this run on %d; the global batch changes "
                        "unless --batch-size was adjusted", world, self.dist.world)

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
    def _loop_inputs(self):
        """What every training loop starts from after _setup(): this rank's
        loader (resumed at the current position), the CSV log and args.json
        (main rank), the progress bar and the autocast context."""
        from . import data

        a, dist = self.args, self.dist
        sampler = data.PositionSampler(len(self.records), a.seed, self.start_step, a.max_steps,
                                       a.batch_size, a.gradient_accumulation, dist.world, dist.rank)
        loader = torch.utils.data.DataLoader(self.samples, batch_sampler=sampler, collate_fn=data.collate,
                                             num_workers=a.num_workers)
        csv_log = (engine.CsvLog(self.output / "log.csv", self.start_step if a.resume else None, self.LOG_FIELDS)
                   if dist.main else None)
        if dist.main:
            (self.output / "args.json").write_text(json.dumps(vars(a), indent=1, default=str))
        bar = engine.progress_bar(a.max_steps, self.start_step, dist.main and not a.no_progress)
        return loader, csv_log, bar, engine.autocast_context(dist.device, a.mixed_precision)

    LOG_FIELDS = engine.CsvLog.FIELDS

    def train(self) -> int:
        """The loop both UNet trainers share; ``micro_step_terms`` and ``log_fields`` say what differs."""
        from . import objectives

        try:
            self._setup()
            a, dist = self.args, self.dist
            loader, csv_log, bar, autocast = self._loop_inputs()
            step, micro, sums = self.start_step, 0, {}
            timer = engine.StepTimer()
            t_start = time.perf_counter()
            with objectives.training_attention():
                for items in loader:
                    last_micro = micro == a.gradient_accumulation - 1
                    # DDP all-reduces gradients only on the last micro-step of an accumulation.
                    ctx = self.cnet.no_sync() if dist.enabled and not last_micro else contextlib.nullcontext()
                    with ctx:
                        terms = self.micro_step_terms(items, step, autocast)
                        self.scaler.scale(terms["total"].mean() / a.gradient_accumulation).backward()
                    for k, v in terms.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach().mean()) / a.gradient_accumulation
                    micro += 1
                    if not last_micro:
                        continue
                    micro = 0
                    lr, skipped = self.optimizer_step(step, loss_finite=all(map(math.isfinite, sums.values())))
                    step += 1
                    self.skipped_steps.record(step, skipped, self.scaler.is_enabled())
                    means = {k: dist.all_reduce_mean(v) for k, v in sums.items()}
                    sums = {}
                    dt = timer.lap()
                    if dist.main:
                        fields, postfix = self.log_fields(means, lr)
                        csv_log.write({"step": step, **fields, "lr": f"{lr:.6g}",
                                       "samples_per_s": f"{loader.batch_sampler.global_batch / dt:.4g}",
                                       "elapsed_s": f"{time.perf_counter() - t_start:.2f}"})
                        bar.set_postfix(**postfix)
                        bar.update(1)
                    self.checkpoint_and_validate(step)
            bar.close()
            if csv_log:
                csv_log.close()
            if dist.main:
                written = self.export_or_exit()
                written = written if isinstance(written, list) else [written]
                log.info("wrote %s (%d samples skipped: %d at scan, %d at load)", ", ".join(map(str, written)),
                         self.skipped_at_scan + len(self.samples.bad), self.skipped_at_scan, len(self.samples.bad))
            dist.barrier()
            return 0
        finally:
            engine.shutdown_distributed()

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

    def export_or_exit(self):
        """``export()``; a failed write ends the run with what to do about it."""
        try:
            return self.export()
        except OSError as e:
            raise SystemExit(f"training: the trained weights could not be written: {e}. The last checkpoint in "
                             f"{self.store.root} holds them: free some space and run the same command with "
                             f"--resume latest to write them again.") from e

    def save_checkpoint(self, step: int) -> Path | None:
        """All ranks take part (each writes its RNG state); rank 0 writes the rest.
        A failed write (full disk, I/O error) is logged and the run goes on:
        the previous checkpoint stays intact and the next interval tries again."""
        dist = self.dist
        ok = True
        if dist.main:
            try:
                self.store.begin(step)
            except OSError as e:
                ok = False
                log.error("checkpoint at step %d not written: %s", step, e)
        dist.barrier()
        tmp = self.store.tmp_path(step)
        try:
            if tmp.is_dir():
                state = engine.rng_state()
                rng_tensors = {"torch": state["torch"], **({"cuda": state["cuda"]} if "cuda" in state else {})}
                engine.save_tensors(rng_tensors, tmp / f"rng-rank{dist.rank}.safetensors")
                self._rng_json = {"python": state["python"], "numpy": state["numpy"]}
        except OSError as e:
            ok = False
            log.error("checkpoint at step %d: rank %d could not write its RNG state: %s", step, dist.rank, e)
        rng_all = self._gather_rng()
        # A checkpoint is complete only if every rank wrote its part.
        ok = dist.all_reduce_mean(1.0 if ok else 0.0) == 1.0
        dist.barrier()
        if not dist.main:
            dist.barrier()
            return None
        final = None
        try:
            if ok and tmp.is_dir():
                opt_tensors, opt_rest = engine.optimizer_tensors(self.optimizer)
                for file_name, (tensors, metadata) in self.checkpoint_weights().items():
                    engine.save_tensors(tensors, tmp / file_name, metadata=metadata)
                engine.save_tensors(opt_tensors, tmp / "optimizer.safetensors")
                state = {"version": STATE_VERSION, "step": step, "world": dist.world,
                         "samples_seen": step * self.args.batch_size * dist.world * self.args.gradient_accumulation,
                         "optimizer": opt_rest, "rng": rng_all, "args": vars(self.args),
                         "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None}
                engine.write_json(tmp / "state.json", state)
                final = self.store.commit(step)
            else:
                self.store.abort(step)
                log.error("checkpoint at step %d not written (a rank failed its part); the previous one is intact",
                          step)
        except OSError as e:
            self.store.abort(step)
            log.error("checkpoint at step %d not written (%s); the previous one is intact", step, e)
        dist.barrier()
        return final

    def checkpoint_weights(self) -> dict:
        """File name -> (fp32 tensors, metadata) of the trained weights in a resumable checkpoint."""
        return {"controlnet.safetensors": ({k: v.float() for k, v in self.cnet_module.state_dict().items()},
                                           {"format": "ControlNet v1.1 (ldm)",
                                            "lambda_convention": self.args.lambda_convention})}

    def _gather_rng(self) -> dict:
        mine = getattr(self, "_rng_json", None) or {}
        if not self.dist.enabled:
            return {"0": mine}
        gathered = [None] * self.dist.world
        torch.distributed.all_gather_object(gathered, mine)
        return {str(r): g for r, g in enumerate(gathered)}

    def optimizer_step(self, step: int, loss_finite: bool = True) -> tuple[float, bool]:
        """Step ``step``'s learning rate (times each group's ``lr_scale``), loss
        unscaling, the finiteness check, gradient clipping, the AdamW update;
        returns (the rate, whether the step was skipped).

        The check runs on the unscaled gradients before anything is written: a
        non-finite loss or gradient on any rank skips the update on every rank
        (the weights and the optimizer state stay as they were; the fp16 loss
        scale is lowered as GradScaler does)."""
        a = self.args
        lr = engine.warmup_lr(step, a.learning_rate, a.lr_warmup_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        self.scaler.unscale_(self.optimizer)
        if not engine.gradients_finite(self.optimizer, loss_finite, self.dist):
            self.scaler.update()  # after unscale_, lowers the scale where it found inf (a no-op when off)
            self.optimizer.zero_grad(set_to_none=True)
            return lr, True
        if a.max_grad_norm > 0:
            params = [p for group in self.optimizer.param_groups for p in group["params"]]
            torch.nn.utils.clip_grad_norm_(params, a.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return lr, False

    def checkpoint_and_validate(self, step: int) -> None:
        """After optimizer step ``step``: a checkpoint and a validation image when due (always at the end)."""
        a = self.args
        if step % a.checkpoint_every == 0 or step == a.max_steps:
            self.save_checkpoint(step)
        if a.validate_every and (step % a.validate_every == 0 or step == a.max_steps):
            self.validate(step)

    def validate(self, step: int) -> None:
        """A validation image from rank 0 (``sample_validation``); the other ranks wait."""
        if not self.dist.main:
            self.dist.barrier()
            return
        try:
            path = self.sample_validation(step)
            log.info("validation sample: %s", path)
        except Exception as e:  # noqa: BLE001 - validation must not end a long run
            log.error("validation at step %d failed: %s: %s", step, type(e).__name__, e)
        self.dist.barrier()

    def sample_validation(self, step: int) -> Path:
        """Sample with ComfyUI's sampler through the MIControlNetApply node,
        from the current weights loaded by ComfyUI's ControlNet loader."""
        from .validation import sample_micontrolnet

        return sample_micontrolnet(self, step)
