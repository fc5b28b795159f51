"""Segment photos with a MetaSeg model and write pictures a person can check.

    python examples/segment.py --model runs/demo photos/ extra.jpg "more/*.png" --output_dir segmented
    python examples/segment.py --model org/metaseg-b-cityscapes street.png --output_dir out --mode slide
    python examples/segment.py --onnx metaseg-t-onnx/model.onnx photos/ --output_dir segmented

`--onnx` runs a file written by examples/export_onnx.py with ONNX Runtime (`pip install "metaseg-hf[onnx]"`),
with the processor settings, labels and test mode saved beside it; the pictures are the same.

For each image `NAME` it writes `NAME_classes.png` (class ids, coloured by the model's palette),
`NAME_overlay.png` (the photo blended with the class colours), `NAME_legend.png` and `NAME.json` (the
classes present and their share); a name met twice (`x.png` in two folders) becomes `NAME_2`, `NAME_3`, ...,
never a name another input has, so no output is overwritten. A file that cannot be read is reported with its name; the others
are still written, and the exit code is 1 at the end.

Resumable: each file is written under a temporary name and then renamed, so a killed run leaves no
half-written output, and running the same command again skips the images whose four outputs exist
(`--overwrite` redoes them).

Many processes or machines: `accelerate launch [--multi_gpu --num_processes N] examples/segment.py ...`
gives each process its own share of the inputs (each image is read and written by exactly one process,
the outputs are the same as with one); the main process shows the progress over all images and reports
every process's unreadable files at the end. On several machines (`--num_machines N --machine_rank R
--main_process_ip HOST`) every machine lists the same inputs and writes its share to its `--output_dir`
(a shared folder holds them all; nothing else is shared between machines).
"""

import argparse
import glob
import json
import os
import sys
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

from metaseg_hf import MetaSegImageProcessor  # importing metaseg_hf registers MetaSeg with the Auto classes
from metaseg_hf.inference_metaseg import WINDOW_BATCH_SIZE
from metaseg_hf.visualization import class_fractions, class_map_image, class_palette, legend_image, overlay_image

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm", ".pgm"}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="model folder or Hub id")
    source.add_argument("--onnx", type=Path, help="model.onnx written by examples/export_onnx.py (or its folder)")
    parser.add_argument("inputs", nargs="+", help="image files, folders (their images) or glob patterns")
    parser.add_argument("--output_dir", required=True, type=Path)
    parser.add_argument("--mode", choices=["whole", "slide"], help="test mode (default: the model's official one)")
    parser.add_argument("--window_size", type=int, help="slide mode: window side (default: the model's)")
    parser.add_argument("--window_stride", type=int, help="slide mode: window stride (default: the model's)")
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale TTA ratios, e.g. 0.75 1 1.25")
    parser.add_argument("--device", help="PyTorch model, one process only (default: Accelerate's: cuda when available)")
    parser.add_argument("--threads", type=int, help="--onnx: ONNX Runtime threads (default: one per core)")
    parser.add_argument("--batch_size", type=int, default=WINDOW_BATCH_SIZE, help="sliding windows per forward pass")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay")
    parser.add_argument("--overwrite", action="store_true", help="segment again images whose outputs exist")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """Image paths from files, folders and globs, and an error line for each input that matched nothing."""
    paths, errors = [], []
    for entry in inputs:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            found = [path]
        else:
            found = sorted(Path(p) for p in glob.glob(entry) if Path(p).is_file())
        if not found:
            errors.append(f"{entry}: no such file, or no images in it")
        paths += found
    return list(dict.fromkeys(paths)), errors


OUTPUT_SUFFIXES = ("_classes.png", "_overlay.png", "_legend.png", ".json")  # the JSON, written last, ends an image


def output_stems(paths: list[Path]) -> list[str]:
    """One output name per input, all different: the file's stem, or for a stem already taken (`x.png` in two
    folders) `stem_2`, `stem_3`, ... skipping every name another input has or was given (`x_2.png` keeps its own)."""
    taken = {path.stem for path in paths}
    stems, used = [], set()
    for path in paths:
        stem, number = path.stem, 1
        while stem in used:
            number += 1
            stem = f"{path.stem}_{number}"
            if stem in taken:
                stem = path.stem  # another input's own name: try the next number
        used.add(stem)
        stems.append(stem)
    return stems


def is_complete(output_dir: Path, name: str) -> bool:
    """Whether an image's four outputs exist (each appears only whole: see `write_atomically`)."""
    return all((output_dir / f"{name}{suffix}").is_file() for suffix in OUTPUT_SUFFIXES)


def write_atomically(path: Path, write) -> None:
    """`write(temporary_path)`, then a rename onto `path`: a kill leaves the old file or the new one, never half
    of one. The temporary file sits beside `path` (same file system; only this process writes this image)."""
    temporary = path.with_name(f".{path.name}.partial")
    write(temporary)
    os.replace(temporary, path)


def segment_one(model, processor, path: Path, name: str, palette, args) -> None:
    """Segments one image and writes its four outputs (raises ValueError/TypeError/OSError for a bad file)."""
    image = processor.to_rgb(path)
    prediction = processor.segment(
        model, image, mode=args.mode, window_size=args.window_size, window_stride=args.window_stride,
        flip=args.flip, scales=args.scales, window_batch_size=args.batch_size, probabilities_max="input",
    )[0]
    rows = class_fractions(prediction.segmentation, model.config.id2label)
    pictures = {
        "_classes.png": class_map_image(prediction.segmentation, palette),
        "_overlay.png": overlay_image(image, prediction.segmentation, palette, args.alpha),
        "_legend.png": legend_image(rows, palette),
    }
    for suffix, picture in pictures.items():
        write_atomically(args.output_dir / f"{name}{suffix}", lambda target, p=picture: p.save(target, format="PNG"))
    summary = {
        "image": str(path),
        "size": list(prediction.segmentation.shape),
        "classes": [{"id": i, "label": label, "fraction": round(f, 6)} for i, label, f in rows],
        # the winning probability at the network input resolution (cheap), averaged
        "mean_confidence": round(prediction.probabilities_max.mean().item(), 6),
    }
    write_atomically(args.output_dir / f"{name}.json",
                     lambda target: target.write_text(json.dumps(summary, indent=2), encoding="utf-8"))


def main(argv=None) -> int:
    args = parse_args(argv)
    accelerator = Accelerator(cpu=args.device == "cpu")
    rank, world = accelerator.process_index, accelerator.num_processes
    if args.device is not None and world > 1:
        raise SystemExit(f"--device {args.device} names one device, but {world} processes run: "
                         "leave --device out under `accelerate launch` (each process takes its own)")
    paths, unmatched = expand_inputs(args.inputs)  # every process lists the same inputs, in the same order
    errors = unmatched if accelerator.is_main_process else []  # reported once, by the main process
    if args.onnx is not None:
        from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

        model = ORTMetaSegForSemanticSegmentation.from_pretrained(args.onnx, num_threads=args.threads)
        processor = MetaSegImageProcessor.from_pretrained(model.path.parent)
    else:
        model = AutoModelForSemanticSegmentation.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        model = model.to(args.device or accelerator.device).eval()
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    palette = class_palette(model.config)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    # This process's share: every world-th input from its rank on (names are chosen over all inputs first).
    names = output_stems(paths)
    share = range(rank, len(paths), world)
    shares = [len(range(r, len(paths), world)) for r in range(world)]
    segmented = skipped = 0
    progress = tqdm(total=len(paths), desc="segmenting", unit="image", disable=not accelerator.is_main_process or len(paths) < 2)
    for step, index in enumerate(share):
        path, name = paths[index], names[index]
        if not args.overwrite and is_complete(args.output_dir, name):
            skipped += 1
        else:
            try:
                segment_one(model, processor, path, name, palette, args)
                segmented += 1
            except (ValueError, TypeError, OSError) as error:  # reported with the others at the end
                errors.append(f"{path}: {error}")
        # The processes move in step, one image each: every share's first step + 1 images are done.
        progress.update(sum(min(count, step + 1) for count in shares) - progress.n)
    progress.close()

    # Every process's counts and errors, reported once.
    counts = gather_object([(segmented, skipped)])
    errors = gather_object(errors)
    segmented, skipped = sum(c[0] for c in counts), sum(c[1] for c in counts)
    if accelerator.is_main_process:
        if skipped:
            print(f"skipped {skipped} image(s) whose outputs exist in {args.output_dir} (--overwrite redoes them)")
        print(f"segmented {segmented} of {len(paths) - skipped} images into {args.output_dir}"
              + (f" with {world} processes" if world > 1 else ""))
        if errors:
            print(f"{len(errors)} error(s):", *errors, sep="\n  ", file=sys.stderr)
    accelerator.end_training()  # the process group, where there is one
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
