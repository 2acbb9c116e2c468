"""VACE's conditioning inputs: probing and reading videos, official frame sampling, resize/crop,
the mask, reference images on a white canvas, and the errors for unusable files."""
import av
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import engine.video_input as video_input
from engine.image import ImageError, read_image, to_unit_range
from engine.video import write_mp4
from engine.video_input import (
    VideoInputError,
    place_reference,
    probe_video,
    read_control,
    read_reference,
    read_video,
    resize_cover,
    sample_frame_ids,
)
from jobs.inputs import InputError


def smooth_frames(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """A moving colour gradient: content H.264 at crf 18 keeps almost exactly."""
    y, x = np.mgrid[0:height, 0:width]
    video = [np.stack([x * 3 + f, y * 4 + 2 * f, (x + y) * 2], axis=-1) for f in range(frames)]
    return np.clip(np.stack(video), 0, 255).astype(np.uint8)


def noise_frames(frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)


def write_lossless(path, frames: np.ndarray, fps: int = 16) -> None:
    """FFV1 in Matroska: exact RGB (bgr0 holds it losslessly), any width and height, and a
    stream header without a frame count (so probing counts packets)."""
    with av.open(str(path), mode="w", format="matroska") as container:
        stream = container.add_stream("ffv1", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def write_faststart_mp4(path, frames: np.ndarray, fps: int = 16) -> None:
    """H.264 MP4 with its index (moov) in front of the data, so a cut-off file still has its header."""
    with av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))


def official_frame_ids(frame_timestamps: np.ndarray, wanted: int) -> list[int]:
    """Direct transcription of `VaceVideoProcessor._get_frameid_bbox_adjust_last`'s sampling:
    float32 (start, end) per frame as decord gives them, float64 linspace (numpy < 2), argmax of
    the first frame with start <= t <= end."""
    duration = frame_timestamps[-1].mean()
    timestamps = np.linspace(0.0, np.float64(duration), wanted)
    return np.argmax(
        np.logical_and(timestamps[:, None] >= frame_timestamps[None, :, 0],
                       timestamps[:, None] <= frame_timestamps[None, :, 1]),
        axis=1).tolist()


def frame_spans(available: int, fps: float | None = None) -> np.ndarray:
    """decord's timestamps of a constant-rate video: frame i spans [i, i + 1] frames, or seconds at `fps`."""
    starts = np.arange(available, dtype=np.float64)
    spans = np.stack([starts, starts + 1], axis=1)
    return (spans if fps is None else spans / fps).astype(np.float32)


def one_line_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


# --- probing and reading -------------------------------------------------------------------------

def test_probe_reads_size_and_frame_count_of_a_written_mp4(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(smooth_frames(9, 48, 64), path, fps=16)

    assert probe_video(str(path)) == (64, 48, 9)


def test_probe_counts_packets_when_the_header_has_no_frame_count(tmp_path):
    path = tmp_path / "clip.mkv"
    write_lossless(path, noise_frames(7, 21, 33))
    with av.open(str(path)) as container:
        assert container.streams.video[0].frames == 0  # Matroska lists no count: the packets are counted

    assert probe_video(str(path)) == (33, 21, 7)


def test_read_video_gives_back_what_write_mp4_wrote_within_h264_loss(tmp_path):
    frames = smooth_frames(9, 48, 64)
    path = tmp_path / "clip.mp4"
    write_mp4(frames, path, fps=16)

    decoded = read_video(str(path))

    assert decoded.shape == (9, 48, 64, 3) and decoded.dtype == np.uint8
    # lossy yuv420p + crf 18 on a smooth gradient: mean abs error < 3 levels (engine.video's test measures 1.7)
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 3.0


def test_read_video_of_a_lossless_video_is_exact_at_an_odd_size(tmp_path):
    frames = noise_frames(7, 21, 33)
    path = tmp_path / "clip.mkv"
    write_lossless(path, frames)

    np.testing.assert_array_equal(read_video(str(path)), frames)


def test_a_file_uri_works_like_a_path(tmp_path):
    frames = noise_frames(5, 16, 24)
    path = tmp_path / "clip.mkv"
    write_lossless(path, frames)
    uri = path.as_uri()
    assert uri.startswith("file:///")

    assert probe_video(uri) == (24, 16, 5)
    np.testing.assert_array_equal(read_video(uri), frames)


def test_read_video_refuses_a_video_over_the_pixel_limit_before_decoding(tmp_path, monkeypatch):
    path = tmp_path / "clip.mkv"
    write_lossless(path, noise_frames(5, 16, 24))
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 5 * 16 * 24 - 1)

    assert probe_video(str(path)) == (24, 16, 5)  # probing decodes nothing, so it has no limit
    with pytest.raises(VideoInputError) as excinfo:
        read_video(str(path))
    message = one_line_error(excinfo)
    assert str(path) in message and "1919" in message and "MAX_VIDEO_PIXELS" in message


# --- errors --------------------------------------------------------------------------------------

def test_missing_file_is_a_video_input_error_naming_it(tmp_path):
    path = str(tmp_path / "nowhere.mp4")
    for read in (probe_video, read_video):
        with pytest.raises(VideoInputError) as excinfo:
            read(path)
        assert one_line_error(excinfo) == f"{path}: no such file"
    assert issubclass(VideoInputError, InputError)


def test_a_text_file_named_mp4_is_not_a_video(tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("these are not the frames you are looking for\n" * 20)

    with pytest.raises(VideoInputError) as excinfo:
        probe_video(str(path))
    assert one_line_error(excinfo).startswith(f"{path}: not a readable MP4, MOV, MKV, WebM or AVI video (")


def test_a_still_image_named_mp4_is_not_taken_for_a_video(tmp_path):
    path = tmp_path / "still.mp4"
    Image.fromarray(noise_frames(1, 16, 16)[0]).save(path, format="PNG")  # FFmpeg alone would read it as one frame

    with pytest.raises(VideoInputError) as excinfo:
        probe_video(str(path))
    assert one_line_error(excinfo).startswith(f"{path}: not a readable")


def test_an_mp4_cut_before_its_index_fails_the_probe(tmp_path):
    path = tmp_path / "cut.mp4"
    write_mp4(smooth_frames(9, 48, 64), path, fps=16)  # the index (moov) comes last
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])

    with pytest.raises(VideoInputError) as excinfo:
        probe_video(str(path))
    assert one_line_error(excinfo).startswith(f"{path}: not a readable")


def test_an_mp4_cut_inside_its_data_probes_but_does_not_read(tmp_path):
    whole = tmp_path / "whole.mp4"
    write_faststart_mp4(whole, smooth_frames(9, 48, 64))
    data = whole.read_bytes()
    with av.open(str(whole)) as container:
        packets = [(packet.pos, packet.size) for packet in container.demux(video=0) if packet.size]
    assert len(packets) == 9

    # cut after the fourth frame's data: four frames decode, then the data ends
    path = tmp_path / "cut_between_frames.mp4"
    path.write_bytes(data[: sum(packets[3])])
    assert probe_video(str(path)) == (64, 48, 9)  # the header is whole
    with pytest.raises(VideoInputError) as excinfo:
        read_video(str(path))
    assert one_line_error(excinfo) == f"{path}: truncated: 4 of the 9 frames its container lists decode"

    # cut inside the first frame's data: the decoder gets half a frame
    path = tmp_path / "cut_inside_a_frame.mp4"
    path.write_bytes(data[: packets[0][0] + packets[0][1] // 2])
    assert probe_video(str(path)) == (64, 48, 9)
    with pytest.raises(VideoInputError) as excinfo:
        read_video(str(path))
    assert one_line_error(excinfo).startswith(f"{path}: corrupt or truncated video data after 0 of 9 frames (")


# --- frame sampling ------------------------------------------------------------------------------

def test_sample_frame_ids_follow_the_official_rule_in_frame_units():
    for available in range(1, 100):
        spans = frame_spans(available)
        for wanted in range(1, 100):
            assert sample_frame_ids(available, wanted) == official_frame_ids(spans, wanted), (available, wanted)


def test_sample_frame_ids_follow_the_official_rule_in_seconds_at_16_fps():
    # decord's timestamps are seconds; at 16 fps (a power of two) dividing by the rate is exact
    for available in (1, 2, 5, 17, 33, 49, 81, 97, 161, 300):
        spans = frame_spans(available, fps=16)
        for wanted in (1, 2, 5, 17, 33, 81, 121):
            assert sample_frame_ids(available, wanted) == official_frame_ids(spans, wanted), (available, wanted)


def test_a_timestamp_on_a_frame_boundary_takes_the_earlier_frame():
    # 3 frames, 6 wanted: timestamps 0, 0.5, 1, 1.5, 2, 2.5; t = 1 and t = 2 lie on boundaries
    assert official_frame_ids(frame_spans(3), 6) == [0, 0, 0, 1, 1, 2]
    assert sample_frame_ids(3, 6) == [0, 0, 0, 1, 1, 2]
    # the rule tells this apart from plain floor(t), which would take the later frame
    floor_rule = np.floor(np.linspace(0, 2.5, 6)).astype(int).tolist()
    assert floor_rule != official_frame_ids(frame_spans(3), 6)


def test_a_longer_video_is_thinned_evenly_over_its_whole_length():
    ids = sample_frame_ids(161, 81)
    assert len(ids) == 81 and ids[0] == 0 and ids[-1] == 160
    assert set(np.diff(ids).tolist()) <= {2, 3}  # step 160.5 / 80 = 2.006 frames


def test_a_shorter_video_has_its_frames_repeated():
    ids = sample_frame_ids(5, 17)
    assert ids[0] == 0 and ids[-1] == 4 and sorted(ids) == ids
    # 17 timestamps 0.28 apart over [0, 4.5]: every frame used, each about 17 / 4.5 = 3.8 times,
    # the last only over its first half (the duration ends mid-frame)
    assert np.bincount(ids).tolist() == [4, 4, 3, 4, 2]


def test_a_video_of_the_wanted_length_is_taken_frame_by_frame():
    for frames in (1, 2, 17, 81):
        assert sample_frame_ids(frames, frames) == list(range(frames))


def test_sample_frame_ids_refuses_non_positive_counts():
    with pytest.raises(ValueError, match="available"):
        sample_frame_ids(0, 5)
    with pytest.raises(ValueError, match="wanted"):
        sample_frame_ids(5, 0)


# --- resize and crop -----------------------------------------------------------------------------

def official_resize_crop(frames: np.ndarray, oh: int, ow: int, shift: int = 0) -> torch.Tensor:
    """`VaceVideoProcessor.resize_crop` written out; `shift` moves the crop (a deliberate mistake)."""
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)
    ih, iw = video.shape[2:]
    scale = max(ow / iw, oh / ih)
    video = F.interpolate(video, size=(round(scale * ih), round(scale * iw)), mode="bicubic", antialias=True)
    x1 = (video.size(3) - ow) // 2 + shift
    y1 = (video.size(2) - oh) // 2 + shift
    video = video[:, :, y1:y1 + oh, x1:x1 + ow]
    return video.transpose(0, 1).float().div_(127.5).sub_(1.0)


@pytest.mark.parametrize("size, out", [((48, 64), (32, 32)), ((24, 20), (48, 64)), ((30, 50), (16, 48))])
def test_resize_cover_is_the_official_resize_crop(size, out):
    frames = noise_frames(3, *size, seed=1)

    result = resize_cover(frames, *out)

    assert result.dtype == torch.float32 and result.shape == (3, 3, *out) and result.is_contiguous()
    torch.testing.assert_close(result, official_resize_crop(frames, *out), rtol=0, atol=0)
    assert not torch.equal(result, official_resize_crop(frames, *out, shift=1))  # the crop position counts
    assert result.min() >= -1 and result.max() <= 1  # uint8 interpolation: no overshoot


def test_resize_cover_is_bicubic_antialiased_on_smooth_content():
    frames = smooth_frames(2, 48, 64)
    reference = F.interpolate(torch.from_numpy(frames).permute(0, 3, 1, 2).float(), size=(24, 32),
                              mode="bicubic", antialias=True).transpose(0, 1) / 127.5 - 1

    # halving exactly: no crop; uint8 arithmetic rounds, so within one level (1 / 127.5)
    torch.testing.assert_close(resize_cover(frames, 24, 32), reference, rtol=0, atol=1.01 / 127.5)


def test_resize_cover_at_the_same_size_only_maps_to_unit_range():
    frames = noise_frames(2, 16, 24, seed=2)
    frames[0, 0, 0] = (0, 255, 128)

    result = resize_cover(frames, 16, 24)

    expected = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 127.5 - 1
    torch.testing.assert_close(result, expected, rtol=0, atol=0)
    assert result[:, 0, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 127.5 - 1, abs=1e-6)]  # float32


def test_resize_cover_refuses_what_is_not_uint8_frames():
    with pytest.raises(ValueError, match="uint8 array"):
        resize_cover(np.zeros((2, 8, 8, 3), dtype=np.float32), 8, 8)
    with pytest.raises(ValueError, match="uint8 array"):
        resize_cover(np.zeros((8, 8, 3), dtype=np.uint8), 8, 8)


# --- reference images ----------------------------------------------------------------------------

def test_place_reference_at_the_same_size_is_only_mapped_to_unit_range():
    image = noise_frames(1, 16, 24, seed=3)[0]
    image[0, 0] = (0, 255, 128)

    result = place_reference(image, 16, 24)

    torch.testing.assert_close(result, to_unit_range(image), rtol=0, atol=0)
    assert result[:, 0, 0].tolist() == [-1.0, 1.0, pytest.approx(128 / 255 * 2 - 1, abs=1e-6)]  # float32


def test_a_wide_reference_sits_centred_on_a_white_canvas():
    image = noise_frames(1, 20, 40, seed=4)[0]

    result = place_reference(image, 48, 64)

    # scale = min(48 / 20, 64 / 40) = 1.6 -> 32 x 64, top = (48 - 32) // 2 = 8
    assert result.shape == (3, 48, 64)
    assert torch.all(result[:, :8] == 1) and torch.all(result[:, 40:] == 1)
    inner = F.interpolate(to_unit_range(image)[None], size=(32, 64), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(result[:, 8:40], inner, rtol=0, atol=0)
    assert not torch.all(result[:, 8] == 1) and not torch.all(result[:, 39] == 1)


def test_a_tall_reference_sits_centred_with_white_at_the_sides():
    image = noise_frames(1, 30, 10, seed=5)[0]

    result = place_reference(image, 48, 64)

    # scale = min(48 / 30, 64 / 10) = 1.6 -> 48 x 16, left = (64 - 16) // 2 = 24
    assert torch.all(result[:, :, :24] == 1) and torch.all(result[:, :, 40:] == 1)
    inner = F.interpolate(to_unit_range(image)[None], size=(48, 16), mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(result[:, :, 24:40], inner, rtol=0, atol=0)


def test_read_reference_reads_the_image_and_places_it(tmp_path):
    path = tmp_path / "ref.png"
    Image.fromarray(noise_frames(1, 20, 40, seed=6)[0]).save(path)

    result = read_reference(str(path), 48, 64)

    torch.testing.assert_close(result, place_reference(read_image(str(path)), 48, 64), rtol=0, atol=0)


def test_a_reference_too_elongated_to_fit_is_an_image_error_naming_it(tmp_path):
    path = tmp_path / "line.png"
    Image.fromarray(np.zeros((1, 500, 3), dtype=np.uint8)).save(path)

    with pytest.raises(ImageError) as excinfo:
        read_reference(str(path), 16, 16)  # 500 wide -> 16, so 1 high -> int(0.032) = 0
    message = one_line_error(excinfo)
    assert message.startswith(f"{path}: a 500x1 image is too elongated")


# --- control video and mask ----------------------------------------------------------------------

def numbered_frames(frames: int, height: int, width: int) -> np.ndarray:
    """Frame i is one colour: red 10 * i, green 255 - 10 * i, blue 7 (so a frame's index can be read back)."""
    video = np.zeros((frames, height, width, 3), dtype=np.uint8)
    for i in range(frames):
        video[i] = (10 * i, 255 - 10 * i, 7)
    return video


def test_control_and_mask_are_sampled_alike_and_the_mask_is_the_red_channel(tmp_path):
    control, mask = tmp_path / "control.mkv", tmp_path / "mask.mkv"
    write_lossless(control, numbered_frames(5, 16, 24))
    mask_frames = numbered_frames(5, 16, 24)
    mask_frames[:, :, 12:, 0] = 255  # right half white in red only: green and blue must not matter
    write_lossless(mask, mask_frames)

    video, weights = read_control(str(control), str(mask), 9, 16, 24)

    ids = sample_frame_ids(5, 9)
    assert ids == [0, 0, 1, 1, 2, 2, 3, 3, 4]
    assert video.shape == (3, 9, 16, 24) and weights.shape == (1, 9, 16, 24)
    expected = torch.tensor([[10 * i, 255 - 10 * i, 7] for i in ids], dtype=torch.float32) / 127.5 - 1
    torch.testing.assert_close(video[:, :, 5, 5], expected.T, rtol=0, atol=0)
    # official: clamp((x / 127.5 - 1 + 1) / 2, 0, 1) of the red channel
    left = ((torch.tensor([10.0 * i for i in ids]) / 127.5 - 1 + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(weights[0, :, 5, 5], left, rtol=0, atol=0)
    assert torch.all(weights[0, :, :, 12:] == 1)
    assert weights.min() >= 0 and weights.max() <= 1


def test_control_and_mask_are_resized_and_cropped_alike(tmp_path):
    control, mask = tmp_path / "control.mkv", tmp_path / "mask.mkv"
    control_frames, mask_frames = noise_frames(4, 30, 50, seed=7), noise_frames(4, 30, 50, seed=8)
    write_lossless(control, control_frames)
    write_lossless(mask, mask_frames)

    video, weights = read_control(str(control), str(mask), 6, 16, 48)

    ids = sample_frame_ids(4, 6)
    torch.testing.assert_close(video, official_resize_crop(control_frames[ids], 16, 48), rtol=0, atol=0)
    expected = ((official_resize_crop(mask_frames[ids], 16, 48)[:1] + 1) / 2).clamp(0, 1)
    torch.testing.assert_close(weights, expected, rtol=0, atol=0)


def test_without_a_mask_video_the_mask_is_all_ones(tmp_path):
    control = tmp_path / "control.mp4"
    write_mp4(smooth_frames(9, 48, 64), control, fps=16)

    video, weights = read_control(str(control), None, 5, 32, 32)

    assert video.shape == (3, 5, 32, 32) and video.min() >= -1 and video.max() <= 1
    assert weights.shape == (1, 5, 32, 32) and weights.dtype == torch.float32 and torch.all(weights == 1)


def test_a_mask_of_another_length_is_refused_naming_both_files(tmp_path):
    control, mask = tmp_path / "ctl.mkv", tmp_path / "mask.mkv"
    write_lossless(control, noise_frames(5, 16, 24))
    write_lossless(mask, noise_frames(7, 16, 24))

    with pytest.raises(VideoInputError) as excinfo:
        read_control(str(control), str(mask), 9, 16, 24)
    assert one_line_error(excinfo) == f"{mask}: 7 frames 24x16, but its control video {control} has 5 frames 24x16"


def test_a_mask_of_another_size_is_refused_naming_both_files(tmp_path):
    control, mask = tmp_path / "ctl.mkv", tmp_path / "mask.mkv"
    write_lossless(control, noise_frames(5, 16, 24))
    write_lossless(mask, noise_frames(5, 24, 24))

    with pytest.raises(VideoInputError) as excinfo:
        read_control(str(control), str(mask), 9, 16, 24)
    assert one_line_error(excinfo) == f"{mask}: 5 frames 24x24, but its control video {control} has 5 frames 24x16"


def test_a_missing_mask_video_is_named(tmp_path):
    control = tmp_path / "ctl.mkv"
    write_lossless(control, noise_frames(5, 16, 24))
    missing = str(tmp_path / "mask.mkv")

    with pytest.raises(VideoInputError) as excinfo:
        read_control(str(control), missing, 9, 16, 24)
    assert one_line_error(excinfo) == f"{missing}: no such file"


def test_read_control_keeps_only_the_sampled_frames_under_the_pixel_limit(tmp_path, monkeypatch):
    control = tmp_path / "ctl.mkv"
    write_lossless(control, numbered_frames(20, 16, 24))
    monkeypatch.setattr(video_input, "MAX_VIDEO_PIXELS", 5 * 16 * 24)  # 5 frames' worth, not 20

    video, _ = read_control(str(control), None, 5, 16, 24)

    ids = sample_frame_ids(20, 5)
    assert ids == [0, 4, 9, 14, 19]  # timestamps 0, 4.875, 9.75, 14.625, 19.5
    torch.testing.assert_close(video[0, :, 0, 0], torch.tensor([10.0 * i for i in ids]) / 127.5 - 1, rtol=0, atol=0)
    with pytest.raises(VideoInputError, match="MAX_VIDEO_PIXELS"):
        read_video(str(control))
