"""What the pool exposes to the network and to other users: keys, frames, handshakes, device locks, and the
ComfyUI routes' latency while a start is pending."""

from __future__ import annotations

import hashlib
import hmac
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from comfyui_xdit_cogvideo.errors import AuthError, PoolError
from comfyui_xdit_cogvideo.pool import controller
from comfyui_xdit_cogvideo.pool.channel import Channel, FrameReader, encode_frame, free_port
from channels import channel_pair

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]
KEY = b"k" * 32


@pytest.mark.parametrize("worker_key", [b"w" * 32, b"", KEY[:-1] + b"x"])
def test_a_worker_with_a_wrong_or_empty_key_is_refused(worker_key):
    controller_end, worker_end = channel_pair(KEY, worker_key)
    assert isinstance(controller_end, AuthError) and "key mismatch" in str(controller_end)
    assert not isinstance(worker_end, Channel)  # the controller never proved itself to an unproven worker


def test_a_short_key_is_refused_by_the_worker_and_by_a_listening_pool(monkeypatch, capsys):
    env = dict(os.environ, XDIT_COGVIDEO_POOL_KEY="short", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--connect", "127.0.0.1:9"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "needs at least 32" in run.stderr
    devices = controller.parse_devices("listen://127.0.0.1:29600?world=2")
    monkeypatch.setenv("XDIT_COGVIDEO_POOL_KEY", "x" * 31)
    with pytest.raises(PoolError, match="holds 31 bytes; a pool key needs at least 32"):
        controller._remote_key(devices)
    # none set: one is made, and the command that starts workers with it is printed
    monkeypatch.delenv("XDIT_COGVIDEO_POOL_KEY")
    key = controller._remote_key(devices).decode()
    assert len(key) == 64 and os.environ["XDIT_COGVIDEO_POOL_KEY"] == key
    printed = capsys.readouterr().err
    assert f"XDIT_COGVIDEO_POOL_KEY={key} torchrun" in printed and "--connect 127.0.0.1:29600" in printed


def test_frames_are_authenticated_in_order_and_their_headers_checked():
    key = os.urandom(32)
    frames = [b"".join(bytes(p) for p in encode_frame({"op": "event", "n": i, "t": torch.arange(4)}, key, i))
              for i in range(3)]
    reader = FrameReader(key)
    first = reader.feed(frames[0][:10]) + reader.feed(frames[0][10:])  # a partial frame waits, never blocks
    assert first[0]["n"] == 0 and torch.equal(first[0]["t"], torch.arange(4))
    with pytest.raises(AuthError, match="replayed or reordered"):
        FrameReader(key).feed(frames[1])  # frame 1 where frame 0 is due
    replay = FrameReader(key)
    replay.feed(frames[0])
    with pytest.raises(AuthError, match="replayed or reordered"):
        replay.feed(frames[0])
    for position in (5, 40, len(frames[0]) - 40, len(frames[0]) - 1):  # prefix, header, tensor bytes, tag
        tampered = bytearray(frames[0])
        tampered[position] ^= 1
        with pytest.raises(AuthError):
            FrameReader(key).feed(bytes(tampered))
    with pytest.raises(AuthError, match="authentication check"):  # injected: made without the session key
        FrameReader(key).feed(b"".join(bytes(p) for p in encode_frame({"op": "ping"}, os.urandom(32), 0)))
    with pytest.raises(AuthError, match="exceeds the channel's limits"):
        FrameReader(key, max_body=8).feed(frames[0])

    def forged(meta, body: bytes) -> bytes:  # a peer holding the key but lying in the header
        header = pickle.dumps((meta, pickle.dumps({"t": None})))
        prefix = struct.pack("!QQQ", 0, len(header), len(body))
        tag1 = hmac.new(key, prefix, hashlib.sha256).digest()
        return prefix + tag1 + header + body + hmac.new(key, tag1 + header + body, hashlib.sha256).digest()

    with pytest.raises(AuthError, match="says 64 bytes"):
        FrameReader(key).feed(forged([("float32", (4,), 64)], bytes(64)))
    with pytest.raises(AuthError, match="not allowed"):
        FrameReader(key).feed(forged([("complex64", (1,), 8)], bytes(8)))


def test_large_tensors_arrive_in_one_buffer_hashed_on_the_way_and_checked():
    """Issue 17: a decoded video (100-200 MB) costs the socket's copy and nothing more. The receiver reads the tensor
    bytes straight into one buffer whose views are the message's tensors (an odd-sized tensor before a float one
    gets an aligned copy); a byte changed in transit still fails the frame."""
    a, b = channel_pair(KEY, KEY)
    try:
        video = torch.rand(9, 64, 96, 3, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)  # 324 KiB
        mask = torch.tensor([True, False, True])
        scale = torch.arange(5, dtype=torch.float32)
        b.send({"op": "result", "video": video, "mask": mask, "scale": scale, "twice": [video, video[:1]]})
        got = a.recv(timeout=30)
        assert torch.equal(got["video"], video) and torch.equal(got["mask"], mask) and torch.equal(got["scale"], scale)
        assert torch.equal(got["twice"][0], video) and torch.equal(got["twice"][1], video[:1])
        assert got["video"].untyped_storage().data_ptr() == got["mask"].untyped_storage().data_ptr()  # one buffer
        assert got["scale"].data_ptr() % 4 == 0 and got["video"].is_contiguous()
        # a byte of the tensor bytes changed on the way (sent raw with the sender's own key and sequence number)
        parts = encode_frame({"op": "result", "video": video}, b._key_out, b._send_seq)
        raw = bytearray(b"".join(bytes(part) for part in parts))
        raw[len(raw) // 2] ^= 1
        b.sock.sendall(raw)
        with pytest.raises(AuthError, match="tampered"):
            a.recv(timeout=30)
    finally:
        a.close()
        b.close()


def test_a_streamed_frame_is_the_encoded_frame_byte_for_byte():
    """``Channel.send`` hashes and sends large tensors in pieces; the bytes on the wire are ``encode_frame``'s."""
    a, b = channel_pair(KEY, KEY)
    try:
        message = {"op": "result", "value": torch.rand(3 << 20, generator=torch.Generator().manual_seed(2))}  # 12 MiB
        expected = b"".join(bytes(part) for part in encode_frame(message, b._key_out, b._send_seq))
        sender = threading.Thread(target=b.send, args=(message,))
        sender.start()
        a.sock.settimeout(30)
        wire = bytearray()
        while len(wire) < len(expected):
            wire += a.sock.recv(1 << 20)
        sender.join()
        assert bytes(wire) == expected
    finally:
        a.close()
        b.close()


def _wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("the pool never listened")


def test_silent_connections_do_not_delay_the_start(tiny_cache, monkeypatch):
    """Connections that never speak, then two real workers: the start goes on while the silent ones wait out
    their own deadline, on their own threads; connections beyond the cap of handshakes at once are closed."""
    monkeypatch.setattr(controller, "HANDSHAKE_TIMEOUT", 90.0)  # inline handshakes would stall the start >= 90 s
    key = os.urandom(32).hex()
    monkeypatch.setenv("XDIT_COGVIDEO_POOL_KEY", key)
    port, store_port = free_port(), free_port()
    pool = controller.WorkerPool(f"listen://127.0.0.1:{port}?world=2", start_timeout=150, echo_output=False)
    outcome = {}
    starter = threading.Thread(target=lambda: outcome.update(pool=pool.start()), daemon=True)
    starter.start()
    workers, silent = [], []
    try:
        _wait_listening(port)
        silent = [socket.create_connection(("127.0.0.1", port)) for _ in range(controller.MAX_HANDSHAKES + 4)]
        for sock in silent:
            sock.settimeout(10)
        # the first MAX_HANDSHAKES get the controller's challenge; the rest are closed on arrival
        answers = [sock.recv(64) for sock in silent]
        assert all(answers[:controller.MAX_HANDSHAKES]) and answers[controller.MAX_HANDSHAKES:] == [b""] * 4
        for sock in silent[:4]:  # make room for the two workers (a full cap holds them off for its deadline)
            sock.close()
        env = dict(os.environ, PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store_port),
                   GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
        launched = time.monotonic()
        workers = [subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo.pool.worker", "--connect",
                                     f"127.0.0.1:{port}", "--rank", str(r), "--world-size", "2", "--device", "cpu"],
                                    env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for r in range(2)]
        starter.join(150)
        took = time.monotonic() - launched
        assert outcome.get("pool") is pool and pool.status()["state"] == "idle"
        assert took < 85, f"start took {took:.0f} s with silent connections waiting"
        assert [r["rank"] for r in pool.status()["ranks"]] == [0, 1]
    finally:
        pool.shutdown()
        for s in silent:
            s.close()
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()


def test_one_pool_per_device_names_the_other_owner():
    from comfyui_xdit_cogvideo.pool.devices import DeviceLock

    name = f"test-device-{os.getpid()}"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from comfyui_xdit_cogvideo.pool.devices import DeviceLock; "
        f"lock = DeviceLock.acquire([{name!r}]); print('held', flush=True); time.sleep(120)")],
        env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(PoolError, match=f"device {name} is already used by another xdit-cogvideo pool "
                                            f"\\(pid {holder.pid}\\)"):
            DeviceLock.acquire([name])
    finally:
        holder.kill()
        holder.wait()
    DeviceLock.acquire([name]).release()  # the lock went with the process that held it


def test_weights_are_read_from_safetensors_only(tmp_path, tiny_path):
    """No weight file reaches torch.load: a pickled VAE file is refused by name, and a text encoder saved only as
    pytorch_model.bin is not loaded (use_safetensors=True)."""
    from transformers import T5Config, T5EncoderModel

    from comfyui_xdit_cogvideo.errors import ModelError
    from comfyui_xdit_cogvideo.loading import ResolvedSource, load_text_encoder, load_vae

    pickled = tmp_path / "vae.pt"
    pickled.write_bytes(b"not loaded")
    resolved = ResolvedSource(tmp_path / "t.safetensors", None, pickled, None, None)
    with pytest.raises(ModelError, match="vae .*vae.pt' is not a .safetensors file"):
        load_vae(resolved, torch.float32, "cpu", None)
    encoder = tmp_path / "text_encoder"
    model = T5EncoderModel(T5Config(vocab_size=32, d_model=8, d_kv=4, d_ff=16, num_layers=1, num_heads=2))
    model.save_pretrained(encoder)
    (encoder / "model.safetensors").unlink()  # recent transformers only write safetensors: make the pickle by hand
    torch.save(model.state_dict(), encoder / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        load_text_encoder(ResolvedSource(tmp_path, None, None, encoder, tiny_path("2b") / "tokenizer"),
                          torch.float32, "cpu")
