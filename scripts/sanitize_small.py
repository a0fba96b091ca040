"""Small forward + backward calls of the CUDA kernels, for compute-sanitizer (memcheck, racecheck).

    compute-sanitizer --tool memcheck --error-exitcode 1 python scripts/sanitize_small.py
Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so out-of-bounds accesses are not hidden inside cached blocks.
"""
import os

import torch

import rfsr_cuda  # noqa: F401  (registers the op)

CASES = [  # B, N, H, D, R, dtype, batched factors
    (3, 70, 2, 30, 18, torch.bfloat16, False),
    (2, 129, 1, 16, 0, torch.float16, False),
    (2, 64, 2, 32, 16, torch.bfloat16, True),
    (4200, 20, 1, 16, 6, torch.bfloat16, False),  # backward CTAs walk two windows each (shared factors)
    (4200, 20, 1, 16, 6, torch.float16, True),   # ... and with per-window factors
]


def bwd_paths():
    """The backward paths to check: sm80 always, and the wgmma kernels on 9.x devices when this build has them."""
    paths = ["sm80"]
    if torch.cuda.get_device_capability()[0] == 9:
        os.environ["RFSR_BWD_PATH"] = "sm90"
        try:
            x = torch.zeros(1, 1, 1, 30, device="cuda", dtype=torch.bfloat16)
            f = torch.zeros(1, 1, 18, device="cuda", dtype=torch.bfloat16)
            torch.ops.rfsr.flash_rfbias_bwd(x, x, x, x, f, f, x, torch.zeros(1, 1, 1, device="cuda"), 1.0)
            paths.append("sm90")
        except (RuntimeError, ValueError):  # not in this build
            pass
        finally:
            del os.environ["RFSR_BWD_PATH"]
    return paths


def main():
    torch.manual_seed(0)
    for path in bwd_paths():
        os.environ["RFSR_BWD_PATH"] = path
        run_cases()
    del os.environ["RFSR_BWD_PATH"]
    print("sanitize_small: ok")


def run_cases():
    for B, N, H, D, R, dt, batched in CASES:
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
        shape = (B, H, N, R) if batched else (H, N, R)
        bq, bk = (torch.randn(*shape, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        out = rfsr_cuda.flash_rfbias(q, k, v, bq, bk)
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), (B, N, H, D, R)


if __name__ == "__main__":
    main()
