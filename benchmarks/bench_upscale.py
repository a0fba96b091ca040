"""Time and peak memory of the tiled upscaler on one synthetic image, one row per --tile setting, written as JSON.

    python benchmarks/bench_upscale.py --device cuda --size 960x540 --scale 4 --tile 256 auto   # 3840×2160 output
    python benchmarks/bench_upscale.py --device cpu --size 160x72 --scale 2 --tile 64 --n-blocks 1  # plumbing check

One row per (--tile, --route): ``default`` is what the Upscaler picks (on CUDA in bf16/fp16: the prepared copy of
the model, ``SST.prepare_inference``), ``prepared`` and ``autocast`` force one route. Per row: the tile plan (tile shape, overlap, tiles, forwards), the median wall time of --repeat timed runs after
--warmup untimed ones (default 1 on CUDA: the first run pays for cuDNN/cuBLAS set-up and the RIB factors), peak device
memory (torch.cuda.max_memory_allocated / max_memory_reserved over the timed runs, after empty_cache and
reset_peak_memory_stats: absolute, so it includes the weights) and the process's peak host RSS so far. The model is the
named preset at random init unless --weights is given (speed and memory do not depend on the weights). Writes
DIR/bench_upscale-<device-slug>-<date>.json (default DIR benchmarks/results; --out may name the .json file itself).
"""
import argparse
import datetime as _dt
import json
import os
import platform
import re
import resource
import statistics
import sys
import time

import numpy as np
import torch

from rfsr_cuda.models import create_model
from rfsr_cuda.upscale import Upscaler, load_model, resolve_device


def device_slug(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100'; 'cpu' on the CPU."""
    if device.type != "cuda":
        return device.type
    words = re.findall(r"[a-z0-9]+", torch.cuda.get_device_name(device).lower().replace("nvidia", ""))
    return words[0] if words else "cuda"


def synthetic_image(w: int, h: int) -> np.ndarray:
    """Smooth structure plus noise, uint8 (H, W, 3): the same picture on every machine."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    return (127 + 80 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None]
            + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _mib(n: float) -> float:
    return round(n / 2**20, 1)


ROUTES = {"default": None, "prepared": True, "autocast": False}


def run_row(model, img, device, args, tile, route="default") -> dict:
    h, w = img.shape[:2]
    up = Upscaler(model, device=device, tile=tile, overlap=args.tile_pad, precision=args.precision,
                  tile_batch=args.tile_batch, max_memory_gib=args.max_memory, prepared=ROUTES[route])
    if device.type == "cuda":  # auto sizes tiles from free memory: start every row from the same state
        torch.cuda.empty_cache()
    plan = up.plan(h, w)
    row = {"tile_request": tile, "tile": plan.tile, "tile_shape": list(plan.shape), "overlap": plan.overlap,
           "tiles": len(plan), "tile_batch": up.tile_batch, "precision": str(up.dtype).split(".")[-1],
           "route": route, "prepared": up.prepared}
    for _ in range(args.warmup):
        up.upscale_array(img)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    up.stats.forwards = up.stats.tiles = 0
    times, out = [], None
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = up.upscale_array(img)
        _sync(device)
        times.append(time.perf_counter() - t0)
    sec = statistics.median(times)
    row.update(output=f"{out.shape[1]}x{out.shape[0]}", seconds=round(sec, 4), seconds_all=[round(t, 4) for t in times],
               input_kpx_per_s=round(w * h / sec / 1e3, 2), forwards_per_run=up.stats.forwards // args.repeat,
               oom_retries=up.stats.oom_retries, tile_after_oom=up.tile_size() if up.stats.oom_retries else None,
               fp32_redos=up.stats.fp32_redos,
               peak_host_rss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1))
    if device.type == "cuda":
        row.update(peak_allocated_mib=_mib(torch.cuda.max_memory_allocated(device)),
                   peak_reserved_mib=_mib(torch.cuda.max_memory_reserved(device)))
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="960x540", help="input WxH (default 960x540)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--preset", default="sst_light")
    p.add_argument("--weights", default=None, help="a weights file instead of the preset at random init")
    p.add_argument("--n-blocks", type=int, default=None, help="fewer blocks than the preset (quick plumbing checks)")
    p.add_argument("--tile", nargs="+", default=["256", "auto"], help="one row per value: pixels, auto or 0")
    p.add_argument("--tile-pad", type=int, default=None)
    p.add_argument("--tile-batch", type=int, default=None)
    p.add_argument("--max-memory", type=float, default=None, help="GiB for --tile auto on CUDA")
    p.add_argument("--precision", default="auto")
    p.add_argument("--route", nargs="+", default=["default"], choices=sorted(ROUTES),
                   help="one row per value and tile: default (the Upscaler's choice), prepared or autocast")
    p.add_argument("--device", default="auto")
    p.add_argument("--warmup", type=int, default=None, help="untimed runs per row (default 1 on CUDA, 0 on CPU)")
    p.add_argument("--repeat", type=int, default=1, help="timed runs per row (the median is reported)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="output folder, or a .json file (default benchmarks/results)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    device = resolve_device(args.device)
    if args.warmup is None:
        args.warmup = 1 if device.type == "cuda" else 0
    args.repeat = max(1, args.repeat)
    tiles = [t if t.lower() == "auto" else int(t) for t in args.tile]
    if args.weights:
        model = load_model(args.weights, device)
        weights = os.path.basename(args.weights)
    else:
        torch.manual_seed(0)
        overrides = {"n_blocks": args.n_blocks} if args.n_blocks else {}
        model = create_model(args.preset, upscaling_factor=args.scale, **overrides).to(device).eval()
        weights = "random init"
    cfg = model.config
    if device.type == "cuda":
        dev_name = torch.cuda.get_device_name(device)
    else:
        dev_name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    now = _dt.datetime.now(_dt.timezone.utc)
    res = {"device": dev_name, "device_slug": device_slug(device), "torch": torch.__version__,
           "cuda": torch.version.cuda, "date": now.strftime("%Y-%m-%dT%H:%M:%SZ"), "preset": args.preset,
           "n_blocks": cfg.n_blocks, "scale": cfg.upscaling_factor, "weights": weights, "input": f"{w}x{h}",
           "warmup": args.warmup, "repeat": args.repeat,
           "timing": "median wall seconds of upscale_array (host uint8 in, host uint8 out) after the warm-up runs",
           "memory": "peak_allocated/reserved_mib: torch.cuda peaks over the timed runs (absolute: weights "
                     "included); peak_host_rss_mib: the process's peak RSS so far",
           "rows": []}
    out_path = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    if not out_path.endswith(".json"):
        out_path = os.path.join(out_path, f"bench_upscale-{res['device_slug']}-{now:%Y-%m-%d}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    print(f"{dev_name}  torch {torch.__version__}  {args.preset} x{cfg.upscaling_factor} ({weights})  "
          f"{w}x{h} -> {out_path}", flush=True)

    img = synthetic_image(w, h)
    failed = False
    for tile, route in [(t, r) for t in tiles for r in args.route]:
        try:
            row = run_row(model, img, device, args, tile, route)
        except Exception as e:  # an OOM that even the halving could not avoid: recorded, the other rows still run
            failed = True
            row = {"tile_request": tile, "route": route,
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}
        res["rows"].append(row)
        with open(out_path + ".tmp", "w") as f:  # rewritten after every row: a crash keeps the finished ones
            json.dump(res, f, indent=1)
        os.replace(out_path + ".tmp", out_path)
        mem = (f"; peak device memory {row['peak_allocated_mib']:.0f} MiB allocated, "
               f"{row['peak_reserved_mib']:.0f} MiB reserved" if "peak_allocated_mib" in row else "")
        print(json.dumps(row) if "error" in row else
              f"--tile {tile}: {row['tile_shape'][1]}x{row['tile_shape'][0]} tiles (overlap {row['overlap']}), "
              f"{row['tiles']} tile(s) in {row['forwards_per_run']} forward(s), {row['precision']} "
              f"({'prepared' if row['prepared'] else 'as given'}): "
              f"{row['seconds']:.2f} s -> {row['output']}{mem}; peak host RSS {row['peak_host_rss_mib']:.0f} MiB",
              flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
