"""Synthetic scenes: the embedded demo dataset, generated on the fly (nothing to download).

Each scene is a textured background (a colour gradient, low-frequency blotches and fine grain) with a
few procedural objects drawn on it: circles, rectangles, triangles and striped patches. Every class
has a loose colour range of its own (overlapping, so shape and texture matter too) and every object a
random size, position, colour and texture. A scene is a deterministic function of
(seed, split, index): the same call gives the same pixels on every machine.

```python
>>> from metaseg_hf.synthetic import synthetic_scenes, SYNTHETIC_ID2LABEL
>>> train = synthetic_scenes("train", num_images=200)  # datasets.Dataset: "image" (RGB), "label" ("L")
>>> validation = synthetic_scenes("validation", num_images=40)
```
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

SYNTHETIC_ID2LABEL = {0: "background", 1: "circle", 2: "rectangle", 3: "triangle", 4: "stripes"}
SYNTHETIC_PALETTE = ((40, 40, 40), (230, 80, 60), (60, 120, 230), (80, 200, 90), (240, 200, 40))

# The demo's data: small scenes so that MetaSeg-T trains on a 2-core CPU in minutes.
SYNTHETIC_IMAGE_SIZE = 128
SYNTHETIC_NUM_IMAGES = {"train": 400, "validation": 48}

# `examples/train.py`'s defaults when it trains on the synthetic scenes (no data named): MetaSeg-T from
# scratch on a 2-core CPU in a few minutes. They override OFFICIAL_TRAINING_RECIPE (presets.py), which
# stays the default for every real dataset, because the official recipe fine-tunes ImageNet-pretrained
# weights for 160k steps of 16 crops of 512 pixels (a multi-GPU job of a day or more):
# - from scratch and for a few hundred steps, 6e-5 barely moves random weights: 1e-3 (head 10x as
#   officially) with a short warm-up (a few % of the steps instead of 1500) converges in minutes;
# - 8 crops of 128 pixels (the scenes' size, as the official crop equals the test box's short side)
#   instead of 16 x 512: one step is ~30x cheaper, and the shapes are 10-80 pixels, so 128 sees them whole;
# - everything else (AdamW, weight decay, polynomial decay, augmentation, loss) is the official recipe.
SYNTHETIC_DEMO_RECIPE = {
    "learning_rate": 1e-3,
    "num_warmup_steps": 20,
    "max_train_steps": 200,
    "total_batch_size": 8,
    "crop_size": SYNTHETIC_IMAGE_SIZE,
}

# Hue centre (degrees) of each object class; the actual hue is drawn within +-40 degrees.
_CLASS_HUES = {1: 10.0, 2: 220.0, 3: 120.0, 4: 50.0}
_SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


def _hsv_to_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    """One colour, hue in degrees, saturation and value in [0, 1] -> float RGB in [0, 255]."""
    hue = (hue % 360.0) / 60.0
    chroma = value * saturation
    second = chroma * (1 - abs(hue % 2 - 1))
    sector = int(hue) % 6
    rgb = [(chroma, second, 0), (second, chroma, 0), (0, chroma, second), (0, second, chroma), (second, 0, chroma), (chroma, 0, second)][sector]
    return (np.array(rgb) + (value - chroma)) * 255.0


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in [-1, 1]: a coarse random grid upsampled bilinearly."""
    coarse = rng.uniform(-1, 1, (cells + 1, cells + 1)).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((width, height), Image.BILINEAR)
    return np.asarray(image)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A desaturated textured background, float32 (H, W, 3) in [0, 255]."""
    base = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.8))
    other = _hsv_to_rgb(rng.uniform(0, 360), rng.uniform(0.0, 0.35), rng.uniform(0.3, 0.8))
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    ramp = (np.cos(angle) * xs / width + np.sin(angle) * ys / height + 1) / 2
    image = base * (1 - ramp[..., None]) + other * ramp[..., None]
    image += 40 * _smooth_noise(rng, height, width, int(rng.integers(2, 7)))[..., None]
    image += rng.normal(0, rng.uniform(2, 12), (height, width, 1))
    return image.astype(np.float32)


def _object_colour(rng: np.random.Generator, label: int) -> np.ndarray:
    return _hsv_to_rgb(_CLASS_HUES[label] + rng.uniform(-40, 40), rng.uniform(0.45, 1.0), rng.uniform(0.5, 1.0))


def _shape_mask(rng: np.random.Generator, label: int, height: int, width: int) -> np.ndarray:
    """A boolean (H, W) mask of one object of class `label` at a random place and size."""
    mask = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(mask)
    side = min(height, width)
    size = rng.uniform(0.12, 0.32) * side
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    if label == 1:  # circle
        draw.ellipse([cx - size, cy - size, cx + size, cy + size], fill=255)
    elif label == 2:  # axis-aligned rectangle of random aspect
        half_w, half_h = size * rng.uniform(0.6, 1.4), size * rng.uniform(0.6, 1.4)
        draw.rectangle([cx - half_w, cy - half_h, cx + half_w, cy + half_h], fill=255)
    elif label == 3:  # triangle with a random rotation
        start = rng.uniform(0, 2 * np.pi)
        angles = start + np.array([0, 2 * np.pi / 3, 4 * np.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        points = [(cx + 1.3 * size * np.cos(a), cy + 1.3 * size * np.sin(a)) for a in angles]
        draw.polygon(points, fill=255)
    else:  # striped patch: a rotated square region filled with stripes (the stripes are its texture)
        half = size * rng.uniform(0.8, 1.2)
        draw.rectangle([cx - half, cy - half, cx + half, cy + half], fill=255)
        mask = mask.rotate(rng.uniform(0, 90), resample=Image.NEAREST, center=(cx, cy))
    return np.asarray(mask) > 127


def render_scene(rng: np.random.Generator | int, image_size: int | tuple[int, int] = SYNTHETIC_IMAGE_SIZE):
    """One synthetic scene: (RGB `PIL.Image`, label `PIL.Image` mode "L" with ids of SYNTHETIC_ID2LABEL).

    `rng` is a numpy Generator or a seed; `image_size` an int (square) or (height, width).
    """
    rng = np.random.default_rng(rng)
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    for _ in range(int(rng.integers(2, 6))):
        class_id = int(rng.integers(1, len(SYNTHETIC_ID2LABEL)))
        mask = _shape_mask(rng, class_id, height, width)
        colour = _object_colour(rng, class_id)
        if class_id == 4:  # stripes: alternate the colour with a dark version along a random direction
            angle = rng.uniform(0, np.pi)
            period = rng.uniform(5, 10)
            phase = (np.cos(angle) * xs + np.sin(angle) * ys) / period
            stripes = (np.floor(phase) % 2)[..., None]
            fill = colour * (1 - 0.65 * stripes)
        else:  # flat colour with a little shading or grain
            shade = 1 + 0.15 * _smooth_noise(rng, height, width, 3)[..., None]
            fill = colour * shade + rng.normal(0, rng.uniform(1, 8), (height, width, 1))
        image[mask] = fill[mask]
        label[mask] = class_id
    image = np.clip(image + rng.normal(0, 3, image.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(image, mode="RGB"), Image.fromarray(label, mode="L")


class SyntheticScenes:
    """The scenes of one split as a lazy, indexable dataset: `scenes[i]` renders scene `i` on demand
    (a few milliseconds) and returns `{"image": RGB PIL image, "label": "L" PIL image}`, the same
    pixels as `synthetic_scenes(...)[i]`. Nothing is kept in memory; usable as a torch map-style dataset."""

    def __init__(self, split: str = "train", num_images: int | None = None,
                 image_size: int | tuple[int, int] = SYNTHETIC_IMAGE_SIZE, seed: int = 0):
        if split not in _SPLIT_IDS:
            raise ValueError(f"Unknown synthetic split {split!r}; use one of {list(_SPLIT_IDS)}")
        self.split = split
        self.num_images = SYNTHETIC_NUM_IMAGES.get(split, SYNTHETIC_NUM_IMAGES["validation"]) if num_images is None else num_images
        if self.num_images < 1:
            raise ValueError(f"num_images must be at least 1, got {self.num_images}")
        self.image_size = image_size
        self.seed = seed
        self.column_names = ["image", "label"]

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_images:
            raise IndexError(f"scene {index} out of range for {self.num_images} {self.split} scenes")
        image, label = render_scene(np.random.default_rng([self.seed, _SPLIT_IDS[self.split], int(index)]), self.image_size)
        return {"image": image, "label": label}


def synthetic_scenes(
    split: str = "train",
    num_images: int | None = None,
    image_size: int | tuple[int, int] = SYNTHETIC_IMAGE_SIZE,
    seed: int = 0,
):
    """The synthetic scenes of one split as a `datasets.Dataset` with columns `image` (RGB) and
    `label` (mode "L", class ids of `SYNTHETIC_ID2LABEL`).

    Scene `i` of a split is `render_scene(np.random.default_rng([seed, split_id, i]))`, so splits
    never share scenes and a scene does not depend on how many are generated. `SyntheticScenes` gives
    the same scenes lazily (what training uses).
    """
    import datasets

    scenes = SyntheticScenes(split, num_images, image_size, seed)
    rows = [scenes[index] for index in range(len(scenes))]
    images, labels = [row["image"] for row in rows], [row["label"] for row in rows]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features, split=split)


def save_example_image(path, index: int = 0, seed: int = 0, image_size: int | tuple[int, int] = SYNTHETIC_IMAGE_SIZE,
                       save_label: bool = True):
    """Writes held-out scene `index` (the "test" split: never seen in training or validation) to `path`,
    and its label next to it as `<name>_label.png` (class ids of SYNTHETIC_ID2LABEL). Returns the paths."""
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    scene = SyntheticScenes("test", index + 1, image_size, seed)[index]
    scene["image"].save(path)
    paths = [path]
    if save_label:
        label_path = path.with_name(f"{path.stem}_label.png")
        scene["label"].save(label_path)
        paths.append(label_path)
    return paths


def synthetic_images(split: str = "train", num_images: int | None = None, seed: int = 0):
    """The scenes of one split as unlabelled images (`data.ImageCollection`, rendered on demand): what an
    int8 export of the demo model calibrates on (`export_onnx.py --calibration_data synthetic`)."""
    from .data import ImageCollection

    scenes = SyntheticScenes(split, num_images, seed=seed)
    return ImageCollection(f"the synthetic {split} scenes", dataset=scenes, image_column="image")


__all__ = [
    "SYNTHETIC_DEMO_RECIPE",
    "SYNTHETIC_ID2LABEL",
    "SYNTHETIC_IMAGE_SIZE",
    "SYNTHETIC_NUM_IMAGES",
    "SYNTHETIC_PALETTE",
    "SyntheticScenes",
    "render_scene",
    "save_example_image",
    "synthetic_images",
    "synthetic_scenes",
]
