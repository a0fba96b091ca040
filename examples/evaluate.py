"""PSNR-Y / SSIM-Y of an SST model against bicubic and Lanczos, on every image of a folder (BasicSR protocol).

    python examples/evaluate.py data/val --scale 4                         # the bundled sst_light x4 weights
    python examples/evaluate.py data/val --scale 2 --weights runs/light_x2/sst_light_x2.safetensors --md table.md

Each HR image is mod-cropped to the scale, its LR made by MATLAB-compatible bicubic down-sampling and stored at 8-bit
levels; outputs are rounded to 8 bits, and PSNR/SSIM are taken on the BT.601 Y channel with a border of `scale`
pixels cropped. The model runs on the whole LR image.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch
from PIL import Image

from rfsr_cuda.imresize import imresize
from rfsr_cuda.metrics import evaluate_image
from rfsr_cuda.train import load_validation_set, validate
from rfsr_cuda.upscale import find_bundled_weights, load_model

METHODS = ("bicubic", "lanczos", "model")


def lanczos_upscale(lr: torch.Tensor, scale: int) -> torch.Tensor:
    arr = (lr.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    up = Image.fromarray(arr).resize((arr.shape[1] * scale, arr.shape[0] * scale), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(up, dtype=np.float32) / 255.0).permute(2, 0, 1)


def evaluate(model, folder, scale: int, device: torch.device) -> dict:
    items = load_validation_set(folder, scale)
    rows = {name: {} for name, _, _ in items}
    for name, lr, hr in items:
        rows[name]["bicubic"] = evaluate_image(imresize(lr.double(), float(scale)).float().clamp(0, 1), hr, scale)
        rows[name]["lanczos"] = evaluate_image(lanczos_upscale(lr, scale), hr, scale)
    with torch.inference_mode():
        res = validate(model, items, scale, device, amp=device.type == "cuda")
    for name, m in res["per_image"].items():
        rows[name]["model"] = m
    mean = {meth: {k: float(np.mean([r[meth][k] for r in rows.values()])) for k in ("psnr", "ssim")}
            for meth in METHODS}
    return {"scale": scale, "images": rows, "mean": mean}


def markdown(result: dict, weights: str) -> str:
    s = result["scale"]
    lines = [f"x{s}, weights `{weights}` (PSNR-Y dB / SSIM-Y, crop {s})", "",
             "| image | bicubic | lanczos | model | model - bicubic |", "|---|---|---|---|---|"]
    for name, r in list(result["images"].items()) + [("**mean**", result["mean"])]:
        cells = [f"{r[m]['psnr']:.2f} / {r[m]['ssim']:.4f}" for m in METHODS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['model']['psnr'] - r['bicubic']['psnr']:+.2f} dB |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", help="folder of HR images")
    p.add_argument("--scale", type=int, required=True, choices=(2, 3, 4))
    p.add_argument("--weights", default=None, help="rfsr .safetensors (default: the bundled sst_light weights)")
    p.add_argument("--preset", default=None, help="only for official .pth weights: the preset they were trained as")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None, help="also write the full result as JSON here")
    p.add_argument("--md", default=None, help="also write the table as markdown here")
    args = p.parse_args(argv)
    weights = args.weights or find_bundled_weights(args.scale)
    if weights is None:
        print(f"no bundled weights for x{args.scale}; pass --weights", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    model = load_model(weights, device, preset=args.preset)
    if model.config.upscaling_factor != args.scale:
        print(f"the weights are x{model.config.upscaling_factor}, not x{args.scale}", file=sys.stderr)
        return 2
    label = args.weights or f"bundled sst_light_x{args.scale}"
    result = evaluate(model, args.folder, args.scale, device)
    table = markdown(result, label)
    print(table)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
