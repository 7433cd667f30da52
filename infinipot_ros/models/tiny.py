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

Public API: :data:`BUILTIN_PREFIX`, :data:`TINY_MODEL_NAME`,
:func:`default_cache_dir`, :func:`build_tiny_qwen2_5_vl`, :func:`resolve_model`.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import uuid
from typing import Iterator, List, Optional, Sequence, Union

BUILTIN_PREFIX = "builtin:"
TINY_MODEL_NAME = "tiny-qwen2.5-vl"

#: Bump whenever anything that changes the written files changes (config,
#: corpus, tokenizer training, template, processor settings, init scheme).
RECIPE_VERSION = 1

MARKER_FILE = "infinipot_build.json"
_RECIPE_NAME = TINY_MODEL_NAME
_KNOWN_BUILTINS = (TINY_MODEL_NAME,)

# Files that must exist (besides the marker) for a build to count as complete.
_REQUIRED_FILES = (
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


def resolve_model(name_or_path: PathLike, cache_dir: Optional[PathLike] = None) -> str:
    """Turn a model setting into something ``from_pretrained`` can load.

    * ``"builtin:tiny-qwen2.5-vl"`` -> ``<cache_dir>/models/tiny-qwen2.5-vl``,
      built on first use (a few seconds on a CPU) and reused afterwards.
      ``cache_dir`` defaults to :func:`default_cache_dir`.
    * an existing local directory -> its path (``~`` expanded).
    * anything else (e.g. an HF hub id) -> returned unchanged; the caller
      loads it under the hub's own offline rules.

    Raises:
        ValueError: for an unknown ``builtin:`` name (the message lists the
            known names).
        FileExistsError, OSError: see :func:`build_tiny_qwen2_5_vl`.
    """
    text = os.fspath(name_or_path)
    if text.startswith(BUILTIN_PREFIX):
        name = text[len(BUILTIN_PREFIX):]
        if name not in _KNOWN_BUILTINS:
            known = ", ".join(BUILTIN_PREFIX + n for n in _KNOWN_BUILTINS)
            raise ValueError(f"unknown builtin model {text!r}; known: {known}")
        root = pathlib.Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        return str(build_tiny_qwen2_5_vl(root / "models" / name))
    expanded = os.path.expanduser(text)
    if os.path.isdir(expanded):
        return expanded
    return text


def build_tiny_qwen2_5_vl(out_dir: PathLike, seed: int = 0, overwrite: bool = False) -> pathlib.Path:
    """Build the tiny Qwen2.5-VL (model, tokenizer, processors, template) into ``out_dir``.

    The build is written into a temporary directory next to ``out_dir`` and
    renamed into place only when complete (marker file last), so a crash never
    leaves a directory that later loads half-written. A file lock next to
    ``out_dir`` serialises concurrent builders. If ``out_dir`` already holds a
    complete build of this recipe version and ``seed``, nothing is done unless
    ``overwrite`` is true. An older build of this recipe (other version or
    seed) is replaced. Same ``seed`` -> byte-identical ``model.safetensors``.

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
    out = pathlib.Path(out_dir).expanduser().absolute()
    seed = int(seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(out):
        if not overwrite and _is_complete_build(out, seed):
            return out
        _check_replaceable(out)
        _remove_stale_temps(out)
        tmp = out.parent / f".{out.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            _write_build(tmp, seed)
            _swap_into_place(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- #
# Build directory bookkeeping
# --------------------------------------------------------------------------- #
def _read_marker(directory: pathlib.Path) -> Optional[dict]:
    """Return the parsed marker of ``directory`` or None if absent/unreadable."""
    try:
        with open(directory / MARKER_FILE, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete_build(directory: pathlib.Path, seed: int) -> bool:
    """True if ``directory`` holds a complete build of this recipe version and seed."""
    marker = _read_marker(directory)
    if marker is None:
        return False
    if (
        marker.get("recipe") != _RECIPE_NAME
        or marker.get("recipe_version") != RECIPE_VERSION
        or marker.get("seed") != seed
    ):
        return False
    return all((directory / name).is_file() for name in _REQUIRED_FILES)


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
        "that was not written by build_tiny_qwen2_5_vl (choose another output directory)"
    )


def _remove_stale_temps(out: pathlib.Path) -> None:
    """Delete temporary build dirs left by crashed builders (caller holds the lock)."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _swap_into_place(tmp: pathlib.Path, out: pathlib.Path) -> None:
    """Rename the finished ``tmp`` to ``out``, moving any previous ``out`` aside first."""
    old = None
    if os.path.lexists(out):
        old = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None and not os.path.lexists(out):
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
    """fsync a directory so a rename inside it survives a power loss (best effort)."""
    try:
        fd = os.open(directory, getattr(os, "O_DIRECTORY", 0) | os.O_RDONLY)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def _build_lock(out: pathlib.Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<parent>/.<name>.lock`` (no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    lock_path = out.parent / f".{out.name}.lock"
    with open(lock_path, "a+b") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --------------------------------------------------------------------------- #
# The build itself
# --------------------------------------------------------------------------- #
def _write_build(directory: pathlib.Path, seed: int) -> None:
    """Write model, generation config, processor and marker into ``directory``."""
    import tokenizers
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

    marker = {
        "recipe": _RECIPE_NAME,
        "recipe_version": RECIPE_VERSION,
        "seed": seed,
        "vocab_size": len(tokenizer),
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "torch": torch.__version__,
    }
    marker_tmp = directory / (MARKER_FILE + ".part")
    with open(marker_tmp, "w", encoding="utf-8") as handle:
        json.dump(marker, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(marker_tmp, directory / MARKER_FILE)
    _fsync_tree(directory)


def _fsync_tree(directory: pathlib.Path) -> None:
    """Flush every file of ``directory`` and the directory entry itself to disk."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(directory)


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
_COLOURS = (
    "red orange yellow green blue purple violet pink brown black white grey gray silver gold "
    "beige cyan magenta navy teal maroon olive turquoise dark light bright pale"
).split()
_OBJECTS = (
    "cup mug bottle glass plate bowl spoon fork knife chair table desk sofa couch bed lamp door "
    "window wall floor ceiling shelf box bag backpack book notebook pen pencil phone laptop "
    "computer keyboard mouse monitor screen camera cable charger battery ball toy robot drone "
    "car truck bus bicycle bike motorcycle scooter train boat plane tree plant flower grass rock "
    "stone sign light pole fence gate bench umbrella hat helmet jacket shirt shoe glove key "
    "wallet watch clock mirror picture painting poster towel sink tap faucet oven fridge "
    "microwave kettle toaster pan pot basket bucket ladder hammer screwdriver wrench drill saw "
    "tape rope wire pipe valve sensor gripper arm wheel track pallet crate forklift cone "
    "barrier marker label package parcel tray cart trolley"
).split()
_PEOPLE = (
    "person man woman child boy girl worker engineer operator driver cyclist pedestrian "
    "student teacher doctor nurse guard visitor customer technician pilot chef officer "
    "someone nobody everyone people crowd group team family friend"
).split()
_ANIMALS = "dog cat bird horse cow sheep duck pigeon squirrel rabbit mouse fish".split()
_PLACES = (
    "kitchen office room hallway corridor garage warehouse factory lab laboratory street road "
    "sidewalk crossing parking lot park garden yard field forest beach station platform "
    "elevator stairs entrance exit loading dock shop store market hospital school classroom "
    "library bathroom bedroom living dining area corner"
).split()
_VERBS = (
    "is are was were holds holding carries carrying moves moving walks walking runs running "
    "stands standing sits sitting opens opening closes closing picks picking places placing "
    "puts putting drops dropping lifts lifting pushes pushing pulls pulling turns turning "
    "enters entering leaves leaving looks looking points pointing waves waving drives driving "
    "rides riding crosses crossing stops stopping waits waiting appears appeared disappears "
    "disappeared falls falling rolls rolling slides sliding approaches approaching passes "
    "passing follows following grabs grabbing releases releasing scans scanning detects "
    "detected sees saw seen watches watched reaches reached returns returned"
).split()
_ADJECTIVES = (
    "small large big tiny huge tall short long wide narrow open closed empty full heavy "
    "round square flat broken new old clean dirty wet dry hot cold soft hard shiny plastic "
    "metal wooden glass paper cardboard rubber striped dotted moving static blurry sharp "
    "visible hidden partial nearby distant left right upper lower front back middle"
).split()
_DIRECTIONS = (
    "left right up down forward backward north south east west above below behind beside "
    "between near far inside outside under over across along toward towards away around "
    "through into onto from off center top bottom side"
).split()
_TIME = (
    "now then before after during while when first second third last next earlier later "
    "recently already still again once twice always never sometimes today yesterday tomorrow "
    "morning afternoon evening night minute minutes second seconds hour hours frame frames "
    "moment time clip video scene stream camera view"
).split()
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy "
    "eighty ninety hundred thousand million half quarter dozen several many few some all none"
).split()
_QUESTIONS = (
    "What is the {adj} {obj} doing?",
    "Where is the {col} {obj}?",
    "How many {obj}s are on the {obj2}?",
    "Did the {who} pick up the {obj}?",
    "What colour is the {obj} near the {obj2}?",
    "Is there a {who} in the {place}?",
    "Which way did the {animal} go?",
    "When did the {who} leave the {place}?",
    "Can you describe what happened in the video?",
    "What changed in the scene since the last frame?",
    "Summarize the last {num} seconds of the stream.",
    "Who is holding the {col} {obj}?",
)
_STATEMENTS = (
    "The {col} {obj} is {dir} the {obj2}.",
    "A {who} {verb} the {adj} {obj} in the {place}.",
    "There are {num} {obj}s on the {adj} {obj2}.",
    "The {animal} {verb} {dir} the {place}.",
    "At {n1}:{n2}{n3} the {who} {verb} a {col} {obj}.",
    "The robot {verb} the {obj} and moves {dir}.",
    "I can see a {adj} {obj} {dir} the {col} {obj2}.",
    "The {who} {verb} {dir} with a {obj}, then the {obj2} {verb}.",
    "In frame {n1}{n2}{n3}, the {col} {obj} is at x={n1}{n2}, y={n3}{n1}.",
    "The {place} is {adj}; {num} people are {verb} near the {obj}.",
    "It was {time} when the {animal} crossed the {place}.",
    "Nothing changed: the {obj} is still {dir} the {obj2}.",
    "The {col} {obj} ({adj}) is {n1}.{n2} m away, bearing {n3}{n1} degrees.",
    "Yes, the {who} {verb} the {obj}. No, the {obj2} did not move.",
    "First the {who} {verb} the {obj}; later a {col} {obj2} appeared {dir} it!",
)
_FIXED_TEXT = (
    "system", "user", "assistant", "You are a helpful assistant.",
    "You are a video assistant on a robot. Answer briefly.",
    "Picture", "Video", "Describe the video.", "Answer the question about the video.",
    "I don't know.", "I can't see that.", "It's there.", "We're done.", "They've left.",
    "I'll check.", "It'd move.", "I'm here.",
    "0123456789", "+-*/=<>()[]{}", "!?.,;:'\"`~@#$%^&_|\\", "\n\n", "\t",
)


class _Lcg:
    """A tiny linear congruential generator: identical output on every Python version."""

    def __init__(self, seed: int) -> None:
        self.state = seed & 0xFFFFFFFFFFFFFFFF

    def below(self, n: int) -> int:
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & 0xFFFFFFFFFFFFFFFF
        return (self.state >> 33) % n

    def pick(self, items: Sequence[str]) -> str:
        return items[self.below(len(items))]


def _corpus(num_sentences: int = 12000) -> List[str]:
    """Return the deterministic English corpus the tokenizer is trained on.

    It mixes templated statements and questions about scenes (people, objects,
    robots, colours, directions, numbers), every word bank in plain, capitalised
    and space-prefixed form, and the chat-template words. It does not depend on
    the weight seed, so token ids are the same for every seed.
    """
    rng = _Lcg(20250611)
    lines: List[str] = list(_FIXED_TEXT)
    banks = (_COLOURS, _OBJECTS, _PEOPLE, _ANIMALS, _PLACES, _VERBS, _ADJECTIVES,
             _DIRECTIONS, _TIME, _NUMBER_WORDS)
    for bank in banks:
        # Each word alone, capitalised, plural-ish and inside a sentence, a few times,
        # so every word of the banks ends up a token or a short token sequence.
        for _ in range(3):
            lines.append(" ".join(bank))
            lines.append(" ".join(w.capitalize() for w in bank))
            lines.append(", ".join(w + "s" for w in bank) + ".")
    templates = _STATEMENTS + _QUESTIONS
    for _ in range(num_sentences):
        template = templates[rng.below(len(templates))]
        lines.append(
            template.format(
                col=rng.pick(_COLOURS), obj=rng.pick(_OBJECTS), obj2=rng.pick(_OBJECTS),
                who=rng.pick(_PEOPLE), animal=rng.pick(_ANIMALS), place=rng.pick(_PLACES),
                verb=rng.pick(_VERBS), adj=rng.pick(_ADJECTIVES), dir=rng.pick(_DIRECTIONS),
                time=rng.pick(_TIME), num=rng.pick(_NUMBER_WORDS),
                n1=str(rng.below(10)), n2=str(rng.below(10)), n3=str(rng.below(10)),
            )
        )
    # Chat-formatted samples (template words and newlines around them).
    for i in range(200):
        lines.append(
            "system\nYou are a helpful assistant.\nuser\n"
            + templates[i % len(templates)].format(
                col=_COLOURS[i % len(_COLOURS)], obj=_OBJECTS[i % len(_OBJECTS)],
                obj2=_OBJECTS[(7 * i) % len(_OBJECTS)], who=_PEOPLE[i % len(_PEOPLE)],
                animal=_ANIMALS[i % len(_ANIMALS)], place=_PLACES[i % len(_PLACES)],
                verb=_VERBS[i % len(_VERBS)], adj=_ADJECTIVES[i % len(_ADJECTIVES)],
                dir=_DIRECTIONS[i % len(_DIRECTIONS)], time=_TIME[i % len(_TIME)],
                num=_NUMBER_WORDS[i % len(_NUMBER_WORDS)],
                n1=str(i % 10), n2=str((i // 10) % 10), n3=str((i // 100) % 10),
            )
            + "\nassistant\n"
        )
    return lines
