"""Training and validation data for MetaSeg: loading labelled splits and the official training augmentation.

Sources (`load_segmentation_data`):

- a `datasets` Hub id or a folder saved with `Dataset(Dict).save_to_disk` (`dataset_name`);
- an image/label folder (`dataset_format="imagefolder"`): `<dir>/images/**/<name>.<jpg|png|...>` with
  `<dir>/labels/**/<name>.png` (or `annotations/`, `masks/`), optional `id2label.json` in `<dir>` or its
  parent;
- the ADE20K layout (`"ade20k"`): `ADEChallengeData2016/images/{training,validation}/*.jpg` and
  `annotations/{training,validation}/*.png`, 150 classes, 0 = "other" (reduced to the ignore index);
- the Cityscapes layout (`"cityscapes"`): `leftImg8bit/{train,val}/<city>/*_leftImg8bit.png` and
  `gtFine/{train,val}/<city>/*_gtFine_labelTrainIds.png`, 19 classes, 255 ignored;
- the synthetic scenes of `metaseg_hf.synthetic` when nothing is named (the embedded demo).

Images and labels are read by `image_io` (the image processor's own reading: EXIF orientation, 8-bit
RGB, class-id label modes), so training, evaluation and inference see the same pixels. A label file is
drawn on its image's stored pixels: when the image carries an EXIF orientation, the label is turned with
it. Bad data stops with a `DataError` naming the file: a missing or unreadable file, a colour label
image, label values that are neither a class id nor the ignore index, an image and a label of different
sizes, an empty split.

The training augmentation (`TrainAugmentation`) is MMSegmentation's pipeline of the official configs,
in numpy: random rescale of the (long, short) box by 0.5-2.0 keeping the aspect ratio (OpenCV's bilinear and
nearest resizes, bit for bit, from `resize_opencv`), random crop retried up to 10 times while one class covers
more than `cat_max_ratio` of it, horizontal flip,
photometric distortion, normalisation, padding to the crop (image 0, labels the ignore index). Each
sample's randomness comes from `numpy.random.default_rng([seed, epoch, index])`, so a run is
reproducible whatever the number of workers or processes, and resuming needs no sampler state.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers.image_utils import SizeDict

from .image_io import (
    IGNORE_INDEX,
    apply_orientation,
    exif_orientation,
    open_image_file,
    read_image,
    read_label,
    reduce_zero_label,
)
from .image_processing_metaseg import normalization_constants
from .inference_metaseg import preprocess_scales
from .presets import DATASET_CLASSES, DATASETS, OFFICIAL_TRAINING_RECIPE
from .resize_opencv import opencv_linear_resize, opencv_nearest_resize, resize_steps

DATASET_FORMATS = ("imagefolder", "ade20k", "cityscapes")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
LABEL_EXTENSIONS = (".png", ".tif", ".tiff", ".bmp")
LABEL_FOLDER_NAMES = ("labels", "annotations", "masks")
IMAGE_COLUMN_NAMES = ("image", "pixel_values", "img")
LABEL_COLUMN_NAMES = ("label", "annotation", "semantic_map", "segmentation", "mask", "labels")
# Names of a `datasets` validation split, in order of preference.
VALIDATION_SPLIT_NAMES = ("validation", "val", "test")
class DataError(ValueError):
    """Unusable training or validation data; the message names the file or folder and the fix."""


# ---------------------------------------------------------------------------------------------------
# Labelled splits
# ---------------------------------------------------------------------------------------------------


@dataclass
class SegmentationSplit:
    """One labelled split: a list of (image file, label file) pairs, or a `datasets.Dataset`.

    `load(index)` returns the RGB image (`PIL.Image`), the label map ((H, W) int64 numpy array, raw
    values as stored) and a name for messages (the image path or `dataset[split] row i`).
    """

    name: str
    source: str
    pairs: list = field(default_factory=list)
    dataset: object = None
    image_column: str | None = None
    label_column: str | None = None
    _labels: object = field(default=None, repr=False, compare=False)
    _images: object = field(default=None, repr=False, compare=False)

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.pairs)

    def sample_name(self, index: int) -> str:
        if self.dataset is not None:
            return f"{self.source} row {index}"
        return str(self.pairs[index][0])

    def load(self, index: int):
        """(image as 8-bit RGB `PIL.Image`, label as an (H, W) int64 numpy array of raw values, name)."""
        if self.dataset is not None:
            row = self.dataset[int(index)]
            name = self.sample_name(index)
            image, label = row[self.image_column], row[self.label_column]
            label_name = f"label of {name}"
        else:
            image, label = self.pairs[index]
            name, label_name = str(image), str(label)
            if not Path(label).is_file():
                raise DataError(f"Missing label file for {image}: {label} does not exist")
        image, label = _undecoded(image, name), _undecoded(label, label_name)
        if isinstance(image, Image.Image) and isinstance(label, Image.Image):
            label = _orient_label_like_image(label, image)
        rgb = _read(read_image, image, name)
        label = _read(read_label, label, label_name).numpy()
        if self.dataset is None:
            name = f"{name} (label {label_name})"
        if label.shape != tuple(rgb.shape[:2]):
            raise DataError(
                f"Image and label of different sizes: {name}: image is {rgb.shape[0]}x{rgb.shape[1]} "
                f"(HxW) but the label is {label.shape[0]}x{label.shape[1]}"
            )
        return Image.fromarray(rgb.numpy()), label, name

    def load_label(self, index: int):
        """(label as an (H, W) int64 numpy array of raw values, name), reading the label alone (no image)."""
        if self.dataset is not None:
            if self._labels is None:  # the label column alone: the images are not decoded
                select = getattr(self.dataset, "select_columns", None)
                self._labels = select([self.label_column]) if select is not None else self.dataset
            label, name = self._labels[int(index)][self.label_column], f"label of {self.sample_name(index)}"
        else:
            image, label = self.pairs[index]
            name = str(label)
            if not Path(label).is_file():
                raise DataError(f"Missing label file for {image}: {label} does not exist")
        return _read(read_label, _undecoded(label, name), name).numpy(), name

    def stored_image_sizes(self, index: int) -> set:
        """The image's (H, W) as stored and as displayed (its EXIF orientation applied), read from the file
        header without decoding the pixels."""
        if self.dataset is not None:
            if self._images is None:  # the image column alone, undecoded: header reads only
                select = getattr(self.dataset, "select_columns", None)
                self._images = select([self.image_column]) if select is not None else self.dataset
            value, name = self._images[int(index)][self.image_column], self.sample_name(index)
        else:
            value, name = self.pairs[index][0], str(self.pairs[index][0])
        if isinstance(value, dict):
            value = io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value.get("path")
        if isinstance(value, (str, os.PathLike, io.BytesIO)):
            try:
                with Image.open(value) as image:
                    (width, height), orientation = image.size, exif_orientation(image)
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"`{name}` is not a readable image ({error})") from None
        else:
            image = _read(read_image, _undecoded(value, name), name)
            (height, width), orientation = tuple(image.shape[:2]), 1
        return {(height, width), (width, height) if orientation in (5, 6, 7, 8) else (height, width)}

    def subset(self, indices, name: str) -> SegmentationSplit:
        """The same split restricted to `indices` (used to carve a validation split out of train)."""
        indices = [int(index) for index in indices]
        if self.dataset is not None:
            return SegmentationSplit(name, f"{self.source} ({name} part)", dataset=self.dataset.select(indices),
                                     image_column=self.image_column, label_column=self.label_column)
        return SegmentationSplit(name, f"{self.source} ({name} part)", pairs=[self.pairs[index] for index in indices])


def _read(reader, value, name: str):
    """`reader(value, name)`, one of `image_io`'s readers, with its error raised as a `DataError` (same message)."""
    try:
        return reader(value, name)
    except (TypeError, ValueError) as error:
        raise DataError(str(error)) from error


def _undecoded(value, name: str):
    """A sample's image or label as `image_io` reads it: a file path or an encoded `datasets` image (a
    `{"bytes", "path"}` dict: the columns are read undecoded, so that EXIF orientation is applied here, to
    the image and its label alike, as for folders) opened with Pillow; a nested list (a `datasets` List or
    Array2D label) as a numpy array; anything else as it is."""
    if isinstance(value, (str, os.PathLike)):
        return _read(open_image_file, value, name)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            try:
                image = Image.open(io.BytesIO(value["bytes"]))
                image.load()
            except (OSError, ValueError, Image.DecompressionBombError) as error:
                raise DataError(f"`{name}` holds bytes that are not a readable image ({error})") from None
            return image
        if value.get("path"):
            return _read(open_image_file, value["path"], name)
        raise DataError(f"`{name}` is empty: neither image bytes nor a path")
    if isinstance(value, list):
        return np.asarray(value)
    return value


def _orient_label_like_image(label: Image.Image, image: Image.Image) -> Image.Image:
    """The label turned as its image's EXIF orientation turns the image: label files are drawn on the
    stored pixels and carry no orientation of their own (one that does is applied by `read_label`)."""
    orientation = exif_orientation(image)
    if orientation != 1 and exif_orientation(label) == 1 and label.size == image.size:
        return apply_orientation(label, orientation)
    return label


def prepare_label(label: np.ndarray, name: str, num_labels: int, reduce_labels: bool, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Reduces ADE20K-style labels (`image_io.reduce_zero_label`) and checks every value is a class id or
    the ignore index; (H, W) integer array -> (H, W) uint8 map. Raises `DataError` naming the file and the bad values."""
    label = np.asarray(label, dtype=np.int64)
    if reduce_labels:
        label = reduce_zero_label(torch.from_numpy(label), ignore_index).numpy()
    bad = (label != ignore_index) & ((label < 0) | (label >= num_labels))
    if bad.any():
        values = np.unique(label[bad])
        shown = ", ".join(str(value + (1 if reduce_labels else 0)) for value in values[:10])
        raise DataError(
            f"Label values out of range in {name}: found {shown}{' ...' if values.size > 10 else ''} "
            f"({'raw values, before reduction; ' if reduce_labels else ''}valid: 0-{num_labels - 1 + (1 if reduce_labels else 0)} "
            f"and {ignore_index} for ignored pixels). Check --do_reduce_labels and the number of classes."
        )
    return label.astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# Finding the data
# ---------------------------------------------------------------------------------------------------


@dataclass
class SegmentationData:
    """Everything `load_segmentation_data` found: the splits, the class names and how to read labels."""

    train: SegmentationSplit
    validation: SegmentationSplit | None
    id2label: dict
    do_reduce_labels: bool
    dataset_format: str
    description: str
    hub_dataset_id: str | None = None

    @property
    def num_labels(self) -> int:
        return len(self.id2label)


def _images_under(folder: Path) -> list[Path]:
    return sorted(path for path in folder.rglob("*") if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file())


def _non_empty(pairs: list, what: str) -> list:
    if not pairs:
        raise DataError(f"Empty split: no images found in {what}")
    return pairs


def imagefolder_pairs(folder: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(image, label) pairs of an image/label folder: `images/**/x.jpg` with `labels/**/x.png`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"Data folder {folder} does not exist")
    images_dir = folder / "images"
    label_dirs = [folder / name for name in LABEL_FOLDER_NAMES if (folder / name).is_dir()]
    if not images_dir.is_dir() or not label_dirs:
        raise DataError(
            f"{folder} is not an image/label folder: expected {folder}/images/ with the images and "
            f"{folder}/labels/ (or annotations/, masks/) with one class-id PNG per image, same file names"
        )
    labels_dir = label_dirs[0]
    pairs, image_of_label = [], {}
    for image_path in _non_empty(_images_under(images_dir), f"{images_dir} (extensions {', '.join(IMAGE_EXTENSIONS)})"):
        relative = image_path.relative_to(images_dir)
        # Only the extension goes: `2021.05.03.jpg` pairs with `2021.05.03.png`.
        candidates = [labels_dir / relative.parent / (relative.stem + extension) for extension in LABEL_EXTENSIONS]
        label_path = next((path for path in candidates if path.is_file()), candidates[0])
        if label_path in image_of_label:
            raise DataError(
                f"Two images share one label: {image_of_label[label_path]} and {image_path} both pair with "
                f"{label_path}; rename one image (and give it its own label file)"
            )
        image_of_label[label_path] = image_path
        pairs.append((image_path, label_path))
    return check_label_files(pairs, str(labels_dir))


def check_label_files(pairs: list, what: str) -> list:
    """Raises `DataError` naming the first image whose label file is missing (and how many are)."""
    missing = [(image, label) for image, label in pairs if not Path(label).is_file()]
    if missing:
        image, label = missing[0]
        more = f" ({len(missing)} of {len(pairs)} labels are missing in {what})" if len(missing) > 1 else ""
        raise DataError(f"Missing label file for {image}: {label} does not exist{more}")
    return pairs


def _ade20k_root(root: Path) -> Path:
    for candidate in (root, root / "ADEChallengeData2016"):
        if (candidate / "images").is_dir() and (candidate / "annotations").is_dir():
            return candidate
    raise DataError(
        f"{root} is not an ADE20K folder: expected ADEChallengeData2016/images/{{training,validation}} and "
        "ADEChallengeData2016/annotations/{training,validation} (in it or in its ADEChallengeData2016 subfolder)"
    )


def ade20k_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(image, annotation) pairs of ADE20K's `training` or `validation` split."""
    root = _ade20k_root(Path(root))
    folder = {"train": "training", "validation": "validation"}.get(split, split)
    images_dir = root / "images" / folder
    if not images_dir.is_dir():
        raise DataError(f"ADE20K split folder {images_dir} does not exist")
    images = _non_empty(_images_under(images_dir), str(images_dir))
    pairs = [(path, root / "annotations" / folder / path.relative_to(images_dir).with_suffix(".png")) for path in images]
    return check_label_files(pairs, str(root / "annotations" / folder))


def cityscapes_pairs(root: str | os.PathLike, split: str) -> list[tuple[Path, Path]]:
    """(leftImg8bit, gtFine labelTrainIds) pairs of Cityscapes' `train` or `val` split."""
    root = Path(root)
    folder = {"train": "train", "validation": "val"}.get(split, split)
    images_dir = root / "leftImg8bit" / folder
    if not images_dir.is_dir() or not (root / "gtFine").is_dir():
        raise DataError(
            f"{root} is not a Cityscapes folder: expected leftImg8bit/{folder}/<city>/*_leftImg8bit.png and "
            f"gtFine/{folder}/<city>/*_gtFine_labelTrainIds.png"
        )
    images = _non_empty(sorted(images_dir.glob("*/*_leftImg8bit.png")), f"{images_dir}/<city>/*_leftImg8bit.png")
    pairs = []
    for path in images:
        stem = path.name[: -len("_leftImg8bit.png")]
        label = root / "gtFine" / folder / path.parent.name / f"{stem}_gtFine_labelTrainIds.png"
        pairs.append((path, label))
    try:
        return check_label_files(pairs, str(root / "gtFine" / folder))
    except DataError as error:
        raise DataError(f"{error}. Cityscapes train-id labels are made by cityscapesscripts' createTrainIdLabelImgs.") from None


def _read_id2label(*folders) -> dict | None:
    for folder in folders:
        if folder is None:
            continue
        path = Path(folder) / "id2label.json"
        if path.is_file():
            try:
                mapping = json.loads(path.read_text(encoding="utf-8"))
                return {int(key): str(value) for key, value in mapping.items()}
            except (ValueError, AttributeError) as error:
                raise DataError(f"{path} must map class ids to names, e.g. {{\"0\": \"sky\"}} ({error})") from None
    return None


def check_labels(split: SegmentationSplit, num_labels: int, reduce_labels: bool, ignore_index: int = IGNORE_INDEX,
                 shown: int = 10) -> int:
    """Reads every label of `split` (and each image's size from its file header, not its pixels) before a
    run, so that bad data stop it at once rather than when the sample is drawn hours later. Raises one
    `DataError` listing the first `shown` problems (unreadable or missing files, colour labels, values out of
    range, label and image of different sizes) and how many there are; returns the number of labels checked."""
    problems = []
    for index in range(len(split)):
        try:
            label, name = split.load_label(index)
            prepare_label(label, name, num_labels, reduce_labels, ignore_index)
            sizes = split.stored_image_sizes(index)
            if tuple(label.shape) not in sizes:
                height, width = sorted(sizes)[0]
                raise DataError(f"Image and label of different sizes: {split.sample_name(index)}: image is "
                                f"{height}x{width} (HxW) but the label {name} is {label.shape[0]}x{label.shape[1]}")
        except DataError as error:
            problems.append(str(error))
    if problems:
        listed = "\n  ".join(problems[:shown])
        more = f"\n  ... and {len(problems) - shown} more" if len(problems) > shown else ""
        raise DataError(f"{len(problems)} of {len(split)} samples of {split.source} are unusable:\n  {listed}{more}")
    return len(split)


def infer_num_labels(splits, reduce_labels: bool, ignore_index: int = IGNORE_INDEX) -> int:
    """The number of classes as (largest label value + 1) over the given splits (reads every label, not the images)."""
    largest = -1
    for split in splits:
        for index in range(len(split)):
            values = torch.unique(torch.from_numpy(split.load_label(index)[0]))
            if reduce_labels:
                values = reduce_zero_label(values, ignore_index)
            values = values[values != ignore_index]
            if values.numel():
                largest = max(largest, int(values.max()))
    if largest < 0:
        raise DataError("Every label pixel is ignored: no class ids found in the labels")
    return largest + 1


def _column(names, candidates, explicit, what, source):
    if explicit is not None:
        if explicit not in names:
            raise DataError(f"{source} has no column {explicit!r} (columns: {', '.join(names)})")
        return explicit
    for candidate in candidates:
        if candidate in names:
            return candidate
    raise DataError(
        f"{source}: cannot find the {what} column among {', '.join(names)}; name it with --{what}_column_name"
    )


def _undecoded_columns(rows, dataset_name: str, image_column: str, label_column: str):
    """`rows` with its image and label columns checked and set to undecoded (`datasets.Image(decode=False)`):
    `datasets` would apply the image's EXIF orientation on decoding but not its label's, `SegmentationSplit`
    decodes both with `image_io`. A label column of class names (a classification set: an images/ + labels/
    folder read as one) or of other non-map types is refused, naming the column and the fix."""
    import datasets

    features = rows.features
    image, label = features[image_column], features[label_column]
    maps = (datasets.Image, datasets.Array2D, datasets.List, datasets.Sequence, datasets.LargeList)
    if isinstance(label, datasets.ClassLabel) and Path(dataset_name).is_dir() and (Path(dataset_name) / "images").is_dir():
        raise DataError(
            f"{dataset_name} was read as an image classification set (column {label_column!r} is the folder name "
            f"{label.names}): for an images/ + labels/ folder, use --train_dir {dataset_name} (--data_dir for evaluate.py)"
        )
    for column, feature, allowed, expected in (
        (image_column, image, (datasets.Image, datasets.Array3D, datasets.List, datasets.Sequence), "images"),
        (label_column, label, maps, "label maps (an Image of class ids, or an Array2D / nested list of ints)"),
    ):
        if not isinstance(feature, allowed):
            raise DataError(
                f"{dataset_name}: column {column!r} is {feature}, which cannot hold {expected}; name the right "
                f"column with --{'image' if column == image_column else 'label'}_column_name"
            )
    for column, feature in ((image_column, image), (label_column, label)):
        if isinstance(feature, datasets.Image) and feature.decode:
            rows = rows.cast_column(column, datasets.Image(decode=False))
    return rows


class _DatasetSplits:
    """The splits of a `datasets` Hub id, data folder or `save_to_disk` folder, each loaded (and, for a Hub
    dataset, downloaded and prepared) only when asked for: scoring validation never builds the train split, and
    a broken file of one split does not stop another. `split in splits`, `list(splits)`, `splits[name]`."""

    def __init__(self, dataset_name: str, token=None):
        import datasets

        self.dataset_name, self.token, self.loaded = dataset_name, token, {}
        path = Path(dataset_name)
        if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))  # memory-mapped: nothing is read yet
            self.loaded = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"train": loaded}
            self.data_files, self.names = None, list(self.loaded)
            return
        builder = datasets.load_dataset_builder(dataset_name, token=token)
        self.data_files = builder.config.data_files
        if self.data_files:
            self.names = [str(name) for name in self.data_files]
        else:
            self.names = list(datasets.get_dataset_split_names(dataset_name, token=token))

    def __contains__(self, name) -> bool:
        return name in self.names

    def __iter__(self):
        return iter(self.names)

    def __getitem__(self, name: str):
        if name not in self.loaded:
            import datasets

            data_files = {name: self.data_files[name]} if self.data_files else None
            self.loaded[name] = datasets.load_dataset(self.dataset_name, data_files=data_files, split=name, token=self.token)
        return self.loaded[name]


def _dataset_split(loaded, dataset_name: str, split: str, role: str, image_column, label_column) -> SegmentationSplit:
    """Split `split` of `_DatasetSplits` as the `role` ("train"/"validation") split, columns found by name."""
    if split not in loaded:
        raise DataError(f"{dataset_name} has no {split!r} split (splits: {', '.join(loaded)})")
    rows = loaded[split]
    image_column = _column(rows.column_names, IMAGE_COLUMN_NAMES, image_column, "image", dataset_name)
    label_column = _column(rows.column_names, LABEL_COLUMN_NAMES, label_column, "label", dataset_name)
    if len(rows) == 0:
        raise DataError(f"Empty split: {dataset_name}[{split}] has no rows")
    rows = _undecoded_columns(rows, dataset_name, image_column, label_column)
    return SegmentationSplit(role, f"{dataset_name}[{split}]", dataset=rows, image_column=image_column, label_column=label_column)


def _hub_dataset(dataset_name: str, image_column, label_column, train_val_split, seed, id2label, token=None):
    loaded = _DatasetSplits(dataset_name, token)
    train = _dataset_split(loaded, dataset_name, "train", "train", image_column, label_column)
    validation_name = next((name for name in VALIDATION_SPLIT_NAMES if name in loaded), None)
    validation = None
    if validation_name is not None:
        validation = _dataset_split(
            loaded, dataset_name, validation_name, "validation", train.image_column, train.label_column
        )
    path = Path(dataset_name)
    if id2label is None and not path.is_dir():
        id2label = _hub_id2label(dataset_name, token)
    if id2label is None and path.is_dir():
        id2label = _read_id2label(path)
    if validation is None and train_val_split:
        train, validation = split_off_validation(train, train_val_split, seed)
    return train, validation, id2label


def _layout_split(dataset_format: str, root, role: str) -> SegmentationSplit:
    """The `role` ("train"/"validation") split of an ADE20K or Cityscapes folder."""
    read_pairs = ade20k_pairs if dataset_format == "ade20k" else cityscapes_pairs
    return SegmentationSplit(role, f"{dataset_format} {root} ({role})", pairs=read_pairs(root, role))


def _synthetic_split(role: str, count: int, size: int, seed: int) -> SegmentationSplit:
    """The synthetic scenes' `role` split (`metaseg_hf.synthetic`)."""
    from .synthetic import SyntheticScenes

    scenes = SyntheticScenes(role, count, size, seed)
    return SegmentationSplit(role, f"synthetic scenes[{role}]", dataset=scenes, image_column="image", label_column="label")


def _hub_id2label(dataset_name: str, token=None) -> dict | None:
    """`id2label.json` of a Hub dataset repository (the Transformers examples' convention), if any."""
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(dataset_name, "id2label.json", repo_type="dataset", token=token)
    except Exception:  # no such file, offline, or not a Hub repository: fall back to the labels
        return None
    return _read_id2label(Path(path).parent)


def split_off_validation(train: SegmentationSplit, fraction: float, seed: int):
    """Splits a deterministic `fraction` of `train` off as validation (at least one image each)."""
    count = len(train)
    if count < 2:
        raise DataError(f"{train.source} has {count} image(s): too few to split off a validation set")
    order = np.random.default_rng([seed, 7]).permutation(count)
    num_validation = min(max(1, int(round(count * fraction))), count - 1)
    return train.subset(sorted(order[num_validation:]), "train"), train.subset(sorted(order[:num_validation]), "validation")


def load_segmentation_data(
    dataset_name: str | None = None,
    train_dir: str | None = None,
    validation_dir: str | None = None,
    dataset_format: str = "imagefolder",
    do_reduce_labels: bool | None = None,
    id2label: dict | None = None,
    train_val_split: float = 0.15,
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    synthetic_num_images: dict | None = None,
    synthetic_image_size: int | None = None,
    token: str | None = None,
) -> SegmentationData:
    """Finds the training and validation data and the class names.

    - `dataset_name`: a `datasets` Hub id or a `save_to_disk` folder; columns found by name (or given);
      class names from the repository's `id2label.json`, else read off the labels.
    - `train_dir` (+ `validation_dir`) with `dataset_format`: `"imagefolder"` (each dir one split;
      `id2label.json` in it or its parent), `"ade20k"` or `"cityscapes"` (`train_dir` is the dataset
      root; the validation split is read from it unless `validation_dir` names another root).
    - nothing: the synthetic scenes (`metaseg_hf.synthetic`).

    Without a validation split, `train_val_split` of the training images are held out. `token`: for a
    private Hub dataset (only the train and validation splits are loaded).
    """
    if dataset_name and train_dir:
        raise DataError("Give either --dataset_name or --train_dir, not both")
    if dataset_format not in DATASET_FORMATS:
        raise DataError(f"Unknown --dataset_format {dataset_format!r}; use one of {', '.join(DATASET_FORMATS)}")
    hub_dataset_id = None
    if dataset_name:
        train, validation, found = _hub_dataset(dataset_name, image_column, label_column, train_val_split, seed, id2label, token)
        id2label, fmt, reduce_default = found, "hub", False
        description = f"the `{dataset_name}` dataset"
        hub_dataset_id = None if Path(dataset_name).is_dir() else dataset_name
    elif train_dir:
        fmt = dataset_format
        if fmt == "imagefolder":
            train = SegmentationSplit("train", str(train_dir), pairs=imagefolder_pairs(train_dir))
            validation = (
                SegmentationSplit("validation", str(validation_dir), pairs=imagefolder_pairs(validation_dir))
                if validation_dir
                else None
            )
            if validation is None and train_val_split:
                train, validation = split_off_validation(train, train_val_split, seed)
            id2label = id2label or _read_id2label(train_dir, Path(train_dir).parent)
            reduce_default = False
            description = f"images and labels from `{Path(train_dir).name}`"
        else:
            train = _layout_split(fmt, train_dir, "train")
            validation = _layout_split(fmt, validation_dir or train_dir, "validation")
            id2label = id2label or dict(enumerate(DATASET_CLASSES[fmt]))
            reduce_default = DATASETS[fmt]["do_reduce_labels"]
            description = {"ade20k": "ADE20K (ADEChallengeData2016)", "cityscapes": "Cityscapes (gtFine, train ids)"}[fmt]
    else:
        from .synthetic import SYNTHETIC_ID2LABEL, SYNTHETIC_IMAGE_SIZE, SYNTHETIC_NUM_IMAGES

        counts = {**SYNTHETIC_NUM_IMAGES, **(synthetic_num_images or {})}
        size = synthetic_image_size or SYNTHETIC_IMAGE_SIZE
        train = _synthetic_split("train", counts["train"], size, seed)
        validation = _synthetic_split("validation", counts["validation"], size, seed)
        id2label, fmt, reduce_default = dict(SYNTHETIC_ID2LABEL), "synthetic", False
        description = (
            f"the embedded synthetic scenes (`metaseg_hf.synthetic`, seed {seed}, {size}x{size} pixels)"
        )
    reduce_labels = reduce_default if do_reduce_labels is None else do_reduce_labels
    if id2label is None:
        num_labels = infer_num_labels([train] + ([validation] if validation is not None else []), reduce_labels)
        id2label = {index: f"class_{index}" for index in range(num_labels)}
    id2label = {int(key): str(value) for key, value in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))):
        raise DataError(f"Class ids must be 0..{len(id2label) - 1} without gaps, got {sorted(id2label)[:20]}")
    if len(id2label) >= IGNORE_INDEX:
        raise DataError(f"{len(id2label)} classes collide with the ignore index {IGNORE_INDEX}: at most 255 classes")
    return SegmentationData(train, validation, id2label, reduce_labels, fmt, description, hub_dataset_id)


@dataclass
class ImageCollection:
    """Unlabelled images (to calibrate a quantised model on, say): image files (or images in memory), or one
    column of a `datasets` split. `len()`, `name(index)` (the path, or `source row i`) and `load(index)`: the
    image as `image_io` reads it (a PIL image, EXIF orientation still to apply; a file that cannot be read
    raises `DataError` naming it)."""

    source: str
    paths: list = field(default_factory=list)
    dataset: object = None
    image_column: str | None = None

    def __len__(self) -> int:
        return len(self.dataset) if self.dataset is not None else len(self.paths)

    def name(self, index: int) -> str:
        if self.dataset is not None:
            return f"{self.source} row {index}"
        path = self.paths[index]
        return str(path) if isinstance(path, (str, os.PathLike)) else f"{self.source} item {index}"

    def load(self, index: int):
        value = self.dataset[int(index)][self.image_column] if self.dataset is not None else self.paths[index]
        return _undecoded(value, self.name(index))


def load_images(source, split: str = "train", image_column: str | None = None, token: str | None = None) -> ImageCollection:
    """The images of `source`, without labels:

    - a folder of images (searched recursively; label folders, `labels/`, `annotations/`, `masks/`, left out),
      or an image/label folder's `images/`;
    - a `datasets` `save_to_disk` folder or Hub id: split `split` (default "train"; a dataset saved without
      splits is its own), its image column found by name (or `image_column`).

    Raises `DataError` naming the source when it holds no image.
    """
    path = Path(source)
    if path.is_dir() and not ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        folder = path / "images" if (path / "images").is_dir() else path
        paths = [image for image in _images_under(folder)
                 if not set(image.relative_to(folder).parts[:-1]) & set(LABEL_FOLDER_NAMES)]
        _non_empty(paths, f"{folder} (extensions {', '.join(IMAGE_EXTENSIONS)})")
        return ImageCollection(str(folder), paths=paths)
    if path.is_file():
        raise DataError(f"{source} is a file; give a folder of images, or a `datasets` Hub id or save_to_disk folder")
    loaded = _DatasetSplits(str(source), token)
    if split not in loaded:
        raise DataError(f"{source} has no {split!r} split (splits: {', '.join(loaded)})")
    rows = loaded[split]
    column = _column(rows.column_names, IMAGE_COLUMN_NAMES, image_column, "image", str(source))
    if len(rows) == 0:
        raise DataError(f"Empty split: {source}[{split}] has no rows")
    import datasets

    if isinstance(rows.features[column], datasets.Image):
        rows = rows.cast_column(column, datasets.Image(decode=False))  # decoded and oriented by image_io
    return ImageCollection(f"{source}[{split}]", dataset=rows, image_column=column)


def load_evaluation_split(
    dataset_name: str | None = None,
    data_dir: str | None = None,
    dataset_format: str = "imagefolder",
    split: str | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    token: str | None = None,
) -> tuple[SegmentationSplit, bool | None]:
    """One labelled split to score a trained model on, and whether its labels are ADE20K-style.

    - `dataset_name`: split `split` (default: the first of "validation", "val", "test") of a `datasets`
      Hub id or `save_to_disk` folder (only that split is loaded, with `token` for a private one), columns
      found by name (or given);
    - `data_dir` with `dataset_format`: `"imagefolder"` (the folder is the split, `images/` + `labels/`),
      `"ade20k"` or `"cityscapes"` (the dataset root; its validation split);
    - nothing: the synthetic validation scenes (`metaseg_hf.synthetic`, as the training demo splits them).

    Returns the split and the layout's `do_reduce_labels` (True for ADE20K), or None when the source
    does not say (a `datasets` dataset, an image folder): then the model's image processor knows.
    """
    if dataset_name and data_dir:
        raise DataError("Give either --dataset_name or --data_dir, not both")
    if dataset_format not in DATASET_FORMATS:
        raise DataError(f"Unknown --dataset_format {dataset_format!r}; use one of {', '.join(DATASET_FORMATS)}")
    if dataset_name:
        loaded = _DatasetSplits(dataset_name, token)
        name = split or next((name for name in VALIDATION_SPLIT_NAMES if name in loaded), VALIDATION_SPLIT_NAMES[0])
        return _dataset_split(loaded, dataset_name, name, "validation", image_column, label_column), None
    if data_dir:
        if dataset_format == "imagefolder":
            return SegmentationSplit("validation", str(data_dir), pairs=imagefolder_pairs(data_dir)), None
        return _layout_split(dataset_format, data_dir, split or "validation"), DATASETS[dataset_format]["do_reduce_labels"]
    from .synthetic import SYNTHETIC_IMAGE_SIZE, SYNTHETIC_NUM_IMAGES

    return _synthetic_split("validation", SYNTHETIC_NUM_IMAGES["validation"], SYNTHETIC_IMAGE_SIZE, seed), False


# ---------------------------------------------------------------------------------------------------
# The official training augmentation
# ---------------------------------------------------------------------------------------------------


# Which of (chroma, second, 0) each of R, G, B takes in each 60-degree hue sector (OpenCV's HSV -> RGB).
_SECTOR_CHROMA = np.array([[1, 0, 0, 0, 0, 1], [0, 1, 1, 0, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=np.float32)
_SECTOR_SECOND = np.array([[0, 1, 0, 0, 1, 0], [1, 0, 0, 1, 0, 0], [0, 0, 1, 0, 0, 1]], dtype=np.float32)


def _rgb_to_hsv(image: np.ndarray):
    """uint8 RGB (H, W, 3) -> float32 HSV planes (hue, saturation, value), each (H, W), in OpenCV's 8-bit
    convention (H in [0, 180), S and V in [0, 255], rounded as OpenCV rounds them)."""
    red, green, blue = (image[..., channel].astype(np.float32) for channel in range(3))
    value = np.maximum(np.maximum(red, green), blue)
    delta = value - np.minimum(np.minimum(red, green), blue)
    saturation = np.where(value > 0, 255.0 * delta / np.maximum(value, 1e-6), 0.0)
    safe = np.maximum(delta, 1e-6)
    is_red, is_green = value == red, value == green
    difference = np.where(is_red, green - blue, np.where(is_green, blue - red, red - green))
    hue = np.where(is_red, np.float32(0.0), np.where(is_green, np.float32(120.0), np.float32(240.0))) + 60.0 * difference / safe
    hue = np.where(delta > 0, hue % 360.0, 0.0) / 2.0
    return np.round(hue) % 180, np.round(saturation), value


def _hsv_to_rgb(hue: np.ndarray, saturation: np.ndarray, value: np.ndarray) -> np.ndarray:
    """OpenCV 8-bit HSV planes (float, (H, W) each) -> uint8 RGB (H, W, 3)."""
    hue = (hue * 2.0 % 360.0) / 60.0
    chroma = value * (saturation / 255.0)
    second = chroma * (1 - np.abs(hue % 2 - 1))
    sector = np.floor(hue).astype(np.intp) % 6
    base = value - chroma
    rgb = np.empty((*value.shape, 3), dtype=np.uint8)
    for channel in range(3):
        plane = chroma * _SECTOR_CHROMA[channel][sector] + second * _SECTOR_SECOND[channel][sector] + base
        rgb[..., channel] = np.clip(np.round(plane), 0, 255)
    return rgb


def _convert(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion.convert: scale and shift, clip to [0, 255], uint8."""
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, rng: np.random.Generator, brightness_delta: int = 32,
                           contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18) -> np.ndarray:
    """MMSegmentation's PhotoMetricDistortion on a uint8 RGB (H, W, 3) image.

    Each step with probability 1/2: brightness shift in +-32, contrast x0.5-1.5 (before or after
    the colour steps, at random), saturation x0.5-1.5 and hue shift in [-18, 18) (OpenCV's 8-bit HSV).
    """
    if rng.integers(2):
        image = _convert(image, beta=rng.uniform(-brightness_delta, brightness_delta))
    contrast_first = rng.integers(2) == 1
    if contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    if rng.integers(2):
        hue, saturation, value = _rgb_to_hsv(image)
        image = _hsv_to_rgb(hue, _convert(saturation, alpha=rng.uniform(*saturation_range)).astype(np.float32), value)
    if rng.integers(2):
        hue, saturation, value = _rgb_to_hsv(image)
        hue = ((hue.astype(np.int64) + rng.integers(-hue_delta, hue_delta)) % 180).astype(np.float32)
        image = _hsv_to_rgb(hue, saturation, value)
    if not contrast_first and rng.integers(2):
        image = _convert(image, alpha=rng.uniform(*contrast_range))
    return image


@dataclass
class TrainAugmentation:
    """The official training pipeline after loading: rescale, crop, flip, photometric distortion,
    normalisation, padding. Call it with a PIL RGB image, a uint8 label map and a numpy Generator;
    it returns `pixel_values` (3, crop_h, crop_w) float32 and `labels` (crop_h, crop_w) int64.

    `scale` is the (long, short) box of the official `Resize` (`img_scale`, e.g. (2048, 512) for
    ADE20K), rescaled by a ratio drawn in `ratio_range` per image; the image keeps its aspect ratio.
    """

    crop_size: tuple[int, int]
    scale: tuple[int, int]
    image_mean: tuple[float, float, float]
    image_std: tuple[float, float, float]
    ratio_range: tuple[float, float] = OFFICIAL_TRAINING_RECIPE["scale_range"]
    cat_max_ratio: float = OFFICIAL_TRAINING_RECIPE["cat_max_ratio"]
    flip_probability: float = OFFICIAL_TRAINING_RECIPE["flip_probability"]
    photometric_distortion: bool = OFFICIAL_TRAINING_RECIPE["photometric_distortion"]
    ignore_index: int = IGNORE_INDEX

    def rescale(self, image, label: np.ndarray, rng: np.random.Generator):
        """The image (PIL or (H, W, 3) uint8 array) and its label resized into the box scaled by a random
        ratio, as the official `Resize`: mmcv's `rescale_size` (`resize_opencv.resize_steps`), OpenCV's
        bilinear for the image and nearest for the label, bit for bit. Returns two numpy arrays."""
        ratio = rng.random() * (self.ratio_range[1] - self.ratio_range[0]) + self.ratio_range[0]
        box = SizeDict(longest_edge=int(self.scale[0] * ratio), shortest_edge=int(self.scale[1] * ratio))
        image = np.asarray(image)
        height, width = label.shape
        new_height, new_width = resize_steps(height, width, True, box, None)[0]
        if (new_height, new_width) != (height, width):
            image = opencv_linear_resize(torch.from_numpy(np.array(image)), new_height, new_width).numpy()
            label = opencv_nearest_resize(torch.from_numpy(np.array(label)), new_height, new_width).numpy()
        return image, label

    def crop_box(self, height: int, width: int, rng: np.random.Generator):
        top = int(rng.integers(0, max(height - self.crop_size[0], 0) + 1))
        left = int(rng.integers(0, max(width - self.crop_size[1], 0) + 1))
        return top, left, top + self.crop_size[0], left + self.crop_size[1]

    def random_crop(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator):
        """Random crop, redrawn up to 10 times while one class covers >= cat_max_ratio of the valid pixels."""
        box = self.crop_box(*label.shape, rng)
        if self.cat_max_ratio < 1.0:
            for _ in range(10):
                counts = np.bincount(label[box[0] : box[2], box[1] : box[3]].ravel(), minlength=256)
                counts = counts[np.arange(counts.size) != self.ignore_index]
                counts = counts[counts > 0]
                if counts.size > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                    break
                box = self.crop_box(*label.shape, rng)
        return image[box[0] : box[2], box[1] : box[3]], label[box[0] : box[2], box[1] : box[3]]

    def __call__(self, image: Image.Image, label: np.ndarray, rng: np.random.Generator):
        image, label = self.rescale(image, label, rng)
        image, label = self.random_crop(image, label, rng)
        if rng.random() < self.flip_probability:
            image, label = image[:, ::-1], label[:, ::-1]
        if self.photometric_distortion:
            image = photometric_distortion(np.ascontiguousarray(image), rng)
        # The processor's arithmetic (official: float32 `(x - mean) / std` on the uint8 values).
        subtract, divide = normalization_constants(True, 1 / 255, True, self.image_mean, self.image_std, None)
        normalised = (image.astype(np.float32) - subtract.reshape(3).numpy()) / divide.reshape(3).numpy()
        pixel_values = np.zeros((3, *self.crop_size), dtype=np.float32)
        labels = np.full(self.crop_size, self.ignore_index, dtype=np.int64)
        height, width = label.shape
        pixel_values[:, :height, :width] = normalised.transpose(2, 0, 1)
        labels[:height, :width] = label
        return torch.from_numpy(pixel_values), torch.from_numpy(labels)


def train_augmentation(image_processor, crop_size, recipe: dict | None = None, ignore_index: int = IGNORE_INDEX) -> TrainAugmentation:
    """The official augmentation for a model's image processor: the rescale box is the processor's
    test size (`longest_edge`, `shortest_edge`), normalised with its mean and std."""
    recipe = {**OFFICIAL_TRAINING_RECIPE, **(recipe or {})}
    size = image_processor.size  # a dict or a SizeDict, both indexable
    crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    return TrainAugmentation(
        crop_size=crop,
        scale=(int(size["longest_edge"]), int(size["shortest_edge"])),
        image_mean=tuple(image_processor.image_mean),
        image_std=tuple(image_processor.image_std),
        ratio_range=tuple(recipe["scale_range"]),
        cat_max_ratio=recipe["cat_max_ratio"],
        flip_probability=recipe["flip_probability"],
        photometric_distortion=recipe["photometric_distortion"],
        ignore_index=ignore_index,
    )


# ---------------------------------------------------------------------------------------------------
# torch datasets and the sampler
# ---------------------------------------------------------------------------------------------------


class EpochSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` for every sample of the current epoch, in a per-epoch shuffled order.

    The order is a function of (seed, epoch) only; set `sampler.epoch` before iterating. The epoch
    travels with each index so that the dataset draws the sample's augmentation from
    (seed, epoch, index), which makes resuming at a batch exact without saving sampler state.
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples = num_samples
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch = self.epoch
        order = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples) if self.shuffle else range(self.num_samples)
        for index in order:
            yield (epoch, int(index))


class SegmentationTrainDataset(torch.utils.data.Dataset):
    """Augmented training crops: item `(epoch, index)` (or `index`, epoch 0) ->
    `{"pixel_values": (3, H, W) float32, "labels": (H, W) int64}` with H, W the crop size."""

    def __init__(self, split: SegmentationSplit, augmentation: TrainAugmentation, num_labels: int,
                 reduce_labels: bool = False, seed: int = 0):
        self.split = split
        self.augmentation = augmentation
        self.num_labels = num_labels
        self.reduce_labels = reduce_labels
        self.seed = seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key):
        epoch, index = key if isinstance(key, tuple) else (0, key)
        image, label, name = self.split.load(index)
        label = prepare_label(label, name, self.num_labels, self.reduce_labels, self.augmentation.ignore_index)
        rng = np.random.default_rng([self.seed, epoch, index])
        pixel_values, labels = self.augmentation(image, label, rng)
        return {"pixel_values": pixel_values, "labels": labels}


class SegmentationEvalDataset(torch.utils.data.Dataset):
    """Validation images through the image processor (the official test preprocessing, at each test-time
    scale of `scales`), with the label at its original resolution: item -> `{"pixel_values": [(C, h_s, w_s)
    float32 per scale], "labels": (H, W) int64, "name": str}`. Score it with `metaseg_hf.evaluation`."""

    def __init__(self, split: SegmentationSplit, image_processor, num_labels: int, reduce_labels: bool = False,
                 ignore_index: int = IGNORE_INDEX, scales=(1.0,)):
        self.split = split
        self.image_processor = image_processor
        self.num_labels = num_labels
        self.reduce_labels = reduce_labels
        self.ignore_index = ignore_index
        self.scales = tuple(scales)

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index):
        image, label, name = self.split.load(index)
        label = prepare_label(label, name, self.num_labels, self.reduce_labels, self.ignore_index)
        pixel_values = [batch[0] for batch in preprocess_scales(self.image_processor, image, self.scales)]
        return {"pixel_values": pixel_values, "labels": torch.from_numpy(label.astype(np.int64)), "name": name}


__all__ = [
    "DATASET_FORMATS",
    "DataError",
    "EpochSampler",
    "SegmentationData",
    "SegmentationEvalDataset",
    "SegmentationSplit",
    "SegmentationTrainDataset",
    "TrainAugmentation",
    "ade20k_pairs",
    "check_label_files",
    "check_labels",
    "cityscapes_pairs",
    "imagefolder_pairs",
    "infer_num_labels",
    "load_evaluation_split",
    "load_segmentation_data",
    "photometric_distortion",
    "prepare_label",
    "split_off_validation",
    "train_augmentation",
]
