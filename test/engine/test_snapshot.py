"""Memory snapshots on the real tiny model: exact restore, same answers and logits, same stream afterwards, refusals."""
from __future__ import annotations

import json
import os
import shutil
import struct
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from infinipot_ros.engine import EngineConfig, StreamingAssistant
from infinipot_ros.engine import snapshot as snap
from infinipot_ros.engine.snapshot import (
    SNAPSHOT_FORMAT_VERSION, SnapshotError, SnapshotInfo, load_snapshot, read_snapshot_header, save_snapshot,
    snapshot_info,
)

M = 120  # vision tokens at the cap: 54-token patches compress from the 3rd patch on
QUESTION = "What is happening?"
ANSWER_TOKENS = 8


def _engine(adapter, model_dir, **kw):
    kw.setdefault("max_pixels", 64 * 28 * 28)
    kw.setdefault("policy", "infinipot_v")
    kw.setdefault("max_vision_tokens", M)
    return StreamingAssistant(EngineConfig(model=model_dir, device="cpu", dtype="float32", **kw), adapter=adapter)


def _feed(engine, frames, stamps, camera):
    return [engine.ingest(camera, f, s) for f, s in zip(frames, stamps)]


def _before_save(engine, frames, stamps):
    """Two cameras, 5 patches (270 vision tokens into M = 120: 3 compressions), no unpaired frame left."""
    _feed(engine, frames[:8], stamps[:8], "front")
    _feed(engine, frames[8:10], stamps[8:10], "rear")


def _after_save(engine, frames, stamps):
    """3 more patches of both cameras, "rear" first (camera indices must come from the snapshot); what they did,
    per frame (timings excluded)."""
    res = _feed(engine, frames[10:12], stamps[10:12], "rear") + _feed(engine, frames[12:16], stamps[12:16], "front")
    return [(r.camera, r.stamp_ns, str(r.status), r.chunk_tokens, r.error,
             None if r.compression is None else (r.compression.before, r.compression.after,
                                                 r.compression.chunks_dropped)) for r in res]


def question_logits(adapter, cache, question):
    """[n, vocab] float32 logits of the question's scratch tokens, prefilled as ``adapter.generate`` does.

    The last row is the distribution of the answer's first token. Runs in a scratch block,
    so the cache is unchanged afterwards (uses the adapter's internal one-forward helper).
    """
    ids = adapter.question_ids(question)
    start = adapter.next_text_position(cache)
    with torch.inference_mode(), cache.scratch():
        embeds = adapter.model.get_input_embeddings()(torch.tensor(ids))
        pos = (torch.arange(len(ids)) + start).expand(3, -1)
        return adapter._forward(cache, embeds, pos, logits="all").clone()


def answer_ids(adapter, cache, question=QUESTION):
    return adapter.generate(cache, question, max_new_tokens=ANSWER_TOKENS).token_ids


def _assert_same_state(a, b, timing=True):
    assert sorted(a) == sorted(b)
    for name in a:
        x, y = a[name], b[name]
        if name == "last_compression" and not timing:  # wall time of a compression
            x, y = x[[0, 1, 3]], y[[0, 1, 3]]
        assert x.dtype == y.dtype and torch.equal(x, y), f"{name} differs"


def _memory(engine):
    """Everything a refused load must leave alone."""
    return (engine.cache, engine.cache.state_dict(), dict(engine._cameras), engine._origin_ns,
            dict(engine._pending))


def _assert_memory_unchanged(engine, before):
    cache, state, cameras, origin, pending = before
    assert engine.cache is cache
    _assert_same_state(engine.cache.state_dict(), state)
    assert engine._cameras == cameras and engine._origin_ns == origin
    assert engine._pending.keys() == pending.keys()


@pytest.fixture(scope="module")
def reference(tiny_adapter, tiny_model_dir, vtest_frames, tmp_path_factory):
    """One stream saved half-way, with what it answered at the save and what it did after it."""
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir)
    _before_save(engine, frames, stamps)
    assert engine.cache.compressions >= 3
    path = str(tmp_path_factory.mktemp("snapshots") / "memory.safetensors")
    ref = SimpleNamespace(path=path, info=save_snapshot(engine, path))
    ref.state = engine.cache.state_dict()
    ref.cameras, ref.origin_ns = dict(engine._cameras), engine._origin_ns
    ref.compressions = engine.cache.compressions
    ref.logits = question_logits(tiny_adapter, engine.cache, QUESTION)
    ref.answer_ids = answer_ids(tiny_adapter, engine.cache)
    ref.answer = engine.ask(QUESTION, max_new_tokens=ANSWER_TOKENS).answer
    _assert_same_state(engine.cache.state_dict(), ref.state)  # asking left the cache as it was
    ref.after_results = _after_save(engine, frames, stamps)
    ref.after_state = engine.cache.state_dict()
    ref.after_logits = question_logits(tiny_adapter, engine.cache, QUESTION)
    ref.after_answer_ids = answer_ids(tiny_adapter, engine.cache)
    assert engine.cache.compressions >= ref.compressions + 3
    return ref


def test_save_writes_one_safetensors_file_with_header(reference, tiny_adapter):
    info = reference.info
    assert isinstance(info, SnapshotInfo) and info.path == reference.path
    assert info.vision_tokens == int(reference.state["vision_length"]) <= M
    assert info.frames == int(reference.state["table.num_frames"].sum())  # frames with tokens left
    assert 0 < info.frames <= 10
    assert os.listdir(os.path.dirname(reference.path)) == ["memory.safetensors"]  # no temp file left
    header = read_snapshot_header(reference.path)
    assert header["format_version"] == SNAPSHOT_FORMAT_VERSION == 1
    assert header["model_id"] == tiny_adapter.model_id
    assert header["dtype"] == "float32"
    assert header["cameras"] == {"front": 0, "rear": 1} == reference.cameras
    assert header["origin_ns"] == reference.origin_ns
    assert header["frames"] == info.frames and header["vision_tokens"] == info.vision_tokens
    assert header["pending_dropped"] == []
    assert len(header["config_hash"]) == 64
    with safe_open(reference.path, framework="pt") as f:
        names = set(f.keys())
    assert names == {"kv." + k for k in reference.state} == set(header["tensors"])
    assert snapshot_info(reference.path) == info


def test_load_restores_every_tensor_and_the_same_answers(reference, tiny_adapter, tiny_model_dir):
    engine = _engine(tiny_adapter, tiny_model_dir)
    assert engine.cache.vision_length == 0
    info = load_snapshot(engine, reference.path)
    assert info == reference.info
    _assert_same_state(engine.cache.state_dict(), reference.state)  # (a) every tensor, bit for bit
    assert engine._cameras == reference.cameras and engine._origin_ns == reference.origin_ns
    assert engine.cache.compressions == reference.compressions
    assert engine.cache.stats().vision_tokens <= M
    logits = question_logits(tiny_adapter, engine.cache, QUESTION)  # (b) same logits, same tokens
    assert torch.equal(logits, reference.logits)
    assert answer_ids(tiny_adapter, engine.cache) == reference.answer_ids
    assert len(reference.answer_ids) > 0
    assert engine.ask(QUESTION, max_new_tokens=ANSWER_TOKENS).answer == reference.answer


def test_streaming_after_load_is_what_streaming_without_it_gives(reference, tiny_adapter, tiny_model_dir,
                                                                vtest_frames):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir)
    load_snapshot(engine, reference.path)
    assert _after_save(engine, frames, stamps) == reference.after_results  # (c)
    _assert_same_state(engine.cache.state_dict(), reference.after_state, timing=False)
    assert torch.equal(question_logits(tiny_adapter, engine.cache, QUESTION), reference.after_logits)
    assert answer_ids(tiny_adapter, engine.cache) == reference.after_answer_ids


def test_smaller_budget_compresses_on_load(reference, tiny_adapter, tiny_model_dir):
    engine = _engine(tiny_adapter, tiny_model_dir, max_vision_tokens=60)  # budget is not in the config hash
    load_snapshot(engine, reference.path)
    assert engine.cache.vision_length == engine.cache.target_vision_tokens == 45
    assert engine.cache.compressions == reference.compressions + 1
    assert engine.ask(QUESTION, max_new_tokens=2).generated_tokens >= 0


def test_unpaired_frame_is_dropped_and_named(tiny_adapter, tiny_model_dir, vtest_frames, tmp_path, monkeypatch):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir)
    _feed(engine, frames[:3], stamps[:3], "front")  # the 3rd waits for its pair
    path = tmp_path / "m.safetensors"
    monkeypatch.chdir(tmp_path)
    assert save_snapshot(engine, "m.safetensors").path == str(path)  # relative in, absolute out
    assert read_snapshot_header(path)["pending_dropped"] == ["front"]
    other = _engine(tiny_adapter, tiny_model_dir)
    _feed(other, frames[:1], stamps[:1], "side")
    assert other._pending
    load_snapshot(other, path)
    assert not other._pending and other._cameras == {"front": 0}


def test_save_overwrites_atomically_and_a_failed_save_keeps_the_old_file(reference, tiny_adapter, tiny_model_dir,
                                                                        vtest_frames, tmp_path, monkeypatch):
    frames, stamps = vtest_frames
    path = tmp_path / "memory.safetensors"
    shutil.copyfile(reference.path, path)
    old = path.read_bytes()
    engine = _engine(tiny_adapter, tiny_model_dir)
    _feed(engine, frames[:2], stamps[:2], "front")

    def broken_save(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(snap, "save_file", broken_save)
    with pytest.raises(SnapshotError, match=f"cannot write snapshot {path}: OSError: disk full"):
        save_snapshot(engine, path)
    assert path.read_bytes() == old and sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    monkeypatch.undo()
    info = save_snapshot(engine, path)  # overwrite
    assert info.frames == 2 and sorted(os.listdir(tmp_path)) == ["memory.safetensors"]
    assert info.path == str(path) and os.path.isabs(info.path)
    assert snapshot_info(path) == info


# ------------------------------------------------------------------ refusals
def _rewrite(src, dst, header=None, drop=()):
    """Copy a snapshot with some header fields replaced and some tensors left out."""
    with safe_open(src, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k not in drop}
    head = json.loads(meta["infinipot"])
    head.update(header or {})
    save_file(tensors, str(dst), metadata={"infinipot": json.dumps(head)})


def _truncate(src, dst):
    data = open(src, "rb").read()
    open(dst, "wb").write(data[: len(data) // 2])


def _flip_a_key_byte(src, dst):
    data = bytearray(open(src, "rb").read())
    (n,) = struct.unpack("<Q", data[:8])
    begin, end = json.loads(data[8 : 8 + n])["kv.keys"]["data_offsets"]
    data[8 + n + (begin + end) // 2] ^= 0x10
    open(dst, "wb").write(bytes(data))


def _no_header(src, dst):
    save_file({"x": torch.zeros(2)}, str(dst))


REFUSALS = {
    "missing file": (None, "no snapshot at"),
    "truncated": (_truncate, "truncated or corrupt"),
    "format version": (lambda s, d: _rewrite(s, d, {"format_version": SNAPSHOT_FORMAT_VERSION + 1}),
                       f"format version {SNAPSHOT_FORMAT_VERSION + 1}, this build reads version 1"),
    "model id": (lambda s, d: _rewrite(s, d, {"model_id": "Qwen/Qwen2.5-VL-3B-Instruct"}),
                 "saved with model id 'Qwen/Qwen2.5-VL-3B-Instruct'"),
    "dtype": (lambda s, d: _rewrite(s, d, {"dtype": "bfloat16"}), "saved with dtype 'bfloat16'"),
    "missing tensors": (lambda s, d: _rewrite(s, d, drop=("kv.keys", "kv.table.first")),
                        r"missing tensors \['kv.keys', 'kv.table.first'\]"),
    "content": (_flip_a_key_byte, "do not match the content digest"),
    "not a snapshot": (_no_header, "no 'infinipot' header"),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refused_load_names_the_cause_and_keeps_memory(case, reference, tiny_adapter, tiny_model_dir,
                                                       vtest_frames, tmp_path):
    frames, stamps = vtest_frames
    make, message = REFUSALS[case]
    path = tmp_path / "bad.safetensors"
    if make is not None:
        make(reference.path, path)
    engine = _engine(tiny_adapter, tiny_model_dir)
    _feed(engine, frames[:5], stamps[:5], "side")  # a memory of its own, and an unpaired frame
    before = _memory(engine)
    with pytest.raises(SnapshotError, match=message) as err:
        load_snapshot(engine, path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)
    _assert_memory_unchanged(engine, before)
    if case == "truncated":  # still usable: the good file loads
        load_snapshot(engine, reference.path)
        _assert_same_state(engine.cache.state_dict(), reference.state)


def test_snapshot_of_another_system_prompt_is_refused(reference, tiny_adapter, tiny_model_dir, vtest_frames,
                                                      tmp_path):
    from infinipot_ros.models import load_adapter

    frames, stamps = vtest_frames
    pirate = load_adapter(tiny_model_dir, device="cpu", dtype="float32", max_pixels=64 * 28 * 28,
                          system_prompt="You are a pirate robot. Answer in rhymes.")
    other = _engine(pirate, tiny_model_dir, system_prompt="You are a pirate robot. Answer in rhymes.")
    _feed(other, frames[:4], stamps[:4], "front")
    path = tmp_path / "pirate.safetensors"
    save_snapshot(other, path)
    assert read_snapshot_header(path)["config_hash"] != read_snapshot_header(reference.path)["config_hash"]

    engine = _engine(tiny_adapter, tiny_model_dir)
    _feed(engine, frames[:4], stamps[:4], "front")
    before = _memory(engine)
    with pytest.raises(SnapshotError, match=r"config hash differs \(system prompt"):
        load_snapshot(engine, path)
    _assert_memory_unchanged(engine, before)

    # a header forged to pass the hash check: the cache itself still refuses the other prefix
    forged = tmp_path / "forged.safetensors"
    good = read_snapshot_header(reference.path)
    _rewrite(path, forged, {"config_hash": good["config_hash"], "hashed": good["hashed"]})
    with pytest.raises(SnapshotError, match="does not fit this assistant's cache: saved prefix"):
        load_snapshot(engine, forged)
    _assert_memory_unchanged(engine, before)


# ------------------------------------------------------------------ paths
def test_snapshot_path_is_resolved_and_checked_at_start(tmp_path, monkeypatch):
    """EngineConfig.snapshot_path: ~ and symlinks resolved; a directory, or a path whose directory cannot be
    created, is a ValueError naming the parameter and the path; a missing directory is fine (the first save
    creates it)."""
    home = tmp_path / "home"
    (home / "mem").mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    assert EngineConfig(snapshot_path="~/mem/m.safetensors").snapshot_path == str(home / "mem" / "m.safetensors")
    (tmp_path / "link").symlink_to(home / "mem")
    resolved = EngineConfig(snapshot_path=str(tmp_path / "link" / ".." / "mem" / "m.safetensors")).snapshot_path
    assert resolved == os.path.realpath(tmp_path / "link" / ".." / "mem" / "m.safetensors")
    assert EngineConfig(snapshot_path=str(tmp_path / "link" / "m.safetensors")).snapshot_path == \
        str(home / "mem" / "m.safetensors")
    with pytest.raises(ValueError, match=rf"cache.snapshot_path\) '{home / 'mem'}' is a directory"):
        EngineConfig(snapshot_path=str(home / "mem"))
    missing = tmp_path / "no" / "such" / "m.safetensors"  # created by the first save, not by the check
    assert EngineConfig(snapshot_path=str(missing)).snapshot_path == str(missing) and not missing.parent.exists()
    (tmp_path / "afile").write_text("x")
    under_file = tmp_path / "afile" / "sub" / "m.safetensors"
    with pytest.raises(ValueError, match=rf"cache.snapshot_path\) '{under_file}': {tmp_path / 'afile'} is not a "
                                         r"directory"):
        EngineConfig(snapshot_path=str(under_file))
    assert EngineConfig().snapshot_path == ""  # "" = none, nothing checked


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere: a read-only directory cannot be made")
def test_snapshot_path_in_a_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(ValueError, match=f"its directory {ro} is not writable"):
            EngineConfig(snapshot_path=str(ro / "m.safetensors"))
    finally:
        ro.chmod(0o700)


def test_save_and_load_resolve_the_path(reference, tiny_adapter, tiny_model_dir, vtest_frames, tmp_path,
                                        monkeypatch):
    frames, stamps = vtest_frames
    engine = _engine(tiny_adapter, tiny_model_dir)
    _feed(engine, frames[:2], stamps[:2], "front")
    monkeypatch.setenv("HOME", str(tmp_path))
    info = save_snapshot(engine, "~/snaps/m.safetensors")  # parent created, ~ expanded (no literal "~" dir)
    assert info.path == str(tmp_path / "snaps" / "m.safetensors") and os.path.isfile(info.path)
    assert not os.path.exists("~")
    assert snapshot_info("~/snaps/m.safetensors") == info
    assert load_snapshot(_engine(tiny_adapter, tiny_model_dir), "~/snaps/m.safetensors") == info
    with pytest.raises(SnapshotError, match=f"cannot write snapshot {tmp_path / 'snaps'}: it is a directory"):
        save_snapshot(engine, tmp_path / "snaps")
    with pytest.raises(SnapshotError, match=f"no snapshot at {tmp_path / 'snaps'}: it is a directory"):
        load_snapshot(engine, tmp_path / "snaps")
