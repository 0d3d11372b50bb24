"""The control channel between the pool and one worker: authenticated frames over a TCP socket.

A message is a tree of plain values (dict, list, tuple, str, bytes, int, float, bool, None) and CPU tensors.
The tree is pickled with tensors replaced by references; the unpickler refuses every global, so a message can
never name a class or function to run. Tensor bytes follow the header raw (no torch.save, no temp files, no
shared-memory handles), which works the same over loopback and between hosts.

Handshake: the controller sends a nonce; the worker answers with its own nonce and an HMAC proving it holds the
pool key; only after checking that proof does the controller prove itself (so it never signs for an unproven
peer). Both ends then derive one key per direction from the two nonces. Every frame after that carries a
sequence number and HMAC-SHA256 tags (one over its lengths, checked before anything is allocated, one over the
whole frame, checked before anything is unpickled): a replayed, reordered, truncated or injected frame fails the
connection. Frame headers are checked (dtype allow-list, nbytes = numel x itemsize, total size cap).

``FrameReader`` parses frames incrementally from whatever bytes arrived, so the controller's monitor never blocks
on a half-sent frame; ``Channel.recv`` (workers) waits for a whole message with an optional deadline.

Large tensors (a decoded video is 100-200 MB) cost no more copies than the socket's: the sender hashes and sends
each tensor in pieces straight from its memory (the receiver hashes one piece while the next is hashed), and the
receiver, once a frame's authenticated lengths are known, receives its tensor bytes straight into one buffer of the
frame's size, hashing as they arrive; the tensors it returns are views of that buffer.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import pickle
import selectors
import socket
import struct
import threading
import time
from collections import deque

import torch

from ..errors import AuthError, ChannelClosed

PROTOCOL = 3  # bump when the frames or messages between controller and workers change
EXIT_RESTART = 3  # a worker's exit code meaning "start me again" (torchrun --max-restarts does)
MIN_KEY_BYTES = 32

_MAGIC = b"XDITCV2"
_NONCE = 32
_TAG = 32
_PREFIX = struct.Struct("!QQQ")  # sequence number, header bytes, body (tensor) bytes
MAX_HEADER = 64 << 20
MAX_BODY = 16 << 30  # 16 GiB: far above any latents or decoded video the pool sends
_CHUNK = 1 << 20
_PIECE = 4 << 20  # tensor bytes hashed and sent at a time
_DIRECT = 64 << 10  # from this many tensor bytes still due, the receiver reads straight into the frame's buffer

_PLAIN = (str, bytes, int, float, bool, type(None), dict, list, tuple)
_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool)}


def check_key(key: bytes) -> bytes:
    """``key`` if it is long enough to authenticate a pool, else AuthError naming the variable and the minimum."""
    if len(key) < MIN_KEY_BYTES:
        raise AuthError(f"XDIT_COGVIDEO_POOL_KEY holds {len(key)} bytes; a pool key needs at least {MIN_KEY_BYTES} "
                        "(e.g. python -c \"import secrets; print(secrets.token_hex(32))\")")
    return key


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
        if not isinstance(pid, int) or not 0 <= pid < len(self.tensors):
            raise pickle.UnpicklingError(f"tensor reference {pid!r} out of range")
        return self.tensors[pid]

    def find_class(self, module, name):
        raise pickle.UnpicklingError(f"pool messages carry no classes (got {module}.{name})")


def _restricted_loads(data: bytes, tensors: list):
    return _Unpickler(io.BytesIO(data), tensors).load()


def _frame_head(message, key: bytes, seq: int) -> tuple[bytes, list, "hmac.HMAC"]:
    """A frame's first bytes (prefix, length tag, header), its tensors' bytes, and the frame MAC over the header."""
    tensors: list[torch.Tensor] = []
    buffer = io.BytesIO()
    _Pickler(buffer, tensors).dump(message)
    meta, flat = [], []
    for t in tensors:
        t = t.detach()
        if t.device.type != "cpu":
            t = t.cpu()
        t = t.contiguous()
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES:
            raise TypeError(f"cannot send a {name} tensor over the pool channel ({', '.join(_DTYPES)} only)")
        meta.append((name, tuple(t.shape), t.numel() * t.element_size()))
        if t.numel():
            flat.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    header = pickle.dumps((meta, buffer.getvalue()), protocol=pickle.HIGHEST_PROTOCOL)
    prefix = _PREFIX.pack(seq, len(header), sum(m[2] for m in meta))
    tag1 = hmac.new(key, prefix, hashlib.sha256).digest()
    mac = hmac.new(key, tag1, hashlib.sha256)
    mac.update(header)
    return prefix + tag1 + header, flat, mac


def encode_frame(message, key: bytes, seq: int) -> list:
    """The buffers of one authenticated frame carrying ``message`` (sent in order)."""
    head, flat, mac = _frame_head(message, key, seq)
    for part in flat:
        mac.update(part)
    return [head, *flat, mac.digest()]


def _tensors(meta, body: torch.Tensor) -> list[torch.Tensor]:
    """Tensors described by a frame header (views of ``body``, the frame's tensor bytes), after checking the header
    against the body."""
    if not isinstance(meta, list):
        raise AuthError("malformed frame header")
    out, offset, body_len = [], 0, body.numel()
    for item in meta:
        if not (isinstance(item, tuple) and len(item) == 3):
            raise AuthError("malformed tensor header")
        name, shape, nbytes = item
        dtype = _DTYPES.get(name)
        if dtype is None:
            raise AuthError(f"tensor dtype {name!r} is not allowed on the pool channel")
        if not (isinstance(shape, tuple) and all(isinstance(s, int) and s >= 0 for s in shape)):
            raise AuthError(f"bad tensor shape {shape!r}")
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty((), dtype=dtype).element_size()
        if not isinstance(nbytes, int) or nbytes != numel * itemsize or offset + nbytes > body_len:
            raise AuthError(f"tensor header says {nbytes} bytes for {name}{list(shape)}")
        data = body[offset:offset + nbytes]
        if offset % itemsize:  # after an odd-sized tensor: an aligned copy
            data = data.clone()
        offset += nbytes
        out.append(data.view(dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype))
    if offset != body_len:
        raise AuthError("frame body length does not match its tensors")
    return out


class FrameReader:
    """Incremental parser: ``feed`` bytes as they arrive, get back the complete messages (never blocks).

    After a frame's prefix (lengths and their tag) checks out, its header, tensor bytes and final tag go into
    buffers of their exact sizes (the tensor bytes into one uninitialized tensor the messages' tensors are views
    of), hashed as they arrive. ``direct()`` lends the unfilled part of the tensor bytes to receive into without a
    copy (``Channel.read_available``); ``filled(n)`` accounts for what landed there.
    """

    def __init__(self, key: bytes, max_body: int = MAX_BODY):
        self.key, self.max_body = key, max_body
        self.seq = 0
        self._buf = bytearray()  # the prefix of the next frame, until it is whole
        self._frame: _Frame | None = None

    @property
    def partial(self) -> bool:
        """True while a frame has started but not fully arrived."""
        return bool(self._buf) or self._frame is not None

    def feed(self, data) -> list:
        messages = []
        data = memoryview(data).cast("B")
        while data:
            if self._frame is None:
                need = _PREFIX.size + _TAG - len(self._buf)
                self._buf += data[:need]
                data = data[need:]
                if len(self._buf) == _PREFIX.size + _TAG:
                    self._start(bytes(self._buf))
                    self._buf.clear()
                continue
            window = self._frame.window()
            n = min(len(window), len(data))
            window[:n] = data[:n]
            data = data[n:]
            messages += self.filled(n)
        return messages

    def direct(self) -> memoryview | None:
        """The unfilled part of the current frame's tensor bytes when at least ``_DIRECT`` bytes are due, else None."""
        frame = self._frame
        if frame is None or frame.part != 1 or frame.remaining() < _DIRECT:
            return None
        return frame.window()

    def filled(self, n: int) -> list:
        """``n`` bytes were written at the start of the current frame's window: the message it completes, if any."""
        frame = self._frame
        if frame.advance(n):
            self._frame = None
            self.seq += 1
            return [frame.message()]
        return []

    def _start(self, head: bytes) -> None:
        prefix, tag1 = head[:_PREFIX.size], head[_PREFIX.size:]
        if not hmac.compare_digest(tag1, hmac.new(self.key, prefix, hashlib.sha256).digest()):
            raise AuthError("a frame failed its authentication check (injected or corrupted)")
        seq, header_len, body_len = _PREFIX.unpack(prefix)
        if seq != self.seq:
            raise AuthError(f"frame {seq} arrived where frame {self.seq} was due (replayed or reordered)")
        if header_len > MAX_HEADER or body_len > self.max_body:
            raise AuthError(f"frame of {header_len} + {body_len} bytes exceeds the channel's limits")
        self._frame = _Frame(self.key, tag1, header_len, body_len)


class _Frame:
    """One frame after its authenticated prefix: header, tensor bytes and tag, filled in that order."""

    def __init__(self, key: bytes, tag1: bytes, header_len: int, body_len: int):
        self.mac = hmac.new(key, tag1, hashlib.sha256)
        self.header = bytearray(header_len)
        self.body = torch.empty(body_len, dtype=torch.uint8)
        self.tag = bytearray(_TAG)
        self.views = [memoryview(self.header), memoryview(self.body.numpy()).cast("B"), memoryview(self.tag)]
        self.part, self.offset = 0, 0
        self._skip_empty()

    def window(self) -> memoryview:
        return self.views[self.part][self.offset:]

    def remaining(self) -> int:
        return len(self.views[self.part]) - self.offset

    def advance(self, n: int) -> bool:
        """Account for ``n`` bytes written at ``window()``; True once the whole frame is here."""
        if self.part < 2:
            self.mac.update(self.views[self.part][self.offset:self.offset + n])
        self.offset += n
        self._skip_empty()
        return self.part == 3

    def _skip_empty(self) -> None:
        while self.part < 3 and self.offset == len(self.views[self.part]):
            self.part, self.offset = self.part + 1, 0

    def message(self):
        if not hmac.compare_digest(bytes(self.tag), self.mac.digest()):
            raise AuthError("a frame failed its authentication check (tampered)")
        try:
            meta, body = _restricted_loads(bytes(self.header), [])
        except (pickle.UnpicklingError, ValueError, EOFError, TypeError) as error:
            raise AuthError(f"malformed frame header: {error}") from None
        return _restricted_loads(body, _tensors(meta, self.body))


class Channel:
    """One end of a worker connection. ``send`` is thread-safe; ``recv``/``read_available`` are for one reader."""

    def __init__(self, sock: socket.socket, key_out: bytes, key_in: bytes, send_timeout: float | None = None):
        sock.settimeout(send_timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self.sock = sock
        self._key_out = key_out
        self._send_seq = 0
        self._reader = FrameReader(key_in)
        self._ready: deque = deque()
        self._send_lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._closed = False

    # -- connection setup --------------------------------------------------------------------------------
    @classmethod
    def connect(cls, host: str, port: int, key: bytes, timeout: float = 30.0) -> "Channel":
        """The worker's end: connect, prove the key, check the controller's proof."""
        sock = socket.create_connection((host, port), timeout=timeout)
        try:
            sock.settimeout(timeout)
            theirs = _recv_exact(sock, len(_MAGIC) + _NONCE)
            if not theirs.startswith(_MAGIC):
                raise AuthError("the other end does not speak the xDiT CogVideoX pool protocol "
                                "(install the same comfyui-xdit-cogvideo version everywhere)")
            nc, nw = theirs[len(_MAGIC):], os.urandom(_NONCE)
            sock.sendall(_MAGIC + nw + hmac.new(key, b"worker" + nc + nw, hashlib.sha256).digest())
            answer = _recv_exact(sock, _TAG)
            if not hmac.compare_digest(answer, hmac.new(key, b"controller" + nw + nc, hashlib.sha256).digest()):
                raise AuthError("the pool controller does not hold this key (set the same XDIT_COGVIDEO_POOL_KEY "
                                "on the controller and every worker)")
        except BaseException:
            sock.close()
            raise
        keys = _session_keys(key, nc, nw)
        return cls(sock, keys["w2c"], keys["c2w"])

    @classmethod
    def accept(cls, sock: socket.socket, key: bytes, timeout: float = 30.0,
               send_timeout: float | None = None) -> "Channel":
        """The controller's end: challenge, check the worker's proof first, then prove the key ourselves."""
        try:
            sock.settimeout(timeout)
            nc = os.urandom(_NONCE)
            sock.sendall(_MAGIC + nc)
            reply = _recv_exact(sock, len(_MAGIC) + _NONCE + _TAG)
            if not reply.startswith(_MAGIC):
                raise AuthError("the other end does not speak the xDiT CogVideoX pool protocol")
            nw, proof = reply[len(_MAGIC):len(_MAGIC) + _NONCE], reply[len(_MAGIC) + _NONCE:]
            if not hmac.compare_digest(proof, hmac.new(key, b"worker" + nc + nw, hashlib.sha256).digest()):
                raise AuthError("pool key mismatch (set the same XDIT_COGVIDEO_POOL_KEY on the controller and workers)")
            sock.sendall(hmac.new(key, b"controller" + nw + nc, hashlib.sha256).digest())
        except BaseException:
            sock.close()
            raise
        keys = _session_keys(key, nc, nw)
        return cls(sock, keys["c2w"], keys["w2c"], send_timeout=send_timeout)

    # -- messages ----------------------------------------------------------------------------------------
    def send(self, message, blocking: bool = True) -> bool:
        """Send one message. ``blocking=False``: give up (False) if another thread is sending right now."""
        if not self._send_lock.acquire(blocking):
            return False
        try:
            if self._closed:
                raise ChannelClosed("channel is closed")
            head, flat, mac = _frame_head(message, self._key_out, self._send_seq)
            self._send_seq += 1
            try:
                self.sock.sendall(head)
                for part in flat:  # hash a piece, send it: the receiver works on it while the next is hashed
                    for start in range(0, len(part), _PIECE):
                        piece = part[start:start + _PIECE]
                        mac.update(piece)
                        self.sock.sendall(piece)
                self.sock.sendall(mac.digest())
            except (OSError, ValueError) as error:  # socket.timeout is an OSError
                self._closed_by_error()
                raise ChannelClosed(f"send failed: {error}") from None
        finally:
            self._send_lock.release()
        return True

    def read_available(self) -> list:
        """The messages completed by the bytes available now (one read; never blocks). ChannelClosed on EOF."""
        if self._closed:
            raise ChannelClosed("channel is closed")
        direct = self._reader.direct()  # a large tensor's bytes: straight into its buffer
        try:
            if direct is not None:
                got = self.sock.recv_into(direct, len(direct), getattr(socket, "MSG_DONTWAIT", 0))
            else:
                data = self.sock.recv(_CHUNK, getattr(socket, "MSG_DONTWAIT", 0))
                got = len(data)
        except (BlockingIOError, InterruptedError, socket.timeout):
            return []
        except (OSError, ValueError) as error:
            raise ChannelClosed(f"connection lost: {error}") from None
        if not got:
            raise ChannelClosed("connection closed by the other end")
        return self._reader.filled(got) if direct is not None else self._reader.feed(data)

    @property
    def partial(self) -> bool:
        """A frame from the other end has started but not finished."""
        return self._reader.partial

    def recv(self, timeout: float | None = None):
        """The next whole message; ``TimeoutError`` if it has not arrived within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._ready:
            if self._closed:
                raise ChannelClosed("channel is closed")
            if self._selector is None:
                self._selector = selectors.DefaultSelector()
                self._selector.register(self.sock, selectors.EVENT_READ)
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self._selector.select(wait if wait is None else min(wait, 1.0)):
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError("no message")
                continue
            self._ready.extend(self.read_available())
        return self._ready.popleft()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _closed_by_error(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        if self._selector is not None:
            self._selector.close()

    @property
    def closed(self) -> bool:
        return self._closed


def _session_keys(key: bytes, nc: bytes, nw: bytes) -> dict[str, bytes]:
    return {d: hmac.new(key, d.encode() + nc + nw, hashlib.sha256).digest() for d in ("c2w", "w2c")}


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        try:
            got = sock.recv(n - len(data))
        except socket.timeout:
            raise TimeoutError("handshake timed out") from None
        except OSError as error:
            raise ChannelClosed(f"connection lost: {error}") from None
        if not got:
            raise ChannelClosed("connection closed by the other end")
        data += got
    return bytes(data)


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
