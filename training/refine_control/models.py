"""Refine-Control models: the SD3 base and ControlNets through ComfyUI's
loaders, the student's initialisation, and its export."""

from __future__ import annotations

from pathlib import Path



def load_sd3_base(path: str | Path, dtype=None):
    """(model_patcher, clip, vae) of an SD3 single-file checkpoint, through
    ComfyUI's loader; with ``dtype`` the transformer, text encoders and VAE
    are held in that dtype instead of the one ComfyUI picks for the device."""
    import comfy.sd
    import comfy.utils

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"base checkpoint not found: {path}")
    sd, metadata = comfy.utils.load_torch_file(str(path), safe_load=True, return_metadata=True)
    options = {"dtype": dtype} if dtype is not None else {}
    patcher, clip, vae, _ = comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True,
                                                                  metadata=metadata, model_options=options,
                                                                  te_model_options=options)
    if patcher is None or not hasattr(patcher.model.diffusion_model, "joint_blocks") \
            or type(patcher.model.model_config).__name__ != "SD3":
        found = type(patcher.model.model_config).__name__ if patcher is not None else "nothing ComfyUI recognises"
        raise ValueError(f"{path}: expected an SD3 checkpoint (MMDiT transformer), found {found}. "
                         f"Pass an SD3 single-file checkpoint with --base.")
    if clip is None or vae is None:
        raise ValueError(f"{path}: the checkpoint has no text encoder or VAE; pass a full SD3 single-file checkpoint.")
    if dtype is not None:
        # ComfyUI's loader takes no VAE dtype; VAE.encode/decode cast inputs to ``vae_dtype``.
        vae.first_stage_model.to(dtype)
        vae.vae_dtype = dtype
    patcher.model.diffusion_model.requires_grad_(False).eval()
    return patcher, clip, vae


def load_sd3_controlnet(path: str | Path, label: str, dtype=None):
    import comfy.controlnet
    from model_patches.refine_control_runtime import sd3_control_model

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label} not found: {path}")
    control = comfy.controlnet.load_controlnet(str(path), model_options={"dtype": dtype} if dtype is not None else {})
    if control is None:
        raise ValueError(f"{label} {path}: ComfyUI does not recognise this file as a ControlNet.")
    return sd3_control_model(control, f"{label} {path.name}")


def build_student(base_dm, teacher, n_layers: int):
    """An N-layer ``comfy.cldm.mmdit.ControlNet``: embedders and blocks 0..N-1
    from the base transformer, conditioning embedder from the teacher, zero
    output projections. Parameters in fp32."""
    import comfy.cldm.mmdit
    import comfy.ops
    import torch

    depth = len(base_dm.joint_blocks)
    if not 1 <= n_layers < depth:
        raise ValueError(f"--layers {n_layers}: expected 1 <= N < {depth} (the base's last block is "
                         f"context_pre_only and cannot be a ControlNet block)")
    cfg = dict(base_dm_config(base_dm))
    latent_channels = teacher.pos_embed_input.proj.weight.shape[1]
    student = comfy.cldm.mmdit.ControlNet(num_blocks=n_layers, control_latent_channels=latent_channels,
                                          operations=comfy.ops.disable_weight_init, device="cpu",
                                          dtype=torch.float32, **cfg)
    base_sd = base_dm.state_dict()
    own = student.state_dict()
    load = {}
    for k in own:
        if k.startswith(("controlnet_blocks.", "pos_embed_input.")):
            continue
        if k in base_sd and base_sd[k].shape == own[k].shape:
            load[k] = base_sd[k].float()
    missing = [k for k in own if k not in load and not k.startswith(("controlnet_blocks.", "pos_embed_input."))]
    if missing:
        raise ValueError(f"student init: {len(missing)} keys not found in the base transformer, e.g. {missing[:3]}")
    t_sd = teacher.state_dict()
    for k in ("pos_embed_input.proj.weight", "pos_embed_input.proj.bias"):
        load[k] = t_sd[k].float()
    with torch.no_grad():
        for proj in student.controlnet_blocks:
            load[f"{_name(student, proj)}.weight"] = torch.zeros_like(proj.weight, dtype=torch.float32)
            load[f"{_name(student, proj)}.bias"] = torch.zeros_like(proj.bias, dtype=torch.float32)
    student.load_state_dict(load, strict=True)
    return student.float()


def _name(root, module) -> str:
    for n, m in root.named_modules():
        if m is module:
            return n
    raise KeyError(module)


def base_dm_config(base_dm) -> dict:
    """The MMDiT constructor arguments of a loaded base (what ComfyUI detected)."""
    import comfy.model_detection

    sd = base_dm.state_dict()
    cfg = comfy.model_detection.detect_unet_config(sd, "")
    cfg.pop("out_channels", None)
    return cfg


def student_diffusers_state_dict(student, depth: int, dtype) -> dict:
    """The student's weights in diffusers ``SD3ControlNetModel`` key layout, in ``dtype``."""
    from model_patches.refine_control_runtime import mmdit_controlnet_to_diffusers

    sd = mmdit_controlnet_to_diffusers({k: v.detach() for k, v in student.state_dict().items()}, depth,
                                       len(student.joint_blocks))
    return {k: v.to(dtype).contiguous() for k, v in sd.items()}


def save_student(student, path: Path, depth: int, dtype, metadata: dict) -> Path:
    """The single file ComfyUI's Load ControlNet Model (and RefineControlLoader) reads."""
    from .. import engine

    path.parent.mkdir(parents=True, exist_ok=True)
    return engine.save_tensors_atomically(student_diffusers_state_dict(student, depth, dtype), path,
                                          {k: str(v) for k, v in metadata.items()})


def diffusers_config(student) -> dict:
    """``config.json`` of diffusers' ``SD3ControlNetModel`` for a
    ``comfy.cldm.mmdit.ControlNet`` (fields of ``SD3ControlNetModel.__init__``,
    diffusers ``models/controlnets/controlnet_sd3.py``)."""
    import torch

    if getattr(student, "pos_embed", None) is None:
        raise ValueError("diffusers export: the ControlNet has no positional-embedding table (use_pos_embed=False "
                         "layouts are not exported)")
    attn = student.joint_blocks[0].x_block.attn
    heads, head_dim = int(attn.num_heads), int(attn.head_dim)
    ln_q = attn.ln_q
    if isinstance(ln_q, torch.nn.Identity):
        qk_norm = None
    elif "RMSNorm" in type(ln_q).__name__:
        qk_norm = "rms_norm"
    else:
        qk_norm = "layer_norm"
    num_patches = student.pos_embed.shape[1]
    side = int(round(num_patches ** 0.5))
    in_channels = int(student.in_channels)
    return {
        "_class_name": "SD3ControlNetModel",
        "_diffusers_version": "0.42.1",
        "sample_size": 128,
        "patch_size": int(student.patch_size),
        "in_channels": in_channels,
        "num_layers": len(student.joint_blocks),
        "attention_head_dim": head_dim,
        "num_attention_heads": heads,
        "joint_attention_dim": int(student.context_embedder.in_features),
        "caption_projection_dim": heads * head_dim,
        "pooled_projection_dim": int(student.y_embedder.mlp[0].in_features),
        "out_channels": in_channels,
        "pos_embed_max_size": side,
        "extra_conditioning_channels": int(student.pos_embed_input.proj.weight.shape[1]) - in_channels,
        "dual_attention_layers": [i for i, b in enumerate(student.joint_blocks) if b.x_block.x_block_self_attn],
        "qk_norm": qk_norm,
        "pos_embed_type": "sincos",
        "use_pos_embed": True,
        "force_zeros_for_pooled_projection": True,
    }


def save_diffusers_folder(student, folder: Path, depth: int, dtype) -> Path:
    """A folder ``SD3ControlNetModel.from_pretrained`` reads: ``config.json`` and
    ``diffusion_pytorch_model.safetensors`` (same tensors as the single file)."""
    import json

    from .. import engine

    folder.mkdir(parents=True, exist_ok=True)
    engine.save_tensors_atomically(student_diffusers_state_dict(student, depth, dtype),
                                   folder / "diffusion_pytorch_model.safetensors", {"format": "pt"})
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(diffusers_config(student), indent=2) + "\n")
    tmp.replace(folder / "config.json")
    return folder
