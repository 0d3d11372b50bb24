"""The command line: the README command writes a real mp4, --latents-out equals diffusers, bad input is one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from comfyui_xdit_cogvideo import cli
from comfyui_xdit_cogvideo.pool import registry as controller
from comfyui_xdit_cogvideo.video import read_video

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(tiny_path):
    """diffusers' own CogVideoXPipeline latents and T5 embeddings for the tiny model."""
    from diffusers import CogVideoXPipeline

    pipe = CogVideoXPipeline.from_pretrained(tiny_path("2b"))
    latents = pipe(prompt="a cat playing piano", num_frames=9, height=32, width=48, num_inference_steps=3,
                   guidance_scale=6.0, generator=torch.Generator().manual_seed(7), output_type="latent").frames
    positive, negative = pipe.encode_prompt("a cat playing piano", "", do_classifier_free_guidance=True,
                                            max_sequence_length=226)
    return latents, positive, negative


def _run(argv, capsys):
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_readme_command_writes_a_real_mp4_in_well_under_a_minute(tiny_path, tmp_path):
    tiny_path("2b")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "comfyui_xdit_cogvideo", "generate", "--model", "tiny",
                           "--prompt", "a cat", "--output", "cat.mp4"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=180)
    elapsed = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    assert elapsed < 60, f"took {elapsed:.1f} s"
    frames, meta = read_video(tmp_path / "cat.mp4")
    assert frames.shape == (9, 32, 48, 3) and meta["size"] == (48, 32) and round(meta["fps"]) == 8
    assert frames.std() > 1  # real pixels, not an empty stream
    # README: one JSON line on stdout, everything for people on stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["output"] == "cat.mp4", done.stdout
    assert "wrote cat.mp4" in done.stderr and "sampling 50/50" in done.stderr
    assert "Warning" not in done.stderr and "it/s" not in done.stderr, done.stderr


def test_latents_out_equals_diffusers_on_two_ranks(reference, tiny_path, tmp_path, capsys):
    latents_file, video = tmp_path / "cat.safetensors", tmp_path / "cat.mp4"
    code, out, err = _run(["generate", "--model", "tiny", "--prompt", "a cat playing piano", "--steps", "3",
                           "--seed", "7", "--device", "cpu", "--world-size", "2", "--latents-out", str(latents_file),
                           "--output", str(video), "--fps", "12"], capsys)
    assert code == 0, err
    expected = reference[0]
    latents = load_file(str(latents_file))["latents"]
    assert latents.shape == expected.shape == (1, 3, 4, 4, 6)
    assert (latents - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    frames, meta = read_video(video)
    assert frames.shape == (9, 32, 48, 3) and round(meta["fps"]) == 12
    summary = json.loads(out)
    assert summary["layout"] == "cfg2 x ulysses1 x ring1" and summary["fps"] == 12
    # automatic decode on 2 CPU ranks: untiled on rank 0, said on stderr and in the JSON line
    assert summary["decode"] == "plain" and summary["decode_choice"].startswith("untiled on rank 0: needs ")
    assert f"decode {summary['decode_choice']}" in err
    assert controller._POOL is None  # the CLI stops its pool on the way out


def test_embeds_in_gives_the_same_latents(reference, tmp_path, capsys):
    _, positive, negative = reference
    embeds = tmp_path / "embeds.safetensors"
    save_file({"prompt_embeds": positive.contiguous(), "negative_prompt_embeds": negative.contiguous()}, str(embeds))
    out_file = tmp_path / "latents.safetensors"
    code, _, err = _run(["generate", "--model", "tiny", "--embeds", str(embeds), "--steps", "3", "--seed", "7",
                         "--latents-out", str(out_file), "--quiet"], capsys)
    assert code == 0, err
    expected = reference[0]
    latents = load_file(str(out_file))["latents"]
    assert (latents - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


O = ["--output", "cat.mp4"]
BAD = [
    (O + ["--frames", "10"], "frames must be 4k+1"),
    (O + ["--height", "40"], "height must be a positive multiple of 16"),
    (O + ["--world-size", "2", "--ulysses", "3"], "no valid layout for 2 ranks"),
    (O + ["--world-size", "2", "--ulysses", "4", "--ring", "1", "--cfg", "1"],
     "ulysses degree 4 does not divide the model's 6 attention heads"),
    (O + ["--world-size", "99"], "asks for 99 CPU ranks, but this process may use"),
    (O + ["--world-size", "2", "--cfg", "2", "--guidance", "1"], "cfg degree 2 needs classifier-free guidance"),
    (["--output", "cat.avi"], "--output: 'cat.avi' must end with .mp4, .mov or .mkv"),
    (["--latents-out", "x.pt"], "--latents-out: 'x.pt' must end with .safetensors"),
    ([], "nothing to write"),
    (O + ["--steps", "0"], "steps must be between 1 and 1000"),
    (O + ["--attention", "fa9"], "unknown attention backend 'fa9'"),
    (O + ["--attention", "flash", "--device", "cpu"], "not available on cpu"),
    (O + ["--gpus", "0,1", "--device", "cpu"], "--gpus needs --device cuda"),
    (O + ["--tile", "10x10"], "--tile sizes must be multiples of 8"),
    (["--output", "/nonexistent/dir/cat.mp4"], "does not exist"),
    (O + ["--fps", "-5"], "--fps must be a number above 0"),
    (O + ["--fps", "0"], "--fps must be a number above 0"),
    (O + ["--fps", "nan"], "--fps must be a number above 0"),
    (O + ["--image", "."], "--image '.' is a directory; give an image file"),
    (O + ["--vae", "/nonexistent/vae"], "--vae '/nonexistent/vae' does not exist"),
    (O + ["--text-encoder", "/nonexistent/t5"], "--text-encoder '/nonexistent/t5' does not exist"),
    (O + ["--image", "start.png"], "tiny is a text-to-video model and takes no start image"),
    (O + ["--height", "20000"], "H.264 (libx264) encodes at most 16384 pixels per side"),
    (O + ["--height", "100000", "--width", "100000"], "GiB of RAM"),
    (["--output", "."], "--output: '.' is a directory; give a file name such as 'out.mp4'"),
    (["--latents-out", "."], "--latents-out: '.' is a directory; give a file name such as 'out.safetensors'"),
    (["--output", "/proc/cat.mp4"], "--output: "),
]


@pytest.mark.parametrize("extra,message", BAD, ids=[m for _, m in BAD])
def test_bad_input_is_one_clear_line_and_starts_nothing(extra, message, tiny_path, tmp_path, capsys, monkeypatch):
    from PIL import Image

    tiny_path("2b")
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (48, 32)).save(tmp_path / "start.png")
    code, out, err = _run(["generate", "--model", "tiny", "--prompt", "a cat", *extra], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert controller._POOL is None


def _ffmpeg_without_x264(folder: Path) -> str:
    """An ffmpeg build without libx264 (as some distributions ship): refuses the encoder, exit status 1."""
    fake = folder / "ffmpeg-lgpl"
    fake.write_text("#!/bin/sh\ncat > /dev/null\necho \"[vost#0:0 @ 0x1] Unknown encoder 'libx264'\" >&2\nexit 1\n")
    fake.chmod(0o755)
    return str(fake)


PREFLIGHT = {
    "no imageio-ffmpeg": (lambda tmp, mp: mp.setitem(sys.modules, "imageio_ffmpeg", None), "cat.mp4",
                          "error: --output: writing videos needs imageio-ffmpeg: pip install imageio-ffmpeg"),
    "no H.264 encoder": (lambda tmp, mp: mp.setenv("IMAGEIO_FFMPEG_EXE", _ffmpeg_without_x264(tmp)), "cat.mp4",
                         "error: --output: ffmpeg could not write a 16x16 libx264 test clip: Unknown encoder 'libx264'"),
    "read-only folder": (lambda tmp, mp: mp.setattr("comfyui_xdit_cogvideo.video.os.access",
                                                    lambda p, mode: Path(p).resolve() != tmp.resolve()),
                         "cat.mp4", "error: --output: folder '.' is not writable"),
    "a directory": (lambda tmp, mp: (tmp / "cat.mp4").mkdir(), "cat.mp4",
                    "error: --output: 'cat.mp4' is a directory; give a file name such as 'cat.mp4/out.mp4'"),
}


@pytest.mark.parametrize("case", PREFLIGHT)
def test_every_output_check_runs_before_the_pool_is_asked_for_anything(case, tiny_path, tmp_path, capsys,
                                                                       monkeypatch):
    """Issue 17: a missing writer, encoder or writable folder once surfaced only after sampling and decoding. Each is
    one line now, and the pool (workers, model load, steps) is never asked for."""
    from comfyui_xdit_cogvideo import pool, video

    tiny_path("2b")
    monkeypatch.chdir(tmp_path)
    video._ENCODERS_OK.clear()
    asked = []
    monkeypatch.setattr(pool, "get_pool", lambda *a, **k: asked.append(a) or pytest.fail("pool asked for"))
    setup, output, message = PREFLIGHT[case]
    setup(tmp_path, monkeypatch)
    code, out, err = _run(["generate", "--model", "tiny", "--prompt", "a cat", "--output", output], capsys)
    assert code == 1 and out == "" and asked == []
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), err
    assert controller._POOL is None


def test_missing_things_are_named(tmp_path, capsys):
    for argv, message in (
        (["--model", "/nonexistent/model", "--prompt", "x"], "does not exist"),
        (["--model", "tiny", "--embeds", str(tmp_path / "none.safetensors")], "does not exist"),
        (["--model", "tiny-5b-i2v", "--prompt", "x", "--image", str(tmp_path / "none.png")], "does not exist"),
        (["--model", "tiny", "--prompt", "x", "--device", "cuda"] if not torch.cuda.is_available() else
         ["--model", "tiny", "--prompt", "x", "--gpus", "99"], "CUDA" if not torch.cuda.is_available() else "99"),
    ):
        code, _, err = _run(["generate", *argv, "--output", str(tmp_path / "x.mp4")], capsys)
        assert code == 1 and len(err.strip().splitlines()) == 1 and message in err, (argv, err)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"something": torch.zeros(1)}, str(wrong))
    code, _, err = _run(["generate", "--model", "tiny", "--embeds", str(wrong), "--output", "x.mp4"], capsys)
    assert code == 1 and "has no 'prompt_embeds'" in err
    code, _, err = _run(["generate", "--prompt", "x"], capsys)
    assert code == 2 and err.strip().count("\n") == 0 and "--model" in err
    code, _, err = _run(["generate", "--model", "tiny", "--embeds", str(tmp_path), "--output", "x.mp4"], capsys)
    assert code == 1 and f"--embeds {str(tmp_path)!r} is a directory; give a .safetensors file" in err, err


def test_nan_embeddings_are_refused_before_sampling(reference, tmp_path, capsys):
    _, positive, negative = reference
    embeds = tmp_path / "embeds.safetensors"
    positive = positive.clone()
    positive[0, 3, 5] = float("nan")
    save_file({"prompt_embeds": positive.contiguous(), "negative_prompt_embeds": negative.contiguous()}, str(embeds))
    code, out, err = _run(["generate", "--model", "tiny", "--embeds", str(embeds), "--output", str(tmp_path / "x.mp4")],
                          capsys)
    assert code == 1 and out == "" and "prompt_embeds contains 1 NaN or infinite value(s)" in err, err
    assert controller._POOL is None


def test_a_failed_video_write_is_an_error_not_a_lost_result(tiny_path, tmp_path, capsys, monkeypatch):
    """ffmpeg that exits 0 but writes nothing (as on a full disk): exit 1, no "wrote" line, no JSON, no file."""
    from comfyui_xdit_cogvideo import video

    tiny_path("2b")
    fake = tmp_path / "ffmpeg"
    fake.write_text("#!/bin/sh\ncat > /dev/null\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setattr(video, "ffmpeg_exe", lambda: str(fake))
    # the pre-flight checks passed, as if the disk filled up later
    monkeypatch.setattr(video, "check_encoder", lambda codec="libx264": str(fake))
    monkeypatch.setattr(video, "check_writable", lambda path, *a, **k: path)
    output = tmp_path / "cat.mp4"
    code, out, err = _run(["generate", "--model", "tiny", "--prompt", "a cat", "--steps", "1", "--quiet",
                           "--output", str(output)], capsys)
    assert code == 1 and out == "" and "wrote" not in err, (out, err)
    assert err.strip().splitlines() == [
        f"error: ffmpeg exited without error but left {str(output)!r} missing or empty"]
    assert not output.exists() and not list(tmp_path.glob(".cat*"))


def test_inputs_are_checked_before_a_model_is_built_and_third_party_output_is_hidden(tmp_path):
    """A fresh model cache: building tiny models prints nothing of transformers' or diffusers' own."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               XDIT_COGVIDEO_CACHE=str(tmp_path / "cache"))
    command = [sys.executable, "-m", "comfyui_xdit_cogvideo", "generate", "--output", str(tmp_path / "x.mp4")]
    done = subprocess.run(command + ["--model", "tiny-5b-i2v", "--prompt", "x", "--image", str(tmp_path / "no.png")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        f"error: --image {str(tmp_path / 'no.png')!r} does not exist; give an image file (PNG, JPEG, WebP, ...)"]
    assert not (tmp_path / "cache").exists()  # nothing was built
    done = subprocess.run(command + ["--model", "tiny", "--prompt", "x", "--image", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = subprocess.run(command + ["--model", "tiny", "--prompt", "x", "--frames", "10"], env=env,
                          capture_output=True, text=True, timeout=180)  # builds tiny, then refuses the request
    assert (tmp_path / "cache" / "tiny-2b" / "model_index.json").exists()
    assert done.returncode == 1 and done.stderr.strip().splitlines() == [
        "error: frames must be 4k+1 (the VAE compresses 4 frames into one latent frame, plus the first), e.g. 9 or "
        "13; got 10"], done.stderr


def test_help_is_fast_quiet_and_names_the_command_as_invoked():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "comfyui_xdit_cogvideo", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("usage: python -m comfyui_xdit_cogvideo ")
    assert elapsed < 3, f"--help took {elapsed:.1f} s"
    # pip's console script runs exactly this
    script = "import sys; from comfyui_xdit_cogvideo.cli import main; sys.exit(main())"
    done = subprocess.run([sys.executable, "-c", script, "generate", "--help"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("usage: comfyui-xdit-cogvideo generate "), done.stdout
    installed = shutil.which("comfyui-xdit-cogvideo")
    if installed:
        done = subprocess.run([installed, "--bad"], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 2 and "(see comfyui-xdit-cogvideo --help)" in done.stderr, done.stderr
    # importing the package and the CLI and pool modules loads neither diffusers, transformers nor yunchang
    probe = ("import sys, comfyui_xdit_cogvideo, comfyui_xdit_cogvideo.cli, comfyui_xdit_cogvideo.pool; "
             "from comfyui_xdit_cogvideo import GenerationRequest, CogVideoEngine; "
             "print(sorted({'diffusers', 'transformers', 'yunchang'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "[]" and done.stderr == "", (done.stdout, done.stderr)


def test_a_worker_failure_is_one_line_too(tiny_path, tmp_path, capsys):
    """Weights that break only when loaded (the config reads fine): the error comes from the worker."""
    broken = tmp_path / "broken"
    shutil.copytree(tiny_path("2b"), broken)
    weights = broken / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    code, _, err = _run(["generate", "--model", str(broken), "--prompt", "a cat", "--steps", "2", "--quiet",
                         "--latents-out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: worker rank 0 failed: "), err
    assert controller._POOL is None


def test_pool_status_command(tiny_path, capsys):
    tiny_path("2b")
    code, out, err = _run(["pool-status", "--devices", "cpu:1", "--json"], capsys)
    assert code == 0, err
    status = json.loads(out)
    assert status["world_size"] == 1 and status["state"] == "idle" and status["ranks"][0]["memory"]["rss"] > 0
    code, out, err = _run(["pool-status", "--devices", "cpu:0"], capsys)
    assert code == 1 and "cpu:N" in err
    code, out, err = _run(["pool-status", "--devices", "cpu:1", "--model", "tiny"], capsys)
    assert code == 0 and "layout cfg1 x ulysses1 x ring1" in out and err == "", (out, err)


def test_pool_status_refuses_a_bad_model_before_starting_the_pool(capsys, monkeypatch):
    from comfyui_xdit_cogvideo.pool import WorkerPool

    starts = []
    monkeypatch.setattr(WorkerPool, "start", lambda self, *a, **k: starts.append(1))
    code, out, err = _run(["pool-status", "--devices", "cpu:1", "--model", "/nonexistent/model"], capsys)
    assert code == 1 and "does not exist" in err and starts == [] and controller._POOL is None, err


def test_ctrl_c_stops_the_workers_and_exits_130(tiny_path, tmp_path):
    import signal

    import psutil

    tiny_path("2b")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-m", "comfyui_xdit_cogvideo", "generate", "--model", "tiny",
                             "--prompt", "a cat", "--steps", "1000", "--frames", "49", "--height", "96", "--width",
                             "144", "--world-size", "2", "--output", str(tmp_path / "x.mp4")],
                            env=env, stderr=subprocess.PIPE, text=True,
                            # as from a terminal: a runner started in the background (`cmd &`, nohup) passes
                            # SIGINT on ignored, and the CLI rightly keeps ignoring it
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        for line in proc.stderr:  # wait until sampling runs
            if line.startswith("sampling 1/"):
                break
        workers = [c.pid for c in psutil.Process(proc.pid).children() if "pool.worker" in " ".join(c.cmdline())]
        assert len(workers) == 2, [c.cmdline() for c in psutil.Process(proc.pid).children()]
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=30) == 130, rest
        assert rest.strip().splitlines()[-1] == "error: interrupted", rest
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(
                psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers):
            time.sleep(0.1)
        assert not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in workers)
        assert not (tmp_path / "x.mp4").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
