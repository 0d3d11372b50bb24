"""The video writer: a write either leaves a complete file or raises with ffmpeg's reason; pre-flight checks."""

from __future__ import annotations

import os
import sys
from pathlib import Path

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
    with pytest.raises(VideoWriteError, match=r"must end with \.mp4, \.mov or \.mkv"):
        check_writable(tmp_path / "v.webm", 32, 48, 8)
    with pytest.raises(VideoWriteError, match="is a directory"):
        check_writable(tmp_path, 32, 48, 8)
    with pytest.raises(VideoWriteError, match="at most 16384 pixels per side"):
        check_writable(tmp_path / "v.mp4", 16400, 16, 8)
    with pytest.raises(ValueError, match="fps must be"):
        check_writable(tmp_path / "v.mp4", 32, 48, -5)


def test_output_paths_are_checked_once_for_every_writer(tmp_path, monkeypatch):
    """The CLI (videos and latents) and the writer share check_output_path: a directory, a wrong suffix, a missing or
    read-only folder are one line naming the path; ``create`` accepts a folder that can be made (ComfyUI makes its
    output subfolders)."""
    from comfyui_xdit_cogvideo.video import OutputPathError, check_output_path

    assert check_output_path(tmp_path / "x.safetensors", (".safetensors",)) == tmp_path / "x.safetensors"
    with pytest.raises(OutputPathError, match=r"'.*' is a directory; give a file name such as '.*out\.mp4'"):
        check_output_path(tmp_path)
    with pytest.raises(OutputPathError, match=r"'.*x\.pt' must end with \.safetensors$"):
        check_output_path(tmp_path / "x.pt", (".safetensors",))
    with pytest.raises(OutputPathError, match="folder '.*/a/b' does not exist"):
        check_output_path(tmp_path / "a" / "b" / "v.mp4")
    assert check_output_path(tmp_path / "a" / "b" / "v.mp4", create=True) == tmp_path / "a" / "b" / "v.mp4"
    assert not (tmp_path / "a").exists()  # checked, not made
    (tmp_path / "file").write_text("")
    with pytest.raises(OutputPathError, match="cannot be made: '.*/file' is a file"):
        check_output_path(tmp_path / "file" / "sub" / "v.mp4", create=True)
    # a read-only folder (simulated: os.access says no whatever the user, root included)
    real_access = os.access
    monkeypatch.setattr(video.os, "access", lambda p, mode: False if Path(p) == tmp_path else real_access(p, mode))
    with pytest.raises(OutputPathError, match=f"folder '{tmp_path}' is not writable"):
        check_output_path(tmp_path / "v.mp4")
    with pytest.raises(OutputPathError, match=f"folder '{tmp_path}' is not writable"):
        check_output_path(tmp_path / "new" / "v.mp4", create=True)


def test_encoder_probe_runs_once_per_process_and_names_what_is_missing(monkeypatch):
    video._ENCODERS_OK.clear()
    runs = []
    real = video._run_ffmpeg
    monkeypatch.setattr(video, "_run_ffmpeg", lambda *a: runs.append(a) or real(*a))
    exe = video.check_encoder()
    assert exe == video.ffmpeg_exe() and len(runs) == 1 and runs[0][1].shape == (2, 16, 16, 3)
    assert video.check_encoder() == exe and len(runs) == 1  # cached
    with pytest.raises(VideoWriteError, match="ffmpeg could not write a 16x16 nonexistent test clip: Unknown encoder"):
        video.check_encoder("nonexistent")
    with pytest.raises(VideoWriteError, match="ffmpeg could not write a 16x16 nonexistent test clip"):
        video.check_encoder("nonexistent")  # failures are not cached
    monkeypatch.setitem(sys.modules, "imageio_ffmpeg", None)  # as if imageio-ffmpeg were not installed
    with pytest.raises(VideoWriteError, match="^writing videos needs imageio-ffmpeg: pip install imageio-ffmpeg$"):
        video.check_encoder()


def test_an_ffmpeg_that_cannot_run_fails_the_probe(tmp_path, monkeypatch):
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\nexit 0\n")  # not executable
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    with pytest.raises(VideoWriteError, match="cannot run ffmpeg .*Permission denied"):
        video.check_encoder()
    fake.chmod(0o755)  # runs, exits 0, writes nothing
    with pytest.raises(VideoWriteError, match="exited without error but wrote no libx264 test clip"):
        video.check_encoder()
