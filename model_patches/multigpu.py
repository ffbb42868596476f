"""Per-device clones of controls for ComfyUI's multi-GPU sampling.

ComfyUI 0.28 (``comfy/sampler_helpers.py`` ``preprocess_multigpu_conds``,
kaalibro/ComfyUI L124-163) gives every control of a conditioning's chain one
clone per extra device: ``control.deepclone_multigpu(device, autoregister=True)``,
then relinks each device's clones into a chain of their own with
``get_instance_for_device(device)`` and ``set_previous_controlnet``. The
sampler then runs ``control.get_instance_for_device(device).get_control(...)``
on that device's rows (``comfy/samplers.py`` L518-520) and calls ``pre_run``
and ``cleanup`` on the clones (``samplers.py`` L896-899, ``controlnet.py``
``ControlBase.cleanup`` L125-133).

Core's contract (``comfy/controlnet.py`` ``ControlNet.deepclone_multigpu``
L322-328, ``T2IAdapter.deepclone_multigpu`` L956-962): a ``copy()`` (hint,
strength, range, no previous control) whose weights are a deep copy wrapped
for the new load device; with ``autoregister`` it is stored in
``multigpu_clones[device]``.

ComfyUI 0.3.75 has none of this (no ``multigpu_clones``, no
``deepclone_multigpu`` on ``ControlBase``): the functions here detect that and
clone core's controls the way 0.28 does, so our controls offer the same methods
on both runtimes and call nothing the runtime lacks.
"""

from __future__ import annotations

import copy

import comfy.controlnet
import comfy.model_management
import comfy.model_patcher

RUNTIME_HAS_MULTIGPU = hasattr(comfy.controlnet.ControlBase, "deepclone_multigpu")


def device_clones(control) -> dict:
    """``control.multigpu_clones`` (created where the runtime's ControlBase has none)."""
    clones = getattr(control, "multigpu_clones", None)
    if clones is None:
        clones = {}
        control.multigpu_clones = clones
    return clones


def instance_for_device(control, device):
    """``ControlBase.get_instance_for_device`` of 0.28: the clone for ``device``, else the control itself."""
    return device_clones(control).get(device, control)


def clone_core_control(control, load_device, label: str = "control"):
    """A clone of a core control (``ControlNet``, ``ControlNetSD35``, ``ControlLora``,
    ``T2IAdapter``) for ``load_device``: the runtime's own ``deepclone_multigpu``
    where it has one (without registering it on ``control``: our wrapper runs the
    clone itself), else the same steps as 0.28's."""
    native = getattr(type(control), "deepclone_multigpu", None)
    if native is not None:
        try:
            return control.deepclone_multigpu(load_device, autoregister=False)
        except NotImplementedError as e:
            raise NotImplementedError(
                f"{label}: ComfyUI cannot clone the {type(control).__name__} inside this control for another "
                f"GPU ({e}). Run on one GPU, or use a ControlNet type that supports multi-GPU.") from None
    c = control.copy()
    if hasattr(c, "t2i_model"):
        c.t2i_model = copy.deepcopy(c.t2i_model)
        c.device = load_device
        return c
    if getattr(c, "control_model", None) is None and hasattr(c, "control_weights"):
        return c  # ControlLora: its model is built from the sampled model in pre_run
    if hasattr(c, "control_model_wrapped"):
        c.control_model = copy.deepcopy(c.control_model)
        c.control_model_wrapped = comfy.model_patcher.ModelPatcher(
            c.control_model, load_device=load_device, offload_device=comfy.model_management.unet_offload_device())
        return c
    raise NotImplementedError(
        f"{label}: cannot clone a {type(control).__name__} for another device (expected a ControlNet, "
        f"ControlLora or T2I-Adapter). Run on one GPU.")


def relink_for_devices(control, devices) -> None:
    """What 0.28's ``preprocess_multigpu_conds`` does to one chain (L143-163): a
    registered clone per device for every control of the chain, and each device's
    clones linked in the same order. For runtimes and tests without that function."""
    chain = []
    c = control
    while c is not None:
        chain.append(c)
        c = c.previous_controlnet
    for c in chain:
        for device in devices:
            if device not in device_clones(c):
                c.deepclone_multigpu(device, autoregister=True)
    for c, prev in zip(chain, chain[1:] + [None]):
        for device in devices:
            instance_for_device(c, device).set_previous_controlnet(
                None if prev is None else instance_for_device(prev, device))
