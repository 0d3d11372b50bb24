"""Sequence- and CFG-parallel execution of the diffusers CogVideoX transformer.

``parallelize_transformer`` (diffusers behind it) is imported on first use (PEP 562), so the
process groups and kernels can be imported cheaply.
"""

from __future__ import annotations

from .groups import ParallelGroups

__all__ = ["ParallelGroups", "parallelize_transformer"]


def __getattr__(name: str):
    if name == "parallelize_transformer":
        from .transformer import parallelize_transformer

        return parallelize_transformer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
