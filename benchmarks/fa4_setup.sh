# Set up flash-attn-4 4.0.0b36, the project's wheels and xfuser on the GPU machine (H200, Python 3.12,
# torch 2.11 cu130, no internet). Source it from the repo root: `. benchmarks/fa4_setup.sh`; it exports
# PYTHONPATH in the calling shell. Adapted from notes/fa4_setup.sh (a colleague's plan), made idempotent so a
# second call on a warm machine skips the installs.
#
# Carry plan (64 MiB per call): call 1 carries [".fa4/cu13.tar.xz"] alone and unpacks it to /tmp/cu13x
#   mkdir -p /tmp/cu13x && tar -xJf .fa4/cu13.tar.xz -C /tmp/cu13x
# call 2 (same warm machine, within 30 s) carries [".whl", ".fa4/wheels", ".fa4/xfuser"] and sources this.
# Users simply `pip install flash-attn-4`; this is only because the machine has no index and a 64 MiB carry.
#
# Making the carried folders (once, on a machine with the package index; keep them out of git with
# `printf '/.whl/\n/.fa4/\n' >> .git/info/exclude`):
#   D="python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#      --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#      --platform manylinux2014_x86_64"
#   $D -d .whl diffusers==0.42.1 yunchang==0.6.4 importlib_metadata==8.7.0 zipp==4.1.2
#   $D -d .fa4/wheels flash-attn-4==4.0.0b36 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1 \
#      nvidia-cutlass-dsl-libs-core==4.8.1 quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5
#   $D -d .fa4/xfuser xfuser==0.7.0 distvae==0.1.0 beautifulsoup4==4.15.0 soupsieve==4.1.3
#   $D -d /tmp/cu13 nvidia-cutlass-dsl-libs-cu13==4.8.1 && mkdir -p /tmp/cu13/x && \
#      (cd /tmp/cu13/x && unzip -q ../*.whl && XZ_OPT=-9e tar -cJf "$OLDPWD/.fa4/cu13.tar.xz" .)
#   (the cu13 wheel is 92 MB, over the carry limit; its xz tarball is 61 MiB, so it travels alone in call 1)

SITE=${SITE:-/tmp/site}
CU13X=${CU13X:-/tmp/cu13x}
XDIT=${XDIT:-/tmp/xdit}
_fail() { echo "FA4 SETUP FAILED: $*"; return 1 2>/dev/null || exit 1; }

if [ -f "$SITE/.xdit_setup_done" ]; then
  echo "setup already done on this machine"
else
  # (a) the cu13 flavour of the CuTe DSL, unpacked by call 1 (or now, if the tarball travelled in this call)
  if [ ! -f "$CU13X/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so" ]; then
    [ -f .fa4/cu13.tar.xz ] || _fail "no $CU13X and no .fa4/cu13.tar.xz (machine was given back after call 1?)"
    mkdir -p "$CU13X"
    tar -xJf .fa4/cu13.tar.xz -C "$CU13X" 2>/dev/null || \
      python3 -c "import tarfile,sys; tarfile.open('.fa4/cu13.tar.xz').extractall(sys.argv[1])" "$CU13X" || \
      _fail "cu13 unpack"
  fi
  # (b) wheels, no index, no deps. All cutlass wheels in ONE pip call (they share one package tree).
  mkdir -p "$SITE"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      .fa4/wheels/*.whl || _fail "fa4 wheels"
  if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
        .whl/*.whl || _fail ".whl wheels"
  fi
  # xfuser in its own folder: its wheel installs top-level tests/, examples/, benchmarks/ that would shadow ours
  if ls .fa4/xfuser/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$XDIT" \
        .fa4/xfuser/*.whl || _fail "xfuser wheels"
  fi
  # (c) merge the cu13 tree into the cutlass package (pip --target would have dropped half of it)
  cp -a "$CU13X"/. "$SITE"/ || _fail "merge"
  touch "$SITE/.xdit_setup_done"
fi

DSL="$SITE/nvidia_cutlass_dsl/dsl_packages"
for f in "$DSL/cutlass/__init__.py" "$DSL/cutlass/_mlir/_mlir_libs/_cutlass_ir.cu13.cpython-312-x86_64-linux-gnu.so" \
         "$SITE/nvidia_cutlass_dsl/cu13/lib/libcute_dsl_runtime.so" "$SITE/flash_attn/cute/interface.py" \
         "$SITE/quack/__init__.py" "$SITE/tvm_ffi/__init__.py"; do
  [ -e "$f" ] || echo "FA4 WARNING: missing $f"
done
# the meta wheel's .pth (which adds dsl_packages) is not read from a --target dir: add it by hand
export PYTHONPATH="$DSL:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export XDIT_PATH="$XDIT"
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=${FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED:-1}
export FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=${FLASH_ATTENTION_CUTE_DSL_CACHE_DIR:-/tmp/fa4_cache}
python3 -c "import diffusers, yunchang; print('setup OK: diffusers', diffusers.__version__)" || _fail "import diffusers"
python3 -c "import cutlass, cutlass.cute; from flash_attn.cute import flash_attn_func; print('setup OK: fa4')" || \
  echo "FA4 WARNING: flash-attn-4 does not import; benchmarks run without it"
