"""The official ControlNeXt SVD UNets (diffusers ``UNetSpatioTemporalConditionModel``
layout) onto ComfyUI's SVD UNet keys.

The released SVD UNets are full models in diffusers names: SVD v1
``finetune/unet_fp16.bin`` (fp16, merged) and SVD v2 ``v2/unet.bin`` (fp32);
their classes (``ControlNeXt-SVD*/models/unet_spatio_temporal_condition_controlnext.py``)
keep diffusers' parameter names. ComfyUI's SVD UNet uses the original
(generative-models) names, and ComfyUI has no converter for the video UNet
(``comfy.utils.unet_to_diffusers`` covers 2D UNets only), so core's
UNETLoader cannot detect these files.

Block numbering (per level l with n_l res blocks): ``down_blocks.l.resnets.j``
is ``input_blocks.(1 + Σ_{k<l}(n_k + 1) + j).0``, its attention ``.1``, its
downsampler ``input_blocks.(Σ_{k≤l}(n_k + 1)).0.op``; ``up_blocks.u`` (level
L−1−u, n+1 res blocks) fills ``output_blocks`` in order, its upsampler is the
last layer of its last output block. Inside a block:

* spatio-temporal res block: ``spatial_res_block.{norm1, conv1, time_emb_proj,
  norm2, conv2, conv_shortcut}`` -> ``{in_layers.0, in_layers.2, emb_layers.1,
  out_layers.0, out_layers.3, skip_connection}``, ``temporal_res_block.*`` ->
  ``time_stack.*`` with the same names, ``time_mixer`` as is;
* spatio-temporal transformer: ``transformer_blocks`` as is,
  ``temporal_transformer_blocks`` -> ``time_stack``, ``time_pos_embed.linear_{1,2}``
  -> ``time_pos_embed.{0,2}``;
* top level: ``conv_in`` -> ``input_blocks.0.0``, ``time_embedding.linear_{1,2}``
  -> ``time_embed.{0,2}``, ``add_embedding.linear_{1,2}`` -> ``label_emb.0.{0,2}``,
  ``conv_norm_out`` -> ``out.0``, ``conv_out`` -> ``out.2``.
"""

from __future__ import annotations

import re

import torch

from .controlnext_files import base_weight

_RES = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
        "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
        "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "unet.")


def is_diffusers_svd_unet(sd: dict) -> bool:
    return any(".temporal_res_block." in k or ".temporal_transformer_blocks." in k for k in sd)


def _res_block(rest: str) -> str | None:
    m = re.fullmatch(r"(spatial_res_block|temporal_res_block)\.(\w+)\.(weight|bias)", rest)
    if m:
        inner = _RES.get(m.group(2))
        if inner is None:
            return None
        return (inner if m.group(1) == "spatial_res_block" else f"time_stack.{inner}") + f".{m.group(3)}"
    if rest == "time_mixer.mix_factor":
        return rest
    return None


def _attention(rest: str) -> str:
    rest = re.sub(r"^temporal_transformer_blocks\.", "time_stack.", rest)
    rest = re.sub(r"^time_pos_embed\.linear_1\.", "time_pos_embed.0.", rest)
    return re.sub(r"^time_pos_embed\.linear_2\.", "time_pos_embed.2.", rest)


def diffusers_svd_key_to_comfy(key: str, num_res_blocks: list[int], target_keys) -> str | None:
    """The ComfyUI SVD UNet key (without ``diffusion_model.``) of a diffusers key, or None."""
    for name, comfy_name in _TOP.items():
        if key.startswith(name + "."):
            return comfy_name + key[len(name):]
    levels = len(num_res_blocks)
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        level, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        start = 1 + sum(n + 1 for n in num_res_blocks[:level])
        if kind == "downsamplers":
            return f"input_blocks.{start + num_res_blocks[level]}.0.op.{rest.removeprefix('conv.')}"
        if kind == "resnets":
            inner = _res_block(rest)
            return None if inner is None else f"input_blocks.{start + j}.0.{inner}"
        return f"input_blocks.{start + j}.1.{_attention(rest)}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m.group(1), int(m.group(2)), m.group(3)
        if kind == "resnets":
            inner = _res_block(rest)
            return None if inner is None else f"middle_block.{2 * j}.{inner}"
        return f"middle_block.1.{_attention(rest)}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        u, kind, j, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        start = sum(num_res_blocks[levels - 1 - k] + 1 for k in range(u))
        if kind == "upsamplers":
            block = start + num_res_blocks[levels - 1 - u]
            layer = 2 if f"output_blocks.{block}.1.norm.weight" in target_keys else 1
            return f"output_blocks.{block}.{layer}.{rest}"
        if kind == "resnets":
            inner = _res_block(rest)
            return None if inner is None else f"output_blocks.{start + j}.0.{inner}"
        return f"output_blocks.{start + j}.1.{_attention(rest)}"
    return None


def convert_svd_unet(sd: dict, model_patcher, name: str = "unet_file") -> dict:
    """{``diffusion_model.<key>``: tensor} for a full SVD UNet file in diffusers
    names (the official ControlNeXt SVD UNets) or in ComfyUI names. Every key
    of the file must map onto the model and every UNet weight of the model must
    be given, with equal shapes; otherwise raises naming the keys."""
    model_sd = {k[len("diffusion_model."):]: v for k, v in model_patcher.model.state_dict().items()
                if k.startswith("diffusion_model.")}
    sd = dict(sd)
    for p in _PREFIXES:
        if sd and all(k.startswith(p) for k in sd):
            sd = {k[len(p):]: v for k, v in sd.items()}
            break
    diffusers = is_diffusers_svd_unet(sd)
    num_res_blocks = model_patcher.model.model_config.unet_config["num_res_blocks"]
    placed, unmapped, wrong, seen = {}, [], [], set()
    for k, v in sd.items():
        target = diffusers_svd_key_to_comfy(k, num_res_blocks, model_sd) if diffusers else k
        if target is None or target not in model_sd:
            unmapped.append(k)
            continue
        seen.add(target)
        if tuple(model_sd[target].shape) != tuple(v.shape):
            wrong.append(f"{k} {list(v.shape)} vs model {target} {list(model_sd[target].shape)}")
            continue
        placed[target] = v
    missing = sorted(set(model_sd) - seen)
    if unmapped or wrong or missing:
        parts = []
        if unmapped:
            parts.append(f"{len(unmapped)} tensors of the file have no place in this SVD UNet: {unmapped[:8]}"
                         f"{' ...' if len(unmapped) > 8 else ''}")
        if wrong:
            parts.append(f"{len(wrong)} tensors have other shapes: {wrong[:4]}{' ...' if len(wrong) > 4 else ''}")
        if missing:
            parts.append(f"{len(missing)} weights of the model are missing from the file: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
        layout = "diffusers (UNetSpatioTemporalConditionModel)" if diffusers else "ComfyUI"
        raise ValueError(
            f"ControlNeXt: {name} is not a full SVD UNet for this model ({layout} key names, {len(sd)} tensors): "
            f"{'; '.join(parts)}. Give the official ControlNeXt SVD UNet (v2 unet.bin, v1 finetune/unet_fp16.bin) "
            f"or an SVD-XT UNet in ComfyUI format, complete and for an SVD model.")
    return {"diffusion_model." + k: v for k, v in placed.items()}


def full_unet_patches(placed: dict, model_patcher) -> dict:
    """One-tensor "diff" patches W_file − W_model for a full UNet, in the wider
    of the file's and the model's dtype: an fp16 file on an fp16 model weighs
    what the file weighs, and on an fp32 model the sum gives the file's weights."""
    model_sd = model_patcher.model.state_dict()
    out = {}
    for k, v in placed.items():
        base = base_weight(model_patcher, k, model_sd)
        dtype = torch.promote_types(v.dtype, base.dtype)
        out[k] = ((v.to(torch.float32) - base.to(v.device, torch.float32)).to(dtype),)
    return out
