"""Whole-image, sliding-window and test-time-augmented inference, as the official MMSegmentation test logic.

`predict` runs a model on processed `pixel_values` (one batch, or one batch per test-time scale);
`segment` also reads and preprocesses images (`preprocess_scales`). Both return per-image class maps and
probabilities at the original image size. The image processor's post-processing, the evaluation during
training and `examples/evaluate.py` all go through `predict` / `logits_to_prediction`.
Memory stays bounded: windows go through the model `window_batch_size` at a time, and the resize to
the original size, softmax and argmax run over row bands, so a 4000x6000 photo never materialises its
(num_labels, 4000, 6000) probabilities unless asked to.
"""

from dataclasses import dataclass

import torch
from torch.nn import functional as F

from .class_maps import (
    BAND_ELEMENTS,
    UpsampledLogits,
    augmented_argmax,
    augmented_argmax_pays,
    bilinear_source,
    materialize,
    pruning_pays,
    resized_argmax,
    upsampled_argmax,
    upsampled_argmax_pays,
)

# Sliding windows per forward pass in "slide" mode (the result does not depend on it).
WINDOW_BATCH_SIZE = 4


@dataclass
class SegmentationPrediction:
    """One image's prediction at its original size.

    segmentation: (H, W) int64 class ids. probabilities_max: (H, W) float32, the winning class's
    probability, only when asked for (`probabilities_max="full"` exact, or `"input"`: computed at the network
    input resolution and resized; see `logits_to_prediction`). probabilities: (num_labels, H, W) float32,
    only when asked for.
    """

    segmentation: torch.Tensor
    probabilities_max: torch.Tensor | None = None
    probabilities: torch.Tensor | None = None


def _pair(value, name):
    if value is None:
        raise ValueError(f"{name} is required in 'slide' mode (or set it in the model config)")
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) < 1:
        raise ValueError(f"{name} must be a positive int or (height, width), got {value!r}")
    return pair


def window_starts(length: int, window: int, stride: int) -> list[int]:
    """Start offsets of the official sliding windows along one axis (the last one clamped to the edge)."""
    count = max(length - window + stride - 1, 0) // stride + 1
    return [max(min(index * stride + window, length) - window, 0) for index in range(count)]


def _model_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Float32 logits, the input moved to the model's device and dtype (`model.device` / `model.dtype` as
    Transformers models and the ONNX Runtime model have them; else the first parameter's, e.g. under DDP)."""
    if hasattr(model, "device") and hasattr(model, "dtype"):
        device, dtype = model.device, model.dtype
    else:
        parameter = next(model.parameters())
        device, dtype = parameter.device, parameter.dtype
    with torch.no_grad():
        logits = model(pixel_values=pixel_values.to(device=device, dtype=dtype)).logits
    return logits.float()


def whole_logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_labels, H, W) float32: the stride-8 logits resized to the input size."""
    logits = _model_logits(model, pixel_values)
    return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)


def sliding_window_logits(
    model, pixel_values: torch.Tensor, window_size, window_stride, window_batch_size: int = WINDOW_BATCH_SIZE
) -> torch.Tensor:
    """(B, C, H, W) -> (B, num_labels, H, W) float32: each window's logits resized to the window,
    summed into the map and divided by the per-pixel window count (the official `slide` mode)."""
    (window_h, window_w), (stride_h, stride_w) = _pair(window_size, "window_size"), _pair(window_stride, "window_stride")
    if window_batch_size < 1:
        raise ValueError(f"window_batch_size must be at least 1, got {window_batch_size}")
    batch_size, _, height, width = pixel_values.shape
    boxes = [
        (top, min(top + window_h, height), left, min(left + window_w, width))
        for top in window_starts(height, window_h, stride_h)
        for left in window_starts(width, window_w, stride_w)
    ]
    summed, count = None, torch.zeros(height, width)
    for first in range(0, len(boxes), window_batch_size):
        chunk = boxes[first : first + window_batch_size]
        crops = torch.cat([pixel_values[:, :, top:bottom, left:right] for top, bottom, left, right in chunk])
        logits = _model_logits(model, crops)
        logits = F.interpolate(logits, size=crops.shape[-2:], mode="bilinear", align_corners=False).cpu()
        if summed is None:
            summed = torch.zeros(batch_size, logits.shape[1], height, width)
        for index, (top, bottom, left, right) in enumerate(chunk):
            summed[:, :, top:bottom, left:right] += logits[index * batch_size : (index + 1) * batch_size]
            count[top:bottom, left:right] += 1
    return summed / count


def input_size_logits(
    model,
    pixel_values: torch.Tensor,
    mode: str = "whole",
    window_size=None,
    window_stride=None,
    window_batch_size: int = WINDOW_BATCH_SIZE,
) -> torch.Tensor:
    """Logits at the input size, in `whole` or `slide` mode. (B, C, H, W) -> (B, num_labels, H, W)."""
    if mode == "whole":
        return whole_logits(model, pixel_values)
    if mode == "slide":
        return sliding_window_logits(model, pixel_values, window_size, window_stride, window_batch_size)
    raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")


def _resize_band(logits: torch.Tensor, size: tuple[int, int], rows: slice) -> torch.Tensor:
    """Rows `rows` of `F.interpolate(logits, size, bilinear)`, computed without the other rows.

    logits (C, h, w) -> (C, len(rows), size[1]).
    """
    in_h = logits.shape[1]
    if (in_h, logits.shape[2]) == tuple(size):
        return logits[:, rows]
    top, bottom, weight = (tensor[rows] for tensor in bilinear_source(size[0], in_h, logits.device))
    first, last = int(top.min()), int(bottom.max())
    # Horizontal pass on the needed rows only (identical column weights to the full resize) ...
    needed = F.interpolate(
        logits[None, :, first : last + 1], size=(last + 1 - first, size[1]), mode="bilinear", align_corners=False
    )[0]
    # ... then the vertical pass with the full resize's row weights and arithmetic (`interpolate_pair`, in place).
    upper, lower = needed.index_select(1, top - first), needed.index_select(1, bottom - first)
    return lower.mul_(weight[:, None]).addcmul_(upper, (1 - weight)[:, None])


def resize_logits(logits: torch.Tensor, size) -> torch.Tensor:
    """(num_labels, h, w) -> (num_labels, height, width) float32: the bilinear resize (align_corners=False)
    that `logits_to_prediction` applies band by band, all at once (same values, so its argmax is the same map)."""
    height = int(size[0])
    return _resize_band(logits.float(), (height, int(size[1])), slice(0, height))


PROBABILITIES_MAX_CHOICES = (None, "full", "input")


def _class_map(probabilities: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(num_labels, ...) probabilities -> (winning probability, class id); with one label (binary, sigmoid),
    class 1 where the foreground probability exceeds 1/2."""
    if probabilities.shape[0] == 1:
        foreground = probabilities[0] > 0.5
        return torch.where(foreground, probabilities[0], 1 - probabilities[0]), foreground.long()
    return probabilities.max(dim=0)


def class_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Per-class probabilities over dim 0: the softmax, or with one label (binary, trained with BCE) the sigmoid."""
    return logits.sigmoid() if logits.shape[0] == 1 else logits.softmax(dim=0)


def scores_to_classes(scores: torch.Tensor) -> torch.Tensor:
    """(num_labels, H, W) logits -> (H, W) int64 class ids: the argmax, or with one label the logit
    thresholded at 0 (1 = foreground)."""
    return (scores[0] > 0).long() if scores.shape[0] == 1 else scores.argmax(dim=0)


def _input_resolution_confidence(logits: torch.Tensor, original_size, band_elements: int) -> torch.Tensor:
    """The winning probability at the logits' own (network input) resolution, resized bilinearly to
    `original_size`: (num_labels, h, w) -> (H, W) float32."""
    num_labels, height, width = logits.shape
    confidence = torch.empty(height, width, device=logits.device)
    band_rows = max(1, band_elements // (num_labels * width))
    for start in range(0, height, band_rows):
        confidence[start : start + band_rows] = _class_map(class_probabilities(logits[:, start : start + band_rows]))[0]
    return F.interpolate(confidence[None, None], size=tuple(original_size), mode="bilinear", align_corners=False)[0, 0].cpu()


def _class_map_of_one(logits: torch.Tensor, size, band_elements: int) -> torch.Tensor:
    """The class map of one input-size logit map resized to `size`: pruned (`resized_argmax`) when
    upsampling finite logits, else resized band by band. (num_labels, h, w) -> (height, width) int64 on the CPU."""
    num_labels = logits.shape[0]
    if pruning_pays(logits.shape[1:], size, num_labels) and bool(torch.isfinite(logits).all()):
        return resized_argmax(logits, size, band_elements).cpu()
    height, width = size
    segmentation = torch.empty(height, width, dtype=torch.long)
    band_rows = max(1, band_elements // (num_labels * width))
    for start in range(0, height, band_rows):
        rows = slice(start, min(start + band_rows, height))
        segmentation[rows] = scores_to_classes(_resize_band(logits, size, rows)).cpu()
    return segmentation


def logits_to_prediction(
    logit_maps: list,
    original_size: tuple[int, int],
    return_probabilities: bool = False,
    band_elements: int = BAND_ELEMENTS,
    probabilities_max: str | None = None,
) -> SegmentationPrediction:
    """Resizes each (num_labels, h, w) logit map to `original_size`, averages their probabilities
    (softmax; sigmoid when num_labels == 1; several maps = test-time augmentation), and takes the class
    of highest probability (with one label: class 1 where the logit is above 0, or the mean probability
    above 1/2). A map is a tensor at the network input size, or `UpsampledLogits` (stride-8 logits and the
    input size: the official two resizes).

    The class map is exact: with one map it is `upsampled_argmax` or `resized_argmax` (the full resize's
    argmax without resizing every class at every pixel), with several `augmented_argmax` (for large outputs;
    the argmax of the mean softmax without the softmax of every class at every pixel); otherwise, and for
    probabilities, the maps are resized, softmaxed and reduced band by band.
    probabilities_max: None (default, `probabilities_max` is None: the class map alone costs the least),
    "full" (the winning probability at every pixel of the original size, exact; costs the softmax of every
    class at every pixel), or "input" (the winning probability at the network input resolution, i.e. at the
    logits' own size, resized bilinearly to the original size: a cheap confidence map for display and
    averages; with several maps (TTA), their own winning probabilities at their input sizes, averaged).
    `return_probabilities`, or several maps too small for `augmented_argmax`, give the exact "full" map
    whatever is asked.
    """
    if probabilities_max not in PROBABILITIES_MAX_CHOICES:
        raise ValueError(f"probabilities_max must be one of {PROBABILITIES_MAX_CHOICES}, got {probabilities_max!r}")
    height, width = original_size
    if len(logit_maps) == 1 and not return_probabilities and probabilities_max != "full":
        only = logit_maps[0]
        if isinstance(only, UpsampledLogits) and upsampled_argmax_pays(only, original_size):
            segmentation = upsampled_argmax(only, original_size).cpu()
            logits = materialize(only) if probabilities_max == "input" else None
        else:
            logits = materialize(only)
            segmentation = _class_map_of_one(logits, original_size, band_elements)
        confidence = None
        if probabilities_max == "input":
            confidence = _input_resolution_confidence(logits, original_size, band_elements)
        return SegmentationPrediction(segmentation, confidence)
    logit_maps = [materialize(logit_map) for logit_map in logit_maps]
    num_labels = logit_maps[0].shape[0]
    if not return_probabilities and probabilities_max != "full" and augmented_argmax_pays(logit_maps, original_size):
        segmentation = augmented_argmax(logit_maps, original_size).cpu()
        confidence = None
        if probabilities_max == "input":  # the maps' own winning probabilities at their input sizes, averaged
            confidence = sum(_input_resolution_confidence(logits, original_size, band_elements) for logits in logit_maps)
            confidence /= len(logit_maps)
        return SegmentationPrediction(segmentation, confidence)
    segmentation = torch.empty(height, width, dtype=torch.long)
    confidence = torch.empty(height, width)
    probabilities = torch.empty(num_labels, height, width) if return_probabilities else None
    band_rows = max(1, band_elements // (num_labels * width))
    for start in range(0, height, band_rows):
        rows = slice(start, min(start + band_rows, height))
        band = None  # the sum of the maps' probabilities, then their mean (as MMSegmentation's aug_test)
        for logits in logit_maps:
            resized = _resize_band(logits, original_size, rows)
            band = class_probabilities(resized) if band is None else band.add_(class_probabilities(resized))
        if len(logit_maps) > 1:
            band.div_(len(logit_maps))
        band_max, band_classes = _class_map(band)
        if len(logit_maps) == 1:  # the class map from the logits themselves, as the pruned argmax has it
            band_classes = scores_to_classes(resized)
        segmentation[rows], confidence[rows] = band_classes.cpu(), band_max.cpu()
        if probabilities is not None:
            probabilities[:, rows] = band.cpu()
    return SegmentationPrediction(segmentation, confidence, probabilities)


def _resolve_mode(model, mode, window_size, window_stride):
    """The test mode and window: the given ones, else the model config's official ones (the config is only
    read for what is not given, so a wrapped model (DDP) works with an explicit mode)."""
    if mode is None:
        mode = model.config.inference_mode
    if mode == "slide":
        window_size = window_size or model.config.sliding_window_size
        window_stride = window_stride or model.config.sliding_window_stride
    return mode, window_size, window_stride


def _augmented_logit_maps(model, pixel_values, flip, mode, **inference_kwargs) -> list[list]:
    """Per-image lists of logit maps: the plain pass (in whole mode, `UpsampledLogits`: the resize to the input
    size is left to `logits_to_prediction`) and, with `flip`, the flipped one at the input size, flipped back."""
    if mode == "whole":
        size = tuple(pixel_values.shape[-2:])
        maps = [[UpsampledLogits(logits, size) for logits in _model_logits(model, pixel_values)]]
    else:
        maps = [list(input_size_logits(model, pixel_values, mode=mode, **inference_kwargs))]
    if flip:
        flipped = input_size_logits(model, pixel_values.flip(-1), mode=mode, **inference_kwargs).flip(-1)
        maps.append(list(flipped))
    return [list(per_image) for per_image in zip(*maps)]


def predict(
    model,
    pixel_values,
    original_sizes=None,
    input_sizes=None,
    mode: str | None = None,
    window_size=None,
    window_stride=None,
    flip: bool = False,
    window_batch_size: int = WINDOW_BATCH_SIZE,
    return_probabilities: bool = False,
    probabilities_max: str | None = None,
) -> list[SegmentationPrediction]:
    """Segments processed images: `pixel_values` -> one `SegmentationPrediction` per image.

    pixel_values: a (B, C, H, W) batch, or a list of such batches, one per test-time scale (the same
    images preprocessed at each scale, e.g. by `preprocess_scales`); the probabilities of every scale and
    flip are averaged, as MMSegmentation's multi-scale test does.
    mode: "whole" or "slide" (default: the model config's official test mode, with its window).
    original_sizes: (H, W) per image to resize to (default: the input size). input_sizes: the valid
    (h, w) of each image in a padded batch (default: the whole input; one scale only): the network runs on
    each image's valid region (one forward per distinct size), so a padded batch gives what each image
    alone gives. flip: horizontal-flip TTA.
    probabilities_max: None (default: not computed), "full" or "input"; see `logits_to_prediction`.
    """
    batches = list(pixel_values) if isinstance(pixel_values, (list, tuple)) else [pixel_values]
    if not batches:
        raise ValueError("predict() got an empty list of pixel_values; expected one (B, C, H, W) batch per scale")
    batch_size = batches[0].shape[0]
    if any(batch.ndim != 4 or batch.shape[0] != batch_size for batch in batches):
        shapes = [tuple(batch.shape) for batch in batches]
        raise ValueError(f"pixel_values must be (B, C, H, W) batches of the same images at each scale, got {shapes}")
    if input_sizes is not None and len(batches) > 1:
        raise ValueError(
            f"input_sizes crops a padded batch, but {len(batches)} scales were given; pass unpadded batches per scale"
        )
    mode, window_size, window_stride = _resolve_mode(model, mode, window_size, window_stride)
    height, width = batches[0].shape[-2:]
    original_sizes = original_sizes or input_sizes or [(height, width)] * batch_size
    if len(original_sizes) != batch_size or (input_sizes is not None and len(input_sizes) != batch_size):
        raise ValueError(
            f"Got {batch_size} images but {len(input_sizes or [])} input_sizes and {len(original_sizes)} original_sizes"
        )
    per_image_maps = [[] for _ in range(batch_size)]
    # A padded batch runs as one forward per valid size, on the images' own regions: padding would change the
    # logits of real pixels (Channel Reduction Attention pools over the whole canvas).
    groups = {}
    for index, size in enumerate(input_sizes if input_sizes is not None else [(height, width)] * batch_size):
        groups.setdefault((int(size[0]), int(size[1])), []).append(index)
    for batch in batches:
        for (valid_h, valid_w), indices in groups.items():
            group = batch if len(indices) == batch_size else batch[indices]
            maps = _augmented_logit_maps(
                model, group[:, :, :valid_h, :valid_w], flip, mode=mode, window_size=window_size,
                window_stride=window_stride, window_batch_size=window_batch_size,
            )
            for index, new_maps in zip(indices, maps):
                per_image_maps[index] += new_maps
    return [
        logits_to_prediction(maps, tuple(original_size), return_probabilities, probabilities_max=probabilities_max)
        for maps, original_size in zip(per_image_maps, original_sizes)
    ]


def _scaled_size(size, ratio: float) -> dict:
    """The processor's resize target scaled by `ratio`, as MMSegmentation's MultiScaleFlipAug scales its box."""
    keys = [key for key in ("height", "width", "shortest_edge", "longest_edge") if getattr(size, key, None)]
    return {key: int(getattr(size, key) * ratio) for key in keys}


def count_forward_passes(
    image_processor,
    height: int,
    width: int,
    mode: str,
    window_size=None,
    window_stride=None,
    flip: bool = False,
    scales=(1.0,),
    window_batch_size: int = WINDOW_BATCH_SIZE,
) -> int:
    """How many model calls `segment()` makes on one `height` x `width` image with these settings (for
    a progress bar's total): one per scale and flip in "whole" mode, one per `window_batch_size` windows
    in "slide" mode."""
    total = 0
    for ratio in scales:
        overrides = {"size": _scaled_size(image_processor.size, ratio)} if ratio != 1.0 else {}
        input_height, input_width = image_processor.get_processed_size(height, width, **overrides)
        if mode == "slide":
            (window_h, window_w) = _pair(window_size, "window_size")
            (stride_h, stride_w) = _pair(window_stride, "window_stride")
            windows = len(window_starts(input_height, window_h, stride_h)) * len(window_starts(input_width, window_w, stride_w))
            total += -(-windows // window_batch_size)
        else:
            total += 1
    return total * (2 if flip else 1)


def preprocess_scales(image_processor, image, scales=(1.0,), input_data_format=None, **settings) -> list[torch.Tensor]:
    """One image's `pixel_values`, (1, C, h, w), at each test-time scale: the processor's resize box
    scaled by each ratio (MMSegmentation's MultiScaleFlipAug; 1.0 is the processor's own size), unpadded.
    `settings` are processor settings for this call (e.g. from `read_image_and_overrides`)."""
    if not scales or any(ratio <= 0 for ratio in scales):
        raise ValueError(f"scales must be positive resize ratios, got {scales!r}")
    batches = []
    for ratio in scales:
        overrides = {"size": _scaled_size(image_processor.size, ratio)} if ratio != 1.0 else {}
        # One image is never padded (`pad_size` is for batches): the class map is resized from the
        # image's own input size, and padding would change its logits (attention pools the whole canvas).
        inputs = image_processor(
            images=image, input_data_format=input_data_format, return_tensors="pt", **{**settings, "do_pad": False},
            **overrides
        )
        batches.append(inputs["pixel_values"])
    return batches


def segment(
    model,
    image_processor,
    images,
    mode: str | None = None,
    window_size=None,
    window_stride=None,
    flip: bool = False,
    scales=(1.0,),
    window_batch_size: int = WINDOW_BATCH_SIZE,
    return_probabilities: bool = False,
    probabilities_max: str | None = None,
) -> list[SegmentationPrediction]:
    """Segments images end to end: reading and preprocessing (at each TTA scale), whole or sliding-window
    inference, and the official resize to each image's original size.

    images: one image or a list (PIL, numpy, torch, paths; anything `image_processor` accepts).
    scales: resize ratios of the processor's box for multi-scale TTA (official: 0.5 ... 1.75); the
    probabilities of every scale (and flip) are averaged. Returns one `SegmentationPrediction` per image.
    """
    if not isinstance(images, (list, tuple)):
        images = [images]
    if not images:
        raise ValueError("segment() got an empty list of images")
    predictions = []
    for image in images:
        read, settings = image_processor.read_image_and_overrides(image)
        batches = preprocess_scales(image_processor, read, scales, input_data_format="channels_last", **settings)
        predictions += predict(
            model, batches, original_sizes=[tuple(read.shape[:2])], mode=mode, window_size=window_size,
            window_stride=window_stride, flip=flip, window_batch_size=window_batch_size,
            return_probabilities=return_probabilities, probabilities_max=probabilities_max,
        )
    return predictions
