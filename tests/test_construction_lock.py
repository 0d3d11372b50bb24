"""The construction lock (construction.py): builds exclusive, traces/fuses/encodes shared and overlapping."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from comfyui_xdit_cogvideo import CogVideoEngine
from comfyui_xdit_cogvideo.construction import CONSTRUCTION_LOCK, ConstructionLock


def _hold(lock_context, entered: threading.Event, seconds: float, log: list, name: str) -> threading.Thread:
    def run():
        with lock_context():
            log.append((name, "in", time.perf_counter()))
            entered.set()
            time.sleep(seconds)
            log.append((name, "out", time.perf_counter()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_shared_holders_overlap_and_a_build_waits_for_them():
    lock, log = ConstructionLock(), []
    first, second = threading.Event(), threading.Event()
    a = _hold(lock.shared, first, 0.4, log, "a")
    assert first.wait(10)
    b = _hold(lock.shared, second, 0.4, log, "b")
    assert second.wait(10)  # entered while "a" still holds it shared
    with lock:
        built = time.perf_counter()
    a.join(10), b.join(10)
    ins = {name: at for name, what, at in log if what == "in"}
    outs = {name: at for name, what, at in log if what == "out"}
    assert ins["b"] < outs["a"]
    assert built >= max(outs.values())


def test_shared_work_waits_for_a_build_and_a_build_is_reentrant():
    lock, log = ConstructionLock(), []
    entered = threading.Event()
    with lock:
        with lock:  # reentrant (a build that builds parts)
            with lock.shared():  # the builder's own shared work nests
                pass
            waiter = _hold(lock.shared, entered, 0.0, log, "shared")
            assert not entered.wait(0.3)  # a trace never runs beside a build
        assert not entered.wait(0.1)
        released = time.perf_counter()
    assert entered.wait(10)
    waiter.join(10)
    assert log[0][2] >= released


def test_a_build_inside_shared_work_raises_instead_of_waiting_for_itself():
    lock = ConstructionLock()
    with lock.shared():
        with pytest.raises(RuntimeError, match="held shared by this thread"):
            lock.acquire()
    with pytest.raises(RuntimeError, match="not held exclusively"):
        lock.release()
    with lock:  # still usable
        pass


def test_the_optimize_step_runs_beside_a_trace_but_not_beside_a_build(tiny_path):
    """An engine's optimize step holds the lock shared: the compile prefetch's trace (shared) does not hold it up,
    a model build (exclusive) does."""
    transformer = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none").transformer
    entered, log = threading.Event(), []
    trace = _hold(CONSTRUCTION_LOCK.shared, entered, 5.0, log, "trace")
    assert entered.wait(10)
    started = time.perf_counter()
    CogVideoEngine.from_components(transformer, attention="sdpa", optimize="fuse")
    assert time.perf_counter() - started < 3.0
    trace.join(10)

    fresh = CogVideoEngine(str(tiny_path("2b")), dtype="fp32", optimize="none").transformer
    entered.clear()
    build = _hold(lambda: CONSTRUCTION_LOCK, entered, 0.8, log, "build")
    assert entered.wait(10)
    engine = CogVideoEngine.from_components(fresh, attention="sdpa", optimize="fuse")
    optimized = time.perf_counter()
    build.join(10)
    done = {name: at for name, what, at in log if what == "out"}
    assert optimized >= done["build"]
    assert engine.optimizer.options.fuse_qkv and isinstance(fresh.transformer_blocks[0].attn1.to_qkv, torch.nn.Linear)
