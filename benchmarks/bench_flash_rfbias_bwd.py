"""Times the fused CUDA backward of rfsr::flash_rfbias against the backward of the concat route
(``[q*s | bq]``, ``[k | bk]``, ``[v | 0]`` + scaled_dot_product_attention), on SST-like shapes, one GPU.

    python benchmarks/bench_flash_rfbias_bwd.py [--shapes ws16,ws32,ws96] [--dtype bf16] [--kernels] [--no-concat]

Only timing: out/lse fed to the backward are placeholders of the right shapes (values do not change the work).
--kernels adds the fused backward's device time per kernel (torch.profiler, mean over 5 profiled calls), to see which
launch the time goes to; RFSR_BWD_PATH picks the kernel path as it does for the op.
"""
from __future__ import annotations

import argparse
import json

import torch

import rfsr_cuda  # noqa: F401
from rfsr_cuda.ops.reference import flash_rfbias_concat

SHAPES = {  # name: (B windows, H, N, D, R)
    "ws16": (288, 6, 256, 30, 18),
    "ws32": (72, 6, 1024, 30, 18),
    "ws48": (32, 6, 2304, 30, 34),
    "ws96": (8, 6, 9216, 30, 34),
    # bench_attention.py's two largest cases (2^20 tokens a call)
    "sst_w64": (256, 6, 4096, 30, 34),
    "xl_w96": (113, 7, 9216, 32, 32),
}


def cuda_time(fn, iters=10, warmup=3):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def kernel_times(fn, iters=5):
    """Mean device ms per call of each kernel that fn launches, largest first."""
    from profile_model import profiled  # the same warm-up and profiler settings as the model profile

    per = {}
    for ev in profiled(fn, iters).key_averages():
        if ev.self_device_time_total > 0:
            per[ev.key[:90]] = round(ev.self_device_time_total / 1e3 / iters, 4)
    return dict(sorted(per.items(), key=lambda kv: -kv[1]))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="ws16,ws32,ws96")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--kernels", action="store_true", help="also report the fused backward's time per kernel")
    ap.add_argument("--no-concat", action="store_true", help="skip the concat route (time and memory)")
    a = ap.parse_args()
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    rows = []
    for name in a.shapes.split(","):
        B, H, N, D, R = SHAPES[name]
        q, k, v, do = (torch.randn(B, N, H, D, device="cuda", dtype=dtype) for _ in range(4))
        bq, bk = (torch.randn(H, N, R, device="cuda", dtype=dtype) * R ** -0.25 for _ in range(2))
        out = torch.randn_like(q)
        lse = torch.full((B, H, N), float(torch.tensor(N).log()) + 1.0, device="cuda")
        scale = D ** -0.5
        def fused_call():
            return torch.ops.rfsr.flash_rfbias_bwd(do, q, k, v, bq, bk, out, lse, scale)

        fused = cuda_time(fused_call)
        row = dict(shape=name, B=B, H=H, N=N, D=D, R=R, dtype=a.dtype, fused_bwd_ms=round(fused, 4))
        xs = o = None
        if not a.no_concat:
            xs = [t.detach().requires_grad_() for t in (q, k, v, bq, bk)]
            o = flash_rfbias_concat(*xs, scale)
            concat = cuda_time(lambda: torch.autograd.grad(o, xs, do, retain_graph=True))
            row.update(concat_sdpa_bwd_ms=round(concat, 4), speedup=round(concat / fused, 3))
        if a.kernels:
            row["fused_kernels_ms"] = kernel_times(fused_call)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del q, k, v, do, out, xs, o
        torch.cuda.empty_cache()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
