"""Qwen2-VL adapter (the InfiniPot-V paper's offline model): the Qwen2.5-VL streaming path, Qwen2-VL's time axis.

Based on Qwen2-VL (Wang et al., 2024) as implemented by transformers 5.x
(``Qwen2VLForConditionalGeneration``); tested against transformers 5.24.
Everything that is the same as Qwen2.5-VL is inherited from
:class:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter`: the prompt
layout (system .. ``<|vision_start|>`` protected, one chunk per temporal
patch, ``<|vision_end|>`` + question as scratch), the video processor
(``Qwen2VLVideoProcessor``: 14-pixel patches, 2 frames per temporal patch,
2x2 merge), chunked prefill with explicit 3-D M-RoPE ids, masked SDPA and
the static decode step. What differs:

* Vision tower: full attention in every block (no window attention),
  LayerNorm + GELU blocks, a LayerNorm + MLP patch merger. The adapter calls
  the model's own ``get_video_features``, so nothing changes here; each
  temporal patch attends only within itself in the tower (``cu_seqlens`` per
  temporal patch), which is why encoding patch by patch equals encoding the
  whole clip.
* Temporal M-RoPE ids: Qwen2-VL has no ``tokens_per_second``. Its
  ``get_rope_index`` gives the k-th temporal patch of a video the temporal id
  ``start + k`` whatever the clip's frame rate; the model was trained on videos
  sampled at 2 fps, so one temporal id stood for one temporal patch = 2 frames
  = 1 second.

Stream time -> temporal ids (the choice for a streaming robot): a chunk whose
first frame is ``s`` seconds after the stream's first frame (header stamps)
gets temporal id ``P + floor(s * temporal_ids_per_second)``, default 1 id per
second, i.e. the time scale the model saw in training. Hence:

* at the default 2 Hz sampling (``stream.frame_rate_hz``), chunks are 1 s apart
  and the ids are exactly the patch indices transformers gives the same frames
  as one video (tested: streaming == one-shot);
* a pause or dropped frames leave the matching gap in the ids (the model sees
  how much time passed), unlike a pure patch counter;
* chunks of several cameras stamped within the same second share a temporal
  id, as simultaneous views; above 2 Hz, consecutive chunks of one camera
  within one second share an id too (raise ``temporal_ids_per_second`` to
  resolve them, at the cost of a time scale the model was not trained on).

Height / width ids and text after the video are as for Qwen2.5-VL (text
continues at max(position) + 1, Qwen2-VL's original rule; transformers 5.24's
``get_rope_index`` continues at ``start + max(H, W) / merge`` instead, which
only differs for text after a clip longer than its grid is wide).
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .qwen2_5_vl import DEFAULT_SYSTEM_PROMPT, Qwen2_5_VLAdapter, _register_attention, ATTN_IMPLEMENTATION
from .static_decode import DECODE_MODES

#: Temporal M-RoPE ids per second of stream time: Qwen2-VL's training videos were sampled at
#: 2 fps with 2 frames per temporal patch, so one id per second.
QWEN2_VL_TEMPORAL_IDS_PER_SECOND = 1.0


class Qwen2VLAdapter(Qwen2_5_VLAdapter):
    """Qwen2-VL (and the tiny test model of the same architecture) for streaming.

    Args:
        model_path: local directory or HF id (already resolved; see ``load_adapter``).
        device, dtype, max_pixels, min_pixels, system_prompt, local_files_only, decode_mode,
        allow_pickle:
            as :class:`~infinipot_ros.models.qwen2_5_vl.Qwen2_5_VLAdapter`.
        temporal_ids_per_second: temporal M-RoPE ids per second of stream time
            (default 1.0, the model's training scale; see the module docstring).
    """

    #: The transformers class of this family's checkpoints.
    model_class_name = "Qwen2VLForConditionalGeneration"

    def __init__(
        self,
        model_path: str,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_pixels: int = 256 * 28 * 28,
        min_pixels: Optional[int] = None,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        local_files_only: bool = True,
        decode_mode: str = "auto",
        allow_pickle: bool = False,
        temporal_ids_per_second: float = QWEN2_VL_TEMPORAL_IDS_PER_SECOND,
    ) -> None:
        if not temporal_ids_per_second > 0:
            raise ValueError(f"temporal_ids_per_second must be > 0, got {temporal_ids_per_second}")
        self._load(model_path, device=device, dtype=dtype, max_pixels=max_pixels, min_pixels=min_pixels,
                   system_prompt=system_prompt, local_files_only=local_files_only, decode_mode=decode_mode,
                   allow_pickle=allow_pickle)
        self.tokens_per_second = float(temporal_ids_per_second)  # what the inherited chunk_positions reads

    def _load(self, model_path: str, *, device, dtype, max_pixels, min_pixels, system_prompt, local_files_only,
              decode_mode, allow_pickle=False) -> None:
        """Load model and processor of :attr:`model_class_name` and set every attribute the inherited methods use.

        The Qwen2.5-VL constructor loads its own model class, so its set-up is repeated here;
        test/models/test_families.py checks that no attribute of a Qwen2.5-VL adapter is missing.
        """
        import transformers

        if decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {decode_mode!r}")
        self.decode_mode = decode_mode
        self.compile_backend: Any = None
        self._static_step = None

        _register_attention()
        self.model_id = str(model_path)
        self.device = torch.device(device)
        self.dtype = dtype
        model_cls = getattr(transformers, self.model_class_name)
        self.model = model_cls.from_pretrained(
            model_path,
            dtype=dtype,
            attn_implementation=ATTN_IMPLEMENTATION,
            local_files_only=local_files_only,
            use_safetensors=None if allow_pickle else True,  # None: safetensors if present, else pickle
            trust_remote_code=False,
        ).to(self.device)
        self.model.eval()
        self.processor = transformers.AutoProcessor.from_pretrained(model_path, local_files_only=local_files_only,
                                                                    trust_remote_code=False)
        self.tokenizer = self.processor.tokenizer

        cfg = self.model.config
        text_cfg = getattr(cfg, "text_config", cfg)
        vis_cfg = cfg.vision_config
        self.num_layers = text_cfg.num_hidden_layers
        self.num_kv_heads = text_cfg.num_key_value_heads
        self.head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // text_cfg.num_attention_heads
        self.layer_types = list(getattr(text_cfg, "layer_types", None) or ["full_attention"] * self.num_layers)
        self.frames_per_patch = int(vis_cfg.temporal_patch_size)
        self.spatial_merge = int(vis_cfg.spatial_merge_size)
        self.tokens_per_second = 1.0
        self.max_pixels = int(max_pixels)
        self.min_pixels = min_pixels
        self.system_prompt = system_prompt

        self._lm = self.model.model.language_model
        rotary_layout = getattr(self, "_rotary_layout", None)
        if rotary_layout is not None:  # where the base re-bases positions: the rotary frequencies it reads
            self.rope_inv_freq, self.mrope_section = rotary_layout(text_cfg)
        self._cache_kw = self._cache_keyword()
        self._video_kwargs = self._video_processor_kwargs()
        self._prefix_text, self._suffix_template = self._split_template()
        self._prefix_ids = self._encode(self._prefix_text)
        self.eos_ids = self._eos_ids()
        # Ids the tokenizer can decode; embedding rows beyond it (padding of real checkpoints) are never sampled.
        self.num_decodable = min(len(self.tokenizer), int(text_cfg.vocab_size))

    def _cache_keyword(self) -> str:
        """``cache`` (transformers >= 5.2x) or ``past_key_values``: whichever the decoder stack's forward takes."""
        import inspect

        return "cache" if "cache" in inspect.signature(self._lm.forward).parameters else "past_key_values"
