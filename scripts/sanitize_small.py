"""Small forward + backward calls of the CUDA kernels, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_small.py
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses are not hidden inside cached blocks.
"""
import torch

import rfsr_cuda  # noqa: F401  (registers the op)

CASES = [  # B, N, H, D, R, dtype, batched factors
    (3, 70, 2, 30, 18, torch.bfloat16, False),
    (2, 129, 1, 16, 0, torch.float16, False),
    (2, 64, 2, 32, 16, torch.bfloat16, True),
    (4200, 20, 1, 16, 6, torch.bfloat16, False),  # backward CTAs walk two windows each (shared factors)
    (4200, 20, 1, 16, 6, torch.float16, True),   # ... and with per-window factors
]


def main():
    torch.manual_seed(0)
    for B, N, H, D, R, dt, batched in CASES:
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        shape = (B, H, N, R) if batched else (H, N, R)
        bq, bk = (torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        out = rfsr_cuda.flash_rfbias(q, k, v, bq, bk)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), (B, N, H, D, R)
    print("sanitize_small: ok")


if __name__ == "__main__":
    main()
