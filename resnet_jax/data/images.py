"""An image file as the uint8 RGB array `--mode predict` and image folders read: EXIF orientation
applied, transparency on white, the centred largest square (CIFAR's objects fill a square frame)
resized with Lanczos; a 32x32 RGB image, such as CIFAR's saved as PNG, passes unchanged."""

import warnings

import numpy as np
from PIL import Image, ImageOps

from resnet_jax.errors import Error

IMAGE_SIZE = 32
MAX_PIXELS = 50_000_000  # larger files are refused before they are decoded
SIXTEEN_BIT_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N")  # Pillow's modes for 16-bit grayscale
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: transparency on white, 16-bit grayscale scaled (Pillow's own conversion clips it at 255)."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image).astype(np.float64) / 257.0  # 65535 -> 255
        image = Image.fromarray(np.clip(np.round(pixels), 0, 255).astype(np.uint8))
    if image.mode in ALPHA_MODES or "transparency" in image.info:
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image.convert("RGBA"))
    return image.convert("RGB")


def center_square(image: Image.Image, size: int = IMAGE_SIZE) -> Image.Image:
    """The centred largest square of `image`, resized to `size` x `size` with Lanczos (a large
    photo first shrunk by an integer factor with a box filter: much faster, no visible difference)."""
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    box = (left, top, left + side, top + side)
    return image.resize((size, size), Image.Resampling.LANCZOS, box=box, reducing_gap=3.0)


def load_image(path: str, size: int = IMAGE_SIZE) -> np.ndarray:
    """The file at `path` as a (size, size, 3) uint8 RGB image; an Error saying why it cannot be."""
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
