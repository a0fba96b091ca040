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

# forward-only calls of the wgmma kernels on 9.x devices (forced paths): several key tiles, so the warp-specialised
# kernel's ring wraps around, with even and odd ranks (cp.async and plain-store factor copies)
SM90_CASES = [  # B, N, H, D, R, dtype
    (2, 700, 2, 30, 18, torch.bfloat16),
    (300, 200, 1, 30, 18, torch.bfloat16),  # more work items than CTAs: each persistent CTA walks several windows
    (200, 130, 2, 16, 7, torch.float16),
    (1, 1000, 1, 32, 7, torch.float16),
    (3, 70, 2, 16, 0, torch.bfloat16),
]


def _runs(env: str, path: str, call) -> bool:
    """call() succeeds with env=path (False when this build or device lacks that path)."""
    os.environ[env] = path
    try:
        call()
        return True
    except (RuntimeError, ValueError):
        return False
    finally:
        del os.environ[env]


def _tiny_fwd():
    z = torch.zeros(1, 1, 1, 30, device="cuda", dtype=torch.bfloat16)
    f = torch.zeros(1, 1, 18, device="cuda", dtype=torch.bfloat16)
    torch.ops.rfsr.flash_rfbias_fwd(z, z, z, f, f, 1.0)


def _tiny_bwd():
    x = torch.zeros(1, 1, 1, 30, device="cuda", dtype=torch.bfloat16)
    f = torch.zeros(1, 1, 18, device="cuda", dtype=torch.bfloat16)
    torch.ops.rfsr.flash_rfbias_bwd(x, x, x, x, f, f, x, torch.zeros(1, 1, 1, device="cuda"), 1.0)


def main():
    torch.manual_seed(0)
    hopper = torch.cuda.get_device_capability()[0] == 9
    if hopper and _runs("RFSR_FWD_PATH", "sm90", _tiny_fwd):
        os.environ["RFSR_FWD_PATH"] = "sm90"
        for B, N, H, D, R, dt in SM90_CASES:
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=dt) for _ in range(3))
            bq, bk = (torch.randn(H, N, R, device="cuda", dtype=dt) for _ in range(2))
            out, lse = torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
            torch.cuda.synchronize()
            assert torch.isfinite(out).all() and torch.isfinite(lse).all(), ("sm90", B, N, H, D, R)
        del os.environ["RFSR_FWD_PATH"]
    # forward + backward on the default forward path, with each backward path this build and device have
    for path in ["sm80"] + (["sm90"] if hopper and _runs("RFSR_BWD_PATH", "sm90", _tiny_bwd) else []):
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
