"""Settings of the streaming engine, shared by the ROS node and the CLI."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Tuple

from ..kv import DEFAULT_POOL_KERNELS, POLICIES, CacheBudget, PolicySettings, ScoringPolicy, make_policy
from ..models import DECODE_MODES, DEFAULT_MODEL
from .snapshot import check_snapshot_path

#: Upper bound of ``max_new_tokens`` (any configuration).
MAX_NEW_TOKENS_LIMIT = 4096

#: Settings that may change while the engine runs (:meth:`StreamingAssistant.update_settings`;
#: ROS: ``ros2 param set``). Every other field is fixed once the model and cache are built.
LIVE_FIELDS = (
    "frame_rate_hz", "max_new_tokens", "max_question_tokens", "temperature",
    "ask_timeout_s", "max_pending_asks", "max_ingest_gap_s",
)


@dataclass
class EngineConfig:
    """Everything the engine needs to start; validated in ``__post_init__``.

    Attributes:
        model: ``builtin:tiny-qwen2.5-vl``, a local directory or an HF id (resolved and
            checked when the model loads: :func:`~infinipot_ros.models.resolve.resolve_model`).
        allow_pickle: also load pickle weights (``pytorch_model.bin``, ``*.pt``) of a model
            without safetensors; False = safetensors only (pickle can run code on load).
            Code shipped with a model (``auto_map``) never runs, whatever this says.
        allow_download: fetch an HF id that is not in the local HF cache from the hub;
            False = no network at run time (``local_files_only``). ``HF_HUB_OFFLINE=1``
            keeps the loader offline even when True.
        device: "auto" (CUDA if available), "cpu", "cuda", "cuda:N".
        dtype: "auto" (bf16 on CUDA, fp32 on CPU), "float32", "bfloat16", "float16".
        max_pixels: cap on pixels per frame after resizing (robots downscale).
        min_pixels: floor on pixels per frame; None = the processor's.
        system_prompt: system message; None = the adapter's default.
        frame_rate_hz: frames per second sampled by header stamp; <= 0 = every frame.
        policy: compression method (see ``kv.POLICIES``) or "none" for a full, uncapped cache.
        max_vision_tokens: M, vision tokens per layer and KV head at the cap.
        budget_mb: cap on the resident KV cache (prefix + vision) in MB (1e6 B);
            used instead of max_vision_tokens when set.
        target_ratio: C / M after a compression.
        tar_ratio: alpha, share of C chosen by TaR (InfiniPot-V).
        recent_ratio: share of cached frames treated as recent by TaR.
        pool_kernels: VaN pooling kernels per layer quarter; () = no pooling.
        reserve_tokens: KV slots beyond prefix + M for the chunk being prefilled or the
            question + answer (they never coexist); 0 (default) = sized from the
            largest chunk ``max_pixels`` allows and the longest question + answer
            (``max_question_tokens`` + ``max_new_tokens``), so the reserved KV bytes
            stay within budget + one chunk + one answer.
        layers_per_pass: layers scored together per compression pass; 0 = all (fewest
            operations); fewer bounds the transient memory of the torch path.
        max_new_tokens: answer length cap in tokens: the default of a request and
            the most it may ask for (the KV reserve is sized for it).
        max_question_tokens: longest question accepted, in tokens (longer: BAD_REQUEST).
        decode_mode: answer decoding (models.static_decode.DECODE_MODES): "auto" = a
            static-shape step, a CUDA graph on CUDA; "eager", "compile", "dynamic".
        temperature: 0 = greedy decoding (repeatable), > 0 samples.
        time_jump_s: a header stamp this many seconds older than its camera's last
            accepted one is a jump back (see :mod:`.gate`); 0 = no jump rule.
        time_jump_frames: consecutive jumped frames of one camera that restart the
            stream (forgetting the memory); fewer are dropped and counted.
        ask_timeout_s: default time a question waits for its answer, queueing included (s).
        max_pending_asks: questions allowed to wait; more are refused with BUSY.
        max_ingest_gap_s: under continuous questions, a camera with a frame waiting
            gets a frame pair ingested at least this often (wall time, s): questions
            cannot starve the scene memory.
        snapshot_path: memory snapshot file loaded at start (configure) if it exists and
            written by ``save_memory`` ("" = none); resolved (``~``, symlinks) and checked
            here: not a directory, in an existing writable directory (ValueError otherwise).
        autosave_s: > 0 saves the memory to ``snapshot_path`` every this many seconds
            (atomically); 0 = only on request.
        rebase_position_threshold: T, the largest temporal M-RoPE position a chunk may
            get; a chunk that would pass it first re-bases the stream (cached tokens and
            stream clock move down, the prefix stays; see models/qwen2_5_vl.py), so a
            stream can run for days. 0 = never. Default 16384: Qwen2.5-VL's long-context
            training used sequences up to 32768 tokens, so positions up to T plus a
            question and answer stay at half of that; re-bases come at least T / 2 positions
            apart (68 minutes of stream at Qwen2.5-VL's 2 positions/s). Must be 0 or >= 1024.
        max_note_tokens: longest text event (note) accepted into the stream, in tokens
            (template included); longer ones are rejected and counted. A note is a chunk
            of the stream, compressed under the same cap M, so it must fit C.
    """

    model: str = DEFAULT_MODEL
    allow_pickle: bool = False
    allow_download: bool = False
    device: str = "auto"
    dtype: str = "auto"
    max_pixels: int = 256 * 28 * 28
    min_pixels: Optional[int] = None
    system_prompt: Optional[str] = None
    frame_rate_hz: float = 2.0
    policy: str = "infinipot_v"
    max_vision_tokens: Optional[int] = 4096
    budget_mb: Optional[float] = None
    target_ratio: float = 0.75
    tar_ratio: float = 0.5
    recent_ratio: float = 0.125
    pool_kernels: Tuple[Tuple[int, int, int], ...] = field(default=DEFAULT_POOL_KERNELS)
    reserve_tokens: int = 0
    layers_per_pass: int = 0
    max_new_tokens: int = 128
    max_question_tokens: int = 256
    temperature: float = 0.0
    decode_mode: str = "auto"
    time_jump_s: float = 5.0
    time_jump_frames: int = 3
    ask_timeout_s: float = 30.0
    max_pending_asks: int = 4
    max_ingest_gap_s: float = 2.0
    snapshot_path: str = ""
    autosave_s: float = 0.0
    rebase_position_threshold: int = 16384
    max_note_tokens: int = 128

    def __post_init__(self) -> None:
        if self.policy != "none" and self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose none or one of {sorted(POLICIES)}")
        if self.max_pixels < 28 * 28:
            raise ValueError(f"max_pixels must be >= 784 (one 28x28 merged patch), got {self.max_pixels}")
        if self.budget_mb is not None and self.budget_mb <= 0:
            raise ValueError(f"budget_mb must be > 0, got {self.budget_mb}")
        if self.policy != "none" and self.budget_mb is None and not self.max_vision_tokens:
            raise ValueError("a compression policy needs a budget: max_vision_tokens or budget_mb")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if self.max_question_tokens < 1:
            raise ValueError(f"max_question_tokens must be >= 1, got {self.max_question_tokens}")
        if self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {DECODE_MODES}, got {self.decode_mode!r}")
        if self.layers_per_pass < 0:
            raise ValueError(f"layers_per_pass must be >= 0, got {self.layers_per_pass}")
        if self.time_jump_s < 0:
            raise ValueError(f"time_jump_s must be >= 0, got {self.time_jump_s}")
        if self.time_jump_frames < 1:
            raise ValueError(f"time_jump_frames must be >= 1, got {self.time_jump_frames}")
        if self.ask_timeout_s <= 0:
            raise ValueError(f"ask_timeout_s must be > 0, got {self.ask_timeout_s}")
        if self.max_pending_asks < 1:
            raise ValueError(f"max_pending_asks must be >= 1, got {self.max_pending_asks}")
        if self.max_ingest_gap_s <= 0:
            raise ValueError(f"max_ingest_gap_s must be > 0, got {self.max_ingest_gap_s}")
        if self.autosave_s < 0:
            raise ValueError(f"autosave_s must be >= 0, got {self.autosave_s}")
        if self.autosave_s > 0 and not self.snapshot_path:
            raise ValueError("autosave_s > 0 needs a snapshot_path")
        if self.snapshot_path:
            self.snapshot_path = check_snapshot_path(self.snapshot_path,
                                                     parameter="snapshot_path (cache.snapshot_path)")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.rebase_position_threshold != 0 and self.rebase_position_threshold < 1024:
            raise ValueError(f"rebase_position_threshold must be 0 (never) or >= 1024 (room after the prefix), "
                             f"got {self.rebase_position_threshold}")
        if self.max_note_tokens < 1:
            raise ValueError(f"max_note_tokens must be >= 1, got {self.max_note_tokens}")
        if self.reserve_tokens < 0:
            raise ValueError(f"reserve_tokens must be >= 0, got {self.reserve_tokens}")
        self.pool_kernels = tuple(tuple(int(x) for x in k) for k in self.pool_kernels)  # type: ignore[assignment]
        self.make_budget()  # validates target_ratio and the budget numbers
        self.make_policy()  # validates the policy's own settings

    @property
    def capped(self) -> bool:
        return self.policy != "none"

    def make_budget(self) -> CacheBudget:
        if not self.capped:
            return CacheBudget()
        if self.budget_mb is not None:
            return CacheBudget.from_megabytes(self.budget_mb, target_ratio=self.target_ratio)
        return CacheBudget(max_vision_tokens=self.max_vision_tokens, target_ratio=self.target_ratio)

    def make_policy(self) -> Optional[ScoringPolicy]:
        """The compression policy (None for "none"), built from the typed :class:`PolicySettings`."""
        return make_policy(self.policy, self.policy_settings)

    @property
    def policy_settings(self) -> PolicySettings:
        return PolicySettings(tar_ratio=self.tar_ratio, recent_ratio=self.recent_ratio,
                              pool_kernels=self.pool_kernels or None)

    def adapter_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`~infinipot_ros.models.load_adapter` besides model, device and dtype."""
        kw: dict[str, Any] = {"max_pixels": self.max_pixels, "min_pixels": self.min_pixels,
                              "decode_mode": self.decode_mode, "allow_pickle": bool(self.allow_pickle),
                              "allow_download": bool(self.allow_download)}
        if self.system_prompt:
            kw["system_prompt"] = self.system_prompt
        return kw
