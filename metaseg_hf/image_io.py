"""Reading images and label maps as MetaSeg's official pipeline does, for the processor, the data and the metric.

The one home of these rules:

- images: files opened with errors that name the path, EXIF orientation applied (as OpenCV's `imread`),
  converted to 8-bit RGB (alpha dropped, grey/palette/CMYK converted, 16-bit keeps the high byte), or,
  for models whose input is not RGB, kept with their own channels;
- label maps: which PIL modes hold class ids, (H, W) int64 maps from images, arrays and tensors;
- the ignore index (255) and MMSegmentation's `reduce_zero_label`.

This file is copied into Hub repositories for ``trust_remote_code`` with the image processor: it imports
third-party code only from torch, numpy, PIL and transformers.
"""

import os

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_utils import ChannelDimension
from transformers.utils import logging

logger = logging.get_logger(__name__)

# Label value of ignored pixels (MMSegmentation's and MetaSeg's): skipped by the loss and the metric, used
# to pad labels, and what `reduce_zero_label` turns 0 into.
IGNORE_INDEX = 255
SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
# PIL modes whose pixel values are class ids (palette images: the indices, not the colours).
LABEL_MODES = ("L", "P", "I", "1") + SIXTEEN_BIT_MODES
EXIF_ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright (Pillow's `ImageOps.exif_transpose` table).
ORIENTATION_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
EXPECTED_IMAGE = (
    "a PIL image, a numpy array or torch tensor (HWC or CHW, uint8, uint16 or float in [0, 1]), a path to an "
    "image file, or a list of those"
)
EXPECTED_MAP = (
    "a single-channel map of class indices: a PIL image (mode 'L', 'P', 'I' or 'I;16'), an integer numpy array "
    "or torch tensor of shape (H, W), a path to such an image file, or a list of those (colour-coded labels "
    "must be converted to class ids first)"
)


def describe(value) -> str:
    """A short description of an input for error messages."""
    if isinstance(value, np.ndarray):
        return f"numpy array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, torch.Tensor):
        return f"torch tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, Image.Image):
        return f"PIL image of mode {value.mode!r} and size {value.size[0]}x{value.size[1]} (width x height)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


# ----------------------------------------------------------------------------------------------------
# Files and orientation
# ----------------------------------------------------------------------------------------------------


class ImageFileError(ValueError):
    """An image file that cannot be read: `path` (as given), `reason` (what went wrong: Pillow's words, or
    the size check's) and `size` ((width, height) from the header, when it was read)."""

    def __init__(self, message: str, path, reason: str, size: tuple[int, int] | None = None):
        super().__init__(message)
        self.path, self.reason, self.size = path, reason, size


class ImageTooLargeError(ImageFileError):
    """An image file refused from its header, before decoding, for having more than `max_pixels` pixels."""

    def __init__(self, message: str, path, reason: str, size: tuple[int, int], max_pixels: int):
        super().__init__(message, path, reason, size)
        self.max_pixels = max_pixels


# What Pillow raises for a file it cannot identify or decode (a truncated JPEG header, a bad BMP header, a
# broken PNG chunk, ...).
_PILLOW_READ_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


def open_image_file(path, name: str, max_pixels: int | None = None) -> Image.Image:
    """Opens and decodes a local image file; every failure is a ValueError that names `name` and the path
    (an `ImageFileError`, with the reason apart, for a file that exists but cannot be read).

    max_pixels: refuse, with an `ImageTooLargeError`, an image whose header gives more pixels, before its
    pixels are decoded. Pillow's own decompression-bomb limit (`PIL.Image.MAX_IMAGE_PIXELS`) applies first.
    """
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        raise ValueError(
            f"`{name}` is the URL {text!r}: the processor does not download images. Load it first (e.g. with "
            "`transformers.image_utils.load_image`) and pass the PIL image."
        )
    image = None
    try:
        image = Image.open(text)
        width, height = image.size
        if max_pixels is None or width * height <= max_pixels:
            image.load()
    except FileNotFoundError:
        raise ValueError(
            f"`{name}` is the path {text!r}, which does not exist; expected a path to an image file."
        ) from None
    except _PILLOW_READ_ERRORS as error:
        if image is not None:
            image.close()
        reason = str(error) or type(error).__name__
        raise ImageFileError(
            f"`{name}` is the path {text!r}, which is not a readable image file ({reason}).", text, reason,
            None if image is None else image.size,
        ) from None
    if max_pixels is not None and width * height > max_pixels:
        image.close()
        reason = (f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more than max_pixels = "
                  f"{max_pixels:,}; refused before decoding")
        raise ImageTooLargeError(f"`{name}` is the path {text!r}, an image of {reason}.", text, reason,
                                 (width, height), max_pixels)
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag of a PIL image (1, upright, when there is none)."""
    orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    return orientation if orientation in ORIENTATION_TRANSPOSES else 1


def apply_orientation(image: Image.Image, orientation: int) -> Image.Image:
    """`image` turned as EXIF `orientation` says (the image itself for 1 or an unknown value)."""
    method = ORIENTATION_TRANSPOSES.get(orientation)
    return image.transpose(method) if method is not None else image


def exif_transpose(image: Image.Image) -> Image.Image:
    """Applies an image's own EXIF orientation, as OpenCV's `imread` does, and drops the tag from the result
    (so a second call changes nothing); the image itself when it is upright."""
    if exif_orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


# ----------------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------------


def _channels_last(
    array: np.ndarray, name: str, input_data_format, channel_counts: tuple, expected_channels: str
) -> np.ndarray:
    """A 3-D array as (H, W, C), the layout taken from `input_data_format` or, when unambiguous, from which
    axis has one of the `channel_counts` (`expected_channels` says which counts are valid, for errors)."""
    if input_data_format is not None:
        return array if ChannelDimension(input_data_format) == ChannelDimension.LAST else np.moveaxis(array, 0, -1)
    first, last = array.shape[0] in channel_counts, array.shape[-1] in channel_counts
    if first and last:
        raise ValueError(
            f"`{name}` ({describe(array)}) could be channels-first or channels-last; pass "
            "input_data_format='channels_first' or 'channels_last'."
        )
    if last:
        return array
    if first:
        return np.moveaxis(array, 0, -1)
    raise ValueError(
        f"`{name}` ({describe(array)}) has {array.shape[0]} channels first and {array.shape[-1]} last; expected "
        f"(H, W), (H, W, C) or (C, H, W) with C = {expected_channels}."
    )


def _to_uint8(array: np.ndarray, name: str) -> np.ndarray:
    """8-bit values: uint8 as is, uint16 keeps the high byte, floats in [0, 1] scale by 255 and round."""
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.uint16:
        if array.size and int(array.max()) < 256:
            logger.warning(
                f"`{name}` is uint16 with all values below 256: as 16-bit data its high byte (value >> 8) is 0 "
                "everywhere and the image is black. Pass 8-bit data as uint8."
            )
        return (array >> 8).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        finite = np.isfinite(array)
        if not finite.all():
            raise ValueError(
                f"`{name}` is a float image with {array.size - int(finite.sum())} NaN or infinite values; expected "
                "finite values in [0, 1]. Check how the image was decoded or computed."
            )
        low, high = array.min(), array.max()
        if not (low >= 0 and high <= 1):
            raise ValueError(
                f"`{name}` is a float image with values in [{low}, {high}]; expected values in [0, 1] (for 0-255 "
                "data pass a uint8 array)."
            )
        if array.dtype == np.float16:
            array = array.astype(np.float32)
        return np.rint(array * 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.integer):
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise ValueError(
                f"`{name}` is a {array.dtype} image with values in [{low}, {high}]; expected 0..255 (8-bit), or a "
                "uint16 array for 16-bit data."
            )
        return array.astype(np.uint8)
    raise TypeError(
        f"`{name}` has dtype {array.dtype}; expected uint8, uint16 or a float dtype with values in [0, 1]."
    )


def _to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach()
    if tensor.dtype in (torch.float16, torch.bfloat16):
        tensor = tensor.float()
    return tensor.cpu().numpy()


def _pil_to_array(image: Image.Image, name: str, convert_rgb: bool) -> np.ndarray:
    """The pixels of an (upright) PIL image: RGB (or its own channels without `convert_rgb`), 16-bit high byte."""
    mode = image.mode
    if mode == "RGB":
        return np.array(image)
    if mode in SIXTEEN_BIT_MODES or mode == "I":
        array = np.array(image)
        if mode == "I":
            low, high = int(array.min()), int(array.max())
            if low < 0 or high > 65535:
                raise ValueError(
                    f"`{name}` ({describe(image)}) has values in [{low}, {high}]; expected 16-bit values 0..65535."
                )
        return (array.astype(np.uint16) >> 8).astype(np.uint8)
    if mode == "F":
        return np.array(image)
    if not convert_rgb:
        if mode in ("P", "PA"):
            raise ValueError(
                f"`{name}` ({describe(image)}) holds palette indices, and do_convert_rgb=False feeds an image's own "
                "channels to the model. Convert it first (e.g. `image.convert('L')`)."
            )
        return np.array(image.convert("L") if mode == "1" else image)
    if mode == "P":
        # Palette colours, transparency ignored (what OpenCV's colour read gives), without Pillow's warning
        # about transparency.
        palette = np.zeros((256, 3), dtype=np.uint8)
        entries = np.array(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
        palette[: len(entries)] = entries
        return palette[np.array(image)]
    try:
        return np.array(image.convert("RGB"))
    except (ValueError, OSError) as error:
        raise ValueError(f"`{name}` ({describe(image)}) cannot be converted to RGB: {error}") from None


def read_image(image, name: str, input_data_format=None, convert_rgb: bool = True, num_channels: int = 3) -> torch.Tensor:
    """One input image as the model's preprocessing reads it: a contiguous (H, W, C) uint8 tensor on the CPU
    (see `read_image_and_scale`)."""
    return read_image_and_scale(image, name, input_data_format, convert_rgb, num_channels)[0]


def read_image_and_scale(
    image, name: str, input_data_format=None, convert_rgb: bool = True, num_channels: int = 3
) -> tuple[torch.Tensor, bool]:
    """One input image as the model's preprocessing reads it: a contiguous (H, W, C) uint8 tensor on the CPU,
    and whether the input held floats in [0, 1] (already rescaled, in Transformers' terms), which the
    8-bit values multiply by 255.

    With `convert_rgb` (C = 3, the official pipeline): PIL images get their EXIF orientation applied;
    RGBA/LA/PA lose their alpha channel (not composited, like OpenCV's colour read); grey, palette, CMYK,
    YCbCr, ... go through Pillow's RGB conversion; 16-bit modes keep the high byte. Arrays and tensors: RGB
    channel order, HWC or CHW, 1 (grey), 3 or 4 channels (alpha dropped).

    Without `convert_rgb` (models whose input is not RGB): an image's own channels are kept (PIL "L" is one
    channel, "RGBA" four, ...), and their number must be `num_channels`.
    """
    if isinstance(image, (str, os.PathLike)):
        image = open_image_file(image, name)
    if isinstance(image, Image.Image):
        image = exif_transpose(image)
        array = _pil_to_array(image, name, convert_rgb)
        input_data_format = ChannelDimension.LAST
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = _to_numpy(image) if isinstance(image, torch.Tensor) else image
    else:
        raise TypeError(f"`{name}` is a {describe(image)}; expected {EXPECTED_IMAGE}.")

    if array.size == 0:
        raise ValueError(f"`{name}` is empty ({describe(array)}); expected an image with at least one pixel.")
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        raise TypeError(
            f"`{name}` ({describe(image)}) has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]."
        )
    # Layouts are recognised by the usual channel counts (and the model's); the count is checked below.
    channel_counts = (1, 3, 4) if convert_rgb else tuple(sorted({1, 3, 4, num_channels}))
    expected_channels = (
        "1 (grey), 3 (RGB) or 4 (RGBA)" if convert_rgb else f"{num_channels} (the length of image_mean / image_std)"
    )
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = _channels_last(array, name, input_data_format, channel_counts, expected_channels)
    else:
        raise ValueError(f"`{name}` is a {describe(image)}; expected (H, W), (H, W, C) or (C, H, W).")
    channels = array.shape[2]
    if convert_rgb and channels not in channel_counts:
        raise ValueError(f"`{name}` ({describe(image)}) has {channels} channels; expected {expected_channels}.")
    if not convert_rgb and channels != num_channels:
        raise ValueError(
            f"`{name}` ({describe(image)}) has {channels} channel(s), but the processor expects {num_channels} "
            f"(the length of image_mean / image_std) and do_convert_rgb=False feeds an image's own channels. Pass "
            f"{num_channels}-channel images" + (", or use do_convert_rgb=True for RGB." if num_channels == 3 else ".")
        )
    unit_floats = bool(np.issubdtype(array.dtype, np.floating))
    array = _to_uint8(array[:, :, :3] if convert_rgb else array, name)
    tensor = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else np.array(array))
    if convert_rgb and channels == 1:
        tensor = tensor.expand(-1, -1, 3)
    return tensor.contiguous(), unit_floats


# ----------------------------------------------------------------------------------------------------
# Label maps
# ----------------------------------------------------------------------------------------------------


def read_label(label, name: str) -> torch.Tensor:
    """One segmentation map as an (H, W) int64 tensor on the CPU, always a copy of the caller's data.

    PIL images (or paths) of a class-id mode (`LABEL_MODES`; EXIF orientation applied), integer (or
    integer-valued float, or bool) arrays and tensors of shape (H, W), (1, H, W) or (H, W, 1).
    """
    if isinstance(label, (str, os.PathLike)):
        label = open_image_file(label, name)
    if isinstance(label, Image.Image):
        label = exif_transpose(label)
        if label.mode not in LABEL_MODES:
            raise ValueError(f"`{name}` is a {describe(label)}; expected {EXPECTED_MAP}.")
        array = np.array(label)
    elif isinstance(label, (np.ndarray, torch.Tensor)):
        array = _to_numpy(label) if isinstance(label, torch.Tensor) else label
    else:
        raise TypeError(f"`{name}` is a {describe(label)}; expected {EXPECTED_MAP}.")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"`{name}` is a {describe(label)}; expected {EXPECTED_MAP}.")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty ({describe(label)}); expected {EXPECTED_MAP}.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"`{name}` ({describe(label)}) holds non-integer values; expected integer class indices."
            )
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise TypeError(f"`{name}` ({describe(label)}) has dtype {array.dtype}; expected integer class indices.")
    return torch.from_numpy(np.array(array, dtype=np.int64))


def reduce_zero_label(label: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """MMSegmentation's `reduce_zero_label` for ADE20K-style labels (0 = "other"), on any device.

    0 becomes `ignore_index`, every other value is lowered by one, `ignore_index` stays itself.
    (H, W) or (N,) integer tensor -> int64 tensor of the same shape (a new tensor).
    """
    label = label.long()
    reduced = torch.where(label == 0, ignore_index, label - 1)
    return reduced.masked_fill_(label == ignore_index, ignore_index)


__all__ = [
    "EXPECTED_IMAGE",
    "EXPECTED_MAP",
    "IGNORE_INDEX",
    "ImageFileError",
    "ImageTooLargeError",
    "LABEL_MODES",
    "apply_orientation",
    "describe",
    "exif_orientation",
    "exif_transpose",
    "open_image_file",
    "read_image",
    "read_image_and_scale",
    "read_label",
    "reduce_zero_label",
]
