"""Convert the official reference checkpoint and measure parity with the official MetaSeg code.

    python examples/reference_parity.py [--reference ../shared/reference] [--output_dir runs/reference]

Converts `metaseg-t-ade20k-random.pth`, runs the reference batch in float64 and float32 and the
reference photo through the image processor in whole and sliding-window modes, and prints every
difference next to the bar the reference README sets.
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from safetensors.torch import load_file

from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
from metaseg_hf.conversion import convert_checkpoint

DEFAULT_REFERENCE = Path(os.environ.get("METASEG_REFERENCE_DIR", Path(__file__).resolve().parents[2] / "shared" / "reference"))


def batch_figures(model, reference: Path) -> list[tuple[str, float, float, float]]:
    """(tensor, float64 max abs, float32 max abs, float32 mean abs) against the official float64 run."""
    truth = load_file(reference / "metaseg-t-ade20k-batch-float64.safetensors")
    batch32 = load_file(reference / "metaseg-t-ade20k-batch.safetensors")
    results = {}
    for dtype, batch in ((torch.float64, truth), (torch.float32, batch32)):
        with torch.no_grad():
            outputs = model.to(dtype)(batch["pixel_values"].to(dtype), output_hidden_states=True, output_attentions=True)
        tensors = {"logits": outputs.logits}
        tensors.update({f"hidden_states.{i}": hidden for i, hidden in enumerate(outputs.hidden_states)})
        tensors.update({f"decoder_attentions.stage{i + 2}": att for i, att in enumerate(outputs.attentions)})
        results[dtype] = {key: (value.double() - truth[key]).abs() for key, value in tensors.items()}
    model.float()
    return [
        (key, results[torch.float64][key].max().item(), results[torch.float32][key].max().item(),
         results[torch.float32][key].mean().item())
        for key in results[torch.float64]
    ]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=DEFAULT_REFERENCE, help="folder of the reference data")
    parser.add_argument("--output_dir", type=Path, default=Path("runs/reference"), help="where to write the converted model")
    args = parser.parse_args(argv)
    if not (args.reference / "metaseg-t-ade20k-random.pth").is_file():
        print(f"error: no reference data in {args.reference} (set --reference or METASEG_REFERENCE_DIR)", file=sys.stderr)
        return 1

    convert_checkpoint(args.reference / "metaseg-t-ade20k-random.pth", args.output_dir)
    model = MetaSegForSemanticSegmentation.from_pretrained(args.output_dir).eval()
    processor = MetaSegImageProcessor.from_pretrained(args.output_dir)

    print("\nReference batch [2, 3, 250, 333] vs the official float64 run (bars: float64 1e-8; float32 5e-4 max, 5e-5 mean)")
    print(f"{'tensor':28s} {'float64 max':>12s} {'float32 max':>12s} {'float32 mean':>12s}")
    worst = [0.0, 0.0, 0.0]
    for key, max64, max32, mean32 in batch_figures(model, args.reference):
        print(f"{key:28s} {max64:12.3g} {max32:12.3g} {mean32:12.3g}")
        worst = [max(worst[0], max64), max(worst[1], max32), max(worst[2], mean32)]

    whole = load_file(args.reference / "metaseg-t-ade20k-whole.safetensors")
    slide = load_file(args.reference / "metaseg-t-ade20k-slide.safetensors")
    image = Image.open(args.reference / "metaseg-t-ade20k-image.png")
    started = time.perf_counter()
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    preprocessing_ms = (time.perf_counter() - started) * 1000
    pixel_difference = (pixel_values - whole["pixel_values"]).abs().max().item()
    print(f"\nPhoto {image.height}x{image.width} -> pixel_values {list(pixel_values.shape)}: max abs {pixel_difference:.3g} "
          f"(bar 1e-5), preprocessing {preprocessing_ms:.1f} ms")
    size = [(image.height, image.width)]
    modes = {"whole": ({"mode": "whole"}, whole), "slide": ({"mode": "slide", "window_size": 256, "window_stride": 171}, slide)}
    agreements = []
    for name, (kwargs, truth) in modes.items():
        prediction = model.predict(pixel_values, original_sizes=size, probabilities_max="full", **kwargs)[0]
        agreement = (prediction.segmentation == truth["segmentation"][0]).double().mean().item()
        probability = (prediction.probabilities_max - truth["probabilities_max"][0]).abs().max().item()
        agreements.append((agreement, probability))
        print(f"{name:5s}: classes agree on {agreement:.4%} of pixels (bar 99.5%), max |probability diff| {probability:.3g} (bar 1e-4)")

    passed = (
        worst[0] <= 1e-8 and worst[1] <= 5e-4 and worst[2] <= 5e-5 and pixel_difference <= 1e-5
        and all(agreement >= 0.995 and probability <= 1e-4 for agreement, probability in agreements)
    )
    print("\nparity:", "PASS" if passed else "FAIL")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
