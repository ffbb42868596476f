"""What the Apply nodes share: their label in messages and core's way of
attaching a control to conditioning."""

from __future__ import annotations

from typing import Callable

from comfy_api.latest import io

# What an Apply node asks ComfyUI for to name itself (node_label).
LABEL_HIDDEN = [io.Hidden.unique_id, io.Hidden.prompt, io.Hidden.extra_pnginfo]
# Loader inputs that name the file a CONTROL_NET / CONTROLNEXT came from, and how a
# control passes through nodes in between (e.g. core's SetUnionControlNetType).
FILE_INPUTS = ("control_net_name", "control_file")
PASS_THROUGH_INPUTS = ("control_net", "controlnext")
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")


def node_label(cls, source_input: str | None = None) -> str:
    """The node as the user sees it: its title on the canvas (the saved workflow ComfyUI
    hands over as ``extra_pnginfo``, else the title in the API prompt's ``_meta``), else its
    display name, then ``#id``; and, where ``source_input`` comes from a loader in the same
    prompt, the file it loaded, e.g. ``ControlNet: canny #8 (control_v11p_sd15_canny)``."""
    hidden = cls.hidden
    uid = None if hidden is None else hidden.unique_id
    prompt = None if hidden is None else hidden.prompt
    title = (_workflow_title(None if hidden is None else hidden.extra_pnginfo, uid)
             or _prompt_title(prompt, uid) or display_name(cls))
    label = f"{title} #{uid}" if uid else title
    source = loaded_file(prompt, uid, source_input) if source_input else None
    return f"{label} ({source})" if source else label


def display_name(cls) -> str:
    """The schema's display name (V3 runs a clone of the class, so its ``__name__`` is no name)."""
    schema = getattr(cls, "SCHEMA", None) or cls.define_schema()
    return schema.display_name or schema.node_id


def _workflow_title(extra_pnginfo, uid) -> str | None:
    """The node's title in the saved workflow. Inside a subgraph the id is the path of
    node ids (``"12:3"``): each outer node's ``type`` names the subgraph definition
    (``workflow["definitions"]["subgraphs"]``) holding the next one."""
    workflow = extra_pnginfo.get("workflow") if isinstance(extra_pnginfo, dict) else None
    if uid is None or not isinstance(workflow, dict):
        return None
    definitions = (workflow.get("definitions") or {}).get("subgraphs") or []
    subgraphs = {d.get("id"): d for d in definitions if isinstance(d, dict)}
    nodes = workflow.get("nodes")
    node = None
    for i, part in enumerate(str(uid).split(":")):
        if i:
            sub = subgraphs.get(node.get("type"))
            nodes = sub.get("nodes") if isinstance(sub, dict) else None
        if not isinstance(nodes, list):
            return None
        node = next((n for n in nodes if isinstance(n, dict) and str(n.get("id")) == part), None)
        if node is None:
            return None
    title = node.get("title")
    return title if isinstance(title, str) and title.strip() else None


def _prompt_title(prompt, uid) -> str | None:
    node = prompt.get(str(uid)) if isinstance(prompt, dict) and uid is not None else None
    meta = node.get("_meta") if isinstance(node, dict) else None
    title = meta.get("title") if isinstance(meta, dict) else None
    return title if isinstance(title, str) and title.strip() else None


def loaded_file(prompt, uid, input_name: str, max_hops: int = 8) -> str | None:
    """The file name (without its weight suffix) of the loader that ``input_name`` of node
    ``uid`` is linked to in ``prompt`` (through pass-through nodes), or None."""
    node = prompt.get(str(uid)) if isinstance(prompt, dict) and uid is not None else None
    link = (node.get("inputs") or {}).get(input_name) if isinstance(node, dict) else None
    for _ in range(max_hops):
        if not (isinstance(link, (list, tuple)) and len(link) == 2):
            return None
        src = prompt.get(str(link[0]))
        inputs = src.get("inputs") if isinstance(src, dict) else None
        if not isinstance(inputs, dict):
            return None
        for key in FILE_INPUTS:
            name = inputs.get(key)
            if isinstance(name, str) and name:
                for suffix in WEIGHT_SUFFIXES:
                    if name.lower().endswith(suffix):
                        return name[: -len(suffix)]
                return name
        link = next((inputs[k] for k in PASS_THROUGH_INPUTS if k in inputs), None)
    return None


def attach_controls(positive, negative, make_control: Callable | None, update_extra: Callable | None = None):
    """(positive, negative) with a new control on every entry, as core's Apply
    ControlNet does: the new control is chained after the entry's previous one,
    and entries that shared a previous control share the new one.
    ``make_control()`` builds one (None attaches nothing); ``update_extra(index,
    extra)`` may add keys to an entry's dict (index 0 positive, 1 negative)."""
    created = {}
    out = []
    for index, conditioning in enumerate((positive, negative)):
        new = []
        for cond, extra in conditioning:
            extra = extra.copy()
            if make_control is not None:
                prev = extra.get("control", None)
                if prev not in created:
                    control = make_control()
                    control.set_previous_controlnet(prev)
                    created[prev] = control
                extra["control"] = created[prev]
                extra["control_apply_to_uncond"] = False
            if update_extra is not None:
                update_extra(index, extra)
            new.append([cond, extra])
        out.append(new)
    return out[0], out[1]
