"""Behaviour-tree clients of the assistant (py_trees): ``from infinipot_ros.bt import AskScene``.

Re-exports :mod:`infinipot_ros.ros.bt`; see docs/behaviour-trees.md.
"""
from .ros.bt import (
    DEFAULT_ANSWER_KEY,
    DEFAULT_ERROR_KEY,
    DEFAULT_PARTIAL_KEY,
    DEFAULT_RESULT_KEY,
    AskOutcome,
    AskScene,
    ClientCode,
    error_code,
)

__all__ = [
    "AskOutcome", "AskScene", "ClientCode", "DEFAULT_ANSWER_KEY", "DEFAULT_ERROR_KEY", "DEFAULT_PARTIAL_KEY",
    "DEFAULT_RESULT_KEY", "error_code",
]
