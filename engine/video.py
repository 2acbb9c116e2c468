"""Frames in and out of MP4 files (H.264 via PyAV), and the frames' identity hash.

Determinism: libx264 gives the same bytes for the same frames, settings and
libraries only when its threading is fixed and its macroblock-tree rate
control is off (with it on, the bytes also depend on the process's state),
so the encoder runs with one thread, a fixed thread type and mbtree=0, and
both the muxer and the encoder run "bitexact" (no library version string,
no creation time). Frames are
compared across machines by `frames_sha256` (the uint8 frames before
encoding), file bytes only on the same setup.

Colour: RGB is converted to limited-range yuv420p with the BT.709 matrix
(what players assume for HD video) and the stream is tagged BT.709, so
players and `read_mp4` invert exactly that conversion.
"""
import hashlib
import os
from fractions import Fraction

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace

CODEC = "libx264"
PIXEL_FORMAT = "yuv420p"
PRESET = "medium"
# x264's macroblock-tree rate control makes the bitstream depend on the process's state, not only
# on the frames: with it, the same frames gave other bytes in a second process, or after the
# Engine had rendered in another thread (tests/test_video.py). Without it the bytes are fixed.
X264_PARAMS = "mbtree=0"
# ITU-T H.273 code point 1 = BT.709, for colour primaries, transfer and matrix alike.
BT709 = 1


class VideoError(ValueError):
    """An MP4 file that cannot be read back whole (truncated, corrupt, not a video)."""


def _check_frames(frames: np.ndarray | torch.Tensor) -> np.ndarray:
    """The frames as a C-contiguous uint8 numpy array [F, H, W, 3], or ValueError."""
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu().numpy()
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8:
        raise ValueError(f"frames must be a uint8 array, got {type(frames).__name__} {getattr(frames, 'dtype', '')}")
    if frames.ndim != 4 or frames.shape[3] != 3 or 0 in frames.shape:
        raise ValueError(f"frames must have shape [F, H, W, 3] with F, H, W >= 1, got {list(frames.shape)}")
    return np.ascontiguousarray(frames)


def frames_sha256(frames: np.ndarray | torch.Tensor) -> str:
    """sha256 hex of the uint8 frames [F, H, W, 3], the shape folded in ("F,H,W,3;" then the bytes)."""
    frames = _check_frames(frames)
    digest = hashlib.sha256(",".join(str(n) for n in frames.shape).encode("ascii") + b";")
    digest.update(memoryview(frames).cast("B"))
    return digest.hexdigest()


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """A decoded video [3, F, H, W] in [-1, 1] as uint8 frames [F, H, W, 3].

    The mapping is diffusers' `VideoProcessor.postprocess_video`: clamp(x * 0.5 + 0.5, 0, 1),
    then round(x * 255) in float32, ties to even (so 0 -> 127.5 -> 128). Computed on the
    video's device; only the uint8 result moves to the CPU.
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"video must have shape [3, F, H, W], got {list(video.shape)}")
    x = video.detach().float()
    if not bool(torch.isfinite(x).all()):
        raise ValueError("video contains NaN or infinite values")
    x = (x * 0.5 + 0.5).clamp(0, 1)
    x = (x * 255).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


def write_mp4(frames: np.ndarray | torch.Tensor, path: str | os.PathLike, fps: int, crf: int = 18) -> None:
    """Encode uint8 frames [F, H, W, 3] (H and W even) to an H.264 yuv420p MP4 at `path`.

    Written in place: the caller writes to a temporary name and renames.
    """
    frames = _check_frames(frames)
    _, height, width, _ = frames.shape
    if height % 2 or width % 2:
        raise ValueError(f"yuv420p needs an even width and height, got {width}x{height}")
    if isinstance(fps, bool) or not isinstance(fps, int) or fps < 1:
        raise ValueError(f"fps must be an integer >= 1, got {fps!r}")
    if isinstance(crf, bool) or not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf must be an integer in 0..51, got {crf!r}")

    with av.open(os.fspath(path), mode="w", format="mp4", options={"fflags": "+bitexact"}) as container:
        stream = container.add_stream(CODEC, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, PIXEL_FORMAT
        codec = stream.codec_context
        codec.thread_count = 1
        codec.thread_type = "SLICE"
        codec.flags |= av.codec.context.Flags.bitexact
        codec.color_range = ColorRange.MPEG
        codec.colorspace = codec.color_primaries = codec.color_trc = BT709
        stream.options = {"preset": PRESET, "crf": str(crf), "x264-params": X264_PARAMS}

        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                format=PIXEL_FORMAT, dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG, threads=1
            )
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def _open(path: str | os.PathLike):
    try:
        container = av.open(os.fspath(path), mode="r")
    except FileNotFoundError:
        raise
    except av.FFmpegError as err:
        raise VideoError(f"{path}: not a readable MP4 ({err})") from err
    if not container.streams.video:
        container.close()
        raise VideoError(f"{path}: has no video stream")
    return container


def probe_mp4(path: str | os.PathLike) -> dict:
    """{frames, width, height, fps, codec} from the container's index, without decoding."""
    with _open(path) as container:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.base_rate or Fraction(0)
        return {
            "frames": stream.frames,
            "width": stream.codec_context.width,
            "height": stream.codec_context.height,
            "fps": float(rate),
            "codec": stream.codec_context.name,
        }


def read_mp4(path: str | os.PathLike) -> np.ndarray:
    """Decode every frame as uint8 RGB [F, H, W, 3]; VideoError if the file is not whole."""
    with _open(path) as container:
        stream = container.streams.video[0]
        try:
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        except av.FFmpegError as err:
            raise VideoError(f"{path}: corrupt video data ({err})") from err
        if not frames or (stream.frames and len(frames) != stream.frames):
            raise VideoError(f"{path}: truncated: the index lists {stream.frames} frames, {len(frames)} decoded")
        return np.stack(frames)
