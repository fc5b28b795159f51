"""examples/evaluate.py: data through the library's loader, scores identical to the validation during training
(whole mode) and to `segment()` image by image (flip + multi-scale test-time augmentation)."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, tiny_config
from test_data import make_imagefolder


@pytest.fixture(scope="module")
def evaluate_script():
    spec = importlib.util.spec_from_file_location("evaluate_example", REPO_ROOT / "examples" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    MetaSegForSemanticSegmentation(tiny_config(num_labels=5)).eval().save_pretrained(folder)
    MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}).save_pretrained(folder)
    return folder


def test_evaluate_script_scores_as_training_validation_and_segment(tmp_path, evaluate_script, model_dir):
    from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
    from metaseg_hf.data import SegmentationEvalDataset, load_segmentation_data, prepare_label
    from metaseg_hf.evaluation import evaluate_segmentation
    from metaseg_hf.inference_metaseg import segment
    from metaseg_hf.metrics import StreamingMeanIoU

    make_imagefolder(tmp_path / "val", 3, size=(60, 72))
    model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    processor = MetaSegImageProcessor.from_pretrained(model_dir)

    # Whole mode: the same numbers as the validation during training.
    output = tmp_path / "whole.json"
    assert evaluate_script.main(["--model", str(model_dir), "--data_dir", str(tmp_path / "val"), "--device", "cpu",
                                 "--output_json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["images"] == 3 and results["settings"]["mode"] == "whole"
    data = load_segmentation_data(train_dir=tmp_path / "val", train_val_split=0)
    dataset = SegmentationEvalDataset(data.train, processor, 5)
    training = evaluate_segmentation(model, dataset, None, StreamingMeanIoU(5), batch_size=2).compute()
    assert results["mean_iou"] == pytest.approx(training["mean_iou"], rel=1e-12)
    assert results["overall_accuracy"] == pytest.approx(training["overall_accuracy"], rel=1e-12)

    # Flip and two scales: image by image through `segment()`, the end-to-end inference.
    output = tmp_path / "tta.json"
    evaluate_script.main(["--model", str(model_dir), "--data_dir", str(tmp_path / "val"), "--device", "cpu",
                          "--flip", "--scales", "0.75", "1.0", "--max_images", "2", "--output_json", str(output)])
    results = json.loads(output.read_text())
    metric = StreamingMeanIoU(5)
    for index in range(2):
        image, label, name = data.train.load(index)
        prediction = segment(model, processor, image, flip=True, scales=(0.75, 1.0))[0]
        metric.update(prediction.segmentation, torch.from_numpy(prepare_label(label, name, 5, False)))
    expected = metric.compute()
    assert results["settings"]["images"] == 2
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"], rel=1e-12)
    assert results["per_class"][0]["label_pixels"] == expected["per_class"][0]["label_pixels"]


def test_evaluate_script_reads_the_synthetic_validation_split(tmp_path, evaluate_script, model_dir):
    output = tmp_path / "synthetic.json"
    evaluate_script.main(["--model", str(model_dir), "--max_images", "1", "--device", "cpu", "--output_json", str(output)])
    results = json.loads(output.read_text())
    assert results["settings"]["data"] == "synthetic scenes[validation]" and results["settings"]["reduce_labels"] is False
    assert results["settings"]["images"] == 1 and 0 <= results["overall_accuracy"] <= 1


def test_labels_as_pil_images_are_read_as_the_processor_reads_them():
    """The metric reads PIL label maps with the processor's label reader (class-id modes only)."""
    from metaseg_hf.metrics import StreamingMeanIoU

    label = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    metric = StreamingMeanIoU(3)
    metric.update(torch.tensor([[0, 1], [2, 0]]), Image.fromarray(label))
    assert metric.compute()["overall_accuracy"] == 1.0
    with pytest.raises(ValueError, match=r"mode 'RGB'.*single-channel map of class indices"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), Image.new("RGB", (2, 2)))


def test_dataset_name_loads_only_the_split_asked_for_with_the_token(tmp_path, evaluate_script, model_dir, monkeypatch):
    """A data folder whose train file is broken: its validation split is scored (train is never built), the
    token reaches `datasets`, and the images are read by a worker process."""
    import io

    import datasets

    def encoded(array):
        buffer = io.BytesIO()
        Image.fromarray(array).save(buffer, format="PNG")
        return {"bytes": buffer.getvalue(), "path": None}

    rng = np.random.default_rng(0)
    rows = {"image": [encoded(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)) for _ in range(2)],
            "label": [encoded(rng.integers(0, 5, (40, 48), dtype=np.uint8)) for _ in range(2)]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Image()})
    (tmp_path / "repo" / "data").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "repo" / "data" / "validation-00000.parquet"))
    (tmp_path / "repo" / "data" / "train-00000.parquet").write_bytes(b"not parquet")
    tokens = []
    for name in ("load_dataset", "load_dataset_builder"):
        original = getattr(datasets, name)

        def recording(*args, _original=original, **kwargs):
            tokens.append(kwargs.get("token"))
            return _original(*args, **kwargs)

        monkeypatch.setattr(datasets, name, recording)
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    output = tmp_path / "results.json"
    assert evaluate_script.main(["--model", str(model_dir), "--dataset_name", str(tmp_path / "repo"), "--device", "cpu",
                                 "--token", "hf_private", "--dataloader_num_workers", "1", "--output_json", str(output)]) == 0
    results = json.loads(output.read_text())
    assert results["settings"]["images"] == 2 and "[validation]" in results["settings"]["data"]
    assert sum(row["label_pixels"] for row in results["per_class"]) == 2 * 40 * 48
    assert tokens and set(tokens) == {"hf_private"}
