"""Streaming engine: frames in, answers out, KV cache capped. No ROS."""
from .assistant import (
    ASK_ERROR_CODES, AskError, AskResult, FrameError, IngestResult, StreamingAssistant, validate_frame,
)
from .config import EngineConfig
from .sampler import FrameSampler
from .stats import EngineStats, FrameCounters, RateMeter, device_memory, process_rss_bytes
from .worker import StreamWorker

__all__ = [
    "ASK_ERROR_CODES", "AskError", "AskResult", "EngineConfig", "EngineStats", "FrameCounters", "FrameError",
    "FrameSampler", "IngestResult", "RateMeter", "StreamWorker", "StreamingAssistant", "device_memory",
    "process_rss_bytes", "validate_frame",
]
