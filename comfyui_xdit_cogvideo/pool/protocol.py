"""Every message between the controller and a worker, in one place.

Start-up:      worker -> Hello; controller -> Welcome | Refused; worker -> Heartbeat, Ready
Running:       controller -> Ping (liveness), Job, Cancel, Exit, Fault (tests only)
               worker -> Heartbeat (every second, from its own thread), Event (progress), Result, Done
A job ends on each target rank with exactly one Done (status ok / cancelled / error). Messages travel as plain
dicts (``encode``/``decode``) inside the channel's authenticated frames.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ModelError, PoolError, VALIDATION_ERRORS

TESTING_ENV = "XDIT_COGVIDEO_TESTING"  # "1": workers accept Fault messages (fault-injection tests only)


def testing_enabled() -> bool:
    return os.environ.get(TESTING_ENV) == "1"


@dataclass
class Message:
    OP: ClassVar[str] = ""

    def encode(self) -> dict:
        return {"op": self.OP, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}


_KINDS: dict[str, type[Message]] = {}


def _message(cls):
    cls = dataclass(cls)
    _KINDS[cls.OP] = cls
    return cls


def decode(wire: Any) -> Message:
    """The typed message for a received dict; PoolError for anything that is not one of ours."""
    if not isinstance(wire, dict) or wire.get("op") not in _KINDS:
        raise PoolError(f"unexpected message from a pool peer: {str(wire)[:80]}")
    cls = _KINDS[wire["op"]]
    names = {f.name for f in dataclasses.fields(cls)}
    try:
        return cls(**{k: v for k, v in wire.items() if k in names})
    except TypeError as error:
        raise PoolError(f"malformed {wire['op']} message: {error}") from None


# -- start-up ----------------------------------------------------------------------------------------------------
@_message
class Hello(Message):
    OP: ClassVar[str] = "hello"
    rank: int
    world: int
    pid: int
    host: str
    device: str
    backend: str
    protocol: int
    visible: str | None = None


@_message
class Welcome(Message):
    OP: ClassVar[str] = "welcome"
    session: str
    heartbeat: float = 1.0
    timeout: float = 60.0  # a worker that hears nothing from the controller this long exits
    store: str | None = None  # local pools: the FileStore path (0700 folder); None: $MASTER_ADDR:$MASTER_PORT
    pg_timeout: float = 300.0


@_message
class Refused(Message):
    OP: ClassVar[str] = "refused"
    reason: str


@dataclass
class ErrorInfo:
    """An exception raised on a rank, as the controller needs it (``validation``: a RequestError, LayoutError or
    ModelError, raised before the job's first collective)."""

    type: str
    message: str
    traceback: str = ""
    validation: bool = False

    @classmethod
    def of(cls, error: BaseException, traceback: str = "") -> "ErrorInfo":
        return cls(type(error).__name__, str(error), traceback, isinstance(error, VALIDATION_ERRORS))


@_message
class Ready(Message):
    OP: ClassVar[str] = "ready"
    ok: bool
    error: dict | None = None


# -- running -----------------------------------------------------------------------------------------------------
@_message
class Ping(Message):
    OP: ClassVar[str] = "ping"


@_message
class Heartbeat(Message):
    """A rank's state. ``tick`` counts step boundaries the job thread reached (it stops moving when that thread
    is stuck, while heartbeats, sent from their own thread, go on)."""

    OP: ClassVar[str] = "hb"
    rank: int
    state: str
    job: int | None = None
    phase: str = ""
    step: list = field(default_factory=lambda: [0, 0])
    tick: int = 0
    memory: dict = field(default_factory=dict)
    model: dict | None = None
    layout: list | None = None
    loads: int = 0
    vae_loads: int = 0
    startup: dict = field(default_factory=dict)   # seconds per start-up phase of this process
    last_job: dict = field(default_factory=dict)  # seconds per phase of the last generate job
    compile: dict = field(default_factory=dict)   # the compile policy's last decision and any warm-up


@_message
class Job(Message):
    """One job for every target rank. ``kind``: generate, decode or encode; ``model``: ``ModelSpec.wire()``;
    ``args``: the kind's arguments (see ``job.py``)."""

    OP: ClassVar[str] = "job"
    id: int
    kind: str
    model: dict
    args: dict


@_message
class Cancel(Message):
    OP: ClassVar[str] = "cancel"
    id: int


@_message
class Exit(Message):
    OP: ClassVar[str] = "exit"
    code: int = 0


@_message
class Fault(Message):
    """Testing only (workers ignore it unless XDIT_COGVIDEO_TESTING=1): misbehave at the ``step``-th step boundary
    of the next job. ``raise``, ``exit`` (exit code 17), ``freeze`` (SIGSTOP), ``hang`` (block forever in a
    point-to-point receive no peer answers, heartbeats going on), ``partial`` (send half a frame, then stop),
    ``tamper`` (send a frame with one byte changed)."""

    OP: ClassVar[str] = "fault"
    kind: str
    step: int = 1


@_message
class Event(Message):
    OP: ClassVar[str] = "event"
    id: int
    phase: str
    step: int
    total: int
    seconds_per_step: float | None = None
    preview: Any = None


@_message
class Result(Message):
    OP: ClassVar[str] = "result"
    id: int
    value: Any


@_message
class Done(Message):
    OP: ClassVar[str] = "done"
    id: int
    status: str  # ok, cancelled, error
    error: dict | None = None


FAULTS = ("raise", "exit", "freeze", "hang", "partial", "tamper")


# -- what a job carries ------------------------------------------------------------------------------------------
def _source(value):
    from ..loading import ModelSource

    return value if isinstance(value, ModelSource) else ModelSource(str(value))


@dataclass(frozen=True)
class ModelSpec:
    """Which model the workers hold: weights (``source``), precision, attention backend, the LoRAs merged into
    the weights (``loras``: ``LoraSpec``s in order; changing them never reloads the base model) and the memory plan
    (``memory``: auto, fast, low, offload: ``comfyui_xdit_cogvideo.memory``).

    Travels to the workers as ``wire()`` (every field by name) and is rebuilt there by ``from_wire``: a field
    added here reaches the worker without touching the protocol.
    """

    source: Any
    dtype: str = "bf16"
    attention: str = "auto"
    loras: tuple = ()
    memory: str = "auto"

    def __post_init__(self):
        from ..lora import as_specs

        if isinstance(self.source, (str, os.PathLike)):
            object.__setattr__(self, "source", _source(self.source))
        object.__setattr__(self, "loras", as_specs(self.loras))

    def validate(self) -> None:
        from ..loading import DTYPES
        from ..parallel.kernels import KERNELS

        if self.dtype not in DTYPES:
            raise ModelError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(DTYPES)}")
        if self.attention != "auto" and self.attention not in KERNELS:
            raise ModelError(f"unknown attention backend {self.attention!r}; choose one of auto, {', '.join(KERNELS)}")
        for lora in self.loras:
            lora.validate()
        from ..memory import check_mode

        check_mode(self.memory)

    def wire(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "source"}
        out.update(self.source.wire(),
                   loras=[lora.wire() for lora in self.loras])  # plain lists: the channel unpickles no classes
        return out

    @classmethod
    def from_wire(cls, wire: dict) -> "ModelSpec":
        from ..loading import ModelSource

        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        source = ModelSource.from_wire(wire)
        return cls(source, **{k: v for k, v in wire.items() if k in names})

    @property
    def weights_key(self) -> tuple:
        """What decides whether resident weights can be reused (attention only rebinds)."""
        return (self.source.path, self.source.vae, self.source.text_encoder, self.source.tokenizer,
                self.source.storage, self.dtype)


@dataclass
class ProgressEvent:
    """One step of a job. ``phase``: load, encode, sample or decode. ``preview``: on sample steps, the current
    latents of the middle latent frame [C, h, w] (CPU float) for a live preview."""

    phase: str
    step: int
    total: int
    seconds_per_step: float | None = None
    preview: Any = None
