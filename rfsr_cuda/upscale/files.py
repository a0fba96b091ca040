"""Which files to upscale and where their outputs go: files, folders (optionally recursive), globs."""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from ..image_io import ImageInfo

__all__ = ["VIDEO_EXTENSIONS", "OUTPUT_EXTENSIONS", "InputFile", "collect_inputs", "list_inputs", "is_video_file",
           "output_path_for", "output_extension", "default_output_dir", "same_file"]

PathLike = Union[str, os.PathLike]
VIDEO_EXTENSIONS = frozenset({".mp4", ".mkv", ".mov", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv",
                              ".ts", ".m2ts"})
OUTPUT_EXTENSIONS = ("png", "jpg", "webp", "tif")
_EXT_ALIASES = {"jpeg": "jpg", "tiff": "tif"}
# files that folder scans skip silently (OS metadata, never images)
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", ".ds_store"})
_GLOB_CHARS = set("*?[")


@dataclass(frozen=True)
class InputFile:
    path: Path
    root: Optional[Path]  # the folder the path was found under (its sub-folders are mirrored), or None


def is_video_file(path: PathLike) -> bool:
    return Path(path).suffix.lower() in VIDEO_EXTENSIONS


def _skipped(name: str) -> bool:
    return name.startswith(".") or name.lower() in _JUNK_NAMES


def _scan(folder: Path, recursive: bool) -> List[Path]:
    if not recursive:
        return sorted(p for p in folder.iterdir() if p.is_file() and not _skipped(p.name))
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(Path(root) / f for f in files if not _skipped(f))
    return sorted(found)


def list_inputs(path: PathLike, recursive: bool = False) -> List[Path]:
    """A file -> [file]; a folder -> its regular files (sub-folders too with ``recursive``), sorted, without hidden
    and OS-metadata files. Every listed file is meant to be an image or video: one that is not is reported by the
    caller, not skipped."""
    path = Path(path)
    return _scan(path, recursive) if path.is_dir() else [path]


def _glob_root(pattern: str) -> Path:
    parts = Path(pattern).parts
    static = []
    for part in parts:
        if _GLOB_CHARS & set(part):
            break
        static.append(part)
    return Path(*static) if static else Path(".")


def collect_inputs(specs: Iterable[PathLike], recursive: bool = False) -> Tuple[List[InputFile], List[str]]:
    """Expand files, folders and glob patterns into input files, each with the folder whose layout its output
    mirrors. Returns (inputs without duplicates, specs that matched nothing)."""
    out, missing, seen = [], [], set()

    def add(p: Path, root: Optional[Path]):
        key = os.path.normcase(os.path.abspath(p))
        if key not in seen:
            seen.add(key)
            out.append(InputFile(p, root))

    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            for f in _scan(p, recursive):
                add(f, p)
        elif p.exists():
            add(p, None)
        elif _GLOB_CHARS & set(spec):
            root = _glob_root(spec)
            hits = sorted(glob.glob(spec, recursive=True))
            files = []
            for h in map(Path, hits):
                if h.is_dir():
                    files.extend(_scan(h, recursive))
                elif h.is_file() and not _skipped(h.name):
                    files.append(h)
            if not files:
                missing.append(spec)
            for f in files:
                add(f, root)
        else:
            missing.append(spec)
    return out, missing


def output_extension(requested: str, src: PathLike, info: Optional[ImageInfo] = None) -> Tuple[str, Optional[str]]:
    """The output extension for ``src`` (without dot) and a note when the request could not be honoured.

    ``auto`` keeps the input's format when it is png/jpg/webp/tif, else png. Alpha never goes to JPEG and 16-bit
    pixels never to JPEG/WebP: those become PNG."""
    requested = _EXT_ALIASES.get(requested.lower().lstrip("."), requested.lower().lstrip("."))
    if requested == "auto":
        ext = Path(src).suffix.lower().lstrip(".")
        ext = _EXT_ALIASES.get(ext, ext)
        ext = ext if ext in OUTPUT_EXTENSIONS else "png"
    elif requested in OUTPUT_EXTENSIONS:
        ext = requested
    else:
        raise ValueError(f"unsupported output extension {requested!r}; expected auto or one of {OUTPUT_EXTENSIONS}")
    note = None
    if info is not None:
        if info.has_alpha and ext == "jpg":
            ext, note = "png", "has alpha: written as PNG"
        elif info.bits == 16 and ext in ("jpg", "webp"):
            ext, note = "png", "is 16-bit: written as PNG"
    return ext, note


def output_path_for(src: PathLike, out_dir: PathLike, scale: Union[int, str] = 4, *, suffix: Optional[str] = None,
                    ext: str = "png", root: Optional[PathLike] = None) -> Path:
    """``{out_dir}/{relative folder}/{name}_{suffix}.{ext}`` for an input ``{name}.{x}``; ``suffix`` defaults to
    ``x{scale}``, an empty suffix keeps the name; the relative folder is the input's folder below ``root``."""
    src = Path(src)
    suffix = f"x{scale}" if suffix is None else suffix
    rel = Path()
    if root is not None:
        try:
            rel = src.parent.relative_to(root)
        except ValueError:
            rel = Path()
    name = f"{src.stem}_{suffix}" if suffix else src.stem
    return Path(out_dir) / rel / f"{name}.{ext.lstrip('.')}"


def default_output_dir(input_path: PathLike, scale: int) -> Path:
    """Beside the input: a file's own folder; for a folder ``F``, the sibling folder ``F_x{scale}``; for a glob, its
    fixed leading folder."""
    p = Path(input_path)
    if p.is_dir():
        p = p.resolve()
        return p.with_name(f"{p.name}_x{int(scale)}")
    if not p.exists() and _GLOB_CHARS & set(str(input_path)):
        return _glob_root(str(input_path))
    return p.parent


def same_file(a: PathLike, b: PathLike) -> bool:
    a, b = Path(a), Path(b)
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.normcase(os.path.abspath(a)) == os.path.normcase(os.path.abspath(b))
