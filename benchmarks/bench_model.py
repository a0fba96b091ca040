"""Whole-model benchmark (issue 8): SST and SST-light ×4, the fused fast path against the paper's concat route.

One GPU, one process, random init (speed does not depend on the weights). Every row builds a fresh model with the
same seed, so rows of one (model, task) compute the same function and their outputs are compared.
Rows (--rows, comma-separated backend:precision[:mode]; default below, in this order):
  concat:fp32         the paper's route ([q·s | Bq], [k | Bk], [v | 0] + SDPA) in a float32 model, as the
                      official code runs (its attention in bf16 on CUDA, rfsr_cuda.nn.attention.op_dtype)
  concat:bf16         the same route in bf16 (see precisions)
  fused:bf16          the fast path: torch.ops.rfsr.flash_rfbias (bias fused, no concatenation) in bf16
  fused:bf16:compile  the same through torch.compile(fullgraph=True, dynamic=False)      (added by --compile)
  fused:bf16:graph    the eager fast path replayed from one CUDA graph (inference only)  (added by --cuda-graph)
Precisions:
  fp32   float32 model, no autocast (TF32 GEMMs/convs unless --no-tf32)
  bf16   inference: SST.prepare_inference(torch.bfloat16): bf16 weights and activations, channels-last, float32
         RIB factors computed once (cached) and float32 statistics inside LayerNorm/softmax; float32 image in/out.
         training: float32 weights under torch.autocast(bfloat16), as rfsr_cuda/train/loop.py trains
  amp    float32 weights under torch.autocast(bfloat16) for inference too (how the Upscaler runs a model)
Tasks (LR sizes; scale 4):
  infer_720p    1 × 180×320 → 720×1280, torch.inference_mode, eval
  infer_1080p   1 × 270×480 → 1080×1920, the same
  train_step    4 × 96² LR patches → 384² HR: forward, L1 on the float32 output, backward, AdamW step (zero_grad,
                forward, loss, backward, step: as the training loop does it, without EMA/scheduler)
Per row: median ms over CUDA-event timings after warm-up (CPU: perf_counter), frames/s (inference) or LR patches/s
(training), peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats, absolute: weights included,
and for training the gradients and AdamW state; peak_extra_mib subtracts what was allocated before the timed
calls), compile_s (first call of a compiled row), and for inference the relative L2 distance of the output from the
concat:fp32 row's (rel_l2_vs_fp32). Fused rows get speedups over both concat rows. Each row runs in its own
try/except (an OOM is recorded as the row's error) and the JSON is rewritten after every row. A table with the
official SST numbers (H200) and the issue's targets (SST infer_720p <= 33 ms; a fused training step <= 1/2 the
concat one) is printed last.

    python benchmarks/bench_model.py [--out DIR|FILE.json] [--models sst,sst_light] [--tasks ...] [--rows ...]
        [--compile] [--compile-mode MODE] [--cuda-graph] [--backends ...] [--precisions ...] [--iters N]
        [--warmup N] [--budget-s S] [--device cuda|cpu] [--small] [--no-tf32]
Writes DIR/bench_model-<device-slug>-<date>[-small].json (default DIR benchmarks/results). --small (tiny inputs,
n_blocks=1, windows capped at 16) runs in seconds on the CPU and checks the plumbing only: on the CPU the 'fused'
backend runs ATen kernels, not the CUDA one. Exit status 1 when any row failed (the JSON still has the others).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import re
import statistics
import sys
import time

import torch
import torch.nn.functional as F

MODELS = {"sst": "SST", "sst_light": "SST-light"}  # preset -> official name
BACKENDS = ["fused", "concat"]
SCALE = 4
# task -> (kind, batch, LR height, LR width)
TASKS = {
    "infer_720p": ("infer", 1, 180, 320),
    "infer_1080p": ("infer", 1, 270, 480),
    "train_step": ("train", 4, 96, 96),
}
SMALL_TASKS = {
    "infer_720p": ("infer", 1, 24, 32),
    "infer_1080p": ("infer", 1, 36, 48),
    "train_step": ("train", 1, 32, 32),
}
SMALL_MAX_WINDOW = 16  # --small: windows capped so the tiny inputs need little padding (min side 9)
PRECISIONS = {
    "fp32": "float32 model without autocast; on CUDA the attention runs in bf16 (rfsr_cuda.nn.attention.op_dtype), "
            "as the official code does for float32 models; on the CPU it stays float32",
    "bf16": "inference: SST.prepare_inference(torch.bfloat16) (bf16 weights and activations, channels-last, float32 "
            "RIB factors cast once, float32 image in and out); training: float32 weights under "
            "torch.autocast(bfloat16), as rfsr_cuda/train/loop.py",
    "amp": "float32 weights under torch.autocast(device_type, dtype=torch.bfloat16), inference and training",
}
MODES = {
    "eager": "plain PyTorch",
    "compile": "torch.compile(model, fullgraph=True, dynamic=False, mode=--compile-mode); compile_s is the first call",
    "graph": "rfsr_cuda.models.CUDAGraphForward: the eager forward captured once and replayed (CUDA, inference)",
}
DEFAULT_ROWS = ["concat:fp32", "concat:bf16", "fused:bf16"]
# Official SST numbers (RIB attention, measured on an H200 with the official implementation):
# x4 inference 180×320 → 720×1280 and one training step on 4 × 96² LR patches. Their precision is the official
# code's (float32 model, bf16 attention).
ANCHORS = {
    "source": "model-anchors-h200-2026-11-27.json (official SST code, RIB attention, H200)",
    "sst": {"params_m": 12.12, "infer_720p": {"ms": 99.2, "mib": 795}, "train_step": {"ms": 232.3, "mib": 18607}},
    "sst_light": {"params_m": 0.909, "infer_720p": {"ms": 56.4, "mib": 229},
                  "train_step": {"ms": 160.4, "mib": 4351}},
}
TARGETS = {"infer_720p_ms": {"sst": 33.0}, "train_step_fused_over_concat": 0.5}


# --- timing ---------------------------------------------------------------------------------------------------

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, iters, warm, budget_s):
    """Per-call ms after ``warm`` untimed calls: CUDA events on the GPU, perf_counter on the CPU. Stops early once
    ``budget_s`` seconds have passed and at least 5 calls are timed."""
    for _ in range(warm):
        fn()
    sync(device)
    times, t0 = [], time.perf_counter()
    for _ in range(iters):
        if device.type == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record(); fn(); e.record(); e.synchronize()
            times.append(s.elapsed_time(e))
        else:
            t = time.perf_counter(); fn(); times.append((time.perf_counter() - t) * 1e3)
        if time.perf_counter() - t0 > budget_s and len(times) >= 5:
            break
    return times


def mib(n_bytes):
    return round(n_bytes / 2**20, 1)


# --- one row --------------------------------------------------------------------------------------------------

def parse_row(spec: str) -> tuple[str, str, str]:
    parts = spec.split(":")
    if len(parts) == 2:
        parts.append("eager")
    if len(parts) != 3 or parts[0] not in ("fused", "concat", "reference") or parts[1] not in PRECISIONS \
            or parts[2] not in MODES:
        raise SystemExit(f"bad row {spec!r}: backend:precision[:mode] with backend fused|concat|reference, "
                         f"precision {'|'.join(PRECISIONS)}, mode {'|'.join(MODES)}")
    return parts[0], parts[1], parts[2]


def row_name(backend, precision, mode):
    return f"{backend}:{precision}" + ("" if mode == "eager" else f":{mode}")


def build_model(preset, backend, device, small, seed=0):
    from rfsr_cuda.models import create_model, get_config

    overrides = {}
    if small:
        windows = get_config(preset).window_sizes
        overrides = dict(n_blocks=1, window_sizes=tuple(min(w, SMALL_MAX_WINDOW) for w in windows))
    torch.manual_seed(seed)
    model = create_model(preset, upscaling_factor=SCALE, attn_backend=backend, **overrides)
    return model.to(device)


def run_row(preset, backend, precision, mode, task, a, device, tasks):
    """Measure one row; returns ``(fields, output)`` (raises on failure)."""
    kind, batch, h, w = tasks[task]
    if mode == "graph" and (kind != "infer" or device.type != "cuda"):
        raise ValueError("CUDA-graph rows are for inference on CUDA")
    amp = precision == "amp" or (precision == "bf16" and kind == "train")

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)

    model = build_model(preset, backend, device, a.small)
    out = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    g = torch.Generator(device=device).manual_seed(1)
    lr = torch.rand(batch, 3, h, w, device=device, generator=g)
    warm = a.warmup
    if kind == "infer":
        model.eval()
        if precision == "bf16":
            model.prepare_inference(torch.bfloat16)
        if mode == "graph":
            from rfsr_cuda.models import CUDAGraphForward

            with autocast():  # captured with the autocast state of the row
                net = CUDAGraphForward(model, lr)
        elif mode == "compile":
            net = torch.compile(model, fullgraph=True, dynamic=False, mode=a.compile_mode)
        else:
            net = model

        def step():
            with torch.inference_mode(), autocast():
                return net(lr)
    else:
        model.train()
        hr = torch.rand(batch, 3, SCALE * h, SCALE * w, device=device, generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.9), weight_decay=0.0)
        net = torch.compile(model, fullgraph=True, dynamic=False, mode=a.compile_mode) if mode == "compile" \
            else model
        warm = max(warm, 1)  # the first step allocates the AdamW state

        def step():
            with autocast():
                sr = net(lr)
            loss = F.l1_loss(sr.float(), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return sr.detach()

    if mode == "compile":  # the first call compiles: timed on its own, outside the warm-up
        t = time.perf_counter()
        step()
        sync(device)
        out["compile_s"] = round(time.perf_counter() - t, 2)
    # warm-up outside the memory window, then peak over the timed calls (steady state)
    for _ in range(warm):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = time_calls(step, device, a.iters, 0, a.budget_s)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
        out.update(peak_mib=mib(peak), base_mib=mib(base), peak_extra_mib=mib(peak - base),
                   reserved_mib=mib(torch.cuda.max_memory_reserved(device)))
    else:
        out.update(peak_mib=None)
    y = step().float()
    sync(device)
    ms = statistics.median(times)
    out.update(ms=round(ms, 3), ms_min=round(min(times), 3), ms_max=round(max(times), 3), n_timed=len(times),
               fps=round(batch * 1e3 / ms, 3), output=f"{batch}x3x{SCALE * h}x{SCALE * w}",
               output_finite=bool(torch.isfinite(y).all()), output_absmean=round(float(y.abs().mean()), 6))
    if list(y.shape) != [batch, 3, SCALE * h, SCALE * w]:
        raise RuntimeError(f"output shape {list(y.shape)} != {[batch, 3, SCALE * h, SCALE * w]}")
    return out, (y.cpu() if kind == "infer" else None)


# --- output ---------------------------------------------------------------------------------------------------

def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    tokens = re.findall(r"[a-z0-9]+", name)
    return tokens[0] if tokens else "cuda"  # "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100


def add_ratios(res):
    """Speedups of every non-concat row over the eager concat rows of its (model, task), and target checks."""
    by = {(r["model"], r["task"], r["row"]): r for r in res["rows"]}
    for r in res["rows"]:
        if r["backend"] == "concat" or not r.get("ms"):
            continue
        for base in ("concat:fp32", "concat:bf16"):
            c = by.get((r["model"], r["task"], base))
            if c and c.get("ms"):
                r[f"speedup_vs_{base.replace(':', '_')}"] = round(c["ms"] / r["ms"], 3)
                if r.get("peak_mib") and c.get("peak_mib"):
                    r[f"mib_over_{base.replace(':', '_')}"] = round(r["peak_mib"] / c["peak_mib"], 3)
    checks = {}
    for preset, limit in TARGETS["infer_720p_ms"].items():
        fused = [r for r in res["rows"] if r["model"] == preset and r["task"] == "infer_720p"
                 and r["backend"] == "fused" and r.get("ms")]
        if fused:
            best = min(fused, key=lambda r: r["ms"])
            checks[f"{preset}_infer_720p_ms"] = {"best": best["ms"], "row": best["row"], "target": limit,
                                                 "met": best["ms"] <= limit}
    for preset in MODELS:
        fused = [r for r in res["rows"] if r["model"] == preset and r["task"] == "train_step"
                 and r["backend"] == "fused" and r.get("ms")]
        concat = [r for r in res["rows"] if r["model"] == preset and r["task"] == "train_step"
                  and r["backend"] == "concat" and r.get("ms")]
        if fused and concat:
            best, base = min(fused, key=lambda r: r["ms"]), min(concat, key=lambda r: r["ms"])
            ratio = round(best["ms"] / base["ms"], 3)
            checks[f"{preset}_train_step_fused_over_concat"] = {
                "fused": best["ms"], "fused_row": best["row"], "concat": base["ms"], "concat_row": base["row"],
                "ratio": ratio, "target": TARGETS["train_step_fused_over_concat"],
                "met": ratio <= TARGETS["train_step_fused_over_concat"]}
    res["target_checks"] = checks


def write(res, path):
    add_ratios(res)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)


def fmt(v, spec):
    """``v`` formatted with ``spec``, or a '-' of the same width when it is missing."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    width = re.match(r"[<>^]?(\d*)", spec).group(1)
    return format("-" if v is None else str(v), f">{width}")


def print_table(res, small):
    print(f"\n{res['device']}  torch {res['torch']}{'  (--small: plumbing only, not comparable)' if small else ''}")
    print(f"{'model':<10} {'task':<12} {'row':<22} {'ms':>9} {'fps':>8} {'MiB':>9} {'x c:fp32':>8} {'x c:bf16':>8} "
          f"{'rel_l2':>8} {'compile s':>9}")
    last = None
    for r in res["rows"]:
        g = (r["model"], r["task"])
        if g != last and last is not None:
            print()
        last = g
        print(f"{r['model']:<10} {r['task']:<12} {r['row']:<22} {fmt(r.get('ms'), '>9.2f')} "
              f"{fmt(r.get('fps'), '>8.2f')} {fmt(r.get('peak_mib'), '>9.1f')} "
              f"{fmt(r.get('speedup_vs_concat_fp32'), '>8.2f')} {fmt(r.get('speedup_vs_concat_bf16'), '>8.2f')} "
              f"{fmt(r.get('rel_l2_vs_fp32'), '>8.1e')} {fmt(r.get('compile_s'), '>9.1f')}")
    if not small:
        print("\nofficial SST code (H200, float32 model with bf16 attention): "
              + "; ".join(f"{MODELS[m]} {t} {v['ms']} ms / {v['mib']} MiB"
                          for m in MODELS for t, v in ANCHORS[m].items() if isinstance(v, dict)))
    for k, c in res.get("target_checks", {}).items():
        print(f"target {k}: {json.dumps(c)}")
    for r in res["rows"]:
        if r.get("error"):
            print(f"ERROR {r['model']} {r['task']} {r['row']}: {r['error']}")


# --- main -----------------------------------------------------------------------------------------------------

def csv(s, allowed, what):
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def plan_rows(a) -> list[tuple[str, str, str]]:
    specs = [x for x in (a.rows or ",".join(DEFAULT_ROWS)).split(",") if x]
    if a.compile:
        specs.append("fused:bf16:compile")
    if a.cuda_graph:
        specs.append("fused:bf16:graph")
    rows = list(dict.fromkeys(parse_row(s) for s in specs))
    if a.backends:
        keep = csv(a.backends, ("fused", "concat", "reference"), "backends")
        rows = [r for r in rows if r[0] in keep]
    if a.precisions:
        keep = csv(a.precisions, PRECISIONS, "precisions")
        rows = [r for r in rows if r[1] in keep]
    # float32 rows first: the others are compared with their outputs
    return sorted(rows, key=lambda r: r[1] != "fp32")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder, or a .json file path (default benchmarks/results)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--rows", default=None, help=f"backend:precision[:mode],... (default {','.join(DEFAULT_ROWS)})")
    ap.add_argument("--compile", action="store_true", help="add fused:bf16:compile rows")
    ap.add_argument("--compile-mode", default="default",
                    help="torch.compile mode of compiled rows: default, max-autotune-no-cudagraphs, reduce-overhead")
    ap.add_argument("--cuda-graph", action="store_true", help="add fused:bf16:graph rows (CUDA inference)")
    ap.add_argument("--backends", default=None, help="keep only rows of these backends")
    ap.add_argument("--precisions", default=None, help="keep only rows of these precisions")
    ap.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20; --small 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed calls per row first (default 3; --small 1)")
    ap.add_argument("--budget-s", type=float, default=60.0, help="stop timing a row after this long (>= 5 calls)")
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (testing)")
    ap.add_argument("--small", action="store_true", help="tiny inputs and n_blocks=1: a seconds-long plumbing check")
    ap.add_argument("--no-tf32", action="store_true", help="keep float32 matmuls/convs in full fp32 (fp32 rows)")
    a = ap.parse_args(argv)
    a.iters = a.iters if a.iters is not None else (3 if a.small else 20)
    a.warmup = a.warmup if a.warmup is not None else (1 if a.small else 3)
    models = csv(a.models, MODELS, "models")
    tasks_spec = SMALL_TASKS if a.small else TASKS
    tasks = csv(a.tasks, tasks_spec, "tasks")
    rows = plan_rows(a)
    if not rows:
        raise SystemExit("no rows left to run (check --rows/--backends/--precisions)")

    device = torch.device(a.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("--device cuda asked for, but CUDA is not available (use --device cpu for a test run)")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = not a.no_tf32
        torch.backends.cudnn.allow_tf32 = not a.no_tf32
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    import rfsr_cuda  # noqa: F401  (registers torch.ops.rfsr)

    now = _dt.datetime.now(_dt.timezone.utc)
    res = {"device": dev_name, "device_slug": device_slug(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "rows_planned": [row_name(*r) for r in rows],
           "precision_notes": {p: PRECISIONS[p] for p in sorted({r[1] for r in rows})},
           "mode_notes": {m: MODES[m] for m in sorted({r[2] for r in rows})}, "compile_mode": a.compile_mode,
           "tf32": device.type == "cuda" and not a.no_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "scale": SCALE, "small": a.small, "iters": a.iters, "warmup": a.warmup,
           "tasks": {t: dict(zip(("kind", "batch", "lr_h", "lr_w"), tasks_spec[t])) for t in tasks},
           "timing": "median of per-call CUDA-event ms after warm-up (CPU: perf_counter)",
           "fps": "frames/s for infer_* rows, LR patches/s (batch × steps/s) for train_step",
           "memory": "peak_mib = torch.cuda.max_memory_allocated over the timed calls after reset_peak_memory_stats "
                     "(absolute: weights, inputs, and for train_step gradients + AdamW state); base_mib = allocated "
                     "before them; peak_extra_mib = the difference",
           "rel_l2": "||y - y_concat_fp32|| / ||y_concat_fp32|| on the same input and weights (inference rows)",
           "anchors": ANCHORS, "targets": TARGETS, "rows": []}
    out_dir = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if out_dir.endswith(".json"):
        out_path = out_dir
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
        out_path = os.path.join(out_dir, f"bench_model-{res['device_slug']}-{now:%Y-%m-%d}"
                                         f"{'-small' if a.small else ''}.json")
    print(f"{dev_name}  torch {torch.__version__}  -> {out_path}", flush=True)

    run_all(res, rows, models, tasks, tasks_spec, a, device, out_path)
    write(res, out_path)
    print_table(res, a.small)
    print(f"wrote {out_path}")
    return 1 if any(r.get("error") for r in res["rows"]) else 0


def run_all(res, rows, models, tasks, tasks_spec, a, device, out_path):
    for preset in models:
        for task in tasks:
            kind, batch, h, w = tasks_spec[task]
            reference = None  # the concat:fp32 output of this (model, task)
            for backend, precision, mode in rows:
                if mode == "graph" and kind != "infer":
                    continue
                row = {"model": preset, "model_name": MODELS[preset], "task": task,
                       "row": row_name(backend, precision, mode), "backend": backend, "precision": precision,
                       "mode": mode, "input": f"{batch}x3x{h}x{w}", "output": f"{batch}x3x{SCALE * h}x{SCALE * w}",
                       "ms": None, "fps": None, "peak_mib": None}
                t0 = time.perf_counter()
                try:
                    fields, y = run_row(preset, backend, precision, mode, task, a, device, tasks_spec)
                    row.update(fields)
                    if y is not None:
                        if (backend, precision, mode) == ("concat", "fp32", "eager"):
                            reference = y
                        if reference is not None:
                            row["rel_l2_vs_fp32"] = float(f"{float((y - reference).norm() / reference.norm()):.3e}")
                except Exception as e:  # noqa: BLE001  (an OOM or a kernel error must not lose the run)
                    row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                row["wall_s"] = round(time.perf_counter() - t0, 2)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if mode == "compile":
                    torch._dynamo.reset()  # the compiled graphs of this row hold its weights
                res["rows"].append(row)
                write(res, out_path)  # after every row, so a run cut short still leaves its rows
                print(json.dumps({k: row.get(k) for k in ("model", "task", "row", "ms", "fps", "peak_mib",
                                                          "rel_l2_vs_fp32", "compile_s", "error")}), flush=True)


if __name__ == "__main__":
    sys.exit(main())
