"""Image processor for MetaSeg: the official MMSegmentation test pipeline, bit for bit, without torchvision.

The official pipeline (``hyunwoo137/MetaSeg``, MMSegmentation 0.24) reads images with OpenCV as 8-bit
colour, resizes them keeping the aspect ratio into a (long, short) box with OpenCV's bilinear
interpolation on uint8, resizes again up to a multiple of 32 (ADE20K, COCO-Stuff), and normalises with
the ImageNet statistics. Its fixed-point uint8 arithmetic is reproduced here exactly with vectorised
torch integer operations (see ``_opencv_linear_resize``); Pillow's or torch's bilinear resize would
move the pixel values by up to 0.035 and change about a third of the predicted classes of a model with
near ties.

This file is copied into Hub repositories for ``trust_remote_code``: it imports other package modules
only as ``from .presets import ...`` and third-party code only from torch, numpy, PIL and transformers.
"""

import math
import os
from functools import lru_cache
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, validate_preprocess_arguments
from transformers.processing_utils import ImagesKwargs, Unpack
from transformers.utils import logging

from .inference_metaseg import logits_to_prediction, segment
from .presets import DATASETS, IMAGE_MEAN, IMAGE_STD

logger = logging.get_logger(__name__)

# OpenCV's INTER_RESIZE_COEF_BITS: bilinear weights are integers out of 2 ** 11.
_COEF_SCALE = 2048
# Label value for ignored pixels (MMSegmentation's ignore index); label padding uses it.
IGNORE_INDEX = 255
# Stride of MetaSeg's logits relative to its input (stage 2 of MSCAN, where the decoder works).
LOGITS_STRIDE = 8
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")
_LABEL_MODES = ("L", "P", "I", "1") + _SIXTEEN_BIT_MODES
_EXIF_ORIENTATION = 0x0112
_EXPECTED_IMAGE = (
    "a PIL image, a numpy array or torch tensor (HWC or CHW, uint8, uint16 or float in [0, 1]), a path to an "
    "image file, or a list of those"
)
_EXPECTED_MAP = (
    "a single-channel map of class indices: a PIL image (mode 'L', 'P', 'I' or 'I;16'), an integer numpy array "
    "or torch tensor of shape (H, W), a path to such an image file, or a list of those"
)

_ADE20K = DATASETS["ade20k"]


class MetaSegImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int` or `None`, *optional*, defaults to `self.size_divisor`):
        After the keep-ratio resize, resize again up to the next multiple of `size_divisor` of each side (a
        second OpenCV bilinear resize on uint8, the identity when both sides already are multiples), as the
        official ADE20K and COCO-Stuff test pipelines do. `None` skips the step (Cityscapes).
    do_reduce_labels (`bool`, *optional*, defaults to `self.do_reduce_labels`):
        Whether to apply MMSegmentation's `reduce_zero_label` to segmentation maps: 0 (ADE20K's "other")
        becomes 255 (ignored), every other value is decreased by one, 255 stays 255.
    """

    size_divisor: int | None
    do_reduce_labels: bool | None


# ----------------------------------------------------------------------------------------------------
# OpenCV-exact resizing
# ----------------------------------------------------------------------------------------------------


def _linear_axis(source: int, target: int, clamp_weights_at_edges: bool):
    """OpenCV INTER_LINEAR source indices and 11-bit weights along one axis (`source` -> `target` samples).

    Returns `(index0, index1, weight0, weight1)`, each of length `target`: output sample `i` is
    `source[index0[i]] * weight0[i] + source[index1[i]] * weight1[i]` (weights out of 2048). The horizontal
    axis zeroes the fraction outside the image (`clamp_weights_at_edges`); the vertical axis only clamps
    the indices, as OpenCV does.
    """
    scale = 1.0 / (target / source)
    position = ((torch.arange(target, dtype=torch.float64) + 0.5) * scale - 0.5).to(torch.float32)
    start = torch.floor(position)
    fraction = position - start
    start = start.to(torch.int64)
    if clamp_weights_at_edges:
        outside = (start < 0) | (start >= source - 1)
        fraction = torch.where(outside, torch.zeros_like(fraction), fraction)
    index0 = start.clamp(0, source - 1)
    index1 = (start + 1).clamp(0, source - 1)
    # Each weight is rounded on its own (half to even, like cvRound); they need not sum to 2048.
    weight0 = torch.round((1 - fraction) * _COEF_SCALE).to(torch.int32)
    weight1 = torch.round(fraction * _COEF_SCALE).to(torch.int32)
    return index0, index1, weight0, weight1


@lru_cache(maxsize=64)
def _horizontal_table(source: int, target: int, channels: int, device: torch.device):
    """Gather index into an (H, W * C) row and per-value weights for the horizontal pass.

    Returns `index` (1, 2 * target * C) int64 (the left samples, then the right samples) and `weight0`,
    `weight1` (target * C,) int32.
    """
    index0, index1, weight0, weight1 = _linear_axis(source, target, clamp_weights_at_edges=True)
    offsets = torch.arange(channels)
    left = (index0[:, None] * channels + offsets).reshape(-1)
    right = (index1[:, None] * channels + offsets).reshape(-1)
    index = torch.cat([left, right])
    tables = (index[None], weight0.repeat_interleave(channels), weight1.repeat_interleave(channels))
    return tuple(table.to(device) for table in tables)


@lru_cache(maxsize=64)
def _vertical_table(source: int, target: int, device: torch.device):
    """Row indices (target,) int64 and per-row weights (target, 1) int32 for the vertical pass."""
    index0, index1, weight0, weight1 = _linear_axis(source, target, clamp_weights_at_edges=False)
    tables = (index0, index1, weight0[:, None].contiguous(), weight1[:, None].contiguous())
    return tuple(table.to(device) for table in tables)


def _opencv_linear_resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)` on uint8, bit for bit.

    Args:
        image: (H, W, C) uint8 tensor, contiguous.
        height, width: output size.

    Returns:
        (height, width, C) uint8 tensor. A resize to the same size returns `image` itself.

    OpenCV's fixed-point arithmetic: the horizontal pass gives int32 values
    `H = src[x0] * w0 + src[x1] * w1`; the vertical pass gives
    `(((v0 * (H[y0] >> 4)) >> 16) + ((v1 * (H[y1] >> 4)) >> 16) + 2) >> 2`, clipped to 0..255. Checked
    equal to `cv2.resize` (OpenCV 5.0) on 620 noise and smooth images from 1..400 to 1..800 pixels a side,
    exact 2x reductions (which OpenCV sends through INTER_AREA) included, and on the reference photo.
    """
    source_height, source_width, channels = image.shape
    if (height, width) == (source_height, source_width):
        return image
    rows = image.reshape(source_height, source_width * channels)
    if width != source_width:
        index, weight0, weight1 = _horizontal_table(source_width, width, channels, image.device)
        samples = torch.gather(rows, 1, index.expand(source_height, -1))
        count = width * channels
        horizontal = samples[:, :count].to(torch.int32).mul_(weight0)
        horizontal += samples[:, count:] * weight1
        if height != source_height:
            horizontal >>= 4
    else:
        # Same width: weights (2048, 0), so H = src * 2048 (and H >> 4 = src << 7).
        horizontal = rows.to(torch.int32)
        horizontal <<= 7 if height != source_height else 11
    if height != source_height:
        row0, row1, weight0, weight1 = _vertical_table(source_height, height, image.device)
        output = horizontal.index_select(0, row0).mul_(weight0)
        output >>= 16
        lower = horizontal.index_select(0, row1).mul_(weight1)
        lower >>= 16
        output += lower
        output += 2
        output >>= 2
    else:
        # Same height: weights (2048, 0) on the same row, and ((2048 * (H >> 4)) >> 16 + 2) >> 2 == (H + 1024) >> 11.
        output = horizontal
        output += 1024
        output >>= 11
    return output.clamp_(max=255).to(torch.uint8).view(height, width, channels)


def _opencv_nearest_resize(label: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`cv2.resize(label, (width, height), interpolation=cv2.INTER_NEAREST)`: source index floor(i * src / dst).

    Checked equal to OpenCV 5.0 on 310 random size pairs.

    Args:
        label: (H, W) tensor of any dtype.

    Returns:
        (height, width) tensor of the same dtype.
    """
    source_height, source_width = label.shape
    if (height, width) == (source_height, source_width):
        return label

    def indices(source, target):
        scale = 1.0 / (target / source)
        index = torch.floor(torch.arange(target, dtype=torch.float64) * scale).to(torch.int64)
        return index.clamp_(max=source - 1).to(label.device)

    return label.index_select(0, indices(source_height, height)).index_select(1, indices(source_width, width))


def _resize_steps(height: int, width: int, do_resize: bool, size: SizeDict, size_divisor: int | None) -> list:
    """The sizes an image of `height` x `width` is resized to, in order (empty without resizing).

    Keep-ratio mode (`shortest_edge` and/or `longest_edge`): scale = min(longest_edge / long side,
    shortest_edge / short side), new side = int(side * scale + 0.5) (mmcv's `rescale_size`); then, with
    `size_divisor`, each side up to its next multiple (MMSegmentation's `AlignedResize`). Fixed mode
    (`height` and `width`): exactly that size, `size_divisor` not applied.
    """
    if not do_resize:
        return []
    if size.height is not None and size.width is not None:
        return [(size.height, size.width)]
    scales = []
    if size.longest_edge is not None:
        scales.append(size.longest_edge / max(height, width))
    if size.shortest_edge is not None:
        scales.append(size.shortest_edge / min(height, width))
    scale = min(scales)
    new_height, new_width = int(height * float(scale) + 0.5), int(width * float(scale) + 0.5)
    if new_height < 1 or new_width < 1:
        raise ValueError(
            f"An image of {height}x{width} (height x width) would be resized to {new_height}x{new_width} with "
            f"size={dict(size)}: its aspect ratio is too extreme. Crop it first."
        )
    steps = [(new_height, new_width)]
    if size_divisor is not None:
        steps.append((-(-new_height // size_divisor) * size_divisor, -(-new_width // size_divisor) * size_divisor))
    return steps


# ----------------------------------------------------------------------------------------------------
# Input conversion
# ----------------------------------------------------------------------------------------------------


def _describe(value) -> str:
    """A short description of an input for error messages."""
    if isinstance(value, np.ndarray):
        return f"numpy array of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, torch.Tensor):
        return f"torch tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    if isinstance(value, Image.Image):
        return f"PIL image of mode {value.mode!r} and size {value.size[0]}x{value.size[1]} (width x height)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 80 else text[:77] + '...'}"


def _flatten_inputs(inputs, name: str, expected: str, batch_ndim: int) -> list:
    """A flat list of single inputs; arrays/tensors with `batch_ndim` dimensions are split along the first."""
    if inputs is None:
        raise TypeError(f"`{name}` is None; expected {expected}.")
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == batch_ndim:
        if inputs.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch ({_describe(inputs)}); expected at least one.")
        return list(inputs)
    if isinstance(inputs, (list, tuple)):
        if len(inputs) == 0:
            raise ValueError(f"`{name}` is an empty {type(inputs).__name__}; expected at least one of {expected}.")
        for position, item in enumerate(inputs):
            if isinstance(item, (list, tuple)):
                raise TypeError(
                    f"`{name}[{position}]` is a nested {type(item).__name__}; expected a flat list of {expected}."
                )
        return list(inputs)
    return [inputs]


def _open_image_file(path, name: str) -> Image.Image:
    """Opens a local image file, turning every failure into a ValueError that names the path."""
    text = os.fspath(path)
    if isinstance(text, str) and text.startswith(("http://", "https://")):
        raise ValueError(
            f"`{name}` is the URL {text!r}: the processor does not download images. Load it first (e.g. with "
            "`transformers.image_utils.load_image`) and pass the PIL image."
        )
    try:
        image = Image.open(text)
        image.load()
    except FileNotFoundError:
        raise ValueError(
            f"`{name}` is the path {text!r}, which does not exist; expected a path to an image file."
        ) from None
    except (OSError, ValueError, Image.DecompressionBombError) as error:
        raise ValueError(f"`{name}` is the path {text!r}, which is not a readable image file ({error}).") from None
    return image


def _exif_transpose(image: Image.Image) -> Image.Image:
    """Applies the EXIF orientation, as OpenCV's `imread` does; the image itself when there is none."""
    orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    return ImageOps.exif_transpose(image) if orientation not in (None, 1) else image


def _channels_last(array: np.ndarray, name: str, input_data_format) -> np.ndarray:
    """A 3-D array as (H, W, C), the layout taken from `input_data_format` or, when unambiguous, the shape."""
    if input_data_format is not None:
        return array if ChannelDimension(input_data_format) == ChannelDimension.LAST else np.moveaxis(array, 0, -1)
    first, last = array.shape[0] in (1, 3, 4), array.shape[-1] in (1, 3, 4)
    if first and last:
        raise ValueError(
            f"`{name}` ({_describe(array)}) could be channels-first or channels-last; pass "
            "input_data_format='channels_first' or 'channels_last'."
        )
    if last:
        return array
    if first:
        return np.moveaxis(array, 0, -1)
    raise ValueError(
        f"`{name}` ({_describe(array)}) has {array.shape[0]} channels first and {array.shape[-1]} last; expected "
        "(H, W), (H, W, C) or (C, H, W) with C = 1 (grey), 3 (RGB) or 4 (RGBA)."
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


def image_to_rgb(image, name: str, input_data_format=None, convert_rgb: bool = True) -> torch.Tensor:
    """One input image as a contiguous (H, W, 3) uint8 RGB tensor on the CPU.

    PIL images: EXIF orientation applied; RGBA/LA/PA lose their alpha channel (not composited, like OpenCV's
    colour read); grey, palette, CMYK, YCbCr, ... go through Pillow's RGB conversion; 16-bit modes keep the
    high byte. Arrays and tensors: RGB channel order, HWC or CHW, 1 (grey), 3 or 4 channels (alpha dropped).
    """
    if isinstance(image, (str, os.PathLike)):
        image = _open_image_file(image, name)
    if isinstance(image, Image.Image):
        image = _exif_transpose(image)
        mode = image.mode
        if mode == "RGB":
            array = np.array(image)
        elif mode in _SIXTEEN_BIT_MODES or mode == "I":
            array = np.array(image)
            if mode == "I":
                low, high = int(array.min()), int(array.max())
                if low < 0 or high > 65535:
                    raise ValueError(
                        f"`{name}` ({_describe(image)}) has values in [{low}, {high}]; expected 16-bit values "
                        "0..65535."
                    )
            array = (array.astype(np.uint16) >> 8).astype(np.uint8)
        elif mode == "F":
            array = np.array(image)
        elif not convert_rgb:
            raise ValueError(f"`{name}` ({_describe(image)}) is not RGB and do_convert_rgb=False.")
        elif mode == "P":
            # Palette colours, transparency ignored (what OpenCV's colour read gives), without Pillow's
            # warning about transparency.
            palette = np.zeros((256, 3), dtype=np.uint8)
            entries = np.array(image.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)[:256]
            palette[: len(entries)] = entries
            array = palette[np.array(image)]
        else:
            try:
                array = np.array(image.convert("RGB"))
            except (ValueError, OSError) as error:
                raise ValueError(f"`{name}` ({_describe(image)}) cannot be converted to RGB: {error}") from None
        input_data_format = ChannelDimension.LAST
    elif isinstance(image, (np.ndarray, torch.Tensor)):
        array = _to_numpy(image) if isinstance(image, torch.Tensor) else image
    else:
        raise TypeError(f"`{name}` is a {_describe(image)}; expected {_EXPECTED_IMAGE}.")

    if array.size == 0:
        raise ValueError(f"`{name}` is empty ({_describe(array)}); expected an image with at least one pixel.")
    numeric = np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
    if array.dtype == np.bool_ or not numeric:
        raise TypeError(
            f"`{name}` ({_describe(image)}) has dtype {array.dtype}; expected uint8, uint16 or float in [0, 1]."
        )
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        array = _channels_last(array, name, input_data_format)
    else:
        raise ValueError(
            f"`{name}` is a {_describe(image)}; expected (H, W), (H, W, C) or (C, H, W) with C in 1, 3, 4."
        )
    channels = array.shape[2]
    if channels not in (1, 3, 4):
        raise ValueError(
            f"`{name}` ({_describe(image)}) has {channels} channels; expected 1 (grey), 3 (RGB) or 4 (RGBA)."
        )
    if channels != 3 and not convert_rgb:
        raise ValueError(f"`{name}` ({_describe(image)}) has {channels} channels and do_convert_rgb=False.")
    array = _to_uint8(array[:, :, :3], name)
    tensor = torch.from_numpy(np.ascontiguousarray(array) if array.flags.writeable else np.array(array))
    if channels == 1:
        tensor = tensor.expand(-1, -1, 3)
    return tensor.contiguous()


def _label_to_tensor(label, name: str) -> torch.Tensor:
    """One segmentation map as an (H, W) int64 tensor on the CPU (EXIF orientation applied to PIL maps)."""
    if isinstance(label, (str, os.PathLike)):
        label = _open_image_file(label, name)
    if isinstance(label, Image.Image):
        label = _exif_transpose(label)
        if label.mode not in _LABEL_MODES:
            raise ValueError(f"`{name}` is a {_describe(label)}; expected {_EXPECTED_MAP}.")
        array = np.array(label)
    elif isinstance(label, (np.ndarray, torch.Tensor)):
        array = _to_numpy(label) if isinstance(label, torch.Tensor) else label
    else:
        raise TypeError(f"`{name}` is a {_describe(label)}; expected {_EXPECTED_MAP}.")
    if array.ndim == 3 and 1 in (array.shape[0], array.shape[-1]):
        array = array[0] if array.shape[0] == 1 else array[..., 0]
    if array.ndim != 2:
        raise ValueError(f"`{name}` is a {_describe(label)}; expected {_EXPECTED_MAP}.")
    if array.size == 0:
        raise ValueError(f"`{name}` is empty ({_describe(label)}); expected {_EXPECTED_MAP}.")
    if np.issubdtype(array.dtype, np.floating):
        if not np.array_equal(array, np.round(array)):
            raise ValueError(
                f"`{name}` ({_describe(label)}) holds non-integer values; expected integer class indices."
            )
    elif not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise TypeError(f"`{name}` ({_describe(label)}) has dtype {array.dtype}; expected integer class indices.")
    # Always a copy: label reduction works in place and must not touch the caller's data.
    return torch.from_numpy(np.array(array, dtype=np.int64))


def _load_segmentation_maps(segmentation_maps, images: list, do_reduce_labels: bool) -> list:
    """One (H, W) int64 tensor per image, checked against the image's size, reduced when asked."""
    batch_ndim = 3 if len(images) > 1 else 4
    maps = _flatten_inputs(segmentation_maps, "segmentation_maps", _EXPECTED_MAP, batch_ndim=batch_ndim)
    if len(maps) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(maps)} segmentation maps; expected one map per image.")
    labels = []
    for position, (label, image) in enumerate(zip(maps, images)):
        name = "segmentation_maps" if len(maps) == 1 else f"segmentation_maps[{position}]"
        label = _label_to_tensor(label, name)
        if tuple(label.shape) != tuple(image.shape[:2]):
            raise ValueError(
                f"`{name}` is {label.shape[0]}x{label.shape[1]} but its image is {image.shape[0]}x{image.shape[1]} "
                "(height x width, after EXIF orientation); expected the same size."
            )
        labels.append(_reduce_labels(label) if do_reduce_labels else label)
    return labels


def _canvas_size(sizes: list, do_pad: bool, pad_size, return_tensors) -> tuple | None:
    """The (height, width) every image of the batch is padded to; None for a list of unpadded images."""
    if do_pad and pad_size is not None:
        canvas = (pad_size.height, pad_size.width)
        too_big = [s for s in sizes if s[0] > canvas[0] or s[1] > canvas[1]]
        if too_big:
            raise ValueError(f"pad_size={dict(pad_size)} is smaller than processed image size(s) {too_big}.")
        return canvas
    if do_pad or len(set(sizes)) == 1:
        return (max(s[0] for s in sizes), max(s[1] for s in sizes))
    if return_tensors is not None:
        raise ValueError(
            f"The processed images have different sizes {sizes} and do_pad=False: they cannot be stacked with "
            f"return_tensors={return_tensors!r}. Use do_pad=True or return_tensors=None."
        )
    return None


def _reduce_labels(label: torch.Tensor) -> torch.Tensor:
    """MMSegmentation's `reduce_zero_label`: 0 -> 255, others -1, 255 stays 255 (in place on int64)."""
    label[label == 0] = IGNORE_INDEX
    label -= 1
    label[label == IGNORE_INDEX - 1] = IGNORE_INDEX
    return label


# ----------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------


class MetaSegImageProcessor(BaseImageProcessor):
    r"""
    Prepares images (and segmentation maps) for MetaSeg and turns its logits into segmentation maps.

    The defaults reproduce the official ADE20K test pipeline of MetaSeg (MMSegmentation 0.24), bit for bit:

    1. Each image becomes 8-bit RGB: EXIF orientation applied; alpha dropped; grey, palette, CMYK images
       converted; 16-bit data keeps its high byte (as OpenCV's colour read does).
    2. Keep-ratio resize into the box `size={"shortest_edge": 512, "longest_edge": 2048}`: scale =
       min(2048 / long side, 512 / short side), new side = int(side * scale + 0.5), with OpenCV's bilinear
       interpolation on uint8 (its fixed-point arithmetic reproduced exactly, no OpenCV needed).
    3. With `size_divisor=32`, a second bilinear resize up to the next multiple of 32 of each side (a
       375x500 photo goes 512x683 -> 512x704). `size_divisor=None` skips it (Cityscapes).
    4. `(value * rescale_factor - image_mean) / image_std` per channel, as float32 in (3, H, W).

    `size={"height": h, "width": w}` instead resizes every image to exactly h x w (one bilinear resize,
    `size_divisor` not applied), e.g. for training crops. The other official variants' settings come from
    `metaseg_hf.presets.variant_image_processor_kwargs(name)` and are saved with each checkpoint.

    Segmentation maps (class indices) follow their image: MMSegmentation's `reduce_zero_label` first when
    `do_reduce_labels`, then OpenCV nearest-neighbour resizes through the same sizes as the image.

    `do_reduce_labels` defaults to `False`, unlike the ADE20K preset: whether 0 means "ignore" is a
    property of a dataset's label files, not of the model, and a default that rewrites labels would
    silently corrupt every 0-based dataset (Cityscapes train ids, COCO-Stuff, most custom data). The
    official ADE20K checkpoints store `do_reduce_labels=True` in their `preprocessor_config.json`, so
    `from_pretrained` gives the official behaviour; the legacy key `reduce_labels` is read as
    `do_reduce_labels`. Everything that affects `pixel_values` and post-processing defaults to ADE20K.

    Batches of images with different processed sizes are padded at the bottom and right to the largest
    processed height and width (or to `pad_size`): `pixel_values` with 0, `labels` with 255 (ignored by
    the loss). `post_process_semantic_segmentation` crops the padding away again.

    Args:
        do_resize (`bool`, *optional*, defaults to `True`):
            Whether to resize (both the keep-ratio/fixed resize and the `size_divisor` step).
        size (`dict[str, int]`, *optional*, defaults to `{"shortest_edge": 512, "longest_edge": 2048}`):
            `{"shortest_edge", "longest_edge"}` (either key alone also works) for the keep-ratio box, or
            `{"height", "width"}` for a fixed size.
        size_divisor (`int` or `None`, *optional*, defaults to 32):
            Resize up to a multiple of this after the keep-ratio resize; `None` for no such step.
        resample (`PILImageResampling`, *optional*, defaults to `BILINEAR`):
            Only `BILINEAR` (meaning OpenCV's INTER_LINEAR on uint8) is implemented.
        do_rescale (`bool`, *optional*, defaults to `True`), rescale_factor (`float`, defaults to 1/255):
            Multiply the 0-255 values by `rescale_factor`.
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean, image_std (3 floats):
            ImageNet statistics on the 0-1 scale (`metaseg_hf.presets.IMAGE_MEAN` / `IMAGE_STD`).
        do_reduce_labels (`bool`, *optional*, defaults to `False`):
            MMSegmentation's `reduce_zero_label` on segmentation maps (see above).
        do_pad (`bool`, *optional*, defaults to `True`), pad_size (`dict`, *optional*):
            Pad mixed-size batches to the largest size, or to `{"height", "width"}` of `pad_size`.

    Example:

    ```python
    >>> from metaseg_hf.image_processing_metaseg import MetaSegImageProcessor
    >>> processor = MetaSegImageProcessor()  # the official ADE20K test pipeline
    >>> inputs = processor(image)  # a 375x500 PIL image -> inputs["pixel_values"]: (1, 3, 512, 704)
    >>> outputs = model(**inputs)  # outputs.logits: (1, num_labels, 64, 88)
    >>> segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(375, 500)])[0]
    >>> segmentation.shape  # class ids, int64
    torch.Size([375, 500])
    ```
    """

    valid_kwargs = MetaSegImageProcessorKwargs
    model_input_names = ["pixel_values"]

    do_resize = True
    size = dict(_ADE20K["size"])
    size_divisor = _ADE20K["size_divisor"]
    resample = PILImageResampling.BILINEAR
    default_to_square = True
    do_rescale = True
    rescale_factor = 1 / 255
    do_normalize = True
    image_mean = list(IMAGE_MEAN)
    image_std = list(IMAGE_STD)
    do_reduce_labels = False
    do_convert_rgb = True
    do_pad = True
    pad_size = None
    do_center_crop = None
    crop_size = None

    # Settings whose explicit `None` means something different from "use the class default".
    _NONE_IS_A_SETTING = ("size_divisor",)

    def __init__(self, **kwargs: Unpack[MetaSegImageProcessorKwargs]):
        kwargs = self._map_legacy_kwargs(kwargs)
        explicit_none = [key for key in self._NONE_IS_A_SETTING if key in kwargs and kwargs[key] is None]
        super().__init__(**kwargs)
        # `_set_attributes` replaces None by the class default; keep an explicit `size_divisor=None`.
        self._set_attributes(**kwargs)
        for key in explicit_none:
            setattr(self, key, None)
        self._check_settings(
            size=self.size,
            size_divisor=self.size_divisor,
            resample=self.resample,
            image_mean=self.image_mean,
            image_std=self.image_std,
            do_center_crop=self.do_center_crop,
            data_format=getattr(self, "data_format", None),
        )

    @property
    def backend(self) -> str:
        """`"pil"`: the backend that needs no torchvision (the arithmetic itself is torch on uint8)."""
        return "pil"

    def to_rgb(self, image, input_data_format=None) -> torch.Tensor:
        """One image as this processor reads it: a (H, W, 3) uint8 RGB tensor at its original size (EXIF
        orientation applied, alpha dropped, grey/palette/CMYK/16-bit converted)."""
        return image_to_rgb(image, "image", input_data_format, self.do_convert_rgb)

    def segment(self, model, images, **kwargs) -> list:
        """Preprocesses and segments images with `model` in its official test mode (or as asked: `mode`,
        `window_size`, `window_stride`, `flip`, `scales`, `window_batch_size`, `return_probabilities`).
        Returns one `SegmentationPrediction` (class map and probabilities at the original size) per image.
        See `metaseg_hf.inference_metaseg.segment`."""
        return segment(model, self, images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The saved settings. The `auto_map` entry is written per backend (`{"pil": ...}`): Transformers
        derives a video-processor class from a plain-string entry, and `pipeline()` would then stop to ask
        whether to run that (non-existent) custom code, even for a locally registered model."""
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": {"pil": auto_map["AutoImageProcessor"]}}
        return output

    # ------------------------------------------------------------------ settings

    @staticmethod
    def _map_legacy_kwargs(kwargs: dict) -> dict:
        """Maps the legacy key `reduce_labels` (old configs, old call sites) to `do_reduce_labels`."""
        if "reduce_labels" not in kwargs:
            return kwargs
        kwargs = dict(kwargs)
        legacy = kwargs.pop("reduce_labels")
        if kwargs.get("do_reduce_labels") is None:
            kwargs["do_reduce_labels"] = legacy
        elif bool(kwargs["do_reduce_labels"]) != bool(legacy):
            raise ValueError(
                f"Got both reduce_labels={legacy!r} (legacy name) and "
                f"do_reduce_labels={kwargs['do_reduce_labels']!r}, which disagree; pass only `do_reduce_labels`."
            )
        logger.warning_once("`reduce_labels` is a deprecated name: it was read as `do_reduce_labels`.")
        return kwargs

    @classmethod
    def from_dict(cls, image_processor_dict: dict[str, Any], **kwargs):
        """As the base class, and the legacy `reduce_labels` is honoured in the dict and in the overrides."""
        image_processor_dict = dict(image_processor_dict)
        if "reduce_labels" in kwargs:
            kwargs = cls._map_legacy_kwargs(kwargs)
        if "do_reduce_labels" in kwargs:
            # An explicit override replaces whatever the saved config says, legacy key included.
            image_processor_dict.pop("reduce_labels", None)
        return super().from_dict(image_processor_dict, **kwargs)

    @staticmethod
    def _check_settings(
        size, size_divisor, resample, image_mean, image_std, do_center_crop=None, data_format=None, **_
    ):
        """Raises on settings this processor does not implement (with the value and what is expected)."""
        if size is not None:
            keys = set(dict(size))
            supported = ({"shortest_edge", "longest_edge"}, {"shortest_edge"}, {"longest_edge"}, {"height", "width"})
            if keys not in supported:
                raise ValueError(
                    f"size={dict(size)} is not supported; expected {{'shortest_edge', 'longest_edge'}} (keep-ratio "
                    "box, either key alone also works) or {'height', 'width'} (fixed size)."
                )
            if any(not isinstance(value, int) or value < 1 for value in dict(size).values()):
                raise ValueError(f"size={dict(size)} must hold positive integers.")
        bad_divisor = isinstance(size_divisor, bool) or not isinstance(size_divisor, int) or size_divisor < 1
        if size_divisor is not None and bad_divisor:
            raise ValueError(f"size_divisor={size_divisor!r} must be a positive integer or None.")
        if resample is not None and int(resample) != int(PILImageResampling.BILINEAR):
            raise ValueError(
                f"resample={resample!r} is not supported: only PILImageResampling.BILINEAR (OpenCV's INTER_LINEAR "
                "on uint8, as the official pipeline) is implemented."
            )
        for name, value in (("image_mean", image_mean), ("image_std", image_std)):
            if value is not None and not isinstance(value, (int, float)) and len(value) != 3:
                raise ValueError(f"{name}={value!r} must be a float or 3 floats (RGB).")
        if do_center_crop:
            raise ValueError(
                "do_center_crop=True is not supported by MetaSegImageProcessor (the official pipeline does not crop)."
            )
        if data_format is not None and ChannelDimension(data_format) != ChannelDimension.FIRST:
            raise ValueError(f"data_format={data_format!r} is not supported: pixel_values are always channels-first.")

    def _validate_preprocess_kwargs(self, **kwargs):
        self._check_settings(**kwargs)
        validate_preprocess_arguments(
            do_rescale=kwargs.get("do_rescale"),
            rescale_factor=kwargs.get("rescale_factor"),
            do_normalize=kwargs.get("do_normalize"),
            image_mean=kwargs.get("image_mean"),
            image_std=kwargs.get("image_std"),
            do_resize=kwargs.get("do_resize"),
            size=kwargs.get("size"),
            resample=kwargs.get("resample"),
        )
        pad_size = kwargs.get("pad_size")
        if kwargs.get("do_pad") and pad_size is not None and set(dict(pad_size)) != {"height", "width"}:
            raise ValueError(f"pad_size={dict(pad_size)} must have the keys 'height' and 'width'.")

    def get_resize_steps(self, height: int, width: int, **overrides) -> list:
        """The sizes `(height, width)` an image of `height` x `width` goes through, in order.

        Uses this processor's `do_resize`, `size` and `size_divisor`, or the given overrides. Empty when
        nothing is resized; the last entry is the processed (network input) size. A 375x500 image with the
        defaults gives `[(512, 683), (512, 704)]`.
        """
        do_resize = overrides.get("do_resize", self.do_resize)
        size = overrides.get("size", self.size)
        if size is not None and not isinstance(size, SizeDict):
            size = self._standardize_kwargs(size=size, default_to_square=self.default_to_square)["size"]
        size_divisor = overrides.get("size_divisor", self.size_divisor)
        self._check_settings(size=size, size_divisor=size_divisor, resample=None, image_mean=None, image_std=None)
        return _resize_steps(int(height), int(width), do_resize, size, size_divisor)

    def get_processed_size(self, height: int, width: int, **overrides) -> tuple:
        """The (height, width) of `pixel_values` (before batch padding) for an image of `height` x `width`."""
        steps = self.get_resize_steps(height, width, **overrides)
        return steps[-1] if steps else (int(height), int(width))

    # ------------------------------------------------------------------ preprocessing

    def preprocess(
        self,
        images,
        segmentation_maps=None,
        return_tensors: str | None = "pt",
        *,
        return_processed_sizes: bool = False,
        **kwargs: Unpack[MetaSegImageProcessorKwargs],
    ) -> BatchFeature:
        r"""
        Preprocesses a batch of images and, optionally, their segmentation maps.

        Args:
            images: one image or a list: PIL images, numpy arrays or torch tensors ((H, W), (H, W, C) or
                (C, H, W), C in 1, 3, 4, RGB order; uint8, uint16 (high byte kept) or float in [0, 1]; a 4-D
                array/tensor is a batch), or paths to image files. Ambiguous layouts (e.g. (3, 4, 3)) need
                `input_data_format`.
            segmentation_maps: one map of class indices per image, (H, W) at the image's size (after EXIF
                orientation): PIL images of mode L/P/I/I;16, integer arrays or tensors, or paths.
            return_tensors (`"pt"`, `"np"` or `None`, defaults to `"pt"`): stacked torch tensors, stacked numpy
                arrays, or lists of per-image torch tensors (unpadded when `do_pad=False`).
            return_processed_sizes (`bool`, defaults to `False`): also return `processed_sizes`, (B, 2) int64
                with each image's (height, width) in `pixel_values` before padding. Pop it before
                `model(**inputs)`; `post_process_semantic_segmentation(..., input_sizes=...)` takes it.
            **kwargs: any setting of the processor (`size`, `size_divisor`, `do_reduce_labels`, ...), for this
                call only; also `input_data_format` and `device` (where the resizing runs).

        Returns:
            `BatchFeature` with `pixel_values` float32 (B, 3, H, W) and, with maps, `labels` int64 (B, H, W)
            (padding: 0 in `pixel_values`, 255 in `labels`).
        """
        kwargs = self._map_legacy_kwargs(kwargs)
        kwargs["return_tensors"] = return_tensors
        if return_tensors not in (None, "pt", "np"):
            raise ValueError(f"return_tensors={return_tensors!r} is not supported; expected 'pt', 'np' or None.")
        # Extra inputs travel as positional arguments: every 5.x base `preprocess` forwards those unchanged to
        # `_preprocess_image_like_inputs` (newer ones also have `image_like_kwargs`, older ones do not).
        return super().preprocess(images, segmentation_maps, return_processed_sizes, **kwargs)

    def _preprocess_image_like_inputs(
        self,
        images,
        segmentation_maps=None,
        return_processed_sizes: bool = False,
        *,
        do_resize: bool,
        size: SizeDict,
        size_divisor: int | None,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean,
        image_std,
        do_reduce_labels: bool,
        do_convert_rgb: bool | None = True,
        do_pad: bool | None = True,
        pad_size: SizeDict | None = None,
        input_data_format=None,
        device=None,
        return_tensors=None,
        **_,
    ) -> BatchFeature:
        images = _flatten_inputs(images, "images", _EXPECTED_IMAGE, batch_ndim=4)
        names = ["images" if len(images) == 1 else f"images[{i}]" for i in range(len(images))]
        convert_rgb = do_convert_rgb is not False
        rgb = [image_to_rgb(image, name, input_data_format, convert_rgb) for image, name in zip(images, names)]
        labels = None
        if segmentation_maps is not None:
            labels = _load_segmentation_maps(segmentation_maps, rgb, do_reduce_labels)
        steps = [_resize_steps(image.shape[0], image.shape[1], do_resize, size, size_divisor) for image in rgb]
        sizes = [step[-1] if step else tuple(image.shape[:2]) for step, image in zip(steps, rgb)]
        canvas = _canvas_size(sizes, do_pad, pad_size, return_tensors)

        scale, offset = self._affine_normalization(
            do_rescale, rescale_factor, do_normalize, image_mean, image_std, device
        )
        batch = len(rgb)
        if canvas is not None:
            padded = any(s != canvas for s in sizes)
            allocate = torch.zeros if padded else torch.empty
            pixel_values = allocate((batch, 3) + canvas, dtype=torch.float32, device=device)
            outputs = [pixel_values[i, :, : s[0], : s[1]] for i, s in enumerate(sizes)]
            if labels is not None:
                label_batch = torch.full((batch,) + canvas, IGNORE_INDEX, dtype=torch.int64, device=device)
                label_outputs = [label_batch[i, : s[0], : s[1]] for i, s in enumerate(sizes)]
        else:
            outputs = [torch.empty((3,) + s, dtype=torch.float32, device=device) for s in sizes]
            if labels is not None:
                label_outputs = [torch.empty(s, dtype=torch.int64, device=device) for s in sizes]

        for i, (image, image_steps) in enumerate(zip(rgb, steps)):
            image = image.to(device) if device is not None else image
            for height, width in image_steps:
                image = _opencv_linear_resize(image, height, width)
            torch.addcmul(offset, image.permute(2, 0, 1), scale, out=outputs[i])
            if labels is not None:
                label = labels[i].to(device) if device is not None else labels[i]
                for height, width in image_steps:
                    label = _opencv_nearest_resize(label, height, width)
                label_outputs[i].copy_(label)

        data = {}
        if canvas is not None:
            data["pixel_values"] = pixel_values
            if labels is not None:
                data["labels"] = label_batch
        else:
            data["pixel_values"] = outputs
            if labels is not None:
                data["labels"] = label_outputs
        if return_processed_sizes:
            data["processed_sizes"] = torch.tensor(sizes, dtype=torch.int64)
        if return_tensors is None:
            data = {key: list(v.unbind(0)) if isinstance(v, torch.Tensor) else v for key, v in data.items()}
        elif return_tensors == "np":
            data = {key: value.cpu().numpy() for key, value in data.items()}
        return BatchFeature(data=data)

    @staticmethod
    def _affine_normalization(do_rescale, rescale_factor, do_normalize, image_mean, image_std, device):
        """`value * rescale_factor` then `(value - mean) / std` folded into `value * scale + offset`, (3, 1, 1)."""
        scale = torch.ones(3, dtype=torch.float64)
        offset = torch.zeros(3, dtype=torch.float64)
        if do_rescale:
            scale *= rescale_factor
        if do_normalize:
            mean = torch.as_tensor(image_mean, dtype=torch.float64).expand(3)
            std = torch.as_tensor(image_std, dtype=torch.float64).expand(3)
            scale = scale / std
            offset = -mean / std
        return scale.float().view(3, 1, 1).to(device), offset.float().view(3, 1, 1).to(device)

    # ------------------------------------------------------------------ post-processing

    def _input_size_logits(self, outputs, target_sizes, input_sizes=None, padded_size=None):
        """Each image's float32 logits (num_labels, h, w) at its network input size, with its target size.

        Stride-8 logits are resized bilinearly (align_corners=False) to the padded network input size and
        the padding is cropped to the image's processed size (the first of the official two resizes; the
        second, to the target size, is `logits_to_prediction`'s). Without `target_sizes`, the logits are
        returned as they are, with their own size as target.
        """
        logits = outputs if isinstance(outputs, torch.Tensor) else getattr(outputs, "logits", None)
        if logits is None and isinstance(outputs, dict):
            logits = outputs.get("logits")
        if not isinstance(logits, torch.Tensor):
            raise TypeError(
                f"Expected model outputs with `logits` (or the logits tensor), got {type(outputs).__name__}."
            )
        if logits.ndim != 4:
            raise ValueError(
                f"Expected logits of shape (batch, num_labels, height, width), got {tuple(logits.shape)}."
            )
        if target_sizes is None:
            return [(logit.float(), tuple(logit.shape[-2:])) for logit in logits]
        target_sizes = _as_size_list(target_sizes, "target_sizes")
        if len(target_sizes) != len(logits):
            raise ValueError(
                f"Got {len(target_sizes)} target sizes for a batch of {len(logits)} logits; pass one "
                "(height, width) per image."
            )
        if input_sizes is None:
            input_sizes = [self.get_processed_size(height, width) for height, width in target_sizes]
            origin = "computed from target_sizes with this processor's resize settings"
        else:
            input_sizes = _as_size_list(input_sizes, "input_sizes")
            origin = "given as input_sizes"
            if len(input_sizes) != len(logits):
                raise ValueError(f"Got {len(input_sizes)} input sizes for a batch of {len(logits)} logits.")
        if padded_size is None:
            if self.do_pad and self.pad_size is not None:
                padded_size = (self.pad_size.height, self.pad_size.width)
            else:
                padded_size = (max(s[0] for s in input_sizes), max(s[1] for s in input_sizes))
        padded_size = tuple(int(v) for v in padded_size)
        logit_size = tuple(logits.shape[-2:])
        strided = tuple(math.ceil(side / LOGITS_STRIDE) for side in padded_size)
        if logit_size not in (strided, padded_size):
            raise ValueError(
                f"The logits are {logit_size[0]}x{logit_size[1]}, but the network input size "
                f"{padded_size[0]}x{padded_size[1]} ({origin}) would give {strided[0]}x{strided[1]} "
                f"(stride {LOGITS_STRIDE}). Pass the sizes of "
                "`pixel_values` as `input_sizes` (per image, before padding) and, for a padded batch, `padded_size`."
            )
        results = []
        for logit, input_size, target_size in zip(logits, input_sizes, target_sizes):
            logit = logit[None].float()
            if logit_size != padded_size:
                logit = F.interpolate(logit, size=padded_size, mode="bilinear", align_corners=False)
            results.append((logit[0, :, : input_size[0], : input_size[1]], target_size))
        return results

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, input_sizes=None, padded_size=None
    ) -> list:
        """
        Turns MetaSeg's logits into one map of class ids per image, as the official `whole` test mode does.

        The stride-8 logits are resized bilinearly (align_corners=False) to the network input size, then to
        the target (original image) size, and each pixel takes the class of highest score. The network input
        size is not in `outputs`: it is computed from each target size with this processor's own resize
        settings (the same computation as preprocessing), which is right whenever the images were prepared
        by this processor with its settings and `target_sizes` are their original sizes, as in
        `pipeline("image-segmentation")`. Padded mixed-size batches are cropped to each image's size first.

        Args:
            outputs: the model output (anything with `logits`, or the logits tensor), logits (B, num_labels,
                h, w) at stride 8 of `pixel_values` (or at its full size).
            target_sizes (list of `(height, width)` or a (B, 2) tensor, *optional*): the size of each output
                map, normally the original image size. `None`: maps at the logits' resolution.
            input_sizes (list of `(height, width)` or (B, 2) tensor, *optional*): each image's size in
                `pixel_values` before padding (e.g. `processed_sizes` from preprocessing), when the images were
                prepared otherwise.
            padded_size (`(height, width)`, *optional*): the size of `pixel_values`; defaults to `pad_size` or
                the largest of `input_sizes`.

        Returns:
            `list[torch.Tensor]`: one (height, width) int64 map of class ids per image.
        """
        maps = self._input_size_logits(outputs, target_sizes, input_sizes, padded_size)
        return [logits_to_prediction([logit], target_size).segmentation for logit, target_size in maps]

    def post_process_semantic_probabilities(
        self, outputs, target_sizes=None, input_sizes=None, padded_size=None
    ) -> list:
        """
        Like `post_process_semantic_segmentation`, but returns the per-pixel class probabilities.

        Returns:
            `list[torch.Tensor]`: one (num_labels, height, width) float32 tensor per image, the softmax over
            classes of the resized logits (the official `seg_logit` after softmax). Its maximum over dim 0 is
            the confidence of the predicted class.
        """
        maps = self._input_size_logits(outputs, target_sizes, input_sizes, padded_size)
        return [
            logits_to_prediction([logit], target_size, return_probabilities=True).probabilities
            for logit, target_size in maps
        ]


def _as_size_list(sizes, name: str) -> list:
    """A list of (height, width) int tuples from a list of pairs or an (N, 2) tensor/array."""
    if isinstance(sizes, (torch.Tensor, np.ndarray)):
        sizes = sizes.tolist()
    try:
        result = [(int(height), int(width)) for height, width in sizes]
    except (TypeError, ValueError):
        raise ValueError(
            f"`{name}` must be a list of (height, width) pairs or an (N, 2) tensor, got {sizes!r}."
        ) from None
    if any(height < 1 or width < 1 for height, width in result):
        raise ValueError(f"`{name}` must hold positive sizes, got {result}.")
    return result


__all__ = ["MetaSegImageProcessor"]
