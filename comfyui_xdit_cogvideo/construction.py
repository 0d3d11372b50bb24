"""The construction lock: model builds exclude everything that must not see them; the rest may overlap.

Building a model changes process-wide torch state for a moment: diffusers and transformers set the default dtype,
accelerate's ``init_empty_weights`` patches ``nn.Module.register_parameter`` (and, with buffers, ``torch.empty``
and friends) for every thread. A build holds the lock exclusively. Work that only has to not run during a build
(a Dynamo trace, fusing QKV, a T5 encode, the attention kernel's self-test) holds it shared, so several of them
overlap: a new engine's optimize step no longer waits for the compile prefetch's trace (session 6 measured 0.6 s
of such waiting in a 2b first job).
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from typing import Iterator


class ConstructionLock:
    """Reentrant exclusive side (``with lock:``) and a shared side (``with lock.shared():``).

    A thread that holds it exclusively may also take it shared (nested). Taking it exclusively while holding it
    shared would wait for itself, so it raises instead. Shared holders do not wait behind a waiting build: the
    shared work is short and bounded, and a build starved for its length only starts later."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._owner: int | None = None
        self._depth = 0
        self._shared: Counter[int] = Counter()

    def acquire(self) -> None:
        me = threading.get_ident()
        with self._cond:
            if self._owner == me:
                self._depth += 1
                return
            if self._shared[me]:
                raise RuntimeError("the construction lock is held shared by this thread; a model build inside that "
                                   "block would wait for itself: build before or after it")
            self._cond.wait_for(lambda: self._owner is None and not self._shared)
            self._owner, self._depth = me, 1

    def release(self) -> None:
        with self._cond:
            if self._owner != threading.get_ident():
                raise RuntimeError("the construction lock is not held exclusively by this thread")
            self._depth -= 1
            if self._depth == 0:
                self._owner = None
                self._cond.notify_all()

    def __enter__(self) -> "ConstructionLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """While no other thread builds a model; other shared holders run alongside."""
        me = threading.get_ident()
        with self._cond:
            if self._owner != me:
                self._cond.wait_for(lambda: self._owner is None)
            self._shared[me] += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared[me] -= 1
                if not self._shared[me]:
                    del self._shared[me]
                    self._cond.notify_all()


CONSTRUCTION_LOCK = ConstructionLock()
