"""The training loop all three trainers share (MIControlNet, ControlNeXt,
Refine-Control): step counting, gradient accumulation, resume, data-parallel
gradients, the optimizer step with its non-finite check, checkpoint cadence,
the CSV log and the progress bar.

A trainer subclasses ``TrainingLoop`` and supplies what differs:

- ``_setup()``: models and data; calls ``_read_resume()`` and then
  ``_wrap_and_optimize()`` (the trained module, its parameters, the loss scaler);
- ``micro_batches()``: this rank's micro-batches from ``start_step`` on, and the
  samples per optimizer step over all ranks;
- ``micro_step_terms()``: the loss terms of one micro-batch (``total`` is trained);
- ``log_fields()``: the CSV fields and progress-bar postfix of one step;
- ``checkpoint_weights()`` / ``restore_weights``-style loading in ``_setup``;
- ``export()`` and ``report_written()``; optionally ``sample_validation()``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from pathlib import Path

import torch

from . import engine
from .conventions import lr_at
from .reporting import Reporters
from .runtime import setup_comfy

log = logging.getLogger("training")

STATE_VERSION = 1


class TrainingLoop:
    LOG_FIELDS = engine.CsvLog.FIELDS
    # True where the trained module's forward is not called through a DDP wrapper
    # (Refine-Control runs the student's layers itself): the loop then averages
    # the gradients over ranks before the optimizer step.
    average_gradients_by_hand = False

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

    # ------------------------------------------------------------------ what a trainer supplies
    def _setup(self) -> None:
        raise NotImplementedError

    def total_steps(self) -> int:
        """Optimizer steps to train to."""
        return self.args.max_steps

    @property
    def accumulation(self) -> int:
        return getattr(self.args, "gradient_accumulation", 1)

    def micro_batches(self):
        """(this rank's micro-batches from ``start_step`` on, samples per optimizer step over all ranks)."""
        raise NotImplementedError

    def loop_context(self):
        """A context held around the whole loop."""
        return contextlib.nullcontext()

    def micro_step_terms(self, items, step: int, autocast) -> dict:
        """Per-row (or scalar) fp32 loss tensors of one micro-batch: ``total`` (trained) and others to log."""
        raise NotImplementedError

    def log_fields(self, means: dict, lr: float) -> tuple[dict, dict]:
        """(CSV fields, progress-bar postfix) of one optimizer step from the rank-mean terms."""
        raise NotImplementedError

    def checkpoint_weights(self) -> dict:
        """File name -> (fp32 tensors, metadata) of the trained weights in a resumable checkpoint."""
        raise NotImplementedError

    def export(self):
        """Write the trained files (rank 0); returns a path or a list of them."""
        raise NotImplementedError

    def report_written(self, written: list) -> None:
        log.info("wrote %s", ", ".join(map(str, written)))

    def sample_validation(self, step: int) -> Path:
        raise NotImplementedError(f"{type(self).__name__} has no validation sample")

    def _check_resume_compatible(self, state: dict) -> None:
        world = state.get("world")
        if world is not None and world != self.dist.world:
            log.warning("resume: the checkpoint ran on %d rank(s), this run on %d; the global batch changes "
                        "unless --batch-size was adjusted", world, self.dist.world)

    # ------------------------------------------------------------------ resume, wrapping, optimizer
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

    def _wrap_and_optimize(self, net: torch.nn.Module, params, ckpt: Path | None, resume_state: dict | None,
                           scaler_enabled: bool) -> None:
        """DDP around ``net`` (on several ranks, unless the gradients are averaged
        by hand), AdamW over ``params`` (tensors or groups), the loss scaler, and
        on resume their saved state."""
        a, device = self.args, self.dist.device
        self.cnet_module = net
        if self.dist.enabled and not self.average_gradients_by_hand:
            ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
            self.cnet = torch.nn.parallel.DistributedDataParallel(net, **ddp_kwargs)
        else:
            self.cnet = net
        self.optimizer = torch.optim.AdamW(params, lr=a.learning_rate, weight_decay=getattr(a, "weight_decay", 0.0))
        self.scaler = torch.amp.GradScaler(device.type, enabled=scaler_enabled)
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

    def _average_gradients(self) -> None:
        """Mean of every gradient over the ranks. A parameter that feeds no loss
        has no gradient on any rank alike."""
        world = self.dist.world
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= world

    def learning_rate(self, step: int) -> float:
        """--learning-rate under --lr-scheduler and --lr-warmup-steps at optimizer step ``step`` (0-based)."""
        a = self.args
        scheduler = getattr(a, "lr_scheduler", "constant")
        total = 1 if scheduler == "constant" else self.total_steps()  # a constant schedule needs no length
        return lr_at(step, a.learning_rate, scheduler, getattr(a, "lr_warmup_steps", 0), total,
                     getattr(a, "lr_power", 1.0))

    def optimizer_step(self, step: int, loss_finite: bool = True) -> tuple[float, bool]:
        """Step ``step``'s learning rate (times each group's ``lr_scale``), loss
        unscaling, the finiteness check, gradient clipping, the AdamW update;
        returns (the rate, whether the step was skipped).

        The check runs on the unscaled gradients before anything is written: a
        non-finite loss or gradient on any rank skips the update on every rank
        (the weights and the optimizer state stay as they were; the fp16 loss
        scale is lowered as GradScaler does)."""
        a = self.args
        lr = self.learning_rate(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        if self.dist.enabled and self.average_gradients_by_hand:
            self._average_gradients()
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

    # ------------------------------------------------------------------ the loop
    def _loop_inputs(self):
        """The micro-batches, the --report-to logs and args.json (main rank),
        the progress bar and the autocast context."""
        a, dist = self.args, self.dist
        batches, self.global_batch = self.micro_batches()
        if dist.main:
            self.output.mkdir(parents=True, exist_ok=True)
        self.reporters = csv_log = (Reporters(a, self.output, self.LOG_FIELDS, self.start_step if a.resume else None)
                                    if dist.main else None)
        if dist.main:
            (self.output / "args.json").write_text(json.dumps(vars(a), indent=1, default=str))
        bar = engine.progress_bar(self.total_steps(), self.start_step,
                                  dist.main and not getattr(a, "no_progress", False))
        return batches, csv_log, bar, engine.autocast_context(dist.device, a.mixed_precision)

    def train(self) -> int:
        """Set up, train to ``total_steps()``, export; 0 on success."""
        try:
            self._setup()
            a, dist, accumulation = self.args, self.dist, self.accumulation
            batches, csv_log, bar, autocast = self._loop_inputs()
            step, micro, sums = self.start_step, 0, {}
            timer = engine.StepTimer()
            t_start = time.perf_counter()
            try:
                with self.loop_context():
                    for items in batches:
                        last_micro = micro == accumulation - 1
                        # DDP all-reduces gradients only on the last micro-step of an accumulation.
                        ctx = (self.cnet.no_sync() if isinstance(self.cnet, torch.nn.parallel.DistributedDataParallel)
                               and not last_micro else contextlib.nullcontext())
                        with ctx:
                            terms = self.micro_step_terms(items, step, autocast)
                            self.scaler.scale(terms["total"].mean() / accumulation).backward()
                        for k, v in terms.items():
                            sums[k] = sums.get(k, 0.0) + float(v.detach().mean()) / accumulation
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
                                           "samples_per_s": f"{self.global_batch / dt:.4g}",
                                           "elapsed_s": f"{time.perf_counter() - t_start:.2f}"})
                            bar.set_postfix(**postfix)
                            bar.update(1)
                        self.checkpoint_and_validate(step)
            finally:
                bar.close()
                if csv_log:
                    csv_log.close()
            if dist.main:
                written = self.export_or_exit()
                self.report_written(written if isinstance(written, list) else [written])
            dist.barrier()
            return 0
        finally:
            engine.shutdown_distributed()

    # ------------------------------------------------------------------ outputs
    def export_or_exit(self):
        """``export()``; a failed write ends the run with what to do about it."""
        try:
            return self.export()
        except OSError as e:
            raise SystemExit(f"training: the trained weights could not be written: {e}. The last checkpoint in "
                             f"{self.store.root} holds them: free some space and run the same command with "
                             f"--resume latest to write them again.") from e

    def checkpoint_and_validate(self, step: int) -> None:
        """After optimizer step ``step``: a checkpoint every ``--checkpoint-every``
        steps and at the end (0: none), a validation image when due (always at the end)."""
        a, total = self.args, self.total_steps()
        if a.checkpoint_every > 0 and (step % a.checkpoint_every == 0 or step == total):
            self.save_checkpoint(step)
        every = getattr(a, "validate_every", 0)
        if every and (step % every == 0 or step == total):
            self.validate(step)

    def validate(self, step: int) -> None:
        """The validation images from rank 0 (``sample_validation``: one per
        prompt/image pair), into the --report-to logs too; the other ranks wait."""
        if not self.dist.main:
            self.dist.barrier()
            return
        try:
            paths = self.sample_validation(step)
            for k, path in enumerate(paths if isinstance(paths, list) else [paths]):
                log.info("validation sample: %s", path)
                if getattr(self, "reporters", None) is not None:
                    self.reporters.image(f"validation/{k}", path, step)
        except Exception as e:  # noqa: BLE001 - validation must not end a long run
            log.error("validation at step %d failed: %s: %s", step, type(e).__name__, e)
        self.dist.barrier()

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
                         "samples_seen": step * self.args.batch_size * dist.world * self.accumulation,
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

    def _gather_rng(self) -> dict:
        mine = getattr(self, "_rng_json", None) or {}
        if not self.dist.enabled:
            return {"0": mine}
        gathered = [None] * self.dist.world
        torch.distributed.all_gather_object(gathered, mine)
        return {str(r): g for r, g in enumerate(gathered)}
