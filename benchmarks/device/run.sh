#!/usr/bin/env bash
# One command measures a GPU (an H200 machine of the device tool, or any CUDA box with torch).
#
#   bash benchmarks/device/run.sh                        # cuda, sd15, 540 s budget, into $OUT or ./device-out
#   bash benchmarks/device/run.sh --device cpu --arch tiny --quick --budget-s 60   # a trial on a CPU
#
# Arguments after the script's name go to bench_device.py after its defaults (the later wins).
# The machine needs torch, peft, accelerate, transformers, numpy, pillow, pyarrow, pyyaml (the
# device image has them) and nothing from the network: diffusers and omegaconf (and, optionally,
# xformers with the CUDA 12 runtime it links to) come as wheels from benchmarks/device/wheels/,
# fetched beforehand by benchmarks/device/fetch_wheels.sh and carried with the tool's `carry`.
# No Ray: the benchmark imports only raybias modules that need none.
# Writes $OUT/results.json, $OUT/results.md and $OUT/log.txt; exits with the benchmark's status.
set -uo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root" || exit 2
PY=${PYTHON:-python3}
OUT=${OUT:-$root/device-out}
BUDGET_S=${BUDGET_S:-540}
HARD_S=${HARD_S:-$((BUDGET_S + 35))}   # the benchmark stops itself within its budget; this is the backstop
wheels=benchmarks/device/wheels
work=$(mktemp -d "${TMPDIR:-/tmp}/bench-device.XXXXXX")
mkdir -p "$OUT"

main() {
echo "== machine ($(date -u +%Y-%m-%dT%H:%M:%SZ))"
uname -srm
nproc 2>/dev/null | sed 's/^/cores: /'
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu \
    --format=csv 2>&1 || true
  nvidia-smi 2>&1 | head -20 || true
else
  echo "nvidia-smi: not found"
fi

echo "== carried wheels"
shopt -s nullglob
main_wheels=() ; cudart=()
for w in "$wheels"/*.whl; do
  case "$(basename "$w")" in
    nvidia_cuda_runtime_cu12-*) cudart+=("$w") ;;
    *) main_wheels+=("$w") ;;
  esac
done
if [ ${#main_wheels[@]} -gt 0 ]; then
  printf '  %s\n' "${main_wheels[@]##*/}" "${cudart[@]##*/}"
  if [ "${BENCH_XFORMERS:-1}" = 0 ]; then
    kept=(); for w in "${main_wheels[@]}"; do case "$w" in *xformers-*) ;; *) kept+=("$w") ;; esac; done
    main_wheels=("${kept[@]}"); cudart=()
    echo "  BENCH_XFORMERS=0: xformers left out"
  fi
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$work/site" "${main_wheels[@]}" || echo "pip install of the carried wheels failed"
  export PYTHONPATH="$work/site${PYTHONPATH:+:$PYTHONPATH}"
  if [ ${#cudart[@]} -gt 0 ]; then
    # PyPI's xformers links libcudart.so.12; torch brings its own (CUDA 13) runtime, not that one
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
      --target "$work/cu12" "${cudart[@]}" || echo "pip install of the CUDA 12 runtime failed"
    export LD_LIBRARY_PATH="$work/cu12/nvidia/cuda_runtime/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  fi
else
  echo "  none in $wheels: run benchmarks/device/fetch_wheels.sh on a machine with PyPI and carry that folder"
  echo "  (using whatever diffusers/omegaconf this python has)"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$work/inductor}"

echo "== python"
"$PY" - <<'PY' 2>&1
import importlib.metadata as m, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda,
      "| available", torch.cuda.is_available(),
      "|", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU")
for name in ("diffusers", "omegaconf", "peft", "transformers", "accelerate", "huggingface-hub", "safetensors",
             "xformers", "triton", "ray"):
    try:
        v = m.version(name)
    except m.PackageNotFoundError:
        v = "not installed"
    print(f"  {name} {v}")
PY

echo "== benchmark: bench_device.py --device cuda --arch sd15 --budget-s $BUDGET_S --out $OUT $*"
timeout -k 10 "$HARD_S" "$PY" -u benchmarks/device/bench_device.py --device cuda --arch sd15 \
  --budget-s "$BUDGET_S" --out "$OUT" "$@"
rc=$?
[ $rc -eq 124 ] && echo "bench_device.py ran past ${HARD_S} s and was stopped; results.json holds the rows up to then"
echo "== done (exit $rc): $OUT/results.json, $OUT/results.md"
return $rc
}

main "$@" 2>&1 | tee -a "$OUT/log.txt"
rc=${PIPESTATUS[0]}
rm -rf "$work"
exit "$rc"
