"""Speed of the training data path: augmented crops, class counting, validation loading (CPU).

Cases, on ADE20K-sized samples (the synthetic scenes at 512x683, 8 classes, JPEG image and PNG label
files in an image/label folder of `--images` pairs):

- `crop`: one training crop of the official recipe (`SegmentationTrainDataset[i]`: read the files,
  rescale into (2048, 512) x 0.5-2.0, 512x512 crop with cat_max_ratio, flip, photometric distortion as
  drawn, normalisation), mean over the images;
- `crop, every photometric step`: the same with every photometric step applied (brightness, contrast,
  saturation, hue: two trips through HSV);
- `count classes`: `infer_num_labels` on a saved `datasets` dataset of the same pairs (what a run does
  when the data name no classes);
- `validation load`: one validation item (`SegmentationEvalDataset[i]`: read, official test resize,
  normalise): unchanged here; validation now uses `--dataloader_num_workers` processes, whose gain needs
  free cores (not measurable on the shared 2-core machine these figures come from).

Each case runs in this process and, with `--baseline REV`, in a fresh process on that git revision's
package (`git archive`), alternately, so that both meet the same machine load; medians of per-image
milliseconds are reported with the ratio baseline / this tree. One thread per process, as in a
DataLoader worker.

    python benchmarks/bench_data.py --baseline d8e124a [--images 12] [--rounds 5] [--write-results]
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
CASES = ("crop", "crop, every photometric step", "count classes", "validation load")


class _AlwaysYes:
    """A numpy Generator whose coin flips all say yes: every photometric step is applied."""

    def __init__(self, rng):
        self.rng = rng

    def integers(self, low, high=None, *args, **kwargs):
        if (low, high) == (2, None):
            return 1
        return self.rng.integers(low, high, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.rng, name)


def make_data(folder: Path, count: int) -> None:
    """`count` 512x683 scenes as images/*.jpg + labels/*.png, and the same as a saved `datasets` dataset."""
    import datasets
    import numpy as np
    from PIL import Image

    from metaseg_hf.synthetic import render_scene

    (folder / "images").mkdir(parents=True)
    (folder / "labels").mkdir()
    for index in range(count):
        image, label = render_scene(np.random.default_rng([3, index]), (512, 683))
        image.save(folder / "images" / f"{index:03d}.jpg", quality=90)
        Image.fromarray(np.asarray(label)).save(folder / "labels" / f"{index:03d}.png")
    images = sorted(str(path) for path in (folder / "images").glob("*.jpg"))
    labels = sorted(str(path) for path in (folder / "labels").glob("*.png"))
    rows = datasets.Dataset.from_dict({"image": images, "label": labels}).cast_column("image", datasets.Image())
    rows = rows.cast_column("label", datasets.Image())
    datasets.DatasetDict({"train": rows}).save_to_disk(str(folder / "saved"))


def measure(folder: Path, rounds: int) -> dict:
    """Per-image milliseconds of each case: a list of `rounds` means."""
    import numpy as np
    import torch

    torch.set_num_threads(1)

    from metaseg_hf.data import (
        SegmentationEvalDataset,
        SegmentationTrainDataset,
        infer_num_labels,
        load_segmentation_data,
        prepare_label,
        train_augmentation,
    )
    from metaseg_hf.image_processing_metaseg import MetaSegImageProcessor

    processor = MetaSegImageProcessor(size={"shortest_edge": 512, "longest_edge": 2048}, size_divisor=32)
    data = load_segmentation_data(train_dir=folder, train_val_split=0, id2label={index: str(index) for index in range(8)})
    augmentation = train_augmentation(processor, 512)
    train = SegmentationTrainDataset(data.train, augmentation, 8)
    evaluation = SegmentationEvalDataset(data.train, processor, 8)
    count = len(train)

    def every_step(index):
        image, label, name = data.train.load(index)
        label = prepare_label(label, name, 8, False)
        return augmentation(image, label, _AlwaysYes(np.random.default_rng([0, 0, index])))

    def count_classes():
        saved = load_segmentation_data(dataset_name=str(folder / "saved"), train_val_split=0, id2label={0: "a"})
        return infer_num_labels([saved.train], False)

    cases = {
        "crop": lambda: [train[index] for index in range(count)],
        "crop, every photometric step": lambda: [every_step(index) for index in range(count)],
        "count classes": count_classes,
        "validation load": lambda: [evaluation[index] for index in range(count)],
    }
    for function in cases.values():  # warm-up
        function()
    times = {name: [] for name in cases}
    for _ in range(rounds):
        for name, function in cases.items():
            start = time.perf_counter()
            function()
            times[name].append(1000 * (time.perf_counter() - start) / count)
    return times


def baseline_tree(revision: str, folder: Path) -> Path:
    archive = folder / "baseline.tar"
    subprocess.run(["git", "-C", str(REPO_ROOT), "archive", "-o", str(archive), revision, "metaseg_hf"], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(folder / "baseline", filter="data")
    return folder / "baseline"


def run_child(tree: Path, folder: Path, rounds: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, __file__, "--child", str(folder), "--rounds", str(rounds)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{tree}: the measurement failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", help="git revision to compare with (e.g. main)")
    parser.add_argument("--images", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per process")
    parser.add_argument("--repeats", type=int, default=3, help="processes per tree, alternating")
    parser.add_argument("--write-results", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(Path(args.child), args.rounds)))
        return
    with tempfile.TemporaryDirectory() as temporary:
        temporary = Path(temporary)
        sys.path.insert(0, str(REPO_ROOT))
        make_data(temporary / "data", args.images)
        trees = {"this tree": REPO_ROOT}
        if args.baseline:
            trees = {f"baseline {args.baseline}": baseline_tree(args.baseline, temporary), **trees}
        times = {label: {name: [] for name in CASES} for label in trees}
        for _ in range(args.repeats):
            for label, tree in trees.items():
                for name, values in run_child(tree, temporary / "data", args.rounds).items():
                    times[label][name] += values
    medians = {label: {name: statistics.median(values) for name, values in cases.items()} for label, cases in times.items()}
    header = "| case | " + " | ".join(f"{label} (ms / image)" for label in trees) + (" | speed-up |" if args.baseline else " |")
    lines = [header, "|---" * (len(trees) + 1 + bool(args.baseline)) + "|"]
    for name in CASES:
        row = [f"{medians[label][name]:.1f}" for label in trees]
        ratio = f" | {medians[next(iter(trees))][name] / medians['this tree'][name]:.1f}x" if args.baseline else ""
        lines.append(f"| {name} | " + " | ".join(row) + ratio + " |")
    table = "\n".join(lines)
    print(table)
    if args.write_results:
        sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
        from common import write_section

        text = (
            "## Training data path, CPU, one thread per process\n\n"
            f"`{'python benchmarks/bench_data.py ' + ' '.join(sys.argv[1:])}`: {args.images} ADE20K-sized samples "
            "(512x683 JPEG + PNG label), medians over "
            f"{args.repeats} alternating processes x {args.rounds} rounds, on {os.cpu_count()} cores shared with other work.\n\n"
            + table
            + "\n\n`validation load` runs the same code in both trees: its ratio shows how far the shared machine's load moves "
            "these figures. The rest of a crop's time is mostly the exact OpenCV bilinear resize of the whole rescaled image "
            "(up to 1024x1365 at ratio 2) and JPEG decoding; only the crop's window would need resizing."
        )
        write_section("data-path", text)


if __name__ == "__main__":
    main()
