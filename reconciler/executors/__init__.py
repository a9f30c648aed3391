"""Executors run one stage each, behind the small interface in `base.py`."""
from __future__ import annotations

from reconciler.executors.base import Executor, ExitInfo, LaunchSpec, RunningInfo, StartInfo

__all__ = ["Executor", "ExitInfo", "LaunchSpec", "RunningInfo", "StartInfo"]
