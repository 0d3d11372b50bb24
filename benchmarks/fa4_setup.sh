# Set up flash-attn-4 4.0.0b36, the project's wheels and xfuser on the GPU machine (H200, Python 3.12,
# torch 2.11 cu130, no internet). Source it from the repo root: `. benchmarks/fa4_setup.sh`; it exports
# PYTHONPATH in the calling shell. Adapted from notes/fa4_setup.sh (a colleague's plan), made idempotent so a
# second call on a warm machine skips the installs.
#
# Carry plan (64 MiB per call): call 1 carries [".fa4/cu13.tar.xz"] alone and unpacks it to /tmp/cu13x
#   mkdir -p /tmp/cu13x && tar -xJf .fa4/cu13.tar.xz -C /tmp/cu13x
# call 2 (same warm machine, within 30 s) carries [".whl", ".fa4/wheels", ".fa4/xfuser"] and sources this.
# Users simply `pip install flash-attn-4`; this is only because the machine has no index and a 64 MiB carry.

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
