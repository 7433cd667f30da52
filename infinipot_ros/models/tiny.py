"""Builder of the embedded default model: a tiny, randomly initialised Qwen2.5-VL.

The tiny model has the real Qwen2.5-VL architecture (the stock
``transformers.Qwen2_5_VLForConditionalGeneration`` class, M-RoPE, windowed
vision tower, patch merger) with a small configuration, seeded random weights
and a byte-level BPE tokenizer trained offline on a corpus generated in code.
It is written with ``save_pretrained``, so it loads back through
``AutoConfig`` / ``AutoProcessor`` / ``Qwen2_5_VLForConditionalGeneration``
exactly like real weights (e.g. ``Qwen/Qwen2.5-VL-3B-Instruct``) do. It knows
no language: it exists so that the streaming engine, the KV-cache compression
and the ROS node can run end to end with no download and no GPU.

Files in a build directory (all written by transformers except the marker):

* ``config.json``, ``generation_config.json`` - model configuration.
* ``model.safetensors`` - float32 weights (about 4 MB).
* ``tokenizer.json``, ``tokenizer_config.json`` - the BPE tokenizer.
* ``processor_config.json`` - image and video processor settings.
* ``chat_template.jinja`` - the Qwen-style chat template.
* ``infinipot_build.json`` - marker written last: recipe name and version,
  seed, library versions. A directory without it is not a complete build.

The tokenizer's training corpus is generated from ``data/tiny_corpus.json``
(word banks, sentence templates, fixed texts; shipped as package data) by
:func:`_corpus`. Model names (``builtin:...``) are resolved by
:mod:`.resolve`, not here.

Public API: :data:`TINY_MODEL_NAME`, :data:`RECIPE_VERSION`, :data:`MARKER_FILE`,
:func:`default_cache_dir`, :func:`build_tiny_qwen2_5_vl`, :func:`build_atomically`
(the build directory protocol every builtin model uses), :func:`read_marker`,
:func:`write_marker`.
"""
from __future__ import annotations

import contextlib
import functools
import json
import os
import pathlib
import shutil
import tempfile
from importlib import resources
from typing import Any, Callable, Iterator, List, Mapping, Optional, Sequence, Union

TINY_MODEL_NAME = "tiny-qwen2.5-vl"

#: Bump whenever anything that changes the written files changes (config,
#: corpus, tokenizer training, template, processor settings, init scheme).
RECIPE_VERSION = 1

MARKER_FILE = "infinipot_build.json"
_RECIPE_NAME = TINY_MODEL_NAME

#: Files that must exist (besides the marker) for a build to count as complete.
REQUIRED_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "processor_config.json",
)

# Special tokens, in the order (and hence relative ids) Qwen2.5-VL uses.
# They are appended after the trained BPE vocabulary, as in the real model.
SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Size of the trained byte-level BPE vocabulary (256 byte symbols + 1778
# merges); the corpus supports up to ~2800. With the 14 special tokens the
# tokenizer (and the model's vocab_size) has 2048 entries.
BPE_VOCAB_SIZE = 2034

# Pixel bounds of the image and video processors, in pixels per frame. These are
# the values the real Qwen2.5-VL-3B-Instruct checkpoint ships
# (preprocessor_config.json: min_pixels 56*56, max_pixels 28*28*16384); with no
# video_preprocessor_config.json, transformers 5.x builds its video processor
# from the same file, so the tiny model resizes frames exactly as the real one.
MIN_PIXELS = 56 * 56
MAX_PIXELS = 28 * 28 * 16384

# Qwen2.5-VL chat template: system/user/assistant turns; images and videos in
# a content list become <|vision_start|><|image_pad|>/<|video_pad|><|vision_end|>
# (the processor expands the single pad into one token per merged patch).
# No whitespace control ({%- -%}) anywhere: it would eat the literal newlines.
CHAT_TEMPLATE = (
    "{% set ns = namespace(images=0, videos=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' or 'image' in item or 'image_url' in item %}"
    "{% set ns.images = ns.images + 1 %}"
    "{% if add_vision_id %}Picture {{ ns.images }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' or 'video' in item %}"
    "{% set ns.videos = ns.videos + 1 %}"
    "{% if add_vision_id %}Video {{ ns.videos }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in item %}"
    "{{ item['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "<|im_start|>assistant\n"
    "{% endif %}"
)

PathLike = Union[str, "os.PathLike[str]"]


def default_cache_dir() -> pathlib.Path:
    """Return the directory where infinipot_ros caches built models.

    ``$INFINIPOT_CACHE_DIR`` if set and non-empty, else
    ``$XDG_CACHE_HOME/infinipot_ros``, else ``~/.cache/infinipot_ros``. The
    directory is not created here.
    """
    explicit = os.environ.get("INFINIPOT_CACHE_DIR")
    if explicit:
        return pathlib.Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return pathlib.Path(xdg).expanduser() / "infinipot_ros"
    return pathlib.Path.home() / ".cache" / "infinipot_ros"


def build_tiny_qwen2_5_vl(out_dir: PathLike, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Build the tiny Qwen2.5-VL (model, tokenizer, processors, template) into ``out_dir``.

    Written through :func:`build_atomically`: a crash never leaves a directory that
    later loads half-written, concurrent builders of one ``out_dir`` wait for each
    other. If ``out_dir`` already holds a complete build of this recipe version and
    ``seed``, nothing is done unless ``overwrite`` is true; an older build of this
    recipe (other version or seed) is replaced. Same ``seed`` -> byte-identical
    ``model.safetensors``.

    Args:
        out_dir: target directory (created, with parents).
        seed: ``torch.manual_seed`` value for the weight initialisation.
        overwrite: rebuild even when a matching build is present.

    Returns:
        ``out_dir`` as an absolute :class:`pathlib.Path`.

    Raises:
        FileExistsError: ``out_dir`` exists, is not empty and is not a build of
            this recipe (no marker file): it is never deleted.
        NotADirectoryError: ``out_dir`` exists and is a file.
        OSError: on file-system errors while writing.
    """
    seed = int(seed)
    return build_atomically(
        out_dir,
        is_complete=lambda d: _is_complete_build(d, seed),
        write=lambda d: _write_build(d, seed),
        overwrite=overwrite,
    )


# --------------------------------------------------------------------------- #
# Build directory protocol (every builtin model: this one and tiny_families)
# --------------------------------------------------------------------------- #
def build_atomically(
    out_dir: PathLike,
    is_complete: Callable[[pathlib.Path], bool],
    write: Callable[[pathlib.Path], None],
    overwrite: bool = False,
) -> pathlib.Path:
    """Write a model directory with ``write`` and move it to ``out_dir`` in one rename.

    Under a ``filelock.FileLock`` on ``<parent>/.<name>.lock`` (concurrent builders
    of one target wait; the second finds the first one's build complete):
    ``is_complete(out)`` true and not ``overwrite`` -> nothing to do; else
    ``write(new)`` fills ``new`` inside a ``tempfile.TemporaryDirectory`` next to
    ``out_dir`` (same file system), its files are fsync'ed, a previous ``out_dir`` is
    moved into that temporary directory and ``new`` takes its place with
    ``os.replace``; leaving the ``with`` deletes the old build. A builder killed half
    way leaves only a ``.<name>.tmp-*`` directory, removed by the next builder (it
    holds the lock, so no live builder owns it) and never taken for a build.

    Args:
        out_dir: target directory (parents created).
        is_complete: whether a directory holds the build wanted (marker, files).
        write: fills the empty directory it is given; the marker file last.
        overwrite: rebuild even when ``is_complete(out_dir)``.

    Returns:
        ``out_dir`` as an absolute path.

    Raises:
        FileExistsError: ``out_dir`` is a non-empty directory without :data:`MARKER_FILE`
            (never deleted).
        NotADirectoryError: ``out_dir`` is a file.
        OSError: file-system errors (``out_dir`` keeps its previous content).
    """
    from filelock import FileLock

    out = pathlib.Path(out_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out.parent / f".{out.name}.lock")):
        if not overwrite and is_complete(out):
            return out
        _check_replaceable(out)
        _remove_stale_temps(out)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.tmp-", dir=out.parent) as staging:
            new, old = pathlib.Path(staging) / "new", pathlib.Path(staging) / "old"
            new.mkdir()
            write(new)
            _fsync_files(new)
            if os.path.lexists(out):
                os.replace(out, old)
            try:
                os.replace(new, out)
            except OSError:
                if old.exists():
                    os.replace(old, out)
                raise
    return out


def read_marker(directory: pathlib.Path) -> Optional[dict]:
    """The parsed :data:`MARKER_FILE` of ``directory``, or None if absent or unreadable."""
    try:
        with open(pathlib.Path(directory) / MARKER_FILE, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_marker(directory: pathlib.Path, recipe: str, version: int, seed: int, **facts: Any) -> None:
    """Write :data:`MARKER_FILE` (recipe, version, seed, library versions, ``facts``) into ``directory``."""
    import tokenizers
    import torch
    import transformers

    marker = dict(facts, recipe=recipe, recipe_version=version, seed=seed,
                  transformers=transformers.__version__, tokenizers=tokenizers.__version__, torch=torch.__version__)
    with open(pathlib.Path(directory) / MARKER_FILE, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.write("\n")


def _is_complete_build(directory: pathlib.Path, seed: int) -> bool:
    """True if ``directory`` holds a complete build of this recipe version and seed."""
    marker = read_marker(directory)
    if marker is None:
        return False
    if (
        marker.get("recipe") != _RECIPE_NAME
        or marker.get("recipe_version") != RECIPE_VERSION
        or marker.get("seed") != seed
    ):
        return False
    return all((directory / name).is_file() for name in REQUIRED_FILES)


def _check_replaceable(out: pathlib.Path) -> None:
    """Refuse to replace anything that is not an (empty dir or) earlier build of ours."""
    if not os.path.lexists(out):
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if (out / MARKER_FILE).exists() or not any(out.iterdir()):
        return
    raise FileExistsError(
        f"{out} is not empty and holds no {MARKER_FILE}; refusing to replace a directory "
        "that was not written by an infinipot_ros builder (choose another output directory)"
    )


def _remove_stale_temps(out: pathlib.Path) -> None:
    """Delete the staging directories of crashed builders of ``out`` (the caller holds its lock)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):  # .old-*: left by builds before filelock
        for stale in out.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _fsync_files(directory: pathlib.Path) -> None:
    """Flush every file under ``directory`` to disk, so the rename never publishes unwritten data."""
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


# --------------------------------------------------------------------------- #
# The build itself
# --------------------------------------------------------------------------- #
def _write_build(directory: pathlib.Path, seed: int) -> None:
    """Write model, generation config, processor and marker into ``directory``."""
    import torch
    import transformers

    tokenizer = _build_tokenizer()
    processor = _build_processor(tokenizer)
    config = _build_config(tokenizer)

    with _fork_rng(torch), _float32_on_cpu(torch):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    model.eval()
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[tokenizer.convert_tokens_to_ids("<|im_end|>"),
                      tokenizer.convert_tokens_to_ids("<|endoftext|>")],
        pad_token_id=config.text_config.pad_token_id,
        do_sample=False,
    )
    model.save_pretrained(directory, safe_serialization=True)
    processor.save_pretrained(directory)

    write_marker(directory, _RECIPE_NAME, RECIPE_VERSION, seed, vocab_size=len(tokenizer))


@contextlib.contextmanager
def _fork_rng(torch_module) -> Iterator[None]:
    """Restore the caller's torch RNG states (CPU, and CUDA if initialised) afterwards."""
    cuda = torch_module.cuda
    devices = list(range(cuda.device_count())) if cuda.is_initialized() else []
    with torch_module.random.fork_rng(devices=devices):
        yield


@contextlib.contextmanager
def _float32_on_cpu(torch_module) -> Iterator[None]:
    """Create parameters as float32 on the CPU whatever the caller's defaults are."""
    previous = torch_module.get_default_dtype()
    torch_module.set_default_dtype(torch_module.float32)
    try:
        with torch_module.device("cpu"):
            yield
    finally:
        torch_module.set_default_dtype(previous)


def _build_config(tokenizer):
    """Return the small ``Qwen2_5_VLConfig`` whose token ids match ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig

    def tid(token: str) -> int:
        return int(tokenizer.convert_tokens_to_ids(token))

    init_range = 0.1  # large enough that value norms / key similarities vary per token
    text_config = dict(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,  # head_dim = 128 / 4 = 32
        hidden_act="silu",
        max_position_embeddings=32768,
        initializer_range=init_range,
        rms_norm_eps=1e-6,
        use_cache=True,
        use_sliding_window=False,
        max_window_layers=4,
        attention_dropout=0.0,
        # "mrope" in the hub's rope_scaling is stored as rope_type "default" in 5.x;
        # mrope_section sums to head_dim / 2 = 16 (temporal, height, width).
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [4, 6, 6]},
        bos_token_id=tid("<|endoftext|>"),
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
        dtype="float32",
    )
    vision_config = dict(
        depth=2,
        hidden_size=64,
        hidden_act="silu",
        intermediate_size=128,
        num_heads=4,
        in_channels=3,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        tokens_per_second=2,
        window_size=112,
        out_hidden_size=128,  # = text hidden_size
        fullatt_block_indexes=[1],
        initializer_range=init_range,
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_id=tid("<|image_pad|>"),
        video_token_id=tid("<|video_pad|>"),
        vision_start_token_id=tid("<|vision_start|>"),
        vision_end_token_id=tid("<|vision_end|>"),
        tie_word_embeddings=True,  # as in Qwen2.5-VL-3B-Instruct
        bos_token_id=tid("<|endoftext|>"),
        eos_token_id=tid("<|im_end|>"),
        pad_token_id=tid("<|endoftext|>"),
        dtype="float32",
    )
    config._attn_implementation = "sdpa"
    return config


def _build_processor(tokenizer):
    """Return a ``Qwen2_5_VLProcessor`` with Qwen2-VL image/video processors."""
    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    common = dict(
        min_pixels=MIN_PIXELS,
        max_pixels=MAX_PIXELS,
        patch_size=14,
        temporal_patch_size=2,
        merge_size=2,
    )
    image_processor = Qwen2VLImageProcessor(**common)
    video_processor = Qwen2VLVideoProcessor(**common)
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _build_tokenizer():
    """Train the byte-level BPE and wrap it in ``Qwen2Tokenizer`` (the class 5.x maps qwen2_5_vl to)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    # The same pipeline Qwen2Tokenizer rebuilds on load (it keeps only vocab and
    # merges from tokenizer.json), so the trained merges apply identically.
    backend = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    vocab = backend.get_vocab()
    if len(vocab) != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE training gave {len(vocab)} tokens, expected {BPE_VOCAB_SIZE}")
    merges = [tuple(m) for m in json.loads(backend.to_str())["model"]["merges"]]

    # eos/pad are set only after the special tokens are added in Qwen order:
    # Qwen2Tokenizer.__init__ would otherwise append them first, with other ids.
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token=None,
        pad_token=None,
        errors="replace",
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        split_special_tokens=False,
    )
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.eos_token = "<|im_end|>"
    tokenizer.pad_token = "<|endoftext|>"
    # The remaining specials are listed as extra special tokens (v4 name:
    # additional_special_tokens), so skip_special_tokens drops them on decode.
    extra = [t for t in SPECIAL_TOKENS if t not in ("<|endoftext|>", "<|im_end|>")]
    tokenizer.add_special_tokens({"additional_special_tokens": extra})
    tokenizer.chat_template = CHAT_TEMPLATE
    for offset, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.convert_tokens_to_ids(token) != BPE_VOCAB_SIZE + offset:
            raise RuntimeError(f"special token {token} did not get id {BPE_VOCAB_SIZE + offset}")
    return tokenizer


# --------------------------------------------------------------------------- #
# Deterministic training corpus
# --------------------------------------------------------------------------- #
#: The corpus recipe (package data, see ``setup.py`` package_data and CMakeLists.txt's install).
CORPUS_FILE = "data/tiny_corpus.json"

# Word bank of each template field, in the order the banks are listed in the corpus.
_BANK_FIELDS = (("col", "colours"), ("obj", "objects"), ("who", "people"), ("animal", "animals"),
                ("place", "places"), ("verb", "verbs"), ("adj", "adjectives"), ("dir", "directions"),
                ("time", "time"), ("num", "number_words"))


@functools.lru_cache(maxsize=1)
def corpus_recipe() -> Mapping[str, Any]:
    """The parsed :data:`CORPUS_FILE`: ``banks`` (name -> tuple of words), ``statements``,
    ``questions``, ``fixed_text`` (tuples of str), ``lcg_seed``, ``num_sentences``, ``chat_samples``.

    Raises:
        FileNotFoundError: the package was installed without its data file.
        ValueError: the file lacks a field or a word bank.
    """
    text = resources.files(__package__).joinpath(CORPUS_FILE).read_text(encoding="utf-8")
    data = json.loads(text)
    try:
        banks = {name: tuple(data["banks"][name].split()) for _, name in _BANK_FIELDS}
        return {
            "banks": banks,
            "statements": tuple(data["statements"]),
            "questions": tuple(data["questions"]),
            "fixed_text": tuple(data["fixed_text"]),
            "lcg_seed": int(data["lcg_seed"]),
            "num_sentences": int(data["num_sentences"]),
            "chat_samples": int(data["chat_samples"]),
        }
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{CORPUS_FILE} of {__package__} is incomplete: {exc!r}") from None


class _Lcg:
    """A tiny linear congruential generator: identical output on every Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self.state >> 33) % n

    def pick(self, items: Sequence[str]) -> str:
        return items[self.below(len(items))]


def _corpus(num_sentences: Optional[int] = None) -> List[str]:
    """Return the deterministic English corpus the tokenizer is trained on.

    Generated from :func:`corpus_recipe`: the fixed texts; every word bank in plain,
    capitalised and plural-ish form, three times each; ``num_sentences`` templated
    statements and questions about scenes (people, objects, robots, colours, directions,
    numbers) with fields drawn by a fixed LCG; chat-formatted samples. It does not
    depend on the weight seed, so token ids are the same for every seed.
    """
    recipe = corpus_recipe()
    banks = recipe["banks"]
    if num_sentences is None:
        num_sentences = recipe["num_sentences"]
    rng = _Lcg(recipe["lcg_seed"])
    lines: List[str] = list(recipe["fixed_text"])
    for _, name in _BANK_FIELDS:
        bank = banks[name]
        # Each word alone, capitalised, plural-ish and inside a sentence, a few times,
        # so every word of the banks ends up a token or a short token sequence.
        for _ in range(3):
            lines.append(" ".join(bank))
            lines.append(" ".join(w.capitalize() for w in bank))
            lines.append(", ".join(w + "s" for w in bank) + ".")
    templates = recipe["statements"] + recipe["questions"]
    # Field order of the draws: part of the recipe (it fixes the LCG stream).
    draw_order = ("col", "obj", "obj2", "who", "animal", "place", "verb", "adj", "dir", "time", "num")
    bank_of = dict(_BANK_FIELDS, obj2="objects")
    for _ in range(num_sentences):
        template = templates[rng.below(len(templates))]
        fields = {key: rng.pick(banks[bank_of[key]]) for key in draw_order}
        fields.update(n1=str(rng.below(10)), n2=str(rng.below(10)), n3=str(rng.below(10)))
        lines.append(template.format(**fields))
    # Chat-formatted samples (template words and newlines around them).
    for i in range(recipe["chat_samples"]):
        fields = {key: banks[name][i % len(banks[name])] for key, name in _BANK_FIELDS}
        fields["obj2"] = banks["objects"][(7 * i) % len(banks["objects"])]
        fields.update(n1=str(i % 10), n2=str((i // 10) % 10), n3=str((i // 100) % 10))
        lines.append("system\nYou are a helpful assistant.\nuser\n" + templates[i % len(templates)].format(**fields)
                     + "\nassistant\n")
    return lines
