"""Export a MetaSeg segmentation model to ONNX, checked against PyTorch with ONNX Runtime.

    pip install "metaseg-hf[onnx]"
    python examples/export_onnx.py --model org/metaseg-t-ade20k --output_dir metaseg-t-onnx
    python examples/segment.py --onnx metaseg-t-onnx/model.onnx photo.jpg --output_dir segmented

    # int8, calibrated on images through the model's own processor (a folder, or a `datasets` id / folder)
    python examples/export_onnx.py --model org/metaseg-t-ade20k --output_dir metaseg-t-int8 --quantize int8 --calibration_data photos/
    python examples/export_onnx.py --model runs/demo --output_dir runs/demo-int8 --quantize int8 --calibration_data synthetic
    python examples/evaluate.py --onnx runs/demo-int8/model.onnx

Writes OUTPUT_DIR/model.onnx (input `pixel_values`: float32 (batch, 3, height, width), batch, height and
width dynamic, each side at least 57; output `logits`: (batch, num_labels, ceil(height/8), ceil(width/8)))
traced from the fused deploy path (`model.fuse()`; `--no-fuse` for the straight port), and beside it the
model's config.json (labels, test mode) and the image processor's preprocessor_config.json. ONNX Runtime's
logits are compared with PyTorch's on two inputs and the largest difference printed; on any failure (a
missing package, named with the extra that installs it, before the model is loaded; an operator without an
ONNX implementation; a mismatch) nothing is written and the exit code is 1.

With `--quantize int8` the file is quantised with ONNX Runtime's static quantisation (`export_onnx_int8`;
the recipe, `metaseg_hf.onnx_metaseg.INT8_RECIPE`, chosen by measurement: benchmarks/RESULTS.md):
`--calibration_size` images of `--calibration_data` set the activation ranges, `--held_out` more are kept
back, and the int8 model's agreement with float32 on those (class-map pixels, logits) is printed and saved in
OUTPUT_DIR/quantization.json. No calibration image, an unreadable one or one the model cannot take: the error
names it, nothing is written, the exit code is 1.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.data import DataError, load_images
from metaseg_hf.onnx_metaseg import (
    CALIBRATION_METHODS,
    CALIBRATION_SIZE,
    FLOAT_PARTS,
    HELD_OUT,
    INT8_RECIPE,
    QUANT_FORMATS,
    ONNXExportError,
    export_onnx,
    export_onnx_int8,
    require_export_packages,
)
from metaseg_hf.synthetic import synthetic_images

SYNTHETIC = "synthetic"


def calibration_images(args):
    """The --calibration_data images (`load_images`), or the demo's synthetic training scenes."""
    if args.calibration_data == SYNTHETIC and not Path(SYNTHETIC).exists():
        return synthetic_images("train")
    return load_images(args.calibration_data, split=args.calibration_split)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder for model.onnx and its configs")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's, 20 in torch 2.13)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="export the straight port, not model.fuse()")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |ORT - PyTorch| per logit scale")
    parser.add_argument("--trust_remote_code", action="store_true")
    int8 = parser.add_argument_group("int8 (--quantize int8)")
    int8.add_argument("--quantize", choices=("int8",), help="quantise the export, calibrated on --calibration_data")
    int8.add_argument("--calibration_data", help="a folder of images, a `datasets` Hub id or save_to_disk folder, or "
                      f"{SYNTHETIC!r}: the synthetic training scenes (the demo model's)")
    int8.add_argument("--calibration_split", default="train", help="split of a `datasets` --calibration_data")
    int8.add_argument("--calibration_size", type=int, default=CALIBRATION_SIZE, help="images that set the ranges")
    int8.add_argument("--held_out", type=int, default=HELD_OUT, help="images kept back to measure the agreement")
    int8.add_argument("--float_parts", nargs="*", choices=tuple(FLOAT_PARTS), default=INT8_RECIPE["float_parts"],
                      help="parts kept in float32 (none: every quantisable operator in int8)")
    int8.add_argument("--quant_format", choices=QUANT_FORMATS, default=INT8_RECIPE["quant_format"])
    int8.add_argument("--calibration_method", choices=CALIBRATION_METHODS, default=INT8_RECIPE["calibration_method"])
    int8.add_argument("--per_channel", action=argparse.BooleanOptionalAction, default=INT8_RECIPE["per_channel"],
                      help="one weight scale per output channel (--no-per_channel: one per tensor)")
    int8.add_argument("--reduce_range", action=argparse.BooleanOptionalAction, default=INT8_RECIPE["reduce_range"],
                      help="7-bit weights, the same results on every CPU (--no-reduce_range: 8-bit, which CPUs "
                           "without VNNI can saturate)")
    args = parser.parse_args(argv)
    if args.quantize and not args.calibration_data:
        parser.error("--quantize int8 needs --calibration_data (a folder of images or a dataset) to set its ranges")
    if args.calibration_data and not args.quantize:
        parser.error("--calibration_data is for --quantize int8")
    if args.quantize and not args.fuse:
        parser.error("--quantize int8 quantises the fused export: leave out --no-fuse")
    return args


def int8_recipe(args) -> dict:
    """The changes to INT8_RECIPE that the command line asks for."""
    return {"float_parts": args.float_parts, "quant_format": args.quant_format, "calibration_method": args.calibration_method,
            "per_channel": args.per_channel, "reduce_range": args.reduce_range}


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        require_export_packages(args.check or bool(args.quantize))
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    try:  # the calibration images are found (or refused) before the model is loaded
        images = calibration_images(args) if args.quantize else None
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model = AutoModelForSemanticSegmentation.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code, dtype=torch.float32
    )
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    try:
        if args.quantize:
            export_onnx_int8(
                model.eval(), args.output_dir, processor, images,
                calibration_size=args.calibration_size, held_out=args.held_out, opset=args.opset,
                recipe=int8_recipe(args),
            )
        else:
            export_onnx(
                model.eval(), args.output_dir, processor, opset=args.opset, fuse=args.fuse, check=args.check,
                tolerance=args.tolerance,
            )
    except (ONNXExportError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
