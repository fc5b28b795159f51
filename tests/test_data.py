"""Data loading (folder layouts, Hub-style datasets, synthetic scenes), bad-data errors, augmentation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metaseg_hf.data import (
    DataError,
    EpochSampler,
    SegmentationEvalDataset,
    SegmentationTrainDataset,
    TrainAugmentation,
    check_labels,
    imagefolder_pairs,
    load_segmentation_data,
    photometric_distortion,
    prepare_label,
)
from metaseg_hf.synthetic import SYNTHETIC_ID2LABEL, SyntheticScenes, render_scene, synthetic_scenes

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def scene(seed, size=(48, 64), num_labels=5, label_offset=0):
    image, label = render_scene(seed, size)
    label = (np.asarray(label) % num_labels + label_offset).astype(np.uint8)
    return image, Image.fromarray(label)


def make_imagefolder(root: Path, count=4, size=(48, 64), id2label=None):
    for index in range(count):
        image, label = scene(index, size)
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        image.save(root / "images" / f"img{index}.jpg")
        label.save(root / "labels" / f"img{index}.png")
    if id2label:
        (root / "id2label.json").write_text(json.dumps(id2label))
    return root


def make_ade20k(root: Path, counts=(4, 2), size=(48, 64)):
    base = root / "ADEChallengeData2016"
    for split, count in zip(("training", "validation"), counts):
        (base / "images" / split).mkdir(parents=True)
        (base / "annotations" / split).mkdir(parents=True)
        for index in range(count):
            image, label = scene(index + (100 if split == "validation" else 0), size, num_labels=150)
            label = Image.fromarray((np.asarray(label) * 37 % 151).astype(np.uint8))  # 0 = other, 1..150
            image.save(base / "images" / split / f"ADE_{split}_{index:08d}.jpg")
            label.save(base / "annotations" / split / f"ADE_{split}_{index:08d}.png")
    return root


def make_cityscapes(root: Path, counts=(4, 2), size=(48, 96)):
    for split, count in zip(("train", "val"), counts):
        for index in range(count):
            city = "aachen" if index % 2 == 0 else "bremen"
            (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
            (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
            image, label = scene(index + (100 if split == "val" else 0), size, num_labels=19)
            label = np.asarray(label).copy()
            label[:3] = 255
            stem = f"{city}_{index:06d}_000019"
            image.save(root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png")
            Image.fromarray(label).save(root / "gtFine" / split / city / f"{stem}_gtFine_labelTrainIds.png")
    return root


# ---------------------------------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------------------------------


def test_imagefolder_layout_with_and_without_class_names(tmp_path):
    make_imagefolder(tmp_path / "train", 5, id2label={str(index): f"name{index}" for index in range(5)})
    make_imagefolder(tmp_path / "val", 2)
    data = load_segmentation_data(train_dir=tmp_path / "train", validation_dir=tmp_path / "val")
    assert (len(data.train), len(data.validation), data.num_labels) == (5, 2, 5)
    assert data.id2label[3] == "name3" and not data.do_reduce_labels
    image, label, name = data.train.load(0)
    assert image.mode == "RGB" and label.shape == (48, 64) and "img0.jpg" in name
    assert np.array_equal(label, np.asarray(Image.open(tmp_path / "train" / "labels" / "img0.png")))
    # Without id2label.json the classes are read off the labels; without a validation dir one is split off.
    (tmp_path / "train" / "id2label.json").unlink()
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0.4)
    assert (len(data.train), len(data.validation)) == (3, 2)
    assert data.num_labels == 1 + max(int(np.asarray(scene(i)[1]).max()) for i in range(5))


def test_ade20k_layout_reduces_labels(tmp_path):
    data = load_segmentation_data(train_dir=make_ade20k(tmp_path), dataset_format="ade20k")
    assert (len(data.train), len(data.validation), data.num_labels) == (4, 2, 150)
    assert data.do_reduce_labels and data.id2label[0] == "wall"
    _, raw, name = data.validation.load(1)
    reduced = prepare_label(raw, name, 150, True)
    assert np.array_equal(reduced == 255, raw == 0) and np.array_equal(reduced[raw > 0], raw[raw > 0] - 1)


def test_cityscapes_layout(tmp_path):
    data = load_segmentation_data(train_dir=make_cityscapes(tmp_path), dataset_format="cityscapes")
    assert (len(data.train), len(data.validation), data.num_labels) == (4, 2, 19)
    assert not data.do_reduce_labels and data.id2label[18] == "bicycle"
    _, label, name = data.train.load(3)  # sorted: aachen 0, 2 then bremen 1, 3
    assert "bremen_000003" in name and (label[:3] == 255).all()


def test_saved_dataset_folder_like_a_hub_dataset(tmp_path):
    import datasets

    train = synthetic_scenes("train", 6, 64)
    dataset = datasets.DatasetDict({"train": train, "validation": synthetic_scenes("validation", 2, 64)})
    dataset = dataset.rename_column("label", "annotation")
    dataset.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "saved" / "id2label.json").write_text(json.dumps(SYNTHETIC_ID2LABEL))
    data = load_segmentation_data(dataset_name=str(tmp_path / "saved"))
    assert (len(data.train), len(data.validation), data.num_labels) == (6, 2, 5)
    assert data.train.label_column == "annotation"
    image, label, _ = data.train.load(2)
    assert np.array_equal(np.asarray(image), np.asarray(train[2]["image"]))
    assert label.dtype == np.int64 and np.array_equal(label, np.asarray(train[2]["label"]))


def test_synthetic_scenes_are_deterministic():
    first = SyntheticScenes("train", 4, 64, seed=3)
    again = synthetic_scenes("train", 4, 64, seed=3)
    other_split = SyntheticScenes("validation", 4, 64, seed=3)
    for index in range(4):
        assert np.array_equal(np.asarray(first[index]["image"]), np.asarray(again[index]["image"]))
        assert np.array_equal(np.asarray(first[index]["label"]), np.asarray(again[index]["label"]))
    assert not np.array_equal(np.asarray(first[0]["image"]), np.asarray(other_split[0]["image"]))
    labels = np.concatenate([np.asarray(first[index]["label"]).ravel() for index in range(4)])
    assert set(np.unique(labels)) <= set(SYNTHETIC_ID2LABEL) and len(np.unique(labels)) >= 3


def test_held_out_example_image(tmp_path):
    from metaseg_hf.synthetic import save_example_image

    image_path, label_path = save_example_image(tmp_path / "held_out.png")
    image, label = Image.open(image_path), Image.open(label_path)
    assert image.mode == "RGB" and label.mode == "L" and image.size == label.size
    train = SyntheticScenes("train", 1)[0]["image"]
    assert not np.array_equal(np.asarray(image), np.asarray(train))  # the "test" split, never trained on


# ---------------------------------------------------------------------------------------------------
# Bad data stops with a message naming the file
# ---------------------------------------------------------------------------------------------------


def test_missing_label_file_is_named(tmp_path):
    make_imagefolder(tmp_path / "train", 3)
    (tmp_path / "train" / "labels" / "img1.png").unlink()
    with pytest.raises(DataError, match=r"Missing label file for .*img1\.jpg.*labels/img1\.png"):
        load_segmentation_data(train_dir=tmp_path / "train")
    make_ade20k(tmp_path / "ade")
    next((tmp_path / "ade" / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png")).unlink()
    with pytest.raises(DataError, match=r"ADE_validation_00000000\.jpg"):
        load_segmentation_data(train_dir=tmp_path / "ade", dataset_format="ade20k")


def test_dotted_file_names_pair_with_their_own_label(tmp_path):
    """`2021.05.03.jpg` pairs with `2021.05.03.png`, never with `2021.05.png`; two images that would share
    one label file are refused."""
    folder = tmp_path / "train"
    for index, name in enumerate(["2021.05.03", "2021.05.04"]):
        image, label = scene(index)
        (folder / "images" / "day").mkdir(parents=True, exist_ok=True)
        (folder / "labels" / "day").mkdir(parents=True, exist_ok=True)
        image.save(folder / "images" / "day" / f"{name}.jpg")
        label.save(folder / "labels" / "day" / f"{name}.png")
    Image.fromarray(np.zeros((48, 64), dtype=np.uint8)).save(folder / "labels" / "day" / "2021.05.png")  # a decoy
    pairs = imagefolder_pairs(folder)
    assert [(image.name, label.name) for image, label in pairs] == [
        ("2021.05.03.jpg", "2021.05.03.png"), ("2021.05.04.jpg", "2021.05.04.png")
    ]
    scene(0)[0].save(folder / "images" / "day" / "2021.05.03.png")
    with pytest.raises(DataError, match=r"Two images share one label: .*2021\.05\.03\.jpg and .*2021\.05\.03\.png "
                                        r"both pair with .*labels/day/2021\.05\.03\.png"):
        imagefolder_pairs(folder)


def test_out_of_range_label_values_are_named(tmp_path):
    make_imagefolder(tmp_path / "train", 3, id2label={str(index): str(index) for index in range(5)})
    label = np.zeros((48, 64), dtype=np.uint8)
    label[5, 5], label[6, 6] = 7, 255
    Image.fromarray(label).save(tmp_path / "train" / "labels" / "img2.png")
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0)
    augmentation = TrainAugmentation((32, 32), (256, 64), MEAN, STD)
    dataset = SegmentationTrainDataset(data.train, augmentation, data.num_labels)
    dataset[0]
    with pytest.raises(DataError, match=r"out of range in .*img2\.jpg.*labels/img2\.png.*found 7"):
        dataset[2]


def test_image_label_size_mismatch_is_named(tmp_path):
    make_imagefolder(tmp_path / "train", 2)
    Image.fromarray(np.zeros((40, 64), dtype=np.uint8)).save(tmp_path / "train" / "labels" / "img1.png")
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0, id2label={0: "a", 1: "b"})
    with pytest.raises(DataError, match=r"different sizes: .*img1\.jpg.*48x64.*40x64"):
        data.train.load(1)


def test_empty_split_is_named(tmp_path):
    (tmp_path / "train" / "images").mkdir(parents=True)
    (tmp_path / "train" / "labels").mkdir()
    with pytest.raises(DataError, match=r"Empty split: no images found in .*train/images"):
        load_segmentation_data(train_dir=tmp_path / "train")
    make_cityscapes(tmp_path / "city", counts=(2, 0))
    (tmp_path / "city" / "leftImg8bit" / "val").mkdir(parents=True, exist_ok=True)
    with pytest.raises(DataError, match=r"Empty split: .*leftImg8bit/val"):
        load_segmentation_data(train_dir=tmp_path / "city", dataset_format="cityscapes")


def test_labels_follow_their_images_exif_orientation(tmp_path):
    """A label drawn on the stored pixels of an image with an EXIF rotation is turned with the image."""
    make_imagefolder(tmp_path / "train", 2)
    image, label = scene(0, (48, 64))
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees clockwise
    image.save(tmp_path / "train" / "images" / "img0.jpg", exif=exif)
    label.save(tmp_path / "train" / "labels" / "img0.png")
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0, id2label={0: "a"})
    loaded_image, loaded_label, _ = data.train.load(0)
    assert loaded_image.size == (48, 64) and loaded_label.shape == (64, 48)
    assert np.array_equal(loaded_label, np.asarray(label.transpose(Image.Transpose.ROTATE_270)))


def _encoded(image, **save):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="JPEG" if image.mode == "RGB" else "PNG", **save)
    return {"bytes": buffer.getvalue(), "path": None}


def test_datasets_source_turns_labels_with_exif_like_folders(tmp_path):
    """The same EXIF-rotated photo and label, from a folder and from a saved `datasets` dataset: same pixels."""
    import datasets

    make_imagefolder(tmp_path / "train", 2)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated by 90 degrees clockwise
    rows = {"image": [], "label": []}
    for index, size in enumerate([(48, 64), (56, 56)]):  # non-square and square
        image, label = scene(index, size)
        image.save(tmp_path / "train" / "images" / f"img{index}.jpg", exif=exif)
        label.save(tmp_path / "train" / "labels" / f"img{index}.png")
        rows["image"].append(_encoded(image, exif=exif))
        rows["label"].append(_encoded(label))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(tmp_path / "saved"))
    folder = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0, id2label={0: "a"})
    hub = load_segmentation_data(dataset_name=str(tmp_path / "saved"), train_val_split=0, id2label={0: "a"})
    for index in range(2):
        from_folder, from_hub = folder.train.load(index), hub.train.load(index)
        assert np.array_equal(np.asarray(from_hub[0]), np.asarray(from_folder[0]))
        assert np.array_equal(from_hub[1], from_folder[1])
    assert from_folder[1].shape == (56, 56) and not np.array_equal(from_folder[1], np.asarray(scene(1, (56, 56))[1]))


def test_datasets_columns_are_checked_by_type(tmp_path):
    import datasets

    # An images/ + labels/ folder given as a dataset loads as a classification set: pointed to --train_dir.
    make_imagefolder(tmp_path / "folder", 3)
    with pytest.raises(DataError, match=r"image classification set .*--train_dir .*folder"):
        load_segmentation_data(dataset_name=str(tmp_path / "folder"))
    # A class-name column is not a label map.
    image = _encoded(scene(0)[0])
    named = datasets.Dataset.from_dict({"image": [image] * 2, "label": [0, 1]}, features=datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}))
    named.save_to_disk(str(tmp_path / "named"))
    with pytest.raises(DataError, match=r"column 'label' is ClassLabel.*cannot hold label maps.*--label_column_name"):
        load_segmentation_data(dataset_name=str(tmp_path / "named"))
    # Array2D and nested-list label maps are read as they are documented to be.
    label = np.asarray(scene(0)[1])
    for feature in (datasets.Array2D(label.shape, "uint8"), datasets.List(datasets.List(datasets.Value("int64")))):
        rows = datasets.Dataset.from_dict({"image": [image] * 2, "label": [label.tolist()] * 2},
                                          features=datasets.Features({"image": datasets.Image(), "label": feature}))
        rows.save_to_disk(str(tmp_path / "maps"))
        data = load_segmentation_data(dataset_name=str(tmp_path / "maps"), train_val_split=0)
        assert data.num_labels == int(label.max()) + 1
        assert np.array_equal(data.train.load(1)[1], label)


def test_class_count_reads_the_labels_only(tmp_path):
    """Counting classes off the labels never decodes an image (here every image is unreadable)."""
    import datasets

    rows = {"image": [{"bytes": b"not an image", "path": None}] * 3, "label": [_encoded(scene(i)[1]) for i in range(3)]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    data = load_segmentation_data(dataset_name=str(tmp_path / "saved"), train_val_split=0)
    assert data.num_labels == max(int(np.asarray(scene(i)[1]).max()) for i in range(3)) + 1
    with pytest.raises(DataError, match=r"row 0.* not a readable image"):
        data.train.load(0)


def test_check_labels_lists_every_bad_sample_before_training(tmp_path):
    import datasets

    make_imagefolder(tmp_path / "train", 5, id2label={str(index): str(index) for index in range(5)})
    bad = np.zeros((48, 64), dtype=np.uint8)
    bad[3, 3] = 9
    Image.fromarray(bad).save(tmp_path / "train" / "labels" / "img1.png")
    Image.fromarray(np.zeros((40, 64), dtype=np.uint8)).save(tmp_path / "train" / "labels" / "img3.png")
    Image.new("RGB", (64, 48)).save(tmp_path / "train" / "labels" / "img4.png")
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0)
    with pytest.raises(DataError) as caught:
        check_labels(data.train, data.num_labels, False)
    message = str(caught.value)
    assert message.startswith("3 of 5 samples of")
    assert "img1.png" in message and "found 9" in message
    assert "different sizes" in message and "img3" in message and "48x64" in message and "40x64" in message
    assert "img4.png" in message and "mode 'RGB'" in message
    # A datasets source is checked the same way (images not decoded: only their headers are read).
    rows = {"image": [_encoded(scene(index)[0]) for index in range(2)], "label": [_encoded(Image.fromarray(bad))] * 2}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "saved"))
    hub = load_segmentation_data(dataset_name=str(tmp_path / "saved"), train_val_split=0, id2label={0: "a", 1: "b"})
    with pytest.raises(DataError, match=r"(?s)2 of 2 samples .*row 0: found 9"):
        check_labels(hub.train, 2, False)
    assert check_labels(hub.train, 10, False) == 2


def test_colour_label_images_are_refused(tmp_path):
    make_imagefolder(tmp_path / "train", 2)
    Image.new("RGB", (64, 48)).save(tmp_path / "train" / "labels" / "img0.png")
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0, id2label={0: "a"})
    with pytest.raises(DataError, match=r"img0\.png.*mode 'RGB'"):
        data.train.load(0)


# ---------------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------------


def test_padding_uses_the_ignore_index_and_zero():
    image, label = scene(0, (40, 30))
    augmentation = TrainAugmentation((64, 64), (30, 30), MEAN, STD, ratio_range=(1.0, 1.0), photometric_distortion=False)
    pixel_values, labels = augmentation(image, np.asarray(label), np.random.default_rng(0))
    assert pixel_values.shape == (3, 64, 64) and labels.shape == (64, 64) and labels.dtype == torch.int64
    # The image is rescaled into the (30, 30) box: 30 x 23 pixels; the rest is padding.
    assert (labels[30:] == 255).all() and (labels[:, 23:] == 255).all() and (pixel_values[:, 30:] == 0).all()
    assert (labels[:30, :23] != 255).all()


def test_rescale_follows_the_box_and_ratio():
    augmentation = TrainAugmentation((32, 32), (2048, 512), MEAN, STD, ratio_range=(0.5, 0.5))
    image = Image.new("RGB", (200, 100))
    resized, label = augmentation.rescale(image, np.zeros((100, 200), np.uint8), np.random.default_rng(0))
    assert resized.shape == (256, 512, 3) and label.shape == (256, 512)  # min(1024/200, 256/100) = 2.56


@pytest.mark.parametrize("ratio", [0.5, 1.5])
def test_rescale_is_the_official_opencv_resize(ratio):
    """Image and label go through the package's exact OpenCV bilinear / nearest resizes (Pillow's bilinear
    antialiases when shrinking and its nearest picks other pixels: a quarter of the labels moved at 0.5)."""
    from metaseg_hf.resize_opencv import opencv_linear_resize, opencv_nearest_resize

    image, label = scene(3, (90, 120))
    label = np.asarray(label)
    augmentation = TrainAugmentation((32, 32), (240, 90), MEAN, STD, ratio_range=(ratio, ratio))
    resized, resized_label = augmentation.rescale(image, label, np.random.default_rng(0))
    height, width = int(90 * ratio + 0.5), int(120 * ratio + 0.5)  # mmcv rescale_size into (240, 90) * ratio
    expected = opencv_linear_resize(torch.from_numpy(np.array(image)), height, width).numpy()
    expected_label = opencv_nearest_resize(torch.from_numpy(label.copy()), height, width).numpy()
    assert np.array_equal(resized, expected) and np.array_equal(resized_label, expected_label)
    # OpenCV's nearest takes source pixel floor(i * 90 / height): spot-check it independently.
    rows, columns = np.floor(np.arange(height) * (90 / height)).astype(int), np.floor(np.arange(width) * (120 / width)).astype(int)
    assert np.array_equal(resized_label, label[rows][:, columns])


def test_flip_is_applied_to_image_and_label_together():
    image, label = scene(1, (32, 48))
    label = np.asarray(label)
    flip = TrainAugmentation((32, 48), (48, 32), MEAN, STD, ratio_range=(1.0, 1.0), cat_max_ratio=1.0,
                             flip_probability=1.0, photometric_distortion=False)
    pixel_values, labels = flip(image, label, np.random.default_rng(0))
    expected = (np.asarray(image)[:, ::-1].astype(np.float32) / 255 - np.array(MEAN)) / np.array(STD)
    np.testing.assert_allclose(pixel_values.permute(1, 2, 0).numpy(), expected, atol=1e-5)
    assert np.array_equal(labels.numpy(), label[:, ::-1])


def test_cat_max_ratio_avoids_single_class_crops():
    label = np.zeros((100, 100), dtype=np.uint8)
    label[:, 60:] = 1  # a 40-column crop is mixed enough (< 75% one class) for 19 of its 61 positions

    def mixed_crops(cat_max_ratio):
        augmentation = TrainAugmentation((40, 40), (100, 100), MEAN, STD, cat_max_ratio=cat_max_ratio)
        hits = 0
        for seed in range(40):
            _, crop = augmentation.random_crop(np.zeros((100, 100, 3), np.uint8), label, np.random.default_rng(seed))
            counts = np.bincount(crop.ravel(), minlength=2)
            hits += counts.max() / counts.sum() < 0.75
        return hits

    assert mixed_crops(0.75) >= 35 and mixed_crops(1.0) <= 25  # ~98% with the 10 retries, ~31% without


class ScriptedDraws:
    """Stands in for `np.random.Generator`: hands out the given draws in order, each one checked against the
    call it answers: ("integers", low, high, value) or ("uniform", low, high, value)."""

    def __init__(self, *draws):
        self.draws = list(draws)

    def _draw(self, kind, low, high):
        assert self.draws, f"unexpected extra draw {kind}({low}, {high})"
        expected_kind, expected_low, expected_high, value = self.draws.pop(0)
        assert (kind, low, high) == (expected_kind, expected_low, expected_high), "draws out of the official order"
        return value

    def integers(self, low, high=None):
        return self._draw("integers", *((0, low) if high is None else (low, high)))

    def uniform(self, low=0.0, high=1.0):
        return self._draw("uniform", low, high)


def draws(brightness=None, contrast=None, contrast_first=False, saturation=None, hue=None):
    """The official PhotoMetricDistortion's draws, in its order: each step `randint(2)` then its value
    (brightness U(-32, 32), contrast and saturation U(0.5, 1.5), hue randint(-18, 18)); the contrast
    step before or after the colour steps by one more `randint(2)`."""
    step = [("integers", 0, 2, int(brightness is not None))]
    if brightness is not None:
        step.append(("uniform", -32, 32, brightness))
    contrast_steps = [("integers", 0, 2, int(contrast is not None))]
    if contrast is not None:
        contrast_steps.append(("uniform", 0.5, 1.5, contrast))
    step.append(("integers", 0, 2, int(contrast_first)))
    if contrast_first:
        step += contrast_steps
    step.append(("integers", 0, 2, int(saturation is not None)))
    if saturation is not None:
        step.append(("uniform", 0.5, 1.5, saturation))
    step.append(("integers", 0, 2, int(hue is not None)))
    if hue is not None:
        step.append(("integers", -18, 18, hue))
    if not contrast_first:
        step += contrast_steps
    return ScriptedDraws(*step)


def pixels(*values):
    return np.array([values], dtype=np.uint8).reshape(1, -1, 3)


@pytest.mark.parametrize(
    "image, scripted, expected",
    [
        # Brightness: float32 x + beta, clipped to [0, 255], then truncated to uint8 (not rounded, no wrap-around).
        (pixels([0, 100, 223], [224, 255, 10]), dict(brightness=31.5), pixels([31, 131, 254], [255, 255, 41])),
        (pixels([0, 100, 10], [255, 31, 32]), dict(brightness=-31.5), pixels([0, 68, 0], [223, 0, 0])),
        # Contrast x alpha, before or after the colour steps: the same clipping and truncation.
        (pixels([3, 100, 171], [170, 0, 255]), dict(contrast=1.5), pixels([4, 150, 255], [255, 0, 255])),
        (pixels([3, 100, 171], [170, 0, 255]), dict(contrast=0.5, contrast_first=True), pixels([1, 50, 85], [85, 0, 127])),
        # Saturation in OpenCV's 8-bit HSV: red's S 255 -> 127 (127.5 truncated); grey has none to change.
        (pixels([255, 0, 0], [128, 128, 128]), dict(saturation=0.5), pixels([255, 128, 128], [128, 128, 128])),
        # Hue in OpenCV's 8-bit HSV (H in [0, 180), 2 degrees a step), wrapping around: red +36 and -36 degrees.
        (pixels([255, 0, 0], [0, 255, 0]), dict(hue=18), pixels([255, 153, 0], [0, 255, 153])),
        (pixels([255, 0, 0], [90, 90, 90]), dict(hue=-18), pixels([255, 0, 153], [90, 90, 90])),
        # Every step skipped: the image is returned unchanged.
        (pixels([1, 2, 3], [250, 251, 252]), dict(), pixels([1, 2, 3], [250, 251, 252])),
    ],
)
def test_photometric_distortion_follows_the_official_steps(image, scripted, expected):
    rng = draws(**scripted)
    output = photometric_distortion(image, rng)
    assert not rng.draws, f"draws left unused: {rng.draws}"
    assert output.dtype == np.uint8 and output.shape == image.shape
    assert np.array_equal(output, expected), f"{output.tolist()} != {expected.tolist()}"


def test_augmentation_is_a_function_of_seed_epoch_and_index(tmp_path):
    make_imagefolder(tmp_path / "train", 3, id2label={str(index): str(index) for index in range(5)})
    data = load_segmentation_data(train_dir=tmp_path / "train", train_val_split=0)
    dataset = SegmentationTrainDataset(data.train, TrainAugmentation((32, 32), (256, 64), MEAN, STD), 5, seed=1)
    first, again, next_epoch = dataset[(0, 1)], dataset[(0, 1)], dataset[(1, 1)]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and torch.equal(first["labels"], again["labels"])
    assert not torch.equal(first["pixel_values"], next_epoch["pixel_values"])
    sampler = EpochSampler(7, seed=2)
    epoch0 = list(sampler)
    sampler.epoch = 1
    epoch1 = list(sampler)
    assert sorted(index for _, index in epoch0) == list(range(7)) and {epoch for epoch, _ in epoch1} == {1}
    assert [index for _, index in epoch0] != [index for _, index in epoch1]


def test_eval_dataset_keeps_the_label_resolution(tmp_path):
    from metaseg_hf import MetaSegImageProcessor

    make_imagefolder(tmp_path / "val", 1, size=(50, 70), id2label={str(index): str(index) for index in range(5)})
    data = load_segmentation_data(train_dir=tmp_path / "val", train_val_split=0)
    processor = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})
    item = SegmentationEvalDataset(data.train, processor, 5)[0]
    assert item["labels"].shape == (50, 70) and len(item["pixel_values"]) == 1  # one test-time scale
    assert item["pixel_values"][0].shape == (3, 64, 96)
    scaled = SegmentationEvalDataset(data.train, processor, 5, scales=(0.5, 1.0))[0]["pixel_values"]
    assert [tuple(pixels.shape) for pixels in scaled] == [(3, 32, 64), (3, 64, 96)]
    assert torch.equal(scaled[1], item["pixel_values"][0])
