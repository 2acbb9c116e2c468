"""VACE's conditioning inputs: the control video, its mask video and the reference images.

The rules are the official Wan2.1 ones (`wan/utils/vace_processor.py`,
`wan/vace.py` `WanVace.prepare_source`), which read videos with decord:

- frames are sampled by `VaceVideoProcessor._get_frameid_bbox_adjust_last`
  (`keep_last=True`): evenly over the whole video, first and last frame kept
  (`sample_frame_ids`);
- each video is resized with bicubic antialiased `F.interpolate` on its uint8
  frames to cover the output size and centre-cropped, then mapped to [-1, 1]
  (`VaceVideoProcessor.resize_crop`, here `resize_cover`);
- the mask is the mask video's first (red) channel, (x + 1) / 2 clamped to
  [0, 1]: white is "generate here", black is "keep the control video";
- a reference image of another size is fitted inside a white canvas with
  bilinear `F.interpolate` (`prepare_source`, here `place_reference`).

Videos are decoded with PyAV (FFmpeg, as decord is). As with decord, rotation
metadata is not applied and the frame rate is taken to be constant.
"""
import contextlib
from collections.abc import Iterator, Sequence

import av
import numpy as np
import torch
import torch.nn.functional as F

from engine.image import ImageError, _check_image, _check_size, read_image, to_unit_range
from jobs.inputs import InputError, find_input
from jobs.sources import first_line

# FFmpeg demuxers a video may be read with (MP4/MOV, MKV/WebM, AVI). Naming them keeps FFmpeg
# from opening anything else it can parse: a playlist demuxer (HLS, concat) would open the
# files or URLs the playlist names, and an image demuxer would pass a still image off as a video.
DEMUXERS = "mov,matroska,avi"
KINDS = "MP4, MOV, MKV, WebM or AVI"
# Decoded frames kept in memory at once, as width x height x frames: 2**29 pixels are 1.5 GiB of
# uint8 RGB, which a render worker holds beside its models. That is 580 frames at 1280x720 or
# 258 at 1920x1080, far past the 81 frames a VACE render samples from a video.
MAX_VIDEO_PIXELS = 2**29


class VideoInputError(InputError):
    """An input video that cannot be used: missing, not a video, no frames, corrupt, truncated, too large,
    or a mask video that does not match its control video."""


def _reason(exc: BaseException) -> str:
    """FFmpeg's own words for an error (PyAV appends a meaningless '<none>' file name), else its first line."""
    if isinstance(exc, av.FFmpegError) and exc.strerror:
        return exc.strerror
    return first_line(exc)


@contextlib.contextmanager
def _open_video(uri: str) -> Iterator[tuple[str, av.container.InputContainer, av.video.stream.VideoStream]]:
    """(name for messages, container, its first video stream) of the video at `uri`, or VideoInputError."""
    try:
        file = find_input(uri)
    except InputError as exc:
        raise VideoInputError(str(exc)) from None
    name = file.name
    try:
        data = file.fs.open_input_file(file.path)
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError subclasses
        raise VideoInputError(f"{name}: cannot read video ({first_line(exc)})") from None
    with data:
        try:
            container = av.open(data, mode="r", options={"format_whitelist": DEMUXERS})
        except (av.FFmpegError, OSError, ValueError) as exc:
            raise VideoInputError(f"{name}: not a readable {KINDS} video ({_reason(exc)})") from None
        with container:
            if not container.streams.video:
                raise VideoInputError(f"{name}: has no video stream")
            yield name, container, container.streams.video[0]


def probe_video(uri: str) -> tuple[int, int, int]:
    """(width, height, frames) of the video at `uri` (local path or pyarrow URI), read from the
    container without decoding a pixel: VideoInputError naming the file for a missing file, another
    format, no video stream, no frames or a corrupt header.

    The frame count is the stream header's (MP4, MOV); where the header has none (MKV, WebM)
    the packets are counted, which reads the file but decodes nothing. Data truncated behind
    an intact header is found when the video is read.
    """
    with _open_video(uri) as (name, container, stream):
        width, height = stream.codec_context.width, stream.codec_context.height
        if width < 1 or height < 1:
            raise VideoInputError(f"{name}: the video stream has no frame size")
        frames = stream.frames
        if frames < 1:
            try:
                frames = sum(1 for packet in container.demux(stream) if packet.size)
            except (av.FFmpegError, OSError, ValueError) as exc:
                raise VideoInputError(f"{name}: corrupt video data ({_reason(exc)})") from None
        if frames < 1:
            raise VideoInputError(f"{name}: the video stream has no frames")
    return width, height, frames


def _decode(uri: str, width: int, height: int, frames: int, keep: Sequence[int] | None = None) -> np.ndarray:
    """Frames `keep` (all when None) of a video that `probe_video` found to be `width` x `height`
    x `frames`, as uint8 RGB [len(keep), height, width, 3]. Every frame is decoded, so a file
    that does not hold the frames its header lists is a VideoInputError, whichever are kept."""
    wanted = range(frames) if keep is None else sorted(set(keep))
    pixels = len(wanted) * height * width
    if pixels > MAX_VIDEO_PIXELS:
        raise VideoInputError(f"{uri}: {len(wanted)} frames of {width}x{height} are {pixels} pixels, over the "
                              f"limit of {MAX_VIDEO_PIXELS} (MAX_VIDEO_PIXELS); use a shorter or smaller video")
    with _open_video(uri) as (name, container, stream):
        slot = {index: k for k, index in enumerate(wanted)}
        out = np.empty((len(wanted), height, width, 3), dtype=np.uint8)
        stream.thread_type = "AUTO"  # H.264 decoding gives the same pixels with any threading
        decoded = 0
        try:
            for frame in container.decode(stream):
                if decoded == frames:
                    raise VideoInputError(f"{name}: holds more frames than the {frames} its container lists")
                if (frame.width, frame.height) != (width, height):
                    raise VideoInputError(f"{name}: frame {decoded} is {frame.width}x{frame.height}, "
                                          f"but the stream is {width}x{height}")
                if decoded in slot:
                    # rgb24 with the frame's own YUV matrix (limited range unless tagged), as
                    # engine.video.read_mp4 converts, so write_mp4's BT.709 video reads back as written.
                    out[slot[decoded]] = frame.to_ndarray(format="rgb24")
                decoded += 1
        except VideoInputError:
            raise
        except (av.FFmpegError, OSError, ValueError) as exc:  # ValueError: pyarrow's errors reading the file
            raise VideoInputError(f"{name}: corrupt or truncated video data after {decoded} of "
                                  f"{frames} frames ({_reason(exc)})") from None
        if decoded < frames:
            raise VideoInputError(f"{name}: truncated: {decoded} of the {frames} frames its container lists decode")
    if keep is None:
        return out
    return out[[slot[index] for index in keep]]


def read_video(uri: str) -> np.ndarray:
    """Every frame of the video at `uri` (local path or pyarrow URI) as uint8 RGB [N, H, W, 3];
    VideoInputError naming the file if it cannot be read whole or is over MAX_VIDEO_PIXELS
    (checked from its header, before decoding)."""
    width, height, frames = probe_video(uri)
    return _decode(uri, width, height, frames)


def sample_frame_ids(available: int, wanted: int) -> list[int]:
    """Which of `available` frames make a video of `wanted` frames: official keep_last sampling.

    `_get_frameid_bbox_adjust_last` takes decord's (start, end) timestamps of each frame,
    the duration as the mean of the last frame's pair, `wanted` timestamps
    `np.linspace(0, duration, wanted)`, and for each the first frame with
    start <= t <= end. On a constant-rate video in frame units frame i spans [i, i + 1],
    so the duration is available - 0.5 and the first frame holding t is ceil(t) - 1
    (frame 0 for t = 0; at t = k both frames k - 1 and k hold it, and k - 1 comes first).
    A longer video is thinned evenly, a shorter one has frames repeated; the first and last
    frames are always used.

    The timestamps are float64 as the official code computes them (it pins numpy < 2,
    where linspace over a float32 duration is float64), so the rounding of a timestamp
    that falls on a frame boundary is theirs too. In seconds the comparison is the same
    for frame rates that are powers of two (16 fps, VACE's own), where dividing by the
    rate is exact; at other rates only such boundary cases can differ.
    """
    _check_size(available=available, wanted=wanted)
    timestamps = np.linspace(0.0, available - 0.5, wanted, dtype=np.float64)
    return np.clip(np.ceil(timestamps) - 1, 0, available - 1).astype(np.int64).tolist()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    if not isinstance(frames, np.ndarray) or frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[3] != 3:
        raise ValueError(
            f"frames must be a uint8 array [N, H, W, 3], got {type(frames).__name__} "
            f"{getattr(frames, 'dtype', '')} {list(getattr(frames, 'shape', []))}"
        )
    if 0 in frames.shape:
        raise ValueError(f"frames must not be empty, got shape {list(frames.shape)}")
    return frames if frames.flags.writeable else frames.copy()  # torch wants a writeable array


def resize_cover(frames: np.ndarray, height: int, width: int) -> torch.Tensor:
    """uint8 frames [N, H, W, 3] as float32 [3, N, height, width] in [-1, 1], official `resize_crop`.

    scale = max(width / W, height / H); bicubic antialiased `F.interpolate` of the uint8
    frames (so the result is rounded and clamped to uint8) to (round(scale * H),
    round(scale * W)), which covers the output; the centre cropped at
    x1 = (W' - width) // 2, y1 = (H' - height) // 2; then x / 127.5 - 1. Frames already
    at the output size are only mapped to [-1, 1].
    """
    frames = _check_frames(frames)
    _check_size(height=height, width=width)
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [N, 3, H, W]
    ih, iw = video.shape[2:]
    if (ih, iw) != (height, width):
        scale = max(width / iw, height / ih)
        video = F.interpolate(video, size=(round(scale * ih), round(scale * iw)), mode="bicubic", antialias=True)
        y1, x1 = (video.shape[2] - height) // 2, (video.shape[3] - width) // 2
        video = video[:, :, y1:y1 + height, x1:x1 + width]
    return video.transpose(0, 1).float().div(127.5).sub(1.0).contiguous()


def check_same_size(uri: str, probed: tuple[int, int, int], other_uri: str, other: tuple[int, int, int],
                    role: str = "control video") -> None:
    """VideoInputError naming both files unless two videos' `probe_video` (width, height, frames) agree:
    a mask video must have its control video's frame count and size."""
    if tuple(probed) != tuple(other):
        (w, h, n), (other_w, other_h, other_n) = probed, other
        raise VideoInputError(f"{uri}: {n} frames {w}x{h}, but its {role} {other_uri} has {other_n} frames "
                              f"{other_w}x{other_h}")


def read_control(video_uri: str, mask_uri: str | None, frames: int, height: int, width: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(control video [3, frames, height, width] in [-1, 1], mask [1, frames, height, width] in [0, 1]).

    Both videos are sampled with the same `sample_frame_ids` and resized with `resize_cover`.
    The mask is the mask video's red channel as the official `prepare_source` takes it,
    clamp((x + 1) / 2, 0, 1); without a mask video it is all ones (generate everywhere).
    A mask video must have its control video's frame count and size (VideoInputError naming both).
    """
    _check_size(frames=frames)
    _check_size(height=height, width=width)
    video_w, video_h, video_n = probe_video(video_uri)
    if mask_uri is not None:
        check_same_size(mask_uri, probe_video(mask_uri), video_uri, (video_w, video_h, video_n))
    ids = sample_frame_ids(video_n, frames)
    video = resize_cover(_decode(video_uri, video_w, video_h, video_n, ids), height, width)
    if mask_uri is None:
        return video, torch.ones(1, frames, height, width)
    mask = resize_cover(_decode(mask_uri, video_w, video_h, video_n, ids), height, width)
    return video, ((mask[:1] + 1) / 2).clamp(0, 1)


def place_reference(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """A reference image uint8 [h, w, 3] as float32 [3, height, width] in [-1, 1], official `prepare_source`.

    The image goes to [-1, 1] first (`TF.to_tensor(img).sub_(0.5).div_(0.5)`); one of
    another size is scaled by min(height / h, width / w) to (int(h * scale), int(w * scale))
    with bilinear `F.interpolate` (align_corners=False, no antialias) and pasted at
    ((height - h') // 2, (width - w') // 2) on a white canvas (1.0). `int` truncates, so a
    side meant to fill the canvas can come out one pixel short, as there.
    """
    _check_image(image)
    _check_size(height=height, width=width)
    ref = to_unit_range(image)
    h, w = ref.shape[1:]
    if (h, w) == (height, width):
        return ref
    scale = min(height / h, width / w)
    new_h, new_w = int(h * scale), int(w * scale)
    if new_h == 0 or new_w == 0:
        raise ValueError(f"a {w}x{h} image is too elongated to fit a {width}x{height} video: one side shrinks to zero")
    canvas = torch.ones(3, height, width)
    top, left = (height - new_h) // 2, (width - new_w) // 2
    canvas[:, top:top + new_h, left:left + new_w] = F.interpolate(
        ref[None], size=(new_h, new_w), mode="bilinear", align_corners=False)[0]
    return canvas


def read_reference(uri: str, height: int, width: int) -> torch.Tensor:
    """The reference image at `uri` placed as `place_reference` does; ImageError naming the file if it cannot be."""
    image = read_image(uri)
    try:
        return place_reference(image, height, width)
    except ValueError as exc:
        raise ImageError(f"{uri}: {exc}") from None
