"""Conditioning images: reading PNG/JPEG/WebP files, and the official I2V-A14B and TI2V-5B resize rules."""
import struct
import zlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from engine.image import (
    MAX_PIXELS,
    ImageError,
    i2v_a14b_image,
    i2v_a14b_output_size,
    read_image,
    ti2v_image,
    ti2v_output_size,
)
from jobs.inputs import InputError


def _noise(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _gradient(h, w):
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)], -1).astype(np.uint8)


def _error(uri) -> str:
    with pytest.raises(ImageError) as info:
        read_image(uri)
    message = str(info.value)
    assert "\n" not in message
    assert str(uri) in message
    return message


# -- reading ---------------------------------------------------------------------------------------------------


def test_png_and_lossless_webp_read_back_exactly(tmp_path):
    pixels = _noise(37, 53)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels).save(tmp_path / "a.webp", lossless=True)
    for name in ("a.png", "a.webp"):
        got = read_image(str(tmp_path / name))
        assert got.dtype == np.uint8 and got.shape == (37, 53, 3)
        np.testing.assert_array_equal(got, pixels)


def test_jpeg_reads_as_pillow_decodes_it(tmp_path):
    pixels = _gradient(48, 64)
    Image.fromarray(pixels).save(tmp_path / "a.jpg", quality=95)
    got = read_image(str(tmp_path / "a.jpg"))
    np.testing.assert_array_equal(got, np.asarray(Image.open(tmp_path / "a.jpg").convert("RGB")))
    # Lossy, but the picture is the one saved (a transposed or BGR read would be far off).
    assert np.abs(got.astype(int) - pixels).mean() < 3


def test_alpha_is_dropped_not_composited(tmp_path):
    rgba = np.concatenate([_noise(16, 24), np.zeros((16, 24, 1), np.uint8)], axis=-1)
    rgba[:8, :, 3] = 255
    Image.fromarray(rgba).save(tmp_path / "a.png")
    Image.fromarray(rgba).save(tmp_path / "a.webp", lossless=True, exact=True)
    for name in ("a.png", "a.webp"):
        np.testing.assert_array_equal(read_image(str(tmp_path / name)), rgba[..., :3])


def test_greyscale_images_become_three_equal_channels(tmp_path):
    grey = _noise(20, 30)[..., 0]
    Image.fromarray(grey).save(tmp_path / "l.png")
    Image.fromarray(np.stack([grey, 255 - grey], -1)).save(tmp_path / "la.png")
    Image.fromarray(grey > 127).save(tmp_path / "bw.png")  # mode "1"
    for name, expected in (("l.png", grey), ("la.png", grey), ("bw.png", np.where(grey > 127, 255, 0))):
        got = read_image(str(tmp_path / name))
        assert got.shape == (20, 30, 3)
        for c in range(3):
            np.testing.assert_array_equal(got[..., c], expected)


def test_palette_image_expands_to_its_colours(tmp_path):
    palette = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]], np.uint8)
    index = np.random.default_rng(1).integers(0, 4, (12, 17), dtype=np.uint8)
    image = Image.frombytes("P", (17, 12), index.tobytes())
    image.putpalette(palette.ravel().tolist())
    image.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_image(str(tmp_path / "p.png")), palette[index])


def test_file_uri_and_pathlike_read_the_same_pixels(tmp_path):
    pixels = _noise(9, 11)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_image(f"file://{tmp_path / 'a.png'}"), pixels)
    np.testing.assert_array_equal(read_image(tmp_path / "a.png"), pixels)


def test_missing_file_is_one_line_naming_it(tmp_path):
    assert _error(str(tmp_path / "nope.png")).endswith("no such file")
    assert _error(f"file://{tmp_path}/nope.png").endswith("no such file")
    assert "not a file" in _error(str(tmp_path))


def test_text_file_named_png_is_not_an_image(tmp_path):
    (tmp_path / "a.png").write_text("hello, I am not a picture\n")
    (tmp_path / "empty.png").write_bytes(b"")
    assert _error(str(tmp_path / "a.png")).endswith("not a PNG, JPEG or WebP image")
    assert _error(str(tmp_path / "empty.png")).endswith("not a PNG, JPEG or WebP image")


def test_other_formats_are_refused(tmp_path):
    Image.fromarray(_noise(8, 8)).save(tmp_path / "a.gif")
    Image.fromarray(_noise(8, 8)).save(tmp_path / "a.bmp")
    for name in ("a.gif", "a.bmp"):
        assert _error(str(tmp_path / name)).endswith("not a PNG, JPEG or WebP image")


@pytest.mark.parametrize("suffix", ["png", "jpg", "webp"])
def test_truncated_file_is_one_line_naming_it(tmp_path, suffix):
    Image.fromarray(_noise(64, 64)).save(tmp_path / f"full.{suffix}")
    data = (tmp_path / f"full.{suffix}").read_bytes()
    (tmp_path / f"cut.{suffix}").write_bytes(data[: len(data) // 2])
    assert "corrupt or truncated" in _error(str(tmp_path / f"cut.{suffix}"))


def _png_header_only(width, height) -> bytes:
    """A PNG that declares a size and holds no pixel data: only the header is needed to refuse it."""

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


@pytest.mark.parametrize("width,height", [(9000, 8000), (40000, 40000)])
def test_absurd_dimensions_are_refused_before_decoding(tmp_path, width, height):
    # 72M pixels trips our limit; 1.6G pixels trips Pillow's own bomb check first.
    assert MAX_PIXELS < width * height
    (tmp_path / "bomb.png").write_bytes(_png_header_only(width, height))
    assert "decompression bomb" in _error(str(tmp_path / "bomb.png"))


def test_image_error_is_an_input_error(tmp_path):
    # Callers sorting per-row failures can catch the input kind once.
    with pytest.raises(InputError):
        read_image(str(tmp_path / "nope.png"))


# -- the official resize rules ---------------------------------------------------------------------------------


def _official_i2v_a14b_size(h, w, max_area, stride=8, patch=2):
    """The lat_h / lat_w expression of wan/image2video.py WanI2V.generate, with numpy as there."""
    aspect_ratio = h / w
    lat_h = round(np.sqrt(max_area * aspect_ratio) // stride // patch * patch)
    lat_w = round(np.sqrt(max_area / aspect_ratio) // stride // patch * patch)
    return int(lat_h) * stride, int(lat_w) * stride


def _official_best_output_size(w, h, dw, dh, expected_area):
    """wan/utils/utils.py best_output_size, returning (ow, oh) as there."""
    ratio = w / h
    ow = (expected_area * ratio) ** 0.5
    oh = expected_area / ow
    ow1 = int(ow // dw * dw)
    oh1 = int(expected_area / ow1 // dh * dh)
    ratio1 = ow1 / oh1
    oh2 = int(oh // dh * dh)
    ow2 = int(expected_area / oh2 // dw * dw)
    ratio2 = ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def test_output_sizes_by_hand_for_a_1000x600_image():
    # A14B at 1280*720: sqrt(921600 * 0.6) = 743.6 -> //8 = 92 -> //2*2 = 92 -> 736;
    # sqrt(921600 / 0.6) = 1239.4 -> //8 = 154 -> //2*2 = 154 -> 1232.
    assert i2v_a14b_output_size(600, 1000, 1280 * 720) == (736, 1232)
    # TI2V at 1280*720, steps of 32: width first 1239.4 -> 1216, 921600 / 1216 = 757.9 -> 736
    # (ratio 1.652); height first 743.6 -> 736, 921600 / 736 = 1252.2 -> 1248 (ratio 1.696);
    # the image's ratio is 1.667, nearer 1.652.
    assert ti2v_output_size(600, 1000, 1280 * 720) == (736, 1216)
    # At TI2V's own 1280*704: width first 1225.5 -> 1216, 741.1 -> 736; height first
    # 735.3 -> 704, 1280 -> 1280 (ratio 1.818); width first wins again.
    assert ti2v_output_size(600, 1000, 1280 * 704) == (736, 1216)


def test_output_sizes_keep_the_official_sizes_for_matching_images():
    assert i2v_a14b_output_size(720, 1280, 720 * 1280) == (720, 1280)
    assert i2v_a14b_output_size(832, 480, 480 * 832) == (832, 480)
    assert ti2v_output_size(704, 1280, 704 * 1280) == (704, 1280)
    assert ti2v_output_size(1280, 704, 704 * 1280) == (1280, 704)


ASPECTS = [(600, 1000), (1000, 600), (1, 1), (480, 832), (1080, 1920), (3024, 4032), (333, 1777), (2000, 7), (7, 2000), (719, 1281)]
AREAS = [1280 * 720, 480 * 832, 1280 * 704, 256 * 256]


@pytest.mark.parametrize("h,w", ASPECTS)
def test_output_sizes_equal_the_official_expressions(h, w):
    for area in AREAS:
        expected = _official_i2v_a14b_size(h, w, area)
        if 0 in expected:
            with pytest.raises(ValueError, match="too elongated"):
                i2v_a14b_output_size(h, w, area)
        else:
            assert i2v_a14b_output_size(h, w, area) == expected
        try:
            ow, oh = _official_best_output_size(w, h, 32, 32, area)
        except ZeroDivisionError:  # the official code divides by a side that rounded to zero
            with pytest.raises(ValueError, match="too elongated"):
                ti2v_output_size(h, w, area)
        else:
            assert ti2v_output_size(h, w, area) == (oh, ow)


def test_output_sizes_are_multiples_within_the_area():
    rng = np.random.default_rng(2)
    for h, w in rng.integers(64, 4096, (200, 2)):
        h, w = int(h), int(w)
        oh, ow = i2v_a14b_output_size(h, w, 1280 * 720)
        assert oh % 16 == 0 and ow % 16 == 0 and oh * ow <= 1280 * 720
        assert ti2v_output_size(h, w, 1280 * 704) == tuple(reversed(_official_best_output_size(w, h, 32, 32, 1280 * 704)))
        oh, ow = ti2v_output_size(h, w, 1280 * 704)
        assert oh % 32 == 0 and ow % 32 == 0 and oh * ow <= 1280 * 704


def test_sizes_reject_bad_arguments():
    with pytest.raises(ValueError, match="image_width"):
        i2v_a14b_output_size(10, 0, 1000)
    with pytest.raises(ValueError, match="max_area"):
        ti2v_output_size(10, 10, 1.5)


def _official_unit_range(pixels):
    """TF.to_tensor(img).sub_(0.5).div_(0.5) for an RGB PIL image, spelled out in numpy."""
    x = np.asarray(Image.fromarray(pixels), dtype=np.uint8).astype(np.float32) / np.float32(255)
    return torch.from_numpy(((x - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1).copy())


def test_i2v_a14b_image_at_its_own_size_is_the_pixels_in_unit_range():
    pixels = _noise(24, 40)
    pixels[0, 0], pixels[0, 1], pixels[0, 2] = 0, 255, 128
    got = i2v_a14b_image(pixels, 24, 40)
    assert got.dtype == torch.float32 and got.shape == (3, 24, 40)
    assert torch.equal(got, _official_unit_range(pixels))  # bicubic at scale 1 is the identity
    assert got[:, 0, 0].tolist() == [-1.0] * 3 and got[:, 0, 1].tolist() == [1.0] * 3
    assert got[0, 0, 2].item() == pytest.approx(128 / 255 * 2 - 1, abs=1e-7)


def test_i2v_a14b_image_is_official_bicubic_without_aligned_corners():
    pixels = _noise(60, 100, seed=3)
    height, width = i2v_a14b_output_size(60, 100, 128 * 96)
    got = i2v_a14b_image(pixels, height, width)
    expected = F.interpolate(_official_unit_range(pixels)[None], size=(height, width), mode="bicubic", align_corners=False)[0]
    assert got.shape == (3, height, width)
    assert torch.equal(got, expected)
    # The tolerance is exact equality, and it tells the neighbouring choices apart.
    for wrong in (
        F.interpolate(_official_unit_range(pixels)[None], size=(height, width), mode="bicubic", align_corners=True)[0],
        F.interpolate(_official_unit_range(pixels)[None], size=(height, width), mode="bilinear")[0],
    ):
        assert (got - wrong).abs().max() > 0.05


def test_i2v_a14b_image_stretches_without_cropping():
    pixels = np.full((100, 300, 3), 128, np.uint8)
    corners = {(0, 0): (255, 0, 0), (0, -1): (0, 255, 0), (-1, 0): (0, 0, 255), (-1, -1): (255, 255, 0)}
    for (y, x), colour in corners.items():
        ys = slice(0, 10) if y == 0 else slice(-10, None)
        xs = slice(0, 30) if x == 0 else slice(-30, None)
        pixels[ys, xs] = colour
    got = i2v_a14b_image(pixels, 64, 64)  # a 3:1 image squeezed to 1:1
    for (y, x), colour in corners.items():
        expected = torch.tensor(colour, dtype=torch.float32) / 255 * 2 - 1
        torch.testing.assert_close(got[:, y, x], expected, atol=0.02, rtol=0)


def _official_ti2v(pixels, oh, ow):
    """wan/textimage2video.py WanTI2V.i2v preprocessing, with PIL as there."""
    img = Image.fromarray(pixels)
    iw, ih = img.width, img.height
    scale = max(ow / iw, oh / ih)
    img = img.resize((round(iw * scale), round(ih * scale)), Image.LANCZOS)
    x1 = (img.width - ow) // 2
    y1 = (img.height - oh) // 2
    img = img.crop((x1, y1, x1 + ow, y1 + oh))
    return _official_unit_range(np.asarray(img))


@pytest.mark.parametrize("h,w", [(600, 1000), (1000, 600), (333, 1777), (512, 512)])
def test_ti2v_image_equals_the_official_preprocessing(h, w):
    pixels = _noise(h, w, seed=h)
    oh, ow = ti2v_output_size(h, w, 256 * 384)
    got = ti2v_image(pixels, oh, ow)
    assert got.dtype == torch.float32 and got.shape == (3, oh, ow)
    assert torch.equal(got, _official_ti2v(pixels, oh, ow))
    assert got.min() >= -1 and got.max() <= 1


def _red_centroid(frame):
    """(row, col) centroid of where red exceeds green in a [3, H, W] frame."""
    weight = (frame[0] - frame[1]).clamp(min=0)
    rows, cols = torch.meshgrid(torch.arange(frame.shape[1]), torch.arange(frame.shape[2]), indexing="ij")
    return (weight * rows).sum().item() / weight.sum().item(), (weight * cols).sum().item() / weight.sum().item()


@pytest.mark.parametrize("height,width", [(256, 512), (512, 256)])
def test_ti2v_image_crops_the_centre(height, width):
    # A 300x400 grey image with a red square at its centre, and two red marks on the axis the crop
    # cuts, at equal distances from the centre. 256x512 scales by 1.28 to 512x384 and cuts 64 rows
    # from top and bottom; 512x256 scales to 683x512 and cuts 213 columns left and 214 right, so
    # the centre lands half a pixel right of the middle (hence the 0.6 tolerance).
    pixels = np.full((300, 400, 3), 128, np.uint8)
    pixels[140:160, 190:210] = (255, 0, 0)
    got = ti2v_image(pixels, height, width)
    row, col = _red_centroid(got)
    assert abs(row - (height - 1) / 2) < 0.6 and abs(col - (width - 1) / 2) < 0.6
    # (A top-left crop would put the square 64 rows or 213 columns off the centre.)

    marks = np.full((300, 400, 3), 128, np.uint8)
    if height < width:  # rows are cut: marks above and below the centre
        marks[60:70, 195:205] = (255, 0, 0)
        marks[230:240, 195:205] = (255, 0, 0)
    else:  # columns are cut
        marks[145:155, 130:140] = (255, 0, 0)
        marks[145:155, 260:270] = (255, 0, 0)
    got = ti2v_image(marks, height, width)
    row, col = _red_centroid(got)
    assert abs(row - (height - 1) / 2) < 0.6 and abs(col - (width - 1) / 2) < 0.6


def test_image_functions_reject_non_uint8_rgb():
    with pytest.raises(ValueError, match="uint8"):
        ti2v_image(np.zeros((8, 8, 3), np.float32), 8, 8)
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        i2v_a14b_image(np.zeros((8, 8, 4), np.uint8), 8, 8)
    with pytest.raises(ValueError, match="height"):
        i2v_a14b_image(np.zeros((8, 8, 3), np.uint8), 0, 8)


def test_probe_image_reads_the_size_from_the_header_and_names_bad_files(tmp_path):
    from engine.image import probe_image

    Image.fromarray(np.zeros((30, 70, 3), np.uint8)).save(tmp_path / "a.webp")
    assert probe_image(str(tmp_path / "a.webp")) == (70, 30)
    (tmp_path / "b.png").write_text("hello")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "c.bmp")
    for name, reason in (("b.png", "not a PNG, JPEG or WebP image"), ("c.bmp", "not a PNG, JPEG or WebP image"),
                         ("missing.png", "no such file")):
        with pytest.raises(ImageError) as exc:
            probe_image(str(tmp_path / name))
        assert str(exc.value).startswith(str(tmp_path / name)) and reason in str(exc.value), str(exc.value)
