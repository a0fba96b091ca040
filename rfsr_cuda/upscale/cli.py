"""The upscaler's command line (``examples/upscale.py``, ``python -m rfsr_cuda.upscale``).

Exit status: 0 when every input was written (or skipped as existing), 1 when some input failed (the others are still
processed), 2 for a usage problem (no weights, an input that does not exist, a scale the weights do not have).
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

from ..image_io import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from . import upscale_image_file
from .files import (OUTPUT_EXTENSIONS, collect_inputs, default_output_dir, is_video_file, output_extension,
                    output_path_for, same_file)
from .model import DEFAULT_PRESET, bundled_weights_name, find_bundled_weights, load_model, model_scale, \
    resolve_device
from .tiling import PRECISIONS, Upscaler, is_oom
from .video import VideoError, upscale_video

PROG = "upscale.py"


def _tile_arg(text: str):
    if text.lower() == "auto":
        return "auto"
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or a number of pixels, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError("must be >= 0 (0: no tiling)")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Super-resolve images and videos with an SST model. Writes {name}_{suffix}.{ext} for every "
                    "input (default suffix x{scale}). Options follow Real-ESRGAN's inference script where it has "
                    "them; dashes and underscores are both accepted (--tile-pad / --tile_pad).",
        epilog="Exit status: 0 all written, 1 some inputs failed (the rest are still processed), 2 usage error "
               "(e.g. no weights).",
    )
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="image or video files, folders (hidden and OS-metadata files are skipped, any other "
                        "non-image file is reported as an error) or glob patterns")
    p.add_argument("-i", "--input", dest="more_inputs", action="append", default=[], metavar="INPUT",
                   help="another input (repeatable), as Real-ESRGAN's -i")
    p.add_argument("-o", "--output", default=None,
                   help="output folder (created if needed); for a single input file, a path with an image "
                        "extension names the output file itself. Default: beside the input — a file's own "
                        "folder, or for a folder F the sibling folder F_x{S}")
    p.add_argument("--scale", type=int, default=None,
                   help="the network's upscaling factor: selects the bundled weights; with --weights it must "
                        "match them. Default: the factor of --weights; without --weights, 4")
    p.add_argument("-s", "--outscale", type=float, default=None,
                   help="final upscaling factor (float): the network output is resized (Lanczos, as Real-ESRGAN) to "
                        "this factor of the input size. Default: the network's scale")
    p.add_argument("-w", "--weights", "--model_path", "--model-path", dest="weights", default=None,
                   help=f"an rfsr .safetensors file (e.g. the EMA export of examples/train.py) or official SST "
                        f".pth weights (with --preset). Default: the bundled {DEFAULT_PRESET} weights for --scale, "
                        f"when this install ships them")
    p.add_argument("--preset", default=None,
                   help="only for official SST .pth weights, which do not record their window sizes: the preset "
                        "they were trained as (e.g. sst_light, sst_light_plus)")
    p.add_argument("--suffix", default=None, help="output name suffix (default x{scale}; '' keeps the name)")
    p.add_argument("--ext", default="auto", choices=("auto",) + OUTPUT_EXTENSIONS + ("jpeg", "tiff"),
                   help="output image format; auto keeps the input's when it is one of these, else png "
                        "(alpha is never written as jpg, nor 16-bit as jpg/webp: those become png)")
    p.add_argument("--quality", type=int, default=95, help="JPEG/WebP quality 1-100 (WebP 100: lossless)")
    p.add_argument("-r", "--recursive", action="store_true",
                   help="also process sub-folders of folder inputs, mirroring their layout in the output folder")
    ex = p.add_mutually_exclusive_group()
    ex.add_argument("--skip-existing", "--skip_existing", dest="skip_existing", action="store_true",
                    help="leave inputs whose output already exists alone")
    ex.add_argument("--overwrite", dest="skip_existing", action="store_false",
                    help="replace existing outputs (the default; an input is never overwritten)")
    p.add_argument("-t", "--tile", type=_tile_arg, default="auto",
                   help="tile size in input pixels, rounded up to a multiple of the model's largest window and to at "
                        "least twice the overlap (so at least 128 for the SST presets); all tiles of an image have "
                        "this one shape, and an image that fits in one tile runs whole. 0 = whole image; auto "
                        "(default) = the least wasteful size that fits free GPU memory (at most 256 on CPU). Out of "
                        "memory halves it and redoes the tile")
    p.add_argument("--tile-pad", "--tile_pad", "--tile-overlap", "--tile_overlap", dest="tile_pad", type=int,
                   default=None,
                   help="overlap of neighbouring tiles in input pixels, blended smoothly (rounded up to a multiple "
                        "of the largest window; default that window, at least 32)")
    p.add_argument("--max-memory", "--max_memory", dest="max_memory", type=float, default=None,
                   help="with --tile auto: GiB of GPU memory the tiles may use (default: half the free memory)")
    p.add_argument("--tile-batch", "--tile_batch", dest="tile_batch", type=int, default=None,
                   help="tiles per forward pass (default 4 on CUDA, 1 on CPU)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on CUDA GPUs that have it, fp32 on CPU; fp16 outputs are checked for NaN/Inf "
                        "and such tiles redone in fp32")
    p.add_argument("--fp32", dest="precision", action="store_const", const="fp32", help="same as --precision fp32")
    p.add_argument("--autocast", dest="prepared", action="store_false", default=None,
                   help="in bf16/fp16 on CUDA, run the float32 model under autocast instead of its prepared bf16/fp16 "
                        "copy (about 2x slower; keeps a float32 residual stream)")
    p.add_argument("--device", default="auto",
                   help="auto (cuda when available, else cpu), cpu, cuda or cuda:N")
    p.add_argument("-g", "--gpu-id", "--gpu_id", dest="gpu_id", type=int, default=None,
                   help="which GPU (with --device auto/cuda)")
    p.add_argument("--alpha", "--alpha-upsampler", "--alpha_upsampler", dest="alpha", default="model",
                   choices=("model", "realesrgan", "bicubic"),
                   help="how alpha is upscaled: through the network as a grey image (model, default) or bicubic")
    p.add_argument("-x", "--tta", action="store_true", help="8-way self-ensemble (rotations/flips): 8× slower")
    p.add_argument("--no-metadata", "--no_metadata", dest="keep_metadata", action="store_false",
                   help="do not copy EXIF and ICC profile to the outputs")
    p.add_argument("--max-pixels", "--max_pixels", dest="max_pixels", type=float,
                   default=DEFAULT_MAX_PIXELS / 1e6,
                   help="refuse inputs larger than this many megapixels (decompression bombs; default %(default)g)")
    p.add_argument("--crf", type=int, default=18, help="video quality (x264 CRF; lower = better, default 18)")
    p.add_argument("--no-audio", "--no_audio", dest="keep_audio", action="store_false",
                   help="do not copy audio/subtitles into output videos")
    p.add_argument("--progress", action="store_true",
                   help="show the progress bar even when stderr is not a terminal")
    p.add_argument("--report-memory", "--report_memory", dest="report_memory", action="store_true",
                   help="print peak GPU memory and peak host memory (RSS) at the end")
    p.add_argument("-q", "--quiet", action="store_true", help="print errors only")
    return p


class _Progress:
    """Images bar (with a tiles or frames bar below it) on a terminal; plain per-file lines otherwise."""

    def __init__(self, n_inputs: int, enabled: bool, quiet: bool):
        self.bars = enabled and not quiet
        self.quiet = quiet
        self.files = self.tiles = None
        if self.bars:
            from tqdm import tqdm
            self._tqdm = tqdm
            self.files = tqdm(total=n_inputs, unit="file", desc="files", position=0, dynamic_ncols=True)

    def start(self, name: str, total: Optional[int], unit: str):
        if self.bars:
            if self.tiles is not None:
                self.tiles.close()
            self.files.set_postfix_str(name, refresh=True)
            self.tiles = self._tqdm(total=total, unit=unit, desc=f"  {unit}s", position=1, leave=False,
                                    dynamic_ncols=True)

    def tick(self, n: int = 1):
        if self.tiles is not None:
            self.tiles.update(n)

    def set_total(self, done: int, total: Optional[int]):
        if self.tiles is not None:
            if total and self.tiles.total != total:
                self.tiles.total = total
            self.tiles.n = done
            self.tiles.refresh()

    def done(self, line: Optional[str]):
        if self.bars:
            self.files.update(1)
            if line:
                self.files.write(line, file=sys.stderr)
        elif line and not self.quiet:
            print(line)

    def error(self, line: str):
        if self.bars:
            self.files.write(line, file=sys.stderr)
            self.files.update(1)
        else:
            print(line, file=sys.stderr)

    def close(self):
        for b in (self.tiles, self.files):
            if b is not None:
                b.close()


def _norm(p) -> str:
    return os.path.normcase(os.path.abspath(p))


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)

    def err(msg: str) -> None:
        print(f"{PROG}: error: {msg}", file=sys.stderr)

    specs = list(args.inputs) + list(args.more_inputs)
    if not specs:
        parser.print_usage(sys.stderr)
        err("no input given")
        return 2
    inputs, missing = collect_inputs(specs, recursive=args.recursive)
    if missing:
        err(", ".join(missing) + (": no such file or folder" if len(missing) == 1 else ": no such files or folders"))
        return 2
    if args.output is not None:  # an output folder inside a scanned folder: never take earlier outputs as inputs
        out_root = Path(args.output).resolve()
        inputs = [it for it in inputs if it.root is None or out_root not in it.path.resolve().parents]
    if not inputs:
        err(f"{', '.join(specs)}: no files to process")
        return 2
    if args.quality < 1 or args.quality > 100:
        err("--quality must be 1..100")
        return 2
    if args.outscale is not None and args.outscale <= 0:
        err("--outscale must be > 0")
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
        device = resolve_device(args.device, args.gpu_id)
        model = load_model(weights, device, preset=args.preset)
    except (RuntimeError, ValueError, OSError, KeyError, TypeError) as e:
        err(f"cannot load weights {weights}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
        return 2
    scale = model_scale(model)
    if args.scale is not None and args.scale != scale:
        err(f"the weights are a x{scale} model but --scale {args.scale} was asked for")
        return 2
    if not args.quiet:
        source = f"bundled {bundled_weights_name(scale)}" if args.weights is None else str(weights)
        cfg = model.config
        print(f"weights: {source} (SST dim {cfg.dim}, {cfg.n_blocks} blocks, x{scale}) on {device}")
    try:
        upscaler = Upscaler(model, device=device, tile=args.tile, overlap=args.tile_pad, precision=args.precision,
                            tile_batch=args.tile_batch, tta=args.tta, max_memory_gib=args.max_memory,
                            prepared=args.prepared,
                            alpha="model" if args.alpha == "realesrgan" else args.alpha)
    except (ValueError, TypeError) as e:
        err(str(e))
        return 2

    # where outputs go
    single_target = None
    out_ext_req = args.ext
    if args.output is not None and len(inputs) == 1 and len(specs) == 1 and Path(specs[0]).is_file():
        suffix = Path(args.output).suffix.lower()
        if suffix and (suffix.lstrip(".") in OUTPUT_EXTENSIONS + ("jpeg", "tiff")
                       or (is_video_file(inputs[0].path) and is_video_file(args.output))):
            single_target = Path(args.output)

    def out_dir_for(item) -> Path:
        if args.output is not None:
            return Path(args.output)
        if item.root is not None:  # found under a folder / glob
            if item.root.is_dir() and any(Path(s).is_dir() and same_file(s, item.root) for s in specs):
                return default_output_dir(item.root, scale)
            return item.root
        return item.path.parent

    max_pixels = int(args.max_pixels * 1e6) if args.max_pixels and args.max_pixels > 0 else None
    show_bars = args.progress or sys.stderr.isatty()
    prog = _Progress(len(inputs), show_bars, args.quiet)
    upscaler.on_tile = lambda n: prog.tick(n)
    written = skipped = failed = 0
    t_start = time.perf_counter()
    dests = set()
    input_keys = {_norm(item.path) for item in inputs}
    try:
        for item in inputs:
            src = item.path
            t0 = time.perf_counter()
            video = is_video_file(src)
            try:
                if video:
                    dst = single_target or output_path_for(src, out_dir_for(item), scale, suffix=args.suffix,
                                                           ext=src.suffix.lstrip(".").lower(), root=item.root)
                    pixels = info = note = None
                else:
                    pixels, info = read_image(src, max_pixels=max_pixels)
                    if single_target is not None:
                        dst, note = single_target, None
                    else:
                        ext, note = output_extension(out_ext_req, src, info)
                        dst = output_path_for(src, out_dir_for(item), scale, suffix=args.suffix, ext=ext,
                                              root=item.root)
                if same_file(dst, src) or _norm(dst) in input_keys:
                    raise ValueError(f"the output {dst} would overwrite an input: use --suffix or -o")
                if str(dst) in dests:
                    raise ValueError(f"the output {dst} was already written from another input")
                dests.add(str(dst))
                if args.skip_existing and dst.exists():
                    skipped += 1
                    prog.done(None if args.quiet else f"{src}: {dst} exists, skipped")
                    continue
                dst.parent.mkdir(parents=True, exist_ok=True)
                if video:
                    prog.start(src.name, None, "frame")
                    res = upscale_video(upscaler, src, dst, outscale=args.outscale, crf=args.crf,
                                        keep_audio=args.keep_audio, on_frame=lambda d, t: prog.set_total(d, t))
                    note = res.get("note")
                    extra = f"{res['frames']} frames"
                else:
                    prog.start(src.name, upscaler.tiles_for(pixels.shape), "tile")
                    upscale_image_file(upscaler, src, dst, outscale=args.outscale, quality=args.quality,
                                       keep_metadata=args.keep_metadata, info=info, pixels=pixels)
                    del pixels
                    extra = f"{info.bits}-bit"
            except (ImageReadError, VideoError) as e:
                failed += 1
                prog.error(f"{PROG}: error: {src}: {e}")
                continue
            except Exception as e:  # out of memory, an unwritable folder, …: report, go on with the next input
                if not isinstance(e, (RuntimeError, OSError, ValueError)):
                    raise
                failed += 1
                hint = " (try a smaller --tile)" if is_oom(e) else ""
                prog.error(f"{PROG}: error: {src}: {_one_line(e)}{hint}")
                continue
            written += 1
            line = f"{src} -> {dst} ({extra}, {time.perf_counter() - t0:.2f} s)" + (f"; {note}" if note else "")
            prog.done(None if args.quiet else line)
    except KeyboardInterrupt:
        prog.close()
        err("interrupted")
        return 130
    prog.close()

    elapsed = time.perf_counter() - t_start
    st = upscaler.stats
    dest = single_target or (Path(args.output) if args.output else None)
    summary = (f"{written} of {len(inputs)} file(s) written" + (f" to {dest}" if dest else "")
               + (f", {skipped} skipped" if skipped else "") + (f", {failed} failed" if failed else "")
               + f" in {elapsed:.1f} s" + (f"; {st.oom_retries} out-of-memory retries (tile now "
                                           f"{upscaler.tile_size()})" if st.oom_retries else "")
               + (f"; {st.fp32_redos} tile(s) redone in fp32" if st.fp32_redos else ""))
    if not args.quiet or failed:
        print(summary, file=sys.stderr if failed else sys.stdout)
    if args.report_memory:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        gpu = (f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**20:.0f} MiB allocated, "
               f"{torch.cuda.max_memory_reserved(device) / 2**20:.0f} MiB reserved; "
               if device.type == "cuda" else "")
        print(f"memory: {gpu}peak host RSS {rss:.0f} MiB; tile limit {upscaler.tile_size()}, "
              f"overlap {upscaler.overlap}, {st.tiles} tile(s) in {st.forwards} forward(s), precision {str(upscaler.dtype).split('.')[-1]}")
    return 1 if failed else 0
