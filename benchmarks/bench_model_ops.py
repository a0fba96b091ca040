"""The model-level ops of the inference path against the PyTorch ops they replace, on SST's 720p shapes (bf16).

``rfsr::layer_norm`` / ``add_layer_norm`` (rows of 180 → 184, 180 of 184, 48 and 224 channels, 192×320 pixels) against
``F.layer_norm`` (after ``x + y``), and ``rfsr::depthwise_conv3x3`` (the FFN's ``x + gelu(dwc(x))`` and the gate's
``dwc(x)`` for 232, 184, 72 and 48 channels, 180×320 pixels) against cuDNN's conv plus PyTorch's GELU and add, and
``rfsr::window_merge`` (windows back to 180×320 pixel rows, shifted and cropped, times ``sigmoid(gate)``, into the
padded rows: SST's 180 → 184 channels at 64×64 windows, SST-light's 60 → 64 at 16×16) against the attention layer's
unfused route (one gather, ``sigmoid``, the product into the gate's padded rows), and ``rfsr::window_partition`` (pad
+ shift + partition of the q, k, v columns of the projection's rows) against the layer's gather of 8-byte words; a
block's 3×3 conv and residual add at 180 and 184 channels, and the ×4 'pixelshuffle' upsampler unfolded and folded.
Each time is the best of 5 runs of 200 back-to-back calls between CUDA events (microseconds per call), so launch gaps
do not count; TB/s counts the bytes each op must move once.

    python benchmarks/bench_model_ops.py [--out FILE.json]
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os

import torch
import torch.nn.functional as F


def per_call_us(fn, calls: int = 200, reps: int = 5) -> float:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(reps):
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / calls * 1e3)
    return best


def layer_norm_rows(rows: list) -> None:
    from rfsr_cuda.ops import layer_norm_padded
    M = 192 * 320
    # (channels, input row width, output width): rows of 184 carry SST's 180 channels and 4 zeros (the padded
    # residual stream of SST.pad_channels: statistics of the first 180 through norm_cols, 16-byte accesses)
    for C, row, width in ((180, 180, 184), (180, 184, 184), (48, 48, 48), (224, 224, 224)):
        x = torch.randn(M, row, device="cuda", dtype=torch.bfloat16)
        y = torch.randn_like(x)
        w, b = (torch.randn(row, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        n = C if row != C else None
        mb_in, mb_out = M * row * 2 / 1e6, M * width * 2 / 1e6
        t = {"torch_layer_norm_us": per_call_us(lambda: F.layer_norm(x[:, :C], (C,), w[:C], b[:C], 1e-6)),
             "torch_add_layer_norm_us": per_call_us(lambda: F.layer_norm((x + y)[:, :C], (C,), w[:C], b[:C], 1e-6)),
             "rfsr_layer_norm_us": per_call_us(lambda: layer_norm_padded(x, w, b, 1e-6, width, norm_cols=n)),
             "rfsr_add_layer_norm_us": per_call_us(
                 lambda: layer_norm_padded(x, w, b, 1e-6, width, residual=y, norm_cols=n))}
        t["rfsr_layer_norm_tbs"] = (mb_in + mb_out) / t["rfsr_layer_norm_us"]
        t["rfsr_add_layer_norm_tbs"] = (3 * mb_in + mb_out) / t["rfsr_add_layer_norm_us"]  # x, y in; sum, out
        rows.append({"op": "layer_norm", "rows": M, "channels": C, "row_width": row, "width": width, **t})
        print(f"layer_norm {M} x {C} (rows of {row}) -> {width}: F.layer_norm {t['torch_layer_norm_us']:.1f} us, "
              f"+ add {t['torch_add_layer_norm_us']:.1f} us | rfsr {t['rfsr_layer_norm_us']:.1f} us "
              f"({t['rfsr_layer_norm_tbs']:.2f} TB/s), with the add {t['rfsr_add_layer_norm_us']:.1f} us "
              f"({t['rfsr_add_layer_norm_tbs']:.2f} TB/s)")


def depthwise_rows(rows: list) -> None:
    from rfsr_cuda.ops import depthwise_conv3x3, depthwise_taps
    for C in (232, 184, 72, 48):
        x = torch.randn(1, C, 180, 320, device="cuda", dtype=torch.bfloat16).contiguous(
            memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(C, C, 3, padding=1, groups=C).cuda().to(torch.bfloat16,
                                                                       memory_format=torch.channels_last)
        taps, bias = depthwise_taps(conv.weight), conv.bias.detach().float()
        t = {"torch_ffn_us": per_call_us(lambda: x + F.gelu(conv(x))),
             "torch_conv_us": per_call_us(lambda: conv(x)),
             "rfsr_ffn_us": per_call_us(lambda: depthwise_conv3x3(x, taps, bias, gelu=True, residual=True)),
             "rfsr_conv_us": per_call_us(lambda: depthwise_conv3x3(x, taps, bias))}
        t["rfsr_ffn_tbs"] = 2 * x.numel() * 2 / 1e6 / t["rfsr_ffn_us"]
        rows.append({"op": "depthwise_conv3x3", "shape": list(x.shape), **t})
        print(f"depthwise 3x3, {C} channels, 180x320: x + gelu(conv(x)) {t['torch_ffn_us']:.1f} us, conv(x) "
              f"{t['torch_conv_us']:.1f} us | rfsr fused {t['rfsr_ffn_us']:.1f} us ({t['rfsr_ffn_tbs']:.2f} TB/s), "
              f"conv only {t['rfsr_conv_us']:.1f} us")


def merge_rows(rows: list) -> None:
    from rfsr_cuda.nn.attention import _window_indices
    from rfsr_cuda.ops import window_merge
    H, W = 180, 320
    for C, width, win, shifted in ((180, 184, 64, True), (60, 64, 16, False)):
        nh, nw = -(-H // win), -(-W // win)
        windows = torch.randn(nh * nw, win * win, C, device="cuda", dtype=torch.bfloat16)
        logits = torch.randn(1, H, W, width, device="cuda", dtype=torch.bfloat16)
        _, _, win_r, win_c, off_r, off_c = _window_indices(H, W, win, win, shifted, "cuda")
        shift = (win // 2, win // 2) if shifted else (0, 0)

        def unfused():  # RIBWindowAttention's route without the op (its gathers move 8-byte words)
            merged = windows.view(torch.int64).view(1, nh, nw, win, win, C // 4)[:, win_r, win_c, off_r, off_c]
            gate = torch.sigmoid(logits)
            gate[..., :C].mul_(merged.view(torch.bfloat16))
            return gate

        t = {"torch_us": per_call_us(unfused),
             "rfsr_us": per_call_us(lambda: window_merge(windows, (H, W), win, shift, logits, width))}
        t["rfsr_tbs"] = H * W * (2 * C + width) * 2 / 1e6 / t["rfsr_us"]  # windows and gate in, rows out
        rows.append({"op": "window_merge", "pixels": [H, W], "channels": C, "width": width, "window": win,
                     "shift": list(shift), **t})
        print(f"window_merge {H}x{W}, {C} -> {width} channels, {win}x{win} windows: gather + sigmoid + product "
              f"{t['torch_us']:.1f} us | rfsr {t['rfsr_us']:.1f} us ({t['rfsr_tbs']:.2f} TB/s)")


def partition_rows(rows: list) -> None:
    from rfsr_cuda.nn.attention import _window_indices
    from rfsr_cuda.ops import window_partition
    H, W = 180, 320
    for C3, width, win, shifted in ((540, 544, 64, True), (180, 192, 16, False)):
        qkv = torch.randn(1, H, W, width, device="cuda", dtype=torch.bfloat16)
        rows_idx, cols_idx = _window_indices(H, W, win, win, shifted, "cuda")[:2]
        shift = (win // 2, win // 2) if shifted else (0, 0)
        words = qkv[..., :C3].view(torch.int64)  # RIBWindowAttention's route without the op (move_words)
        t = {"torch_us": per_call_us(lambda: words[:, rows_idx, cols_idx]),
             "rfsr_us": per_call_us(lambda: window_partition(qkv, win, shift, C3))}
        n_rows = -(-H // win) * win * -(-W // win) * win
        t["rfsr_tbs"] = (H * W + n_rows) * C3 * 2 / 1e6 / t["rfsr_us"]
        rows.append({"op": "window_partition", "pixels": [H, W], "channels": C3, "row_width": width, "window": win,
                     "shift": list(shift), **t})
        print(f"window_partition {H}x{W}, {C3} of {width} channels, {win}x{win} windows: gather "
              f"{t['torch_us']:.1f} us | rfsr {t['rfsr_us']:.1f} us ({t['rfsr_tbs']:.2f} TB/s)")


def stream_rows(rows: list) -> None:
    """The residual stream's own ops at 180 channels (cuDNN pads them) against 184 (SST.pad_channels): a block's
    3×3 conv with its residual add, and SST's 'pixelshuffle' ×4 upsampler unfolded against folded."""
    from rfsr_cuda.nn import Upsampler
    H, W = 180, 320
    cl = torch.channels_last
    for C in (180, 184):
        conv = torch.nn.Conv2d(C, C, 3, padding=1).cuda().to(torch.bfloat16, memory_format=cl)
        x = torch.randn(1, C, H, W, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
        f = torch.randn_like(x)
        with torch.no_grad():
            us = per_call_us(lambda: x + conv(x + f))
        rows.append({"op": "block_conv3x3", "pixels": [H, W], "channels": C, "rfsr_us": us})
        print(f"block tail x + conv3x3(x + f), {C} channels, {H}x{W}: {us:.1f} us")
    torch.manual_seed(0)
    up = Upsampler(180, 4, "pixelshuffle", 64).cuda().eval()
    feat = torch.randn(1, 180, H, W, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=cl)
    skip = torch.rand(1, 3, H, W, device="cuda")
    t = {}

    def graphed():  # replayed from a CUDA graph: the folded route's strips are small launches, host-bound eager
        with torch.no_grad():
            up(feat, skip)
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                out = up(feat, skip)
        return g, out

    with torch.no_grad():
        up.fold(torch.bfloat16)
        up.to(torch.bfloat16, memory_format=cl)
        g, folded = graphed()
        t["rfsr_us"] = per_call_us(g.replay, calls=50)
        up._fold_w = None
        g, plain = graphed()
        t["torch_us"] = per_call_us(g.replay, calls=50)
    t["rel_l2"] = ((folded - plain).norm() / plain.norm()).item()
    rows.append({"op": "upsampler_pixelshuffle_x4", "pixels": [H, W], "channels": 180, **t})
    print(f"pixelshuffle x4 upsampler, 180 channels, {H}x{W}, CUDA graph: unfolded {t['torch_us']:.1f} us | folded "
          f"{t['rfsr_us']:.1f} us (rel. L2 {t['rel_l2']:.1e})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON file to write (default: print only)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    import rfsr_cuda  # noqa: F401
    rows: list = []
    print(torch.cuda.get_device_name(), torch.__version__)
    layer_norm_rows(rows)
    depthwise_rows(rows)
    merge_rows(rows)
    partition_rows(rows)
    stream_rows(rows)
    if a.out:
        res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
               "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "dtype": "bfloat16",
               "timing": "best of 5 runs of 200 back-to-back calls between CUDA events, us per call", "rows": rows}
        tmp = a.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.out)  # atomic
        print("wrote", a.out)


if __name__ == "__main__":
    main()
