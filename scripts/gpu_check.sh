#!/usr/bin/env bash
# Build the extension on a CUDA machine, run the GPU tests, compute-sanitizer and the attention benchmark.
# Everything (build log, pytest log + junit xml, benchmark log + JSON, environment) goes to $1
# (default ./gpu_check_out).
#
#   scripts/gpu_check.sh [OUT_DIR]
# Knobs: RFSR_CUDA_ARCHS (default: this GPU's arch), RFSR_KERNELS (default all,sm90), RFSR_CUTLASS_INCLUDE (default: .carry/cutlass/include
# when present, else the nvidia-cutlass package), MAX_JOBS (default: all cores), BENCH_ARGS (benchmark arguments, default --rounds 3),
# SKIP_BUILD=1, SKIP_TESTS=1, SKIP_SANITIZER=1, SKIP_BENCH=1.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-./gpu_check_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}  # the in-place build of rfsr_cuda in this tree

if [ -z "${RFSR_CUDA_ARCHS:-}" ]; then
  RFSR_CUDA_ARCHS=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo "80;90")
fi
export RFSR_CUDA_ARCHS
if [ -z "${RFSR_CUTLASS_INCLUDE:-}" ] && [ -f .carry/cutlass/include/cute/tensor.hpp ]; then
  export RFSR_CUTLASS_INCLUDE=$PWD/.carry/cutlass/include
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
# the check covers the experimental wgmma forward too (tests run it through RFSR_FWD_PATH=sm90 on 9.x devices)
export RFSR_KERNELS=${RFSR_KERNELS:-all,sm90}

{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
  $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  nvcc --version | tail -2
  echo "RFSR_CUDA_ARCHS=$RFSR_CUDA_ARCHS RFSR_KERNELS=$RFSR_KERNELS MAX_JOBS=$MAX_JOBS"
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

status=0
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  t0=$(date +%s)
  # In-place build so that the tests import the freshly built rfsr_cuda/_C from this tree.
  if $PY setup.py build_ext --inplace > "$OUT_DIR/build.log" 2>&1; then
    echo "build: ok in $(( $(date +%s) - t0 )) s"
  else
    echo "build: FAILED after $(( $(date +%s) - t0 )) s (see build.log)"; tail -40 "$OUT_DIR/build.log"; exit 1
  fi
fi

if [ "${SKIP_TESTS:-0}" != 1 ]; then
  # the attention op's GPU tests, the model on CUDA, and the CUDA cases of the inference-path ops, the layers and the
  # upscaler (those files' CPU tests run too: a few seconds)
  $PY -X faulthandler -m pytest tests/test_flash_rfbias_cuda.py tests/test_flash_rfbias_cuda_bwd.py \
      tests/models/test_sst_cuda.py tests/ops tests/nn tests/test_upscale_api.py \
      -q -rfE --durations=10 -p no:cacheprovider ${TEST_ARGS:-} \
      --junitxml="$OUT_DIR/pytest.xml" > "$OUT_DIR/pytest.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=$rc
  echo "tests: rc=$rc  $(tail -1 "$OUT_DIR/pytest.log")"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest.log" | head -30
fi

if [ "${SKIP_SANITIZER:-0}" != 1 ]; then
  # memcheck, racecheck and synccheck (the warp-specialised forward's mbarrier protocol) on small forward +
  # backward shapes; any report fails the check
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 9 \
        $PY scripts/sanitize_small.py > "$OUT_DIR/sanitizer-$tool.log" 2>&1
    rc=$?
    [ $rc -ne 0 ] && status=$rc
    echo "compute-sanitizer $tool: rc=$rc  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/sanitizer-$tool.log" | tail -1)"
  done
fi

if [ "${SKIP_BENCH:-0}" != 1 ]; then
  $PY benchmarks/bench_attention.py --out "$OUT_DIR" ${BENCH_ARGS:---rounds 3} > "$OUT_DIR/bench.log" 2>&1
  rc=$?
  [ $rc -ne 0 ] && status=$rc
  echo "bench: rc=$rc"
  tail -12 "$OUT_DIR/bench.log"
fi
exit $status
