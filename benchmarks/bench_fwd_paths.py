"""Forward ms of the fused op's kernel paths over SR attention shapes and window sizes (2^20 tokens a call, bf16).

For each (D, R, heads) of the SST family and each window size, the forward with RFSR_FWD_PATH=sm80 (mma.sync), =sm90
(the warp-specialised wgmma kernel, 9.x devices with the sm90 kernels built; sm90:K picks tile variant K of a build
with -DRFSR_SM90WS_VARIANTS) and unset (the binding's own choice). This is the measurement the
binding's path choice rests on (csrc/rfbias_cuda.cpp), and the quick A/B of a kernel build variant:

    python benchmarks/bench_fwd_paths.py [--out FILE.json] [--windows 16,32,64] [--paths sm80,sm90,default] [--tag NAME]

Timings are triton.testing.do_bench medians when triton is installed (CUDA events otherwise).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys

import torch

SHAPES = [  # (D, R, heads): SST-light, SST (R = 18 and 34), SST-XL
    (16, 24, 3),
    (30, 18, 6),
    (30, 34, 6),
    (32, 32, 7),
]
TOK = 1 << 20


def bench_ms(fn) -> float:
    try:
        import triton.testing as tt
        return float(tt.do_bench(fn, warmup=20, rep=100))
    except ImportError:
        for _ in range(5):
            fn()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(20):
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]


def run_path(path: str, fn):
    """Median ms of fn on `path`: default (unset), sm80, sm90, or sm90:K (tile variant K of a build with
    RFSR_SM90WS_VARIANTS, see csrc/rfbias/sm90/fwd_ws_kernel.h)."""
    keys = ("RFSR_FWD_PATH", "RFSR_SM90WS_VARIANT")
    old = {k: os.environ.get(k) for k in keys}
    name, _, variant = path.partition(":")
    for k in keys:
        os.environ.pop(k, None)
    if name != "default":
        os.environ["RFSR_FWD_PATH"] = name
    if variant:
        os.environ["RFSR_SM90WS_VARIANT"] = variant
    try:
        return bench_ms(fn), None
    except (RuntimeError, ValueError) as e:  # e.g. no sm90 kernel in this build
        return None, str(e).splitlines()[0][:160]
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    ap.add_argument("--windows", default="24,32,48,64,96")
    ap.add_argument("--paths", default="sm80,sm90,default")
    ap.add_argument("--tag", default="", help="a label stored with the results (e.g. the build variant)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA device")
    import rfsr_cuda  # noqa: F401  (registers torch.ops.rfsr)

    paths = a.paths.split(",")
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "tag": a.tag,
           "tokens": TOK, "dtype": "bfloat16", "rows": []}
    print(f"{res['device']}  torch {res['torch']}  {res['date']}  {a.tag}")
    for D, R, H in SHAPES:
        for W in (int(w) for w in a.windows.split(",")):
            N = W * W
            B = max(1, TOK // N)
            g = torch.Generator(device="cuda").manual_seed(0)
            q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
            bq, bk = ((torch.randn(H, N, R, device="cuda", generator=g) * 0.3).bfloat16() for _ in range(2))
            row = {"D": D, "R": R, "H": H, "window": W, "N": N, "B": B}
            for p in paths:
                ms, err = run_path(p, lambda: torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5))
                row[f"{p}_ms"] = None if ms is None else round(ms, 4)
                if err:
                    row[f"{p}_error"] = err
            res["rows"].append(row)
            cells = "  ".join(f"{p} {row[f'{p}_ms']:8.3f}" if row[f"{p}_ms"] is not None else f"{p}        -"
                              for p in paths)
            print(f"D={D:3d} R={R:3d} H={H} N={N:5d}  {cells}", flush=True)
            del q, k, v, bq, bk
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    sys.exit(main())
