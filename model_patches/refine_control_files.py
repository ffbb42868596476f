"""Refine-Control student files: the conventions they were trained with.

``python -m training refine-control`` writes, in the safetensors header of
the student, the inpainting ``convention``, the block ``wiring``, the number
of ControlNet ``layers`` and the base ``depth`` (transformer blocks) it was
trained for. ``load_refine_control`` loads a file with ComfyUI's own loader
and attaches what the header says to the returned CONTROL_NET; the Apply
node's ``auto`` choices then follow the file, and an explicit choice that
contradicts the file is an error naming both. Files without these keys
(third-party ControlNets, the public teacher) take the explicit choices, and
``auto`` falls back to the defaults (the public teacher's conventions).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

from .refine_control import BLOCK_MAPS, CONVENTIONS

log = logging.getLogger(__name__)

AUTO = "auto"
DEFAULT_CONVENTION = "diffusers"
DEFAULT_WIRING = "diffusers_0.29"
# Attribute of a loaded CONTROL_NET holding the file's Refine-Control metadata (a dict).
METADATA_ATTR = "balanced_control_refine_metadata"
METADATA_KEYS = ("convention", "wiring", "layers", "depth")


@dataclasses.dataclass(frozen=True)
class RefineSettings:
    convention: str
    wiring: str
    depth: int | None      # base blocks the file was trained for, when it says so


def read_metadata(path: str | Path) -> dict:
    """The Refine-Control keys of a safetensors header ({} for other files)."""
    path = Path(path)
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: meta[k] for k in METADATA_KEYS if k in meta}


def check_metadata(meta: dict, n_layers: int, label: str) -> dict:
    """Validated metadata: known convention and wiring, integer layers/depth, layers matching the file."""
    out = dict(meta)
    if "convention" in out and out["convention"] not in CONVENTIONS:
        raise ValueError(f"{label}: the file says convention {out['convention']!r}, expected one of "
                         f"{list(CONVENTIONS)}; the file is damaged or from a newer version.")
    if "wiring" in out and out["wiring"] not in BLOCK_MAPS:
        raise ValueError(f"{label}: the file says wiring {out['wiring']!r}, expected one of {list(BLOCK_MAPS)}; "
                         f"the file is damaged or from a newer version.")
    for key in ("layers", "depth"):
        if key in out:
            try:
                out[key] = int(out[key])
            except ValueError:
                raise ValueError(f"{label}: the file's {key} metadata is {out[key]!r}, expected an integer.") from None
    if "layers" in out and out["layers"] != n_layers:
        raise ValueError(f"{label}: the file says {out['layers']} layers but holds {n_layers} ControlNet layers; "
                         f"the file is damaged.")
    return out


def load_refine_control(path: str | Path, label: str = "RefineControlLoader"):
    """A CONTROL_NET loaded by ComfyUI's loader, with the file's Refine-Control
    metadata attached (an empty dict for files without it)."""
    import comfy.controlnet

    from .refine_control_runtime import sd3_control_model

    control = comfy.controlnet.load_controlnet(str(path))
    if control is None:
        raise ValueError(f"{label}: ComfyUI does not recognise {Path(path).name} as a ControlNet.")
    model = sd3_control_model(control, label)
    setattr(control, METADATA_ATTR, check_metadata(read_metadata(path), len(model.joint_blocks), label))
    return control


def resolve_settings(control, convention: str, wiring: str, label: str) -> RefineSettings:
    """Convention and wiring for a control: ``auto`` takes the file's value
    (or the default for files without one); an explicit value must agree
    with the file's."""
    meta = getattr(control, METADATA_ATTR, None) or {}
    chosen = {}
    sources = []
    for key, value, default, options in (("convention", convention, DEFAULT_CONVENTION, CONVENTIONS),
                                         ("wiring", wiring, DEFAULT_WIRING, BLOCK_MAPS)):
        if value != AUTO and value not in options:
            raise ValueError(f"{label}: {key} must be {AUTO!r} or one of {list(options)}, got {value!r}.")
        stored = meta.get(key)
        if value == AUTO:
            chosen[key] = stored if stored is not None else default
            sources.append(f"{key} {chosen[key]} from the file" if stored is not None else
                           f"{key} {default} (default: the file does not say)")
        else:
            if stored is not None and stored != value:
                raise ValueError(f"{label}: {key} {value!r} was chosen, but the file was trained with {key} "
                                 f"{stored!r}. Choose {stored!r} or 'auto'.")
            chosen[key] = value
            sources.append(f"{key} {value} (chosen)")
    if AUTO in (convention, wiring) and not meta:
        log.info("%s: the ControlNet carries no Refine-Control metadata (third-party file, or not loaded with "
                 "RefineControlLoader); using %s", label, ", ".join(sources))
    return RefineSettings(chosen["convention"], chosen["wiring"], meta.get("depth"))
