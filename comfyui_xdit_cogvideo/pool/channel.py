"""The control channel between the pool and one worker: framed messages over a TCP socket.

A message is a tree of plain values (dict, list, tuple, str, bytes, int, float, bool, None) and CPU tensors.
The tree is pickled with tensors replaced by references; the unpickler refuses every global, so a message can
never name a class or function to run. Tensor bytes follow the header as raw frames (no torch.save, no temp
files, no shared-memory handles), which works the same over loopback and between hosts.

Both ends prove they hold the pool key (HMAC-SHA256 challenge in each direction) before any message flows.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
import select
import socket
import struct
import threading

import torch

PROTOCOL = 1  # bump when the messages between controller and workers change
EXIT_RESTART = 3  # a worker's exit code meaning "start me again" (torchrun --max-restarts does)

_HEADER = struct.Struct("!Q")
_MAGIC = b"XDITCV1"
_MAX_HEADER = 64 << 20


_PLAIN = (str, bytes, int, float, bool, type(None), dict, list, tuple)


class ChannelClosed(ConnectionError):
    """The other end closed the connection or went away."""


class AuthError(ConnectionError):
    """The other end does not hold the pool key."""


class _Pickler(pickle.Pickler):
    def __init__(self, file, tensors: list):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.tensors = tensors

    def persistent_id(self, obj):
        if isinstance(obj, torch.Tensor):
            self.tensors.append(obj)
            return len(self.tensors) - 1
        return None

    def reducer_override(self, obj):
        if type(obj) in _PLAIN:
            return NotImplemented
        raise TypeError(f"cannot send {type(obj).__name__} over the pool channel (plain values and tensors only)")


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, tensors: list):
        super().__init__(file)
        self.tensors = tensors

    def persistent_load(self, pid):
        return self.tensors[pid]

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"pool messages carry no classes (got {module}.{name})")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Channel:
    """One end of a worker connection. ``send`` is thread-safe; ``recv`` is meant for one reader thread."""

    def __init__(self, sock: socket.socket):
        sock.setblocking(True)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock = sock
        self._send_lock = threading.Lock()
        self._closed = False

    # -- connection setup --------------------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, key: bytes, timeout: float = 30.0) -> "Channel":
        return cls._secured(socket.create_connection((host, port), timeout=timeout), key, timeout, initiator=False)

    @classmethod
    def accept(cls, sock: socket.socket, key: bytes, timeout: float = 30.0) -> "Channel":
        return cls._secured(sock, key, timeout, initiator=True)

    @classmethod
    def _secured(cls, sock: socket.socket, key: bytes, timeout: float, initiator: bool) -> "Channel":
        """A channel over ``sock`` once both ends proved they hold ``key`` (closed if they did not)."""
        channel = cls(sock)
        channel.sock.settimeout(timeout)
        try:
            channel._authenticate(key, initiator=initiator)
        except BaseException:
            channel.close()
            raise
        channel.sock.settimeout(None)
        return channel

    def _authenticate(self, key: bytes, initiator: bool) -> None:
        """Mutual challenge-response: each side proves it knows ``key`` without sending it."""
        mine = os.urandom(32)
        self._sendall(_MAGIC + mine)
        theirs = self._recv_exact(len(_MAGIC) + 32)
        if not theirs.startswith(_MAGIC):
            raise AuthError("the other end does not speak the xDiT CogVideoX pool protocol")
        theirs = theirs[len(_MAGIC):]
        role_me, role_them = (b"controller", b"worker") if initiator else (b"worker", b"controller")
        self._sendall(hmac.new(key, role_me + theirs, hashlib.sha256).digest())
        answer = self._recv_exact(32)
        if not hmac.compare_digest(answer, hmac.new(key, role_them + mine, hashlib.sha256).digest()):
            raise AuthError("pool key mismatch (set the same XDIT_COGVIDEO_POOL_KEY on the controller and workers)")

    # -- messages ----------------------------------------------------------------------------------------
    def send(self, message) -> None:
        tensors: list[torch.Tensor] = []
        buffer = io.BytesIO()
        _Pickler(buffer, tensors).dump(message)
        flat = []
        meta = []
        for t in tensors:
            t = t.detach()
            if t.device.type != "cpu":
                t = t.cpu()
            t = t.contiguous()
            meta.append((_dtype_name(t.dtype), tuple(t.shape), t.numel() * t.element_size()))
            flat.append(t)
        header = pickle.dumps((meta, buffer.getvalue()), protocol=pickle.HIGHEST_PROTOCOL)
        with self._send_lock:
            if self._closed:
                raise ChannelClosed("channel is closed")
            try:
                self._sendall(_HEADER.pack(len(header)) + header)
                for t, (_, _, nbytes) in zip(flat, meta):
                    if nbytes:
                        self._sendall(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            except OSError as error:
                raise ChannelClosed(f"send failed: {error}") from None

    def recv(self, timeout: float | None = None):
        """The next message; ``TimeoutError`` if none starts within ``timeout`` seconds."""
        if timeout is not None and not self.poll(timeout):
            raise TimeoutError("no message")
        (length,) = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if length > _MAX_HEADER:
            raise ChannelClosed(f"message header of {length} bytes is not from a pool peer")
        meta, body = _restricted_loads(self._recv_exact(length), [])
        tensors = []
        for dtype, shape, nbytes in meta:
            dtype = getattr(torch, dtype)
            if nbytes == 0:
                tensors.append(torch.empty(shape, dtype=dtype))
                continue
            data = bytearray(nbytes)
            self._recv_into(memoryview(data))
            tensors.append(torch.frombuffer(data, dtype=torch.uint8).view(dtype).reshape(shape))
        return _restricted_loads(body, tensors)

    def poll(self, timeout: float = 0.0) -> bool:
        if self._closed:
            raise ChannelClosed("channel is closed")
        readable, _, _ = select.select([self.sock], [], [], timeout)
        return bool(readable)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- raw io ------------------------------------------------------------------------------------------
    def _sendall(self, data) -> None:
        self.sock.sendall(data)

    def _recv_exact(self, n: int) -> bytes:
        data = bytearray(n)
        self._recv_into(memoryview(data))
        return bytes(data)

    def _recv_into(self, view: memoryview) -> None:
        while len(view):
            try:
                got = self.sock.recv_into(view)
            except (OSError, ValueError) as error:
                raise ChannelClosed(f"connection lost: {error}") from None
            if got == 0:
                raise ChannelClosed("connection closed by the other end")
            view = view[got:]


def _restricted_loads(data: bytes, tensors: list):
    return _Unpickler(io.BytesIO(data), tensors).load()


def listen(host: str, port: int, backlog: int = 64) -> socket.socket:
    """A listening TCP socket (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
