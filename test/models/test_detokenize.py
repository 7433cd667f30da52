"""IncrementalDetokenizer against the real tiny byte-level BPE tokenizer (no mocks)."""
from __future__ import annotations

import random

import numpy as np
import pytest
import transformers

from infinipot_ros.models.detokenize import IncrementalDetokenizer

TEXTS = (
    "Robot sees 3 people 🚶\u200d♂️ near the 門 café.",
    "機器人看到三個人在門口。注意安全！",
    "Ça a été très déjà-vu: naïve façade, Zoë, Ångström, Øresund.",
    "👩\u200d👩\u200d👧\u200d👦 family, 🇯🇵 flag, 🤖🦾 arm, ½ ≈ 0.5 € ✓",
    "mixed: ロボット 로봇 робот रोबोट 🤖 end",
)


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return transformers.AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def byte_ids(tok):
    """Ids of the 256 single-byte tokens (the byte-level alphabet)."""
    ids = [i for i in range(tok.vocab_size) if len(tok.convert_ids_to_tokens(i)) == 1]
    assert len(ids) == 256
    return ids


class CountingTokenizer:
    """Delegates to the real tokenizer and records how many ids each decode call got."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self.calls = []

    def __len__(self):
        return len(self._tokenizer)

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)

    def decode(self, ids, **kwargs):
        self.calls.append(len(ids))
        return self._tokenizer.decode(ids, **kwargs)


def stream(tok, ids, skip=True):
    """Push ids one by one; check every piece; return (pieces, flushed tail)."""
    full = tok.decode(ids, skip_special_tokens=skip)
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    pieces = []
    for i in ids:
        piece = det.push(i)
        pieces.append(piece)
        assert full.startswith(det.text), (ids, det.text, full)
        if "\ufffd" not in full:
            assert "\ufffd" not in piece, (ids, pieces)
    tail = det.flush()
    assert "".join(pieces) + tail == full, (ids, pieces, tail, full)
    assert det.text == full
    assert det.token_ids == list(ids)
    return pieces, tail


@pytest.mark.parametrize("skip", [True, False])
def test_invariant_random_ids(tok, byte_ids, skip):
    rng = random.Random(1234)
    special = sorted(tok.all_special_ids)
    n = len(tok)
    for _ in range(400):
        length = rng.randint(1, 40)
        ids = []
        for _ in range(length):
            r = rng.random()
            if r < 0.45:
                ids.append(rng.choice(byte_ids))  # lone bytes: lead, continuation, invalid
            elif r < 0.55:
                ids.append(rng.choice(special))
            else:
                ids.append(rng.randrange(n))
        stream(tok, ids, skip)


@pytest.mark.parametrize("text", TEXTS, ids=["robot", "cjk", "accents", "emoji", "mixed"])
def test_multibyte_texts_never_split(tok, text):
    ids = tok.encode(text)
    # The test only means something if some character is really split over tokens.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    pieces, tail = stream(tok, ids)
    assert "".join(pieces) + tail == text
    assert tail == ""
    assert "" in pieces  # bytes were held back at least once


def test_text_with_special_tokens_interleaved(tok):
    special = tok.convert_tokens_to_ids(["<|im_end|>", "<|vision_start|>"])
    ids = []
    for i, t in enumerate(tok.encode(TEXTS[0])):
        ids.append(t)
        ids.append(special[i % 2])  # a special token between every pair of bytes
    pieces, _ = stream(tok, ids, skip=True)
    assert "".join(pieces) == TEXTS[0]
    pieces, _ = stream(tok, ids, skip=False)
    assert "<|im_end|>" in "".join(pieces)


def test_skipped_special_tokens_do_not_dilute_window(tok):
    """Many skipped specials between the bytes of one character: the held bytes must survive window slides."""
    specials = sorted(tok.all_special_ids)
    ids = tok.encode("A")
    for t in tok.encode("門🚶é"):
        ids.append(t)
        ids.extend(specials[:2 * IncrementalDetokenizer.MAX_WINDOW])
    pieces, tail = stream(tok, ids, skip=True)
    assert "".join(pieces) == "A門🚶é" and tail == ""


def test_added_normal_token_is_not_skipped(tiny_model_dir):
    """A non-special added token stays in the text with skip_special_tokens=True, as in decode."""
    tok = transformers.AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_tokens(["<act>"])
    act = tok.convert_tokens_to_ids("<act>")
    ids = tok.encode("go 門") + [act] + tok.encode("stop") + [tok.convert_tokens_to_ids("<|im_end|>")]
    pieces, tail = stream(tok, ids, skip=True)
    assert "".join(pieces) + tail == "go 門<act>stop"


def test_long_answer_bounded_decode_window(tok):
    ids = []
    while len(ids) < 2000:
        ids.extend(tok.encode(" ".join(TEXTS)))
    ids = ids[:2000]
    counting = CountingTokenizer(tok)
    det = IncrementalDetokenizer(counting, skip_special_tokens=True)
    counting.calls.clear()  # construction probes special tokens once
    out = "".join(det.push(i) for i in ids) + det.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert max(counting.calls) <= IncrementalDetokenizer.MAX_WINDOW <= 16
    assert len(counting.calls) <= 2 * len(ids)


def test_garbage_bytes_bounded_and_exact(tok, byte_ids):
    """2000 random single-byte tokens: chars split everywhere, invalid bytes, still exact and bounded."""
    rng = random.Random(7)
    ids = [rng.choice(byte_ids) for _ in range(2000)]
    counting = CountingTokenizer(tok)
    det = IncrementalDetokenizer(counting)
    counting.calls.clear()
    out = "".join(det.push(i) for i in ids) + det.flush()
    assert out == tok.decode(ids, skip_special_tokens=True)
    assert max(counting.calls) <= IncrementalDetokenizer.MAX_WINDOW


def test_flush_emits_held_bytes(tok):
    ids = tok.encode("門")
    assert len(ids) >= 2  # split over byte tokens
    det = IncrementalDetokenizer(tok)
    assert det.push(tok.encode("A")[0]) == "A"
    assert [det.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert det.text == "A"
    tail = det.flush()
    assert tail == "\ufffd"
    assert det.text == tok.decode(tok.encode("A") + ids[:-1])
    assert det.flush() == ""


def test_flush_empty_and_complete(tok):
    det = IncrementalDetokenizer(tok)
    assert det.flush() == ""
    assert det.text == "" and det.token_ids == []
    det = IncrementalDetokenizer(tok)
    for i in tok.encode("ok."):
        det.push(i)
    assert det.flush() == ""
    assert det.text == "ok."


def test_accepts_numpy_ints(tok):
    det = IncrementalDetokenizer(tok)
    out = "".join(det.push(np.int64(i)) for i in tok.encode(TEXTS[1])) + det.flush()
    assert out == TEXTS[1]
    assert all(type(i) is int for i in det.token_ids)


def test_errors(tok):
    det = IncrementalDetokenizer(tok)
    for bad in ("a", 1.0, None, True):
        with pytest.raises(TypeError):
            det.push(bad)
    for bad in (-1, len(tok), 10**9):
        with pytest.raises(ValueError):
            det.push(bad)
    assert det.token_ids == []
    det.flush()
    with pytest.raises(RuntimeError):
        det.push(0)
    with pytest.raises(TypeError):
        IncrementalDetokenizer(object())
