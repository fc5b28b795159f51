"""Streaming semantic-segmentation metric: mIoU, accuracies and per-class rows from one confusion matrix.

`StreamingMeanIoU` accumulates a (num_labels x num_labels) int64 confusion matrix on the device of
the maps it is given (one `torch.bincount` per `update`), sums it across processes, and computes the
numbers MMSegmentation's evaluation (and `evaluate`'s `mean_iou`) report:

- pixels whose label is the ignore index are skipped;
- per class, IoU = intersection / union and accuracy = intersection / label area, where
  intersection = diagonal, union = label area + predicted area - intersection;
- a class with an empty union (absent from both prediction and label in the whole split) has IoU NaN,
  a class absent from the labels has accuracy NaN, and NaN classes are skipped in the means;
- overall accuracy = correctly classified valid pixels / valid pixels.

Only the matrix is kept, never the maps or logits, so it streams over any split size.

Example:

```python
>>> metric = StreamingMeanIoU(num_labels=3, id2label={0: "sky", 1: "road", 2: "car"})
>>> metric.update(predictions, labels)  # (B, H, W) integer tensors, or lists of (H, W) maps
>>> results = metric.synced(accelerator).compute()  # summed over all processes
>>> results["mean_iou"], results["per_class"][0]
```
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .image_io import IGNORE_INDEX, read_label, reduce_zero_label

# The same metric as an `evaluate` module: `evaluate.load(str(EVALUATE_METRIC_PATH))` works offline.
EVALUATE_METRIC_PATH = Path(__file__).resolve().parent / "evaluate_metric" / "metaseg_mean_iou"


def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, Image.Image):  # a label image: read as the image processor reads label maps
        return read_label(value, name)
    raise TypeError(f"{name} must be torch tensors, numpy arrays or PIL images, got {type(value).__name__}")


class StreamingMeanIoU:
    """Streaming confusion-matrix metric for semantic segmentation (see the module docstring).

    Args:
        num_labels: number of classes; predictions and labels are class ids in `[0, num_labels)`.
        ignore_index: label value whose pixels are skipped (255, MMSegmentation's and MetaSeg's).
        id2label: class names for the per-class rows (`{id: name}`); defaults to the ids.
        reduce_labels: ADE20K-style labels: 0 ("other") becomes the ignore index and every other
            value is lowered by one before scoring (what `do_reduce_labels` does in the processor).
        device: where the matrix lives; by default the device of the first maps given to `update`.
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int = IGNORE_INDEX,
        id2label: dict | None = None,
        reduce_labels: bool = False,
        device: torch.device | str | None = None,
    ):
        if int(num_labels) != num_labels or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        if 0 <= ignore_index < num_labels:
            raise ValueError(
                f"ignore_index = {ignore_index} is a real class id (num_labels = {num_labels}); "
                "use a value outside [0, num_labels), e.g. 255"
            )
        self.num_labels = int(num_labels)
        self.ignore_index = int(ignore_index)
        self.reduce_labels = reduce_labels
        self.id2label = {int(key): str(value) for key, value in (id2label or {}).items()}
        # Counts live in a flat (num_labels x stride) table indexed by prediction * stride + label: one
        # bincount per update, no masking pass. Ignored pixels land in column `ignore_index` and labels
        # that are no class in columns [num_labels, stride), checked when the matrix is read.
        if 0 <= self.ignore_index < 256:
            self._stride, self._ignore_column, self._remap_ignore = max(256, self.num_labels + 1), self.ignore_index, False
        else:  # negative or large ignore index: moved to a reserved last column
            self._stride = max(256, self.num_labels + 1) + 1
            self._ignore_column, self._remap_ignore = self._stride - 1, True
        self._index_dtype = torch.int32 if self.num_labels * self._stride < 2**31 else torch.int64
        self._counts = None if device is None else self._zeros(torch.device(device))

    # ------------------------------------------------------------------------------------------------
    # accumulation
    # ------------------------------------------------------------------------------------------------

    def _zeros(self, device: torch.device) -> torch.Tensor:
        return torch.zeros(self.num_labels * self._stride, dtype=torch.int64, device=device)

    @property
    def device(self) -> torch.device | None:
        return None if self._counts is None else self._counts.device

    def reset(self) -> None:
        """Forgets everything accumulated (keeps the device)."""
        if self._counts is not None:
            self._counts.zero_()

    def update(self, predictions, references) -> None:
        """Adds maps to the matrix.

        Args:
            predictions: predicted class ids, a (B, H, W) or (H, W) integer tensor / array, or a list
                of (H, W) maps (sizes may differ between images).
            references: the labels, same shapes as `predictions` (class ids or the ignore index);
                uint8 labels (as read from PNG files) take the fastest path.

        Raises `ValueError` for shape mismatches, predictions outside `[0, num_labels)` and label
        values that are neither a class id nor the ignore index (naming the values; labels are
        checked here for wide integer types and for uint8 when the matrix is read).
        """
        if isinstance(predictions, (list, tuple)) or isinstance(references, (list, tuple)):
            if not isinstance(predictions, Sequence) or not isinstance(references, Sequence):
                raise TypeError("predictions and references must both be lists when one of them is")
            if len(predictions) != len(references):
                raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
            for prediction, reference in zip(predictions, references):
                self.update(prediction, reference)
            return
        predictions = _as_tensor(predictions, "predictions")
        references = _as_tensor(references, "references")
        if predictions.shape != references.shape:
            raise ValueError(
                f"predictions have shape {tuple(predictions.shape)} but references {tuple(references.shape)}: "
                "score each prediction at its label's size (resize the logits, not the label)"
            )
        if predictions.is_floating_point() or references.is_floating_point() or predictions.dtype == torch.bool:
            raise TypeError(
                f"predictions ({predictions.dtype}) and references ({references.dtype}) must hold integer class "
                "ids; take the argmax of the logits first"
            )
        if self._counts is None:
            self._counts = self._zeros(predictions.device)
        device = self._counts.device
        predictions = predictions.to(device).reshape(-1)
        references = references.to(device).reshape(-1)
        if predictions.numel():
            if predictions.dtype != torch.uint8:  # checked before the table index, which a huge id would wrap around
                low, high = torch.aminmax(predictions)
                if low < 0 or high >= self.num_labels:
                    bad = torch.unique(predictions[(predictions < 0) | (predictions >= self.num_labels)])[:10].tolist()
                    raise ValueError(f"predictions contain class ids outside [0, {self.num_labels}): {bad}")
            self._count(self._bin_index(predictions, references), predictions)

    def _bin_index(self, predictions: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """Flat maps -> the table index `prediction * stride + label` of each pixel (labels checked)."""
        stride = self._stride
        if self.reduce_labels:
            references = reduce_zero_label(references, self.ignore_index)
        if references.dtype != torch.uint8 or self._remap_ignore:
            if self._remap_ignore:
                references = torch.where(references == self.ignore_index, self._ignore_column, references.long())
            low, high = torch.aminmax(references)
            if low < 0 or high >= stride:  # would leak into another row of the table
                bad = references[(references < 0) | (references >= stride)]
                raise ValueError(self._bad_label_message(torch.unique(bad)[:10].tolist()))
        # prediction * stride + label, in 32 bits when the table allows (half the memory traffic)
        if references.dtype != torch.uint8:  # uint8 labels promote to the index type inside the add
            references = references.to(self._index_dtype)
        return torch.add(references, predictions.to(self._index_dtype), alpha=stride)

    def _count(self, index: torch.Tensor, predictions: torch.Tensor) -> None:
        """Adds one `torch.bincount` of the table indices to the counts (predictions checked)."""
        n, stride = self.num_labels, self._stride
        try:
            counts = torch.bincount(index)
        except RuntimeError:  # negative index: a negative prediction
            counts = None
        if counts is None or counts.numel() > n * stride:  # predictions outside [0, n)
            bad = torch.unique(predictions[(predictions < 0) | (predictions >= n)])[:10].tolist()
            raise ValueError(f"predictions contain class ids outside [0, {n}): {bad}")
        self._counts[: counts.numel()] += counts

    @property
    def confusion_matrix(self) -> torch.Tensor:
        """The (num_labels, num_labels) int64 matrix: rows are labels, columns predictions.

        Raises `ValueError` naming label values that are neither a class id nor the ignore index."""
        n = self.num_labels
        counts = self._counts if self._counts is not None else self._zeros(torch.device("cpu"))
        table = counts.view(n, self._stride)  # (prediction, label)
        invalid = table[:, n:].sum(dim=0)
        invalid[self._ignore_column - n] = 0
        if invalid.any():
            values = (invalid.nonzero().flatten() + n)[:10].tolist()
            raise ValueError(self._bad_label_message(values))
        return table[:, :n].t().contiguous()

    def _bad_label_message(self, values) -> str:
        return (
            f"references contain label values {values} that are neither a class id in [0, {self.num_labels}) nor "
            f"the ignore index {self.ignore_index}"
            + ("" if self.reduce_labels else " (ADE20K-style labels with 0 = 'other' need reduce_labels=True)")
        )

    def merge(self, other: StreamingMeanIoU) -> StreamingMeanIoU:
        """Adds another metric's counts to this one (same labels and ignore index); returns self."""
        if (other.num_labels, other.ignore_index) != (self.num_labels, self.ignore_index):
            raise ValueError(
                f"cannot merge a metric of {other.num_labels} labels (ignore {other.ignore_index}) into one of "
                f"{self.num_labels} labels (ignore {self.ignore_index})"
            )
        if other._counts is not None:
            if self._counts is None:
                self._counts = self._zeros(other._counts.device)
            self._counts += other._counts.to(self._counts.device)
        return self

    def synced(self, accelerator=None) -> StreamingMeanIoU:
        """A copy whose matrix is the sum over all processes (this one is left as it is).

        Uses `accelerator.reduce` when an `accelerate.Accelerator` is given, otherwise
        `torch.distributed.all_reduce` when a process group is initialised (a plain copy otherwise).
        Every process must call it (it is a collective). With NCCL the matrix must be on the GPU:
        `update` keeps it on the maps' device, or pass `device=accelerator.device`.
        """
        copy = StreamingMeanIoU(self.num_labels, self.ignore_index, self.id2label, self.reduce_labels)
        if self._counts is None:
            self._counts = self._zeros(accelerator.device if accelerator is not None else torch.device("cpu"))
        counts = self._counts.clone()
        if accelerator is not None:
            if accelerator.num_processes > 1:
                counts = accelerator.reduce(counts, reduction="sum")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts, op=torch.distributed.ReduceOp.SUM)
        copy._counts = counts
        return copy

    # ------------------------------------------------------------------------------------------------
    # results
    # ------------------------------------------------------------------------------------------------

    def compute(self) -> dict:
        """The scores of everything accumulated (on this process: call `synced()` first in distributed runs).

        Returns a dict with `mean_iou`, `mean_accuracy`, `overall_accuracy` (floats, NaN when nothing
        was scored), `per_category_iou`, `per_category_accuracy` (float64 numpy arrays with NaN for
        absent classes), and `per_class`: one dict per class with `id`, `name`, `iou`, `accuracy`,
        `label_pixels` and `predicted_pixels`.
        """
        matrix = self.confusion_matrix.detach().cpu().numpy().astype(np.float64)
        intersection = np.diag(matrix)
        label_area = matrix.sum(axis=1)
        predicted_area = matrix.sum(axis=0)
        union = label_area + predicted_area - intersection
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = intersection / union
            accuracy = intersection / label_area
        total = label_area.sum()
        per_class = [
            {
                "id": index,
                "name": self.id2label.get(index, str(index)),
                "iou": float(iou[index]),
                "accuracy": float(accuracy[index]),
                "label_pixels": int(label_area[index]),
                "predicted_pixels": int(predicted_area[index]),
            }
            for index in range(self.num_labels)
        ]
        return {
            "mean_iou": _nanmean(iou),
            "mean_accuracy": _nanmean(accuracy),
            "overall_accuracy": float(intersection.sum() / total) if total > 0 else math.nan,
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
            "per_class": per_class,
        }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else math.nan


def results_to_json(results: dict) -> dict:
    """`compute()`'s dict with numpy arrays as lists and NaN as None, ready for `json.dump`."""

    def convert(value):
        if isinstance(value, np.ndarray):
            return [convert(item) for item in value.tolist()]
        if isinstance(value, dict):
            return {key: convert(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [convert(item) for item in value]
        if isinstance(value, (float, np.floating)):
            return None if math.isnan(value) else float(value)
        if isinstance(value, np.integer):
            return int(value)
        return value

    return convert(results)


def format_results_table(results: dict) -> str:
    """A plain-text per-class table (IoU and accuracy in %, '-' for absent classes) and the means."""

    def percent(value):
        return "    -" if value is None or math.isnan(value) else f"{100 * value:5.2f}"

    rows = results["per_class"]
    width = max([len("class")] + [len(row["name"]) for row in rows])
    lines = [f"{'id':>4}  {'class':<{width}}  {'IoU':>6}  {'Acc':>6}", "-" * (width + 24)]
    for row in rows:
        lines.append(f"{row['id']:>4}  {row['name']:<{width}}  {percent(row['iou']):>6}  {percent(row['accuracy']):>6}")
    lines.append("-" * (width + 24))
    lines.append(
        f"mIoU {percent(results['mean_iou']).strip()}  mAcc {percent(results['mean_accuracy']).strip()}  "
        f"aAcc {percent(results['overall_accuracy']).strip()}"
    )
    return "\n".join(lines)


__all__ = ["EVALUATE_METRIC_PATH", "StreamingMeanIoU", "format_results_table", "results_to_json"]
