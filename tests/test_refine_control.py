"""Refine-Control: wirings, losses, conventions, the node in ComfyUI's
sampler (local prompt, strength 0, bad input), text handling and options.
Models and helpers: ``refine_control_common``."""

from __future__ import annotations

import json

import pytest
import torch

from model_patches import refine_control as rc
from training.refine_control import losses, metrics
from model_patches import refine_control_runtime as rt
from model_patches.balance import add_inj
from balanced_control.nodes.refine_control import RefineControlInpaintApply
from headless import synthetic_sd3 as s3


import comfy.controlnet  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402


from refine_control_common import (  # noqa: F401  (sd3_runtime is a fixture)
    API_EXAMPLE, UI_EXAMPLE, _apply, _files, _sample, sd3_runtime)


# --------------------------------------------------------------------------
# block wiring tables
# --------------------------------------------------------------------------

def test_student_12_on_24_is_pairs_in_every_wiring():
    expected = [i // 2 for i in range(23)] + [None]
    for name in rc.BLOCK_MAPS:
        assert rc.block_map(name, 12, 24) == expected, name


def test_teacher_23_on_24_tables():
    assert rc.block_map("diffusers_0.29", 23, 24) == list(range(23)) + [None]
    assert rc.block_map("comfyui", 23, 24) == list(range(22)) + [None, None]  # core drops layer 22
    assert rc.block_map("diffusers_0.32", 23, 24) == [0, 0] + list(range(1, 22)) + [None]


def test_alignment_plan_12_vs_23_and_odd_depth_rule():
    plan = rc.alignment_plan(rc.block_map("diffusers_0.29", 12, 24), rc.block_map("diffusers_0.29", 23, 24))
    assert [(t.student_layer, t.count, t.teacher_layers) for t in plan[:11]] == \
        [(j, 2, (2 * j, 2 * j + 1)) for j in range(11)]
    assert (plan[11].student_layer, plan[11].count, plan[11].teacher_layers) == (11, 1, (22,))


def test_comfyui_map_matches_core_controlnet_output():
    """Core's list for a 3-layer ControlNet on a depth-4 model equals map_comfyui."""
    cn = s3.build_mmdit_controlnet(num_blocks=3, seed=4)
    x, hint = torch.randn(2, 16, 8, 8), torch.randn(2, 17, 8, 8)
    t, ctx, y = torch.full((2,), 400.0), torch.randn(2, 5, 4096), torch.randn(2, 2048)
    with torch.no_grad():
        core = cn(x=x, hint=hint, timesteps=t, context=ctx, y=y)["output"]
        _, res = rt.controlnet_layers(cn, x, hint, t, ctx, y)
    mapping = rc.map_comfyui(3, 4)
    assert len(core) == sum(j is not None for j in mapping) == 2
    for i, j in enumerate(mapping):
        if j is not None:
            torch.testing.assert_close(core[i], res[j])


# --------------------------------------------------------------------------
# losses against hand-computed values
# --------------------------------------------------------------------------

def test_task_loss_hand_value():
    pred = torch.tensor([[[[1.0, 2.0]]]])       # (1, 1, 1, 2)
    target = torch.tensor([[[[0.0, 0.0]]]])
    mask = torch.tensor([[[[1.0, 0.0]]]])       # inpaint the first element
    # w = (0.975, 0.025); errors (1, 4); mean = (0.975 + 0.1) / 2
    assert losses.task_loss(pred, target, mask, 0.975).item() == pytest.approx(0.5375)
    assert losses.task_loss(pred, target, mask, 0.5).item() == pytest.approx((0.5 + 2.0) / 2)
    with pytest.raises(ValueError, match="alpha"):
        losses.task_loss(pred, target, mask, 1.5)


def test_distillation_loss_hand_value_and_stop_gradient():
    s = torch.tensor([1.0, 3.0], requires_grad=True)
    t = torch.tensor([0.0, 1.0], requires_grad=True)
    loss = losses.distillation_loss(s, t)
    assert loss.item() == pytest.approx((1 + 4) / 2)
    loss.backward()
    assert t.grad is None and s.grad is not None


def test_feature_alignment_hand_value_with_odd_teacher():
    # student 2 layers on 4 blocks (pairs), teacher 3 layers one-to-one
    plan = rc.alignment_plan(rc.block_map("diffusers_0.29", 2, 4), rc.block_map("diffusers_0.29", 3, 4))
    fs = [torch.tensor([[1.0]]), torch.tensor([[2.0]])]
    ft = [torch.tensor([[0.5]]), torch.tensor([[1.0]]), torch.tensor([[4.0]])]
    # term 1: (2*1 - (0.5 + 1))^2 = 0.25; term 2 (odd rule): (1*2 - 4)^2 = 4
    assert losses.feature_alignment_loss(fs, ft, plan, normalise="none").item() == pytest.approx(4.25)
    # normalised by the teacher's mean square: 0.25 / 1.5^2 + 4 / 4^2
    assert losses.feature_alignment_loss(fs, ft, plan).item() == pytest.approx(0.25 / 2.25 + 0.25)


def test_feature_alignment_is_scale_invariant_and_per_row():
    plan = rc.alignment_plan(rc.block_map("diffusers_0.29", 2, 4), rc.block_map("diffusers_0.29", 3, 4))
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(2, 6, 8, generator=g) for _ in range(2)]
    ft = [torch.randn(2, 6, 8, generator=g) * s for s in (1.0, 30.0, 0.5)]
    ref = losses.feature_alignment_loss(fs, ft, plan)
    for c in (1e-2, 7.0, 1e3):
        torch.testing.assert_close(losses.feature_alignment_loss([f * c for f in fs], [f * c for f in ft], plan), ref,
                                   rtol=1e-5, atol=0)
    unnormalised = losses.feature_alignment_loss(fs, ft, plan, normalise="none")
    assert losses.feature_alignment_loss([f * 10 for f in fs], [f * 10 for f in ft], plan, normalise="none").item() \
        == pytest.approx(100 * unnormalised.item(), rel=1e-5)
    # exact per-row value, in float64
    expected = 0.0
    for term in plan:
        d = (fs[term.student_layer].double() * term.count - sum(ft[k].double() for k in term.teacher_layers))
        t = sum(ft[k].double() for k in term.teacher_layers)
        expected += float(torch.stack([d[b].square().mean() / t[b].square().mean() for b in range(2)]).mean())
    assert ref.item() == pytest.approx(expected, rel=1e-5)
    # a student that injects nothing scores exactly 1 per term
    zero = losses.feature_alignment_loss([torch.zeros_like(f) for f in fs], ft, plan)
    assert zero.item() == pytest.approx(len(plan))


# --------------------------------------------------------------------------
# conditioning conventions
# --------------------------------------------------------------------------

def test_conditioning_latent_conventions():
    raw = torch.full((1, 16, 2, 2), 0.5)
    mask = torch.tensor([[[0.0, 0.6], [0.4, 1.0]]])
    d = rc.conditioning_latent(raw, mask, rc.convention("diffusers"))
    c = rc.conditioning_latent(raw, mask, rc.convention("comfyui"))
    assert d.shape == (1, 17, 2, 2)
    torch.testing.assert_close(d[:, :16], torch.full((1, 16, 2, 2), (0.5 - 0.0609) * 1.5305))
    torch.testing.assert_close(c[:, :16], torch.full((1, 16, 2, 2), 0.5 * 1.5305))
    torch.testing.assert_close(d[0, 16], torch.tensor([[1.0, 0.0], [1.0, 0.0]]))   # binarised keep = 1 - mask
    torch.testing.assert_close(c[0, 16], torch.tensor([[1.0, 0.4], [0.6, 0.0]]))   # soft keep


def test_masked_image_and_empty_full_masks():
    image = torch.rand(1, 4, 4, 3)
    conv = rc.convention("diffusers")
    empty, full = torch.zeros(1, 4, 4), torch.ones(1, 4, 4)
    torch.testing.assert_close(rc.masked_image(image, empty, conv), image)
    assert rc.masked_image(image, full, conv).abs().sum() == 0
    assert rc.keep_mask(torch.full((1, 4, 4), float("nan")), conv).eq(1).all()


def test_masked_metrics():
    ref = torch.zeros(1, 8, 8, 3)
    pred = ref.clone()
    pred[:, :4] = 0.1                      # error only in the top half
    mask = torch.zeros(1, 8, 8)
    mask[:, :4] = 1
    assert metrics.masked_psnr(pred, ref, mask).item() == pytest.approx(20.0, abs=1e-4)
    assert metrics.masked_psnr(pred, ref, 1 - mask).item() == pytest.approx(100.0)   # exact outside: clamp at 1e-10
    assert torch.isnan(metrics.masked_psnr(pred, ref, torch.zeros(1, 8, 8))).all()
    assert metrics.masked_ssim(ref, ref, mask).item() == pytest.approx(1.0)


# --------------------------------------------------------------------------
# the node in ComfyUI's sampler (in process)
# --------------------------------------------------------------------------

def test_node_samples_with_each_injection_and_differs_from_no_control(sd3_runtime):
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    plain = _sample(sd3_runtime, sd3_runtime["pos"], sd3_runtime["neg"])
    outs = {}
    for injection in ("add", "add_inj (per block)", "add_inj (per token)"):
        pos, neg = _apply(sd3_runtime, mask, injection=injection)
        assert pos[0][1]["control"] is neg[0][1]["control"]
        outs[injection] = _sample(sd3_runtime, pos, neg)
        assert torch.isfinite(outs[injection]).all()
        assert not torch.allclose(outs[injection], plain)
    assert not torch.allclose(outs["add"], outs["add_inj (per block)"])
    # nothing leaks: the plain graph afterwards gives the same result as before
    torch.testing.assert_close(_sample(sd3_runtime, sd3_runtime["pos"], sd3_runtime["neg"]), plain)


def test_balanced_injection_patch_is_add_inj():
    inj = rt.BlockInjection("layer", 20.0)
    opts = {"patches_replace": {}}
    r = torch.randn(2, 6, 8)
    inj.add([None, r], opts)
    assert ("double_block", 0) not in opts["patches_replace"]["dit"]
    img = torch.randn(2, 6, 8)
    out = opts["patches_replace"]["dit"][("double_block", 1)](
        {"img": img, "txt": None}, {"original_block": lambda a: {"img": a["img"], "txt": a["txt"]}})
    torch.testing.assert_close(out["img"], add_inj(img, r, 20.0, "layer"))


def test_balanced_controls_of_one_call_must_share_their_settings():
    opts = {}
    first = rt.BlockInjection.for_call(opts, "layer", 20.0, "A")
    assert rt.BlockInjection.for_call(opts, "layer", 20.0, "B") is first
    with pytest.raises(ValueError, match=r"B: balanced injection with granularity 'pixel' and max_lambda 20.*"
                                         r"A on the same model call uses granularity 'layer'"):
        rt.BlockInjection.for_call(opts, "pixel", 20.0, "B")
    # the deprecated spelling "token" is read as "pixel" (with a warning), so it meets the same refusal
    with pytest.warns(DeprecationWarning, match="'token' is a deprecated spelling of 'pixel'"), \
            pytest.raises(ValueError, match=r"granularity 'pixel' and max_lambda 20"):
        rt.BlockInjection.for_call(opts, "token", 20.0, "B")
    with pytest.raises(ValueError, match=r"max_lambda 5, but A"):
        rt.BlockInjection.for_call(opts, "layer", 5.0, "B")


def _core_sd3_controlnet(seed):
    return comfy.controlnet.load_controlnet_state_dict(
        s3.sd3_controlnet_state_dict(num_blocks=2, latent_channels=16, seed=seed))


class _Recorder:
    """Forward hooks (test instrumentation only): the outputs of a core
    ControlNet, the text rows entering a ControlNet's context embedder, and the
    batch of every base-model call."""

    def __init__(self):
        self.handles, self.calls = [], {}

    def outputs(self, name, module):
        self.calls[name] = []
        self.handles.append(module.register_forward_hook(
            lambda m, a, kw, out: self.calls[name].append([r.clone() for r in out["output"]]), with_kwargs=True))

    def inputs(self, name, module):
        self.calls[name] = []
        self.handles.append(module.register_forward_hook(lambda m, a, out: self.calls[name].append(a[0].clone())))

    def base_calls(self, name, module):
        self.calls[name] = []
        self.handles.append(module.register_forward_hook(
            lambda m, a, kw, out: self.calls[name].append(
                (kw.get("x", a[0] if a else None).shape[0], list(kw["transformer_options"]["cond_or_uncond"]))),
            with_kwargs=True))

    def close(self):
        for h in self.handles:
            h.remove()


def _chain_and_sample(rt_, local, before, after, steps=1):
    import nodes as comfy_nodes
    hint = torch.rand(1, 32, 32, 3, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    apply_core = comfy_nodes.ControlNetApplyAdvanced().apply_controlnet
    pos, neg = apply_core(rt_["pos"], rt_["neg"], before, hint, 0.8, 0.0, 1.0, vae=rt_["vae"])
    pos, neg = RefineControlInpaintApply.execute(pos, neg, rt_["student"], rt_["vae"], hint, mask, 1.0, 0.0, 1.0,
                                                 "diffusers", "diffusers_0.29", "add", 20.0,
                                                 local_prompt=local).args
    pos, neg = apply_core(pos, neg, after, hint, 1.1, 0.0, 1.0, vae=rt_["vae"])
    latent = torch.zeros(1, 16, 4, 4)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(rt_["patcher"], noise, steps, 3.0, "euler", "normal", pos, neg, latent, seed=0,
                              disable_pbar=True)
    return out, pos, neg


def test_local_prompt_reaches_only_its_own_controlnet_and_keeps_cfg_batched(sd3_runtime):
    """Core SD3 ControlNets chained before and after get exactly the residuals
    they get without the local prompt; the RefineControl's own ControlNet sees
    the local text on the positive rows and the negative text on the negative
    rows (both repeated to the lcm of the token counts, as ComfyUI stacks
    texts); cond and uncond stay one batch: one model call per step."""
    before, after = _core_sd3_controlnet(21), _core_sd3_controlnet(22)
    local = [[torch.randn(1, 3, 4096, generator=torch.Generator().manual_seed(9)), {"pooled_output": None}]]
    runs = {}
    for name, lp in (("global", None), ("local", local)):
        rec = _Recorder()
        rec.outputs("before", before.control_model)
        rec.outputs("after", after.control_model)
        rec.inputs("own_text", sd3_runtime["student"].control_model.context_embedder)
        rec.base_calls("base", sd3_runtime["patcher"].model.diffusion_model)
        try:
            out, pos, neg = _chain_and_sample(sd3_runtime, lp, before, after)
        finally:
            rec.close()
        runs[name] = (rec.calls, out)
        # conditioning dicts carry no text for ControlNets: the local prompt lives in the control
        assert all("cross_attn_controlnet" not in e[1] for e in pos + neg)
        assert pos[0][1]["control"] is neg[0][1]["control"]
    g, l_ = runs["global"][0], runs["local"][0]
    for who in ("before", "after"):
        assert len(g[who]) == len(l_[who]) == 1
        assert len(g[who][0]) == len(l_[who][0]) > 0
        for a, b in zip(g[who][0], l_[who][0]):
            assert torch.equal(a, b), who
    # one base-model call for the step, with both rows batched
    assert [(n, sorted(c)) for n, c in l_["base"]] == [(2, [0, 1])]
    assert [(n, sorted(c)) for n, c in g["base"]] == [(2, [0, 1])]
    # what the RefineControl's own ControlNet read
    (text,) = l_["own_text"]
    labels = l_["base"][0][1]
    assert text.shape == (2, 21, 4096)                              # lcm(7, 3)
    for row, label in enumerate(labels):
        expected = (local[0][0] if label == 0 else sd3_runtime["neg"][0][0]).float()
        expected = expected.repeat(1, 21 // expected.shape[1], 1)[0]
        torch.testing.assert_close(text[row].float(), expected)
    (text_g,) = g["own_text"]
    assert text_g.shape == (2, 7, 4096)
    assert not torch.allclose(runs["global"][1], runs["local"][1])   # the local prompt does change the image


def test_local_prompt_substitution_uses_cond_or_uncond_labels():
    ctx = torch.arange(2 * 2 * 1, dtype=torch.float32).view(4, 1, 1).expand(4, 2, 1).contiguous()
    local = torch.full((1, 1, 1), -1.0)
    out = rt.context_with_local_prompt(ctx, local, [1, 0])           # uncond chunk first
    assert torch.equal(out[:2], ctx[:2]) and torch.equal(out[2:], torch.full((2, 2, 1), -1.0))
    assert rt.context_with_local_prompt(ctx, local, [1]) is ctx      # uncond-only call: untouched
    with pytest.raises(ValueError, match="wide"):
        rt.context_with_local_prompt(ctx, torch.zeros(1, 1, 3), [0, 1])


@pytest.mark.parametrize("with_local", [False, True])
def test_strength_zero_returns_conditioning_unchanged(sd3_runtime, with_local):
    local = [[torch.randn(1, 3, 4096), {}]] if with_local else None
    pos, neg = _apply(sd3_runtime, torch.zeros(1, 32, 32), strength=0.0, local_prompt=local)
    assert pos is sd3_runtime["pos"] and neg is sd3_runtime["neg"]


def test_local_prompt_with_a_non_sd3_controlnet_is_an_error(sd3_runtime, small_sd15_files):
    sd15_cn = comfy.controlnet.load_controlnet(str(small_sd15_files["controlnets"][0]))
    for strength in (1.0, 0.0):
        with pytest.raises(ValueError, match="expected an SD3 \\(MMDiT\\) ControlNet.*found"):
            _apply(sd3_runtime, torch.zeros(1, 32, 32), control_net=sd15_cn, strength=strength,
                   local_prompt=[[torch.randn(1, 3, 4096), {}]])


def test_local_prompt_must_be_one_text(sd3_runtime):
    two = [[torch.randn(1, 3, 4096), {}], [torch.randn(1, 3, 4096), {}]]
    with pytest.raises(ValueError, match="one text"):
        _apply(sd3_runtime, torch.zeros(1, 32, 32), local_prompt=two)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_node_empty_and_full_masks_are_finite(sd3_runtime, fill):
    pos, neg = _apply(sd3_runtime, torch.full((1, 32, 32), fill), convention="comfyui")
    assert torch.isfinite(_sample(sd3_runtime, pos, neg)).all()


def test_node_rejects_non_sd3_controlnet(sd3_runtime, small_sd15_files):
    sd15_cn = comfy.controlnet.load_controlnet(str(small_sd15_files["controlnets"][0]))
    with pytest.raises(ValueError, match="expected an SD3 \\(MMDiT\\) ControlNet.*found"):
        _apply(sd3_runtime, torch.zeros(1, 32, 32), control_net=sd15_cn)


def test_node_rejects_non_inpainting_sd3_controlnet(sd3_runtime):
    cn16 = comfy.controlnet.load_controlnet_state_dict(s3.sd3_controlnet_state_dict(num_blocks=2, latent_channels=16))
    with pytest.raises(ValueError, match="17 input channels.*found 16"):
        _apply(sd3_runtime, torch.zeros(1, 32, 32), control_net=cn16)


def test_node_rejects_bad_mask(sd3_runtime):
    with pytest.raises(ValueError, match="MASK shaped"):
        _apply(sd3_runtime, torch.zeros(1, 1, 32, 32))


def test_student_init_from_base_blocks_and_teacher_embedder():
    from training.refine_control.models import build_student, load_sd3_base, load_sd3_controlnet
    base, teacher_path = _files()
    patcher, _, _ = load_sd3_base(base)
    teacher = load_sd3_controlnet(teacher_path, "teacher")
    student = build_student(patcher.model.diffusion_model, teacher, 2)
    dm = patcher.model.diffusion_model
    for i in range(2):
        torch.testing.assert_close(student.joint_blocks[i].x_block.attn.qkv.weight,
                                   dm.joint_blocks[i].x_block.attn.qkv.weight.float())
    torch.testing.assert_close(student.pos_embed_input.proj.weight, teacher.pos_embed_input.proj.weight.float())
    assert all(p.abs().sum() == 0 for p in student.controlnet_blocks.parameters())
    with pytest.raises(ValueError, match="--layers 4"):
        build_student(dm, teacher, 4)


def _parse(argv):
    import argparse
    from training.refine_control.cli import add_arguments
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(["--base", "b", "--teacher", "t", "--data", "d", "--output", "o", *argv])


def test_trainer_option_names_agree_with_the_other_trainers(capsys):
    args = _parse(["--learning-rate", "3e-4", "--mixed-precision", "bf16", "--max-grad-norm", "0.5"])
    assert (args.learning_rate, args.mixed_precision, args.max_grad_norm) == (3e-4, "bf16", 0.5)
    old = _parse(["--lr", "3e-4", "--precision", "bf16", "--grad-clip", "0.5"])
    assert (old.learning_rate, old.mixed_precision, old.max_grad_norm) == (3e-4, "bf16", 0.5)
    err = capsys.readouterr().err
    for o, n in (("--lr", "--learning-rate"), ("--precision", "--mixed-precision"), ("--grad-clip", "--max-grad-norm")):
        assert f"{o} is deprecated" in err and n in err


def test_stage2_runs_by_default_with_unlabeled_data_and_the_ablation_is_named():
    from training.refine_control.cli import resolve_stages
    args = _parse(["--unlabeled", "u", "--stage1-steps", "100"])
    assert resolve_stages(args) == [] and args.stage2_steps == 25
    args = _parse(["--stage1-steps", "100"])
    (note,) = resolve_stages(args)
    assert args.stage2_steps == 0 and "single-stage ablation" in note and "18.81" in note
    args = _parse(["--unlabeled", "u", "--stage2-steps", "0"])
    assert resolve_stages(args) == [] and args.stage2_steps == 0


class _CountingClip:
    def __init__(self):
        self.encoded = []

    def tokenize(self, text):
        return text

    def encode_from_tokens(self, tokens, return_pooled=True):
        self.encoded.append(tokens)
        n = 1 + len(tokens)
        return torch.full((1, n, 4), float(n), dtype=torch.float16), torch.zeros(1, 2, dtype=torch.float16)


def test_text_cache_is_a_bounded_lru():
    from training.refine_control.text import TextCache
    clip = _CountingClip()
    cache = TextCache(clip, max_entries=2, dtype=torch.float32)
    for t in ("a", "bb", "a", "ccc", "a", "bb"):
        c, _ = cache(t)
        assert c.dtype == torch.float32 and c.shape == (1, 1 + len(t), 4)
    assert clip.encoded == ["a", "bb", "ccc", "bb"]     # "bb" was the least recently used when "ccc" came
    assert list(cache.cache) == ["a", "bb"] and len(cache.cache) <= 2
    assert TextCache(clip, max_entries=0)("a")[0].dtype == torch.float16   # no dtype: as CLIP gives it
    with pytest.raises(ValueError, match=">= 0"):
        TextCache(clip, max_entries=-1)


def test_text_stacking_repeats_to_the_lcm_like_comfyui_batching():
    from training.refine_control.text import stack_text
    a = torch.arange(2.0).view(1, 2, 1)
    b = torch.arange(3.0).view(1, 3, 1) + 10
    out = stack_text([a, b])
    assert out.shape == (2, 6, 1)
    assert out[0, :, 0].tolist() == [0, 1, 0, 1, 0, 1] and out[1, :, 0].tolist() == [10, 11, 12, 10, 11, 12]
    # attention over the repeated tokens equals attention over the originals (why ComfyUI pads so)
    q = torch.randn(1, 1, 1)
    att = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(att(q, out[1:2], out[1:2]), att(q, b, b))
    assert torch.equal(stack_text([a]), a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_base_and_teacher_load_in_the_requested_dtype(dtype):
    from training.refine_control.models import load_sd3_base, load_sd3_controlnet
    base, teacher_path = _files()
    patcher, clip, vae = load_sd3_base(base, dtype)
    assert {p.dtype for p in patcher.model.diffusion_model.parameters()} == {dtype}
    assert {p.dtype for p in vae.first_stage_model.parameters()} == {dtype} and vae.vae_dtype == dtype
    assert {p.dtype for p in clip.cond_stage_model.parameters() if p.ndim >= 2} == {dtype}  # weight matrices
    teacher = load_sd3_controlnet(teacher_path, "teacher", dtype)
    assert {p.dtype for p in teacher.parameters()} == {dtype}


def test_trainer_rejects_dataset_without_masks(tmp_path):
    from training.refine_control.data import scan_inpaint_data
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": "x.png", "prompt": "p"}))
    with pytest.raises(ValueError, match="no usable items"):
        scan_inpaint_data(tmp_path / "d.jsonl")


def test_ui_workflow_matches_api_twin():
    ui = json.loads(UI_EXAMPLE.read_text())
    api = json.loads(API_EXAMPLE.read_text())
    assert ui["version"] == 0.4
    assert sorted(n["type"] for n in ui["nodes"]) == sorted(n["class_type"] for n in api.values())
    for n in ui["nodes"]:
        assert {"id", "type", "pos", "size", "flags", "order", "mode", "inputs", "outputs", "properties",
                "widgets_values"} <= set(n)
        assert n["properties"]["Node name for S&R"] == n["type"]
    apply = next(n for n in ui["nodes"] if n["type"] == "RefineControlInpaintApply")
    assert apply["widgets_values"] == [1.0, 0.0, 1.0, "diffusers", "diffusers_0.29", "add", 20.0]
