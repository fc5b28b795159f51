"""Preprocessing speed of `MetaSegImageProcessor` on the 375x500 reference photo, one CPU thread.

Times `processor(image)` (EXIF check, RGB conversion, the two OpenCV-exact bilinear resizes 375x500 ->
512x683 -> 512x704, normalisation into a (1, 3, 512, 704) float32 batch) on an already decoded PIL image,
as `pipeline("image-segmentation")` calls it. Prints the median over repeated runs after a warm-up, and
the PNG decoding time separately for scale. Target: at most 10 ms per image.

    python benchmarks/bench_preprocessing.py [--repeats 200] [--image PATH]

It re-executes itself with glibc's allocator told not to return memory to the kernel
(`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000`); otherwise large temporary tensors are
page-faulted in again on every call and the timings depend on the process's allocation history.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})

import torch  # noqa: E402
from PIL import Image  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from metaseg_hf.image_processing_metaseg import MetaSegImageProcessor  # noqa: E402

TARGET_MS = 10.0


def reference_image() -> Path:
    folder = Path(os.environ.get("METASEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))
    return folder / "metaseg-t-ade20k-image.png"


def median_ms(function, repeats: int, warmup: int = 10) -> float:
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--image", type=Path, default=reference_image())
    args = parser.parse_args()
    if not args.image.is_file():
        sys.exit(f"Image not found: {args.image} (set METASEG_REFERENCE_DIR or pass --image).")

    torch.set_num_threads(1)
    processor = MetaSegImageProcessor()
    image = Image.open(args.image)
    image.load()

    def decode():
        with Image.open(args.image) as file:
            file.load()

    shape = tuple(processor(image)["pixel_values"].shape)
    preprocess = median_ms(lambda: processor(image), args.repeats)
    decoding = median_ms(decode, max(10, args.repeats // 4))
    print(f"image: {args.image.name}, {image.height}x{image.width} -> pixel_values {shape}")
    print(f"torch {torch.__version__}, 1 thread, allocator: MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1e12")
    print(f"preprocessing: {preprocess:.2f} ms per image (median of {args.repeats}; target <= {TARGET_MS:.0f} ms)")
    print(f"PNG decoding (not included above): {decoding:.2f} ms")


if __name__ == "__main__":
    main()
