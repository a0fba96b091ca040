"""Where the time of an SST call goes: GPU kernel time per kernel name, from torch.profiler (issue 8).

For each model: ×4 inference 180×320 → 720×1280 with the fast path (``attn_backend='fused'``,
``prepare_inference(torch.bfloat16)``), and one training step on 4 × 96² LR patches (float32 weights under bf16
autocast, L1, AdamW), as benchmarks/bench_model.py times them. Prints, per case, the device time of one call and the
kernels that take most of it (self device time per call, launches per call). Comparing the total with
bench_model's wall-clock ms shows how much of a call the GPU sits idle (CPU-bound launches).

    python benchmarks/profile_model.py [--models sst,sst_light] [--top 28] [--calls 3]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile


def report(prof, title: str, calls: int, top: int) -> None:
    events = prof.key_averages()
    total = sum(e.self_device_time_total for e in events) / 1e3 / calls
    print(f"== {title}: GPU kernel time {total:.2f} ms per call")
    for e in sorted(events, key=lambda e: e.self_device_time_total, reverse=True)[:top]:
        if e.self_device_time_total <= 0:
            break
        share = e.self_device_time_total / 1e3 / calls
        print(f"{share:8.3f} ms {share / total:6.1%} {e.count // calls:5d}x  {e.key[:110]}")


def profiled(fn, calls: int):
    for _ in range(2):  # warm-up: allocator, cuDNN/cuBLAS heuristics, caches
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return prof


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="sst,sst_light")
    ap.add_argument("--top", type=int, default=28, help="kernels listed per case")
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per case (after 2 warm-up calls)")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_model.py needs a CUDA GPU")
    from rfsr_cuda.models import create_model

    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}")
    for preset in [m for m in a.models.split(",") if m]:
        torch.manual_seed(0)
        model = create_model(preset, upscaling_factor=4, attn_backend="fused").cuda().eval()
        model.prepare_inference(torch.bfloat16)
        lr = torch.rand(1, 3, 180, 320, device="cuda")

        def infer():
            with torch.inference_mode():
                model(lr)

        report(profiled(infer, a.calls), f"{preset} infer_720p fused bf16", a.calls, a.top)

        torch.manual_seed(0)
        model = create_model(preset, upscaling_factor=4, attn_backend="fused").cuda().train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        lr = torch.rand(4, 3, 96, 96, device="cuda")
        hr = torch.rand(4, 3, 384, 384, device="cuda")

        def train_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                sr = model(lr)
            loss = F.l1_loss(sr.float(), hr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        report(profiled(train_step, a.calls), f"{preset} train_step fused amp", a.calls, a.top)


if __name__ == "__main__":
    main()
