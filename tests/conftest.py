"""Shared fixtures: tiny models are built once per test session into a private cache folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The user's own cache folder, not a predictable name in a shared /tmp (another user could plant models there).
_CACHE = Path(os.environ.get("XDIT_COGVIDEO_TEST_CACHE")
              or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "xdit-cogvideo-test-cache")
os.environ["XDIT_COGVIDEO_CACHE"] = str(_CACHE)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("XDIT_COGVIDEO_TESTING", "1")  # pool fault injection (pool.protocol.Fault) is allowed in tests


@pytest.fixture(scope="session")
def tiny_cache() -> Path:
    """The folder tiny models are cached in (also exported as XDIT_COGVIDEO_CACHE for spawned processes)."""
    return _CACHE


@pytest.fixture(scope="session")
def tiny_path(tiny_cache):
    """``tiny_path(variant)`` -> the tiny model folder, built on first use."""
    from comfyui_xdit_cogvideo.tiny import ensure_tiny

    return lambda variant="2b": ensure_tiny(variant)
