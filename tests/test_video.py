"""MP4 writing/reading with PyAV, byte-identical re-encodes, the frames hash, and the [-1, 1] -> uint8 mapping."""
import hashlib
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from diffusers.video_processor import VideoProcessor

from engine.video import VideoError, frames_sha256, probe_mp4, read_mp4, to_uint8, write_mp4

REPO_ROOT = Path(__file__).resolve().parents[1]


def gradient_frames(frames: int = 9, height: int = 48, width: int = 64) -> np.ndarray:
    """A smooth moving colour gradient, the kind of content H.264 at crf 18 keeps almost exactly."""
    y, x = np.mgrid[0:height, 0:width]
    video = [np.stack([x * 3 + f, y * 4 + 2 * f, (x + y) * 2], axis=-1) for f in range(frames)]
    return np.clip(np.stack(video), 0, 255).astype(np.uint8)


def test_write_then_read_round_trip(tmp_path):
    frames = gradient_frames()
    path = tmp_path / "clip.mp4"

    write_mp4(frames, path, fps=16)

    assert probe_mp4(path) == {"frames": 9, "width": 64, "height": 48, "fps": 16.0, "codec": "h264"}
    decoded = read_mp4(path)
    assert decoded.shape == (9, 48, 64, 3) and decoded.dtype == np.uint8
    # lossy yuv420p + crf 18 on a smooth gradient: mean abs error < 3 levels (measured 1.7)
    assert np.abs(decoded.astype(np.int16) - frames).mean() < 3.0
    with av.open(str(path)) as container:
        codec = container.streams.video[0].codec_context
        assert codec.pix_fmt == "yuv420p"
        assert (codec.colorspace, codec.color_primaries, codec.color_trc) == (1, 1, 1)  # tagged BT.709


def test_same_frames_give_identical_bytes_in_process_and_in_a_subprocess(tmp_path):
    frames = gradient_frames()
    np.save(tmp_path / "frames.npy", frames)
    first, second, other_process = tmp_path / "a.mp4", tmp_path / "b.mp4", tmp_path / "c.mp4"

    write_mp4(frames, first, fps=16)
    write_mp4(frames, second, fps=16)
    script = (
        "import sys, numpy as np; from engine.video import write_mp4; "
        "write_mp4(np.load(sys.argv[1]), sys.argv[2], fps=16)"
    )
    subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "frames.npy"), str(other_process)],
        cwd=REPO_ROOT, check=True, timeout=120,
    )

    data = first.read_bytes()
    assert data == second.read_bytes()
    assert data == other_process.read_bytes()
    assert b"Lavf" not in data  # bitexact: no library version string in the container


def test_a_render_bytes_stay_the_same_after_the_engine_renders_in_another_thread(tmp_path):
    """How the pipeline's actors encode: one job's frames while the next job renders in another
    thread. With x264's macroblock tree on, every encode after such a render gave other bytes than
    before it in a plain script (the frames identical; 5 of 5 processes, session 9), and the same
    88-job run twice gave 63 different files; X264_PARAMS turns it off. Inside pytest the change
    did not show, so the settings string is checked too: it is what fails with mbtree on."""
    import threading

    from engine.model_set import ModelSet
    from engine.render import Engine
    from engine.toy.embedded import write_toy_model

    write_toy_model(tmp_path / "model", quant="Q8_0")
    engine = Engine(ModelSet.from_dir(tmp_path / "model"), cpu_threads=1)
    frames = engine.render("a red circle moving right on a black background", 0).frames
    write_mp4(frames, tmp_path / "before.mp4", fps=16)
    other = threading.Thread(target=engine.render, args=("a blue square moving up on a teal background", 5))
    other.start()
    write_mp4(frames, tmp_path / "during.mp4", fps=16)
    other.join()
    write_mp4(frames, tmp_path / "after.mp4", fps=16)
    data = (tmp_path / "before.mp4").read_bytes()
    assert data == (tmp_path / "during.mp4").read_bytes() == (tmp_path / "after.mp4").read_bytes()
    assert b"mbtree=0" in data  # x264's settings string in the stream


def test_different_crf_gives_different_bytes(tmp_path):
    frames = gradient_frames()
    write_mp4(frames, tmp_path / "a.mp4", fps=16, crf=18)
    write_mp4(frames, tmp_path / "b.mp4", fps=16, crf=30)
    assert (tmp_path / "a.mp4").read_bytes() != (tmp_path / "b.mp4").read_bytes()


def test_frames_sha256_is_the_shape_header_then_the_bytes():
    frames = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)
    expected = hashlib.sha256(b"2,4,6,3;" + frames.tobytes()).hexdigest()

    assert frames_sha256(frames) == expected
    assert frames_sha256(torch.from_numpy(frames)) == expected
    # a non-contiguous view hashes as its contiguous copy
    wide = np.zeros((2, 4, 12, 3), dtype=np.uint8)
    wide[:, :, ::2] = frames
    assert frames_sha256(wide[:, :, ::2]) == expected


def test_frames_sha256_changes_with_one_pixel_and_with_the_shape():
    frames = gradient_frames(3, 8, 8)
    changed = frames.copy()
    changed[2, 7, 7, 1] ^= 1

    assert frames_sha256(changed) != frames_sha256(frames)
    # the same bytes read as another shape: different hash
    assert frames_sha256(frames.reshape(3, 4, 16, 3)) != frames_sha256(frames)
    assert frames_sha256(frames.reshape(6, 8, 4, 3)) != frames_sha256(frames)


def test_frames_sha256_rejects_non_uint8_frames():
    with pytest.raises(ValueError, match="uint8"):
        frames_sha256(np.zeros((1, 2, 2, 3), dtype=np.float32))
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        frames_sha256(np.zeros((1, 2, 2, 4), dtype=np.uint8))


def test_truncated_file_raises_video_error_naming_the_path(tmp_path):
    path = tmp_path / "clip.mp4"
    write_mp4(gradient_frames(), path, fps=16)
    data = path.read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) // 2])

    with pytest.raises(VideoError, match="truncated.mp4"):
        probe_mp4(truncated)
    with pytest.raises(VideoError, match="truncated.mp4"):
        read_mp4(truncated)
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(b"\x00not a video" * 100)
    with pytest.raises(VideoError, match="garbage.mp4"):
        read_mp4(garbage)


def test_truncated_file_whose_index_survived_raises_video_error(tmp_path):
    # A "+faststart" MP4 (index before the data, as many tools write them) cut exactly at a
    # packet boundary still opens and decodes cleanly; only the frame count betrays it.
    path = tmp_path / "faststart.mp4"
    frames = gradient_frames(12, 32, 48)
    with av.open(str(path), "w", format="mp4", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=16)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for index, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = index
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    with av.open(str(path)) as container:
        packet_ends = [p.pos + p.size for p in container.demux(video=0) if p.size]
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(path.read_bytes()[: packet_ends[4]])

    assert read_mp4(path).shape == (12, 32, 48, 3)
    assert probe_mp4(cut)["frames"] == 12
    with pytest.raises(VideoError, match="cut.mp4: truncated: the index lists 12 frames, 5 decoded"):
        read_mp4(cut)


def test_write_mp4_rejects_odd_sizes_and_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="even"):
        write_mp4(np.zeros((2, 16, 15, 3), dtype=np.uint8), tmp_path / "odd.mp4", fps=16)
    with pytest.raises(ValueError, match="fps"):
        write_mp4(gradient_frames(1, 16, 16), tmp_path / "fps.mp4", fps=0)
    with pytest.raises(ValueError, match="crf"):
        write_mp4(gradient_frames(1, 16, 16), tmp_path / "crf.mp4", fps=16, crf=60)
    assert not any(tmp_path.iterdir())


def test_to_uint8_known_values():
    # [3, F=1, H=1, W=7]: -1 -> 0, 1 -> 255, 0 -> 127.5 -> 128 (ties to even), out of range clamps
    values = torch.tensor([-1.0, 1.0, 0.0, -2.0, 3.0, 0.5, -0.5])
    video = torch.stack([values, values, values]).reshape(3, 1, 1, 7)

    frames = to_uint8(video)

    assert frames.shape == (1, 1, 7, 3) and frames.dtype == np.uint8
    # 0.5 -> 0.75 * 255 = 191.25 -> 191; -0.5 -> 63.75 -> 64
    assert frames[0, 0, :, 0].tolist() == [0, 255, 128, 0, 255, 191, 64]


def test_to_uint8_matches_diffusers_video_processor():
    torch.manual_seed(0)
    video = torch.rand(3, 2, 6, 8) * 2.4 - 1.2  # some values out of [-1, 1]
    video[0, 0, 0, :3] = torch.tensor([-1.0, 0.0, 1.0])

    ours = to_uint8(video)

    pil_frames = VideoProcessor().postprocess_video(video[None], output_type="pil")[0]
    reference = np.stack([np.asarray(frame) for frame in pil_frames])
    np.testing.assert_array_equal(ours, reference)
    # channels-last: frame f, row h, column w holds video[:, f, h, w]
    assert ours[1, 5, 7].tolist() == to_uint8(video[:, 1:2, 5:6, 7:8])[0, 0, 0].tolist()


def test_to_uint8_rejects_nan_and_wrong_shapes():
    video = torch.zeros(3, 1, 2, 2)
    video[1, 0, 1, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        to_uint8(video)
    with pytest.raises(ValueError, match=r"\[3, F, H, W\]"):
        to_uint8(torch.zeros(1, 3, 2, 2, 2))
