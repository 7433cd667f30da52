"""Model adapters, one per multimodal LLM family, and the factory that picks one.

``load_adapter("builtin:tiny-qwen2.5-vl")`` gives the embedded test model;
an HF id (``Qwen/Qwen2.5-VL-3B-Instruct``) or a local directory gives real
weights. Every transformers touch point lives in this package.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from .base import Answer, EncodedPatch, ModelAdapter, TokenCallback
from .static_decode import DECODE_MODES
from .tiny import BUILTIN_PREFIX, TINY_MODEL_NAME, build_tiny_qwen2_5_vl, default_cache_dir, resolve_model

#: Default model: the tiny Qwen2.5-VL built locally (no download, random weights).
DEFAULT_MODEL = BUILTIN_PREFIX + TINY_MODEL_NAME

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
        model: ``builtin:tiny-qwen2.5-vl``, a directory, or an HF hub id.
        device, dtype: see :func:`resolve_device`, :func:`resolve_dtype`.
        local_files_only: never contact the hub; default: True unless
            HF_HUB_OFFLINE is "0" (robots are usually offline).
        adapter_kwargs: max_pixels, min_pixels, system_prompt, decode_mode.

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
    if model_type == "qwen2_5_vl":
        from .qwen2_5_vl import Qwen2_5_VLAdapter

        adapter = Qwen2_5_VLAdapter(path, device=dev, dtype=dt, local_files_only=local_files_only, **adapter_kwargs)
        adapter.model_id = model  # report the name the user gave, not the resolved cache path
        return adapter
    raise ValueError(f"model family {model_type!r} of {model!r} is not supported (supported: qwen2_5_vl)")


__all__ = [
    "Answer", "DECODE_MODES", "DEFAULT_MODEL", "EncodedPatch", "ModelAdapter", "TokenCallback", "build_tiny_qwen2_5_vl",
    "default_cache_dir", "load_adapter", "resolve_device", "resolve_dtype", "resolve_model",
]
