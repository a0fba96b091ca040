"""Whole-model benchmark (issue 8): SST and SST-light ×4 with the fused RIB attention against the concat route.

One GPU, one process, random init (speed does not depend on the weights). For every model, task and precision the
two attention backends run back to back on a freshly built model with the same seed:
  fused    attn_backend='fused'   torch.ops.rfsr.flash_rfbias (bias fused, no concatenation)
  concat   attn_backend='concat'  the paper's route in the same model: [q·s | Bq], [k | Bk], [v | 0] + SDPA
Tasks (LR sizes; scale 4):
  infer_720p    1 × 180×320 → 720×1280, torch.inference_mode, model.eval()
  infer_1080p   1 × 270×480 → 1080×1920, the same
  train_step    4 × 96² LR patches → 384² HR: bf16 autocast forward, L1 on the float32 output, backward, AdamW step
                (zero_grad, forward, loss, backward, step: as rfsr_cuda/train/loop.py does it, without EMA/scheduler)
Precisions (--precisions, default bf16):
  bf16   float32 weights under torch.autocast(device, bfloat16) (the training loop's AMP; attention in bf16)
  fp32   float32 model, no autocast; on CUDA the attention still runs in bf16 (op_dtype), as the official code does
Per row: median ms over CUDA-event timings after warm-up (CPU: perf_counter), frames/s (inference) or LR patches/s
(training), peak memory (torch.cuda.max_memory_allocated after reset_peak_memory_stats, absolute: it includes the
weights, and for training the gradients and AdamW state; peak_extra_mib subtracts what was allocated before the
timed calls). Each row runs in its own try/except (an OOM is recorded as the row's error) and the JSON is rewritten
after every row. A short table of fused/concat ratios and the official SST numbers (H200) is printed last.

    python benchmarks/bench_model.py [--out DIR|FILE.json] [--models sst,sst_light] [--backends fused,concat]
        [--tasks infer_720p,infer_1080p,train_step] [--precisions bf16[,fp32]] [--also-fp32] [--iters N]
        [--warmup N] [--device cuda|cpu] [--small]
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
    "bf16": "float32 weights under torch.autocast(device_type, dtype=torch.bfloat16); attention in bf16",
    "fp32": "float32 model without autocast; on CUDA the attention runs in bf16 (rfsr_cuda.nn.attention.op_dtype), "
            "as the official code does for float32 models; on the CPU it stays float32",
}
# Official SST numbers (RIB attention, measured on an H200 with the official implementation):
# x4 inference 180×320 → 720×1280 and one training step on 4 × 96² LR patches. Their precision is the official
# code's (float32 model, bf16 attention).
ANCHORS = {
    "source": "model-anchors-h200-2026-11-27.json (official SST code, RIB attention, H200)",
    "sst": {"params_m": 12.12, "infer_720p": {"ms": 99.2, "mib": 795}, "train_step": {"ms": 232.3, "mib": 18607}},
    "sst_light": {"params_m": 0.909, "infer_720p": {"ms": 56.4, "mib": 229},
                  "train_step": {"ms": 160.4, "mib": 4351}},
}


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

def build_model(preset, backend, device, small, seed=0):
    from rfsr_cuda.models import create_model, get_config

    overrides = {}
    if small:
        windows = get_config(preset).window_sizes
        overrides = dict(n_blocks=1, window_sizes=tuple(min(w, SMALL_MAX_WINDOW) for w in windows))
    torch.manual_seed(seed)
    model = create_model(preset, upscaling_factor=SCALE, attn_backend=backend, **overrides)
    return model.to(device)


def run_row(preset, backend, task, precision, a, device, tasks):
    """Measure one (model, backend, task, precision); returns the row's measured fields (raises on failure)."""
    kind, batch, h, w = tasks[task]

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    model = build_model(preset, backend, device, a.small)
    out = {"params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3)}
    g = torch.Generator(device=device).manual_seed(1)
    lr = torch.rand(batch, 3, h, w, device=device, generator=g)
    warm = a.warmup
    if kind == "infer":
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                return model(lr)
    else:
        model.train()
        hr = torch.rand(batch, 3, SCALE * h, SCALE * w, device=device, generator=g)
        opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.9), weight_decay=0.0)
        warm = max(warm, 1)  # the first step allocates the AdamW state

        def step():
            with autocast():
                sr = model(lr)
            loss = F.l1_loss(sr.float(), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return sr.detach()

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
    y = step()
    sync(device)
    ms = statistics.median(times)
    out.update(ms=round(ms, 3), ms_min=round(min(times), 3), ms_max=round(max(times), 3), n_timed=len(times),
               fps=round(batch * 1e3 / ms, 3), output=f"{batch}x3x{SCALE * h}x{SCALE * w}",
               output_finite=bool(torch.isfinite(y).all()), output_absmean=round(float(y.float().abs().mean()), 6))
    if list(y.shape) != [batch, 3, SCALE * h, SCALE * w]:
        raise RuntimeError(f"output shape {list(y.shape)} != {[batch, 3, SCALE * h, SCALE * w]}")
    return out


# --- output ---------------------------------------------------------------------------------------------------

def device_slug(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "").strip()
    tokens = re.findall(r"[a-z0-9]+", name)
    return tokens[0] if tokens else "cuda"  # "NVIDIA H200" -> h200, "NVIDIA H100 80GB HBM3" -> h100


def key(r):
    return r["model"], r["task"], r["precision"]


def add_ratios(res):
    by = {(*key(r), r["backend"]): r for r in res["rows"]}
    for r in res["rows"]:
        if r["backend"] != "fused":
            continue
        c = by.get((*key(r), "concat"))
        if c and r.get("ms") and c.get("ms"):
            r["fused_over_concat_ms"] = round(r["ms"] / c["ms"], 3)
        if c and r.get("peak_mib") and c.get("peak_mib"):
            r["fused_over_concat_mib"] = round(r["peak_mib"] / c["peak_mib"], 3)


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
    by = {(*key(r), r["backend"]): r for r in res["rows"]}
    groups = list(dict.fromkeys(key(r) for r in res["rows"]))
    print(f"\n{res['device']}  torch {res['torch']}  precision {res['precision']}"
          f"{'  (--small: plumbing only, not comparable)' if small else ''}")
    print(f"{'model':<10} {'task':<12} {'prec':<5} {'fused ms':>9} {'concat ms':>9} {'f/c':>6} "
          f"{'fused MiB':>9} {'concat MiB':>10} {'f/c':>6}   official(H200) ms / MiB")
    for g in groups:
        f_, c_ = by.get((*g, "fused"), {}), by.get((*g, "concat"), {})
        anchor = ANCHORS.get(g[0], {}).get(g[1]) if not small else None
        anc = f"{anchor['ms']:.1f} / {anchor['mib']}" if anchor else "-"
        print(f"{g[0]:<10} {g[1]:<12} {g[2]:<5} {fmt(f_.get('ms'), '>9.2f')} {fmt(c_.get('ms'), '>9.2f')} "
              f"{fmt(f_.get('fused_over_concat_ms'), '>6.3f')} {fmt(f_.get('peak_mib'), '>9.1f')} "
              f"{fmt(c_.get('peak_mib'), '>10.1f')} {fmt(f_.get('fused_over_concat_mib'), '>6.3f')}   {anc}")
    others = [r for r in res["rows"] if r["backend"] not in ("fused", "concat")]
    for r in others:
        print(f"{r['model']:<10} {r['task']:<12} {r['precision']:<5} {r['backend']}: {fmt(r.get('ms'), '.2f')} ms, "
              f"{fmt(r.get('peak_mib'), '.1f')} MiB")
    for r in res["rows"]:
        if r.get("error"):
            print(f"ERROR {r['model']} {r['backend']} {r['task']} {r['precision']}: {r['error']}")


# --- main -----------------------------------------------------------------------------------------------------

def csv(s, allowed, what):
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in allowed]
    if bad:
        raise SystemExit(f"unknown {what} {bad}; choose from {list(allowed)}")
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder, or a .json file path (default benchmarks/results)")
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--backends", default=",".join(BACKENDS), help="fused, concat (and reference, slow)")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--precisions", default="bf16", help="bf16 (autocast) and/or fp32 (official: bf16 attention)")
    ap.add_argument("--also-fp32", action="store_true", help="same as --precisions bf16,fp32")
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
    backends = csv(a.backends, ("fused", "concat", "reference"), "backends")
    tasks_spec = SMALL_TASKS if a.small else TASKS
    tasks = csv(a.tasks, tasks_spec, "tasks")
    precisions = csv("bf16,fp32" if a.also_fp32 else a.precisions, PRECISIONS, "precisions")

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
           "precision": ",".join(precisions), "precision_notes": {p: PRECISIONS[p] for p in precisions},
           "tf32": device.type == "cuda" and not a.no_tf32, "cudnn_benchmark": torch.backends.cudnn.benchmark,
           "scale": SCALE, "small": a.small, "iters": a.iters, "warmup": a.warmup,
           "tasks": {t: dict(zip(("kind", "batch", "lr_h", "lr_w"), tasks_spec[t])) for t in tasks},
           "timing": "median of per-call CUDA-event ms after warm-up (CPU: perf_counter)",
           "fps": "frames/s for infer_* rows, LR patches/s (batch × steps/s) for train_step",
           "memory": "peak_mib = torch.cuda.max_memory_allocated over the timed calls after reset_peak_memory_stats "
                     "(absolute: weights, inputs, and for train_step gradients + AdamW state); base_mib = allocated "
                     "before them; peak_extra_mib = the difference",
           "anchors": ANCHORS, "rows": []}
    out_dir = a.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if out_dir.endswith(".json"):
        out_path = out_dir
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    else:
        os.makedirs(out_dir, exist_ok=True)
        out_path = os.path.join(out_dir, f"bench_model-{res['device_slug']}-{now:%Y-%m-%d}"
                                         f"{'-small' if a.small else ''}.json")
    print(f"{dev_name}  torch {torch.__version__}  -> {out_path}", flush=True)

    for preset in models:
        for task in tasks:
            kind, batch, h, w = tasks_spec[task]
            for precision in precisions:
                for backend in backends:
                    row = {"model": preset, "model_name": MODELS[preset], "backend": backend, "task": task,
                           "precision": precision, "input": f"{batch}x3x{h}x{w}",
                           "output": f"{batch}x3x{SCALE * h}x{SCALE * w}", "ms": None, "fps": None,
                           "peak_mib": None}
                    t0 = time.perf_counter()
                    try:
                        row.update(run_row(preset, backend, task, precision, a, device, tasks_spec))
                    except Exception as e:  # noqa: BLE001  (an OOM or a kernel error must not lose the run)
                        row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    row["wall_s"] = round(time.perf_counter() - t0, 2)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    res["rows"].append(row)
                    write(res, out_path)  # after every row, so a run cut short still leaves its rows
                    print(json.dumps({k: row.get(k) for k in ("model", "backend", "task", "precision", "ms", "fps",
                                                              "peak_mib", "error")}), flush=True)

    write(res, out_path)
    print_table(res, a.small)
    print(f"wrote {out_path}")
    return 1 if any(r.get("error") for r in res["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
