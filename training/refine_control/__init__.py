"""``python -m training refine-control``: distil an SD3 inpainting ControlNet
into a shallower student (Refine-Control), and ``refine-control-eval``.

Teacher: any SD3 ControlNet file ComfyUI loads (the 23-layer 17-channel
inpainting one included). Base: an SD3 single-file checkpoint ComfyUI loads.
The student (N layers, default 12) starts from the base transformer's first N
joint blocks and embedders plus the teacher's conditioning embedder
(``pos_embed_input``); its output projections start at zero.

Stage 1 (labelled data): w_task·L_task + w_kd·L_kd + w_af·L_af.
Stage 2 (unlabelled masked images): w_kd·L_kd + w_af·L_af; the noisy input is
built from the image itself. Losses: ``model_patches/refine_control.py``.

Data (JSONL, paths relative to the file; or a folder with metadata.jsonl)::

    {"image": "img/0001.png", "mask": "mask/0001.png", "prompt": "a cat",
     "local_prompt": "a cat's head"}

``mask`` is white where to inpaint. Items whose mask is missing or unreadable
are reported and skipped (never trained as unmasked).
"""


from __future__ import annotations

from .cli import DESCRIPTION, EVAL_HELP, HELP, add_arguments, add_eval_arguments  # noqa: F401


def run(args) -> int:
    from .trainer import run as run_training

    return run_training(args)


def run_eval(args) -> int:
    from .evaluation import run_eval as run_evaluation

    return run_evaluation(args)
