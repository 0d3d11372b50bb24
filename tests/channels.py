"""A connected pair of pool channels over loopback, for tests of the channel and its handshake."""

from __future__ import annotations

import threading

from comfyui_xdit_cogvideo.pool.channel import Channel, listen


def channel_pair(key_a: bytes, key_b: bytes):
    """(accepting end or its error, connecting end or its error) for a handshake between keys ``key_a``/``key_b``."""
    server = listen("127.0.0.1", 0)
    port = server.getsockname()[1]
    result = {}

    def accept():
        sock, _ = server.accept()
        try:
            result["channel"] = Channel.accept(sock, key_a, timeout=5)
        except Exception as error:  # noqa: BLE001 - handed to the test
            result["error"] = error

    thread = threading.Thread(target=accept)
    thread.start()
    try:
        client = Channel.connect("127.0.0.1", port, key_b, timeout=5)
    except Exception as error:  # noqa: BLE001
        client = error
    thread.join()
    server.close()
    return result.get("channel", result.get("error")), client
