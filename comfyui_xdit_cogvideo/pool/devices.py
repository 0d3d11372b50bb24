"""What a pool runs on, parsed from one string (a CLI flag or a ComfyUI widget) and bounded by this machine.

``cpu:N`` may not exceed the CPU cores this process may use, a GPU list may only name GPUs that exist, and
``listen://`` (a pool other hosts can join) is only accepted from a workflow when the host opted in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..errors import PoolError

ALLOW_LISTEN_ENV = "XDIT_COGVIDEO_ALLOW_LISTEN"
MAX_REMOTE_WORLD = 1024


@dataclass(frozen=True)
class PoolDevices:
    """What a pool runs on: ``cuda`` (physical GPU ids), ``cpu`` (gloo ranks) or ``remote`` (torchrun workers)."""

    kind: str
    world_size: int
    gpu_ids: tuple[str, ...] = ()
    address: tuple[str, int] | None = None
    indices: tuple[int, ...] = ()  # the GPUs as CUDA indices of this process (gpu_ids: for the workers' environment)

    @property
    def backend(self) -> str:
        return "gloo" if self.kind == "cpu" else "nccl" if self.kind == "cuda" else "auto"

    def __str__(self) -> str:
        if self.kind == "cuda":
            return "cuda:" + ",".join(self.gpu_ids)
        if self.kind == "cpu":
            return f"cpu:{self.world_size}"
        return f"listen://{self.address[0]}:{self.address[1]}?world={self.world_size}"


def cpu_count() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_devices(text: str | None = "auto", *, from_workflow: bool = False) -> PoolDevices:
    """``auto`` (all visible GPUs, else one CPU rank), ``0,1,3`` / ``cuda:0,1`` (CUDA indices as this process
    sees them), ``cuda`` (all GPUs), ``cpu`` / ``cpu:N`` (N gloo ranks, N <= CPU cores), ``listen://HOST:PORT?world=N``
    (wait for N workers started with torchrun, possibly on other hosts).

    ``from_workflow``: the string came from a workflow (which anyone may have written): ``listen://`` is refused
    unless this host set ``XDIT_COGVIDEO_ALLOW_LISTEN=1``.
    """
    spec = (text or "auto").strip().lower().replace(" ", "")
    if spec.startswith("listen://"):
        if from_workflow and os.environ.get(ALLOW_LISTEN_ENV) != "1":
            raise PoolError(f"devices {text!r} would let other hosts join this pool; a workflow may only ask for that "
                            f"when the host running it set {ALLOW_LISTEN_ENV}=1 (use auto, a GPU list or cpu:N)")
        rest, _, query = spec[len("listen://"):].partition("?")
        host, _, port = rest.rpartition(":")
        params = dict(p.partition("=")[::2] for p in query.split("&") if p)
        if not host or not port.isdigit() or not params.get("world", "").isdigit() or int(params["world"]) < 1:
            raise PoolError(f"cannot parse {text!r}; write listen://HOST:PORT?world=N (e.g. listen://0.0.0.0:29600?world=8)")
        world = int(params["world"])
        if world > MAX_REMOTE_WORLD or not 0 < int(port) < 65536:
            raise PoolError(f"{text!r}: world must be 1..{MAX_REMOTE_WORLD} and the port 1..65535")
        return PoolDevices("remote", world, address=(host.strip("[]"), int(port)))
    if spec == "cpu" or spec.startswith("cpu:"):
        count = spec[4:] or "1"
        if not count.isdigit() or int(count) < 1:
            raise PoolError(f"cannot parse {text!r}; write cpu or cpu:N with N >= 1")
        cores = cpu_count()
        if int(count) > cores:
            raise PoolError(f"devices {text!r} asks for {int(count)} CPU ranks, but this process may use {cores} CPU "
                            f"core(s); use cpu:1 to cpu:{cores} (one gloo rank per core)")
        return PoolDevices("cpu", int(count))
    available = _gpu_count()
    if spec == "auto":
        ids = list(range(available))
        return PoolDevices("cuda", available, _physical_ids(ids), indices=tuple(ids)) if available else PoolDevices("cpu", 1)
    if spec == "cuda":
        if not available:
            raise PoolError("devices 'cuda' asked for, but no CUDA GPU is visible to this process")
        spec = ",".join(str(i) for i in range(available))
    spec = spec.removeprefix("cuda:")
    try:
        ids = [int(x) for x in spec.split(",") if x != ""]
    except ValueError:
        raise PoolError(f"cannot parse devices {text!r}; write auto, a GPU list like 0,1,3, cpu:N or "
                        "listen://HOST:PORT?world=N") from None
    if not ids:
        raise PoolError(f"no devices in {text!r}")
    if len(set(ids)) != len(ids):
        raise PoolError(f"GPU list {text!r} names a GPU twice; NCCL runs one rank per GPU")
    bad = [i for i in ids if not 0 <= i < available]
    if bad:
        raise PoolError(f"GPU {bad[0]} does not exist here: {available} CUDA GPU(s) visible "
                        f"(ids 0..{available - 1})" if available else f"GPU list {text!r} given, but no CUDA GPU is visible")
    return PoolDevices("cuda", len(ids), _physical_ids(ids), indices=tuple(ids))


def _physical_ids(ids: list[int]) -> tuple[str, ...]:
    """CUDA indices as this process sees them -> entries for the workers' CUDA_VISIBLE_DEVICES."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None or visible.strip() == "":
        return tuple(str(i) for i in ids)
    entries = [v.strip() for v in visible.split(",") if v.strip()]
    return tuple(entries[i] for i in ids)


class DeviceLock:
    """One pool per GPU per machine: an exclusive lock file per device (released by the OS if we die).

    Two ComfyUI instances (or a ComfyUI and a CLI run) asking for the same GPU get a clear error naming the
    process that holds it, instead of two resident models fighting for one GPU's memory.
    """

    def __init__(self, files: list):
        self._files = files

    @staticmethod
    def folder() -> str:
        """A folder shared by this user's processes only ($XDG_RUNTIME_DIR, else a 0700 folder in the temp dir
        that must belong to this user)."""
        import stat
        import tempfile

        uid = os.getuid() if hasattr(os, "getuid") else None
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        path = os.path.join(base, f"xdit-cogvideo-locks-{uid if uid is not None else 'user'}")
        os.makedirs(path, mode=0o700, exist_ok=True)
        info = os.lstat(path)
        if uid is not None and (info.st_uid != uid or not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077):
            raise PoolError(f"{path} must be a folder of this user's with mode 0700 (it holds the pools' device "
                            "locks); remove it or set XDG_RUNTIME_DIR")
        return path

    @classmethod
    def acquire(cls, names: list[str]) -> "DeviceLock":
        try:
            import fcntl
        except ImportError:  # no POSIX locks (Windows): one pool per process still holds
            return cls([])
        held = []
        try:
            for name in names:
                safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
                f = open(os.path.join(cls.folder(), f"{safe}.lock"), "a+")
                try:
                    fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    f.seek(0)
                    owner = f.read().strip() or "unknown"
                    f.close()
                    raise PoolError(f"device {name} is already used by another xdit-cogvideo pool (pid {owner}); "
                                    "stop that process's pool or choose other devices") from None
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
                held.append(f)
        except BaseException:
            cls(held).release()
            raise
        return cls(held)

    def release(self) -> None:
        for f in self._files:
            try:
                f.truncate(0)
                f.close()  # closing drops the lock
            except OSError:
                pass
        self._files = []
