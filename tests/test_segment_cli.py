"""examples/segment.py on a folder with a corrupt file in it, globs, TTA options and its pictures."""

import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor

sys.path.insert(0, str(REPO_ROOT / "examples"))
import segment  # noqa: E402


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("model")
    MetaSegForSemanticSegmentation(tiny_config(id2label={i: f"class {i}" for i in range(5)})).save_pretrained(folder)
    MetaSegImageProcessor(size={"shortest_edge": 96, "longest_edge": 384}).save_pretrained(folder)
    return folder


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (100, 70), dtype=np.uint8), mode="L").save(folder / "b.jpg")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    return folder


def test_folder_with_broken_files_writes_the_good_ones_and_fails_at_the_end(model_dir, photos, tmp_path, capsys):
    output = tmp_path / "out"
    exit_code = segment.main(["--model", str(model_dir), str(photos), "--output_dir", str(output)])
    assert exit_code == 1
    errors = capsys.readouterr().err
    assert "corrupt.jpg" in errors and "empty.png" in errors and "not a readable image file" in errors
    for stem, size in (("a", (80, 120)), ("b", (100, 70))):
        classes = Image.open(output / f"{stem}_classes.png")
        assert classes.mode == "P" and classes.size == size[::-1]
        assert Image.open(output / f"{stem}_overlay.png").size == size[::-1]
        assert (output / f"{stem}_legend.png").is_file()
        summary = json.loads((output / f"{stem}.json").read_text())
        assert summary["size"] == list(size)
        assert abs(sum(row["fraction"] for row in summary["classes"]) - 1) < 1e-3
    assert not list(output.glob("corrupt*")) and not list(output.glob("notes*"))


def test_class_png_holds_the_predicted_ids(model_dir, photos, tmp_path):
    output = tmp_path / "out"
    assert segment.main(["--model", str(model_dir), str(photos / "a.png"), "--output_dir", str(output), "--flip",
                         "--scales", "0.75", "1.0"]) == 0
    model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = MetaSegImageProcessor.from_pretrained(model_dir)
    expected = processor.segment(model, Image.open(photos / "a.png"), flip=True, scales=(0.75, 1.0))[0]
    assert np.array_equal(np.array(Image.open(output / "a_classes.png")), expected.segmentation.numpy())


def test_globs_and_slide_mode(model_dir, photos, tmp_path):
    output = tmp_path / "out"
    exit_code = segment.main(["--model", str(model_dir), str(photos / "*.png"), "--output_dir", str(output),
                              "--mode", "slide", "--window_size", "64", "--window_stride", "48", "--batch_size", "2"])
    assert exit_code == 1  # empty.png matches the glob and is reported
    assert (output / "a_classes.png").is_file() and not (output / "b_classes.png").exists()
    # The slide options reach the model: the class map is the sliding-window prediction, not the whole-image one.
    model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = MetaSegImageProcessor.from_pretrained(model_dir)
    image = Image.open(photos / "a.png")
    slide = processor.segment(model, image, mode="slide", window_size=64, window_stride=48)[0].segmentation.numpy()
    whole = processor.segment(model, image, mode="whole")[0].segmentation.numpy()
    assert not np.array_equal(slide, whole)  # the two modes tell apart on this image
    assert np.array_equal(np.array(Image.open(output / "a_classes.png")), slide)


def test_missing_input_is_reported(model_dir, tmp_path, capsys):
    assert segment.main(["--model", str(model_dir), str(tmp_path / "nope.png"), "--output_dir", str(tmp_path / "o")]) == 1
    assert "nope.png: no such file" in capsys.readouterr().err


def test_same_names_in_several_folders_overwrite_nothing(model_dir, tmp_path, capsys):
    rng = np.random.default_rng(1)
    inputs = [tmp_path / "x.png", tmp_path / "x_2.png", tmp_path / "d2" / "x.png", tmp_path / "d3" / "x.png"]
    for index, path in enumerate(inputs):
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40 + 8 * index, 56, 3), dtype=np.uint8)).save(path)
    output = tmp_path / "out"
    assert segment.main(["--model", str(model_dir), *map(str, inputs), "--output_dir", str(output)]) == 0
    assert "segmented 4 of 4 images" in capsys.readouterr().out
    summaries = {json.loads(path.read_text())["image"]: path.stem for path in output.glob("*.json")}
    assert summaries == {str(inputs[0]): "x", str(inputs[1]): "x_2", str(inputs[2]): "x_3", str(inputs[3]): "x_4"}
    for index, path in enumerate(inputs):  # each output set is its own input's
        stem = summaries[str(path)]
        assert Image.open(output / f"{stem}_classes.png").size == (56, 40 + 8 * index)
        assert (output / f"{stem}_overlay.png").is_file() and (output / f"{stem}_legend.png").is_file()
