"""Every exception type of the package, in one module that imports nothing else of it.

Validation errors (``RequestError``, ``LayoutError``, ``ModelError``) are raised before any collective runs: a
pool whose ranks all fail with one of them stays warm. Everything else a worker raises restarts the pool.
"""

from __future__ import annotations


class RequestError(ValueError):
    """A generation request the model cannot run, naming the value and what would work."""


class LayoutError(ValueError):
    """A parallel layout that cannot run for this model, request or world size."""


class ModelError(ValueError):
    """A model folder or file that cannot be loaded, with what was expected instead."""


VALIDATION_ERRORS = (RequestError, LayoutError, ModelError)


class GenerationCancelled(RuntimeError):
    """The caller cancelled the job; the engine stopped at a step boundary and stays usable."""


class PoolError(RuntimeError):
    """The pool could not start, lost a worker, or was asked for something it cannot do."""


class PoolStalled(PoolError):
    """A job made no progress within its deadline (a rank stuck in a collective, a kernel or the network)."""


class WorkerError(PoolError):
    """A worker raised or died while running a job.

    ``rank``, ``exc_type``, ``message``; ``traceback`` holds the worker's traceback (shown by ``details()``, not
    by ``str()``, so a user sees one line naming the rank and the exception).
    """

    def __init__(self, rank: int, message: str, traceback: str = "", exc_type: str | None = None,
                 where: str = ""):
        self.rank, self.message, self.traceback, self.exc_type, self.where = rank, message, traceback, exc_type, where
        kind = f"{exc_type}: " if exc_type else ""
        super().__init__(f"worker rank {rank}{f' ({where})' if where else ''} failed: {kind}{message}")

    def details(self) -> str:
        """The one-line error followed by the worker's traceback (for --verbose and logs)."""
        text = str(self)
        if self.traceback:
            text += "\n--- worker traceback ---\n" + self.traceback.rstrip()
        return text


class ChannelClosed(ConnectionError):
    """The other end of a pool connection closed it or went away."""


class AuthError(ConnectionError):
    """The other end of a pool connection does not hold the pool key, or a frame failed its check."""
