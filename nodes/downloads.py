"""BalancedControl Download: fetch a released file of the built-in table into
its ComfyUI models folder, verified by sha256.

Thin V3 schema; the logic lives in ``model_patches.hub_download``.
"""

from __future__ import annotations

import comfy.utils
from comfy_api.latest import io

from model_patches import hub_download, hub_table
from .common import node_label


class BalancedControlDownload(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="BalancedControlDownload",
            display_name="BalancedControl Download",
            category="conditioning/controlnet/balanced",
            description=(
                "Download a released weight file (official ControlNeXt modules and UNet subsets, the SD3 "
                "inpainting ControlNet) from the Hugging Face Hub into the models folder its loader reads, and "
                "check its sha256. A file already there and verified is not fetched again. HF_TOKEN and "
                "HF_ENDPOINT are honoured. Refresh the loader's file list afterwards (press R)."
            ),
            inputs=[
                io.Combo.Input("name", options=sorted(hub_table.TABLE),
                               tooltip="The table entry; python -m training download --list describes them."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace a file at the target path whose checksum differs "
                                         "(e.g. an older release)."),
            ],
            outputs=[io.String.Output(display_name="file",
                                      tooltip="The file's name in its models folder (as the loader lists it).")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, name, overwrite=False):
        # Run again when the file was removed or changed since the last run.
        try:
            entry = hub_table.TABLE[name]
            st = hub_download.target_path(entry, hub_download.comfy_folder(entry.folder)).stat()
            return (name, st.st_size, st.st_mtime_ns)
        except (KeyError, OSError):
            return (name, None)

    @classmethod
    def execute(cls, name, overwrite=False) -> io.NodeOutput:
        label = node_label(cls)
        try:
            entry = hub_table.lookup(name)
        except KeyError as exc:
            raise ValueError(f"{label}: {exc.args[0]}") from None
        uid = cls.hidden.unique_id if cls.hidden else None
        bar = comfy.utils.ProgressBar(1, node_id=uid)
        try:
            hub_download.download(entry, hub_download.comfy_folder(entry.folder), force=bool(overwrite),
                                  progress=lambda done, total: bar.update_absolute(done, total or None),
                                  log=lambda msg: print(f"[{label}] {msg}"))
        except hub_download.DownloadError as exc:
            raise RuntimeError(f"{label}: {exc}") from None
        return io.NodeOutput(entry.relative_path, ui={"text": [f"{entry.folder}: {entry.relative_path}"]})


NODES = [BalancedControlDownload]
