"""Safe model loading (issue 9.7): no remote code, safetensors unless allowed, no network unless allowed,
model paths resolved and checked.

Real transformers loads of the tiny model (its files copied or symlinked into temporary directories); the
network case runs in a child process against a real local HTTP server standing in for the hub.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from infinipot_ros.engine import EngineConfig
from infinipot_ros.models import load_adapter, resolve
from infinipot_ros.models.qwen2_5_vl import Qwen2_5_VLAdapter

PIXELS = 64 * 28 * 28


def _copy_model(src: str, dst: pathlib.Path, skip=()) -> pathlib.Path:
    """A writable copy of a model directory (every file but ``skip``)."""
    dst.mkdir(parents=True)
    for f in pathlib.Path(src).iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copyfile(f, dst / f.name)
    return dst


def _add_auto_map(model_dir: pathlib.Path, file: str, key: str, sentinel: pathlib.Path) -> None:
    """Point ``file``'s auto_map at a module of the model directory that writes ``sentinel`` when imported."""
    (model_dir / "custom_code.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('remote code ran')\n"
        "from transformers import Qwen2_5_VLProcessor as EvilProcessor, "
        "Qwen2_5_VLForConditionalGeneration as EvilModel, Qwen2_5_VLConfig as EvilConfig\n")
    data = json.loads((model_dir / file).read_text())
    data["auto_map"] = {key: f"custom_code.Evil{key[4:]}"}
    (model_dir / file).write_text(json.dumps(data))


# ------------------------------------------------------------------ remote code
@pytest.mark.parametrize("file,key", [("config.json", "AutoModel"), ("processor_config.json", "AutoProcessor"),
                                      ("config.json", "AutoConfig")])
def test_config_that_needs_remote_code_is_refused(tiny_model_dir, tmp_path, file, key):
    model = _copy_model(tiny_model_dir, tmp_path / "custom")
    sentinel = tmp_path / "ran"
    _add_auto_map(model, file, key, sentinel)
    with pytest.raises(ValueError, match=r"needs remote code \(auto_map \{" + key) as err:
        load_adapter(str(model), device="cpu", dtype="float32", max_pixels=PIXELS)
    assert str(model / file) in str(err.value) and "trust_remote_code=False" in str(err.value)
    assert not sentinel.exists()


def test_adapters_never_run_code_shipped_with_the_model(tiny_model_dir, tmp_path):
    """Below load_adapter's check: the adapter itself loads with trust_remote_code=False (the stock classes)."""
    model = _copy_model(tiny_model_dir, tmp_path / "custom")
    sentinel = tmp_path / "ran"
    _add_auto_map(model, "processor_config.json", "AutoProcessor", sentinel)
    adapter = Qwen2_5_VLAdapter(str(model), max_pixels=PIXELS)
    assert type(adapter.processor).__name__ == "Qwen2_5_VLProcessor"
    assert not sentinel.exists()


# ------------------------------------------------------------------ pickle
@pytest.fixture(scope="module")
def pickle_only_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its weights as pytorch_model.bin only (transformers 5 always writes safetensors from
    save_pretrained, so the state dict is written with torch.save, as older checkpoints were)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = _copy_model(tiny_model_dir, tmp_path_factory.mktemp("pickle") / "bin-only", skip=("model.safetensors",))
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_model_dir, local_files_only=True,
                                                               trust_remote_code=False)
    torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


def test_pickle_only_model_is_refused_without_allow_pickle(pickle_only_dir):
    with pytest.raises(ValueError, match=r"only pickle weights \(pytorch_model.bin\).*model.allow_pickle: true"):
        load_adapter(str(pickle_only_dir), device="cpu", dtype="float32", max_pixels=PIXELS)
    with pytest.raises(ValueError, match="model.allow_pickle"):
        load_adapter(str(pickle_only_dir), device="cpu", dtype="float32",
                     **EngineConfig(model=str(pickle_only_dir), max_pixels=PIXELS).adapter_kwargs())
    # the adapter on its own refuses too (use_safetensors=True)
    with pytest.raises(OSError, match="model.safetensors"):
        Qwen2_5_VLAdapter(str(pickle_only_dir), max_pixels=PIXELS)


def test_pickle_only_model_loads_with_allow_pickle(pickle_only_dir, tiny_adapter):
    kwargs = EngineConfig(model=str(pickle_only_dir), max_pixels=PIXELS, allow_pickle=True).adapter_kwargs()
    assert kwargs["allow_pickle"] is True and kwargs["allow_download"] is False
    adapter = load_adapter(str(pickle_only_dir), device="cpu", dtype="float32", **kwargs)
    mine, ref = adapter.model.state_dict(), tiny_adapter.model.state_dict()
    assert mine.keys() == ref.keys()
    assert all(torch.equal(mine[k], ref[k]) for k in ref)


def test_a_directory_without_weights_is_refused(tiny_model_dir, tmp_path):
    model = _copy_model(tiny_model_dir, tmp_path / "no-weights", skip=("model.safetensors",))
    with pytest.raises(FileNotFoundError, match=rf"{model}: no model weights"):
        load_adapter(str(model), device="cpu", allow_pickle=True)


# ------------------------------------------------------------------ paths
def test_model_path_errors_name_the_path_and_the_parameter(tiny_model_dir, tmp_path):
    missing = tmp_path / "nowhere" / "model"
    with pytest.raises(FileNotFoundError, match=rf"model.id '{missing}': no such directory"):
        load_adapter(str(missing), device="cpu")
    a_file = tmp_path / "weights.safetensors"
    a_file.write_bytes(b"")
    with pytest.raises(NotADirectoryError, match=rf"model.id '{a_file}': is a file, not a model directory"):
        load_adapter(str(a_file), device="cpu")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=rf"model.id '{empty}': no config.json"):
        load_adapter(str(empty), device="cpu")
    relative = "./not/a/model"  # written as a path: never taken for an HF id
    with pytest.raises(FileNotFoundError, match=r"model.id './not/a/model' \(resolved: /.*/not/a/model\)"):
        resolve.resolve_model(relative)


def test_model_paths_are_expanded_and_resolved(tiny_model_dir, tmp_path, monkeypatch):
    real = _copy_model(tiny_model_dir, tmp_path / "home" / "models" / "tiny")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve.resolve_model("~/models/tiny") == str(real)
    link = tmp_path / "current"
    link.symlink_to(real)
    assert resolve.resolve_model(str(link)) == str(real)
    assert resolve.resolve_model(str(real / ".." / "tiny")) == str(real)
    adapter = load_adapter("~/models/tiny", device="cpu", dtype="float32", max_pixels=PIXELS)
    assert adapter.model_id == "~/models/tiny"  # the name the user gave
    assert resolve.looks_like_hf_id("Qwen/Qwen2.5-VL-3B-Instruct") and resolve.looks_like_hf_id("gpt2")
    assert not resolve.looks_like_hf_id("a/b/c") and not resolve.looks_like_hf_id("~/m")


# ------------------------------------------------------------------ network
_CHILD = textwrap.dedent('''
    """Child: a local HTTP server stands in for the hub; report how many requests each load made."""
    import http.server, json, os, sys, threading
    hits = []

    class Hub(http.server.BaseHTTPRequestHandler):
        def _answer(self):
            hits.append(self.path)
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
        do_GET = do_HEAD = _answer
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    os.environ["HF_ENDPOINT"] = f"http://127.0.0.1:{server.server_address[1]}"
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("TRANSFORMERS_OFFLINE", None)
    os.environ["HF_HUB_ETAG_TIMEOUT"] = os.environ["HF_HUB_DOWNLOAD_TIMEOUT"] = "5"
    from infinipot_ros.models import load_adapter

    def attempt(**kw):
        before = len(hits)
        try:
            load_adapter("infinipot-test/not-in-any-cache", device="cpu", **kw)
            error = None
        except Exception as exc:
            error = [type(exc).__name__, isinstance(exc, OSError), str(exc)[:400]]
        return {"requests": len(hits) - before, "error": error}

    out = {"default": attempt(), "no_download": attempt(allow_download=False)}
    os.environ["HF_HUB_OFFLINE"] = "1"
    out["offline_env_wins"] = attempt(allow_download=True)
    del os.environ["HF_HUB_OFFLINE"]
    out["download_allowed"] = attempt(allow_download=True)
    print(json.dumps(out))
''')


def test_no_network_unless_allow_download(tmp_path):
    """allow_download=False (the default) -> local_files_only=True: an HF id missing from the cache is an OSError
    and the hub is never contacted; HF_HUB_OFFLINE=1 keeps it offline even when allowed; allowed -> it asks."""
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_CACHE=str(tmp_path / "hf" / "hub"))
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in ("default", "no_download", "offline_env_wins"):
        assert out[case]["requests"] == 0, (case, out[case])
        name, is_os_error, message = out[case]["error"]
        assert is_os_error, (case, out[case])
        assert "infinipot-test/not-in-any-cache" in message and "model.allow_download" in message, message
    assert out["download_allowed"]["requests"] >= 1, out["download_allowed"]
    assert out["download_allowed"]["error"] is not None  # the stand-in hub has no such model
