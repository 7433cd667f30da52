"""Incremental detokenization: turn generated token ids into final text pieces.

:class:`IncrementalDetokenizer` is fed one generated id at a time and returns
the text that has become final. It replaces "decode all answer ids after every
token and diff the strings", which costs O(n^2) in the answer length and, with
byte-level BPE, yields broken pieces ending in U+FFFD while a multi-byte UTF-8
character is split over several tokens.

Public API: :class:`IncrementalDetokenizer`.
"""
from __future__ import annotations

import operator
from typing import Any, FrozenSet, List

__all__ = ["IncrementalDetokenizer"]

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Streaming detokenizer for a Hugging Face tokenizer with a byte-level BPE decoder.

    Each :meth:`push` decodes only a small window of recent tokens and returns
    the text that is now final; text whose last character may still change (an
    incomplete UTF-8 sequence, decoded as a trailing U+FFFD) is held back until
    later tokens complete it or :meth:`flush` releases it at the end.

    Invariant: for any id sequence ``ids``::

        "".join(d.push(i) for i in ids) + d.flush() == tokenizer.decode(ids, skip_special_tokens=skip)

    and the text emitted so far is always a prefix of the full decode, so no
    returned piece ends inside a character and none contains U+FFFD unless the
    full decode has it at that place.

    Cost: every push decodes at most :attr:`MAX_WINDOW` tokens (plus one decode
    of :attr:`KEEP` tokens when the window slides), independent of the answer
    length. Memory grows only with :attr:`token_ids` and :attr:`text`.

    How: the window holds the last few ids that reach the decoder (special
    tokens skipped by ``skip_special_tokens`` never enter it: decode drops them
    anyway) and ``_done``, the number of characters of the window's decoded
    text already emitted. A push decodes the window and emits its text from
    ``_done`` up to its end, or up to its last character when that is U+FFFD.
    When the window reaches ``MAX_WINDOW`` ids it is cut to its last ``KEEP``
    ids and ``_done`` is recomputed from their decode. ``KEEP >= 3`` is what
    makes this exact: an incomplete UTF-8 tail has at most 3 bytes and every
    kept token has at least one, so the tail lies inside the kept tokens; bytes
    cut in the middle of an already emitted character only add leading U+FFFD
    to the window's decode, inside the part counted as done. Window starts
    therefore need not be character boundaries, and no decode ever covers more
    than ``MAX_WINDOW`` ids, whatever bytes the model produces.

    Assumes what byte-level BPE decoders (Qwen2/2.5/3, GPT-2, Llama-3 style
    ``tokenizers`` ByteLevel) do: the text is the lossy UTF-8 decoding of the
    concatenated token bytes, an incomplete tail becomes one U+FFFD, and every
    non-skipped token has at least one byte. Decoding is done with
    ``clean_up_tokenization_spaces=False`` (Qwen's default), since that
    clean-up is not prefix-stable. Not for SentencePiece byte-fallback decoders,
    which turn an incomplete tail into several U+FFFD.

    After :meth:`flush` the object is finished; make a new one per answer.
    """

    #: Ids the window may hold before it slides (bound on ids per decode call).
    MAX_WINDOW = 8
    #: Ids kept when the window slides; must be >= 3 (see the class docstring).
    KEEP = 4

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        """Wrap ``tokenizer`` (a ``PreTrainedTokenizerBase``, fast backend).

        Args:
            tokenizer: the tokenizer whose ``decode`` defines the text.
            skip_special_tokens: drop special tokens from the text, as
                ``tokenizer.decode(..., skip_special_tokens=True)`` does.

        Raises:
            TypeError: ``tokenizer`` has no callable ``decode``.
        """
        if not callable(getattr(tokenizer, "decode", None)):
            raise TypeError(f"tokenizer must have a decode method, got {type(tokenizer).__name__}")
        self._tokenizer = tokenizer
        self._skip_special = bool(skip_special_tokens)
        self._vocab_len = len(tokenizer)
        self._skipped = self._skipped_ids() if self._skip_special else frozenset()
        self._ids: List[int] = []
        self._pieces: List[str] = []
        self._window: List[int] = []
        self._done = 0
        self._flushed = False

    @property
    def text(self) -> str:
        """All text returned so far by :meth:`push` and :meth:`flush`."""
        if len(self._pieces) > 1:
            self._pieces[:] = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    @property
    def token_ids(self) -> List[int]:
        """A copy of every id pushed so far, special tokens included."""
        return list(self._ids)

    def push(self, token_id: int) -> str:
        """Feed one generated token; return the new final text (possibly "").

        The returned text never ends inside an incomplete UTF-8 sequence: such
        bytes are held back until later tokens complete them (or :meth:`flush`).
        Decodes at most :attr:`MAX_WINDOW` ids.

        Args:
            token_id: a Python int or any integer with ``__index__`` (numpy or
                0-d torch integer); bools are refused.

        Raises:
            TypeError: ``token_id`` is not an integer (or is a bool).
            ValueError: ``token_id`` is outside ``[0, len(tokenizer))``.
            RuntimeError: :meth:`flush` was already called.
        """
        if self._flushed:
            raise RuntimeError("push() after flush(): use a new IncrementalDetokenizer per answer")
        if isinstance(token_id, bool):
            raise TypeError("token_id must be an int, got bool")
        try:
            tid = operator.index(token_id)
        except TypeError:
            raise TypeError(f"token_id must be an int, got {type(token_id).__name__}") from None
        if not 0 <= tid < self._vocab_len:
            raise ValueError(f"token_id {tid} outside the vocabulary [0, {self._vocab_len})")
        self._ids.append(tid)
        if tid in self._skipped:
            return ""
        self._window.append(tid)
        window_text = self._decode(self._window)
        held = 1 if window_text.endswith(_REPLACEMENT) else 0
        final = len(window_text) - held
        piece = window_text[self._done:final]
        self._done = max(self._done, final)
        if len(self._window) >= self.MAX_WINDOW:
            del self._window[: -self.KEEP]
            self._done = len(self._decode(self._window)) - held
        return self._emit(piece)

    def flush(self) -> str:
        """Return the text still held back and finish; call once, after the last push.

        Bytes that never completed a character are emitted as U+FFFD, as a
        full decode would. A second call returns "".
        """
        self._flushed = True
        if not self._window:
            return ""
        window_text = self._decode(self._window)
        piece = window_text[self._done:]
        self._done = len(window_text)
        return self._emit(piece)

    def _emit(self, piece: str) -> str:
        if piece:
            self._pieces.append(piece)
        return piece

    def _decode(self, ids: List[int]) -> str:
        return self._tokenizer.decode(
            ids, skip_special_tokens=self._skip_special, clean_up_tokenization_spaces=False
        )

    def _skipped_ids(self) -> FrozenSet[int]:
        """Ids that decode drops under ``skip_special_tokens=True``, asked of the tokenizer itself."""
        candidates = set(getattr(self._tokenizer, "all_special_ids", ()))
        candidates.update(getattr(self._tokenizer, "added_tokens_decoder", {}))
        return frozenset(
            i
            for i in candidates
            if self._decode([i]) == ""
            and self._tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) != ""
        )
