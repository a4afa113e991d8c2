"""Image files to the uint8 RGB arrays the networks take: what `--mode predict` and image
folder data sets both read a file with.

Each file becomes a `size` x `size` RGB uint8 image (32 by default, CIFAR's), the way a
user would expect:

* its EXIF orientation is applied (a phone photo is classified upright);
* transparency (RGBA, LA, a palette's or PNG's transparent colour) is composited on
  white; grayscale is repeated over the three channels; 16-bit grayscale is scaled to
  8 bits (Pillow's own conversion would clip it at 255);
* the centred largest square is cropped (CIFAR's objects fill a square frame; padding
  would shrink them further), then resized with Lanczos, Pillow's sharpest
  antialiasing filter, with `reducing_gap=3` (large photos are first shrunk by an
  integer factor with a box filter, much faster and no visible difference).

A 32x32 RGB image passes through unchanged, so a CIFAR image saved as PNG is classified
exactly as `--mode eval` classifies it. A file that cannot be read, is not an image or has
more than MAX_PIXELS pixels (a decompression bomb) is an Error saying why.
"""

import warnings

import numpy as np
from PIL import Image, ImageOps

from resnet_jax.errors import Error

IMAGE_SIZE = 32
MAX_PIXELS = 50_000_000  # larger files are refused before they are decoded
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes for 16-bit grayscale
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency composited on white, 16-bit grayscale scaled down."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    return image.convert("RGB")


def center_square(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """The centred largest square of `image`, resized to `size` x `size` (Lanczos)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def load_image(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """The file at `path` as a (size, size, 3) uint8 RGB image; raises Error saying why it cannot."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:  # Reads the header only.
                if image.width * image.height > MAX_PIXELS:
                    raise Error(
                        f"{image.width}x{image.height} pixels is over the limit of {MAX_PIXELS:,} "
                        f"(a decompression bomb, or a photo to shrink first)"
                    )
                return np.asarray(center_square(to_rgb(ImageOps.exif_transpose(image)), size))
    except Error:
        raise
    except Image.UnidentifiedImageError:
        raise Error("not an image file (Pillow cannot identify it)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise Error(f"refused: {e}") from None
    except Exception as e:  # Pillow raises many kinds for truncated or corrupt data.
        message = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise Error(f"cannot read the image: {message.splitlines()[0]}") from None
