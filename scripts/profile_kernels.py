"""Workloads and SASS summaries for profiling the attention kernels with Nsight Compute (scripts/profile_kernels.sh).

    python scripts/profile_kernels.py run fwd|bwd [--windows 32] [--window 64] [--shape D,R,H]
                                                                                one sst_w64-shaped call (after warm-up)
    python scripts/profile_kernels.py summary SOURCE.csv                       instruction mix, stall reasons and the
                                                                                hottest blocks of an `ncu --page source
                                                                                --csv --print-source sass` export
The forward path follows RFSR_FWD_PATH as usual.
"""
from __future__ import annotations

import argparse
import collections
import csv
import io
import sys


def run(what: str, windows: int, window: int, shape: str = "30,34,6") -> None:
    import torch
    import rfsr_cuda

    D, R, H = (int(x) for x in shape.split(","))
    B, N = windows, window * window
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3))
    bq, bk = ((torch.randn(H, N, R, device="cuda", generator=g) * 0.3).bfloat16() for _ in range(2))
    if what == "fwd":
        for _ in range(2):
            torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq, bk, D ** -0.5)
    else:
        leaves = [t.requires_grad_() for t in (q, k, v, bq, bk)]
        out = rfsr_cuda.flash_rfbias(*leaves)
        grad = torch.randn_like(out)
        for _ in range(2):
            torch.autograd.grad(out, leaves, grad, retain_graph=True)
    torch.cuda.synchronize()


def summary(path: str) -> None:
    text = open(path).read()
    for part in text.split('"Kernel Name"')[1:]:
        rows = list(csv.reader(io.StringIO('"Kernel Name"' + part)))
        name, hdr = rows[0][1], rows[1]
        data = [r for r in rows[2:] if len(r) == len(hdr)]
        i_ex, i_src = hdr.index("Instructions Executed"), hdr.index("Source")
        i_smp = hdr.index("Warp Stall Sampling (All Samples)")
        stall_cols = [i for i, h in enumerate(hdr) if h.startswith("stall_") and "Not Issued" not in h]
        total = sum(int(r[i_ex] or 0) for r in data) or 1
        samples = sum(int(r[i_smp] or 0) for r in data) or 1
        print(f"== {name[:110]}\n   warp instructions executed: {total:,}")
        stalls = {hdr[i][6:]: sum(int(r[i] or 0) for r in data) for i in stall_cols}
        print("   stalls: " + "  ".join(f"{k} {v / samples * 100:.1f}%" for k, v in
                                       sorted(stalls.items(), key=lambda x: -x[1]) if v / samples > 0.01))
        ops = collections.Counter()
        for r in data:
            tok = r[i_src].split()
            if tok:
                op = tok[1] if tok[0].startswith("@") and len(tok) > 1 else tok[0]
                ops[op.split(".")[0]] += int(r[i_ex] or 0)
        print("   mix: " + "  ".join(f"{k} {v / total * 100:.1f}%" for k, v in ops.most_common(16)))
        # runs of consecutive instructions with the same execution count are basic blocks (or parts of one)
        blocks, prev, count, n, first = [], None, 0, 0, ""
        for r in data:
            e = int(r[i_ex] or 0)
            if e != prev:
                if prev is not None:
                    blocks.append((count, n, prev, first))
                prev, count, n, first = e, 0, 0, r[i_src].strip()[:60]
            n += 1
            count += e
        blocks.append((count, n, prev, first))
        print("   blocks over 2% of instructions (instructions x executions):")
        for count, n, e, first in blocks:
            if count / total > 0.02:
                print(f"     {n:4d} x {e:11,d} = {count / total * 100:5.1f}%   {first}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("what", choices=["fwd", "bwd"])
    r.add_argument("--windows", type=int, default=32)
    r.add_argument("--window", type=int, default=64)
    r.add_argument("--shape", default="30,34,6", help="D,R,heads (default: SST's 64x64-window layers)")
    s = sub.add_parser("summary")
    s.add_argument("csv")
    a = ap.parse_args(argv)
    if a.cmd == "run":
        run(a.what, a.windows, a.window, a.shape)
    else:
        summary(a.csv)


if __name__ == "__main__":
    sys.exit(main())
