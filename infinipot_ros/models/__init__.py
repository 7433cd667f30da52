"""Model adapters, one per multimodal LLM family, and the factory that picks one.

``load_adapter("builtin:tiny-qwen2.5-vl")`` gives the embedded test model
(``builtin:tiny-qwen2-vl``, ``builtin:tiny-qwen3-vl`` and
``builtin:tiny-llava-onevision`` the tiny models of the other families); an HF
id (``Qwen/Qwen2.5-VL-3B-Instruct``, ``Qwen/Qwen2-VL-2B-Instruct``,
``Qwen/Qwen3-VL-2B-Instruct``, ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``)
or a local directory gives real weights, the family chosen by the config's
``model_type`` (:data:`FAMILIES`). Every transformers touch point lives in
this package; names are resolved by :mod:`.resolve`.

Safe loading: ``trust_remote_code=False`` always (a configuration with ``auto_map``
is refused), safetensors weights only unless ``allow_pickle``, the local HF cache
only unless ``allow_download`` (and ``HF_HUB_OFFLINE=1`` wins over it).
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Optional

import torch

from .base import Answer, EncodedPatch, ModelAdapter, TokenCallback
from .static_decode import DECODE_MODES
from .resolve import (BUILTIN_MODELS, BUILTIN_PREFIX, check_local_model, check_model_config, check_weights,
                      hub_offline_forced, looks_like_hf_id, resolve_model)
from .tiny import TINY_MODEL_NAME, build_tiny_qwen2_5_vl, default_cache_dir
from .tiny_families import build_tiny_llava_onevision, build_tiny_qwen2_vl, build_tiny_qwen3_vl

#: Default model: the tiny Qwen2.5-VL built locally (no download, random weights).
DEFAULT_MODEL = BUILTIN_PREFIX + TINY_MODEL_NAME

#: config ``model_type`` -> (module of this package, adapter class): the supported families.
FAMILIES: dict[str, tuple[str, str]] = {
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLAdapter"),
    "qwen2_vl": ("qwen2_vl", "Qwen2VLAdapter"),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLAdapter"),
    "llava_onevision": ("llava_onevision", "LlavaOneVisionAdapter"),
}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    """"auto" -> cuda if available else cpu; anything else as given.

    Raises:
        ValueError: a CUDA device was asked for but CUDA is not available.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available")
    return dev


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """"auto" -> bfloat16 on CUDA, float32 on CPU; else one of float32/bfloat16/float16."""
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto or one of {sorted(_DTYPES)}") from None


def adapter_class(model_type: str) -> type:
    """The adapter class of a config ``model_type``.

    Raises:
        ValueError: a family that is not supported (the message names the supported ones).
    """
    try:
        module, cls = FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"model family {model_type!r} is not supported (supported: {', '.join(FAMILIES)})") from None
    import importlib

    return getattr(importlib.import_module(f".{module}", __name__), cls)


def _hub_config(model: str, local_files_only: bool) -> dict:
    """The raw ``config.json`` of an HF id (no code runs: a dict, not a config class).

    Raises:
        OSError: not in the local HF cache (``local_files_only``) or not on the hub.
    """
    from transformers import PretrainedConfig

    try:
        config, _ = PretrainedConfig.get_config_dict(model, local_files_only=local_files_only)
    except OSError as exc:
        if not local_files_only:
            raise
        raise OSError(f"model.id {model!r} is neither a local directory nor in the local HF cache, and downloads "
                      f"are off (model.allow_download: false, or HF_HUB_OFFLINE=1): {exc}") from exc
    return config


@contextlib.contextmanager
def _hub_offline(offline: bool) -> Iterator[None]:
    """While loading with ``offline``, huggingface_hub itself is offline too (``constants.HF_HUB_OFFLINE``).

    ``local_files_only=True`` keeps transformers from downloading, but huggingface_hub
    still fetches side data from the hub while building request headers (its agent-harness
    registry, once a day) unless ``HF_HUB_OFFLINE`` is set; this closes that gap for the
    duration of the load (process-wide: loads are not expected to run concurrently).
    """
    if not offline:
        yield
        return
    from huggingface_hub import constants

    previous = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = previous


def load_adapter(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    allow_pickle: bool = False,
    allow_download: bool = False,
    local_files_only: Optional[bool] = None,
    **adapter_kwargs: Any,
) -> ModelAdapter:
    """Load a model by builtin name, local path or HF id and wrap it in its family's adapter.

    Args:
        model: a ``builtin:`` name (:data:`BUILTIN_MODELS`), a directory, or an HF hub id
            of a supported family (:data:`FAMILIES`, by the config's ``model_type``).
        device, dtype: see :func:`resolve_device`, :func:`resolve_dtype`.
        allow_pickle: also load pickle weights (``pytorch_model.bin``, ``*.pt``) when a
            directory has no safetensors; default False (safetensors only).
        allow_download: fetch an HF id missing from the local HF cache from the hub;
            default False (``local_files_only=True``: no network). ``HF_HUB_OFFLINE=1``
            keeps the loader offline even when True.
        local_files_only: True = offline whatever ``allow_download`` says (kept for
            older callers); None = from ``allow_download``.
        adapter_kwargs: max_pixels, min_pixels, system_prompt, decode_mode (and the
            family's own, e.g. Qwen2-VL's ``temporal_ids_per_second``).

    Raises:
        ValueError: unknown builtin, dtype, device, unsupported model family, a
            configuration that needs remote code (``auto_map``), pickle-only weights
            without ``allow_pickle``.
        FileNotFoundError, NotADirectoryError: a local path that is no model directory
            (the message names the path and ``model.id``).
        OSError: an HF id not in the local HF cache (offline), or not on the hub.
    """
    offline = bool(local_files_only) or not allow_download or hub_offline_forced()
    path = resolve_model(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    local = not looks_like_hf_id(path)  # resolve_model made local paths absolute
    with _hub_offline(offline):
        if local:
            config = check_local_model(path)
        else:
            config = _hub_config(path, offline)
            check_model_config(config, f"config.json of {path}")
        model_type = config.get("model_type", "")
        if model_type not in FAMILIES:
            raise ValueError(f"model family {model_type!r} of {model!r} is not supported "
                             f"(supported: {', '.join(FAMILIES)})")
        if local:
            check_weights(path, allow_pickle=allow_pickle)
        cls = adapter_class(model_type)
        adapter = cls(path, device=dev, dtype=dt, local_files_only=offline, allow_pickle=allow_pickle,
                      **adapter_kwargs)
    adapter.model_id = model  # report the name the user gave, not the resolved cache path
    return adapter


__all__ = [
    "Answer", "BUILTIN_MODELS", "BUILTIN_PREFIX", "DECODE_MODES", "DEFAULT_MODEL", "EncodedPatch", "FAMILIES",
    "ModelAdapter", "TokenCallback", "adapter_class", "build_tiny_llava_onevision", "build_tiny_qwen2_5_vl",
    "build_tiny_qwen2_vl", "build_tiny_qwen3_vl", "default_cache_dir", "load_adapter", "resolve_device",
    "resolve_dtype", "resolve_model",
]
