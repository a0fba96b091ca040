"""Video in and out through the ffmpeg binary of ``imageio-ffmpeg``: frames are decoded, upscaled and encoded one at
a time (never the whole video in memory); audio and subtitle streams are copied where the container takes them."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

__all__ = ["VideoError", "probe_video", "upscale_video"]

PathLike = Union[str, os.PathLike]


class VideoError(Exception):
    """A video that could not be read or written; the message is one line."""


def _ffmpeg():
    try:
        import imageio_ffmpeg
    except ImportError:
        raise VideoError("video needs the imageio-ffmpeg package (pip install imageio-ffmpeg)") from None
    return imageio_ffmpeg


def _one_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[-1] if lines else type(e).__name__


def probe_video(path: PathLike) -> dict:
    """imageio-ffmpeg's metadata of a video (fps, size, duration, nframes, codec, audio_codec when there is audio)."""
    iio = _ffmpeg()
    try:
        gen = iio.read_frames(str(path), pix_fmt="rgb24")
        meta = next(gen)
        gen.close()
    except (RuntimeError, OSError, StopIteration, ValueError) as e:
        raise VideoError(f"cannot read video: {_one_line(e)}") from None
    return meta


def _codec_args(ext: str, crf: int, w: int, h: int):
    if ext == ".webm":
        return "libvpx-vp9", "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p", \
            ["-crf", str(crf + 12), "-b:v", "0", "-row-mt", "1"]
    # 4:2:0 needs even sides; odd sizes (e.g. ×3 of an odd size) keep full chroma
    pix = "yuv420p" if w % 2 == 0 and h % 2 == 0 else "yuv444p"
    return "libx264", pix, ["-crf", str(crf), "-preset", "medium"]


def _mux_streams(exe: str, video_only: Path, src: Path, dst_tmp: Path) -> Optional[str]:
    """Copy the audio (and subtitles) of ``src`` next to the new video stream; returns a note when some could
    not be kept."""
    tries = [
        (["-map", "0:v:0", "-map", "1:a?", "-map", "1:s?", "-c", "copy"], None),
        (["-map", "0:v:0", "-map", "1:a?", "-c", "copy"], "subtitles dropped (the container does not take them)"),
        (["-map", "0:v:0", "-map", "1:a?", "-c:v", "copy", "-c:a", "aac"], "audio re-encoded to AAC"),
    ]
    for args, note in tries:
        proc = subprocess.run([exe, "-y", "-v", "error", "-i", str(video_only), "-i", str(src), *args,
                               str(dst_tmp)], capture_output=True)
        if proc.returncode == 0:
            return note
    os.replace(video_only, dst_tmp)
    return "audio could not be kept"


def upscale_video(upscaler, src: PathLike, dst: PathLike, *, outscale: Optional[float] = None, crf: int = 18,
                  keep_audio: bool = True, on_frame: Optional[Callable[[int, Optional[int]], None]] = None) -> dict:
    """Upscale every frame of ``src`` with ``upscaler`` (an :class:`~rfsr_cuda.upscale.Upscaler`) into ``dst``
    (H.264 for mp4/mkv/mov/…, VP9 for webm) at the same frame rate, one frame at a time, atomically (temporary
    file + rename). ``on_frame(done, total)`` reports progress (total may be None). Returns a summary dict
    (frames, fps, size, note)."""
    iio = _ffmpeg()
    src, dst = Path(src), Path(dst)
    exe = iio.get_ffmpeg_exe()
    tag = f".tmp{os.getpid()}"
    video_only = dst.with_name(f".{dst.stem}{tag}.video{dst.suffix}")
    dst_tmp = dst.with_name(f".{dst.stem}{tag}{dst.suffix}")
    reader = writer = None
    frames = 0
    try:
        try:
            reader = iio.read_frames(str(src), pix_fmt="rgb24")
            meta = next(reader)
        except (RuntimeError, OSError, StopIteration, ValueError) as e:
            raise VideoError(f"cannot read video: {_one_line(e)}") from None
        w, h = meta["size"]
        fps = float(meta.get("fps") or 25.0)
        n = meta.get("nframes")
        total = int(n) if isinstance(n, (int, float)) and np.isfinite(n) and n > 0 else None
        for raw in _frames(reader):
            frame = np.frombuffer(raw, dtype=np.uint8).reshape(h, w, 3)
            out = upscaler.upscale_array(frame, outscale=outscale)
            if writer is None:
                oh, ow = out.shape[:2]
                codec, pix, params = _codec_args(dst.suffix.lower(), crf, ow, oh)
                writer = iio.write_frames(str(video_only), (ow, oh), fps=fps, codec=codec, pix_fmt_in="rgb24",
                                          pix_fmt_out=pix, quality=None, macro_block_size=1,
                                          output_params=params, ffmpeg_log_level="error")
                writer.send(None)
            writer.send(np.ascontiguousarray(out))
            frames += 1
            if on_frame is not None:
                on_frame(frames, total)
        if writer is None:
            raise VideoError("the video has no frames")
        writer.close()
        writer = None
        note = None
        if keep_audio and meta.get("audio_codec"):
            note = _mux_streams(exe, video_only, src, dst_tmp)
        else:
            os.replace(video_only, dst_tmp)
        os.replace(dst_tmp, dst)
        return dict(frames=frames, fps=fps, size=(ow, oh), note=note)
    except VideoError:
        raise
    except (RuntimeError, OSError, BrokenPipeError) as e:
        if "out of memory" in str(e):
            raise
        raise VideoError(f"video failed after {frames} frame(s): {_one_line(e)}") from None
    finally:
        for g in (reader, writer):
            if g is not None:
                try:
                    g.close()
                except Exception:
                    pass
        for p in (video_only, dst_tmp):
            if p.exists():
                p.unlink()


def _frames(reader):
    try:
        yield from reader
    except (RuntimeError, OSError) as e:
        raise VideoError(f"cannot decode video: {_one_line(e)}") from None
