"""mp4 files from decoded frames (and back), through the ffmpeg binary that imageio-ffmpeg ships."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def to_uint8(frames) -> np.ndarray:
    """Frames [F, H, W, 3] (float in 0..1 as torch tensor or numpy, or uint8) -> contiguous uint8 numpy."""
    if hasattr(frames, "detach"):
        frames = frames.detach().cpu()
        frames = frames.float().numpy() if frames.dtype.is_floating_point else frames.numpy()
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [frames, height, width, 3], got {list(frames.shape)}")
    if frames.dtype != np.uint8:
        frames = np.clip(np.rint(frames.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames)


def write_video(path: str | Path, frames, fps: float = 8, crf: int = 18, codec: str = "libx264") -> Path:
    """Write an H.264 mp4 (yuv420p, plays in browsers and ComfyUI). Odd sizes are padded by one edge pixel."""
    import imageio_ffmpeg

    data = to_uint8(frames)
    if len(data) == 0:
        raise ValueError("no frames to write")
    pad_h, pad_w = data.shape[1] % 2, data.shape[2] % 2
    if pad_h or pad_w:
        data = np.pad(data, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = imageio_ffmpeg.write_frames(
        str(path), (data.shape[2], data.shape[1]), fps=fps, codec=codec, quality=None, pix_fmt_out="yuv420p",
        macro_block_size=1, output_params=["-crf", str(int(crf)), "-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    writer.send(None)
    try:
        for frame in data:
            writer.send(frame)
    finally:
        writer.close()
    return path


def read_video(path: str | Path) -> tuple[np.ndarray, dict]:
    """(frames [F, H, W, 3] uint8, metadata with ``fps`` and ``size`` (width, height)) of a video file."""
    import imageio_ffmpeg

    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    frames = [np.frombuffer(raw, dtype=np.uint8).reshape(height, width, 3) for raw in reader]
    return np.stack(frames) if frames else np.zeros((0, height, width, 3), np.uint8), meta
