"""Sequence- and CFG-parallel execution of the diffusers CogVideoX transformer."""

from .groups import ParallelGroups
from .transformer import parallelize_transformer

__all__ = ["ParallelGroups", "parallelize_transformer"]
