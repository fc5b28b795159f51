"""Full-resolution class maps: `processor.segment` and `post_process_semantic_segmentation` against the
forward pass, on photos of 640x480, 1920x1080, 4000x3000 and 3000x4000 (issue 24), 2 CPU threads.

For each model and photo size, in one process, round-robin after a warm-up (medians):
- forward: `model(pixel_values)` at the processed size (no resize);
- segment: `processor.segment(model, photo)` end to end (preprocessing, forward, class map at the photo's size);
- post_process: `post_process_semantic_segmentation` on that forward's logits;
- full: `processor.segment(..., probabilities_max="full")`, which also softmaxes every class at every pixel.
Peak memory: each photo segmented in a fresh child process, VmHWM after minus the resident memory before
(the model loaded and warmed up on a small photo, then VmHWM reset), with the default (class map only) and
with `probabilities_max="full"`.
`--tta`: on the first large photo, `segment` with flip, and with flip and the official scales, against
the forward passes they run (each scale's forward, twice with flip). `--app`: the demo app's whole request
(`SegmentationDemo.run`: read, segment, legend, class PNG, overlay) for a 10-megapixel photo.

Models (`--models`): `reference` is the reference checkpoint (`metaseg-t-ade20k-random.pth`, random
weights: flat logits) converted with the library; `preset` MetaSeg-T from the ADE20K preset with seeded
random weights; a folder is a trained model with its processor (e.g. `runs/demo`). The photos are the
reference photo resized (bilinear) to each size; nothing is downloaded.

    python benchmarks/bench_full_resolution.py [--models reference runs/demo] [--sizes 4000x3000] [--tta] [--app] [--write]
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import COMMAND_LINE, REPO_ROOT, median, round_robin, use_fault_free_allocator, write_section  # noqa: E402

SIZES = ["640x480", "1920x1080", "4000x3000", "3000x4000"]
APP_PHOTO = "3872x2592"  # 10 megapixels
REFERENCE = Path(os.environ.get("METASEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def load_model(spec: str):
    """(model, processor, description) for `reference`, `preset` or a model folder."""
    import torch

    from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation, MetaSegImageProcessor
    from metaseg_hf.conversion import convert_checkpoint

    if spec == "preset" or (spec == "reference" and not (REFERENCE / "metaseg-t-ade20k-random.pth").exists()):
        torch.manual_seed(0)
        model = MetaSegForSemanticSegmentation(MetaSegConfig.from_preset("metaseg-t-ade20k"))
        return model.eval(), MetaSegImageProcessor(), "MetaSeg-T preset, seeded random weights"
    if spec == "reference":
        folder = Path(tempfile.mkdtemp()) / "metaseg-t"
        convert_checkpoint(REFERENCE / "metaseg-t-ade20k-random.pth", folder, log=lambda message: None)
        description = "MetaSeg-T, reference checkpoint (random weights)"
    else:
        folder = Path(spec)
        description = f"`{spec}` (trained)"
    model = MetaSegForSemanticSegmentation.from_pretrained(folder).eval()
    return model, MetaSegImageProcessor.from_pretrained(folder), description


def photo(size: str):
    import numpy as np
    from PIL import Image

    width, height = (int(value) for value in size.split("x"))
    return np.asarray(Image.open(REFERENCE / "metaseg-t-ade20k-image.png").convert("RGB").resize((width, height), Image.BILINEAR))


def peak_child(spec: str, size: str, probabilities_max) -> int:
    """MB of resident memory at the peak of segmenting one photo above the loaded process (model loaded and
    warmed up first, VmHWM reset), in a fresh process."""
    script = f"""
import sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
import torch; torch.set_num_threads(2)
from bench_full_resolution import load_model, photo
from helpers import peak_rss_mb, reset_peak_rss_mb
model, processor, _ = load_model({spec!r})
image = photo({size!r}); small = photo("320x240")
processor.segment(model, small, probabilities_max={probabilities_max!r})
before = reset_peak_rss_mb()
processor.segment(model, image, probabilities_max={probabilities_max!r})
print(peak_rss_mb() - before)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def table_row(spec, model, processor, size: str, repeats: int) -> str:
    """One photo size: times in one process (round-robin, medians) and peaks in child processes."""
    import torch

    image = photo(size)
    height, width = image.shape[:2]
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    input_size = tuple(pixel_values.shape[-2:])
    cases = {
        "forward": lambda: model(pixel_values),
        "segment": lambda: processor.segment(model, image),
        "post_process": lambda: processor.post_process_semantic_segmentation(logits, target_sizes=[(height, width)]),
        "full": lambda: processor.segment(model, image, probabilities_max="full"),
    }
    with torch.no_grad():
        times = {name: median(values) for name, values in round_robin(cases, repeats=repeats, warmup=1).items()}
    forward = times["forward"]
    peaks = [peak_child(spec, size, None), peak_child(spec, size, "full")]
    return (
        f"| {width}x{height} | {input_size[1]}x{input_size[0]} | {forward:.3f} s | {times['segment']:.3f} s | "
        f"{times['segment'] / forward:.2f}x | {times['post_process']:.3f} s | {times['post_process'] / forward:.2f}x | "
        f"{times['full']:.2f} s | {peaks[0]} | {peaks[1]} |"
    )


def tta_rows(model, processor, size: str, repeats: int) -> list[str]:
    """`segment` with flip, and with flip and the official scales, against the forward passes they run."""
    import torch

    from metaseg_hf.inference_metaseg import preprocess_scales
    from metaseg_hf.presets import TTA_SCALES

    image = photo(size)
    batches = dict(zip(TTA_SCALES, preprocess_scales(processor, image, TTA_SCALES)))
    cases = {f"forward x{ratio}": (lambda batch=batch: model(batch)) for ratio, batch in batches.items()}
    cases["flip"] = lambda: processor.segment(model, image, flip=True)
    cases["flip + scales"] = lambda: processor.segment(model, image, flip=True, scales=TTA_SCALES)
    with torch.no_grad():
        times = {name: median(values) for name, values in round_robin(cases, repeats=repeats, warmup=0).items()}
    forwards = {"flip": 2 * times["forward x1.0"], "flip + scales": 2 * sum(times[f"forward x{ratio}"] for ratio in TTA_SCALES)}
    return [
        f"| {size} | {name} | {forwards[name]:.2f} s | {times[name]:.2f} s | {times[name] / forwards[name]:.2f}x |"
        for name in ("flip", "flip + scales")
    ]


def app_row(model, processor, repeats: int) -> str:
    """The demo app's request for a 10-megapixel PNG: whole mode, no augmentation."""
    import statistics
    import time

    sys.path.insert(0, str(REPO_ROOT / "examples"))
    from app import SegmentationDemo
    from PIL import Image

    work_dir = Path(tempfile.mkdtemp())
    path = work_dir / f"photo-{APP_PHOTO}.png"
    Image.fromarray(photo(APP_PHOTO)).save(path)
    demo = SegmentationDemo(model, processor, work_dir)
    times = []
    for _ in range(repeats + 1):
        started = time.perf_counter()
        demo.run(str(path), "whole", False, False, 0.5, progress=lambda *args, **kwargs: None)
        times.append(time.perf_counter() - started)
    return f"| {APP_PHOTO} ({int(APP_PHOTO.split('x')[0]) * int(APP_PHOTO.split('x')[1]) / 1e6:.1f} MP) | {statistics.median(times[1:]):.2f} s |"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["reference"], help="reference, preset or model folders")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--tta", action="store_true", help="time flip and multi-scale on the first large photo")
    parser.add_argument("--tta_repeats", type=int, default=2, help="timed rounds of the augmented runs (slow with 150 classes)")
    parser.add_argument("--app", action="store_true", help="time the demo app's request for a 10-megapixel photo")
    parser.add_argument("--write", action="store_true", help="write the tables into benchmarks/RESULTS.md")
    args = parser.parse_args()
    use_fault_free_allocator()
    import torch

    torch.set_num_threads(2)
    lines = [f"{torch.get_num_threads()} threads, medians of {args.repeats}, whole mode; peak = resident memory above the "
             f"loaded process while `segment` runs, in a fresh process. `{COMMAND_LINE}`"]
    for spec in args.models:
        model, processor, description = load_model(spec)
        lines += [
            "", f"{description}:", "",
            "| photo | network input | forward | `segment` | ratio | `post_process` | ratio | `segment`, "
            "`probabilities_max=\"full\"` | peak MB | peak MB, `\"full\"` |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for size in args.sizes:
            lines.append(table_row(spec, model, processor, size, args.repeats))
            print(lines[-1], flush=True)
        large = [size for size in args.sizes if int(size.split("x")[0]) * int(size.split("x")[1]) >= 10**7]
        if args.tta and large:
            lines += ["", "| photo | augmentation | its forward passes | `segment` | ratio |", "|---|---|---|---|---|"]
            lines += tta_rows(model, processor, large[0], args.tta_repeats)
            print("\n".join(lines[-2:]), flush=True)
        if args.app:
            lines += ["", "| demo app, one request (read, segment, legend, class PNG, overlay) | time |", "|---|---|"]
            lines.append(app_row(model, processor, args.repeats))
            print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.write:
        write_section("full-resolution", "## Full-resolution class maps (issue 24)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
