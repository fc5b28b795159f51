"""Export a MetaSeg segmentation model to ONNX, checked against PyTorch with ONNX Runtime.

    pip install "metaseg-hf[onnx]"
    python examples/export_onnx.py --model org/metaseg-t-ade20k --output_dir metaseg-t-onnx
    python examples/segment.py --onnx metaseg-t-onnx/model.onnx photo.jpg --output_dir segmented

Writes OUTPUT_DIR/model.onnx (input `pixel_values`: float32 (batch, 3, height, width), batch, height and
width dynamic, each side at least 57; output `logits`: (batch, num_labels, ceil(height/8), ceil(width/8)))
traced from the fused deploy path (`model.fuse()`; `--no-fuse` for the straight port), and beside it the
model's config.json (labels, test mode) and the image processor's preprocessor_config.json. ONNX Runtime's
logits are compared with PyTorch's on two inputs and the largest difference printed; on any failure (a
missing package, named with the extra that installs it, before the model is loaded; an operator without an
ONNX implementation; a mismatch) nothing is written and the exit code is 1.
"""

import argparse
import sys
from pathlib import Path

import torch
from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.onnx_metaseg import ONNXExportError, export_onnx, require_export_packages


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id")
    parser.add_argument("--output_dir", required=True, type=Path, help="folder for model.onnx and its configs")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's, 20 in torch 2.13)")
    parser.add_argument("--no-fuse", dest="fuse", action="store_false", help="export the straight port, not model.fuse()")
    parser.add_argument("--no-check", dest="check", action="store_false", help="skip the ONNX Runtime comparison")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest allowed |ORT - PyTorch| per logit scale")
    parser.add_argument("--trust_remote_code", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        require_export_packages(args.check)
    except ImportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    model = AutoModelForSemanticSegmentation.from_pretrained(
        args.model, trust_remote_code=args.trust_remote_code, dtype=torch.float32
    )
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    try:
        export_onnx(
            model.eval(), args.output_dir, processor, opset=args.opset, fuse=args.fuse, check=args.check,
            tolerance=args.tolerance,
        )
    except ONNXExportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
