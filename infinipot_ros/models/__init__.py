"""Model adapters, one per multimodal LLM family, and the factory that picks one.

``load_adapter("builtin:tiny-qwen2.5-vl")`` gives the embedded test model
(``builtin:tiny-qwen2-vl``, ``builtin:tiny-qwen3-vl`` and
``builtin:tiny-llava-onevision`` the tiny models of the other families); an HF
id (``Qwen/Qwen2.5-VL-3B-Instruct``, ``Qwen/Qwen2-VL-2B-Instruct``,
``Qwen/Qwen3-VL-2B-Instruct``, ``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``)
or a local directory gives real weights, the family chosen by the config's
``model_type`` (:data:`FAMILIES`). Every transformers touch point lives in
this package.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from .base import Answer, EncodedPatch, ModelAdapter, TokenCallback
from .static_decode import DECODE_MODES
from . import tiny, tiny_families
from .tiny import BUILTIN_PREFIX, TINY_MODEL_NAME, build_tiny_qwen2_5_vl, default_cache_dir
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

#: Every ``builtin:`` model name (built locally on first use, no download).
BUILTIN_MODELS = tuple(BUILTIN_PREFIX + n for n in (TINY_MODEL_NAME, *tiny_families.BUILDERS))

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


def resolve_model(name_or_path, cache_dir=None) -> str:
    """Turn a model setting into something ``from_pretrained`` can load.

    ``builtin:<name>`` -> its build directory under ``<cache_dir>/models/`` (built on
    first use; ``cache_dir`` defaults to :func:`default_cache_dir`); a local directory
    -> its path; anything else (an HF id) unchanged. See :func:`.tiny.resolve_model`.

    Raises:
        ValueError: an unknown ``builtin:`` name (the message lists :data:`BUILTIN_MODELS`).
    """
    text = os.fspath(name_or_path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name in tiny_families.BUILDERS:
            return str(tiny_families.builtin_dir(name, cache_dir))
        if text not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model {text!r}; known: {', '.join(BUILTIN_MODELS)}")
    return tiny.resolve_model(text, cache_dir=cache_dir)


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


def _model_type(path: str, local_files_only: bool) -> str:
    cfg_file = os.path.join(path, "config.json")
    if os.path.isfile(cfg_file):
        with open(cfg_file, encoding="utf-8") as f:
            return json.load(f).get("model_type", "")
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=local_files_only).model_type


def load_adapter(
    model: str = DEFAULT_MODEL,
    *,
    device: str = "auto",
    dtype: str = "auto",
    local_files_only: Optional[bool] = None,
    **adapter_kwargs: Any,
) -> ModelAdapter:
    """Load a model by builtin name, local path or HF id and wrap it in its family's adapter.

    Args:
        model: a ``builtin:`` name (:data:`BUILTIN_MODELS`), a directory, or an HF hub id
            of a supported family (:data:`FAMILIES`, by the config's ``model_type``).
        device, dtype: see :func:`resolve_device`, :func:`resolve_dtype`.
        local_files_only: never contact the hub; default: True unless
            HF_HUB_OFFLINE is "0" (robots are usually offline).
        adapter_kwargs: max_pixels, min_pixels, system_prompt, decode_mode (and the
            family's own, e.g. Qwen2-VL's ``temporal_ids_per_second``).

    Raises:
        ValueError: unknown builtin, dtype, device, or unsupported model family.
        OSError: the model cannot be found (e.g. not in the local HF cache).
    """
    if local_files_only is None:
        local_files_only = os.environ.get("HF_HUB_OFFLINE", "1") != "0"
    path = resolve_model(model)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    model_type = _model_type(path, local_files_only)
    if model_type not in FAMILIES:
        raise ValueError(f"model family {model_type!r} of {model!r} is not supported "
                         f"(supported: {', '.join(FAMILIES)})")
    cls = adapter_class(model_type)
    adapter = cls(path, device=dev, dtype=dt, local_files_only=local_files_only, **adapter_kwargs)
    adapter.model_id = model  # report the name the user gave, not the resolved cache path
    return adapter


__all__ = [
    "Answer", "BUILTIN_MODELS", "DECODE_MODES", "DEFAULT_MODEL", "EncodedPatch", "FAMILIES", "ModelAdapter",
    "TokenCallback", "adapter_class", "build_tiny_llava_onevision", "build_tiny_qwen2_5_vl", "build_tiny_qwen2_vl",
    "build_tiny_qwen3_vl",
    "default_cache_dir", "load_adapter", "resolve_device", "resolve_dtype", "resolve_model",
]
