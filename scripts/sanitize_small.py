"""Small forward + backward calls of the CUDA kernels, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_small.py [--only attention|model-ops]
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses are not hidden inside cached blocks.
"model-ops" are the LayerNorm, depthwise-conv and window partition/merge kernels of the model's inference path.
"""
import argparse
import os

import torch

import rfsr_cuda
from rfsr_cuda.ops.flash_rfbias import cuda_path_available

CASES = [  # B, N, H, D, R, dtype, batched factors
    (3, 70, 2, 30, 18, torch.bfloat16, False),
    (2, 129, 1, 16, 0, torch.float16, False),
    (2, 64, 2, 32, 16, torch.bfloat16, True),
    (4200, 20, 1, 16, 6, torch.bfloat16, False),  # backward CTAs walk two windows each (shared factors)
    (4200, 20, 1, 16, 6, torch.float16, True),   # ... and with per-window factors
]

# forward-only calls of the wgmma kernels on 9.x devices (forced paths): several key tiles, so the warp-specialised
# kernel's ring wraps around, with even and odd ranks (cp.async and plain-store factor copies)
SM90_CASES = [  # B, N, H, D, R, dtype
    (2, 700, 2, 30, 18, torch.bfloat16),
    (300, 200, 1, 30, 18, torch.bfloat16),  # more work items than CTAs: each persistent CTA walks several windows
    (200, 130, 2, 16, 7, torch.float16),
    (1, 1000, 1, 32, 7, torch.float16),
    (3, 70, 2, 16, 0, torch.bfloat16),
    (150, 300, 1, 32, 32, torch.bfloat16),  # 16-byte rows; a window's last item leaves one consumer idle
]


# rfsr::layer_norm / add_layer_norm: rows x channels -> width, dtype, residual; tails of every access width, rows that
# do not fill a block, strided rows
LN_CASES = [((1, 1), 1, torch.bfloat16, False), ((37, 180), 184, torch.bfloat16, True), ((5, 48), 56, torch.float16, True),
            ((3, 2048), 2048, torch.bfloat16, False), ((7, 3), 8, torch.float32, True), ((129, 1000), 1000, torch.float32, False)]
# rfsr::depthwise_conv3x3: (B, C, H, W), dtype; heights that are not a multiple of the 4-row strips, odd channels
DW_CASES = [((1, 3, 5, 7), torch.bfloat16), ((2, 232, 9, 13), torch.bfloat16), ((1, 184, 4, 130), torch.float16),
            ((1, 8, 3, 3), torch.float32), ((2, 6, 1, 1), torch.bfloat16)]
# rfsr::window_merge: B, (H, W), window, shift, C, gate width or None, out width, dtype; padding, shifts, 1-element
# accesses (odd C), zero columns, a window larger than the image
MERGE_CASES = [(2, (13, 19), (8, 8), (4, 4), 180, 184, 184, torch.bfloat16), (1, (5, 7), (16, 16), (0, 0), 5, None, 8,
               torch.float16), (3, (9, 6), (4, 2), (2, 1), 12, 12, 16, torch.float32)]


def model_ops():
    for (rows, C), width, dt, residual in LN_CASES:
        x = torch.randn(rows, C + 2, device="cuda", dtype=dt)[:, :C]  # rows of a wider buffer
        w, b = torch.randn(C, device="cuda", dtype=dt), torch.randn(C, device="cuda")
        w = w.float() if dt != torch.float32 and residual else w  # float32 and same-dtype parameters
        b = b.to(w.dtype)
        n = C - 3 if C > 3 else None  # statistics of a prefix (norm_cols) on every other case
        n = n if rows % 2 else None
        if residual:
            out, s = torch.ops.rfsr.add_layer_norm(x, torch.randn_like(x), w, b, 1e-6, width, n)
        else:
            out = torch.ops.rfsr.layer_norm(x, w, b, 1e-6, width, n)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and (out[:, C:] == 0).all(), ("layer_norm", rows, C, width)
    for (B, C, H, W), dt in DW_CASES:
        x = torch.randn(B, C, H, W, device="cuda", dtype=dt).contiguous(memory_format=torch.channels_last)
        taps, bias = torch.randn(3, 3, C, device="cuda"), torch.randn(C, device="cuda")
        for gelu, residual in ((True, True), (False, False)):
            out = torch.ops.rfsr.depthwise_conv3x3(x, taps, bias, gelu, residual)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all(), ("depthwise_conv3x3", B, C, H, W)
    for B, (H, W), (wh, ww), shift, C, gw, width, dt in MERGE_CASES:
        n = B * -(-H // wh) * -(-W // ww)
        windows = torch.randn(n, wh * ww, C, device="cuda", dtype=dt)
        gate = None if gw is None else torch.randn(B, H, W, gw, device="cuda", dtype=dt)
        out = torch.ops.rfsr.window_merge(windows, H, W, [wh, ww], list(shift), gate, width)
        torch.cuda.synchronize()
        assert torch.isfinite(out).all() and (out[..., C:] == 0).all(), ("window_merge", B, H, W, C)
        if gw is not None and (H - 1) // wh * wh + wh - H < H and (W - 1) // ww * ww + ww - W < W:
            parts = torch.ops.rfsr.window_partition(gate, [wh, ww], list(shift), C)  # (the gate as pixel rows)
            torch.cuda.synchronize()
            assert parts.shape == (n, wh * ww, C) and torch.isfinite(parts).all(), ("window_partition", B, H, W, C)


def main():
    ap = argparse.ArgumentParser(description="small CUDA kernel calls for compute-sanitizer")
    ap.add_argument("--only", choices=["attention", "model-ops"], default=None)
    only = ap.parse_args().only
    torch.manual_seed(0)
    if only != "attention":
        model_ops()
    if only == "model-ops":
        print("sanitize_small: ok")
        return
    hopper = torch.cuda.get_device_capability()[0] == 9
    if hopper and cuda_path_available("fwd", "sm90"):
        os.environ["RFSR_FWD_PATH"] = "sm90"
        for B, N, H, D, R, dt in SM90_CASES:
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt) for _ in range(3))
            bq, bk = (torch.randn(H, N, R, device="cuda", dtype=dt) for _ in range(2))
            out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(lse).all(), ("sm90", B, N, H, D, R)
        del os.environ["RFSR_FWD_PATH"]
    # forward + backward on the default forward path, with each backward path this build and device have
    for path in ["sm80"] + (["sm90"] if hopper and cuda_path_available("bwd", "sm90") else []):
        os.environ["RFSR_BWD_PATH"] = path
        for B, N, H, D, R, dt, batched in CASES:
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
            shape = (B, H, N, R) if batched else (H, N, R)
            bq, bk = (torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
            out = rfsr_cuda.flash_rfbias(q, k, v, bq, bk)
            out.backward(torch.randn_like(out))
            torch.cuda.synchronize()
            assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), (path, B, N, H, D, R)
        del os.environ["RFSR_BWD_PATH"]
    print("sanitize_small: ok")


if __name__ == "__main__":
    main()
