#!/usr/bin/env bash
# Evaluation of the warp-specialised wgmma forward (csrc/rfbias/sm90/fwd_ws_kernel.h) on a 9.x GPU, in one run:
# build with its tile variants, the forward GPU tests on RFSR_FWD_PATH=sm90ws, compute-sanitizer on the small
# shapes (all paths), and forward ms of sm80 / sm90 / sm90ws and each variant over the SR shapes. Results go to $1.
#
#   scripts/ab_sm90ws.sh [OUT_DIR]
# Knobs: as scripts/gpu_check.sh (RFSR_CUDA_ARCHS, RFSR_KERNELS, RFSR_CUTLASS_INCLUDE, MAX_JOBS), plus
# AB_WINDOWS (default 16,32,64,96) and AB_PATHS (default sm80,sm90,sm90ws,sm90ws:2,sm90ws:3,sm90ws:4,sm90ws:5).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-./ab_sm90ws_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export RFSR_NVCC_FLAGS="${RFSR_NVCC_FLAGS:-} -DRFSR_SM90WS_VARIANTS"
PY=${PYTHON:-python3}

status=0
SKIP_TESTS=1 SKIP_SANITIZER=1 SKIP_BENCH=1 scripts/gpu_check.sh "$OUT_DIR" || exit 1

# Smoke first, under a time limit (a barrier bug shows as a hang): every variant on a few shapes against the float64
# reference. Nothing else runs if this fails.
timeout 180 $PY - > "$OUT_DIR/smoke.log" 2>&1 <<'PYEOF'
import os, torch
import rfsr_cuda  # noqa: F401
from rfsr_cuda.ops.reference import flash_rfbias_reference
os.environ["RFSR_FWD_PATH"] = "sm90ws"
for variant in range(1, 9):
    os.environ["RFSR_SM90WS_VARIANT"] = str(variant)
    for B, N, H, D, R, dt in [(3, 70, 2, 30, 18, torch.bfloat16), (2, 1000, 2, 30, 34, torch.bfloat16),
                              (2, 4096, 1, 32, 32, torch.float16), (1, 9, 1, 16, 7, torch.bfloat16)]:
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt, generator=g) for _ in range(3))
        bq, bk = ((torch.randn(H, N, R, device="cuda", generator=g) * 0.3).to(dt) for _ in range(2))
        out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
        torch.cuda.synchronize()
        ref = flash_rfbias_reference(*(t.double() for t in (q, k, v, bq, bk)), D ** -0.5)
        err = ((out.double() - ref).norm() / ref.norm()).item()
        print(f"variant {variant} B={B} N={N} D={D} R={R} {dt}: rel err {err:.2e}", flush=True)
        assert err < 1e-2, err
print("smoke: ok")
PYEOF
rc=$?
cat "$OUT_DIR/smoke.log"
[ $rc -ne 0 ] && { echo "smoke: FAILED rc=$rc (124: timeout)"; exit $rc; }

$PY -X faulthandler -m pytest tests/test_flash_rfbias_cuda.py -q -rfE -k sm90ws -p no:cacheprovider \
    --junitxml="$OUT_DIR/pytest-sm90ws.xml" > "$OUT_DIR/pytest-sm90ws.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=$rc
echo "tests (sm90ws): rc=$rc  $(tail -1 "$OUT_DIR/pytest-sm90ws.log")"
grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-sm90ws.log" | head -20

SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
for tool in memcheck racecheck synccheck; do
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 9 \
      $PY scripts/sanitize_small.py > "$OUT_DIR/sanitizer-$tool.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "compute-sanitizer $tool: rc=$rc  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/sanitizer-$tool.log" | tail -1)"
done

$PY benchmarks/bench_fwd_paths.py --out "$OUT_DIR/fwd_paths.json" --windows "${AB_WINDOWS:-16,32,64,96}" \
    --paths "${AB_PATHS:-sm80,sm90,sm90ws,sm90ws:2,sm90ws:3,sm90ws:4,sm90ws:5}" --tag sm90ws-variants \
    > "$OUT_DIR/fwd_paths.log" 2>&1
rc=$?; [ $rc -ne 0 ] && status=$rc
echo "bench_fwd_paths: rc=$rc"; cat "$OUT_DIR/fwd_paths.log"
exit $status
