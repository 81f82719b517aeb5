"""Image decoding and preprocessing shared by training, evaluation and serving.

Training and inference must turn a JPEG into exactly the same tensor, so both call these
functions; `train.py` copies this module into the model's `code/` folder next to
`inference.py`.

Images are squashed (resized without keeping the aspect ratio) to a square, because most of the
recovered ABID images are already 224x224 squashed copies of the originals: squashing the
originals too keeps every image on the same geometry.
"""

from __future__ import annotations

import io
import warnings

import torch
from PIL import Image, ImageFile, UnidentifiedImageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# Pillow's own bomb guard warns at MAX_IMAGE_PIXELS and raises at twice that; we check our
# own, lower limit before decoding, and keep Pillow's as a second line of defence.
DEFAULT_MAX_PIXELS = 40_000_000
SUPPORTED_FORMATS = ("JPEG", "PNG")

# A truncated JPEG must fail loudly, never decode half grey.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class ImageRejected(ValueError):
    """The bytes are not an image we accept. `reason` is a short machine-readable code, the API's
    (api_contract.json); `image_format` the format Pillow found, when that is the reason."""

    def __init__(self, reason: str, message: str, image_format: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.image_format = image_format

    def __reduce__(self):  # keep the arguments when raised in a worker process
        return (type(self), (self.reason, str(self), self.image_format))


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, size: int | None = None) -> Image.Image:
    """Decode JPEG or PNG bytes into an RGB image, or raise `ImageRejected` saying why.

    `size`, when given, lets the JPEG decoder scale down while decoding (DCT scaling), which is
    several times faster for large photos and changes nothing for 224 px copies.
    """
    if not data:
        raise ImageRejected("empty_image", "the image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.format not in SUPPORTED_FORMATS:
                raise ImageRejected(
                    "unsupported_format",
                    f"image format {img.format} is not supported; send JPEG or PNG",
                    img.format,
                )
            width, height = img.size
            if width * height > max_pixels:
                raise ImageRejected(
                    "too_many_pixels",
                    f"image is {width}x{height} = {width * height} pixels, above the limit of {max_pixels}",
                )
            if size is not None and img.format == "JPEG":
                img.draft("RGB", (size, size))
            img.load()
    except ImageRejected:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageRejected("too_many_pixels", f"image rejected as a decompression bomb: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise ImageRejected("not_an_image", "the data is not a JPEG or PNG image") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        # Pillow reports truncated or corrupt data as OSError ("image file is truncated").
        raise ImageRejected("corrupt_image", f"the image could not be decoded: {exc}") from exc
    return img.convert("RGB")


def to_uint8_tensor(img: Image.Image, size: int) -> torch.Tensor:
    """Squash-resize to `size` x `size` and return a uint8 CHW tensor (cheap to cache)."""
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
    buf = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return buf.view(size, size, 3).permute(2, 0, 1).contiguous()


def decode(data: bytes, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> torch.Tensor:
    """Bytes to the uint8 CHW tensor the model's input is built from."""
    return to_uint8_tensor(open_image(data, max_pixels=max_pixels, size=size), size)


def normalize(batch: torch.Tensor) -> torch.Tensor:
    """Float NCHW batch in [0, 1] to the ImageNet-normalised input of the backbones."""
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (batch - mean) / std


def describe(size: int) -> dict:
    """What the model card records about preprocessing, so a client can reproduce it."""
    return {
        "resize": [size, size],
        "resize_mode": "squash (aspect ratio not kept), bilinear, JPEG DCT draft scaling",
        "color": "RGB",
        "scale": "1/255",
        "mean": list(IMAGENET_MEAN),
        "std": list(IMAGENET_STD),
    }
