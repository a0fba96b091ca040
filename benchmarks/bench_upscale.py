"""Time and peak memory of the tiled upscaler on one synthetic image.

    python benchmarks/bench_upscale.py --size 960x540 --scale 4              # 960×540 -> 3840×2160, sst_light
    python benchmarks/bench_upscale.py --size 960x540 --tile 256 --precision bf16 --device cuda

Prints wall time, peak host RSS and (on CUDA) peak device memory allocated/reserved. The model is the named preset at
random init unless --weights is given (speed and memory do not depend on the weights).
"""
import argparse
import resource
import sys
import time

import numpy as np
import torch

from rfsr_cuda.models import create_model
from rfsr_cuda.upscale import Upscaler, load_model, resolve_device


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="960x540", help="input WxH")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--preset", default="sst_light")
    p.add_argument("--weights", default=None)
    p.add_argument("--tile", default="auto")
    p.add_argument("--tile-pad", type=int, default=None)
    p.add_argument("--tile-batch", type=int, default=None)
    p.add_argument("--max-memory", type=float, default=None, help="GiB for --tile auto on CUDA")
    p.add_argument("--precision", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    w, h = (int(v) for v in args.size.lower().split("x"))
    device = resolve_device(args.device)
    if args.weights:
        model = load_model(args.weights, device)
    else:
        torch.manual_seed(0)
        model = create_model(args.preset, upscaling_factor=args.scale).to(device).eval()
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:h, 0:w]
    img = (127 + 80 * np.sin(xx / 17.0)[..., None] * np.cos(yy / 23.0)[..., None]
           + rng.normal(0, 20, (h, w, 3))).clip(0, 255).astype(np.uint8)
    up = Upscaler(model, device=device, tile=args.tile, overlap=args.tile_pad, precision=args.precision,
                  tile_batch=args.tile_batch, max_memory_gib=args.max_memory)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    out = up.upscale_array(img)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{args.preset} x{up.scale} {w}x{h} -> {out.shape[1]}x{out.shape[0]} on {device} "
          f"({torch.get_num_threads()} threads)" if device.type == "cpu" else
          f"{args.preset} x{up.scale} {w}x{h} -> {out.shape[1]}x{out.shape[0]} on {torch.cuda.get_device_name(device)}")
    th, tw, ov = up.tile_dims(h, w)
    print(f"tiles {th}x{tw} (limit {up.tile_size()}) overlap {ov} batch {up.tile_batch} precision "
          f"{str(up.dtype).split('.')[-1]}: {up.stats.tiles} tiles in {up.stats.forwards} forwards, "
          f"{up.stats.oom_retries} OOM retries")
    print(f"time {dt:.1f} s ({w * h / dt / 1e3:.1f} kpx/s input); peak host RSS {rss:.0f} MiB "
          f"(before the run {rss0:.0f} MiB)")
    if device.type == "cuda":
        print(f"peak device memory: {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
              f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved")
    return 0


if __name__ == "__main__":
    sys.exit(main())
