"""Streaming engine: frames in, answers out, KV cache capped. No ROS."""
from .assistant import (
    ASK_ERROR_CODES, AskError, AskErrorCode, AskResult, FrameError, IngestResult, IngestStatus, StreamingAssistant,
    validate_frame,
)
from .config import LIVE_FIELDS, EngineConfig
from .gate import FrameGate, GateDecision
from .snapshot import SNAPSHOT_FORMAT_VERSION, SnapshotError, SnapshotInfo
from .stats import CameraStats, EngineState, EngineStats, FrameCounters
from .worker import AskJob, StreamWorker

__all__ = [
    "ASK_ERROR_CODES", "AskError", "AskErrorCode", "AskJob", "AskResult", "CameraStats", "EngineConfig",
    "EngineState", "EngineStats", "FrameCounters", "FrameError", "FrameGate", "GateDecision", "IngestResult",
    "IngestStatus", "LIVE_FIELDS", "SNAPSHOT_FORMAT_VERSION", "SnapshotError", "SnapshotInfo", "StreamWorker", "StreamingAssistant", "validate_frame",
]
