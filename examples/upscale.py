"""Upscale an image, or every image in a folder, with an SST model.

    python examples/upscale.py photo.jpg --scale 4 --weights sst_light_x4.safetensors
    python examples/upscale.py photos/ --weights sst_light_x2.safetensors -o upscaled/

Exit status: 0 when every input was written, 1 when some input failed (the others are still processed),
2 for a usage problem (no weights, missing input, a scale the weights do not have).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rfsr_cuda.upscale import (DEFAULT_PRESET, ImageReadError, bundled_weights_name, default_output_dir,
                               find_bundled_weights, list_inputs, load_model, model_scale, output_path_for,
                               resolve_device, upscale_file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="upscale.py",
        description="Super-resolve images with an SST model. Writes {name}_x{S}.png for every input.",
        epilog="Exit status: 0 all written, 1 some inputs failed, 2 usage error (e.g. no weights).",
    )
    p.add_argument("input", help="an image file, or a folder whose files are all processed (not recursive; "
                                 "hidden files are skipped, any other non-image file is reported as an error)")
    p.add_argument("-s", "--scale", type=int, default=None,
                   help="upscaling factor. Default: the factor of --weights; without --weights, 4. With --weights "
                        "it must match the weights")
    p.add_argument("-w", "--weights", default=None,
                   help=f"an rfsr .safetensors file (e.g. the EMA export of examples/train.py). Default: the "
                        f"bundled {DEFAULT_PRESET} weights for --scale, when this install ships them")
    p.add_argument("--preset", default=None,
                   help="only for official SST .pth weights, which do not record their window sizes: the preset "
                        "they were trained as (e.g. sst_light, sst_light_plus)")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (created if needed); for a single input file, a path ending in .png names "
                        "the output file itself. Default: beside the input — a file's own folder, or for a folder "
                        "F the sibling folder F_x{S}")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="where the model runs (default: cuda when available, else cpu)")
    p.add_argument("--fp32", action="store_true", help="run in float32 on CUDA (default there: bf16 autocast)")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    err = lambda msg: print(f"upscale.py: error: {msg}", file=sys.stderr)  # noqa: E731

    src = Path(args.input)
    if not src.exists():
        err(f"{src}: no such file or folder")
        return 2

    if args.weights is None:
        scale = args.scale if args.scale is not None else 4
        weights = find_bundled_weights(scale)
        if weights is None:
            err(f"no weights given and this install bundles no {bundled_weights_name(scale)}: pass --weights PATH "
                f"(an rfsr .safetensors file for x{scale}, e.g. the *.safetensors that examples/train.py writes)")
            return 2
    else:
        weights = Path(args.weights)
        if not weights.is_file():
            err(f"--weights {weights}: no such file")
            return 2

    try:
        device = resolve_device(args.device)
        model = load_model(weights, device, preset=args.preset)
    except (RuntimeError, ValueError, OSError, KeyError) as e:
        err(f"cannot load weights {weights}: {e}")
        return 2
    scale = model_scale(model)
    if args.scale is not None and args.scale != scale:
        err(f"the weights are a x{scale} model but --scale {args.scale} was asked for")
        return 2

    inputs = list_inputs(src)
    if not inputs:
        err(f"{src}: the folder has no files")
        return 2
    single_target = None
    if args.output is not None and src.is_file() and args.output.lower().endswith(".png"):
        single_target = Path(args.output)
    out_dir = Path(args.output) if args.output is not None else default_output_dir(src, scale)

    failed = 0
    for path in inputs:
        dst = single_target or output_path_for(path, out_dir, scale)
        t0 = time.perf_counter()
        try:
            upscale_file(model, path, dst, amp=not args.fp32)
        except ImageReadError as e:
            err(f"{path}: {e}")
            failed += 1
            continue
        except (RuntimeError, OSError, ValueError) as e:  # e.g. out of memory, an unwritable output folder
            err(f"{path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            failed += 1
            continue
        if not args.quiet:
            print(f"{path} -> {dst} ({time.perf_counter() - t0:.2f} s)")
    if not args.quiet or failed:
        print(f"{len(inputs) - failed} of {len(inputs)} image(s) written to "
              f"{single_target or out_dir}" + (f", {failed} failed" if failed else ""),
              file=sys.stderr if failed else sys.stdout)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
