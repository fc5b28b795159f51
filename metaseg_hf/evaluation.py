"""Scoring a MetaSeg model on a labelled split: the evaluation during training and `examples/evaluate.py`.

Both run the library's inference (`inference_metaseg.predict`: whole-image or sliding-window, optional
flip and multi-scale test-time augmentation, the official resize of the logits to the original size) on
`data.SegmentationEvalDataset` items, and score each prediction at its label's original resolution
with the streaming confusion-matrix metric, summed over processes.
"""

import math

import torch
from torch.utils.data import DataLoader, Subset

from .inference_metaseg import WINDOW_BATCH_SIZE, predict
from .metrics import StreamingMeanIoU


@torch.no_grad()
def evaluate_segmentation(
    model,
    dataset,
    accelerator,
    metric: StreamingMeanIoU,
    batch_size: int = 1,
    num_workers: int = 0,
    mode: str | None = "whole",
    window_size=None,
    window_stride=None,
    flip: bool = False,
    window_batch_size: int = WINDOW_BATCH_SIZE,
    progress: bool = False,
) -> StreamingMeanIoU:
    """Scores `model` on a `SegmentationEvalDataset`, on every process at once; returns the summed metric.

    Each process takes every `num_processes`-th image (no padding, no duplicates: each image is counted
    once), runs `predict` on its images (items of the same processed size batched together, up to
    `batch_size`), and adds each class map, at its label's original size, to its confusion matrix; the
    matrices are then summed over processes. Processes with fewer images run a repeated image without
    scoring it, so that in `"whole"` mode every process makes the same number of forward calls (needed by
    FSDP / DeepSpeed; sliding windows depend on the image size). Only one batch of logits exists at a time.

    mode, window_size, window_stride, flip, window_batch_size: as `predict`; `mode=None` takes the model
    config's official test mode (a model wrapped by `accelerator.prepare` needs an explicit mode). The
    test-time scales are the dataset's (`SegmentationEvalDataset(..., scales=...)`).
    `accelerator=None` evaluates every image in this process and returns `metric` itself.
    progress: one bar over all processes' images, shown by the main process.
    """
    was_training = model.training
    model.eval()
    metric.reset()
    count = len(dataset)
    process_index, num_processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    indices = list(range(process_index, count, num_processes))
    per_process = math.ceil(count / num_processes)
    scored = [True] * len(indices)
    if len(indices) < per_process:  # pad with unscored repeats so that every process runs as many batches
        indices += [indices[0] if indices else 0] * (per_process - len(indices))
        scored += [False] * (per_process - len(scored))
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, collate_fn=list, num_workers=num_workers,
        generator=torch.Generator(),
    )
    bar = None
    if progress:  # one bar, on the main process, over every process's images
        from tqdm.auto import tqdm

        shares = [len(range(rank, count, num_processes)) for rank in range(num_processes)]
        bar = tqdm(total=count, desc="evaluating", unit="image", disable=process_index != 0)
    position = 0
    for step, batch in enumerate(loader):
        groups = {}
        for offset, item in enumerate(batch):
            shapes = tuple(tuple(pixels.shape) for pixels in item["pixel_values"])
            groups.setdefault(shapes, []).append((position + offset, item))
        position += len(batch)
        for shapes, members in groups.items():
            pixel_values = [torch.stack([item["pixel_values"][scale] for _, item in members]) for scale in range(len(shapes))]
            predictions = predict(
                model, pixel_values, original_sizes=[tuple(item["labels"].shape) for _, item in members], mode=mode,
                window_size=window_size, window_stride=window_stride, flip=flip, window_batch_size=window_batch_size,
            )
            for (index, item), prediction in zip(members, predictions):
                if scored[index]:
                    metric.update(prediction.segmentation, item["labels"])
        if bar is not None:  # the processes advance in step, one batch each: every share's first images are done
            bar.update(sum(min(share, (step + 1) * batch_size) for share in shares) - bar.n)
    if bar is not None:
        bar.close()
    if was_training:
        model.train()
    return metric.synced(accelerator) if accelerator is not None else metric


__all__ = ["evaluate_segmentation"]
