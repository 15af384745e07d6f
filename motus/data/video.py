"""The tier's frame codecs, through PyAV only (no OpenCV, no torchvision, no ffmpeg binary).

Two codecs for a view's frames (uint8 [T, H, W, 3]):

* ``mp4``: H.264 (``libx264``, else ``libopenh264``) in an MP4 container, falling back to MPEG-4 part 2
  (``mpeg4``) when the bundled FFmpeg has no H.264 encoder. yuv420p, BT.601, encoded in memory. Lossy:
  a smooth clip round-trips at well over 30 dB PSNR at the default ``crf=18``.
* ``npz``: lossless compressed numpy (a deflated ``.npz`` holding ``frames.npy``), for exactness.

Both encoders are deterministic: the same frames give the same bytes, so a tier rebuilt from the same
episodes hashes the same. For mp4 (x264) that takes a fixed encoder thread count (``X264_THREADS``; frame
threading changes the bitstream), and, on CPUs with AVX-512, pinning x264 to its AVX2 code path (its
AVX-512 lookahead reads uninitialised memory and made identical input encode differently from run to run;
the AVX2 and SSE paths give identical bytes). The MP4 header carries no creation time. Across CPU
architectures (x86 vs ARM) the bytes may still differ; the decoded content is equivalent. The npz member
carries a fixed zip timestamp.

Odd frame sizes: yuv420p subsamples chroma 2x2, so H.264/MPEG-4 need even H and W. ``encode_mp4`` pads an
odd height/width by one row/column of edge replication and records the true size in the container's
``comment`` tag (``motus:frame_size=HxW``); ``decode_mp4`` reads that tag and crops back, so the round trip
keeps the shape. Other decoders simply see the one-pixel-larger padded frames.

Decoding errors (corrupt, truncated, not a video) raise ``VideoDecodeError`` (a ``ValueError``) naming
the input; a path that does not exist raises ``FileNotFoundError``.
"""

from __future__ import annotations

import io
import math
import os
import platform
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np

try:
    import av
except ModuleNotFoundError:  # a bare GPU node runs npz tiers without PyAV; mp4 then fails naming what is missing
    class _NoPyAV:
        def __getattr__(self, name: str):
            raise ModuleNotFoundError("mp4 video needs PyAV (`pip install av`); npz tiers (data.codec: npz) do not")

    av = _NoPyAV()

__all__ = [
    "VideoDecodeError", "DecodedVideo", "encode_mp4", "decode_mp4", "read_video", "encode_frames",
    "decode_frames", "decode_image", "mp4_encoder", "psnr",
]

Codec = Literal["mp4", "npz"]
VideoSource = bytes | bytearray | memoryview | str | os.PathLike
_SIZE_TAG = "motus:frame_size="
_NPZ_MEMBER = "frames.npy"
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class VideoDecodeError(ValueError):
    """Frames that cannot be decoded: corrupt, truncated or not a video/image at all."""


@dataclass
class DecodedVideo:
    frames: np.ndarray  # [T, H, W, 3] uint8
    times: np.ndarray  # [T] float64 presentation time of each frame in seconds
    fps: float  # the stream's average frame rate (0.0 when the container does not say)


# ------------------------------------------------------------------------------------------------ encode


@lru_cache(maxsize=1)
def mp4_encoder() -> str:
    """The video encoder ``encode_mp4`` uses: an H.264 encoder when FFmpeg has one, else ``mpeg4``."""
    for name in ("libx264", "libopenh264"):
        if name in av.codecs_available:
            try:
                av.Codec(name, "w")
            except Exception:  # noqa: BLE001 - listed but not usable as an encoder
                continue
            return name
    return "mpeg4"


# x264 CPU flags of an AVX2 machine. x264's AVX-512 code path (taken automatically where the CPU has it)
# reads uninitialised memory in its macroblock-tree lookahead, so the same frames encode to different bytes
# from run to run there (measured: most frame widths that are not a multiple of 128 px). Pinning the AVX2
# set is byte-identical to what SSE4.2/AVX2 machines produce, and only applied where AVX-512 is present.
_X264_AVX2_FLAGS = "MMX2,SSE,SSE2,SSE2Fast,LZCNT,SSE3,SSSE3,SSE4,SSE4.2,AVX,FMA3,BMI1,BMI2,AVX2,Cache64"
# x264's output depends on its thread count (frame threading), so it is fixed, not left to the core count.
X264_THREADS = 2


@lru_cache(maxsize=1)
def _x264_asm_override() -> str | None:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return _X264_AVX2_FLAGS if "avx512f" in flags and "avx2" in flags else None


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray):
        raise ValueError(f"frames must be a numpy array, got {type(frames).__name__}")
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"cannot encode an empty clip {frames.shape}")
    return frames


def _encoder_options(codec: str, crf: int, width: int, height: int, fps: Fraction) -> tuple[dict[str, str], int]:
    """Codec options and bit rate (0 = let the options decide) that approximate x264's ``crf``."""
    if codec == "libx264":
        options = {"crf": str(int(crf)), "preset": "medium", "threads": str(X264_THREADS)}
        asm = _x264_asm_override()
        if asm:
            options["x264-params"] = f"asm={asm}"
        return options, 0
    if codec == "mpeg4":  # constant quantiser: crf 18 -> q 3, 23 -> 4, 28 -> 5, 51 -> 8
        q = int(min(31, max(2, round(crf / 6))))
        return {"flags": "+qscale", "global_quality": str(q * 118), "threads": "1"}, 0  # 118 = FF_QP2LAMBDA
    # No constant-quality mode (libopenh264, ...): a bit budget per pixel that halves every 6 crf steps.
    bits_per_pixel = 0.3 * 2.0 ** ((18 - crf) / 6)
    return {"threads": "1"}, max(100_000, int(width * height * float(fps) * bits_per_pixel))


def encode_mp4(frames: np.ndarray, fps: float, crf: int = 18, *, codec: str | None = None) -> bytes:
    """Encode uint8 [T, H, W, 3] RGB frames into MP4 bytes (in memory).

    ``crf`` is x264's constant rate factor (0 = lossless-ish .. 51 = worst); for other encoders it is mapped
    onto their quality knob. ``codec`` overrides the encoder (default: ``mp4_encoder()``). Odd H/W are
    padded by edge replication and cropped back by ``decode_mp4`` (see the module docstring).
    """
    frames = _check_frames(frames)
    if not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise ValueError(f"fps must be a positive number, got {fps!r}")
    if not 0 <= int(crf) <= 51:
        raise ValueError(f"crf must be in [0, 51], got {crf}")
    t, h, w, _ = frames.shape
    ph, pw = h % 2, w % 2
    if ph or pw:
        frames = np.pad(frames, ((0, 0), (0, ph), (0, pw), (0, 0)), mode="edge")
    codec = codec or mp4_encoder()
    rate = Fraction(fps).limit_denominator(1001)
    options, bit_rate = _encoder_options(codec, crf, w + pw, h + ph, rate)

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        if ph or pw:
            container.metadata["comment"] = f"{_SIZE_TAG}{h}x{w}"
        stream = container.add_stream(codec, rate=rate)
        stream.width, stream.height, stream.pix_fmt = w + pw, h + ph, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        if bit_rate:
            stream.bit_rate = bit_rate
        stream.options = options
        for i in range(t):
            # yuv420p conversion done here, explicitly (BT.601, limited range), not left to encode().
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame = frame.reformat(format="yuv420p")
            frame.pts = i  # in the codec time base, 1/rate
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------ decode


def _describe(src: VideoSource) -> str:
    if isinstance(src, (bytes, bytearray, memoryview)):
        return f"<{len(src)} bytes of video>"
    return str(src)


def _open(src: VideoSource):
    if isinstance(src, (bytes, bytearray, memoryview)):
        target: object = io.BytesIO(bytes(src))
    else:
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such video file")
        target = str(path)
    try:
        return av.open(target, "r")
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"{_describe(src)}: not a readable video container ({e})") from e


def _stored_size(container) -> tuple[int, int] | None:
    comment = str(container.metadata.get("comment", ""))
    if not comment.startswith(_SIZE_TAG):
        return None
    try:
        h, w = (int(v) for v in comment[len(_SIZE_TAG):].split("x"))
    except ValueError:
        return None
    return h, w


def read_video(src: VideoSource, *, start_s: float | None = None, end_s: float | None = None,
               max_frames: int | None = None, size: tuple[int, int] | None = None) -> DecodedVideo:
    """Decode a video (MP4 bytes or a path to any container FFmpeg reads) to RGB frames and their times.

    ``start_s``/``end_s`` keep only frames whose presentation time lies in [start_s, end_s) (seeking to the
    key frame before ``start_s``, so a window of a long file costs only that window). ``max_frames`` stops
    after that many frames. ``size=(height, width)`` resizes every frame through FFmpeg's scaler (area
    filter), so no OpenCV/torchvision is needed. A full decode that yields fewer frames than the container
    header announces is reported as truncated.
    """
    if size is not None and (len(size) != 2 or min(size) <= 0):
        raise ValueError(f"size must be (height, width) > 0, got {size!r}")
    name = _describe(src)
    container = _open(src)
    try:
        if not container.streams.video:
            raise VideoDecodeError(f"{name}: no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        fps = float(stream.average_rate or stream.guessed_rate or 0.0)
        time_base = stream.time_base
        crop = _stored_size(container)
        windowed = start_s is not None or end_s is not None or max_frames is not None
        if start_s is not None and start_s > 0 and time_base:
            container.seek(int(start_s / time_base), stream=stream, backward=True, any_frame=False)

        frames: list[np.ndarray] = []
        times: list[float] = []
        index = 0
        try:
            for frame in container.decode(stream):
                t = float(frame.time) if frame.time is not None else (index / fps if fps else float(index))
                index += 1
                if start_s is not None and t < start_s:
                    continue
                if end_s is not None and t >= end_s:
                    break
                frames.append(_to_rgb(frame, crop, size))
                times.append(t)
                if max_frames is not None and len(frames) >= max_frames:
                    break
        except av.error.FFmpegError as e:
            raise VideoDecodeError(f"{name}: corrupt video data after {len(frames)} frame(s) ({e})") from e

        declared = int(stream.frames or 0)
        if not windowed:
            if not frames:
                raise VideoDecodeError(f"{name}: the video stream holds no decodable frames")
            if declared and len(frames) < declared:
                raise VideoDecodeError(f"{name}: truncated or corrupt, decoded {len(frames)} of the "
                                       f"{declared} frames its header announces")
    finally:
        container.close()

    if frames:
        out = np.stack(frames)
    else:
        h, w = size if size is not None else (crop or (0, 0))
        out = np.zeros((0, h, w, 3), np.uint8)
    order = np.argsort(np.asarray(times), kind="stable")  # decoders emit presentation order; be sure
    if len(order) and (order != np.arange(len(order))).any():
        out, times = out[order], [times[i] for i in order]
    return DecodedVideo(frames=out, times=np.asarray(times, dtype=np.float64), fps=fps)


def _to_rgb(frame, crop: tuple[int, int] | None, size: tuple[int, int] | None) -> np.ndarray:
    if crop is None or (frame.height, frame.width) == crop:
        if size is None:
            return frame.to_ndarray(format="rgb24")
        return frame.to_ndarray(format="rgb24", height=size[0], width=size[1], interpolation="AREA")
    arr = np.ascontiguousarray(frame.to_ndarray(format="rgb24")[: crop[0], : crop[1]])
    if size is None:
        return arr
    return av.VideoFrame.from_ndarray(arr, format="rgb24").to_ndarray(
        format="rgb24", height=size[0], width=size[1], interpolation="AREA")


def decode_mp4(data: VideoSource, *, max_frames: int | None = None,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """MP4 bytes or a video path -> uint8 [T, H, W, 3] RGB; ``VideoDecodeError`` on corrupt/truncated input."""
    return read_video(data, max_frames=max_frames, size=size).frames


def decode_image(data: bytes) -> np.ndarray:
    """One encoded still image (PNG or JPEG; others through Pillow when installed) -> uint8 [H, W, 3]."""
    data = bytes(data)
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        codec = "png"
    elif data.startswith(b"\xff\xd8"):
        codec = "mjpeg"
    else:
        try:
            from PIL import Image
        except ImportError as e:
            raise VideoDecodeError(f"unrecognised image encoding (first bytes {data[:8]!r})") from e
        try:
            with Image.open(io.BytesIO(data)) as im:
                return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()
        except Exception as e:  # noqa: BLE001 - Pillow raises many types
            raise VideoDecodeError(f"undecodable image ({e})") from e
    ctx = av.CodecContext.create(codec, "r")
    try:
        decoded = list(ctx.decode(av.Packet(data))) + list(ctx.decode(None))
    except av.error.FFmpegError as e:
        raise VideoDecodeError(f"undecodable {codec} image of {len(data)} bytes ({e})") from e
    if not decoded:
        raise VideoDecodeError(f"undecodable {codec} image of {len(data)} bytes (no picture)")
    return decoded[0].to_ndarray(format="rgb24")


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio in dB between two uint8 arrays of one shape (inf when identical)."""
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch {a.shape} vs {b.shape}")
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10.0 * math.log10(255.0**2 / mse)


# ------------------------------------------------------------------------------------------- tier codecs


def _encode_npz(frames: np.ndarray) -> bytes:
    arr = io.BytesIO()
    np.lib.format.write_array(arr, np.ascontiguousarray(frames), allow_pickle=False)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        info = zipfile.ZipInfo(_NPZ_MEMBER, date_time=_ZIP_EPOCH)
        info.compress_type = zipfile.ZIP_DEFLATED
        info.external_attr = 0o644 << 16
        zf.writestr(info, arr.getvalue(), compresslevel=6)
    return buf.getvalue()


def _decode_npz(data: bytes) -> np.ndarray:
    try:
        with np.load(io.BytesIO(bytes(data)), allow_pickle=False) as npz:
            names: Sequence[str] = npz.files
            if not names:
                raise VideoDecodeError("npz frames: the archive is empty")
            frames = npz["frames"] if "frames" in names else npz[names[0]]
    except VideoDecodeError:
        raise
    except Exception as e:  # noqa: BLE001 - zipfile/numpy raise many types on corrupt input
        raise VideoDecodeError(f"npz frames: corrupt or truncated archive ({type(e).__name__}: {e})") from e
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise VideoDecodeError(f"npz frames: expected uint8 [T, H, W, 3], found {frames.dtype} {frames.shape}")
    return frames


def encode_frames(frames: np.ndarray, codec: Codec, fps: float, *, crf: int = 18) -> tuple[bytes, str]:
    """Encode one view's frames with the tier codec -> (bytes, extension without the dot)."""
    if codec == "mp4":
        return encode_mp4(frames, fps, crf), "mp4"
    if codec == "npz":
        return _encode_npz(_check_frames(frames)), "npz"
    raise ValueError(f"unknown frame codec {codec!r} (expected 'mp4' or 'npz')")


def decode_frames(data: bytes, ext: str) -> np.ndarray:
    """Inverse of ``encode_frames``: bytes + extension ('mp4' or 'npz', a leading dot allowed) -> frames."""
    ext = ext.lower().lstrip(".")
    if ext == "mp4":
        return decode_mp4(data)
    if ext == "npz":
        return _decode_npz(data)
    raise ValueError(f"unknown frame extension {ext!r} (expected 'mp4' or 'npz')")
