#!/usr/bin/env bash
# Nsight Compute profiles of the attention kernels at SST's 64x64-window shape (32 windows x 6 heads, D = 30, R = 34):
# the forward on both kernel paths and the backward. Needs an in-place build of the extension in this tree (build with
# RFSR_NVCC_FLAGS=-lineinfo for source-level counters) and ncu on the PATH.
#
#   scripts/profile_kernels.sh [OUT_DIR]
#   PROFILES="name:path:variant:D,R,H ..." scripts/profile_kernels.sh [OUT_DIR]   chosen forward profiles
# Writes per profile: <name>.txt (ncu details page), <name>_sass.csv (per-instruction counters) and
# <name>_summary.txt (instruction mix, stall reasons and hottest blocks, from scripts/profile_kernels.py).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT_DIR=${1:-./profile_out}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
SECTIONS="--section SpeedOfLight --section WarpStateStats --section SchedulerStats --section Occupancy
          --section LaunchStats --section ComputeWorkloadAnalysis --section InstructionStats --section SourceCounters"

profile() {  # name, kernel regex, launches to skip, launches to profile, workload
  local name=$1 regex=$2 skip=$3 count=$4; shift 4
  # --clock-control none: leave the device clocks as they are
  ncu --clock-control none -k "regex:$regex" --launch-skip "$skip" --launch-count "$count" $SECTIONS \
      --import-source yes -o "$OUT_DIR/$name" "$PY" scripts/profile_kernels.py run "$@" > "$OUT_DIR/$name.log" 2>&1
  echo "$name: ncu rc=$?"
  ncu -i "$OUT_DIR/$name.ncu-rep" --page details > "$OUT_DIR/$name.txt" 2>&1
  ncu -i "$OUT_DIR/$name.ncu-rep" --page source --csv --print-source sass > "$OUT_DIR/${name}_sass.csv" 2>&1
  "$PY" scripts/profile_kernels.py summary "$OUT_DIR/${name}_sass.csv" > "$OUT_DIR/${name}_summary.txt" 2>&1
  rm -f "$OUT_DIR/$name.ncu-rep"
  cat "$OUT_DIR/${name}_summary.txt"
}

if [ -n "${PROFILES:-}" ]; then
  # PROFILES: space-separated NAME:FWD_PATH[:VARIANT]:D,R,H entries, forward only, e.g.
  #   PROFILES="ws2_d30:sm90:3:30,34,6 sm90_d32:sm90::32,32,7"   (variant 3 needs an experiment build)
  for spec in $PROFILES; do
    IFS=: read -r name path variant shape <<< "$spec"
    RFSR_FWD_PATH=$path RFSR_SM90WS_VARIANT=$variant profile "$name" rfbias_fwd 1 1 fwd --shape "$shape"
  done
  exit 0
fi
RFSR_FWD_PATH=sm80 profile fwd_sm80 rfbias_fwd 1 1 fwd
RFSR_FWD_PATH=sm90 profile fwd_sm90 rfbias_fwd 1 1 fwd
profile bwd_sm80 "bwd_(dkdv|dq)_kernel" 2 2 bwd
