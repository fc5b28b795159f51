"""Pictures of segmentations: class-id PNGs with the model's palette, colour overlays and legends."""

import colorsys

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .dataset_metadata import DATASET_CLASSES, DATASET_PALETTES
from .synthetic import SYNTHETIC_ID2LABEL, SYNTHETIC_PALETTE

# The label sets a model can be recognised by (its id2label, in order) and their colours: the official
# datasets and the built-in synthetic scenes (what examples/train.py trains the demo model on).
KNOWN_DATASETS = {
    **{name: (DATASET_CLASSES[name], DATASET_PALETTES[name]) for name in DATASET_CLASSES},
    "synthetic": (tuple(SYNTHETIC_ID2LABEL.values()), SYNTHETIC_PALETTE),
}


def known_dataset(config) -> str | None:
    """The key of `KNOWN_DATASETS` whose class names the config's `id2label` lists, in order; else None."""
    id2label = getattr(config, "id2label", None) or {}
    names = tuple(id2label.get(index) for index in range(len(id2label)))
    return next((name for name, (classes, _) in KNOWN_DATASETS.items() if classes == names), None)


def class_palette(config) -> np.ndarray:
    """(num_labels, 3) uint8 colours: the config's `palette` (official checkpoints carry theirs), else the
    palette of the known dataset whose classes the config has (the synthetic scenes: background dark grey),
    else well-separated colours generated deterministically from the class index."""
    if getattr(config, "palette", None):
        return np.asarray(config.palette, dtype=np.uint8)
    dataset = known_dataset(config)
    if dataset is not None:
        return np.asarray(KNOWN_DATASETS[dataset][1], dtype=np.uint8)
    colours = [colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.65, 0.95) for index in range(config.num_labels)]
    return (np.asarray(colours) * 255).round().astype(np.uint8)


def class_map_image(segmentation: torch.Tensor, palette: np.ndarray) -> Image.Image:
    """Class ids as a PNG-ready image: palette mode "P" (ids are pixel values) for up to 256 classes,
    16-bit grey ("I;16") beyond."""
    ids = segmentation.cpu().numpy()
    if len(palette) <= 256:
        image = Image.fromarray(ids.astype(np.uint8), mode="P")
        flat = np.zeros((256, 3), dtype=np.uint8)
        flat[: len(palette)] = palette
        image.putpalette(flat.reshape(-1).tolist())
        return image
    return Image.fromarray(ids.astype(np.uint16), mode="I;16")


def overlay_image(image: torch.Tensor, segmentation: torch.Tensor, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The (H, W, 3) uint8 image blended with its class colours (`alpha` of colour)."""
    colours = palette[segmentation.cpu().numpy()]
    blended = image.cpu().numpy().astype(np.float32) * (1 - alpha) + colours.astype(np.float32) * alpha
    return Image.fromarray(blended.round().clip(0, 255).astype(np.uint8), mode="RGB")


def class_fractions(segmentation: torch.Tensor, id2label: dict) -> list[tuple[int, str, float]]:
    """(class id, name, fraction of pixels) of every class present, largest first."""
    counts = torch.bincount(segmentation.flatten().cpu(), minlength=len(id2label))
    total = counts.sum().item()
    present = [(index, id2label.get(index, str(index)), count / total) for index, count in enumerate(counts.tolist()) if count]
    return sorted(present, key=lambda row: -row[2])


def legend_image(rows: list[tuple[int, str, float]], palette: np.ndarray) -> Image.Image:
    """A swatch, the class name and its share of the image for each class present."""
    font = ImageFont.load_default()
    line, width = 18, 320
    image = Image.new("RGB", (width, line * max(len(rows), 1) + 8), "white")
    draw = ImageDraw.Draw(image)
    for position, (index, name, fraction) in enumerate(rows):
        top = 4 + position * line
        draw.rectangle([6, top + 2, 24, top + line - 4], fill=tuple(int(c) for c in palette[index]), outline="black")
        draw.text((32, top + 2), f"{index:>3} {name.strip()}  {fraction:6.1%}", fill="black", font=font)
    return image
