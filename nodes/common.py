"""What the Apply nodes share: their label in messages and core's way of
attaching a control to conditioning."""

from __future__ import annotations

from typing import Callable


def node_label(cls) -> str:
    """``NodeName #id`` (the id ComfyUI shows on the canvas), or the bare name."""
    uid = cls.hidden.unique_id if cls.hidden else None
    return f"{cls.__name__} #{uid}" if uid else cls.__name__


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
