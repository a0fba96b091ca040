"""Forward benchmark of the fused rfsr::flash_rfbias op against the ways peers compute the same attention.

One GPU, one process, bf16, 2^20 tokens per call, SST-family shapes. Methods:
  rfsr          torch.ops.rfsr.flash_rfbias_fwd (fused bias, no concatenation) with its default kernel choice: on
                9.x devices the warp-specialised wgmma kernel for the Dqk <= 64, Dv <= 32 buckets from the window
                size where it measured faster (csrc/rfbias_cuda.cpp, wgmma_min_n), the sm80 (mma.sync) kernels
                elsewhere
  rfsr_sm80     the same op forced onto the sm80 kernels (RFSR_FWD_PATH=sm80)
  rfsr_sm90     the same op forced onto the warp-specialised wgmma forward kernel (RFSR_FWD_PATH=sm90; 9.x devices)
  concat_flash  [q*s | Bq], [k | Bk], [v | 0] concatenated in memory, SDPA flash backend, output sliced
  concat_cudnn  the same through SDPA's cuDNN backend
  flex_rpb      FlexAttention with a relative-position-bias score_mod (the bias a low-rank factor replaces)
  nobias_flash  SDPA flash without any bias (what the bias costs on top)
Per case and method: forward ms (median of CUDA-event timings; with --rounds N, the median of N such medians taken
in a rotating method order), achieved TFLOP/s (useful flops
2*S*(D+R) + 2*S*D), the physical floor and its fraction, and the peak memory of one call. The floor is
max(exp count / exp rate, useful MMA flops / matmul rate, compulsory bytes / copy bandwidth), with the three
rates measured in the same run.

    python benchmarks/bench_attention.py [--out DIR] [--methods rfsr,concat_flash,...] [--cases sst_w16,...]
Writes DIR/bench_attention.json (default benchmarks/results/bench_attention-<device>-<date>.json).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

TOK = 1 << 20
DT = torch.bfloat16
CASES = [
    # name, D, R, H, window (N = window^2)
    ("light_w32", 16, 24, 3, 32),
    ("sst_w16", 30, 18, 6, 16),
    ("sst_w32", 30, 18, 6, 32),
    ("sst_w64", 30, 34, 6, 64),
    ("xl_w96", 32, 32, 7, 96),
]
RFSR_METHODS = ("rfsr", "rfsr_sm80", "rfsr_sm90")
METHODS = ["rfsr", "rfsr_sm80", "rfsr_sm90", "concat_flash", "concat_cudnn", "flex_rpb", "nobias_flash"]


# --- timing ---------------------------------------------------------------------------------------------------

def time_ms(fn, iters=30, warm=5, budget_s=20.0):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    times, t0 = [], time.time()
    for _ in range(iters):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); fn(); e.record(); e.synchronize()
        times.append(s.elapsed_time(e))
        if time.time() - t0 > budget_s and len(times) >= 5:
            break
    times.sort()
    return times[len(times) // 2]


def timed_rounds(fns, rounds, iters):
    """Median times of each callable in `fns`, `rounds` times over, the order rotated every round so that no method
    always runs first or after the same neighbour (clock and cache state drift between methods of one case).
    Returns ({name: [ms per round]}, {name: error}); a method that fails once is dropped from later rounds."""
    times, errors = {m: [] for m in fns}, {}
    order = list(fns)
    for r in range(rounds):
        k = r % max(1, len(order))
        for m in order[k:] + order[:k]:
            if m in errors:
                continue
            try:
                times[m].append(time_ms(fns[m], iters=iters))
            except Exception as e:  # noqa: BLE001
                errors[m] = f"{type(e).__name__}: {str(e)[:200]}"
    return {m: t for m, t in times.items() if t and m not in errors}, errors


def peak_mib(fn):
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn(); torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# --- ceilings -------------------------------------------------------------------------------------------------

def measure_ceilings():
    c = {}
    a = torch.randn(8192, 8192, device="cuda", dtype=DT)
    b = torch.randn(8192, 8192, device="cuda", dtype=DT)
    t = time_ms(lambda: a @ b, iters=20)
    c["bf16_matmul_tflops"] = 2 * 8192**3 / t / 1e9
    del a, b
    x = torch.randn(1 << 30, device="cuda", dtype=DT)  # 2 GiB
    y = torch.empty_like(x)
    t = time_ms(lambda: y.copy_(x), iters=20)
    c["copy_tb_s"] = 2 * x.numel() * x.element_size() / t / 1e9
    del x, y
    c["exp2_tera_per_s"] = measure_exp_rate()
    return c


def measure_exp_rate():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def _exp_chain(x_ptr, y_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        acc = tl.zeros_like(x)
        for _ in range(ITERS):
            x = tl.exp2(x * 0.5 - 0.25)
            acc += x
        tl.store(y_ptr + offs, acc)

    n, iters, block = 1 << 24, 512, 2048
    x = torch.rand(n, device="cuda")
    y = torch.empty_like(x)
    fn = lambda: _exp_chain[(n // block,)](x, y, ITERS=iters, BLOCK=block, num_warps=8)  # noqa: E731
    t = time_ms(fn, iters=10)
    return n * iters / t / 1e9


# --- methods --------------------------------------------------------------------------------------------------

def pad8(x):
    p = (-x.shape[-1]) % 8
    return F.pad(x, (0, p)) if p else x


def concat_attn(q, k, v, bq, bk, backend):
    from torch.nn.attention import sdpa_kernel
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, N, D) views
    B, H, N, D = qt.shape
    R = bq.shape[-1]
    qc = torch.cat([qt * D ** -0.5, (bq * R ** -0.5).to(DT).expand(B, -1, -1, -1)], -1)
    kc = torch.cat([kt, bk.to(DT).expand(B, -1, -1, -1)], -1)
    vc = torch.cat([vt, vt.new_zeros(B, H, N, R)], -1)
    qc, kc, vc = pad8(qc), pad8(kc), pad8(vc)
    with sdpa_kernel([backend]):
        o = F.scaled_dot_product_attention(qc, kc, vc, scale=1.0)
    return o[..., :D]


def nobias_attn(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    qt, kt, vt = (pad8(t.transpose(1, 2)) for t in (q, k, v))
    D = q.shape[-1]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        return F.scaled_dot_product_attention(qt, kt, vt, scale=D ** -0.5)[..., :D]


def rpb_index(W):
    c = torch.stack(torch.meshgrid(torch.arange(W), torch.arange(W), indexing="ij")).flatten(1)
    rel = c[:, None, :] - c[:, :, None]
    return ((rel[0] + W - 1) * (2 * W - 1) + rel[1] + W - 1).cuda()


_FLEX = None


def flex_fn():
    global _FLEX
    if _FLEX is None:
        from torch.nn.attention.flex_attention import flex_attention
        # one compile per case and direction: the default recompile limit (8) would silently drop the later cases
        # to the unfused, score-materialising fallback
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
        _FLEX = torch.compile(flex_attention, dynamic=False)
    return _FLEX


def on_path(meth, fn):
    """fn run with the kernel path of an rfsr method: rfsr_sm80 / rfsr_sm90 set RFSR_FWD_PATH around
    the call."""
    if meth not in ("rfsr_sm80", "rfsr_sm90"):
        return fn

    def run(*args):
        old = os.environ.get("RFSR_FWD_PATH")
        os.environ["RFSR_FWD_PATH"] = meth[len("rfsr_"):]
        try:
            return fn(*args)
        finally:
            if old is None:
                del os.environ["RFSR_FWD_PATH"]
            else:
                os.environ["RFSR_FWD_PATH"] = old
    return run


def build_methods(name, D, R, H, W, q, k, v, bq, bk, wanted):
    """name -> fn(q, k, v, bq, bk) returning the attention output; bq, bk are the float32 factors a model holds."""
    from torch.nn.attention import SDPBackend
    m = {}
    s = D ** -0.5
    for meth in RFSR_METHODS:
        if meth in wanted:
            m[meth] = on_path(meth, lambda q, k, v, bq, bk: torch.ops.rfsr.flash_rfbias(
                q, k, v, (bq * R ** -0.5).to(DT), bk.to(DT), s))
    if "concat_flash" in wanted:
        m["concat_flash"] = lambda q, k, v, bq, bk: concat_attn(q, k, v, bq, bk, SDPBackend.FLASH_ATTENTION)
    if "concat_cudnn" in wanted:
        m["concat_cudnn"] = lambda q, k, v, bq, bk: concat_attn(q, k, v, bq, bk, SDPBackend.CUDNN_ATTENTION)
    if "nobias_flash" in wanted:
        m["nobias_flash"] = lambda q, k, v, bq, bk: nobias_attn(q, k, v)
    if "flex_rpb" in wanted:
        table = torch.randn(H, (2 * W - 1) ** 2, device="cuda") * 0.1
        P = 1 << (D - 1).bit_length()

        def score_mod(score, b, h, qi, ki):
            qh, qw = qi // W, qi % W
            kh, kw = ki // W, ki % W
            return score + table[h, (kh - qh + W - 1) * (2 * W - 1) + (kw - qw + W - 1)]

        flex = flex_fn()

        def flex_rpb(q, k, v, bq, bk):
            qf, kf, vf = (F.pad(t.transpose(1, 2), (0, P - D)) for t in (q, k, v))
            return flex(qf, kf, vf, score_mod=score_mod, scale=D ** -0.5)[..., :D]

        m["flex_rpb"] = flex_rpb
    return m


def check_rfsr(q, k, v, bq, bk, R):
    """Relative error of the fused op against the concat path (fp32 math) on a slice of the windows."""
    sl = slice(0, 8)
    out = torch.ops.rfsr.flash_rfbias_fwd(q[sl], k[sl], v[sl], (bq * R ** -0.5).to(DT), bk.to(DT),
                                          q.shape[-1] ** -0.5)[0].float()
    from rfsr_cuda.ops.reference import flash_rfbias_reference
    ref = flash_rfbias_reference(q[sl].float(), k[sl].float(), v[sl].float(),
                                 (bq * R ** -0.5).to(DT).float(), bk.to(DT).float(), q.shape[-1] ** -0.5)
    return ((out - ref).norm() / ref.norm()).item()


# --- main -----------------------------------------------------------------------------------------------------

def write(res, path):
    by = {(r["case"], r["method"]): r for r in res["rows"]}
    for r in res["rows"]:  # speedup of rfsr over each method (> 1: rfsr is faster)
        mine = by.get((r["case"], "rfsr"))
        if mine and mine.get("fwd_ms") and r.get("fwd_ms"):
            r["rfsr_speedup"] = round(r["fwd_ms"] / mine["fwd_ms"], 3)
        if mine and mine.get("fwdbwd_ms") and r.get("fwdbwd_ms"):
            r["rfsr_fwdbwd_speedup"] = round(r["fwdbwd_ms"] / mine["fwdbwd_ms"], 3)
    with open(path, "w") as f:
        json.dump(res, f, indent=1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cases", default=",".join(c[0] for c in CASES))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-backward", action="store_true", help="forward timings only")
    ap.add_argument("--rounds", type=int, default=1,
                    help="time every method this many times per case, in a rotating order; report the median")
    a = ap.parse_args(argv)
    wanted = a.methods.split(",")
    if any(m.startswith("rfsr") for m in wanted):
        import rfsr_cuda  # noqa: F401  (registers torch.ops.rfsr)
    cases = [c for c in CASES if c[0] in a.cases.split(",")]
    torch.backends.cuda.matmul.allow_tf32 = True

    dev = torch.cuda.get_device_name()
    res = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
           "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "tokens": TOK,
           "dtype": "bfloat16", "ceilings": measure_ceilings(), "rows": []}
    ceil = res["ceilings"]
    print(json.dumps(ceil), flush=True)
    if a.out:
        out_path = os.path.join(a.out, "bench_attention.json")
    else:  # named after the card and the day, as the committed results are
        slug = dev.replace("NVIDIA", "").strip().split()[0].lower()
        out_path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"bench_attention-{slug}-{res['date'][:10]}.json")
    os.makedirs(os.path.dirname(out_path), exist_ok=True)

    for name, D, R, H, W in cases:
        N = W * W
        B = max(1, TOK // N)
        g = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=DT, generator=g) for _ in range(3))
        bq = torch.randn(H, N, R, device="cuda", generator=g) * 0.5
        bk = torch.randn(H, N, R, device="cuda", generator=g) * 0.5
        S = B * H * N * N
        flops = 2 * S * (D + R) + 2 * S * D
        bytes_ = B * N * H * (2 * 3 * D + 2 * D + 4) + 2 * H * N * R * 2
        t_exp = S / (ceil["exp2_tera_per_s"] * 1e12) * 1e3 if ceil.get("exp2_tera_per_s") else 0.0
        t_mma = flops / (ceil["bf16_matmul_tflops"] * 1e12) * 1e3
        t_mem = bytes_ / (ceil["copy_tb_s"] * 1e12) * 1e3
        floor = max(t_exp, t_mma, t_mem)
        limiter = {t_exp: "exp", t_mma: "mma", t_mem: "bytes"}[floor]
        base = {"case": name, "D": D, "R": R, "H": H, "window": W, "N": N, "B": B, "scores": S,
                "gflop": flops / 1e9, "floor_ms": round(floor, 4), "floor_limiter": limiter,
                "floor_exp_ms": round(t_exp, 4), "floor_mma_ms": round(t_mma, 4), "floor_bytes_ms": round(t_mem, 4)}
        for meth in RFSR_METHODS:
            if meth in wanted:
                try:
                    base[f"{meth}_rel_err_vs_fp32"] = on_path(meth, check_rfsr)(q, k, v, bq, bk, R)
                except Exception as e:  # noqa: BLE001
                    base[f"{meth}_check_err"] = str(e)[:200]
        # forward: the factors as an inference cache holds them (scaled, bf16), cast outside the timed call
        bq16, bk16 = (bq * R ** -0.5).to(DT), bk.to(DT)
        leaves = [t.detach().requires_grad_() for t in (q, k, v, bq, bk)]
        grad_out = torch.randn_like(q)
        fwds, fwdbwds = {}, {}
        for meth, fn in build_methods(name, D, R, H, W, q, k, v, bq, bk, wanted).items():
            if meth in RFSR_METHODS:
                fwds[meth] = on_path(meth, lambda: torch.ops.rfsr.flash_rfbias_fwd(q, k, v, bq16, bk16, D ** -0.5)[0])
            else:
                fwds[meth] = lambda fn=fn: fn(q, k, v, bq, bk)  # noqa: E731
            if not a.no_backward:
                # training: gradients for q, k, v and the float32 factors (their cast and scale inside the call)
                def fwdbwd(fn=fn, meth=meth):
                    for t_ in leaves:
                        t_.grad = None
                    # rfsr returns (B, N, H, D), the SDPA/flex paths (B, H, N, D)
                    torch.autograd.backward(fn(*leaves), grad_out if meth.startswith("rfsr") else grad_out.transpose(1, 2))
                fwdbwds[meth] = fwdbwd
        with torch.no_grad():
            t_fwd, err_fwd = timed_rounds(fwds, a.rounds, a.iters)
        t_bwd, err_bwd = timed_rounds(fwdbwds, a.rounds, a.iters)
        for meth in fwds:
            row = dict(base, method=meth)
            if meth in t_fwd:
                t = statistics.median(t_fwd[meth])
                with torch.no_grad():
                    mem = peak_mib(fwds[meth])
                row.update(fwd_ms=round(t, 4), fwd_peak_mib=round(mem, 1), tflops=round(flops / t / 1e9, 1),
                           floor_fraction=round(floor / t, 3))
                if a.rounds > 1:
                    row["fwd_ms_rounds"] = [round(x, 4) for x in t_fwd[meth]]
            else:
                row.update(fwd_ms=None, error=err_fwd.get(meth))
            if not a.no_backward:
                if meth in t_bwd:
                    row.update(fwdbwd_ms=round(statistics.median(t_bwd[meth]), 4),
                               fwdbwd_peak_mib=round(peak_mib(fwdbwds[meth]), 1))
                    if a.rounds > 1:
                        row["fwdbwd_ms_rounds"] = [round(x, 4) for x in t_bwd[meth]]
                else:
                    row.update(fwdbwd_ms=None, fwdbwd_error=err_bwd.get(meth))
            res["rows"].append(row)
            print(json.dumps({k_: row.get(k_) for k_ in ("case", "method", "fwd_ms", "fwd_peak_mib", "tflops",
                                                         "floor_fraction", "fwdbwd_ms", "fwdbwd_peak_mib",
                                                         "error", "fwdbwd_error")}), flush=True)
        del leaves, grad_out, bq16, bk16
        del q, k, v, bq, bk
        torch.cuda.empty_cache()
        write(res, out_path)  # after every case, so a run cut short still leaves its rows

    by = {(r["case"], r["method"]): r for r in res["rows"]}
    write(res, out_path)
    path = out_path

    # short table last
    print(f"\n{dev}  torch {torch.__version__}  ceilings {ceil}")
    meths = [m for m in METHODS if m in wanted]
    print(f"{'case':<10} " + " ".join(f"{m:>13}" for m in meths) + "   rfsr floor%  x_flash x_cudnn")
    for name, *_ in cases:
        cells = []
        for m in meths:
            r = by.get((name, m))
            cells.append(f"{r['fwd_ms']:>13.3f}" if r and r.get("fwd_ms") else f"{'-':>13}")
        mine = by.get((name, "rfsr"))
        extra = ""
        if mine and mine.get("fwd_ms"):
            fl = by.get((name, "concat_flash"), {}).get("rfsr_speedup")
            cu = by.get((name, "concat_cudnn"), {}).get("rfsr_speedup")
            extra = f"   {100 * mine['floor_fraction']:6.1f}%  {fl}  {cu}"
        print(f"{name:<10} " + " ".join(cells) + extra)
    if not a.no_backward:
        print("fwd+bwd ms")
        for name, *_ in cases:
            cells = []
            for m in meths:
                r = by.get((name, m))
                cells.append(f"{r['fwdbwd_ms']:>13.3f}" if r and r.get("fwdbwd_ms") else f"{'-':>13}")
            fl = by.get((name, "concat_flash"), {}).get("rfsr_fwdbwd_speedup")
            print(f"{name:<10} " + " ".join(cells) + f"   x_flash {fl}")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
