"""Conditioning images for the image-to-video families: reading, and the official resize rules.

`read_image` decodes a PNG, JPEG or WebP file the way the official
`generate.py` does (`Image.open(args.image).convert("RGB")`): alpha is dropped
(not composited), palette and greyscale images are expanded to RGB, EXIF
orientation is not applied.

Each family turns the image into the first frame of its video by its own rule,
here as a pair of functions: the output size for an image, and the image as a
float tensor [3, H, W] in [-1, 1] at that size (what the VAE encodes).

- I2V-A14B (`wan/image2video.py`): the requested area reshaped to the image's
  aspect ratio, sides floored to multiples of 16; the image stretched to it
  with bicubic `F.interpolate` (nothing cropped).
- TI2V-5B (`wan/textimage2video.py`, `wan/utils/utils.py`): the multiple-of-32
  size nearest the image's aspect ratio within the area; the image resized with
  PIL LANCZOS to cover it and centre-cropped.
"""
import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from jobs.inputs import InputError, find_input
from jobs.sources import first_line

FORMATS = ("PNG", "JPEG", "WEBP")
# Below Pillow's own DecompressionBombWarning threshold (Image.MAX_IMAGE_PIXELS, ~89.5M),
# so an image is refused here, with the file named, before Pillow would complain.
MAX_PIXELS = 64 * 1024 * 1024
MAX_BYTES = 256 * 1024 * 1024  # the file is read whole before decoding (one request on object stores)


class ImageError(InputError):
    """An image file that cannot be used: missing, unreadable, not an image, truncated, too large."""


def read_image(uri: str) -> np.ndarray:
    """The image at `uri` (local path or pyarrow URI) as uint8 RGB [H, W, 3]; ImageError naming the file if it cannot be."""
    try:
        file = find_input(uri)
    except InputError as exc:
        raise ImageError(str(exc)) from None
    name = file.name
    if file.size > MAX_BYTES:
        raise ImageError(f"{name}: {file.size} bytes, over the {MAX_BYTES}-byte limit for an image")
    try:
        with file.fs.open_input_stream(file.path) as stream:
            data = stream.read(MAX_BYTES + 1)
    except (OSError, ValueError) as exc:  # pyarrow's errors are OSError or ValueError subclasses
        raise ImageError(f"{name}: cannot read image ({first_line(exc)})") from None
    if len(data) > MAX_BYTES:
        raise ImageError(f"{name}: over the {MAX_BYTES}-byte limit for an image")
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.UnidentifiedImageError:
        raise ImageError(f"{name}: not a PNG, JPEG or WebP image") from None
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: more than {MAX_PIXELS} pixels, refused as a likely decompression bomb") from None
    except Exception as exc:  # Pillow's header parsers raise many types on malformed data
        raise ImageError(f"{name}: corrupt or truncated image ({first_line(exc)})") from None
    with image:
        width, height = image.size
        # The header's size is checked before any pixel is decoded.
        if width * height > MAX_PIXELS:
            raise ImageError(
                f"{name}: {width}x{height} image has more than {MAX_PIXELS} pixels, refused as a likely decompression bomb"
            )
        try:
            rgb = image.convert("RGB")
        except Exception as exc:  # OSError (truncated), SyntaxError (broken PNG), EOFError, ...
            raise ImageError(f"{name}: corrupt or truncated {image.format} image ({first_line(exc)})") from None
    return np.array(rgb, dtype=np.uint8)


def probe_image(uri: str) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels: ImageError naming the
    file for a missing file, another format, a corrupt header or a decompression bomb.

    The driver runs this on every distinct input image before rendering, so a
    bad image is that row's error up front rather than a failed job later.
    """
    try:
        file = find_input(uri)
    except InputError as exc:
        raise ImageError(str(exc)) from None
    try:
        with file.fs.open_input_file(file.path) as stream:
            try:
                with Image.open(stream, formats=FORMATS) as image:
                    width, height = image.size
            except Image.UnidentifiedImageError:
                raise ImageError(f"{file.name}: not a PNG, JPEG or WebP image") from None
            except Image.DecompressionBombError:
                raise ImageError(f"{file.name}: more than {MAX_PIXELS} pixels, refused as a likely decompression bomb") from None
            except ImageError:
                raise
            except Exception as exc:  # Pillow's header parsers raise many types on malformed data
                raise ImageError(f"{file.name}: corrupt or truncated image ({first_line(exc)})") from None
    except (OSError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"{file.name}: cannot read image ({first_line(exc)})") from None
    if width * height > MAX_PIXELS:
        raise ImageError(f"{file.name}: {width}x{height} image has more than {MAX_PIXELS} pixels, "
                         "refused as a likely decompression bomb")
    return width, height


def _check_image(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(
            f"image must be a uint8 array [H, W, 3], got {type(image).__name__} "
            f"{getattr(image, 'dtype', '')} {list(getattr(image, 'shape', []))}"
        )
    if 0 in image.shape:
        raise ValueError(f"image must not be empty, got shape {list(image.shape)}")
    return image


def _check_size(**sizes: int) -> None:
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive integer, got {value!r:.80}")


def to_unit_range(image: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] as float32 [3, H, W] in [-1, 1]: torchvision's `to_tensor` (x / 255), then `(x - 0.5) / 0.5`."""
    x = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()
    return x.to(torch.float32).div(255).sub(0.5).div(0.5)


def i2v_a14b_output_size(
    image_height: int, image_width: int, max_area: int, vae_stride: int = 8, patch: int = 2
) -> tuple[int, int]:
    """(height, width) of an I2V-A14B video for an image of this size.

    Official `wan/image2video.py` `WanI2V.generate`: with aspect = h / w,
    lat_h = round(sqrt(max_area * aspect) // vae_stride // patch * patch),
    lat_w = round(sqrt(max_area / aspect) // vae_stride // patch * patch),
    and the video is (lat_h * vae_stride, lat_w * vae_stride).
    """
    _check_size(image_height=image_height, image_width=image_width, max_area=max_area, vae_stride=vae_stride, patch=patch)
    aspect = image_height / image_width
    # math.sqrt and float // are the IEEE operations np.sqrt and np.float64 // perform there.
    lat_h = round(math.sqrt(max_area * aspect) // vae_stride // patch * patch)
    lat_w = round(math.sqrt(max_area / aspect) // vae_stride // patch * patch)
    if lat_h == 0 or lat_w == 0:
        raise ValueError(
            f"a {image_width}x{image_height} image is too elongated for an area of {max_area} pixels: "
            f"one side rounds to zero"
        )
    return lat_h * vae_stride, lat_w * vae_stride


def i2v_a14b_image(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The image as I2V-A14B's first frame: float32 [3, height, width], about [-1, 1].

    Official `wan/image2video.py` `WanI2V.generate`: `TF.to_tensor(img).sub_(0.5).div_(0.5)`,
    then `F.interpolate(img[None].cpu(), size=(h, w), mode='bicubic')` (align_corners
    left at its default, False). The aspect ratio is stretched, not cropped, and
    bicubic overshoot past [-1, 1] is kept, as there.
    """
    _check_image(image)
    _check_size(height=height, width=width)
    return F.interpolate(to_unit_range(image)[None], size=(height, width), mode="bicubic")[0]


def ti2v_output_size(
    image_height: int, image_width: int, max_area: int, vae_stride: int = 16, patch: int = 2
) -> tuple[int, int]:
    """(height, width) of a TI2V-5B video for an image of this size.

    Official `wan/utils/utils.py` `best_output_size(w, h, dw, dh, expected_area)` with
    dw = dh = patch * vae_stride, as called from `wan/textimage2video.py` `WanTI2V.i2v`:
    two candidates within the area, one flooring the width to a multiple of dw first,
    one the height; the one whose aspect ratio is nearer the image's wins, the
    height-first one on a tie.
    """
    _check_size(image_height=image_height, image_width=image_width, max_area=max_area, vae_stride=vae_stride, patch=patch)
    step = patch * vae_stride
    ratio = image_width / image_height
    ow = (max_area * ratio) ** 0.5
    oh = max_area / ow
    ow1 = int(ow // step * step)
    oh1 = int(max_area / ow1 // step * step) if ow1 else 0
    oh2 = int(oh // step * step)
    ow2 = int(max_area / oh2 // step * step) if oh2 else 0
    if 0 in (ow1, oh1, ow2, oh2):
        raise ValueError(
            f"a {image_width}x{image_height} image is too elongated for an area of {max_area} pixels "
            f"in multiples of {step}: one side rounds to zero"
        )
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return oh1, ow1
    return oh2, ow2


def ti2v_image(image: np.ndarray, height: int, width: int) -> torch.Tensor:
    """The image as TI2V-5B's first frame: float32 [3, height, width] in [-1, 1].

    Official `wan/textimage2video.py` `WanTI2V.i2v`: scale = max(ow / iw, oh / ih),
    PIL LANCZOS resize to (round(iw * scale), round(ih * scale)), crop the centre
    (x1 = (W - ow) // 2, y1 = (H - oh) // 2) to (ow, oh), then
    `TF.to_tensor(img).sub_(0.5).div_(0.5)`.
    """
    _check_image(image)
    _check_size(height=height, width=width)
    ih, iw = image.shape[:2]
    scale = max(width / iw, height / ih)
    pil = Image.fromarray(image).resize((round(iw * scale), round(ih * scale)), Image.Resampling.LANCZOS)
    x1, y1 = (pil.width - width) // 2, (pil.height - height) // 2
    pil = pil.crop((x1, y1, x1 + width, y1 + height))
    return to_unit_range(np.asarray(pil))
