#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), once, before benchmarks/device/run.sh goes to a GPU machine
# that has torch, peft, accelerate and transformers but no diffusers or omegaconf and no network.
# Downloads into benchmarks/device/wheels/ (git-ignored; carried with the device tool's `carry`):
#   diffusers   the version this project's venv runs (pure Python)
#   omegaconf   raybias.config imports it (pure Python; 2.4 vendors its ANTLR runtime, 2.3 needs
#               antlr4-python3-runtime==4.9.3, added then). PyYAML is on the device image already.
#   xformers    optional (FETCH_XFORMERS=0 leaves it out): PyPI's build, torch >= 2.10, linked to
#               the CUDA 12 runtime, so nvidia-cuda-runtime-cu12 comes too; run.sh puts that
#               libcudart.so.12 on LD_LIBRARY_PATH. If it still does not load next to a cu13 torch,
#               the xformers rows are recorded as skipped with the reason.
# Ray is not carried (a 79 MB wheel): the device benchmark imports only raybias modules that need none.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi
dest=$here/wheels
ver() { "$PYTHON" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true; }
DIFFUSERS=${DIFFUSERS_VERSION:-$(ver diffusers)}
OMEGACONF=${OMEGACONF_VERSION:-$(ver omegaconf)}
DIFFUSERS=${DIFFUSERS:-0.42.1}
OMEGACONF=${OMEGACONF:-2.4.0}
XFORMERS=${XFORMERS_VERSION:-0.0.35}
CUDART12=${CUDART12_VERSION:-12.9.79}
# the device's python3 is CPython 3.12 on x86-64 (.library/device/KINDS.md)
target=(--only-binary=:all: --python-version 3.12 --implementation cp
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
pkgs=("diffusers==$DIFFUSERS" "omegaconf==$OMEGACONF")
case "$OMEGACONF" in 2.3*) pkgs+=("antlr4-python3-runtime==4.9.3") ;; esac
if [ "${FETCH_XFORMERS:-1}" != 0 ]; then pkgs+=("xformers==$XFORMERS" "nvidia-cuda-runtime-cu12==$CUDART12"); fi

rm -rf "$dest"  # one version of each: two would stop the install there
mkdir -p "$dest"
"$PYTHON" -m pip download -q --no-deps "${target[@]}" -d "$dest" "${pkgs[@]}"
ls -l "$dest"
total=$(du -sm "$dest" | cut -f1)
echo "total ${total} MiB in $dest (the device tool carries at most 64 MiB with the working tree)"
if [ "$total" -gt 40 ]; then echo "too large for the device tool's 64 MiB" >&2; exit 1; fi
