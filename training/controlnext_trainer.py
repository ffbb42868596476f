"""The ControlNeXt training loop (see ``controlnext.py`` for the options).

Reuses the MIControlNet trainer's run infrastructure (text and latent
caches, batches, atomic checkpoints with RNG state) and replaces the model:
a ControlNeXt module plus the regex-selected UNet parameters, injected by
``model_patches.controlnext``.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from . import engine
from .controlnext_defaults import DEFAULT_UNET_PATTERN, DEFAULT_UNET_WEIGHTS, NO_UNET, VARIANT_OF_FAMILY
from .trainer import MIControlNetTrainer

log = logging.getLogger("training")

MODULE_FILE = "controlnext.safetensors"
UNET_SUBSET_FILE = "unet_subset.safetensors"


def select_unet_parameters(unet: torch.nn.Module, pattern: str | None) -> dict:
    """ComfyUI parameter name (without ``diffusion_model.``) -> Parameter, for
    every UNet parameter whose name matches ``pattern`` (re.search)."""
    if pattern in (None, NO_UNET):
        return {}
    rx = re.compile(pattern)
    return {name: p for name, p in unet.named_parameters() if rx.search(name)}


def diffusers_names(unet_config: dict) -> dict:
    """ComfyUI UNet key -> diffusers name (the names the official files use)."""
    import comfy.utils

    return {comfy: diffusers for diffusers, comfy in comfy.utils.unet_to_diffusers(unet_config).items()}


def unet_subset_file_tensors(trained: dict, original: dict, weights: str, unet_config: dict,
                             dtype: torch.dtype) -> dict:
    """The UNet subset as ``ControlNeXtLoader`` reads it: diffusers names where
    ComfyUI has a mapping (ComfyUI names otherwise, which the loader accepts
    too), absolute weights or differences W_trained − W_base."""
    to_diffusers = diffusers_names(unet_config)
    out = {}
    for name, w in trained.items():
        w = w.detach().to("cpu", torch.float32)
        if weights == "delta":
            w = w - original[name].to(torch.float32)  # the difference in fp32, then rounded once
        out[to_diffusers.get(name, name)] = w.to(dtype).contiguous()
    return out


class ControlledUNet(torch.nn.Module):
    """ε-prediction of the base UNet with the ControlNeXt module injected.

    Holds the trainable parameters (the module and the shared UNet subset
    Parameters) so that DDP and the optimizer see exactly those; the frozen
    model is kept outside the module tree."""

    def __init__(self, model, variant, module: torch.nn.Module, unet_params: dict, strength: float = 1.0):
        super().__init__()
        self.control = module
        self.unet_names = list(unet_params)
        self.unet_subset = torch.nn.ParameterList(list(unet_params.values()))  # the UNet's own Parameters
        self._frozen = [model]  # a list: not a submodule, so not in state_dict / DDP buckets
        self.variant = variant
        self.strength = strength

    @property
    def model(self):
        return self._frozen[0]

    def forward(self, x_in: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, y: torch.Tensor | None,
                hint: torch.Tensor) -> torch.Tensor:
        from model_patches import controlnext as cx

        from .objectives import attention_options, unet_dtype

        model = self.model
        unet = model.diffusion_model
        features = self.control(hint.to(self.control.dtype), timestep.to(torch.float32))
        call = cx.training_call(unet, self.variant, features, self.strength)
        # Training's differentiable attention, through ComfyUI's override hook.
        options = cx.call_transformer_options(call, attention_options())
        dtype = unet_dtype(model)
        return unet(x_in.to(dtype), timestep, context=context.to(dtype), y=None if y is None else y.to(dtype),
                    control=None, transformer_options=options)


def per_row_loss(net: torch.nn.Module, model, batch) -> torch.Tensor:
    """ε-MSE per row, with ComfyUI's noise scaling and timesteps of the checkpoint."""
    from .objectives import noisy_inputs, per_row_mse

    ms = model.model_sampling
    sigma, x_noisy = noisy_inputs(model, batch)
    eps = net(ms.calculate_input(sigma, x_noisy), ms.timestep(sigma).float(), batch.context, batch.y, batch.hint)
    return per_row_mse(eps, batch.noise)


def param_groups(module: torch.nn.Module, unet_params: dict, lr: float, module_lr_scale: float) -> list[dict]:
    """Optimizer groups: the module at ``lr × module_lr_scale``, the UNet subset at ``lr``.
    ``lr_scale`` keeps the ratio when a schedule sets the rate."""
    groups = [{"params": list(module.parameters()), "lr": lr * module_lr_scale, "lr_scale": module_lr_scale,
               "name": "control module"}]
    if unet_params:
        groups.append({"params": list(unet_params.values()), "lr": lr, "lr_scale": 1.0, "name": "unet subset"})
    return groups


def new_module(seed: int) -> torch.nn.Module:
    """A fresh 52-tensor module with PyTorch's default init (ControlNeXt's
    module is not zero-initialised: Cross Normalization fixes its scale)."""
    from model_patches.controlnext_arch import CONFIG_320, ControlNeXtModule

    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return ControlNeXtModule(CONFIG_320)
    finally:
        torch.random.set_rng_state(state)


class ControlNeXtTrainer(MIControlNetTrainer):
    # ------------------------------------------------------------------ setup
    def _setup(self):
        from model_patches import controlnext as cx

        from . import data, models

        a, dist = self.args, self.dist
        engine.seed_everything(a.seed, a.deterministic)
        self.base = models.load_base_model(a.base, a.family, **engine.network_dtypes(a.mixed_precision))
        family = self.base.family
        self.unet_weights = DEFAULT_UNET_WEIGHTS[family] if a.unet_weights == "auto" else a.unet_weights
        if family == "SDXL" and self.unet_weights == "absolute":
            raise SystemExit("training controlnext: --unet-weights absolute on an SDXL base: ControlNeXtLoader "
                             "applies SDXL UNet files as weight differences (as the official release), so absolute "
                             "weights would be added to the base. Use --unet-weights delta (or auto).")
        report = data.scan_dataset(a.data, need_condition=a.condition == "file")
        self.skipped_at_scan = len(report.skipped)
        self.records = report.records
        if dist.main:
            log.info("base checkpoint: %s (%s); dataset: %d samples, %d skipped", a.base, family,
                     len(report.records), len(report.skipped))
        options = data.SampleOptions(
            resolution=a.resolution, condition=a.condition, canny_low=a.canny_low, canny_high=a.canny_high,
            rebalance_prob=0.0, keep_prob=1.0, superpixels=0, empty_prompt_prob=a.empty_prompt_prob, probes=False,
            latent_channels=self.base.model.latent_format.latent_channels,
            num_timesteps=int(self.base.model.model_sampling.sigmas.shape[0]))
        self.samples = data.TrainingSamples(self.records, options, a.seed)

        module = new_module(a.seed)
        if a.init_module:
            init = cx.ControlNeXtWeights(cx.load_state_dict_file(a.init_module), Path(a.init_module).name)
            if init.layout != "320":
                raise SystemExit(f"training controlnext: --init-module {a.init_module}: expected the 52-tensor "
                                 f"module ({cx.LAYOUT_DESCRIPTIONS['320']}), found the {init.layout!r} layout.")
            module.load_state_dict(init.control_sd)  # prefix stripped, fp32
        # The variant the loader will resolve for this module on this base (checks the injection width).
        self.variant = cx.resolve_variant(cx.ControlNeXtWeights(module.state_dict(), "control module"),
                                          self.base.patcher)
        assert self.variant.key == VARIANT_OF_FAMILY[family], (self.variant.key, family)

        unet = self.base.unet
        pattern = DEFAULT_UNET_PATTERN[family] if a.unet_pattern is None else a.unet_pattern
        selected = select_unet_parameters(unet, pattern)
        if pattern != NO_UNET and not selected:
            example = next(iter(dict(unet.named_parameters())))
            raise SystemExit(f"training controlnext: --unet-pattern {pattern!r} matches no UNet parameter. "
                             f"Names look like {example!r}; pass a regex over those, or 'none' to train the "
                             f"module only.")
        for p in selected.values():
            p.data = p.data.to(torch.float32)  # fp32 master weights whatever the compute dtype
            p.requires_grad_(True)
        self.unet_original = {k: p.detach().to("cpu", torch.float32, copy=True) for k, p in selected.items()}
        if dist.main:
            n_unet = sum(p.numel() for p in selected.values())
            log.info("variant %s (inject at %s); UNet subset %r: %d tensors, %d parameters", self.variant.title,
                     self.variant.injection, pattern, len(selected), n_unet)

        ckpt, resume_state = self._read_resume()
        if ckpt is not None:
            module.load_state_dict(engine.load_tensors(ckpt / MODULE_FILE))
            saved = engine.load_tensors(ckpt / UNET_SUBSET_FILE) if (ckpt / UNET_SUBSET_FILE).is_file() else {}
            if set(saved) != set(selected):
                raise SystemExit(f"training controlnext: --resume {ckpt}: the checkpoint trained {len(saved)} UNet "
                                 f"tensors, --unet-pattern {pattern!r} selects {len(selected)}. Resume with the "
                                 f"pattern of the interrupted run.")
            with torch.no_grad():
                for k, p in selected.items():
                    p.copy_(saved[k])

        device = dist.device
        unet.to(device=device)
        module = module.to(device=device, dtype=torch.float32)
        if a.gradient_checkpointing:
            n = models.enable_gradient_checkpointing(unet)
            if dist.main:
                log.info("gradient checkpointing on %d blocks", n)
        net = ControlledUNet(self.base.model, self.variant, module, selected, a.strength)
        self._wrap_and_optimize(net, param_groups(module, selected, a.learning_rate, a.module_lr_scale), ckpt,
                                resume_state, self.loss_scaler_enabled())

    def _check_resume_compatible(self, state: dict) -> None:
        super()._check_resume_compatible(state)
        saved = state["args"]
        for key in ("learning_rate", "module_lr_scale", "strength"):
            if key in saved and saved[key] != getattr(self.args, key):
                log.warning("resume: --%s was %s in the checkpoint and is %s now", key.replace("_", "-"),
                            saved[key], getattr(self.args, key))

    # ------------------------------------------------------------------ loop
    LOG_FIELDS = ["step", "loss", "lr", "module_lr", "samples_per_s", "elapsed_s"]

    def micro_step_terms(self, items, step: int, autocast) -> dict:
        batch = self._batch(items, probes=False)
        with autocast:
            return {"total": per_row_loss(self.cnet, self.base.model, batch)}

    def log_fields(self, means: dict, lr: float) -> tuple[dict, dict]:
        fields = {"loss": f"{means['total']:.8g}", "module_lr": f"{lr * self.args.module_lr_scale:.6g}"}
        return fields, {"loss": f"{means['total']:.4f}"}

    def sample_validation(self, step: int) -> list[Path]:
        """Sample with ComfyUI's sampler through the ControlNeXtApply code path,
        with the current module on the base model holding the trained UNet subset."""
        from .validation import sample_controlnext

        return sample_controlnext(self, step)

    # ------------------------------------------------------------------ outputs
    def trained_unet(self) -> dict:
        net = self.cnet_module
        return dict(zip(net.unet_names, net.unet_subset))

    def checkpoint_weights(self) -> dict:
        net = self.cnet_module
        files = {MODULE_FILE: ({k: v.float() for k, v in net.control.state_dict().items()},
                               {"format": "ControlNeXt module"})}
        if net.unet_names:
            files[UNET_SUBSET_FILE] = ({k: p.detach().float() for k, p in self.trained_unet().items()},
                                       {"format": "ComfyUI UNet keys, absolute"})
        return files

    def export(self) -> list[Path]:
        """NAME.safetensors (the module) and NAME_unet[_delta].safetensors, written atomically."""
        a, net = self.args, self.cnet_module
        dtype = engine.SAVE_DTYPES[a.save_dtype]
        meta = {"trained_with": "ComfyUI-BalancedControl training controlnext", "base_family": self.base.family,
                "variant": self.variant.key, "strength": str(a.strength)}
        files = {f"{a.name}.safetensors": ({k: v.detach().to("cpu", dtype).contiguous()
                                            for k, v in net.control.state_dict().items()},
                                           {**meta, "format": "ControlNeXt control module (52 tensors)"})}
        if net.unet_names:
            suffix = "_unet_delta" if self.unet_weights == "delta" else "_unet"
            tensors = unet_subset_file_tensors(self.trained_unet(), self.unet_original, self.unet_weights,
                                               self.base.unet_config, dtype)
            files[f"{a.name}{suffix}.safetensors"] = (tensors, {**meta, "format": f"ControlNeXt UNet subset, "
                                                               f"{self.unet_weights}"})
        return [engine.save_tensors_atomically(tensors, self.output / name, metadata)
                for name, (tensors, metadata) in files.items()]
