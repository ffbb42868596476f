"""ControlNeXt in ComfyUI's model management: the control module and the
control images are loaded with the model, counted in
``comfy.model_management.current_loaded_models`` during sampling and moved to
their offload device when ComfyUI frees memory, like a core ControlNet."""

from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.sample

# model_patches as the nodes and the other tests import it (one copy per process).
from test_controlnext import cx, sd15_model, weights_for  # noqa: F401

cmem = cx.controlnext_memory
ControlNeXtModule = cx.ControlNeXtModule

META = torch.device("meta")


def _sample_and_look(model, steps=2):
    """Sample, and at every step write down what the model manager holds."""
    seen = []

    def callback(step, x0, x, total):
        seen.append([(lm.model, lm.model.model, lm.model_memory()) for lm in mm.current_loaded_models])

    ctx = model.model.model_config.unet_config["context_dim"]
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 4, ctx, generator=g), {}]]
    neg = [[torch.randn(1, 4, ctx, generator=g), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(model, noise, steps, 3.0, "euler", "normal", pos, neg, latent, seed=0,
                              disable_pbar=True, callback=callback)
    return out, seen


def _bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_module_and_hints_are_loaded_counted_and_offloaded(sd15_model):
    mm.unload_all_models()
    w = weights_for("sd15_training", seed=31)
    img1 = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    img2 = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(2))
    m = cx.apply_controlnext(sd15_model, w, img1, strength=1.0)
    m = cx.apply_controlnext(m, w, img2, strength=0.5)
    stack = m.model_options["transformer_options"][cx.STACK_KEY]
    c1, c2 = stack.controls
    # One module for the file (both Apply nodes share it), one control image per Apply node.
    assert c1.module_patcher is c2.module_patcher
    resources = m.get_additional_models_with_key(cmem.RESOURCES_KEY)
    assert sorted(type(p.model).__name__ for p in resources) == ["ControlNeXtModule", "HintHolder", "HintHolder"]
    # The model without the nodes carries nothing.
    assert not sd15_model.get_additional_models_with_key(cmem.RESOURCES_KEY)

    # Which module ran: the managed one (no per-device copy outside the model manager).
    ran = []
    handle = c1.module_patcher.model.register_forward_hook(lambda mod, i, o: ran.append(mod))
    for p in resources:
        p.offload_device = META  # makes "moved to the offload device" visible on a CPU-only machine
    try:
        out, seen = _sample_and_look(m)
    finally:
        handle.remove()
    assert torch.isfinite(out).all()
    assert ran and all(r is c1.module_patcher.model for r in ran)
    assert w._modules == {}

    expected_module = _bytes(w.control_sd.values())  # fp32 tensors of the file
    expected_hint = 3 * 64 * 64 * 4  # (1, 3, 64, 64) fp32
    assert len(seen) == 2
    for step in seen:
        modules = [(mod, size) for _, mod, size in step if isinstance(mod, ControlNeXtModule)]
        hints = [(mod, size) for _, mod, size in step if isinstance(mod, cmem.HintHolder)]
        assert [mod for mod, _ in modules] == [c1.module_patcher.model]
        assert modules[0][1] == expected_module
        assert {id(mod) for mod, _ in hints} == {id(c1.hint_patcher.model), id(c2.hint_patcher.model)}
        assert all(size == expected_hint for _, size in hints)
        # Loaded with the UNet it serves.
        assert any(mod is sd15_model.model for _, mod, _ in step)

    mm.unload_all_models()
    assert not any(lm.model.model is c1.module_patcher.model for lm in mm.current_loaded_models)
    assert all(t.device == META for t in c1.module_patcher.model.state_dict().values())
    assert c1.hint_patcher.model.hint.device == META and c2.hint_patcher.model.hint.device == META


def test_memory_of_a_controlnext_run_is_in_the_estimate(sd15_model):
    """The sampler asks the model manager for the UNet plus the ControlNeXt tensors:
    what the loaded models add up to during a run grows by exactly their size."""
    mm.unload_all_models()
    _, plain = _sample_and_look(sd15_model.clone(), steps=1)
    mm.unload_all_models()
    w = weights_for("sd15_training", seed=32)
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    _, with_cnx = _sample_and_look(m, steps=1)
    total = lambda step: sum(size for _, _, size in step)  # noqa: E731
    assert total(with_cnx[0]) - total(plain[0]) == _bytes(w.control_sd.values()) + 3 * 64 * 64 * 4
    mm.unload_all_models()


def test_patchers_rebuild_for_another_device(sd15_model):
    """ComfyUI 0.28's multi-GPU clones rebuild an additional model from
    ``cached_patcher_init``: ours builds a new, equal module."""
    w = weights_for("sd15_training", seed=33)
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    control = m.model_options["transformer_options"][cx.STACK_KEY].controls[-1]
    factory, args = control.module_patcher.cached_patcher_init
    fresh = factory(*args)
    assert fresh.model is not control.module_patcher.model
    for (k, a), (k2, b) in zip(control.module_patcher.model.state_dict().items(), fresh.model.state_dict().items()):
        assert k == k2 and torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    factory, args = control.hint_patcher.cached_patcher_init
    assert torch.equal(factory(*args).model.hint, control.hint_patcher.model.hint)


def test_call_on_another_device_uses_that_devices_clone(sd15_model):
    """ComfyUI 0.28's multi-GPU sampling: the model on an extra device is a patcher whose
    additional models are rebuilt from ``cached_patcher_init``; a call there uses those, not
    the main device's (here: moved away to ``meta``) and not an unmanaged copy. Simulated on the
    CPU: the sampled model's ``current_patcher`` is such a device clone."""
    from test_controlnext import run_model

    w = weights_for("sd15_training", seed=34)
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(3)))
    x, sigma = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([2.0, 2.0])
    expected = run_model(m, x, sigma, [1, 0])
    assert w._modules == {}

    device_clone = m.clone()
    resources = m.get_additional_models_with_key(cmem.RESOURCES_KEY)
    device_clone.set_additional_models(cmem.RESOURCES_KEY, [
        p.cached_patcher_init[0](*p.cached_patcher_init[1]) for p in resources])
    for p in m.get_additional_models_with_key(cmem.RESOURCES_KEY):
        p.model.to(META)  # the main device's copies are not on this call's device
    ran = []
    rebuilt = next(p.model for p in device_clone.get_additional_models_with_key(cmem.RESOURCES_KEY)
                   if isinstance(p.model, ControlNeXtModule))
    handle = rebuilt.register_forward_hook(lambda mod, i, o: ran.append(mod))
    previous = m.model.current_patcher
    m.model.current_patcher = device_clone
    try:
        out = run_model(m, x, sigma, [1, 0])
    finally:
        m.model.current_patcher = previous
        handle.remove()
    assert ran == [rebuilt]
    assert w._modules == {}
    assert torch.equal(out, expected)



def test_partly_loaded_module_is_not_used_half_on_the_device(sd15_model):
    """A module with one layer left elsewhere (as a partial low-VRAM load can leave a plain
    torch module) does not count as on the device: the call takes a whole copy."""
    w = weights_for("sd15_training", seed=35)
    m = cx.apply_controlnext(sd15_model, w, torch.rand(1, 64, 64, 3))
    control = m.model_options["transformer_options"][cx.STACK_KEY].controls[-1]
    module = control.module_patcher.model
    cpu = torch.device("cpu")
    assert cmem.is_on(module, cpu) and control.module_on(cpu) is module
    module.mid_convs[1].to(META)
    assert not cmem.is_on(module, cpu)
    assert control.module_on(cpu) is w._modules[(control.variant.module_config.name, "cpu")]
