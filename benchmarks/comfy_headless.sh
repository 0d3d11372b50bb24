#!/bin/bash
# One headless ComfyUI 0.33.0 job through our nodes, as users run it, on a machine with no package index:
# unpack the carried ComfyUI, install its carried wheels, put this repo in custom_nodes/ and the model in
# models/CogVideo/, start `main.py --listen --disable-auto-launch`, queue the shipped T2V API workflow
# (workflows/api/cogvideox_t2v_api.json: model loader -> parallel config -> T5 from the model folder -> sampler ->
# decode -> core CreateVideo/SaveVideo) over POST /prompt, check the mp4, stop the pool and ComfyUI.
# Driver: benchmarks/comfy_headless.py. Logs and comfy_headless.json under --out (default $OUT).
#
#   GPU (nvidia-h200-x2, carry [".comfy"] or [".comfy", ".whl"]):
#     bash benchmarks/comfy_headless.sh --model /tmp/models/2b --devices 0,1
#   CPU (same code, tiny model built on the spot):
#     bash benchmarks/comfy_headless.sh --model tiny --devices cpu:2 --precision fp32 --steps 3 --frames 9 \
#         --height 48 --width 64 --root $TMPDIR/headless
#
# .comfy/ (git-ignored; never committed): comfyui-0.33.0.tar.xz (ComfyUI's source without tests, blueprints or
# git data) and wheels/ (what 0.33.0 needs at start that the device image lacks: av, SQLAlchemy, alembic, Mako,
# pydantic(+core, -settings, annotated-types, typing-inspection, typing_extensions 4.16, python-dotenv),
# torchsde, trampoline, blake3, simpleeval, comfy-kitchen (its pure wheel: no CUDA kernels, which ComfyUI's own
# models alone use), comfy-aimdo, spandrel). No frontend package: --front-end-root is a one-page folder, and the
# workflow templates and embedded docs are left out (ComfyUI only logs that they are missing).
# Our own dependencies (diffusers, yunchang, ...) come from /tmp/site as the earlier stages of
# benchmarks/two_gpu_run.sh leave it (FA4 set up when stage B ran), or from a carried .whl/, or --site PATHS.
# A --model .../2b or .../5b that does not exist is built there first (random full-size weights, on cuda:0).
#
# Making .comfy (once, where pip reaches the index; keep it out of git: `echo /.comfy/ >> .git/info/exclude`):
#   D="python3 -m pip download --no-deps --only-binary=:all: -d .comfy/wheels"
#   P="--python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64"
#   $D $P av==18.1.0 SQLAlchemy==2.1.9 blake3==1.0.11 comfy-aimdo==0.4.13 pydantic_core==2.50.5
#   $D torchsde==0.2.6 trampoline==0.1.2 alembic==1.20.1 Mako==1.4.3 simpleeval==1.0.8 pydantic==2.14.4 \
#      annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0 pydantic-settings==2.16.3 \
#      python-dotenv==1.2.4 spandrel==0.4.2
#   $D --python-version 3.12 --implementation py --platform any comfy-kitchen==0.2.31   # its pure wheel (181 kB)
#   tar --exclude=.git --exclude=.github --exclude=.ci --exclude=tests --exclude=tests-unit --exclude=blueprints \
#      --exclude=__pycache__ --transform 's,^ComfyUI,ComfyUI-0.33.0,' -cJf .comfy/comfyui-0.33.0.tar.xz ComfyUI
#   (ComfyUI = a checkout of 0.33.0; 48 MiB in all, av's wheel 36 of them. Left out, as optional in ComfyUI's
#   requirements.txt: kornia and comfy-angle/PyOpenGL, so core's nodes_latent, _post_processing, _canny,
#   _morphology and _glsl log IMPORT FAILED; the frontend, templates and docs packages.)
set -u
MODEL=/tmp/models/2b DEVICES=0,1 STEPS=50 FRAMES=49 HEIGHT=480 WIDTH=720 PRECISION=bf16 ATTENTION=auto
CFG=auto ULYSSES=auto RING=auto JOBS=1 PORT=8188 TIMEOUT=540 ROOT=/tmp CARRY=.comfy SITE= PY=python3
OUTDIR=${OUT:-/tmp/out}
usage() { sed -n '2,13p' "$0"; exit 2; }
while [ $# -gt 0 ]; do
  case $1 in
    --model) MODEL=$2;; --devices) DEVICES=$2;; --steps) STEPS=$2;; --frames) FRAMES=$2;; --height) HEIGHT=$2;;
    --width) WIDTH=$2;; --precision) PRECISION=$2;; --attention) ATTENTION=$2;; --cfg) CFG=$2;;
    --ulysses) ULYSSES=$2;; --ring) RING=$2;; --jobs) JOBS=$2;; --port) PORT=$2;; --timeout) TIMEOUT=$2;;
    --root) ROOT=$2;; --carry) CARRY=$2;; --site) SITE=$2;; --python) PY=$2;; --out) OUTDIR=$2;;
    -h|--help) usage;;
    *) echo "comfy_headless: unknown argument '$1' (see --help)"; exit 2;;
  esac
  shift 2 || { echo "comfy_headless: '$1' needs a value"; exit 2; }
done
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1
mkdir -p "$OUTDIR" "$ROOT" || exit 1
T0=$SECONDS
fail() { echo "COMFY HEADLESS FAILED: $*"; exit 1; }
say() { echo "== [$((SECONDS - T0)) s] $*"; }
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export TORCH_NCCL_ASYNC_ERROR_HANDLING=1 NCCL_DEBUG=${NCCL_DEBUG:-WARN}
export XDIT_COGVIDEO_CACHE=${XDIT_COGVIDEO_CACHE:-$ROOT/xdit-cache}

# 1. ComfyUI from the carried tarball (fresh each run: outputs and links of an earlier run go with it)
TAR=$CARRY/comfyui-0.33.0.tar.xz COMFY=$ROOT/comfyui
[ -f "$TAR" ] || fail "no $TAR: carry .comfy (see the head of this script)"
rm -rf "$COMFY" "$ROOT/ComfyUI-0.33.0"
tar -xJf "$TAR" -C "$ROOT" 2>/dev/null || \
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])" "$TAR" "$ROOT" || \
  fail "could not unpack $TAR"
mv "$ROOT/ComfyUI-0.33.0" "$COMFY" || fail "unexpected layout in $TAR"
say "ComfyUI $(sed -n 's/^__version__ = //p' "$COMFY/comfyui_version.py") unpacked to $COMFY"

# 2. ComfyUI's missing dependencies, no index, no deps (the list is the wheels themselves)
CSITE=$ROOT/comfysite
rm -rf "$CSITE"
"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$CSITE" "$CARRY"/wheels/*.whl \
    > "$OUTDIR/pip.log" 2>&1 || { cat "$OUTDIR/pip.log"; fail "pip could not install $CARRY/wheels"; }
say "$(ls "$CARRY"/wheels/*.whl | wc -l) wheels installed in $CSITE"

# 3. our own dependencies
if [ -z "$SITE" ]; then
  if [ -f /tmp/site/.xdit_setup_done ] && [ -f benchmarks/fa4_setup.sh ]; then
    . benchmarks/fa4_setup.sh > "$OUTDIR/fa4_setup.log" 2>&1 || fail "fa4_setup failed: $(tail -3 "$OUTDIR/fa4_setup.log")"
    SITE=$PYTHONPATH
  else
    if ls .whl/*.whl > /dev/null 2>&1; then
      "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
          >> "$OUTDIR/pip.log" 2>&1 || fail "pip could not install .whl"
    fi
    SITE=/tmp/site
  fi
  [ -d /tmp/ffmpeg ] && SITE=$SITE:/tmp/ffmpeg
fi
# the repo itself is NOT on the path: ComfyUI imports it from custom_nodes/, and the pool's workers inherit that
export PYTHONPATH=$CSITE:$SITE
"$PY" -c "import diffusers, yunchang, av, sqlalchemy, pydantic, torch
print('python', __import__('sys').version.split()[0], 'torch', torch.__version__, 'diffusers', diffusers.__version__,
      'cuda devices', torch.cuda.device_count())" || fail "dependencies do not import with PYTHONPATH=$PYTHONPATH"

# 4. this repo as a custom node, the model where the loader lists it, a one-page frontend
ln -s "$REPO" "$COMFY/custom_nodes/comfyui-xdit-cogvideo" || fail "could not link the repo into custom_nodes"
if [ "$MODEL" = tiny ]; then
  MODEL=$(PYTHONPATH=$REPO:$PYTHONPATH "$PY" -c "from comfyui_xdit_cogvideo.tiny import ensure_tiny; print(ensure_tiny('2b'))") \
      || fail "could not build the tiny model"
fi
if [ ! -e "$MODEL" ] && [[ $(basename "$MODEL") =~ ^(2b|5b)$ ]] && [[ $DEVICES != cpu* ]]; then
  # a fresh machine: the random full-size folder that benchmarks/two_gpu_run.sh stage A builds (T5-XXL included)
  say "no $MODEL: building random $(basename "$MODEL") weights there (benchmarks/pool_bench.py build_folder)"
  PYTHONPATH=$REPO:$REPO/benchmarks:$PYTHONPATH "$PY" -c "import sys; from pathlib import Path
from pool_bench import build_folder
print(build_folder(Path(sys.argv[1]).name, Path(sys.argv[1]).parent, False, 'cuda:0'))" "$MODEL" \
      > "$OUTDIR/build_model.log" 2>&1 || fail "could not build $MODEL: $(tail -3 "$OUTDIR/build_model.log")"
fi
[ -d "$MODEL/transformer" ] || fail "--model $MODEL is not a diffusers folder (no transformer/)"
[ -d "$MODEL/text_encoder" ] && [ -d "$MODEL/tokenizer" ] || \
  fail "--model $MODEL has no text_encoder/ and tokenizer/, which the shipped workflow's T5 node reads"
NAME=$(basename "$MODEL")
mkdir -p "$COMFY/models/CogVideo" && ln -s "$(cd "$MODEL" && pwd)" "$COMFY/models/CogVideo/$NAME" || fail "link model"
mkdir -p "$ROOT/frontend" && echo "<!doctype html><title>ComfyUI (headless)</title>" > "$ROOT/frontend/index.html"
say "model $MODEL as models/CogVideo/$NAME; devices $DEVICES; $FRAMES x $HEIGHT x $WIDTH, $STEPS steps, $PRECISION"

# 5. the job (the driver stops the pool and ComfyUI itself; timeout is the backstop)
LEFT=$((TIMEOUT - (SECONDS - T0)))
[ $LEFT -gt 90 ] || fail "only $LEFT s left of --timeout $TIMEOUT for the job"
timeout -k 20 $LEFT "$PY" benchmarks/comfy_headless.py --comfy "$COMFY" --model-name "$NAME" \
    --front-end-root "$ROOT/frontend" --devices "$DEVICES" --cfg "$CFG" --ulysses "$ULYSSES" --ring "$RING" \
    --precision "$PRECISION" --attention "$ATTENTION" --steps "$STEPS" --frames "$FRAMES" --height "$HEIGHT" \
    --width "$WIDTH" --jobs "$JOBS" --port "$PORT" --timeout "$((LEFT - 10))" --out "$OUTDIR"
rc=$?
grep -i "pytorch version\|Device:\|total vram\|dynamicvram\|aimdo\|import failed\|attention\|prompt executed\|xdit" \
    "$OUTDIR/comfyui.log" | grep -v "warn" | tail -25
[ $rc -eq 0 ] || fail "the ComfyUI job failed (rc $rc); see $OUTDIR/comfyui.log and the lines above"
say "done"
