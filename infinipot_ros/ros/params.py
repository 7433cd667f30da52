"""Parameters of the infinipot_assistant node: declared in one place, read into an EngineConfig.

Names are grouped in namespaces (model.*, cache.*, stream.*, ask.*,
status.*) and documented in config/assistant.yaml. Every parameter has a
ParameterDescriptor with a description and, where it applies, a range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.node import Node

from ..engine import EngineConfig
from ..kv import POLICIES
from ..models import DEFAULT_MODEL

_STR = ParameterType.PARAMETER_STRING
_INT = ParameterType.PARAMETER_INTEGER
_DBL = ParameterType.PARAMETER_DOUBLE
_STRS = ParameterType.PARAMETER_STRING_ARRAY

# name, default, type, description, (min, max) or None
PARAMETERS: List[tuple] = [
    ("model.id", DEFAULT_MODEL, _STR,
     "builtin:tiny-qwen2.5-vl (embedded test model), a local model directory, or an HF id "
     "such as Qwen/Qwen2.5-VL-3B-Instruct (must be in the local HF cache when offline)", None),
    ("model.device", "auto", _STR, "torch device: auto (CUDA if available), cpu, cuda, cuda:N", None),
    ("model.dtype", "auto", _STR, "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16", None),
    ("model.max_pixels", 256 * 28 * 28, _INT,
     "cap on pixels per camera frame after resizing (multiples of 28x28; 200704 = 256 tokens per frame pair)",
     (784, 16384 * 28 * 28)),
    ("model.min_pixels", 0, _INT, "floor on pixels per frame; 0 keeps the processor's", (0, 16384 * 28 * 28)),
    ("model.system_prompt", "", _STR, "system message; empty = built-in robot assistant prompt", None),
    ("model.decode_mode", "auto", _STR,
     "answer decoding: auto (static-shape step; a CUDA graph on CUDA), eager, compile (torch.compile), dynamic",
     None),
    ("cache.policy", "infinipot_v", _STR,
     "KV compression: none (full cache, no cap) or one of " + ", ".join(sorted(POLICIES)), None),
    ("cache.max_vision_tokens", 4096, _INT, "M: max vision tokens per layer and KV head", (2, 1 << 20)),
    ("cache.budget_mb", 0.0, _DBL,
     "cap on the resident KV cache (prefix + vision) in MB (1e6 bytes); 0 = use cache.max_vision_tokens",
     (0.0, 1e6)),
    ("cache.target_ratio", 0.75, _DBL, "C/M: share of the budget kept by a compression", (0.05, 0.95)),
    ("cache.tar_ratio", 0.5, _DBL, "InfiniPot-V alpha: share of C chosen by TaR", (0.0, 1.0)),
    ("cache.recent_ratio", 0.125, _DBL, "share of cached frames treated as recent by TaR", (0.01, 0.9)),
    ("cache.reserve_tokens", 0, _INT,
     "KV slots beyond the cap for the chunk being prefilled or a question + answer; 0 = sized from the largest "
     "chunk (model.max_pixels) and ask.max_question_tokens + ask.max_new_tokens", (0, 1 << 20)),
    ("cache.layers_per_pass", 0, _INT,
     "layers scored together per compression pass; 0 = all (fewest operations); fewer = less transient memory "
     "on the torch path", (0, 1024)),
    ("stream.image_topics", ["/camera/image_raw"], _STRS,
     "camera topics; names ending in /compressed subscribe sensor_msgs/CompressedImage, others sensor_msgs/Image",
     None),
    ("stream.frame_rate_hz", 2.0, _DBL, "frames per second sampled per camera by header stamp; 0 = every frame",
     (0.0, 120.0)),
    ("stream.time_jump_reset_s", 5.0, _DBL,
     "a camera stamp this many seconds older than the last one (bag loop, sim reset) restarts the stream; 0 = never",
     (0.0, 1e9)),
    ("ask.max_new_tokens", 128, _INT,
     "answer length cap (tokens): the default of a request and the most it may ask (the KV reserve is sized for it)",
     (1, 4096)),
    ("ask.max_question_tokens", 256, _INT, "longest question accepted (tokens); longer ones get BAD_REQUEST",
     (1, 1 << 16)),
    ("ask.timeout_s", 30.0, _DBL, "default time an /ask request waits for its answer (s)", (0.1, 3600.0)),
    ("ask.max_pending", 4, _INT, "questions allowed to wait; more get BUSY", (1, 64)),
    ("ask.temperature", 0.0, _DBL, "0 = greedy decoding (repeatable answers); > 0 samples", (0.0, 5.0)),
    ("status.period_s", 1.0, _DBL, "status and diagnostics period (s); status is also sent after every chunk",
     (0.05, 3600.0)),
]


def declare_parameters(node: Node) -> None:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` with its descriptor."""
    for name, default, ptype, description, bounds in PARAMETERS:
        desc = ParameterDescriptor(name=name, type=ptype, description=description, read_only=True)
        if bounds is not None and ptype == _INT:
            desc.integer_range = [IntegerRange(from_value=int(bounds[0]), to_value=int(bounds[1]), step=0)]
        elif bounds is not None and ptype == _DBL:
            desc.floating_point_range = [FloatingPointRange(from_value=float(bounds[0]), to_value=float(bounds[1]), step=0.0)]
        node.declare_parameter(name, default, desc)


@dataclass
class NodeSettings:
    """Node-level settings besides the engine's."""

    image_topics: List[str]
    time_jump_reset_s: float
    ask_timeout_s: float
    max_pending_asks: int
    status_period_s: float


def read_parameters(node: Node) -> tuple[EngineConfig, NodeSettings]:
    """Build the EngineConfig and node settings from the declared parameters.

    Raises:
        ValueError: inconsistent values (unknown policy, empty topic list, ...).
    """

    def get(name: str) -> Any:
        return node.get_parameter(name).value

    topics = [t for t in (get("stream.image_topics") or []) if t]
    if not topics:
        raise ValueError("stream.image_topics is empty: give at least one camera topic")
    if len(set(topics)) != len(topics):
        raise ValueError(f"stream.image_topics has duplicates: {topics}")
    budget_mb = float(get("cache.budget_mb"))
    config = EngineConfig(
        model=get("model.id"),
        device=get("model.device"),
        dtype=get("model.dtype"),
        max_pixels=int(get("model.max_pixels")),
        min_pixels=int(get("model.min_pixels")) or None,
        system_prompt=get("model.system_prompt") or None,
        frame_rate_hz=float(get("stream.frame_rate_hz")),
        policy=get("cache.policy"),
        max_vision_tokens=int(get("cache.max_vision_tokens")),
        budget_mb=budget_mb if budget_mb > 0 else None,
        target_ratio=float(get("cache.target_ratio")),
        tar_ratio=float(get("cache.tar_ratio")),
        recent_ratio=float(get("cache.recent_ratio")),
        reserve_tokens=int(get("cache.reserve_tokens")),
        layers_per_pass=int(get("cache.layers_per_pass")),
        max_new_tokens=int(get("ask.max_new_tokens")),
        max_question_tokens=int(get("ask.max_question_tokens")),
        decode_mode=get("model.decode_mode"),
        temperature=float(get("ask.temperature")),
    )
    settings = NodeSettings(
        image_topics=topics,
        time_jump_reset_s=float(get("stream.time_jump_reset_s")),
        ask_timeout_s=float(get("ask.timeout_s")),
        max_pending_asks=int(get("ask.max_pending")),
        status_period_s=float(get("status.period_s")),
    )
    return config, settings
