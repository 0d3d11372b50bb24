"""Video files from decoded frames (and back), through the ffmpeg binary that imageio-ffmpeg ships.

Every file is H.264 (yuv420p, plays in browsers and ComfyUI) in one of ``VIDEO_SUFFIXES``' containers. A write
either leaves a complete, non-empty file or raises ``VideoWriteError`` with ffmpeg's reason: ffmpeg's exit status
is checked and the file is written under a temporary name, then renamed, so a failed write never reports success
and never replaces an existing file with a broken one.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
import threading
from pathlib import Path

import numpy as np

VIDEO_SUFFIXES = (".mp4", ".mov", ".mkv")
MAX_SIDE = 16384  # libx264 refuses wider or taller frames


class VideoWriteError(RuntimeError):
    """The video could not be written (no ffmpeg, bad folder, container, size or fps, full disk, ...)."""


class OutputPathError(VideoWriteError):
    """An output file path no writer can use: a directory, an unknown suffix, a missing or read-only folder."""


def to_uint8(frames) -> np.ndarray:
    """Frames [F, H, W, 3] (float in 0..1 as torch tensor or numpy, or uint8) -> contiguous uint8 numpy."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu()
        frames = frames.float().numpy() if frames.dtype.is_floating_point else frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [frames, height, width, 3], got {list(frames.shape)}")
    if frames.dtype != np.uint8:
        if not np.isfinite(frames).all():
            raise ValueError("frames contain NaN or infinite values; the video would be black or garbage")
        frames = np.clip(np.rint(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames)


def check_fps(fps) -> float:
    """``fps`` as a float, or ValueError naming it: ffmpeg needs a finite rate above 0 (at most 1000)."""
    try:
        value = float(fps)
    except (TypeError, ValueError):
        raise ValueError(f"fps must be a number, got {fps!r}") from None
    if not math.isfinite(value) or not 0 < value <= 1000:
        raise ValueError(f"fps must be a number above 0 and at most 1000 (e.g. 8 or 16), got {fps}")
    return value


def check_output_path(path: str | Path, suffixes: tuple[str, ...] = VIDEO_SUFFIXES, create: bool = False) -> Path:
    """``path`` if a file with one of ``suffixes`` can be written there, else OutputPathError naming what is wrong.

    The one path check for every output file (videos here, latents in the CLI): not a directory, a known suffix,
    and a folder that exists and is writable (``create``: or a folder the writer may create, i.e. whose nearest
    existing parent is a writable folder, as ComfyUI creates its output subfolders).
    """
    path = Path(path).expanduser()
    example = path / f"out{suffixes[0]}"
    if path.is_dir():
        raise OutputPathError(f"{str(path)!r} is a directory; give a file name such as {str(example)!r}")
    if path.suffix.lower() not in suffixes:
        names = " or ".join(", ".join(suffixes).rsplit(", ", 1))
        raise OutputPathError(f"{str(path)!r} must end with {names}")
    folder = path.parent
    existing = folder
    while create and not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(f"folder {str(folder)!r} " + ("does not exist" if not existing.exists() else
                                                            f"cannot be made: {str(existing)!r} is a file"))
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"folder {str(existing)!r} is not writable")
    return path


def check_video_path(path: str | Path, create: bool = False) -> Path:
    """The output path if its container is supported and its folder exists (or, ``create``, can be made) and is
    writable, else OutputPathError (a VideoWriteError)."""
    return check_output_path(path, VIDEO_SUFFIXES, create)


def ffmpeg_exe() -> str:
    """The ffmpeg binary (imageio-ffmpeg's, or IMAGEIO_FFMPEG_EXE), or VideoWriteError saying how to get one."""
    try:
        import imageio_ffmpeg
    except ImportError:
        raise VideoWriteError("writing videos needs imageio-ffmpeg: pip install imageio-ffmpeg") from None
    try:
        exe = imageio_ffmpeg.get_ffmpeg_exe()
    except RuntimeError as error:
        raise VideoWriteError(f"no ffmpeg binary found ({error}); pip install imageio-ffmpeg") from None
    return exe


_ENCODERS_OK: set[tuple[str, str]] = set()  # (ffmpeg binary, codec) pairs that encoded the probe in this process


def check_encoder(codec: str = "libx264") -> str:
    """The ffmpeg binary, once it has encoded a 2-frame 16x16 clip with ``codec`` into a temporary folder.

    Pre-flight for every video output: a missing imageio-ffmpeg, a binary that does not run or a build without the
    encoder fails here in a fraction of a second, not after sampling. Checked once per process and binary.
    """
    exe = ffmpeg_exe()
    if (exe, codec) in _ENCODERS_OK:
        return exe
    with tempfile.TemporaryDirectory(prefix="xdit-cogvideo-probe-") as folder:
        probe = Path(folder) / "probe.mp4"
        cmd = [exe, "-y", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", "16x16", "-r", "8",
               "-i", "-", "-an", "-c:v", codec, "-pix_fmt", "yuv420p", str(probe)]
        _run_ffmpeg(cmd, np.zeros((2, 16, 16, 3), np.uint8), f"a 16x16 {codec} test clip")
        if not probe.is_file() or probe.stat().st_size == 0:
            raise VideoWriteError(f"ffmpeg ({exe}) exited without error but wrote no {codec} test clip")
    _ENCODERS_OK.add((exe, codec))
    return exe


def write_video(path: str | Path, frames, fps: float = 8, crf: int = 18, codec: str = "libx264",
                metadata: dict | None = None) -> Path:
    """Write H.264 video (yuv420p) to ``path`` (.mp4, .mov or .mkv). Odd sizes are padded by one edge pixel.

    ``metadata``: container tags, one value each (non-strings stored as JSON), e.g. ComfyUI's ``prompt`` and
    ``workflow``, so dropping the file on ComfyUI restores the graph. Raises ValueError for bad frames or fps and
    VideoWriteError when ffmpeg fails or leaves no file.
    """
    fps = check_fps(fps)
    data = to_uint8(frames)
    if len(data) == 0:
        raise ValueError("no frames to write")
    pad_h, pad_w = data.shape[1] % 2, data.shape[2] % 2
    if pad_h or pad_w:
        data = np.pad(data, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    if max(data.shape[1:3]) > MAX_SIDE:
        raise VideoWriteError(f"H.264 (libx264) encodes at most {MAX_SIDE} pixels per side, got {data.shape[1]} x "
                              f"{data.shape[2]} (height x width)")
    path = check_video_path(path)
    partial = path.with_name(f".{path.stem}.partial{os.getpid()}{path.suffix}")
    height, width = data.shape[1:3]
    tags = path.with_name(f".{path.stem}.tags{os.getpid()}.txt") if metadata else None
    movflags = "+faststart" + ("+use_metadata_tags" if metadata else "")
    mov = ["-movflags", movflags] if path.suffix.lower() in (".mp4", ".mov") else []
    tag_input = ["-f", "ffmetadata", "-i", str(tags)] if tags else []
    tag_map = ["-map", "0:v", "-map_metadata", "1"] if tags else []
    cmd = [ffmpeg_exe(), "-y", "-nostdin", "-v", "error", "-f", "rawvideo", "-pix_fmt", "rgb24",
           "-s", f"{width}x{height}", "-r", f"{fps:g}", "-i", "-", *tag_input, *tag_map, "-an", "-c:v", codec,
           "-pix_fmt", "yuv420p", "-crf", str(int(crf)), *mov, str(partial)]
    try:
        if tags:
            tags.write_text(ffmetadata(metadata), encoding="utf-8")
        _run_ffmpeg(cmd, data, repr(str(path)))
        if not partial.is_file() or partial.stat().st_size == 0:
            raise VideoWriteError(f"ffmpeg exited without error but left {str(path)!r} missing or empty")
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)
        if tags:
            tags.unlink(missing_ok=True)
    return path


def ffmetadata(metadata: dict) -> str:
    """An ffmpeg FFMETADATA1 file: each value as JSON unless a string (as ComfyUI's SaveVideo stores its tags);
    ``= ; # \\`` and newlines escaped."""
    import json

    def escape(text: str) -> str:
        return "".join("\\" + c if c in "=;#\\\n" else c for c in text)

    lines = [";FFMETADATA1"]
    lines += [f"{escape(str(key))}={escape(value if isinstance(value, str) else json.dumps(value))}"
              for key, value in metadata.items()]
    return "\n".join(lines) + "\n"


def _run_ffmpeg(cmd: list[str], data: np.ndarray, shown: str) -> None:
    """Feed ``data`` to ffmpeg's stdin; raise VideoWriteError with ffmpeg's own message if it fails."""
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except OSError as error:
        raise VideoWriteError(f"cannot run ffmpeg ({cmd[0]}): {error}") from None
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(proc.stderr.read()), daemon=True)
    reader.start()
    try:
        try:
            for frame in data:
                proc.stdin.write(frame.tobytes())
        except (BrokenPipeError, OSError):
            pass  # ffmpeg stopped early; its exit status and message below say why
        finally:
            try:
                proc.stdin.close()
            except OSError:
                pass
        code = proc.wait()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    reader.join()
    if code != 0:
        text = b"".join(errors).decode(errors="replace")
        lines = [re.sub(r"^(\[[^]]*\]\s*)+", "", line).strip() for line in text.splitlines()]
        lines = [line for line in lines if line]
        reason = lines[0] if lines else f"exit status {code}"
        raise VideoWriteError(f"ffmpeg could not write {shown}: {reason.replace(cmd[-1], shown)}")


def check_writable(path: str | Path, height: int, width: int, fps: float) -> Path:
    """Pre-flight for ``write_video``: encode one black frame of this size and fps beside ``path`` and delete it.

    Runs before any sampling, so a missing ffmpeg, a bad folder, container, size or fps fails in a second
    instead of after the whole generation.
    """
    path = check_video_path(path)
    probe = path.with_name(f".{path.stem}.check{os.getpid()}{path.suffix}")
    try:
        write_video(probe, np.zeros((1, height, width, 3), np.uint8), fps=fps)
    except VideoWriteError as error:
        raise VideoWriteError(str(error).replace(str(probe), str(path))) from None
    finally:
        probe.unlink(missing_ok=True)
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, dict]:
    """(frames [F, H, W, 3] uint8, metadata with ``fps`` and ``size`` (width, height)) of a video file."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta
