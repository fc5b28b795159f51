"""Image processor for MetaSeg: the official MMSegmentation test pipeline, bit for bit, without torchvision.

The official pipeline (``hyunwoo137/MetaSeg``, MMSegmentation 0.24) reads images with OpenCV as 8-bit
colour, resizes them keeping the aspect ratio into a (long, short) box with OpenCV's bilinear
interpolation on uint8, resizes again up to a multiple of 32 (ADE20K, COCO-Stuff), and normalises with
the ImageNet statistics. Reading images and label maps lives in ``image_io.py``, the exact OpenCV
resizes in ``resize_opencv.py``, the resize of logits to the original size in ``inference_metaseg.py``;
this file puts them together as a Transformers image processor.

This file is copied into Hub repositories for ``trust_remote_code``: it imports other package modules
only as ``from .presets import ...`` and third-party code only from torch, numpy, PIL and transformers.
"""

import math
from typing import Any

import numpy as np
import torch
from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.image_utils import ChannelDimension, PILImageResampling, SizeDict, validate_preprocess_arguments
from transformers.processing_utils import ImagesKwargs, Unpack

from .class_maps import UpsampledLogits, materialize
from .image_io import (
    EXPECTED_IMAGE,
    EXPECTED_MAP,
    IGNORE_INDEX,
    describe,
    read_image,
    read_image_and_scale,
    read_label,
    reduce_zero_label,
)
from .inference_metaseg import logits_to_prediction, resize_logits, scores_to_classes, segment
from .presets import DATASETS, IMAGE_MEAN, IMAGE_STD
from .resize_opencv import opencv_linear_resize, opencv_nearest_resize, resize_steps

# Stride of MetaSeg's logits relative to its input (stage 2 of MSCAN, where the decoder works).
LOGITS_STRIDE = 8

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
# Batches of inputs
# ----------------------------------------------------------------------------------------------------


def _flatten_inputs(inputs, name: str, expected: str, batch_ndim: int) -> list:
    """A flat list of single inputs; arrays/tensors with `batch_ndim` dimensions are split along the first."""
    if inputs is None:
        raise TypeError(f"`{name}` is None; expected {expected}.")
    if isinstance(inputs, (np.ndarray, torch.Tensor)) and inputs.ndim == batch_ndim:
        if inputs.shape[0] == 0:
            raise ValueError(f"`{name}` is an empty batch ({describe(inputs)}); expected at least one.")
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


def _load_segmentation_maps(segmentation_maps, images: list, do_reduce_labels: bool) -> list:
    """One (H, W) int64 tensor per image, checked against the image's size, reduced when asked."""
    batch_ndim = 3 if len(images) > 1 else 4
    maps = _flatten_inputs(segmentation_maps, "segmentation_maps", EXPECTED_MAP, batch_ndim=batch_ndim)
    if len(maps) != len(images):
        raise ValueError(f"Got {len(images)} images but {len(maps)} segmentation maps; expected one map per image.")
    labels = []
    for position, (label, image) in enumerate(zip(maps, images)):
        name = "segmentation_maps" if len(maps) == 1 else f"segmentation_maps[{position}]"
        label = read_label(label, name)
        if tuple(label.shape) != tuple(image.shape[:2]):
            raise ValueError(
                f"`{name}` is {label.shape[0]}x{label.shape[1]} but its image is {image.shape[0]}x{image.shape[1]} "
                "(height x width, after EXIF orientation); expected the same size."
            )
        labels.append(reduce_zero_label(label) if do_reduce_labels else label)
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


def channel_count(image_mean, image_std) -> int:
    """The number of image channels given by the normalisation statistics: the length of `image_mean` and
    `image_std` (which must agree), 3 (RGB) when both are single floats or unset."""
    lengths = {
        name: len(value)
        for name, value in (("image_mean", image_mean), ("image_std", image_std))
        if value is not None and not isinstance(value, (int, float))
    }
    if len(set(lengths.values())) > 1 or 0 in lengths.values():
        raise ValueError(
            f"image_mean={image_mean!r} and image_std={image_std!r} must hold one value per image channel, the same "
            "number in both (3 for RGB), or be single floats."
        )
    return next(iter(lengths.values()), 3)


# ----------------------------------------------------------------------------------------------------
# The processor
# ----------------------------------------------------------------------------------------------------


def rescale_of_8_bit_values(unit_floats: bool, do_rescale: bool, rescale_factor: float) -> tuple[bool, float]:
    """`(do_rescale, rescale_factor)` for the 8-bit values an image is read as. Float images in [0, 1] are
    already rescaled (Transformers' convention for `do_rescale=False`); read as 8 bits (x 255), they are
    rescaled back by 1/255 whatever `do_rescale` says, so they give the uint8 image's pixel_values."""
    if do_rescale:
        return True, rescale_factor
    return (True, 1 / 255) if unit_floats else (False, rescale_factor)


def normalization_constants(do_rescale, rescale_factor, do_normalize, image_mean, image_std, device, num_channels=3):
    """The float32 `(subtract, divide)`, each (num_channels, 1, 1), of `pixel_values = (uint8 - subtract) / divide`.

    The rescale is folded into the statistics, `mean / rescale_factor` and `std / rescale_factor` in
    float64 (as Transformers' fast processors fold it): for the official settings these round to exactly
    the official float32 constants (123.675, 116.28, 103.53) and (58.395, 57.12, 57.375), so
    `pixel_values` is the official float32 `(x - mean) / std` bit for bit (`x * scale + offset` is one
    rounding step off on about half the values). Rescale only: `x / (1 / rescale_factor)`; neither:
    the uint8 values as float32.
    """
    factor = rescale_factor if do_rescale else 1.0
    subtract = torch.zeros(num_channels, dtype=torch.float64)
    divide = torch.ones(num_channels, dtype=torch.float64)
    if do_normalize:
        subtract = torch.as_tensor(image_mean, dtype=torch.float64).expand(num_channels) / factor
        divide = torch.as_tensor(image_std, dtype=torch.float64).expand(num_channels) / factor
    else:
        divide = divide / factor
    shape = (num_channels, 1, 1)
    return subtract.float().view(shape).to(device), divide.float().view(shape).to(device)


# The image-processor backends that MetaSegImageProcessor serves (one class for both; see its docstring).
# `AutoImageProcessor` and `pipeline()` ask for "torchvision" when torchvision is importable, else "pil".
BACKENDS = ("torchvision", "pil")


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

    Models whose input is not RGB (`config.num_channels != 3`) take a processor with one `image_mean` and
    `image_std` value per channel and `do_convert_rgb=False`: images are then used with their own channels
    (a PIL "L" image is one channel, "RGBA" four, arrays (H, W, C) or (C, H, W)), which must number
    `len(image_mean)`; `pixel_values` are (C, H, W). A channel count other than 3 with `do_convert_rgb=True`
    is refused, since the RGB conversion would give the model three channels.

    `size={"height": h, "width": w}` instead resizes every image to exactly h x w (one bilinear resize,
    `size_divisor` not applied), e.g. for training crops. The other official variants' settings come from
    `metaseg_hf.presets.variant_image_processor_kwargs(name)` and are saved with each checkpoint.

    Segmentation maps (class indices) follow their image: MMSegmentation's `reduce_zero_label` first when
    `do_reduce_labels`, then OpenCV nearest-neighbour resizes through the same sizes as the image.

    `do_reduce_labels` defaults to `False`, unlike the ADE20K preset: whether 0 means "ignore" is a
    property of a dataset's label files, not of the model, and a default that rewrites labels would
    silently corrupt every 0-based dataset (Cityscapes train ids, COCO-Stuff, most custom data). The
    official ADE20K checkpoints store `do_reduce_labels=True` in their `preprocessor_config.json`, so
    `from_pretrained` gives the official behaviour. Everything that affects `pixel_values` and
    post-processing defaults to ADE20K.

    Batches of images with different processed sizes are padded at the bottom and right to the largest
    processed height and width (or to `pad_size`): `pixel_values` with 0, `labels` with 255 (ignored by
    the loss). `post_process_semantic_segmentation` crops the padding away again. Padding is not neutral
    for MetaSeg (Channel Reduction Attention pools over the whole canvas): the model's logits on a padded
    batch are those of each padded canvas; `model.predict(pixel_values, input_sizes=processed_sizes)` runs
    each image on its own region and gives what the image alone gives.

    One class serves both of Transformers' image-processor backends (`BACKENDS`): it is registered, and
    written into a saved folder's `auto_map`, as the `"torchvision"` and the `"pil"` processor, so
    `AutoImageProcessor` and `pipeline()` load it without a fallback warning whether torchvision is
    installed or not, and `backend=` gives the same `pixel_values`. It stays a `BaseImageProcessor` rather
    than a subclass of Transformers' `TorchvisionBackend` because (1) that class requires torchvision
    (`@requires(backends=("torch", "torchvision"))`: without it, it is a placeholder that raises on use),
    and the processor must work where torchvision is absent or, as with pip's wheels beside the CPU build
    of torch, cannot load; (2) its resize is torchvision's, which is not OpenCV's fixed-point bilinear
    resize, and the official pipeline is reproduced bit for bit only by the torch code here. The
    arithmetic is torch on uint8 tensors either way.

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
            Multiply the 0-255 values by `rescale_factor`. Float images in [0, 1] are already rescaled: they
            give the pixel_values of the same image in uint8 whether `do_rescale` is True or False (with
            False, Transformers' convention that the input is on the rescaled scale; uint8 images are then
            normalised as 0-255 values).
        do_normalize (`bool`, *optional*, defaults to `True`), image_mean, image_std (one float per channel):
            ImageNet statistics on the 0-1 scale (`metaseg_hf.presets.IMAGE_MEAN` / `IMAGE_STD`); their length
            is the number of channels (`num_channels`, 3 for single floats).
        do_convert_rgb (`bool`, *optional*, defaults to `True`):
            Convert every image to 3-channel RGB (the official colour read); `False` keeps an image's own
            channels, for models whose input is not RGB.
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
        if "reduce_labels" in kwargs:  # Transformers would keep it as an unused attribute: labels unreduced
            raise ValueError(
                f"MetaSegImageProcessor got `reduce_labels={kwargs['reduce_labels']!r}`, the name Transformers 4 "
                "used; it is `do_reduce_labels` now. Rename the key (in preprocessor_config.json too)."
            )
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
            do_convert_rgb=self.do_convert_rgb,
            do_center_crop=self.do_center_crop,
            data_format=getattr(self, "data_format", None),
        )

    @property
    def backend(self) -> str:
        """`"pil"`: this processor needs no torchvision (it serves both `BACKENDS`; the arithmetic is torch)."""
        return "pil"

    @property
    def num_channels(self) -> int:
        """The number of channels of `pixel_values`: the length of `image_mean` / `image_std` (3 for floats)."""
        return channel_count(self.image_mean, self.image_std)

    def read_image(self, image, input_data_format=None) -> torch.Tensor:
        """One image as this processor reads it, at its original size: a (H, W, C) uint8 tensor, C =
        `num_channels` (RGB unless `do_convert_rgb=False`; EXIF orientation applied)."""
        return self.read_image_and_overrides(image, input_data_format)[0]

    def read_image_and_overrides(self, image, input_data_format=None) -> tuple[torch.Tensor, dict]:
        """`read_image`, and the settings that preprocessing the 8-bit result needs to give the pixel_values
        of `image` itself (a float image in [0, 1] with `do_rescale=False` is rescaled back by 1/255)."""
        pixels, unit_floats = read_image_and_scale(
            image, "image", input_data_format, self.do_convert_rgb is not False, self.num_channels
        )
        do_rescale, rescale_factor = rescale_of_8_bit_values(unit_floats, self.do_rescale, self.rescale_factor)
        overrides = {} if do_rescale == self.do_rescale else {"do_rescale": do_rescale, "rescale_factor": rescale_factor}
        return pixels, overrides

    def to_rgb(self, image, input_data_format=None) -> torch.Tensor:
        """One image as 8-bit RGB at its original size, for display: a (H, W, 3) uint8 tensor (EXIF
        orientation applied, alpha dropped, grey/palette/CMYK/16-bit converted)."""
        return read_image(image, "image", input_data_format, convert_rgb=True)

    def segment(self, model, images, **kwargs) -> list:
        """Preprocesses and segments images with `model` in its official test mode (or as asked: `mode`,
        `window_size`, `window_stride`, `flip`, `scales`, `window_batch_size`, `return_probabilities`,
        `probabilities_max`). A single image is not padded, whatever `pad_size` says.
        Returns one `SegmentationPrediction` (class map and probabilities at the original size) per image.
        See `metaseg_hf.inference_metaseg.segment`."""
        return segment(model, self, images, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The saved settings. The `auto_map` entry is written per backend (`{"torchvision": ..., "pil": ...}`,
        this class for each of `BACKENDS`): remote-code loading then finds the class for the backend it asks
        for, and Transformers derives a video-processor class from a plain-string entry, after which
        `pipeline()` would stop to ask whether to run that (non-existent) custom code, even for a locally
        registered model."""
        output = super().to_dict()
        auto_map = output.get("auto_map")
        if isinstance(auto_map, dict) and isinstance(auto_map.get("AutoImageProcessor"), str):
            output["auto_map"] = {**auto_map, "AutoImageProcessor": dict.fromkeys(BACKENDS, auto_map["AutoImageProcessor"])}
        return output

    # ------------------------------------------------------------------ settings

    @staticmethod
    def _check_settings(
        size,
        size_divisor,
        resample,
        image_mean,
        image_std,
        do_convert_rgb=None,
        do_center_crop=None,
        data_format=None,
        **_,
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
        channels = channel_count(image_mean, image_std)
        if channels != 3 and do_convert_rgb is not False:
            raise ValueError(
                f"image_mean={image_mean!r} and image_std={image_std!r} describe {channels}-channel images, but "
                "do_convert_rgb=True turns every image into 3-channel RGB. Pass do_convert_rgb=False to feed images "
                f"with their own {channels} channel(s), or 3 values each for RGB."
            )
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
        return resize_steps(int(height), int(width), do_resize, size, size_divisor)

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
                (C, H, W), C in 1, 3, 4, RGB order (with `do_convert_rgb=False`: C = `num_channels`); uint8,
                uint16 (high byte kept) or float in [0, 1]; a 4-D array/tensor is a batch), or paths to image
                files. Ambiguous layouts (e.g. (3, 4, 3)) need `input_data_format`.
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
            `BatchFeature` with `pixel_values` float32 (B, C, H, W), C = `num_channels` (3, RGB, by default), and,
            with maps, `labels` int64 (B, H, W) (padding: 0 in `pixel_values`, 255 in `labels`).
        """
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
        images = _flatten_inputs(images, "images", EXPECTED_IMAGE, batch_ndim=4)
        names = ["images" if len(images) == 1 else f"images[{i}]" for i in range(len(images))]
        channels = channel_count(image_mean, image_std)
        convert_rgb = do_convert_rgb is not False
        read, unit_floats = zip(
            *(read_image_and_scale(image, name, input_data_format, convert_rgb, channels) for image, name in zip(images, names))
        )
        labels = None
        if segmentation_maps is not None:
            labels = _load_segmentation_maps(segmentation_maps, read, do_reduce_labels)
        steps = [resize_steps(image.shape[0], image.shape[1], do_resize, size, size_divisor) for image in read]
        sizes = [step[-1] if step else tuple(image.shape[:2]) for step, image in zip(steps, read)]
        canvas = _canvas_size(sizes, do_pad, pad_size, return_tensors)

        constants = {
            scaled: normalization_constants(
                *rescale_of_8_bit_values(scaled, do_rescale, rescale_factor), do_normalize, image_mean, image_std,
                device, num_channels=channels,
            )
            for scaled in set(unit_floats)
        }
        batch = len(read)
        if canvas is not None:
            padded = any(s != canvas for s in sizes)
            allocate = torch.zeros if padded else torch.empty
            pixel_values = allocate((batch, channels) + canvas, dtype=torch.float32, device=device)
            outputs = [pixel_values[i, :, : s[0], : s[1]] for i, s in enumerate(sizes)]
            if labels is not None:
                label_batch = torch.full((batch,) + canvas, IGNORE_INDEX, dtype=torch.int64, device=device)
                label_outputs = [label_batch[i, : s[0], : s[1]] for i, s in enumerate(sizes)]
        else:
            outputs = [torch.empty((channels,) + s, dtype=torch.float32, device=device) for s in sizes]
            if labels is not None:
                label_outputs = [torch.empty(s, dtype=torch.int64, device=device) for s in sizes]

        for i, (image, image_steps) in enumerate(zip(read, steps)):
            image = image.to(device) if device is not None else image
            for height, width in image_steps:
                image = opencv_linear_resize(image, height, width)
            subtract, divide = constants[unit_floats[i]]
            torch.sub(image.permute(2, 0, 1), subtract, out=outputs[i]).div_(divide)
            if labels is not None:
                label = labels[i].to(device) if device is not None else labels[i]
                for height, width in image_steps:
                    label = opencv_nearest_resize(label, height, width)
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

    # ------------------------------------------------------------------ post-processing

    def _input_size_logits(self, outputs, target_sizes, input_sizes=None, padded_size=None):
        """Each image's float32 logit map at its network input size, with its target size.

        Stride-8 logits become `UpsampledLogits`: their resize (bilinear, align_corners=False) to the padded
        network input size, cropped to the image's processed size, is the first of the official two resizes,
        done by `logits_to_prediction` where it needs it (the second, to the target size, is its own).
        Without `target_sizes`, the logits are returned as they are, with their own size as target.
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
            return iter([(logit.float(), tuple(logit.shape[-2:])) for logit in logits])
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

        def input_size_maps():
            for logit, input_size, target_size in zip(logits, input_sizes, target_sizes):
                if logit_size != padded_size:  # resized when needed, or not at all (`upsampled_argmax`)
                    yield UpsampledLogits(logit.float(), padded_size, tuple(input_size)), target_size
                else:
                    yield logit.float()[:, : input_size[0], : input_size[1]], target_size

        return input_size_maps()

    def post_process_semantic_segmentation(
        self, outputs, target_sizes=None, return_segmentation_scores: bool = False, *, input_sizes=None, padded_size=None
    ) -> list:
        """
        Turns MetaSeg's logits into one map of class ids per image, as the official `whole` test mode does.

        The stride-8 logits are resized bilinearly (align_corners=False) to the network input size, then to
        the target (original image) size, and each pixel takes the class of highest score (with
        `num_labels == 1`, a binary model: class 1 where the logit is above 0). Images are done one at a time
        (each input-size map is freed before the next is made), and the class map is exact without resizing
        every class at every pixel (`class_maps.upsampled_argmax`). The network input
        size is not in `outputs`: it is computed from each target size with this processor's own resize
        settings (the same computation as preprocessing), which is right whenever the images were prepared
        by this processor with its settings and `target_sizes` are their original sizes, as in
        `pipeline("image-segmentation")`. Padded mixed-size batches are cropped to each image's size first.

        Args:
            outputs: the model output (anything with `logits`, or the logits tensor), logits (B, num_labels,
                h, w) at stride 8 of `pixel_values` (or at its full size).
            target_sizes (list of `(height, width)` or a (B, 2) tensor, *optional*): the size of each output
                map, normally the original image size. `None`: maps at the logits' resolution.
            return_segmentation_scores (`bool`, defaults to `False`): also return the scores, as SegFormer's
                processor does: each item is then a `SemanticSegmentationPostProcessorOutput` with
                `segmentation` (height, width) int64 and `segmentation_scores` (num_labels, height, width)
                float32, the raw logits resized to the target size (their argmax over dim 0 is `segmentation`).
            input_sizes (list of `(height, width)` or (B, 2) tensor, *optional*): each image's size in
                `pixel_values` before padding (e.g. `processed_sizes` from preprocessing), when the images were
                prepared otherwise.
            padded_size (`(height, width)`, *optional*): the size of `pixel_values`; defaults to `pad_size` or
                the largest of `input_sizes`.

        Returns:
            `list[torch.Tensor]`: one (height, width) int64 map of class ids per image, or, with
            `return_segmentation_scores=True`, one `SemanticSegmentationPostProcessorOutput` per image.
        """
        maps = self._input_size_logits(outputs, target_sizes, input_sizes, padded_size)
        if not return_segmentation_scores:
            return [logits_to_prediction([logit], target_size).segmentation for logit, target_size in maps]
        results = []
        for logit, target_size in maps:
            scores = resize_logits(materialize(logit), target_size)
            results.append(
                SemanticSegmentationPostProcessorOutput(
                    data={"segmentation": scores_to_classes(scores), "segmentation_scores": scores}
                )
            )
        return results

    def post_process_semantic_probabilities(self, outputs, target_sizes=None, *, input_sizes=None, padded_size=None) -> list:
        """
        Like `post_process_semantic_segmentation`, but returns the per-pixel class probabilities.

        Returns:
            `list[torch.Tensor]`: one (num_labels, height, width) float32 tensor per image, the softmax over
            classes of the resized logits (the official `seg_logit` after softmax; with `num_labels == 1`, the
            sigmoid: the foreground probability). With several labels, its maximum over dim 0 is the
            confidence of the predicted class.
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
