"""The video writer: a write either leaves a complete file or raises with ffmpeg's reason; pre-flight checks."""

from __future__ import annotations

import numpy as np
import pytest

from comfyui_xdit_cogvideo import video
from comfyui_xdit_cogvideo.video import VideoWriteError, check_writable, read_video, write_video

_y, _x = np.mgrid[0:32, 0:48] / 64.0
FRAMES = np.stack([np.stack([_x + t / 10, _y, (_x + _y) / 2], axis=-1) for t in range(5)])  # smooth, encodes well


@pytest.mark.parametrize("suffix", video.VIDEO_SUFFIXES)
def test_every_documented_container_round_trips(tmp_path, suffix):
    path = write_video(tmp_path / f"v{suffix}", FRAMES, fps=12)
    frames, meta = read_video(path)
    assert frames.shape == (5, 32, 48, 3) and round(meta["fps"]) == 12
    assert abs(frames.astype(float) / 255 - FRAMES).mean() < 0.05
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"v{suffix}"]  # no temporary file left


@pytest.mark.parametrize("fps", [-5, 0, float("nan"), float("inf"), "x"])
def test_bad_fps_is_refused_before_ffmpeg_runs(tmp_path, fps):
    with pytest.raises(ValueError, match="fps must be"):
        write_video(tmp_path / "v.mp4", FRAMES, fps=fps)
    assert list(tmp_path.iterdir()) == []


def test_ffmpeg_failure_raises_with_its_reason_and_keeps_the_old_file(tmp_path):
    path = write_video(tmp_path / "v.mp4", FRAMES)
    before = path.read_bytes()
    with pytest.raises(VideoWriteError, match="ffmpeg could not write .*Unknown encoder 'nonexistent'"):
        write_video(path, FRAMES, codec="nonexistent")
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["v.mp4"]


def test_ffmpeg_that_succeeds_without_writing_is_an_error(tmp_path, monkeypatch):
    """What a full disk or a lying ffmpeg looks like: exit status 0, no file."""
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    with pytest.raises(VideoWriteError, match="ffmpeg exited without error but left .* missing or empty"):
        write_video(tmp_path / "v.mp4", FRAMES)
    assert not (tmp_path / "v.mp4").exists()


def test_ffmpeg_exit_status_is_checked(tmp_path, monkeypatch):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho 'Error writing trailer: No space left on device' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    with pytest.raises(VideoWriteError, match="No space left on device"):
        write_video(tmp_path / "v.mp4", FRAMES)


def test_non_finite_frames_are_refused(tmp_path):
    frames = FRAMES.copy()
    frames[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        write_video(tmp_path / "v.mp4", frames)


def test_preflight_checks_folder_container_size_and_fps(tmp_path):
    assert check_writable(tmp_path / "ok.mp4", 480, 720, 8) == tmp_path / "ok.mp4"
    assert list(tmp_path.iterdir()) == []  # the probe is removed
    with pytest.raises(VideoWriteError, match="does not exist"):
        check_writable(tmp_path / "missing" / "v.mp4", 32, 48, 8)
    with pytest.raises(VideoWriteError, match=r"must end with \.mp4, \.mov, \.mkv"):
        check_writable(tmp_path / "v.webm", 32, 48, 8)
    with pytest.raises(VideoWriteError, match="is a directory"):
        check_writable(tmp_path, 32, 48, 8)
    with pytest.raises(VideoWriteError, match="at most 16384 pixels per side"):
        check_writable(tmp_path / "v.mp4", 16400, 16, 8)
    with pytest.raises(ValueError, match="fps must be"):
        check_writable(tmp_path / "v.mp4", 32, 48, -5)


def test_the_cli_accepts_exactly_the_writers_containers():
    from comfyui_xdit_cogvideo import cli

    assert cli.VIDEO_SUFFIXES == video.VIDEO_SUFFIXES
