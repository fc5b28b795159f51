#!/usr/bin/env python
"""Streaming mIoU (metaseg_hf.metrics.StreamingMeanIoU) vs the per-image numpy intersect-and-union.

100 random 512x512 maps, 150 classes (ADE20K), 10% of the label pixels at the ignore index 255;
predictions int64 (as `logits.argmax(1)` gives them), labels uint8 (as read from PNG files). The
reference is the algorithm of MMSegmentation's evaluation and `evaluate`'s `mean_iou`: per image, mask
the ignored pixels, then three `np.histogram`s (intersection, prediction, label). Both see the same
arrays; the streaming metric is fed one image at a time, as an evaluation loop does. Medians of
interleaved repeats; the results must agree to float precision.

    python benchmarks/bench_metric.py [--repeats 5] [--threads N] [--breakdown]

`--breakdown` also times the streaming metric's two passes alone: building the int32 bin index from
the maps (memory-bound: it reads the 2 MiB of int64 predictions per map) and `torch.bincount` over
those indices (a serial loop in PyTorch's CPU kernel).
"""

import argparse
import os
import sys
import time

_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
if any(os.environ.get(key) != value for key, value in _MALLOC.items()):
    # glibc's mmap'd large allocations page-fault again on every use: fix the allocator, then re-exec.
    os.execve(sys.executable, [sys.executable] + sys.argv, {**os.environ, **_MALLOC})

import numpy as np  # noqa: E402
import torch  # noqa: E402

from metaseg_hf.metrics import StreamingMeanIoU  # noqa: E402

NUM_LABELS, IGNORE, SIZE, COUNT = 150, 255, 512, 100


def numpy_intersect_and_union(predictions, labels, num_labels=NUM_LABELS, ignore_index=IGNORE):
    """Per-image numpy intersect-and-union, summed; returns (IoU per class, accuracy per class, overall accuracy)."""
    total_intersect = np.zeros(num_labels)
    total_union = np.zeros(num_labels)
    total_label = np.zeros(num_labels)
    for prediction, label in zip(predictions, labels):
        mask = label != ignore_index
        prediction, label = prediction[mask], label[mask]
        intersect = prediction[prediction == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_prediction = np.histogram(prediction, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_intersect += area_intersect
        total_union += area_prediction + area_label - area_intersect
        total_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        return total_intersect / total_union, total_intersect / total_label, total_intersect.sum() / total_label.sum()


def streaming(predictions, labels):
    metric = StreamingMeanIoU(NUM_LABELS, ignore_index=IGNORE)
    for prediction, label in zip(predictions, labels):
        metric.update(prediction, label)
    results = metric.compute()
    return results["per_category_iou"], results["per_category_accuracy"], results["overall_accuracy"]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--breakdown", action="store_true", help="also time the index and bincount passes alone")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    predictions = rng.integers(0, NUM_LABELS, (COUNT, SIZE, SIZE), dtype=np.int64)
    # Labels agree with the prediction on ~half of the pixels; 10% are ignored.
    labels = np.where(rng.random((COUNT, SIZE, SIZE)) < 0.5, predictions, rng.integers(0, NUM_LABELS, (COUNT, SIZE, SIZE)))
    labels[rng.random((COUNT, SIZE, SIZE)) < 0.1] = IGNORE
    labels = labels.astype(np.uint8)
    prediction_maps = list(torch.from_numpy(predictions))  # zero-copy views of the same memory
    label_maps = list(torch.from_numpy(labels))

    expected = numpy_intersect_and_union(predictions, labels)
    got = streaming(prediction_maps, label_maps)
    for name, a, b in zip(("IoU", "accuracy", "overall accuracy"), expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-12, atol=1e-12, err_msg=name)

    reference_times, streaming_times = [], []
    for _ in range(args.repeats):  # interleaved, so that machine noise hits both alike
        start = time.perf_counter()
        numpy_intersect_and_union(predictions, labels)
        reference_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        streaming(prediction_maps, label_maps)
        streaming_times.append(time.perf_counter() - start)
    reference, stream = float(np.median(reference_times)), float(np.median(streaming_times))
    print(f"{COUNT} maps of {SIZE}x{SIZE}, {NUM_LABELS} classes, torch threads {torch.get_num_threads()}")
    print(f"per-image numpy intersect-and-union: {1000 * reference:8.1f} ms  ({1000 * reference / COUNT:.2f} ms/map)")
    print(f"streaming confusion matrix:          {1000 * stream:8.1f} ms  ({1000 * stream / COUNT:.2f} ms/map)")
    print(f"speed-up: {reference / stream:.1f}x (target >= 20x); results identical")
    if args.breakdown:
        breakdown(prediction_maps, label_maps, args.repeats)


def breakdown(prediction_maps, label_maps, repeats):
    """The two passes of `StreamingMeanIoU.update` (its own code: `_bin_index`, then the
    `torch.bincount` of `_count`), timed alone over all maps."""
    metric = StreamingMeanIoU(NUM_LABELS, ignore_index=IGNORE)

    def index_pass():
        return [
            metric._bin_index(prediction.reshape(-1), label.reshape(-1))
            for prediction, label in zip(prediction_maps, label_maps)
        ]

    indices = index_pass()
    passes = {"index (int64 predictions + uint8 labels -> int32)": index_pass,
              "torch.bincount over the indices": lambda: [torch.bincount(index) for index in indices]}
    for name, run in passes.items():
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        print(f"  {name}: {1000 * float(np.median(times)) / COUNT:.3f} ms/map")


if __name__ == "__main__":
    main()
