"""Downloads of released weights through huggingface_hub, against a mock Hub
on 127.0.0.1 (tests/hub_mock.py) that huggingface_hub is pointed at per call.

The files served are small synthetic ones under the built-in table's names,
with their own sha256 in an injected test table (the real table's checksums
are never faked)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch

from model_patches import hub_download as hd
from model_patches import hub_table as ht
from hub_mock import COMMIT, MockHub

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20
NAME = "controlnext-svd-v2"           # real name, repo and path; synthetic bytes
BIG = "controlnext-sdxl-anime-canny-unet"


@pytest.fixture
def hub():
    mock = MockHub()
    yield mock
    mock.close()


def serve(hub: MockHub, name: str, data: bytes) -> ht.HubFile:
    """The real entry's repo/path/folder with the synthetic file's sha256 and
    size, pinned to the mock's commit."""
    real = ht.TABLE[name]
    sha = hub.add(real.repo_id, real.filename, data)
    return dataclasses.replace(real, revision=COMMIT, sha256=sha, size=len(data))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def random_bytes(n: int, seed: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8) \
        .numpy().tobytes()


def test_table_is_well_formed():
    from model_patches.controlnext import FOLDER_NAME

    assert len(ht.TABLE) >= 8
    for e in ht.TABLE.values():
        assert e.folder in {FOLDER_NAME, "controlnet", "diffusion_models"}, e
        assert e.revision == "main" or len(e.revision) == 40, e
        assert Path(e.filename).suffix in {".safetensors", ".bin"}, e
    controlnext = [e for e in ht.TABLE.values() if e.name.startswith("controlnext-") and "comfy" not in e.name]
    assert all(e.folder == FOLDER_NAME and e.repo_id == ht.CONTROLNEXT_REPO for e in controlnext)
    assert ht.TABLE["sd3-inpainting-controlnet"].folder == "controlnet"
    with pytest.raises(ValueError, match="64 lowercase hex"):
        dataclasses.replace(ht.TABLE[NAME], sha256="abc")
    with pytest.raises(ValueError, match="without '..'"):
        dataclasses.replace(ht.TABLE[NAME], filename="../escape.bin")


def test_download_verifies_and_repeat_makes_no_request(hub, tmp_path):
    data = random_bytes(300_000, 1)
    entry = serve(hub, NAME, data)
    seen = []
    path = hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint,
                       progress=lambda d, t: seen.append((d, t)), log=lambda m: None)
    assert path == tmp_path / "controlnext" / "ControlNeXt-SVD" / "v2" / "controlnet.bin"
    assert path.read_bytes() == data
    assert [m for m, _, _ in hub.requests] == ["HEAD", "HEAD", "GET"]   # ETag check, then the download
    assert seen[-1] == (len(data), len(data))
    hub.set_mode("normal")
    assert hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, log=lambda m: None) == path
    assert hub.requests == []   # verified marker: no request, no re-hash needed


def test_interrupted_download_resumes(hub, tmp_path):
    """A connection dropped past the first 10 MiB chunk: the download goes on
    from the bytes already written (huggingface_hub ≥ 1.20 inside the call,
    ≤ 1.17 in the next call of the retry loop)."""
    data = random_bytes(12 * MiB, 2)
    entry = serve(hub, BIG, data)
    hub.set_mode("drop", drop_at=11 * MiB, drop_count=1)
    logs = []
    path = hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, log=logs.append, backoff_s=0)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == entry.sha256
    ranges = [h.get("range") for h in hub.gets()]
    version = hd.hub_version()
    if (1, 18) <= version < (1, 20):
        assert ranges == [None, None], ranges     # these versions restart from 0
    else:
        assert ranges == [None, f"bytes={10 * MiB}-"], ranges
    assert hd.partial_files(entry, tmp_path / "controlnext") == []


def test_retry_loop_outlasts_the_library_retries(hub, tmp_path):
    """More drops in a row than huggingface_hub retries inside one call: the
    caller's loop makes another call and succeeds."""
    data = random_bytes(2 * MiB, 3)
    entry = serve(hub, NAME, data)
    hub.set_mode("drop", drop_at=MiB, drop_count=6)
    logs = []
    path = hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, tries=3, log=logs.append,
                       backoff_s=0)
    assert path.read_bytes() == data
    assert len(hub.gets()) >= 7
    assert any("attempt 1/3 failed" in m and "connection" in m for m in logs), logs


def test_checksum_mismatch_is_refused_and_nothing_is_left(hub, tmp_path):
    data = random_bytes(200_000, 4)
    entry = serve(hub, NAME, data)
    hub.set_mode("corrupt")
    root = tmp_path / "models"
    with pytest.raises(hd.DownloadError) as err:
        hd.download(entry, root / "controlnext", endpoint=hub.endpoint, log=lambda m: None)
    received = hashlib.sha256(bytes([data[0] ^ 0xFF]) + data[1:]).hexdigest()
    assert f"received {received}" in str(err.value) and f"expected {entry.sha256}" in str(err.value)
    assert files_under(root) == []
    assert not (root / "controlnext" / "ControlNeXt-SVD").exists()


def test_hub_announcing_another_file_is_refused_before_the_transfer(hub, tmp_path):
    entry = serve(hub, BIG, random_bytes(12 * MiB, 12))
    stale = dataclasses.replace(entry, sha256=hashlib.sha256(b"the table's file").hexdigest())
    with pytest.raises(hd.DownloadError, match=f"announces .* as sha256 {entry.sha256}.*table expects "
                                               f"{stale.sha256}.*Not downloaded"):
        hd.download(stale, tmp_path / "controlnext", endpoint=hub.endpoint, log=lambda m: None)
    assert hub.gets() == []
    assert files_under(tmp_path) == []


def test_html_page_instead_of_the_hub_is_reported(hub, tmp_path):
    entry = serve(hub, NAME, random_bytes(1000, 5))
    hub.set_mode("html")
    with pytest.raises(hd.DownloadError, match="not a Hub file.*HTML page"):
        hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, log=lambda m: None)
    assert files_under(tmp_path) == []


def test_html_body_with_the_right_size_is_reported(hub, tmp_path):
    entry = serve(hub, NAME, random_bytes(5000, 6))
    hub.set_mode("get_html")
    with pytest.raises(hd.DownloadError, match="sha256 mismatch.*HTML/XML page instead of the file"):
        hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, log=lambda m: None)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize("mode, message", [("404", "HTTP 404"), ("404entry", "no such file"),
                                           ("401repo", "repository not found")])
def test_hub_errors_are_named(hub, tmp_path, mode, message):
    entry = serve(hub, NAME, random_bytes(1000, 7))
    hub.set_mode(mode)
    with pytest.raises(hd.DownloadError, match=message) as err:
        hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, tries=2, log=lambda m: None,
                    backoff_s=0)
    assert "after 1 attempt" in str(err.value)   # not retried
    assert entry.repo_id in str(err.value) and hub.endpoint in str(err.value)
    assert files_under(tmp_path) == []


def test_offline_mode_is_reported_and_orphans_are_cleared(hub, tmp_path, monkeypatch):
    import huggingface_hub.constants

    entry = serve(hub, NAME, random_bytes(1000, 11))
    folder = tmp_path / "controlnext"
    meta, _, (parent, _) = hd._hf_paths(entry, folder)
    parent.mkdir(parents=True)
    short = base64.urlsafe_b64encode(hashlib.sha1(meta.name.encode()).digest()).decode()
    old, fresh = (parent / f"{short}.{entry.sha256}.{uid}.incomplete" for uid in ("aaaa1111", "bbbb2222"))
    for p in (old, fresh):
        p.write_bytes(b"partial")
    os.utime(old, (0, 0))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hd.DownloadError, match="offline mode"):
        hd.download(entry, folder, endpoint=hub.endpoint, log=lambda m: None, backoff_s=0)
    assert hub.requests == []
    if hd.resumes_across_calls():
        assert old.exists() and fresh.exists()     # the next call resumes them
    else:
        assert not old.exists() and fresh.exists()  # a stale orphan goes; a live download elsewhere stays


def test_existing_different_file_needs_force(hub, tmp_path):
    data = random_bytes(1000, 8)
    entry = serve(hub, NAME, data)
    target = hd.target_path(entry, tmp_path)
    target.parent.mkdir(parents=True)
    target.write_bytes(b"x" * 1000)
    with pytest.raises(hd.DownloadError, match="exists but is not the table's file.*--force"):
        hd.download(entry, tmp_path, endpoint=hub.endpoint, log=lambda m: None)
    assert target.read_bytes() == b"x" * 1000 and hub.requests == []
    hd.download(entry, tmp_path, endpoint=hub.endpoint, force=True, log=lambda m: None)
    assert target.read_bytes() == data


def test_comfyui_cancel_is_not_swallowed(hub, tmp_path):
    """ComfyUI's Cancel raises InterruptProcessingException out of the progress
    hook: it stops the download at once (no retry) and no file is kept."""
    import comfy.model_management as mm

    entry = serve(hub, BIG, random_bytes(12 * MiB, 10))

    def cancel(done, total):
        if done:
            raise mm.InterruptProcessingException()

    if hd.hub_version() < (1, 1):
        pytest.fail("huggingface_hub < 1.1 has no tqdm_class: progress and Cancel are not wired")
    with pytest.raises(mm.InterruptProcessingException):
        hd.download(entry, tmp_path / "controlnext", endpoint=hub.endpoint, progress=cancel, log=lambda m: None)
    assert len(hub.gets()) == 1
    assert not hd.target_path(entry, tmp_path / "controlnext").exists()


def test_cli_unknown_name_lists_the_known_ones(tmp_path, capsys):
    from training.__main__ import main

    assert main(["download", "controlnext-sdxl-canny", "--models-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "no downloadable file called 'controlnext-sdxl-canny'" in err
    for name in ht.TABLE:
        assert name in err
    assert main(["download", "--list"]) == 0
    assert "alimama-creative/SD3-Controlnet-Inpainting" in capsys.readouterr().out


def test_cli_honours_hf_endpoint_and_hf_token(hub, tmp_path):
    """The command in a fresh process, with HF_ENDPOINT and HF_TOKEN in its
    environment and the Hub's redirect to another origin (the CDN): the token
    reaches the Hub, not the CDN."""
    data = random_bytes(100_000, 9)
    entry = serve(hub, "sd3-inpainting-controlnet", data)
    table = tmp_path / "table.json"
    table.write_text(json.dumps([dataclasses.asdict(entry)]))
    hub.set_mode("redirect")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN="hf_mocktoken", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_DISABLE_TELEMETRY="1")
    out = subprocess.run([sys.executable, "-m", "training", "download", entry.name, "--table", str(table),
                          "--models-dir", str(tmp_path / "models")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    path = tmp_path / "models" / "controlnet" / "SD3-Controlnet-Inpainting" / "diffusion_pytorch_model.safetensors"
    assert path.read_bytes() == data
    heads = [h for m, _, h in hub.requests if m == "HEAD"]
    (get,) = hub.gets()
    assert heads and all(h["authorization"] == "Bearer hf_mocktoken" for h in heads)
    assert "authorization" not in get
    assert "controlnet / SD3-Controlnet-Inpainting/diffusion_pytorch_model.safetensors" in out.stdout


def test_node_fetches_into_the_folder_the_controlnext_loader_reads(hub, tmp_path, monkeypatch):
    """The node on ComfyUI's runtime: the file lands in models/controlnext,
    the Load ControlNeXt node lists and loads it, and ComfyUI's progress hook
    saw the byte counts for this node."""
    import comfy.utils
    import folder_paths
    from controlnext_reference import synthetic_state_dict

    from balanced_control.nodes.controlnext import ControlNeXtLoader
    from balanced_control.nodes.downloads import BalancedControlDownload

    module = tmp_path / "module.safetensors"
    safetensors.torch.save_file(synthetic_state_dict("320", seed=3, dtype=torch.float16), str(module))
    entry = serve(hub, "controlnext-sdxl-anime-canny", module.read_bytes())
    monkeypatch.setitem(ht.TABLE, entry.name, entry)
    folder = tmp_path / "models" / "controlnext"
    paths, exts = folder_paths.folder_names_and_paths["controlnext"]
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "controlnext", ([str(folder)], exts))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)   # read at call time, not at import
    calls = []
    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", lambda v, t, p, node_id=None: calls.append((v, t, node_id)))

    import asyncio
    import balanced_control

    nodes = asyncio.run(asyncio.run(balanced_control.comfy_entrypoint()).get_node_list())
    assert BalancedControlDownload in nodes
    BalancedControlDownload.VALIDATE_CLASS()
    info = BalancedControlDownload.GET_NODE_INFO_V1()
    assert info["output_node"] and info["input"]["required"]["name"][1]["options"] == sorted(ht.TABLE)

    out = BalancedControlDownload.execute(name=entry.name)
    assert out.result == ("ControlAny-SDXL/anime_canny/controlnet.safetensors",)
    assert calls and calls[-1][:2] == (entry.size, entry.size)
    assert entry.relative_path in folder_paths.get_filename_list("controlnext")
    weights = ControlNeXtLoader.execute(control_file=entry.relative_path).result[0]
    assert weights.layout == "320"

    with pytest.raises(ValueError, match="no downloadable file called 'nope'; known names: .*controlnext-svd-v2"):
        BalancedControlDownload.execute(name="nope")


def test_cli_help_explains_every_option():
    import argparse

    from training.__main__ import SUBCOMMANDS

    out = subprocess.run([sys.executable, "-m", "training", "download", "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    parser = argparse.ArgumentParser()
    SUBCOMMANDS["download"][1](parser)
    for action in parser._actions:
        assert action.help, f"download: {action.dest} has no help"
        assert (action.option_strings or [action.metavar])[0] in out.stdout


def test_node_in_a_comfyui_server_refuses_bytes_that_are_not_the_release(hub, tmp_path, monkeypatch):
    """ComfyUI's own server, HF_ENDPOINT in its environment pointing at the
    mock, the real table: the mock's synthetic bytes are not the released file,
    so the prompt fails with the checksum message and models/controlnext stays
    empty; an HTML portal is reported as such."""
    from headless.server import ComfyServer

    real = ht.TABLE[NAME]
    hub.add(real.repo_id, real.filename, random_bytes(5000, 13))
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    base = tmp_path / "comfy"
    prompt = {"1": {"class_type": "BalancedControlDownload", "inputs": {"name": NAME}}}
    with ComfyServer(base, extra_args=["--cache-none"]) as srv:
        info = srv.get_json("/object_info/BalancedControlDownload")["BalancedControlDownload"]
        assert info["output_node"] and NAME in info["input"]["required"]["name"][1]["options"]
        with pytest.raises(RuntimeError, match="announces .*the table expects " + real.sha256):
            srv.run(prompt, timeout=120)
        hub.set_mode("html")
        with pytest.raises(RuntimeError, match="not a Hub file"):
            srv.run(prompt, timeout=120)
    assert files_under(base / "models" / "controlnext") == []
