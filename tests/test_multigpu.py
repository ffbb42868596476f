"""Multi-GPU clones of our controls (ComfyUI 0.28's deepclone_multigpu contract).

ComfyUI 0.28 clones every control of a chain per extra device and relinks the
clones per device (``comfy/sampler_helpers.py`` ``preprocess_multigpu_conds``
L124-163); the sampler then runs ``get_instance_for_device(device)`` on that
device's rows. These tests run that function where the runtime has it, else
the same steps (``multigpu.relink_for_devices``), towards a second CPU
"device" (``cpu:1``: a distinct key whose tensors live in
host memory) and check that the clones are independent copies that produce
the original's result exactly, on the runtime in use (0.3.75 in CI, where
ControlBase has no multi-GPU methods: ours are called directly).
"""

from __future__ import annotations

import pytest
import torch

import comfy.controlnet
import comfy.sample

from balanced_control.nodes.refine_control import RefineControl

# model_patches as the nodes and the other tests import it (one copy per process).
from test_mi_sampling import mi_apply, mi_control, prepare, sample, tiny, with_settings  # noqa: F401
from refine_control_common import _apply, _sample, sd3_runtime  # noqa: F401

multigpu = mi_control.multigpu

OTHER = torch.device("cpu", 1)
CPU = torch.device("cpu")


def _chain(control):
    return mi_control.iter_chain(control)


def _params(module):
    return list(module.state_dict().values())


def _control_module(control):
    inner = control.inner if hasattr(control, "inner") else control
    return inner.control_model


def _relink(top, patcher):
    """Give every control of ``top``'s chain its clone for OTHER, linked per device: with
    core's own ``preprocess_multigpu_conds`` where the runtime has it (0.28: a model with
    one extra-device clone in its "multigpu" additional models), else the same steps."""
    if multigpu.RUNTIME_HAS_MULTIGPU:
        import comfy.sampler_helpers

        model = patcher.clone()
        side = patcher.clone()
        side.load_device = OTHER
        model.set_additional_models("multigpu", [side])
        comfy.sampler_helpers.preprocess_multigpu_conds({"positive": [{"control": top}]}, model, {})
    else:
        multigpu.relink_for_devices(top, [OTHER])


def _swap(conditioning, device):
    """The conditioning with every entry's control replaced by its clone for ``device``."""
    return [[c, {**e, "control": e["control"].get_instance_for_device(device)}] for c, e in conditioning]


def test_runtime_feature_detection():
    """The methods exist on our controls on either runtime; where core's ControlBase lacks
    them (0.3.75), ours are used and nothing of core's multi-GPU API is called."""
    has = hasattr(comfy.controlnet.ControlBase, "deepclone_multigpu")
    assert multigpu.RUNTIME_HAS_MULTIGPU == has
    for cls in (mi_control.MinimalImpactControl, RefineControl):
        assert callable(getattr(cls, "deepclone_multigpu"))
        assert callable(getattr(cls, "get_instance_for_device"))
        # Ours overrides ControlBase's NotImplementedError stub.
        assert cls.deepclone_multigpu is mi_control.WrappedControl.deepclone_multigpu
    if not has:
        assert not hasattr(comfy.controlnet.ControlNet, "deepclone_multigpu")
        assert "get_instance_for_device" in vars(mi_control.WrappedControl)


def test_minimal_impact_chain_clones_per_device_and_matches(tiny):
    mask = torch.zeros(1, 64, 64)
    mask[:, :, :40] = 1.0
    p, n = mi_apply(tiny["pos"], tiny["neg"], tiny["cns"][0], tiny["images"][0], strength=0.9)
    p, n = mi_apply(p, n, tiny["cns"][1], tiny["images"][1], strength=1.1, mask=mask, start=0.0, end=0.8)
    top = p[0][1]["control"]
    originals = _chain(top)
    assert len(originals) == 2 and all(isinstance(c, mi_control.MinimalImpactControl) for c in originals)
    before = [[t.clone() for t in _params(_control_module(c))] for c in originals]

    _relink(top, tiny["patcher"])

    clones = [c.get_instance_for_device(OTHER) for c in originals]
    for orig, clone in zip(originals, clones):
        assert clone is not orig and type(clone) is type(orig)
        assert orig.get_instance_for_device(CPU) is orig  # no clone for that device: the control itself
        assert orig.multigpu_clones == {OTHER: clone}
        # What the clone keeps: hint, mask, strength, range, label.
        assert clone.inner.cond_hint_original is orig.inner.cond_hint_original
        assert clone.mask is orig.mask
        assert (clone.strength, clone.timestep_percent_range, clone.label) == \
            (orig.strength, orig.timestep_percent_range, orig.label)
        # What it does not share: the inner control and its weights, wrapped for the other device.
        assert clone.inner is not orig.inner
        assert clone.inner.control_model is not orig.inner.control_model
        assert clone.inner.control_model_wrapped is not orig.inner.control_model_wrapped
        assert clone.inner.control_model_wrapped.load_device == OTHER
        assert orig.inner.control_model_wrapped.load_device == CPU
        for a, b in zip(_params(orig.inner.control_model), _params(clone.inner.control_model)):
            assert a.data_ptr() != b.data_ptr()
            assert torch.equal(a, b)
        assert clone.inner.control_model_wrapped in clone.get_models()
        assert orig.inner.control_model_wrapped not in clone.get_models()
    # The device's chain is linked like the original one; the original chain is unchanged.
    assert clones[0].previous_controlnet is clones[1] and clones[1].previous_controlnet is None
    assert originals[0].previous_controlnet is originals[1]
    # A second pass (the sampler runs preprocess_multigpu_conds every prompt) reuses the clones.
    _relink(top, tiny["patcher"])
    assert [c.get_instance_for_device(OTHER) for c in originals] == clones

    patcher = with_settings(tiny["patcher"], "micontrolnet")
    out = sample(patcher, p, n)
    out_clone = sample(patcher, _swap(p, OTHER), _swap(n, OTHER))
    assert torch.equal(out, out_clone)
    # The clones record their own balance map, which the map node finds.
    clone_seqs = [c.last_balance_record.seq for c in clones if c.last_balance_record is not None]
    orig_seqs = [c.last_balance_record.seq for c in originals if c.last_balance_record is not None]
    assert clone_seqs and orig_seqs and max(clone_seqs) > max(orig_seqs)
    rec = mi_control.find_balance_record(p)
    assert rec is not None and rec.seq == max(clone_seqs)
    # A clone's weights are its own: changing them leaves the original's untouched.
    with torch.no_grad():
        for t in _params(clones[0].inner.control_model):
            t.add_(1.0)
    for a, b in zip(before[0], _params(originals[0].inner.control_model)):
        assert torch.equal(a, b)


def test_core_control_in_a_mixed_chain_is_cloned_by_our_helper(tiny):
    """A core ControlNet before ours in the chain: on 0.28 core clones it; here the
    equivalent steps are checked on the same object types."""
    core = tiny["cns"][2].copy().set_cond_hint(tiny["images"][2].movedim(-1, 1), 0.7, (0.0, 1.0))
    clone = multigpu.clone_core_control(core, OTHER)
    assert type(clone) is type(core)
    assert clone.cond_hint_original is core.cond_hint_original and clone.strength == 0.7
    assert clone.control_model is not core.control_model
    assert clone.control_model_wrapped.load_device == OTHER
    assert clone.previous_controlnet is None


def test_refine_control_clone_samples_the_same_image(sd3_runtime):
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1.0
    pos, neg = _apply(sd3_runtime, mask, injection="add_inj (per block)")
    top = pos[0][1]["control"]
    assert isinstance(top, RefineControl)
    _relink(top, sd3_runtime["patcher"])
    clone = top.get_instance_for_device(OTHER)
    assert isinstance(clone, RefineControl) and clone is not top
    assert (clone.wiring, clone.balanced, clone.label) == (top.wiring, top.balanced, top.label)
    assert clone.inner.control_model is not top.inner.control_model
    assert clone.inner.control_model.wiring == top.inner.control_model.wiring
    assert clone.inner.control_model.inner is not top.inner.control_model.inner
    assert clone.inner.control_model_wrapped.load_device == OTHER
    assert clone.inner.cond_hint_original is top.inner.cond_hint_original
    assert clone.inner.extra_concat_orig[0] is top.inner.extra_concat_orig[0]  # the keep channel
    out = _sample(sd3_runtime, pos, neg)
    out_clone = _sample(sd3_runtime, _swap(pos, OTHER), _swap(neg, OTHER))
    assert torch.equal(out, out_clone)


def test_unclonable_inner_control_says_what_to_do():
    class Odd(comfy.controlnet.ControlBase):
        def copy(self):
            c = Odd()
            self.copy_to(c)
            return c

    with pytest.raises(NotImplementedError, match="cannot clone a Odd|cannot clone the Odd"):
        multigpu.clone_core_control(Odd(), OTHER, "Apply: canny #3")


def test_t2i_adapter_inside_our_control_is_cloned():
    """A T2I-Adapter (core's T2IAdapter, a tiny real Adapter) inside a MinimalImpactControl:
    the clone gets its own adapter weights and the new device, as core's
    ``T2IAdapter.deepclone_multigpu`` (0.28 L956-962) does."""
    import comfy.t2i_adapter.adapter as adapter

    torch.manual_seed(0)
    net = adapter.Adapter(channels=[32, 64], nums_rb=1, cin=3 * 64, ksize=1, sk=True, use_conv=False, xl=False)
    core = comfy.controlnet.T2IAdapter(net, 3, 8, "nearest-exact", device=CPU)
    hint = torch.rand(1, 3, 64, 64)
    ours = mi_control.MinimalImpactControl.create(core, hint, 0.8, (0.0, 1.0), label="Adapter: sketch #4")
    clone = ours.deepclone_multigpu(OTHER, autoregister=True)
    assert ours.get_instance_for_device(OTHER) is clone
    assert clone.inner.device == OTHER and ours.inner.device == CPU
    assert clone.inner.t2i_model is not ours.inner.t2i_model
    assert clone.inner.cond_hint_original is ours.inner.cond_hint_original and clone.strength == 0.8
    for a, b in zip(_params(ours.inner.t2i_model), _params(clone.inner.t2i_model)):
        assert a.data_ptr() != b.data_ptr() and torch.equal(a, b)
