"""Winslow: a GitOps orchestrator for long GPU pipelines.

The reconciler package holds the domain model, the state-repo contract
(loading and validation), and the node daemon that runs stages.
"""
from __future__ import annotations

__version__ = "0.1.0"
