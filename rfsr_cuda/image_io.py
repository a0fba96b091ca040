"""Reading and writing images for training and inference, with atomic writes.

Two levels:

* ``read_rgb`` / ``load_image`` (training, metrics): an RGB array or float tensor; alpha is dropped.
* ``read_image`` / ``write_image`` (the upscaler): the pixels as they are in the file — (H, W, C) uint8 or uint16 with
  C = 1 (grey), 2 (grey + alpha), 3 (RGB) or 4 (RGBA) — plus an :class:`ImageInfo` carrying the EXIF block and ICC
  profile, so that an output can keep the input's bit depth, channels and metadata.

Pillow decodes almost everything. Its images cannot hold 16-bit colour, so 16-bit colour TIFFs are read with
``tifffile`` and 16-bit colour PNGs through the ``ffmpeg`` binary of ``imageio-ffmpeg`` (both optional: without them
such files are reduced to 8 bits, with a warning). 16-bit PNGs are written by a small encoder here, 16-bit TIFFs by
``tifffile``. Every write goes to a temporary file in the destination folder followed by ``os.replace``, so a reader
never sees a half-written file.
"""
from __future__ import annotations

import os
import struct
import subprocess
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Tuple, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "DEFAULT_MAX_PIXELS",
    "ImageReadError",
    "ImageInfo",
    "is_image_file",
    "read_rgb",
    "read_image",
    "load_image",
    "write_image",
    "save_png",
    "atomic_write",
    "format_for_extension",
]

PathLike = Union[str, os.PathLike]

# extensions looked for when a folder is scanned for training/validation images
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".tga"})
# inputs larger than this (in pixels) are refused before decoding: a decompression bomb, or more than an upscaler
# should hold in memory (the ×4 float output of a 64 MP input is 3 GB)
DEFAULT_MAX_PIXELS = 64_000_000

_EXT_FORMAT = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".tif": "TIFF", ".tiff": "TIFF",
               ".bmp": "BMP", ".tga": "TGA", ".ppm": "PPM", ".pgm": "PPM"}
_ORIENTATION = 0x0112


class ImageReadError(Exception):
    """A file that could not be read as an image; the message is one line, without the path."""


@dataclass(frozen=True)
class ImageInfo:
    mode: str  # Pillow mode of the file ("RGB", "RGBA", "L", "I;16", "P", ...; "RGB;16" for 16-bit colour)
    bits: int  # 8 or 16
    grayscale: bool
    has_alpha: bool
    format: str = ""  # Pillow format name of the file ("PNG", "JPEG", ...)
    exif: Optional[bytes] = None  # EXIF block, orientation already applied to the pixels (tag removed)
    icc_profile: Optional[bytes] = None  # only for profiles that still describe the decoded pixels (RGB / grey)


def is_image_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def format_for_extension(ext: str) -> str:
    """Pillow format name for a file extension (``.png`` -> ``PNG``); ValueError for unknown ones."""
    try:
        return _EXT_FORMAT[ext.lower() if ext.startswith(".") else "." + ext.lower()]
    except KeyError:
        raise ValueError(f"unsupported image extension {ext!r}; expected one of {sorted(_EXT_FORMAT)}") from None


# ----------------------------------------------------------------------------------------------------- reading
def _open(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Image.Image:
    try:
        if os.path.getsize(path) == 0:
            raise ImageReadError("empty file (0 bytes)")
    except FileNotFoundError:
        raise ImageReadError("no such file") from None
    except OSError:
        pass
    try:
        im = Image.open(path)
        w, h = im.size
        if w <= 0 or h <= 0:
            raise ImageReadError(f"zero-size image ({w}×{h})")
        if max_pixels is not None and w * h > max_pixels:
            raise ImageReadError(f"too large: {w}×{h} = {w * h / 1e6:.1f} MP exceeds the limit of "
                                 f"{max_pixels / 1e6:g} MP (a decompression bomb, or raise the limit)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im.load()  # decode now, so truncated/corrupt data fails here
    except ImageReadError:
        raise
    except UnidentifiedImageError:
        raise ImageReadError("not an image, or a format Pillow cannot read") from None
    except Image.DecompressionBombError as e:
        raise ImageReadError(f"too large to decode safely ({e})") from None
    except FileNotFoundError:
        raise ImageReadError("no such file") from None
    except IsADirectoryError:
        raise ImageReadError("is a folder") from None
    except (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error) as e:
        raise ImageReadError(f"cannot decode image: {str(e).splitlines()[0] if str(e) else type(e).__name__}") \
            from None
    try:
        orientation = int(im.getexif().get(_ORIENTATION, 1))
    except Exception:
        orientation = 1
    try:
        out = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block should not lose the picture
        out, orientation = im, 1
    out.format = im.format
    bps = getattr(im, "tag_v2", {}).get(258, (8,)) if im.format == "TIFF" else (8,)
    out.rfsr_tiff_bits = max(bps) if isinstance(bps, tuple) and bps else int(bps or 8)
    out.rfsr_orientation = orientation  # for arrays decoded by another library (16-bit colour)
    return out


def read_rgb(path: PathLike) -> Tuple[np.ndarray, ImageInfo]:
    """An (H, W, 3) RGB array, uint16 for 16-bit greyscale files and uint8 otherwise, and what the file held."""
    im = _open(path)
    mode = im.mode
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.ndim != 2:
            raise ImageReadError(f"unsupported image layout {arr.shape} for mode {mode}")
        arr = np.clip(arr.astype(np.int64), 0, 65535).astype(np.uint16)
        return np.repeat(arr[..., None], 3, axis=2), ImageInfo(mode, 16, True, False, im.format or "")
    grayscale = mode in ("1", "L", "LA", "La") or (mode == "P" and _palette_is_gray(im))
    try:
        rgb = np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        raise ImageReadError(f"cannot convert mode {mode} to RGB: {e}") from None
    return np.ascontiguousarray(rgb), ImageInfo(mode, 8, grayscale, has_alpha, im.format or "")


def _palette_is_gray(im: Image.Image) -> bool:
    pal = im.getpalette()
    if not pal:
        return False
    p = np.asarray(pal).reshape(-1, 3)
    return bool(np.all(p[:, 0] == p[:, 1]) and np.all(p[:, 1] == p[:, 2]))


def _exif_bytes(im: Image.Image) -> Optional[bytes]:
    try:
        exif = im.getexif()
        if _ORIENTATION in exif:
            del exif[_ORIENTATION]  # the pixels are already upright
        return exif.tobytes() if len(exif) else None
    except Exception:
        return None


def _png_ihdr(path: PathLike) -> Optional[Tuple[int, int]]:
    """(bit depth, colour type) of a PNG file, or None."""
    try:
        with open(path, "rb") as f:
            head = f.read(29)
    except OSError:
        return None
    if len(head) < 29 or head[:8] != b"\x89PNG\r\n\x1a\n" or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def _ffmpeg_exe() -> Optional[str]:
    try:
        import imageio_ffmpeg
        return imageio_ffmpeg.get_ffmpeg_exe()
    except Exception:
        return None


def _read_png16_color(path: PathLike, w: int, h: int, alpha: bool) -> Optional[np.ndarray]:
    exe = _ffmpeg_exe()
    if exe is None:
        return None
    pix = "rgba64le" if alpha else "rgb48le"
    proc = subprocess.run([exe, "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo", "-pix_fmt", pix,
                           "-"], capture_output=True)
    c = 4 if alpha else 3
    if proc.returncode != 0 or len(proc.stdout) != h * w * c * 2:
        raise ImageReadError("cannot decode 16-bit PNG: " + (proc.stderr.decode(errors="replace").strip()
                                                             .splitlines() or ["truncated"])[-1])
    return np.frombuffer(proc.stdout, dtype="<u2").reshape(h, w, c).copy()


def _read_tiff16(path: PathLike) -> Optional[np.ndarray]:
    try:
        import tifffile
    except ImportError:
        return None
    try:
        arr = tifffile.imread(path, key=0)
    except Exception as e:
        raise ImageReadError(f"cannot decode 16-bit TIFF: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if arr.dtype != np.uint16:
        return None
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):  # planar
        arr = np.moveaxis(arr, 0, 2)
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr) if arr.ndim == 3 and arr.shape[2] in (1, 2, 3, 4) else None


def read_image(path: PathLike, *, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS) -> Tuple[np.ndarray, ImageInfo]:
    """The file's pixels as (H, W, C) uint8 or uint16, C in {1: grey, 2: grey+alpha, 3: RGB, 4: RGBA}, upright
    (EXIF orientation applied), and its :class:`ImageInfo` (with EXIF and ICC profile). Raises
    :class:`ImageReadError` with a one-line reason for anything that is not a readable image of at most
    ``max_pixels`` pixels."""
    im = _open(path, max_pixels)
    mode, fmt = im.mode, (im.format or "")
    exif = _exif_bytes(im)
    icc = im.info.get("icc_profile") or None
    if mode in ("CMYK", "LAB", "HSV", "YCbCr"):
        icc = None  # the profile describes the file's colour space, not the RGB we hand out
    info = dict(mode=mode, format=fmt, exif=exif, icc_profile=icc)

    # 16-bit colour, which Pillow silently reduces to 8 bits
    if fmt == "PNG" and mode in ("RGB", "RGBA", "LA"):
        ihdr = _png_ihdr(path)
        if ihdr is not None and ihdr[0] == 16:
            w, h = (im.height, im.width) if getattr(im, "rfsr_orientation", 1) in (5, 6, 7, 8) else im.size
            arr = _read_png16_color(path, w, h, alpha=mode != "RGB")
            if arr is None:
                warnings.warn("16-bit colour PNG read as 8 bits (install imageio-ffmpeg to keep 16 bits)")
            else:
                arr = _reorient(arr, im)
                if mode == "LA":
                    arr = arr[..., [0, 3]]
                return arr, ImageInfo(bits=16, grayscale=mode == "LA", has_alpha=mode != "RGB", **info)
    if fmt == "TIFF" and mode in ("RGB", "RGBA", "RGBX", "LA"):
        if getattr(im, "rfsr_tiff_bits", 8) == 16:
            arr = _read_tiff16(path)
            if arr is None:
                warnings.warn("16-bit colour TIFF read as 8 bits (install tifffile to keep 16 bits)")
            else:
                arr = _reorient(arr, im)
                c = arr.shape[2]
                return arr, ImageInfo(bits=16, grayscale=c <= 2, has_alpha=c in (2, 4), **info)

    if mode.startswith("I;16") or mode in ("I", "F"):
        a = np.asarray(im)
        if a.ndim != 2:
            raise ImageReadError(f"unsupported image layout {a.shape} for mode {mode}")
        if mode == "F":
            a = np.nan_to_num(a.astype(np.float64), nan=0.0).clip(0, 1) * 65535.0 + 0.5
        a = np.clip(a.astype(np.int64), 0, 65535).astype(np.uint16)
        return a[..., None], ImageInfo(bits=16, grayscale=True, has_alpha=False, **info)

    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or (mode == "P" and "transparency" in im.info)
    gray = mode in ("1", "L", "LA", "La") or (mode in ("P", "PA") and _palette_is_gray(im))
    target = ("LA" if has_alpha else "L") if gray else ("RGBA" if has_alpha else "RGB")
    try:
        arr = np.asarray(im.convert(target))
    except (OSError, ValueError) as e:
        raise ImageReadError(f"cannot convert mode {mode} to {target}: {e}") from None
    if arr.ndim == 2:
        arr = arr[..., None]
    return np.ascontiguousarray(arr), ImageInfo(bits=8, grayscale=gray, has_alpha=has_alpha, **info)


def _reorient(arr: np.ndarray, im: Image.Image) -> np.ndarray:
    """Apply the EXIF orientation (that exif_transpose applied to ``im``) to an array read by another decoder."""
    o = getattr(im, "rfsr_orientation", 1)
    ops = {2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: np.swapaxes(a, 0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}
    return np.ascontiguousarray(ops[o](arr)) if o in ops else arr


def load_image(path: PathLike) -> Tuple[torch.Tensor, ImageInfo]:
    """A float32 (3, H, W) tensor in [0, 1] and the file's :class:`ImageInfo`; raises :class:`ImageReadError`."""
    rgb, info = read_rgb(path)
    peak = 65535.0 if rgb.dtype == np.uint16 else 255.0
    t = torch.from_numpy(rgb.astype(np.float32) / np.float32(peak)).permute(2, 0, 1).contiguous()
    return t, info


# ----------------------------------------------------------------------------------------------------- writing
def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, flush it to disk, then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")  # keeps the extension
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_png(img: torch.Tensor, path: PathLike, *, grayscale: bool = False) -> None:
    """Write a float image (3, H, W) or (1, H, W) in [0, 1] as an 8-bit PNG, atomically.

    Values are clamped and rounded; ``grayscale`` stores an RGB image as one luma channel (Pillow's ITU-R 601 "L").
    """
    if img.dim() == 4 and img.shape[0] == 1:
        img = img[0]
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"expected an image (3, H, W) or (1, H, W), got shape {tuple(img.shape)}")
    arr = (img.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).cpu().permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0], "L") if arr.shape[2] == 1 else Image.fromarray(arr, "RGB")
    if grayscale and pil.mode == "RGB":
        pil = pil.convert("L")
    atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _encode_png16(arr: np.ndarray, icc: Optional[bytes], exif: Optional[bytes], level: int = 6) -> bytes:
    """A 16-bit PNG of (H, W, C) uint16, C in 1..4, every row "Up"-filtered; iCCP and eXIf chunks when given."""
    h, w, c = arr.shape
    color_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    raw = np.ascontiguousarray(arr.astype(">u2")).reshape(h, w * c).view(np.uint8)
    up = raw.copy()
    up[1:] -= raw[:-1]  # uint8 wraps modulo 256, as the Up filter wants
    rows = np.empty((h, 1 + up.shape[1]), np.uint8)
    rows[:, 0] = 2
    rows[:, 1:] = up
    out = [b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, color_type, 0, 0, 0))]
    if icc:
        out.append(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
    if exif:
        out.append(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
    out.append(_png_chunk(b"IDAT", zlib.compress(rows.tobytes(), level)))
    out.append(_png_chunk(b"IEND", b""))
    return b"".join(out)


def _write_tiff16(tmp: Path, arr: np.ndarray, icc: Optional[bytes]) -> None:
    import tifffile

    c = arr.shape[2]
    kw = dict(photometric="minisblack" if c <= 2 else "rgb")
    if c in (2, 4):
        kw["extrasamples"] = ("unassalpha",)
    if icc:
        kw["extratags"] = [(34675, "B", len(icc), icc, True)]
    data = arr[..., 0] if c == 1 else arr
    try:
        tifffile.imwrite(tmp, data, compression="zlib", **kw)
    except Exception:  # no zlib codec in this tifffile: uncompressed
        tifffile.imwrite(tmp, data, **kw)


def write_image(arr: np.ndarray, path: PathLike, *, fmt: Optional[str] = None, quality: int = 95,
                exif: Optional[bytes] = None, icc_profile: Optional[bytes] = None) -> None:
    """Write (H, W, C) uint8/uint16 pixels (C = 1, 2, 3, 4 as :func:`read_image` gives them) atomically.

    ``fmt`` (default: from the extension) is one of PNG, JPEG, WEBP, TIFF, BMP, TGA, PPM. uint16 stays 16-bit in
    PNG and TIFF and is reduced to 8 bits elsewhere; alpha is dropped by formats without it (JPEG, PPM).
    ``quality`` is the JPEG/WebP quality (WebP is lossless at 100). EXIF and ICC are written where the format has
    room for them.
    """
    path = Path(path)
    fmt = (fmt or format_for_extension(path.suffix)).upper()
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or arr.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"expected (H, W, C) uint8/uint16 pixels with C in 1..4, got {arr.shape} {arr.dtype}")
    if arr.dtype == np.uint16 and fmt == "PNG":
        data = _encode_png16(arr, icc_profile, exif)
        return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
    if arr.dtype == np.uint16 and fmt == "TIFF":
        try:
            import tifffile  # noqa: F401
        except ImportError:
            warnings.warn("tifffile is not installed: writing an 8-bit TIFF")
        else:
            return atomic_write(path, lambda tmp: _write_tiff16(Path(tmp), arr, icc_profile))
    if arr.dtype == np.uint16:
        arr = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    if fmt in ("JPEG", "PPM") and arr.shape[2] in (2, 4):
        arr = arr[..., :-1]
    c = arr.shape[2]
    pil = Image.fromarray(arr[..., 0] if c == 1 else arr, {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c])
    kw = {}
    if icc_profile and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        kw["icc_profile"] = icc_profile
    if exif and fmt in ("PNG", "JPEG", "WEBP", "TIFF"):
        kw["exif"] = exif
    if fmt == "JPEG":
        kw.update(quality=int(quality), subsampling=0 if quality >= 90 else 2, optimize=True)
    elif fmt == "WEBP":
        kw.update(quality=int(quality), lossless=quality >= 100, method=4)
    elif fmt == "TIFF":
        kw["compression"] = "tiff_deflate"
    elif fmt == "PNG":
        kw["compress_level"] = 6
    atomic_write(path, lambda tmp: pil.save(tmp, format=fmt, **kw))


def with_info(info: ImageInfo, **changes) -> ImageInfo:
    return replace(info, **changes)
