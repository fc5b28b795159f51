"""Full-resolution class maps: `processor.segment` and `post_process_semantic_segmentation` against the
forward pass, on photos of 640x480, 1920x1080, 4000x3000 and 3000x4000 (issue 24), 2 CPU threads.

For each photo size, in one process, round-robin after a warm-up (medians):
- forward: `model(pixel_values)` at the processed size (no resize);
- segment: `processor.segment(model, photo)` end to end (preprocessing, forward, class map at the photo's size);
- post_process: `post_process_semantic_segmentation` on that forward's logits;
- before: the same post-processing as the code before `resized_argmax` did it (every class resized and
  soft-maxed band by band, `probabilities_max="full"`, which is still that path).
Peak memory: each photo segmented in a fresh child process, VmHWM after minus before (the model loaded and
warmed up on a small photo), with the default (class map only) and with `probabilities_max="full"`.

The model is the reference checkpoint (`metaseg-t-ade20k-random.pth`, random weights: flat logits)
converted with the library, or with `--preset`, MetaSeg-T built from the ADE20K preset with seeded random
weights. The photos are the reference photo resized (bilinear) to each size; nothing is downloaded.

    python benchmarks/bench_full_resolution.py [--repeats 5] [--sizes 640x480 4000x3000] [--write]
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
REFERENCE = Path(os.environ.get("METASEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference"))


def load_model(preset: bool):
    import torch

    from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation
    from metaseg_hf.conversion import convert_checkpoint

    if preset or not (REFERENCE / "metaseg-t-ade20k-random.pth").exists():
        torch.manual_seed(0)
        return MetaSegForSemanticSegmentation(MetaSegConfig.from_preset("metaseg-t-ade20k")).eval(), "MetaSeg-T preset, seeded random weights"
    folder = Path(tempfile.mkdtemp()) / "metaseg-t"
    convert_checkpoint(REFERENCE / "metaseg-t-ade20k-random.pth", folder, log=lambda message: None)
    return MetaSegForSemanticSegmentation.from_pretrained(folder).eval(), "reference checkpoint (random weights)"


def photo(size: str):
    import numpy as np
    from PIL import Image

    width, height = (int(value) for value in size.split("x"))
    return np.asarray(Image.open(REFERENCE / "metaseg-t-ade20k-image.png").convert("RGB").resize((width, height), Image.BILINEAR))


def peak_child(size: str, preset: bool, probabilities_max) -> int:
    """MB of VmHWM added by segmenting one photo, in a fresh process (model loaded and warmed up first)."""
    script = f"""
import sys; sys.path.insert(0, {str(REPO_ROOT / 'benchmarks')!r}); sys.path.insert(0, {str(REPO_ROOT / 'tests')!r})
import torch; torch.set_num_threads(2)
from bench_full_resolution import load_model, photo
from helpers import peak_rss_mb
from metaseg_hf import MetaSegImageProcessor
model, _ = load_model({preset}); processor = MetaSegImageProcessor()
image = photo({size!r}); small = photo("320x240")
processor.segment(model, small, probabilities_max={probabilities_max!r})
before = peak_rss_mb()
processor.segment(model, image, probabilities_max={probabilities_max!r})
print(peak_rss_mb() - before)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def table_row(model, processor, size: str, args) -> str:
    """One photo size: times in one process (round-robin, medians) and peaks in child processes."""
    import torch

    from metaseg_hf.inference_metaseg import logits_to_prediction

    image = photo(size)
    height, width = image.shape[:2]
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    input_size = tuple(pixel_values.shape[-2:])

    def before():
        for logit, target in processor._input_size_logits(logits, [(height, width)], [input_size]):
            logits_to_prediction([logit], target, probabilities_max="full")

    cases = {
        "forward": lambda: model(pixel_values),
        "segment": lambda: processor.segment(model, image),
        "post_process": lambda: processor.post_process_semantic_segmentation(logits, target_sizes=[(height, width)]),
    }
    if not args.no_before:
        cases["before"] = before
    with torch.no_grad():
        times = {name: median(values) for name, values in round_robin(cases, repeats=args.repeats, warmup=1).items()}
    forward = times["forward"]
    peaks = [peak_child(size, args.preset, None), peak_child(size, args.preset, "full")]
    earlier = f"{times['before']:.2f} s | {times['before'] / forward:.1f}x" if "before" in times else "- | -"
    return (
        f"| {width}x{height} | {input_size[1]}x{input_size[0]} | {forward:.2f} s | {times['segment']:.2f} s | "
        f"{times['segment'] / forward:.1f}x | {times['post_process']:.2f} s | {times['post_process'] / forward:.2f}x | "
        f"{earlier} | {peaks[0]} | {peaks[1]} |"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sizes", nargs="+", default=SIZES)
    parser.add_argument("--preset", action="store_true", help="MetaSeg-T from the preset instead of the reference checkpoint")
    parser.add_argument("--no-before", action="store_true", help="skip the earlier post-processing (slow on big photos)")
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    use_fault_free_allocator()
    import torch

    from metaseg_hf import MetaSegImageProcessor

    torch.set_num_threads(2)
    model, source = load_model(args.preset)
    processor = MetaSegImageProcessor()
    lines = [
        f"MetaSeg-T, {source}, whole mode, {torch.get_num_threads()} threads, medians of {args.repeats}; "
        f"peak = VmHWM added by `segment` in a fresh process. `{COMMAND_LINE}`",
        "",
        "| photo | network input | forward | `segment` | ratio | `post_process` | ratio | before: `post_process` | ratio | peak MB | peak MB with `probabilities_max=\"full\"` |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for size in args.sizes:
        lines.append(table_row(model, processor, size, args))
        print(lines[-1], flush=True)
    print("\n".join(lines))
    if args.write:
        write_section("full-resolution", "## Full-resolution class maps (issue 24)\n\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
