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
"""

import argparse
import glob
import json
import sys
from pathlib import Path

import torch
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
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="PyTorch model only")
    parser.add_argument("--threads", type=int, help="--onnx: ONNX Runtime threads (default: one per core)")
    parser.add_argument("--batch_size", type=int, default=WINDOW_BATCH_SIZE, help="sliding windows per forward pass")
    parser.add_argument("--alpha", type=float, default=0.5, help="colour weight of the overlay")
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


def main(argv=None) -> int:
    args = parse_args(argv)
    paths, errors = expand_inputs(args.inputs)
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    if args.onnx is not None:
        from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

        model = ORTMetaSegForSemanticSegmentation.from_pretrained(args.onnx, num_threads=args.threads)
        processor = MetaSegImageProcessor.from_pretrained(model.path.parent)
    else:
        model = AutoModelForSemanticSegmentation.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
        model = model.to(args.device).eval()
        processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    palette = class_palette(model.config)
    args.output_dir.mkdir(parents=True, exist_ok=True)

    failures = 0
    for path, stem in tqdm(list(zip(paths, output_stems(paths))), desc="segmenting", unit="image", disable=len(paths) < 2):
        try:
            image = processor.to_rgb(path)
            prediction = processor.segment(
                model, image, mode=args.mode, window_size=args.window_size, window_stride=args.window_stride,
                flip=args.flip, scales=args.scales, window_batch_size=args.batch_size, probabilities_max="input",
            )[0]
        except (ValueError, TypeError, OSError) as error:
            errors.append(f"{path}: {error}")
            failures += 1
            tqdm.write(f"error: {path}: {error}", file=sys.stderr)
            continue
        rows = class_fractions(prediction.segmentation, model.config.id2label)
        class_map_image(prediction.segmentation, palette).save(args.output_dir / f"{stem}_classes.png")
        overlay_image(image, prediction.segmentation, palette, args.alpha).save(args.output_dir / f"{stem}_overlay.png")
        legend_image(rows, palette).save(args.output_dir / f"{stem}_legend.png")
        summary = {
            "image": str(path),
            "size": list(prediction.segmentation.shape),
            "classes": [{"id": i, "label": name, "fraction": round(f, 6)} for i, name, f in rows],
            # the winning probability at the network input resolution (cheap), averaged
            "mean_confidence": prediction.probabilities_max.mean().item(),
        }
        (args.output_dir / f"{stem}.json").write_text(json.dumps(summary, indent=2))

    print(f"segmented {len(paths) - failures} of {len(paths)} images into {args.output_dir}")
    if errors:
        print(f"{len(errors)} error(s):", *errors, sep="\n  ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
