"""Parameters of the infinipot_assistant node, derived from the engine's config dataclasses.

Every parameter maps to one field of :class:`~infinipot_ros.engine.EngineConfig`
(or, for the few that only the node has, of :class:`NodeSettings`); its
default is that field's default, so defaults live in one place. Names are
grouped in namespaces (model.*, cache.*, stream.*, ask.*, status.*) and
documented in config/assistant.yaml (a test checks that file against these).

Parameters whose field is in :data:`~infinipot_ros.engine.LIVE_FIELDS`
(stream.frame_rate_hz, ask.*) and status.period_s change at run time
(``ros2 param set``); every other one is read-only, as its descriptor says,
and is set at launch (parameters file or ``-p``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Dict, List, NamedTuple, Optional, Tuple

from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor, ParameterType
from rclpy.node import Node

from ..engine import LIVE_FIELDS, EngineConfig
from ..kv import POLICIES


@dataclass
class NodeSettings:
    """Settings of the node itself (the engine's are in EngineConfig).

    Attributes:
        image_topics: camera topics; names ending in /compressed are CompressedImage.
        status_period_s: status and diagnostics period (s); live.
        autostart: configure and activate by itself at start (a plain node);
            False = wait for lifecycle transitions (``ros2 lifecycle set``, a lifecycle manager).
        notes_topic: std_msgs/String topic of text events (operator notes, transcripts,
            detector labels) appended to the stream, stamped with the node's clock on
            arrival; "" = none.
    """

    image_topics: List[str] = field(default_factory=lambda: ["/camera/image_raw"])
    notes_topic: str = "notes"
    status_period_s: float = 1.0
    autostart: bool = True

    def __post_init__(self) -> None:
        topics = [t for t in self.image_topics if t]
        if not topics:
            raise ValueError("stream.image_topics is empty: give at least one camera topic")
        if len(set(topics)) != len(topics):
            raise ValueError(f"stream.image_topics has duplicates: {topics}")
        if self.status_period_s <= 0:
            raise ValueError(f"status.period_s must be > 0, got {self.status_period_s}")
        self.image_topics = topics


#: Node-side settings that change at run time.
NODE_LIVE_FIELDS = ("status_period_s",)


class Param(NamedTuple):
    name: str  # ROS parameter name
    field: str  # EngineConfig or NodeSettings field
    description: str
    bounds: Optional[Tuple[float, float]] = None
    none_as: Any = None  # ROS value standing for the field's None (ROS parameters have no None)


_ENGINE, _NODE = "engine", "node"

#: Every parameter: (name, field, description, (min, max) or None, ROS value for None).
PARAMETERS: List[Param] = [
    Param("model.id", "model",
          "builtin:tiny-qwen2.5-vl (embedded test model), a local model directory, or an HF id "
          "such as Qwen/Qwen2.5-VL-3B-Instruct (must be in the local HF cache when offline)"),
    Param("model.allow_pickle", "allow_pickle",
          "also load pickle weights (pytorch_model.bin, *.pt) of a model without safetensors; false = safetensors "
          "only (pickle can run code on load). Code shipped with a model (auto_map) never runs"),
    Param("model.allow_download", "allow_download",
          "download an HF id missing from the local HF cache; false = no network at run time (HF_HUB_OFFLINE=1 "
          "keeps it offline even when true)"),
    Param("model.device", "device", "torch device: auto (CUDA if available), cpu, cuda, cuda:N"),
    Param("model.dtype", "dtype", "auto (bfloat16 on CUDA, float32 on CPU), float32, bfloat16, float16"),
    Param("model.max_pixels", "max_pixels",
          "cap on pixels per camera frame after resizing (multiples of 28x28; 200704 = 256 tokens per frame pair)",
          (784, 16384 * 28 * 28)),
    Param("model.min_pixels", "min_pixels", "floor on pixels per frame; 0 keeps the processor's",
          (0, 16384 * 28 * 28), none_as=0),
    Param("model.system_prompt", "system_prompt", "system message; empty = built-in robot assistant prompt",
          none_as=""),
    Param("model.decode_mode", "decode_mode",
          "answer decoding: auto (static-shape step; a CUDA graph on CUDA), eager, compile (torch.compile), dynamic"),
    Param("cache.policy", "policy",
          "KV compression: none (full cache, no cap) or one of " + ", ".join(sorted(POLICIES))),
    Param("cache.max_vision_tokens", "max_vision_tokens", "M: max vision tokens per layer and KV head",
          (2, 1 << 20), none_as=0),
    Param("cache.budget_mb", "budget_mb",
          "cap on the resident KV cache (prefix + vision) in MB (1e6 bytes); 0 = use cache.max_vision_tokens",
          (0.0, 1e6), none_as=0.0),
    Param("cache.target_ratio", "target_ratio", "C/M: share of the budget kept by a compression", (0.05, 0.95)),
    Param("cache.tar_ratio", "tar_ratio", "InfiniPot-V alpha: share of C chosen by TaR", (0.0, 1.0)),
    Param("cache.recent_ratio", "recent_ratio", "share of cached frames treated as recent by TaR", (0.01, 0.9)),
    Param("cache.pool_kernels", "pool_kernels",
          "VaN pooling kernels (t, h, w) per layer quarter, flattened (12 integers); [] = no pooling"),
    Param("cache.reserve_tokens", "reserve_tokens",
          "KV slots beyond the cap for the chunk being prefilled or a question + answer; 0 = sized from the largest "
          "chunk (model.max_pixels) and ask.max_question_tokens + ask.max_new_tokens", (0, 1 << 20)),
    Param("cache.layers_per_pass", "layers_per_pass",
          "layers scored together per compression pass; 0 = all (fewest operations); fewer = less transient memory "
          "on the torch path", (0, 1024)),
    Param("cache.snapshot_path", "snapshot_path",
          "memory snapshot (safetensors) loaded at configure if the file exists, written by the save_memory "
          "service and by autosave; ~ and symlinks resolved, checked at start (a file path in an existing, "
          "writable directory); \"\" = none"),
    Param("cache.autosave_s", "autosave_s",
          "> 0: save the memory to cache.snapshot_path every this many seconds (atomically); 0 = on request only",
          (0.0, 1e6)),
    Param("cache.rebase_position_threshold", "rebase_position_threshold",
          "largest temporal M-RoPE position a chunk may get; a chunk past it first re-bases the stream (cached "
          "positions and stream clock move down, system prompt stays) so the node can run for days; 0 = never, "
          "else >= 1024 (default 16384: half of Qwen2.5-VL's 32768-token long-context training length)",
          (0, 1 << 30)),
    Param("stream.image_topics", "image_topics",
          "camera topics; names ending in /compressed subscribe sensor_msgs/CompressedImage, others sensor_msgs/Image"),
    Param("stream.notes_topic", "notes_topic",
          "std_msgs/String text events (operator notes, transcripts, detector labels) appended to the stream, "
          "stamped with the node clock on arrival, compressed under the same cap; \"\" = none"),
    Param("stream.max_note_tokens", "max_note_tokens",
          "longest text event accepted (tokens, template included); longer ones are rejected and counted",
          (1, 1 << 16)),
    Param("stream.frame_rate_hz", "frame_rate_hz",
          "frames per second sampled per camera by header stamp; 0 = every frame", (0.0, 120.0)),
    Param("stream.time_jump_reset_s", "time_jump_s",
          "a header stamp this many seconds older than its camera's last one is a jump back; 0 = no jump rule",
          (0.0, 1e9)),
    Param("stream.time_jump_frames", "time_jump_frames",
          "consecutive jumped-back frames of a camera that restart the stream (bag loop, sim reset; memory "
          "forgotten); fewer are dropped and counted (frames_stamp_dropped)", (1, 1000)),
    Param("ask.max_new_tokens", "max_new_tokens",
          "answer length cap (tokens): the default of a request and the most it may ask; live, within the KV "
          "reserve sized at configure", (1, 4096)),
    Param("ask.max_question_tokens", "max_question_tokens",
          "longest question accepted (tokens); longer ones get BAD_REQUEST; live, within the KV reserve",
          (1, 1 << 16)),
    Param("ask.timeout_s", "ask_timeout_s", "default time a question waits for its answer (s), queueing included",
          (0.1, 3600.0)),
    Param("ask.max_pending", "max_pending_asks", "questions allowed to wait; more get BUSY", (1, 64)),
    Param("ask.max_ingest_gap_s", "max_ingest_gap_s",
          "under continuous questions each camera still gets a frame pair ingested about this often (s)",
          (0.1, 3600.0)),
    Param("ask.temperature", "temperature", "0 = greedy decoding (repeatable answers); > 0 samples", (0.0, 5.0)),
    Param("status.period_s", "status_period_s",
          "status and diagnostics period (s); status is also sent after every chunk", (0.05, 3600.0)),
    Param("autostart", "autostart",
          "true: configure and activate at start (a plain node); false: wait for lifecycle transitions"),
]

_ENGINE_FIELDS = {f.name: f for f in dataclasses.fields(EngineConfig)}
_NODE_FIELDS = {f.name: f for f in dataclasses.fields(NodeSettings)}
BY_NAME: Dict[str, Param] = {p.name: p for p in PARAMETERS}


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def owner(param: Param) -> str:
    """"engine" (an EngineConfig field) or "node" (a NodeSettings field)."""
    return _ENGINE if param.field in _ENGINE_FIELDS else _NODE


def is_live(param: Param) -> bool:
    """True if the parameter may change at run time."""
    return param.field in LIVE_FIELDS or param.field in NODE_LIVE_FIELDS


def to_ros(param: Param, value: Any) -> Any:
    """A config field value as a ROS parameter value (None -> none_as, tuples flattened)."""
    if value is None:
        return param.none_as
    if param.field == "pool_kernels":
        return [int(x) for kernel in value for x in kernel]
    if isinstance(value, (tuple, list)):
        return list(value)
    return value


def from_ros(param: Param, value: Any) -> Any:
    """A ROS parameter value as the config field value (inverse of :func:`to_ros`).

    Raises:
        ValueError: pool kernels that are not triples of positive integers.
    """
    if param.none_as is not None and value == param.none_as:
        return None
    if param.field == "pool_kernels":
        flat = [int(x) for x in value]
        if len(flat) % 3 or any(x < 1 for x in flat):
            raise ValueError(f"cache.pool_kernels must be (t, h, w) triples of positive integers, got {flat}")
        return tuple(tuple(flat[i : i + 3]) for i in range(0, len(flat), 3))
    if param.field == "image_topics":
        return [str(t) for t in value]
    return value


def default(param: Param) -> Any:
    """The parameter's default, taken from its dataclass field."""
    fields = _ENGINE_FIELDS if owner(param) == _ENGINE else _NODE_FIELDS
    return to_ros(param, _field_default(fields[param.field]))


def _ros_type(param: Param, value: Any) -> int:
    if param.field == "pool_kernels":
        return ParameterType.PARAMETER_INTEGER_ARRAY
    if isinstance(value, bool):
        return ParameterType.PARAMETER_BOOL
    if isinstance(value, int):
        return ParameterType.PARAMETER_INTEGER
    if isinstance(value, float):
        return ParameterType.PARAMETER_DOUBLE
    if isinstance(value, list):
        return ParameterType.PARAMETER_STRING_ARRAY
    return ParameterType.PARAMETER_STRING


def declare_parameters(node: Node) -> None:
    """Declare every parameter of :data:`PARAMETERS` on ``node`` with its descriptor (read-only unless live)."""
    for p in PARAMETERS:
        value = default(p)
        ptype = _ros_type(p, value)
        live = is_live(p)
        desc = ParameterDescriptor(name=p.name, type=ptype, read_only=not live,
                                   description=p.description + ("" if live else " (read-only: set at launch)"))
        if p.bounds is not None and ptype == ParameterType.PARAMETER_INTEGER:
            desc.integer_range = [IntegerRange(from_value=int(p.bounds[0]), to_value=int(p.bounds[1]), step=0)]
        elif p.bounds is not None and ptype == ParameterType.PARAMETER_DOUBLE:
            desc.floating_point_range = [FloatingPointRange(from_value=float(p.bounds[0]),
                                                            to_value=float(p.bounds[1]), step=0.0)]
        if ptype == ParameterType.PARAMETER_INTEGER_ARRAY and not value:
            node.declare_parameter(p.name, ptype, desc)  # an empty list has no type of its own
        else:
            node.declare_parameter(p.name, value, desc)


def read_parameters(node: Node) -> tuple[EngineConfig, NodeSettings]:
    """Build the EngineConfig and node settings from the declared parameters.

    Raises:
        ValueError: inconsistent values (unknown policy, empty topic list, ...).
    """
    engine_kw: dict = {}
    node_kw: dict = {}
    for p in PARAMETERS:
        value = node.get_parameter(p.name).value
        if value is None:  # an INTEGER_ARRAY declared without a default
            value = []
        target = engine_kw if owner(p) == _ENGINE else node_kw
        target[p.field] = from_ros(p, value)
    return EngineConfig(**engine_kw), NodeSettings(**node_kw)
