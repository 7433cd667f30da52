"""LLaVA-OneVision adapter: one chunk per video frame, plain 1-D RoPE positions in token order.

Based on LLaVA-OneVision (Li et al., 2024, "LLaVA-OneVision: Easy Visual Task
Transfer"), the model family of the InfiniPot-V paper's streaming results, as
implemented by transformers 5.x (``LlavaOnevisionForConditionalGeneration``,
``LlavaOnevisionProcessor``); tested against transformers 5.24. Real ids:
``llava-hf/llava-onevision-qwen2-0.5b-ov-hf``, ``llava-hf/llava-onevision-qwen2-7b-ov-hf``.

Prompt layout (the model's own chat template, split at its ``<video>``)::

    <|im_start|>system\\n ... <|im_start|>user\\n          <- protected prefix, positions 0..P-1
    [frame 0][frame 1] ...                                 <- one chunk per frame, positions in token order
    [newline]\\n{question}<|im_end|>\\n<|im_start|>assistant\\n <- scratch: question + answer

How the model reads a video, and the stream's chunks:

* **Vision.** Every frame is resized to the SigLIP tower's square input
  (384 x 384 for the released models: 27 x 27 patches of 14 px), encoded on
  its own (no attention across frames), projected to the LM width, then
  pooled 2x2 bilinearly to ceil(27 / 2) = 14 x 14 = 196 tokens
  (``get_video_features`` / ``apply_pooling``). So a frame is a chunk
  (``frames_per_patch`` = 1) whose grid is the pooled feature grid: TaR
  compares the same place across frames, VaN pools over the frame's grid.
  ``max_pixels`` / ``min_pixels`` change nothing here: the input size is fixed
  by the tower.
* **One newline per video.** transformers appends a single learned
  ``image_newline`` embedding after the last frame of a video (the
  processor gives the video F x 196 + 1 ``<video>`` tokens). In a stream the
  video ends when a question is asked, so the newline belongs to the
  question's scratch: :meth:`LlavaOneVisionAdapter.question_ids` starts with
  one ``<video>`` id whose embedding :meth:`~LlavaOneVisionAdapter.generate`
  replaces by ``image_newline``, exactly as the one-shot forward does.
* **Positions.** The text stack (Qwen2) uses plain 1-D RoPE with position
  ids in token order. A chunk starts at the cache's max(position) + 1 (the
  prefix length for the first) and its n tokens take consecutive ids, so
  ``VisionChunk.position`` / ``max_position`` are its first / last id and text
  after it continues at ``max_position + 1``. Without compression this is the
  one-shot sequence exactly (tested: streaming == one-shot); after a
  compression the gaps of evicted tokens stay (kept tokens keep their ids).

Re-basing for unbounded uptime (:meth:`LlavaOneVisionAdapter.rebase_positions`):
ids grow by 196 per frame (~400 per second at 2 fps; Qwen2-0.5B is trained
to 32K), so when the next chunk's first id would pass the threshold T the
stream is moved down by delta = max(t_min - P, next - P - T // 2) (the rule of
:meth:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter.plan_rebase`; t_min
= the first id of the oldest cached chunk): a chunk starting at t moves to
max(t - delta, P), all its keys rotated by minus its shift in every rotary
pair (:mod:`infinipot_ros.kv.rope`), the prefix stays. When t_min - P is the
larger term this is one translation of the whole stream (only the distance
from the prefix changes); otherwise chunks older than ``next - T // 2`` are
all moved to P, so they share ids with each other (their order is lost, not
their content). Positions do not depend on stream time, so the stream clock
never moves (``rebase_positions`` returns 0 ns; ``cache.rebases`` counts).
"""
from __future__ import annotations

import dataclasses
import inspect
import math
import time
from typing import Any, Optional, Sequence

import numpy as np
import torch

from ..kv import CappedKVCache, VisionChunk
from ..kv.cache import RebaseEvent
from .base import Answer, EncodedPatch, ModelAdapter, TokenCallback
from .detokenize import IncrementalDetokenizer
from .qwen2_5_vl import (_VISIBLE_KW, ATTN_IMPLEMENTATION, DEFAULT_SYSTEM_PROMPT, _causal_mask, _make_cache_view,
                         _register_attention)
from .static_decode import ALLOWED_KW, DECODE_MODES, StaticDecodeStep

_QUESTION = "\x00QUESTION\x00"


class LlavaOneVisionAdapter(ModelAdapter):
    """LLaVA-OneVision (and the tiny test model of the same architecture) for streaming.

    Args:
        model_path: local directory or HF id (already resolved; see ``load_adapter``).
        device: torch device ("cpu", "cuda", "cuda:0").
        dtype: model and KV dtype (bf16 on CUDA, fp32 on CPU by default).
        max_pixels, min_pixels: accepted like the other families' (the engine passes them);
            unused: every frame is resized to the vision tower's fixed square input.
        system_prompt: system message of the chat template.
        local_files_only: never contact the hub.
        allow_pickle: also load pickle weights when there are no safetensors (default: safetensors only).
        decode_mode: see :class:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter`.
    """

    #: One camera frame per chunk: LLaVA-OneVision encodes and pools every frame on its own.
    frames_per_patch = 1

    def __init__(
        self,
        model_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: Optional[int] = None,
        min_pixels: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        local_files_only: bool = True,
        decode_mode: str = "auto",
        allow_pickle: bool = False,
    ) -> None:
        from transformers import AutoProcessor, LlavaOnevisionForConditionalGeneration

        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.compile_backend: Any = None  # torch.compile backend of decode_mode "compile" (None = inductor)
        self._static_step: Optional[StaticDecodeStep] = None

        _register_attention()
        self.model_id = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = LlavaOnevisionForConditionalGeneration.from_pretrained(
            model_path, dtype=dtype, attn_implementation=ATTN_IMPLEMENTATION,
            local_files_only=local_files_only, use_safetensors=None if allow_pickle else True,
            trust_remote_code=False,
        ).to(self.device)
        self.model.eval()
        self.processor = AutoProcessor.from_pretrained(model_path, local_files_only=local_files_only,
                                                       trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer
        self.max_pixels, self.min_pixels = max_pixels, min_pixels
        self.system_prompt = system_prompt

        cfg = self.model.config
        text_cfg, vis_cfg = cfg.text_config, cfg.vision_config
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = text_cfg.num_key_value_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        self.layer_types = list(getattr(text_cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
        side = int(vis_cfg.image_size) // int(vis_cfg.patch_size)  # patches per side of the tower's input
        self.grid = (math.ceil(side / 2), math.ceil(side / 2))  # after the 2x2 bilinear pooling
        self.video_token_id = int(cfg.video_token_id)

        self._lm = self.model.model.language_model
        emb = self._lm.rotary_emb
        self._rope_type = str(getattr(emb, "rope_type", "default"))
        self.rope_inv_freq = emb.inv_freq.detach().to("cpu", torch.float32).clone()  # [D/2] rad per position
        self._cache_kw = "cache" if "cache" in inspect.signature(self._lm.forward).parameters else "past_key_values"
        self._prefix_text, self._suffix_template = self._split_template()
        self._prefix_ids = self._encode(self._prefix_text)
        self.eos_ids = self._eos_ids()
        self.num_decodable = min(len(self.tokenizer), int(text_cfg.vocab_size))

    # ------------------------------------------------------------- templates
    def _render(self, question: str) -> str:
        messages = [
            {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]},
            {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": question}]},
        ]
        return self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _split_template(self) -> tuple[str, str]:
        text = self._render(_QUESTION)
        video = self.processor.video_token
        if text.count(video) != 1 or text.count(_QUESTION) != 1 or text.index(video) > text.index(_QUESTION):
            raise RuntimeError(f"chat template of {self.model_id} does not render one video then the question")
        prefix, rest = text.split(video)
        return prefix, rest

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def _eos_ids(self) -> set[int]:
        ids = set()
        for tok in ("<|im_end|>", "<|endoftext|>"):
            tid = self.tokenizer.convert_tokens_to_ids(tok)
            if isinstance(tid, int) and tid != self.tokenizer.unk_token_id:
                ids.add(tid)
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        if isinstance(gen_eos, int):
            ids.add(gen_eos)
        elif gen_eos:
            ids.update(gen_eos)
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    def question_ids(self, question: str) -> list[int]:
        """Token ids of the scratch for ``question``: one ``<video>`` id (the video's closing
        ``image_newline``, whose embedding :meth:`generate` puts there), then the template's rest."""
        return [self.video_token_id] + self._encode(self._suffix_template.replace(_QUESTION, question))

    @property
    def prefix_ids(self) -> list[int]:
        return list(self._prefix_ids)

    def _scratch_embeds(self, ids: Sequence[int]) -> torch.Tensor:
        """[k, hidden] embeddings of scratch ids from :meth:`question_ids`: the first is ``image_newline``."""
        embeds = self.model.get_input_embeddings()(torch.tensor(list(ids), device=self.device))
        embeds[0] = self.model.model.image_newline.to(embeds.dtype)
        return embeds

    # ------------------------------------------------------------------ vision
    def patch_grid(self, height: int, width: int) -> tuple[int, int]:
        """Pooled token grid (rows, cols) of a frame; the same for every frame size (fixed tower input)."""
        return self.grid

    def max_chunk_tokens(self) -> int:
        """Tokens per frame: the pooled grid (196 for the released models, 49 for the tiny one)."""
        return self.grid[0] * self.grid[1]

    @torch.inference_mode()
    def encode_patch(self, frames: Sequence[np.ndarray]) -> EncodedPatch:
        """Vision-encode one frame: SigLIP, projector, 2x2 bilinear pooling (the model's ``get_video_features``).

        Args:
            frames: one RGB uint8 array [H, W, 3].

        Returns:
            EncodedPatch with embeds [grid_h * grid_w, hidden] in the model dtype (the video's
            closing ``image_newline`` is left out: it is the question's, see the module docstring).

        Raises:
            ValueError: not one frame, or not RGB uint8 [H, W, 3].
        """
        if len(frames) != self.frames_per_patch:
            raise ValueError(f"a LLaVA-OneVision chunk has {self.frames_per_patch} frame, got {len(frames)}")
        frame = frames[0]
        if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            raise ValueError(f"frames must be RGB uint8 [H, W, 3], got {frame.shape} {frame.dtype}")
        out = self.processor.video_processor(videos=[frame[None]], return_tensors="pt")
        pixels = out["pixel_values_videos"].to(self.device, self.model.model.vision_tower.dtype)  # [1, 1, 3, S, S]
        feats = self.model.model.get_video_features(pixels).pooler_output  # [1, n + 1, hidden]: + image_newline
        gh, gw = self.grid
        if feats.shape[1] != gh * gw + 1:
            raise RuntimeError(f"{self.model_id}: {feats.shape[1] - 1} tokens per frame, expected {gh}x{gw}")
        return EncodedPatch(feats[0, :-1].to(self.dtype), gh, gw)

    # --------------------------------------------------------------- positions
    @staticmethod
    def next_text_position(cache: CappedKVCache) -> int:
        """First position after everything cached: max(position) + 1 (prefix only: its length)."""
        top = cache.table.max_position()
        return cache.prefix_length if top is None else top + 1

    # ---------------------------------------------------------------- re-base
    def plan_rebase(self, cache: CappedKVCache, next_position: int, threshold: int) -> int:
        """How far to move the stream down before a chunk starting at ``next_position``; 0 = not needed.

        Needed when ``next_position`` > ``threshold`` (T; 0 = never); then
        delta = max(t_min - P, next_position - P - T // 2) with P the prefix length and
        t_min the first position of the oldest cached chunk (see the module docstring).

        Raises:
            ValueError: a threshold that leaves no room after the prefix (P >= T - T // 2).
        """
        if threshold <= 0 or next_position <= threshold:
            return 0
        p = cache.prefix_length
        if p >= threshold - threshold // 2:
            raise ValueError(f"rebase_position_threshold={threshold} leaves no room after the {p}-token prefix: "
                             f"it must be more than twice the prefix length")
        first = cache.table.column("position")
        t_min = int(first.min()) if first.numel() else next_position
        return max(t_min - p, next_position - p - threshold // 2)

    def rebase(self, cache: CappedKVCache, delta: int) -> RebaseEvent:
        """Move the cached stream down by ``delta`` positions, in place; the prefix stays.

        A chunk starting at t moves by s = min(delta, t - P) to t - s (so never below P);
        its keys are rotated by -s x theta_i in all D/2 rotary pairs (plain RoPE), its table
        ``position`` / ``max_position`` move by s.

        Raises:
            ValueError: delta < 0.
            NotImplementedError: a rotary scaling whose frequencies depend on the sequence length.
        """
        if delta < 0:
            raise ValueError(f"rebase moves positions down only, got delta={delta}")
        if self._rope_type.startswith("dynamic") or self._rope_type == "longrope":
            raise NotImplementedError(f"re-basing needs fixed rotary frequencies, not rope_type={self._rope_type!r}")
        p, table = cache.prefix_length, cache.table
        per_chunk = torch.clamp(table.column("position") - p, min=0).clamp(max=delta)
        return cache.rebase(per_chunk, inv_freq=self.rope_inv_freq, pairs=[(0, self.rope_inv_freq.numel())],
                            fixed_max_position=table.column("max_position") - per_chunk, stream_delta=delta)

    def rebase_positions(self, cache: CappedKVCache, seconds: float, threshold: int) -> int:
        """Re-base the stream if the next chunk's first position would pass ``threshold``.

        Args:
            seconds: time of the next chunk (unused: positions count tokens, not time).
            threshold: T, the largest first position a chunk may get (0 = never re-base).

        Returns:
            0 (ns): the stream clock never moves for this family; ``cache.rebases`` /
            ``cache.last_rebase`` report a re-base.
        """
        delta = self.plan_rebase(cache, self.next_text_position(cache), threshold)
        if delta > 0:
            self.rebase(cache, delta)
        return 0

    # --------------------------------------------------------------- forwards
    def _forward(
        self,
        cache: CappedKVCache,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        *,
        visible: Optional[list[torch.Tensor]] = None,
        logits: str = "last",
    ) -> Optional[torch.Tensor]:
        """One forward of [n, hidden] embeddings at [n] positions, appending to the cache.

        Returns [n, vocab] ("all") or [vocab] ("last") float32 logits, or None ("none").
        """
        n = embeds.shape[0]
        past = cache.get_seq_length()
        mask = None if past == 0 or n == 1 else _causal_mask(n, past + n, self.device)
        kwargs: dict[str, Any] = {
            "inputs_embeds": embeds[None].to(self.dtype),
            "position_ids": positions.reshape(1, -1).to(self.device),
            "attention_mask": {lt: mask for lt in set(self.layer_types)},
            self._cache_kw: _make_cache_view(cache),
            "use_cache": True,
        }
        if visible is not None:
            kwargs[_VISIBLE_KW] = visible
        hidden = self._lm(**kwargs).last_hidden_state[0]
        if logits == "none":
            return None
        if logits == "last":
            hidden = hidden[-1:]
        result = self.model.lm_head(hidden).float()
        return result[-1] if logits == "last" else result

    @torch.inference_mode()
    def prefill_prefix(self, cache: CappedKVCache) -> int:
        ids = torch.tensor(self._prefix_ids, device=self.device)
        with cache.prefix():
            self._forward(cache, self.model.get_input_embeddings()(ids), torch.arange(len(ids)), logits="none")
        return len(ids)

    @torch.inference_mode()
    def prefill_patch(
        self,
        cache: CappedKVCache,
        patch: EncodedPatch,
        chunk: VisionChunk,
        return_logits: bool = False,
        *,
        seconds: float = 0.0,
    ) -> Optional[torch.Tensor]:
        """Prefill one encoded frame as a chunk at the next positions; the cache compresses itself if it fills.

        Args:
            cache: the stream's cache (prefix written).
            patch: output of :meth:`encode_patch`.
            chunk: its metadata (camera, stamps); grid must match the patch.
            return_logits: return [n, vocab] logits of the chunk's tokens (tests).
            seconds: time of the frame since the stream's first frame (unused: positions count tokens).

        Raises:
            ValueError: grid mismatch.
        """
        if (chunk.grid_h, chunk.grid_w) != (patch.grid_h, patch.grid_w):
            raise ValueError(f"chunk grid {chunk.grid_h}x{chunk.grid_w} != patch grid {patch.grid_h}x{patch.grid_w}")
        start = self.next_text_position(cache)
        n = patch.num_tokens
        chunk = dataclasses.replace(chunk, position=start, max_position=start + n - 1)
        with cache.vision_chunk(chunk):
            return self._forward(cache, patch.embeds, torch.arange(n) + start,
                                 logits="all" if return_logits else "none")

    # ------------------------------------------------------------------ notes
    def note_text(self, text: str, seconds: float) -> str:
        """How a note reads between two frames (LLaVA-OneVision has no vision start/end tokens)."""
        return f"\nNote at {seconds:.1f} s: {text}\n"

    def note_ids(self, text: str, seconds: float = 0.0) -> list[int]:
        """Token ids of a note (see :meth:`note_text`)."""
        return self._encode(self.note_text(text, seconds))

    @torch.inference_mode()
    def prefill_note(self, cache: CappedKVCache, ids: Sequence[int], chunk: VisionChunk, *,
                     seconds: float = 0.0) -> None:
        """Prefill a note's ids as a 1 x k text chunk (camera NOTE_CAMERA) at the next positions.

        Raises:
            ValueError: empty ids, or a chunk that is not the note's 1 x k text chunk.
        """
        from ..kv import NOTE_CAMERA

        n = len(ids)
        if n == 0 or (chunk.grid_h, chunk.grid_w) != (1, n) or chunk.camera != NOTE_CAMERA or chunk.num_frames:
            raise ValueError(f"a note of {n} tokens needs a 1 x {n} text chunk of camera NOTE_CAMERA, got {chunk}")
        start = self.next_text_position(cache)
        chunk = dataclasses.replace(chunk, position=start, max_position=start + n - 1)
        embeds = self.model.get_input_embeddings()(torch.tensor(list(ids), device=self.device))
        with cache.vision_chunk(chunk):
            self._forward(cache, embeds, torch.arange(n) + start, logits="none")

    # ------------------------------------------------------------------ answers
    def _decode_step(self, cache: CappedKVCache) -> StaticDecodeStep:
        """The static decode step bound to ``cache``'s buffers (built again, and re-captured, if they changed)."""
        step = self._static_step
        if step is None or not step.bound_to(cache):
            layer_types = set(self.layer_types)

            def forward(embeds, position_ids, view, allowed):
                out = self._lm(inputs_embeds=embeds, position_ids=position_ids,
                               attention_mask={lt: None for lt in layer_types},
                               use_cache=True, **{self._cache_kw: view, ALLOWED_KW: allowed})
                return out.last_hidden_state

            step = StaticDecodeStep(
                cache, forward=forward, embed=self.model.get_input_embeddings(),
                head=lambda h: self.model.lm_head(h).float(),
                positions=lambda p: p.view(1, 1),  # 1-D RoPE: [B, 1]
                mode=self.decode_mode, compile_backend=self.compile_backend,
            )
            self._static_step = step
        return step

    @torch.inference_mode()
    def generate(
        self,
        cache: CappedKVCache,
        question: str,
        *,
        max_new_tokens: int = 128,
        visible: Optional[list[torch.Tensor]] = None,
        on_token: Optional[TokenCallback] = None,
        temperature: float = 0.0,
        seed: int = 0,
    ) -> Answer:
        """Answer from the cache; the video's closing newline, question and answer are removed afterwards.

        As :meth:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter.generate` (greedy by default,
        the static decode step, incremental detokenization, ``on_token`` returning False cancels),
        with 1-D positions continuing from the cache and ``image_newline`` first in the scratch.
        """
        t0 = time.perf_counter()
        q_ids = self.question_ids(question)
        start = self.next_text_position(cache)
        embed = self.model.get_input_embeddings()
        gen = torch.Generator(device="cpu").manual_seed(seed)
        detok = IncrementalDetokenizer(self.tokenizer, skip_special_tokens=True)
        out_ids: list[int] = []
        stopped = "max_new_tokens"
        context = cache.get_seq_length()
        if visible is not None:
            context = int(round(sum(int(v[0].sum()) for v in visible) / (len(visible) * visible[0].shape[1])))
        t_first = t0
        with cache.scratch():
            cache.ensure_capacity(cache.get_seq_length() + len(q_ids) + max_new_tokens)
            logits = self._forward(cache, self._scratch_embeds(q_ids), torch.arange(len(q_ids)) + start,
                                   visible=visible)
            next_pos = start + len(q_ids)
            step = None if self.decode_mode == "dynamic" else self._decode_step(cache)
            if step is not None:
                step.begin(visible)
            for i in range(max_new_tokens):
                logits = logits[: self.num_decodable]
                if temperature > 0:
                    probs = torch.softmax(logits.cpu() / temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                else:
                    tok = int(torch.argmax(logits))
                if i == 0:
                    t_first = time.perf_counter()
                if tok in self.eos_ids:
                    stopped = "eos"
                    break
                out_ids.append(tok)
                piece = detok.push(tok)
                if on_token is not None and on_token(piece, len(out_ids)) is False:
                    stopped = "cancelled"
                    break
                if i + 1 == max_new_tokens:
                    break
                if step is not None:
                    logits = step(tok, next_pos)
                else:
                    logits = self._forward(cache, embed(torch.tensor([tok], device=self.device)),
                                           torch.tensor([next_pos]), visible=visible)
                next_pos += 1
        tail = detok.flush()
        if on_token is not None and tail and stopped != "cancelled":
            on_token(tail, len(out_ids))
        t_end = time.perf_counter()
        ttft = (t_first - t0) if max_new_tokens > 0 else 0.0
        tps = (len(out_ids) - 1) / (t_end - t_first) if len(out_ids) > 1 and t_end > t_first else 0.0
        return Answer(text=detok.text.strip(), token_ids=out_ids, context_tokens=context, stopped_by=stopped,
                      ttft_s=ttft, decode_tok_s=tps)
