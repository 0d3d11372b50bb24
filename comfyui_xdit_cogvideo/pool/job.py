"""One job on the pool, from sending it to its outcome, with explicit deadlines and one handler per message.

Deadlines (``Deadlines``; every one configurable on the pool):
- start-up: until the first step of the job (loading weights, compiling, the first step) -- generous;
- progress: after that, no step for max(``stall_floor``, ``stall_factor`` x the median step so far) fails the
  job with ``PoolStalled`` naming the rank that is behind, its phase and step (a rank stuck in a collective
  keeps sending heartbeats: only progress tells);
- cancel: after Cancel, every rank must report within ``cancel_timeout`` or the pool is stopped and the caller
  gets ``GenerationCancelled`` at once;
- error grace: after one rank fails, the others have ``error_grace`` to report before the pool is stopped.

Outcome for the pool: it stays warm only when the job succeeded, was cancelled cleanly, or failed with the same
validation error (RequestError, LayoutError, ModelError) on every rank; anything else stops it (a rank may be
inside a collective, or hold a broken CUDA/NCCL context) and the next job starts a fresh one.
"""

from __future__ import annotations

import queue
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from ..errors import ChannelClosed, GenerationCancelled, PoolError, PoolStalled, WorkerError
from . import protocol as p

if TYPE_CHECKING:
    from .controller import WorkerPool
    from .launch import Rank


@dataclass
class Deadlines:
    startup: float = 900.0
    stall_floor: float = 60.0
    stall_factor: float = 10.0
    cancel: float = 10.0
    error_grace: float = 3.0


@dataclass
class Lost:
    """From the monitor (not a wire message): a rank died, froze or broke its connection; the pool is stopped."""

    rank: int
    reason: str
    where: str = ""
    output: str = ""


class JobRun:
    def __init__(self, pool: "WorkerPool", job: p.Job, generation: int, targets: list["Rank"],
                 on_event: Callable[[p.ProgressEvent], None] | None, cancel: Callable[[], bool] | None):
        self.pool, self.job, self.generation, self.targets = pool, job, generation, targets
        self.on_event, self.cancel = on_event, cancel
        self.deadlines: Deadlines = pool.deadlines
        self.by_rank = {entry.rank: entry for entry in targets}
        self.pending = set(self.by_rank)
        self.result: Any = None
        self.errors: dict[int, p.ErrorInfo] = {}
        self.first_error: WorkerError | None = None
        self.failure: BaseException | None = None  # a pool-level failure (lost rank, stall)
        self.cancelled = False
        self.caller_error: BaseException | None = None
        self.cancel_sent_at: float | None = None
        self.error_at: float | None = None
        self.started = self.last_progress = time.monotonic()
        self.steps: list[float] = []
        self.stepped = False
        self.handlers = {p.Event: self.on_progress, p.Result: self.on_result, p.Done: self.on_done, Lost: self.on_lost}

    # -- the run -----------------------------------------------------------------------------------------
    def run(self):
        for entry in self.targets:
            try:
                entry.channel.send(self.job.encode())
            except ChannelClosed:
                self.pool._teardown("send failed", graceful=False, expect=self.generation)
                raise WorkerError(entry.rank, "lost its connection to the pool before the job started",
                                  where=entry.where()) from None
        try:
            while self.pending and self.failure is None:
                self._poll_caller()
                try:
                    generation, rank, message = self.pool._inbox.get(timeout=0.05)
                except queue.Empty:
                    self._check_deadlines()
                    continue
                if generation != self.generation:
                    continue
                handler = self.handlers.get(type(message))
                if handler is not None and (isinstance(message, Lost) or getattr(message, "id", None) == self.job.id):
                    handler(rank, message)
        except BaseException:
            # The caller was interrupted while waiting (e.g. Ctrl-C): stop the job; if the ranks do not stop,
            # stop the pool. Then let the interruption through.
            self.send_cancel()
            self._drain()
            raise
        return self._outcome()

    def _poll_caller(self) -> None:
        if self.cancel is None or self.cancel_sent_at is not None:
            return
        try:
            if self.cancel():
                self.send_cancel()
        except BaseException as error:  # e.g. ComfyUI's interrupt exception: what the caller must see
            self.caller_error = error
            self.send_cancel()

    def send_cancel(self) -> None:
        if self.cancel_sent_at is not None:
            return
        self.cancel_sent_at = time.monotonic()
        for entry in self.targets:
            try:
                entry.channel.send(p.Cancel(self.job.id).encode())
            except ChannelClosed:
                pass

    # -- one handler per message -------------------------------------------------------------------------
    def on_progress(self, rank: int, event: p.Event) -> None:
        now = time.monotonic()
        if event.phase in ("sample", "decode") and event.step >= 1:
            if self.stepped:
                self.steps.append(now - self.last_progress)
            self.stepped = True
        self.last_progress = now
        progress = p.ProgressEvent(event.phase, int(event.step), int(event.total), event.seconds_per_step,
                                   event.preview)
        self.pool._job_progress(progress)
        if self.on_event is not None and self.caller_error is None:
            try:
                self.on_event(progress)
            except BaseException as error:  # the caller's progress hook asked to stop
                self.caller_error = error
                self.send_cancel()

    def on_result(self, rank: int, result: p.Result) -> None:
        self.result = result.value

    def on_done(self, rank: int, done: p.Done) -> None:
        self.pending.discard(rank)
        self.last_progress = time.monotonic()
        if done.status == "cancelled":
            self.cancelled = True
        elif done.status == "error":
            info = p.ErrorInfo(**(done.error or {"type": "Error", "message": "unknown error"}))
            self.errors[rank] = info
            if self.first_error is None:
                self.first_error = WorkerError(rank, info.message, info.traceback, info.type,
                                               where=self.by_rank[rank].where())
                self.error_at = time.monotonic()
                self.send_cancel()

    def on_lost(self, rank: int, lost: Lost) -> None:
        # A dead rank is the root cause; its peers' errors (broken collectives) only follow from it.
        self.failure = WorkerError(rank, lost.reason + (f"\n{lost.output}" if lost.output else ""), where=lost.where)

    # -- deadlines ---------------------------------------------------------------------------------------
    def _check_deadlines(self) -> None:
        now = time.monotonic()
        if self.pool._generation != self.generation:
            self.failure = PoolError(f"the pool stopped during the {self.job.kind} job "
                                     f"({self.pool._last_error or 'shut down'})")
            return
        if self.error_at is not None and now - self.error_at > self.deadlines.error_grace:
            self.failure = self.first_error
            return
        if self.cancel_sent_at is not None and self.error_at is None:
            if now - self.cancel_sent_at > self.deadlines.cancel:
                self.failure = GenerationCancelled(
                    f"{self.job.kind} cancelled; rank(s) {sorted(self.pending)} did not stop within "
                    f"{self.deadlines.cancel:.0f} s, so the pool was stopped")
            return
        limit, why = self._progress_limit()
        if now - self.last_progress > limit:
            self.failure = self._stalled(now - self.last_progress, limit, why)

    def _progress_limit(self) -> tuple[float, str]:
        d = self.deadlines
        if not self.stepped:
            return d.startup, "start-up bound: loading and the first step"
        median = statistics.median(self.steps) if self.steps else 0.0
        return max(d.stall_floor, d.stall_factor * median), \
            f"max({d.stall_floor:.0f} s, {d.stall_factor:g} x the median step of {median:.2f} s)"

    def _stalled(self, elapsed: float, limit: float, why: str) -> PoolStalled:
        positions = {}
        for entry in self.targets:
            hb = self.pool._heartbeat_of(entry.rank)
            positions[entry.rank] = (int(hb.get("tick", 0)), hb.get("phase") or hb.get("state") or "?",
                                     list(hb.get("step") or [0, 0]))
        silent = [e for e in self.targets if time.monotonic() - e.last_seen > 3 * self.pool.heartbeat]
        if silent:  # a frozen rank explains the stall better than step counts do
            entry = silent[0]
            _, phase, (step, total) = positions[entry.rank]
            error = PoolStalled(f"{self.job.kind} job made no progress for {elapsed:.0f} s (limit {limit:.0f} s, "
                                f"{why}): rank {entry.rank} ({entry.where()}) has sent nothing for "
                                f"{time.monotonic() - entry.last_seen:.0f} s at {phase} step {step}/{total} (frozen, "
                                "or its host is unreachable); the pool was stopped")
            error.rank, error.phase, error.step = entry.rank, phase, step
            return error
        low = min(t for t, _, _ in positions.values())
        behind = sorted(r for r, (t, _, _) in positions.items() if t == low)
        rank = behind[0]
        _, phase, (step, total) = positions[rank]
        where = self.by_rank[rank].where()
        if len(behind) == len(positions) and len(positions) > 1:
            who = f"every rank is at {phase} step {step}/{total}"
        else:
            who = (f"rank {rank} ({where}) is behind at {phase} step {step}/{total}"
                   + "".join(f"; rank {r} at step boundary {t}" for r, (t, _, _) in sorted(positions.items())
                             if r not in behind))
        error = PoolStalled(f"{self.job.kind} job made no progress for {elapsed:.0f} s (limit {limit:.0f} s, {why}): "
                            f"{who} -- stuck in a collective, a kernel or the network; the pool was stopped")
        error.rank, error.phase, error.step = rank, phase, step
        return error

    def _drain(self) -> None:
        deadline = time.monotonic() + self.deadlines.cancel
        while self.pending and time.monotonic() < deadline:
            try:
                generation, rank, message = self.pool._inbox.get(timeout=0.05)
            except queue.Empty:
                if self.pool._generation != self.generation:
                    return
                continue
            if generation != self.generation:
                continue
            if isinstance(message, Lost):
                return
            if isinstance(message, p.Done) and message.id == self.job.id:
                self.pending.discard(rank)
        if self.pending:
            self.pool._teardown("job did not stop after cancel", graceful=False, expect=self.generation)

    # -- outcome -----------------------------------------------------------------------------------------
    def _outcome(self):
        error = self.failure or self.first_error
        if error is not None:
            if not self._keeps_pool():
                reason = str(error).split("\n")[0]
                self.pool._teardown(reason, graceful=False, expect=self.generation)
            self.pool._note_error(str(error).split("\n")[0])
        if self.caller_error is not None:  # the caller stopped the job (e.g. Ctrl-C): that is what it must see
            raise self.caller_error
        if isinstance(error, GenerationCancelled):
            raise error
        if error is not None:
            raise error
        if self.cancelled:
            raise GenerationCancelled(f"{self.job.kind} cancelled")
        return self.result

    def _keeps_pool(self) -> bool:
        """Only the same validation error on every target rank (raised before any collective) keeps the pool."""
        if self.failure is not None or self.pending or set(self.errors) != set(self.by_rank):
            return False
        kinds = {(e.type, e.message) for e in self.errors.values()}
        return len(kinds) == 1 and all(e.validation for e in self.errors.values())
