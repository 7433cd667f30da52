"""Memory snapshots: the assistant's scene memory (KV cache + stream state) in one file that survives a reboot.

A snapshot is ONE safetensors file (no pickle anywhere):

* tensors ``kv.<name>``: :meth:`~infinipot_ros.kv.CappedKVCache.state_dict` of the cache (prefix and
  vision K/V [L, B, H_kv, P + V, D] in the model dtype, token ids and value norms [L, B, H_kv, V],
  lengths, compression counters, the chunk table columns);
* metadata entry ``"infinipot"``: a JSON header -- ``format_version``, ``model_id``, ``dtype``,
  ``config_hash`` (and the ``hashed`` fields it is computed from), ``saved_unix_s``, ``frames``,
  ``vision_tokens``, ``prefix_tokens``, ``chunks``, ``oldest_stamp_ns`` / ``newest_stamp_ns``,
  the engine's stream state (``cameras``: camera name -> index, ``origin_ns``: stamp of the
  stream's first frame, ns, which temporal positions count from), ``counters`` (frame counters
  at save, for information), ``pending_dropped`` (cameras whose unpaired frame was not saved),
  ``policy`` / ``max_vision_tokens`` of the saver, ``tensors`` (names) and ``tensors_sha256``
  (a digest of every tensor's name, dtype, shape and bytes: safetensors itself checks the
  layout but not the content).

``config_hash`` is the sha256 of what makes a saved KV cache meaningless elsewhere: model id,
dtype, layer / KV head / head_dim geometry, frames per patch and the prefix token ids (the
system prompt). The budget is not part of it (a smaller budget compresses on load), nor is
max_pixels (chunks keep the grid they were encoded with).

Files are written atomically (temp file in the same directory, fsync, ``os.replace``, fsync of
the directory): a crash leaves the old snapshot or the new one, never half a file.

Paths are resolved (``~`` expanded, symlinks and ``..`` resolved: :func:`resolve_snapshot_path`)
before use; a configured ``cache.snapshot_path`` is checked at start
(:func:`check_snapshot_path`: not a directory; its directory writable, or creatable by the first save).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..kv import NOTE_CAMERA, CacheStateError, CappedKVCache

if TYPE_CHECKING:  # pragma: no cover
    from .assistant import StreamingAssistant

#: Version of the snapshot layout; a file of another version is refused.
SNAPSHOT_FORMAT_VERSION = 1
#: safetensors metadata key holding the JSON header.
HEADER_KEY = "infinipot"
_KV = "kv."  # name prefix of the cache state's tensors


class SnapshotError(Exception):
    """A snapshot that cannot be written or must not be loaded; the message names the file and the cause."""


@dataclass(frozen=True)
class SnapshotInfo:
    """What a snapshot file holds (as saved).

    Attributes:
        path: the snapshot file (absolute path).
        frames: camera frames with vision tokens in the saved cache.
        vision_tokens: vision tokens per layer and KV head in the saved cache (V).
        saved_unix_s: wall-clock time of the save (Unix time, s).
    """

    path: str
    frames: int
    vision_tokens: int
    saved_unix_s: float


# --------------------------------------------------------------------------- paths
def resolve_snapshot_path(path: str | os.PathLike) -> str:
    """``path`` with ``~`` expanded and made absolute, symlinks and ``..`` resolved (the file need not exist)."""
    return os.path.realpath(os.path.expanduser(os.fspath(path)))


def check_snapshot_path(path: str | os.PathLike, *, parameter: str = "cache.snapshot_path") -> str:
    """Resolve a configured snapshot path and check that a snapshot can be written there.

    Returns:
        The resolved absolute path (:func:`resolve_snapshot_path`).

    Raises:
        ValueError: the path is a directory or another non-regular file, or its directory
            (or, when missing, its nearest existing ancestor, where the first save creates it)
            is no directory or not writable; the message names ``parameter``, the path as
            given and as resolved.
    """
    given = os.fspath(path)
    real = resolve_snapshot_path(given)
    where = f"{parameter} {given!r}" + (f" (resolved: {real})" if real != given else "")
    if os.path.isdir(real):
        raise ValueError(f"{where} is a directory; give a file path such as {os.path.join(real, 'memory.safetensors')}")
    if os.path.exists(real) and not os.path.isfile(real):
        raise ValueError(f"{where} exists and is not a regular file")
    parent = os.path.dirname(real)
    existing = parent  # a missing directory is created by the first save: its nearest existing ancestor decides
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"{where}: {existing} is not a directory, so {parent} cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{where}: its directory {existing} is not writable by this process"
                         + (f" ({parent} cannot be created)" if existing != parent else ""))
    if os.path.exists(real) and not os.access(real, os.R_OK | os.W_OK):
        raise ValueError(f"{where} exists but is not readable and writable by this process")
    return real


# --------------------------------------------------------------------------- header
def _one_line(exc: BaseException) -> str:
    """An exception as one line of text (library errors may span several)."""
    return " ".join(str(exc).split()) or type(exc).__name__


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _hashed_fields(assistant: "StreamingAssistant") -> dict[str, Any]:
    """The fields :func:`config_hash` covers, for ``assistant``'s model and system prompt."""
    adapter, cache = assistant.adapter, assistant.cache
    prefix_ids = getattr(adapter, "prefix_ids", None)
    prefix = hashlib.sha256(json.dumps(list(prefix_ids)).encode()).hexdigest() if prefix_ids is not None else None
    return {
        "model_id": str(adapter.model_id),
        "dtype": _dtype_name(adapter.dtype),
        "num_layers": int(cache.num_layers),
        "num_kv_heads": int(cache.num_kv_heads),
        "head_dim": int(cache.head_dim),
        "batch_size": int(cache.batch_size),
        "frames_per_patch": int(adapter.frames_per_patch),
        "prefix_tokens": int(cache.prefix_length),
        "prefix_ids_sha256": prefix,
    }


def _hash(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(dict(fields), sort_keys=True).encode()).hexdigest()


def config_hash(assistant: "StreamingAssistant") -> str:
    """sha256 (hex) over model id, dtype, KV geometry, frames per patch and the prefix token ids."""
    return _hash(_hashed_fields(assistant))


#: Names of :func:`config_hash`'s fields as a refusal message says them.
_FIELD_WORDS = {
    "prefix_ids_sha256": "system prompt (prefix token ids)",
    "prefix_tokens": "system prompt (prefix length)",
    "num_layers": "layer count",
    "num_kv_heads": "KV head count",
    "head_dim": "head_dim",
    "batch_size": "batch size",
    "frames_per_patch": "frames per patch",
    "model_id": "model id",
    "dtype": "dtype",
}


def _tensors_digest(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 (hex) over every tensor's name, dtype, shape and bytes, in name order (CPU contiguous tensors)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, _dtype_name(t.dtype), list(t.shape)]).encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# --------------------------------------------------------------------------- save
def save_snapshot(assistant: "StreamingAssistant", path: str | os.PathLike) -> SnapshotInfo:
    """Write the assistant's memory to ``path`` (one safetensors file, atomically; see the module docstring).

    The cache state and the stream state are copied under the assistant's lock (a consistent
    cut between frames and questions); the file is then written without holding it, so frames
    keep flowing during the disk I/O. Dropped, not saved: an unpaired frame waiting for its
    temporal pair (listed in the header as ``pending_dropped``), the question/answer scratch,
    and the frame counters' live values (they are recorded in the header for information only).
    ``path`` is resolved (:func:`resolve_snapshot_path`); its parent directory is created if
    missing; the file is readable by its owner only (0600).

    Returns:
        What was saved (``path``: the resolved absolute path).

    Raises:
        SnapshotError: ``path`` is a directory, or the file cannot be written (the previous
            file at ``path``, if any, is intact).
    """
    given = os.fspath(path)
    path = resolve_snapshot_path(given)
    if os.path.isdir(path):
        raise SnapshotError(f"cannot write snapshot {given}: it is a directory"
                            + (f" ({path})" if path != given else ""))
    with assistant._lock:
        cache = assistant.cache
        try:
            state = cache.state_dict()
        except CacheStateError as exc:
            raise SnapshotError(f"cannot snapshot {path}: {_one_line(exc)}") from None
        hashed = _hashed_fields(assistant)
        oldest, newest = cache.table.stamp_range()
        header: dict[str, Any] = {
            "format_version": SNAPSHOT_FORMAT_VERSION,
            "model_id": hashed["model_id"],
            "dtype": hashed["dtype"],
            "config_hash": _hash(hashed),
            "hashed": hashed,
            "saved_unix_s": time.time(),
            "frames": cache.table.frames(),
            "vision_tokens": cache.vision_length,
            "prefix_tokens": cache.prefix_length,
            "chunks": len(cache.table),
            "oldest_stamp_ns": oldest,
            "newest_stamp_ns": newest,
            "cameras": dict(assistant._cameras),
            "origin_ns": assistant._origin_ns,
            "counters": assistant.counters.to_dict(),
            "pending_dropped": sorted(getattr(assistant, "_pending", {})),
            "policy": assistant.policy_name,
            "max_vision_tokens": cache.max_vision_tokens,
        }
    tensors = {_KV + k: t for k, t in state.items()}
    header["tensors"] = sorted(tensors)
    header["tensors_sha256"] = _tensors_digest(tensors)
    _write_atomically(tensors, header, path)
    return SnapshotInfo(path, header["frames"], header["vision_tokens"], header["saved_unix_s"])


def _write_atomically(tensors: dict[str, torch.Tensor], header: dict[str, Any], path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
        os.close(fd)
        save_file(tensors, tmp, metadata={HEADER_KEY: json.dumps(header)})
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except Exception as exc:
        raise SnapshotError(f"cannot write snapshot {path}: {type(exc).__name__}: {_one_line(exc)}") from exc
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


# --------------------------------------------------------------------------- load
def read_snapshot_header(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON header of a snapshot file, without reading its tensors.

    Raises:
        SnapshotError: no file, not a safetensors file (truncated, corrupt) or no valid header.
    """
    path = resolve_snapshot_path(path)
    if os.path.isdir(path):
        raise SnapshotError(f"no snapshot at {path}: it is a directory")
    if not os.path.isfile(path):
        raise SnapshotError(f"no snapshot at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error type for truncated / garbled files
        raise SnapshotError(f"snapshot {path} is truncated or corrupt: {_one_line(exc)}") from None
    if HEADER_KEY not in meta:
        raise SnapshotError(f"snapshot {path} has no {HEADER_KEY!r} header (not an infinipot snapshot)")
    try:
        header = json.loads(meta[HEADER_KEY])
    except ValueError as exc:
        raise SnapshotError(f"snapshot {path} has a corrupt header: {_one_line(exc)}") from None
    if not isinstance(header, dict):
        raise SnapshotError(f"snapshot {path} has a corrupt header: not a JSON object")
    return header


def snapshot_info(path: str | os.PathLike) -> SnapshotInfo:
    """What the snapshot at ``path`` holds, from its header only (no compatibility checks).

    Raises:
        SnapshotError: as :func:`read_snapshot_header`, or a header without those fields.
    """
    path = resolve_snapshot_path(path)
    header = read_snapshot_header(path)
    try:
        return SnapshotInfo(path, int(header["frames"]), int(header["vision_tokens"]),
                            float(header["saved_unix_s"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise SnapshotError(f"snapshot {os.fspath(path)} has a corrupt header: {exc!r}") from None


def _check_header(assistant: "StreamingAssistant", header: dict[str, Any], path: str) -> None:
    version = header.get("format_version")
    if version != SNAPSHOT_FORMAT_VERSION:
        raise SnapshotError(f"snapshot {path} has format version {version!r}, this build reads "
                            f"version {SNAPSHOT_FORMAT_VERSION}")
    own = _hashed_fields(assistant)
    for key in ("model_id", "dtype"):
        if header.get(key) != own[key]:
            raise SnapshotError(f"snapshot {path} was saved with {key.replace('_', ' ')} {header.get(key)!r}, "
                                f"this assistant runs {own[key]!r}")
    if header.get("config_hash") != _hash(own):
        saved = header.get("hashed") if isinstance(header.get("hashed"), dict) else {}
        what = [_FIELD_WORDS.get(k, k) for k in own if saved.get(k) != own[k]] or ["unknown fields"]
        raise SnapshotError(f"snapshot {path} config hash differs ({', '.join(what)}): it was saved by another "
                            f"model configuration or system prompt")


def _stream_state(header: dict[str, Any], cache: CappedKVCache, path: str) -> tuple[dict[str, int], Optional[int]]:
    """(cameras, origin_ns) from the header, checked against the loaded cache."""
    cameras, origin = header.get("cameras"), header.get("origin_ns")
    if not isinstance(cameras, dict) or not all(isinstance(k, str) and type(v) is int for k, v in cameras.items()):
        raise SnapshotError(f"snapshot {path} has a corrupt header: cameras must map names to indices")
    if sorted(cameras.values()) != list(range(len(cameras))):
        raise SnapshotError(f"snapshot {path} has a corrupt header: camera indices {sorted(cameras.values())} "
                            f"are not 0..{len(cameras) - 1}")
    if origin is not None and type(origin) is not int:
        raise SnapshotError(f"snapshot {path} has a corrupt header: origin_ns must be an integer or null")
    if len(cache.table):
        used = cache.table.column("camera")
        if origin is None or int(used.max()) >= len(cameras) or int(used.min()) < NOTE_CAMERA:
            raise SnapshotError(f"snapshot {path}: its cached chunks name cameras or a stream origin the header lacks")
    return dict(cameras), origin


def load_snapshot(assistant: "StreamingAssistant", path: str | os.PathLike) -> SnapshotInfo:
    """Replace the assistant's memory by the snapshot at ``path``; on any refusal it is left exactly as it was.

    Checks, in order (each refusal is a :class:`SnapshotError` with one line naming the file
    and what differs): the file exists; it is a readable safetensors file (not truncated or
    corrupt) with an ``infinipot`` header; same format version, model id, dtype and config
    hash (geometry, system prompt); every tensor present and the content digest matching;
    then the cache state is loaded into a FRESH cache (prefix written by this assistant's
    model, see :meth:`~infinipot_ros.kv.CappedKVCache.load_state_dict`, which also refuses
    another prefix or geometry), compressed to this assistant's budget if it is smaller.
    Only then, under the lock, the assistant takes the new cache, its camera indices and
    stream origin (so later frames get the positions they would have had without the
    reboot). Unpaired frames waiting in the assistant are dropped; frame counters, the frame
    gate and anything else of the running process are left to the caller.

    Returns:
        What the file holds (as saved: a smaller budget may have compressed it on load).

    Raises:
        SnapshotError: see above.
    """
    path = resolve_snapshot_path(path)
    with assistant._lock:
        header = read_snapshot_header(path)
        _check_header(assistant, header, path)
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as exc:
            raise SnapshotError(f"snapshot {path} is truncated or corrupt: {_one_line(exc)}") from None
        fresh = assistant._new_cache()
        listed = header.get("tensors") if isinstance(header.get("tensors"), list) else []
        expected = set(listed) | {_KV + k for k in fresh.state_dict()}
        missing = sorted(expected - set(tensors))
        if missing:
            raise SnapshotError(f"snapshot {path} is missing tensors {missing}")
        if header.get("tensors_sha256") != _tensors_digest(tensors):
            raise SnapshotError(f"snapshot {path} is corrupt: its tensors do not match the content digest")
        state = {name[len(_KV):]: t for name, t in tensors.items() if name.startswith(_KV)}
        try:
            fresh.load_state_dict(state)
        except (CacheStateError, ValueError) as exc:
            raise SnapshotError(f"snapshot {path} does not fit this assistant's cache: {_one_line(exc)}") from None
        cameras, origin = _stream_state(header, fresh, path)
        try:
            info = SnapshotInfo(path, int(header["frames"]), int(header["vision_tokens"]),
                                float(header["saved_unix_s"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SnapshotError(f"snapshot {path} has a corrupt header: {exc!r}") from None
        # ---- accepted: swap
        assistant.cache = fresh
        assistant._cameras.clear()
        assistant._cameras.update(cameras)
        assistant._origin_ns = origin
        assistant._pending.clear()
        return info
