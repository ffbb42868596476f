"""Golden outputs of the official ControlNeXt code, for tests/test_controlnext_goldens.py.

Run once at development time, with the official repository fetched outside
this one (it is never added here):

    git clone https://github.com/dvlab-research/ControlNeXt /tmp/cnx            # commit ab4b3ac
    git -C /tmp/cnx worktree add /tmp/cnx-d1d16da d1d16da                        # the first SDXL module
    python tests/goldens/controlnext/make_goldens.py --upstream /tmp/cnx --upstream-d1d16da /tmp/cnx-d1d16da

Upstream commits: ab4b3ac (2024-09-25) for SDXL, SD1.5, SD1.5-Training, SVD v1
and SVD v2; d1d16da (2024-07-10) for the first SDXL module. Needs torch,
diffusers (0.42.1 was used) and einops.

For each variant the official control-module class is built and loaded
(strict) with ``controlnext_reference.synthetic_state_dict(layout, seed)``;
the official UNet class of that variant (a small config with the real widths
at the injection point, diffusers' default initialisation under a fixed seed)
runs once on a [uncond, cond] CFG batch of ``golden_image(variant)`` with the
control passed the way the official pipeline passes it, including the
pipeline's per-row scale for SVD (pipeline_stable_video_diffusion_controlnext.py:
v1 L576-579, v2 L578-580). A forward hook replaces the UNet feature just before
the injection by ``golden_feature(variant, shape)`` (seeded, so the test
rebuilds it); a pre-hook records the feature just after. The per-row scale is
measured from the official UNet: a second run with the scale that the UNet's
own rule turns into 1 gives the unit residual, and each row's scale is the
projection of its residual on it.

Stored per variant (``<variant>.json``, no tensors: the test rebuilds every
input): upstream commit, timestep, the shapes, row_scale, and
``controlnext_reference.sketch`` of the official module output (for the
images, once) and of the feature after the injection.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))  # tests/, for controlnext_reference
from controlnext_reference import (GOLDEN_FRAMES as FRAMES, GOLDEN_MODULE_SEED as MODULE_SEED,  # noqa: E402
                                   GOLDEN_PIXELS as PIXELS, GOLDEN_SD_TIMESTEP as SD_TIMESTEP, GOLDEN_SEED as SEED,
                                   GOLDEN_SVD_SIGMA as SVD_SIGMA, golden_feature, golden_image, sketch,
                                   synthetic_state_dict)

# variant: (folder, upstream, module (file, class, kwargs), layout, unet (file, class), control kwarg,
#           before (module path, "out" | "pre"), after)
SPECS = {
    "sdxl": ("ControlNeXt-SDXL", "main", ("models.controlnet", "ControlNetModel", {}), "320",
             ("models.unet", "UNet2DConditionModel"), "controls", ("conv_in", "out"), ("down_blocks.0", "pre")),
    "sd15_training": ("ControlNeXt-SD1.5-Training", "main", ("models.controlnext", "ControlNeXtModel", {}), "320",
                      ("models.unet", "UNet2DConditionModel"), "conditional_controls",
                      ("down_blocks.0", "out"), ("down_blocks.1", "pre")),
    "sd15": ("ControlNeXt-SD1.5", "main", ("models.controlnet", "ControlNetModel", {}), "sd15",
             ("models.unet", "UNet2DConditionModel"), "mid_block_additional_residual",
             ("mid_block", "out"), ("up_blocks.0", "pre")),
    "svd_v2": ("ControlNeXt-SVD-v2", "main", ("models.controlnext_vid_svd", "ControlNeXtSDVModel", {}), "320",
               ("models.unet_spatio_temporal_condition_controlnext", "UNetSpatioTemporalConditionControlNeXtModel"),
               "conditional_controls", ("down_blocks.0", "out"), ("down_blocks.1", "pre")),
    "svd_v1": ("ControlNeXt-SVD", "main", ("models.controlnext_vid_svd", "ControlNeXtSDVModel", {}), "svd_v1",
               ("models.unet_spatio_temporal_condition_controlnext", "UNetSpatioTemporalConditionControlNeXtModel"),
               "mid_block_additional_residual", ("down_blocks.1", "out"), ("mid_block", "pre")),
    "sdxl_early": ("ControlNeXt-SDXL", "d1d16da", ("models.controlnet", "ControlNetModel", {}), "sdxl_early",
                   ("models.unet", "ControlNeXtUNet2DConditionModel"), "mid_block_additional_residual",
                   ("mid_block", "out"), ("up_blocks.0", "pre")),
}
SD_UNET = dict(sample_size=6, in_channels=4, out_channels=4, down_block_types=("DownBlock2D", "DownBlock2D"),
               up_block_types=("UpBlock2D", "UpBlock2D"), block_out_channels=(320, 1280), layers_per_block=1,
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
SVD_UNET = dict(sample_size=6, in_channels=8, out_channels=4,
                down_block_types=("DownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
                up_block_types=("UpBlockSpatioTemporal", "UpBlockSpatioTemporal"), block_out_channels=(320, 1280),
                addition_time_embed_dim=8, projection_class_embeddings_input_dim=24, layers_per_block=1,
                cross_attention_dim=32, transformer_layers_per_block=1, num_attention_heads=(5, 10),
                num_frames=FRAMES)


def _import(root: Path, name: str):
    for k in [k for k in sys.modules if k == "models" or k.startswith(("models.", "pipeline"))]:
        del sys.modules[k]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(root))


def _get(module, path):
    for part in path.split("."):
        module = module[int(part)] if part.isdigit() else getattr(module, part)
    return module


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def run_variant(variant: str, roots: dict) -> dict:
    folder, upstream, (mfile, mclass, mkw), layout, (ufile, uclass), kwarg, before, after = SPECS[variant]
    root = roots[upstream] / folder
    module_cls = getattr(_import(root, mfile), mclass)
    unet_cls = getattr(_import(root, ufile), uclass)
    svd = variant.startswith("svd")

    module = module_cls(**mkw)
    missing, unexpected = module.load_state_dict(synthetic_state_dict(layout, MODULE_SEED[variant]), strict=True)
    assert not missing and not unexpected
    module.eval()
    torch.manual_seed(SEED)
    unet = unet_cls(**(SVD_UNET if svd else SD_UNET)).eval()

    image = golden_image(variant)
    g = torch.Generator().manual_seed(SEED + 2)
    lat = PIXELS // 8
    if svd:
        t = torch.tensor(0.25 * math.log(SVD_SIGMA))  # the EDM continuous timestep SVD is trained with
        sample = torch.randn(2, FRAMES, 8, lat, lat, generator=g)
        extra = dict(encoder_hidden_states=torch.randn(2, 1, 32, generator=g),
                     added_time_ids=torch.randn(2, 3, generator=g))
        cond_input = image[None].repeat(2, 1, 1, 1, 1)  # (2 = uncond+cond, F, 3, H, W)
    else:
        t = torch.tensor(SD_TIMESTEP)
        sample = torch.randn(2, 4, lat, lat, generator=g)
        extra = dict(encoder_hidden_states=torch.randn(2, 5, 32, generator=g))
        cond_input = image.repeat(2, 1, 1, 1)

    records = {}

    def hook_out(_m, _args, out):
        h = golden_feature(variant, _first_tensor(out).shape)
        records["before"] = h.clone()
        return (h, *out[1:]) if isinstance(out, (tuple, list)) else h

    def hook_pre(_m, args, kwargs):
        x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
        records["after"] = x.detach().clone()

    h1 = _get(unet, before[0]).register_forward_hook(hook_out)
    h2 = _get(unet, after[0]).register_forward_pre_hook(hook_pre, with_kwargs=True)

    def unet_run(raw_scale_rows=None):
        records.clear()  # both hooks must fire on every run
        with torch.no_grad():
            out = module(cond_input, t)
            out = dict(out)
            rows = out["out" if "out" in out else "output"].shape[0]
            if svd:
                # the official pipelines' CFG handling of the scale (v1 L576-579, v2 L578-580)
                s = torch.as_tensor(out["scale"], dtype=torch.float32).repeat(rows)[:, None, None, None].clone()
                s[: rows // 2] *= 0
                out["scale"] = s
            if raw_scale_rows is not None:
                out["scale"] = raw_scale_rows
            unet(sample, t, **extra, **{kwarg: out})
        return out, records["before"], records["after"]

    out, h_before, h_after = unet_run()  # KeyError if a hook did not fire
    control = out["out" if "out" in out else "output"]
    rows = control.shape[0]
    # The raw scale that each UNet's own rule turns into 1: SVD v2 multiplies by 0.2, SVD v1 takes
    # sigmoid(scale)·1.3, the others multiply by the scale.
    unit = {"svd_v2": 5.0, "svd_v1": math.log((1 / 1.3) / (1 - 1 / 1.3))}.get(variant, 1.0)
    _, _, h_after_1 = unet_run(torch.full((rows, 1, 1, 1), unit))  # the same golden_feature before it
    d = (h_after - h_before).reshape(rows, -1).double()
    d1 = (h_after_1 - h_before).reshape(rows, -1).double()
    row_scale = (d * d1).sum(1) / (d1 * d1).sum(1)
    h1.remove()
    h2.remove()
    # The module output of the uncond half equals the cond half (the same images): one copy is kept.
    assert torch.equal(control[: rows // 2], control[rows // 2:])
    seed = MODULE_SEED[variant]

    def numbers(x):
        return [float(f"{v:.9g}") for v in x.flatten().tolist()]

    module_sketch, h_after_sketch = sketch(control[rows // 2:], seed), sketch(h_after, seed)
    return {"timestep": float(t), "feature_shape": list(h_before.shape),
            "module_output_shape": list(control[rows // 2:].shape), "row_scale": numbers(row_scale),
            **{f"module_output_{k}": numbers(v) for k, v in module_sketch.items()},
            **{f"h_after_{k}": numbers(v) for k, v in h_after_sketch.items()}}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--upstream", required=True, type=Path, help="dvlab-research/ControlNeXt at ab4b3ac")
    p.add_argument("--upstream-d1d16da", required=True, type=Path, help="the same repository at d1d16da")
    p.add_argument("--out", type=Path, default=HERE)
    p.add_argument("--variants", nargs="*", default=list(SPECS))
    a = p.parse_args()
    torch.set_grad_enabled(False)
    for variant in a.variants:
        golden = {"upstream": "dvlab-research/ControlNeXt@" + ("d1d16da" if variant == "sdxl_early" else "ab4b3ac"),
                  "module_seed": MODULE_SEED[variant], "made_by": "tests/goldens/controlnext/make_goldens.py",
                  **run_variant(variant, {"main": a.upstream, "d1d16da": a.upstream_d1d16da})}
        path = a.out / f"{variant}.json"
        path.write_text(json.dumps(golden) + "\n")
        print(variant, "feature", golden["feature_shape"], "module output", golden["module_output_shape"],
              "row_scale", [round(x, 5) for x in golden["row_scale"]], f"{path.stat().st_size} B")


if __name__ == "__main__":
    main()
