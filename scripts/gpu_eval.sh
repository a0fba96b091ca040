#!/usr/bin/env bash
# Evaluation of the kernels under test on a 9.x GPU: the warp-specialised wgmma forward (sm90/fwd_ws_kernel.h,
# RFSR_FWD_PATH=sm90, with its tile variants) and the wgmma backward (sm90/bwd_kernel.h, RFSR_BWD_PATH=sm90).
# Results go to $1. Stages (STAGES, comma-separated, default all): build, smoke, tests, sanitize, bench. A stage
# list without build reuses the in-place build of an earlier call (a warm machine keeps it).
#
#   scripts/gpu_eval.sh [OUT_DIR]                                 # everything (about 15 minutes)
#   STAGES=build,smoke,tests scripts/gpu_eval.sh OUT_A            # then, on the same machine:
#   STAGES=sanitize,bench scripts/gpu_eval.sh OUT_B
# Knobs: as scripts/gpu_check.sh (RFSR_CUDA_ARCHS, RFSR_KERNELS, RFSR_CUTLASS_INCLUDE, MAX_JOBS), plus
# AB_WINDOWS (default 16,32,64,96) and AB_PATHS (default sm80,sm90,sm90:2,sm90:3,sm90:4).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-./gpu_eval_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
export RFSR_NVCC_FLAGS="${RFSR_NVCC_FLAGS:-} -DRFSR_SM90WS_VARIANTS -DRFSR_SM90_BWD"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
STAGES=",${STAGES:-build,smoke,tests,sanitize,bench},"
want() { [[ "$STAGES" == *",$1,"* ]]; }
status=0

if want build; then
  SKIP_TESTS=1 SKIP_SANITIZER=1 SKIP_BENCH=1 scripts/gpu_check.sh "$OUT_DIR" || exit 1
fi

if want smoke; then
  # Under a time limit (a barrier bug shows as a hang): every forward variant and both backward paths on a few
  # shapes against the float64 reference. Nothing else runs if this fails.
  timeout 240 $PY - > "$OUT_DIR/smoke.log" 2>&1 <<'PYEOF'
import os, torch
import rfsr_cuda  # noqa: F401
from rfsr_cuda.ops.reference import flash_rfbias_reference
SHAPES = [(3, 70, 2, 30, 18, torch.bfloat16), (2, 1000, 2, 30, 34, torch.bfloat16),
          (2, 4096, 1, 32, 32, torch.float16), (1, 9, 1, 16, 7, torch.bfloat16)]
def inputs(B, N, H, D, R, dt):
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=dt, generator=g) for _ in range(4))
    bq, bk = ((torch.randn(H, N, R, device="cuda", generator=g) * 0.3).to(dt) for _ in range(2))
    return q, k, v, bq, bk, do
def rel(a, b): return ((a.double() - b).norm() / b.norm().clamp_min(1e-6)).item()
os.environ["RFSR_FWD_PATH"] = "sm90"
for variant in range(1, 5):
    os.environ["RFSR_SM90WS_VARIANT"] = str(variant)
    for B, N, H, D, R, dt in SHAPES:
        q, k, v, bq, bk, _ = inputs(B, N, H, D, R, dt)
        out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
        torch.cuda.synchronize()
        err = rel(out, flash_rfbias_reference(*(t.double() for t in (q, k, v, bq, bk)), D ** -0.5))
        print(f"fwd sm90:{variant} B={B} N={N} D={D} R={R} {dt}: rel err {err:.2e}", flush=True)
        assert err < 1e-2, err
del os.environ["RFSR_FWD_PATH"], os.environ["RFSR_SM90WS_VARIANT"]
for path in ("sm80", "sm90"):
    os.environ["RFSR_BWD_PATH"] = path
    for B, N, H, D, R, dt in SHAPES:
        q, k, v, bq, bk, do = inputs(B, N, H, D, R, dt)
        xs = [t.detach().double().requires_grad_() for t in (q, k, v, bq, bk)]
        ref_out, ref_lse = flash_rfbias_reference(*xs, D ** -0.5, compute_dtype=torch.float64, return_lse=True)
        ref = torch.autograd.grad(ref_out, xs, do.double())
        got = torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, ref_out.detach().to(dt), ref_lse.detach().float(),
                                              D ** -0.5)
        torch.cuda.synchronize()
        errs = [rel(g, r) for g, r in zip(got, ref)]
        print(f"bwd {path} B={B} N={N} D={D} R={R} {dt}: rel errs " + " ".join(f"{e:.2e}" for e in errs), flush=True)
        assert max(errs) < 3e-2, errs
print("smoke: ok")
PYEOF
  rc=$?
  cat "$OUT_DIR/smoke.log"
  [ $rc -ne 0 ] && { echo "smoke: FAILED rc=$rc (124: timeout)"; exit $rc; }
fi

if want tests; then
  $PY -X faulthandler -m pytest tests/test_flash_rfbias_cuda.py -q -rfE -k sm90 -p no:cacheprovider \
      --junitxml="$OUT_DIR/pytest-fwd-sm90.xml" > "$OUT_DIR/pytest-fwd-sm90.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "tests fwd (sm90): rc=$rc  $(tail -1 "$OUT_DIR/pytest-fwd-sm90.log")"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-fwd-sm90.log" | head -20
  $PY -X faulthandler -m pytest tests/test_flash_rfbias_cuda_bwd.py -q -rfE -p no:cacheprovider \
      --junitxml="$OUT_DIR/pytest-bwd.xml" > "$OUT_DIR/pytest-bwd.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "tests bwd (sm80, sm90): rc=$rc  $(tail -1 "$OUT_DIR/pytest-bwd.log")"
  grep -E "^(FAILED|ERROR)" "$OUT_DIR/pytest-bwd.log" | head -20
fi

if want sanitize; then
  SANITIZER=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
  for tool in memcheck racecheck synccheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool $tool --error-exitcode 9 \
        $PY scripts/sanitize_small.py > "$OUT_DIR/sanitizer-$tool.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && status=$rc
    echo "compute-sanitizer $tool: rc=$rc  $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$OUT_DIR/sanitizer-$tool.log" | tail -1)"
  done
fi

if want bench; then
  $PY benchmarks/bench_fwd_paths.py --out "$OUT_DIR/fwd_paths.json" --windows "${AB_WINDOWS:-16,32,64,96}" \
      --paths "${AB_PATHS:-sm80,sm90,sm90:2,sm90:3,sm90:4}" \
      --tag gpu-eval > "$OUT_DIR/fwd_paths.log" 2>&1
  rc=$?; [ $rc -ne 0 ] && status=$rc
  echo "bench_fwd_paths: rc=$rc"; cat "$OUT_DIR/fwd_paths.log"
  for bwd in sm80 sm90; do  # forward + backward of the fused op on each backward path
    mkdir -p "$OUT_DIR/attention-bwd-$bwd"
    RFSR_BWD_PATH=$bwd $PY benchmarks/bench_attention.py --methods rfsr,rfsr_sm80,rfsr_sm90 --out "$OUT_DIR/attention-bwd-$bwd" \
        > "$OUT_DIR/attention-bwd-$bwd.log" 2>&1
    rc=$?; [ $rc -ne 0 ] && status=$rc
    echo "bench_attention (RFSR_BWD_PATH=$bwd): rc=$rc"; tail -14 "$OUT_DIR/attention-bwd-$bwd.log"
  done
fi
exit $status
