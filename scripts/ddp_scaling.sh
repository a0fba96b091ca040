#!/usr/bin/env bash
# Multi-GPU training throughput: the same short examples/train.py run on 1 GPU and under torchrun on N GPUs
# (per-GPU batch fixed, so the global batch grows with N), then images/s of each from the training logs, leaving
# out the first log window (warm-up: allocator, cuDNN autotuning). Needs a built extension (scripts/gpu_check.sh or
# pip install) and a folder of training images.
#
#   scripts/ddp_scaling.sh DATA_DIR [OUT_DIR]
# Knobs: GPUS (default: all visible), STEPS (300), LOG_EVERY (50), BATCH (16 per GPU), PATCH (64), PRESET
# (sst_light), SCALE (4), BACKEND (concat|fused, default fused), MODEL_CONFIG (train.py --model-config JSON; default
# sets the backend), EXTRA (more train.py arguments).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:?usage: scripts/ddp_scaling.sh DATA_DIR [OUT_DIR]}
OUT_DIR=${2:-./ddp_scaling_out}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
GPUS=${GPUS:-$($PY -c "import torch; print(torch.cuda.device_count())")}
STEPS=${STEPS:-300}
LOG_EVERY=${LOG_EVERY:-50}
BACKEND=${BACKEND:-fused}
MODEL_CONFIG=${MODEL_CONFIG:-"{\"attn_backend\": \"$BACKEND\"}"}
ARGS=(--data "$DATA" --preset "${PRESET:-sst_light}" --scale "${SCALE:-4}" --steps "$STEPS" --batch-size "${BATCH:-16}"
      --lr-patch "${PATCH:-64}" --cache-images --val-every 0 --save-every 0 --log-every "$LOG_EVERY" --no-progress
      --model-config "$MODEL_CONFIG" ${EXTRA:-})

run() {  # run NAME NPROC
  local name=$1 n=$2
  rm -rf "$OUT_DIR/$name"
  if [ "$n" = 1 ]; then
    $PY examples/train.py "${ARGS[@]}" --out "$OUT_DIR/$name" > "$OUT_DIR/$name.log" 2>&1
  else
    $PY -m torch.distributed.run --standalone --nproc_per_node="$n" examples/train.py "${ARGS[@]}" \
        --out "$OUT_DIR/$name" > "$OUT_DIR/$name.log" 2>&1
  fi
  tail -2 "$OUT_DIR/$name.log"
}

run gpu1 1
run "gpu$GPUS" "$GPUS"

$PY - "$OUT_DIR" "$GPUS" "$STEPS" "$LOG_EVERY" "$MODEL_CONFIG" <<'EOF'
import datetime, json, sys
from pathlib import Path
import torch

out, gpus, steps, every = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
model_config = json.loads(sys.argv[5])

def steady(name):
    recs = [json.loads(l) for l in (out / name / "train_log.jsonl").read_text().splitlines() if l.strip()]
    windows = [r["images_per_s"] for r in recs if "loss" in r and r.get("images_per_s")]
    end = [r for r in recs if r.get("event") == "end"][-1]
    # every window but the first (warm-up), weighted equally: each covers LOG_EVERY steps
    rate = sum(windows[1:]) / len(windows[1:]) if len(windows) > 1 else end["images_per_s"]
    return {"images_per_s": round(rate, 2), "images_per_s_incl_warmup": round(end["images_per_s"], 2),
            "global_batch": end["global_batch"], "world_size": end["world_size"], "windows": len(windows)}

one, many = steady("gpu1"), steady(f"gpu{gpus}")
res = {"device": torch.cuda.get_device_name(), "gpus": gpus, "torch": torch.__version__,
       "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
       "steps": steps, "log_every": every, "model_config": model_config, "one_gpu": one, "n_gpus": many,
       "speedup": round(many["images_per_s"] / one["images_per_s"], 3)}
(out / "ddp_scaling.json").write_text(json.dumps(res, indent=1) + "\n")
print(json.dumps(res))
EOF
