"""The streaming mIoU metric against a straightforward per-image numpy intersect-and-union."""

import json
import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from metaseg_hf.metrics import EVALUATE_METRIC_PATH, StreamingMeanIoU, format_results_table, results_to_json

IGNORE = 255


def reference_mean_iou(predictions, references, num_labels, ignore_index=IGNORE, reduce_labels=False):
    """Per-image numpy intersect-and-union, as MMSegmentation and `evaluate`'s mean_iou compute it."""
    total_intersect = np.zeros(num_labels)
    total_union = np.zeros(num_labels)
    total_pred = np.zeros(num_labels)
    total_label = np.zeros(num_labels)
    for prediction, label in zip(predictions, references):
        prediction, label = np.asarray(prediction), np.asarray(label).astype(np.int64)
        if reduce_labels:
            label = label.copy()
            label[label == 0] = 255
            label = label - 1
            label[label == 254] = 255
        mask = label != ignore_index
        prediction, label = prediction[mask], label[mask]
        intersect = prediction[prediction == label]
        area_intersect = np.histogram(intersect, bins=num_labels, range=(0, num_labels - 1))[0]
        area_prediction = np.histogram(prediction, bins=num_labels, range=(0, num_labels - 1))[0]
        area_label = np.histogram(label, bins=num_labels, range=(0, num_labels - 1))[0]
        total_intersect += area_intersect
        total_union += area_prediction + area_label - area_intersect
        total_pred += area_prediction
        total_label += area_label
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = total_intersect / total_union
        accuracy = total_intersect / total_label
    return {
        "mean_iou": np.nanmean(iou),
        "mean_accuracy": np.nanmean(accuracy),
        "overall_accuracy": total_intersect.sum() / total_label.sum(),
        "per_category_iou": iou,
        "per_category_accuracy": accuracy,
    }


def random_maps(rng, count, num_labels, shape=None, ignore_fraction=0.2, absent=()):
    """Random prediction/label pairs with ignored pixels; classes in `absent` never appear."""
    present = [value for value in range(num_labels) if value not in absent]
    predictions, references = [], []
    for _ in range(count):
        size = shape or (int(rng.integers(5, 40)), int(rng.integers(5, 40)))
        prediction = rng.choice(present, size=size)
        label = np.where(rng.random(size) < 0.6, prediction, rng.choice(present, size=size))
        label[rng.random(size) < ignore_fraction] = IGNORE
        predictions.append(prediction.astype(np.int64))
        references.append(label.astype(np.int64))
    return predictions, references


def assert_same(results, expected):
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
        assert results[key] == pytest.approx(expected[key], rel=1e-12, abs=1e-12), key
    for key in ("per_category_iou", "per_category_accuracy"):
        np.testing.assert_allclose(results[key], expected[key], rtol=1e-12, atol=1e-12, equal_nan=True)
        np.testing.assert_array_equal(np.isnan(results[key]), np.isnan(expected[key]))


def test_matches_numpy_reference_on_random_maps_with_ignore_pixels():
    rng = np.random.default_rng(0)
    # class 6 never appears anywhere (NaN, skipped); class 5 only in labels of one map, never predicted.
    predictions, references = random_maps(rng, 30, 7, absent=(5, 6))
    references[3][0, :3] = 5
    metric = StreamingMeanIoU(7, id2label={index: f"c{index}" for index in range(7)})
    metric.update(predictions[:10], references[:10])  # a list of maps of different sizes
    for prediction, reference in zip(predictions[10:], references[10:]):  # single (H, W) maps
        metric.update(torch.from_numpy(prediction), torch.from_numpy(reference))
    results = metric.compute()
    expected = reference_mean_iou(predictions, references, 7)
    assert_same(results, expected)
    assert math.isnan(results["per_category_iou"][6]) and math.isnan(results["per_category_accuracy"][6])
    assert results["per_category_iou"][5] == 0.0 and results["per_category_accuracy"][5] == 0.0
    assert [row["name"] for row in results["per_class"]] == [f"c{index}" for index in range(7)]
    assert results["per_class"][6]["label_pixels"] == 0
    table = format_results_table(results)
    assert "c6" in table and "mIoU" in table
    json.dumps(results_to_json(results))  # NaN -> null, arrays -> lists


def test_batched_numpy_uint8_and_predicted_only_classes():
    rng = np.random.default_rng(1)
    predictions = rng.integers(0, 4, (6, 33, 21))
    references = rng.integers(0, 3, (6, 33, 21)).astype(np.uint8)  # class 3 is predicted but never labelled
    references[rng.random(references.shape) < 0.3] = IGNORE
    metric = StreamingMeanIoU(4)
    metric.update(predictions, references)
    results = metric.compute()
    assert_same(results, reference_mean_iou(predictions, references, 4))
    assert results["per_category_iou"][3] == 0.0 and math.isnan(results["per_category_accuracy"][3])


def test_reduce_labels_matches_reference():
    rng = np.random.default_rng(2)
    predictions = [rng.integers(0, 5, (20, 17)) for _ in range(4)]
    references = [rng.integers(0, 6, (20, 17)) for _ in range(4)]  # 0 = "other", 1..5 -> 0..4
    references[0][:2] = 255
    metric = StreamingMeanIoU(5, reduce_labels=True)
    metric.update(predictions, references)
    assert_same(metric.compute(), reference_mean_iou(predictions, references, 5, reduce_labels=True))


def test_empty_and_fully_ignored():
    metric = StreamingMeanIoU(3)
    assert math.isnan(metric.compute()["mean_iou"])
    metric.update(torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), IGNORE))
    results = metric.compute()
    assert math.isnan(results["mean_iou"]) and math.isnan(results["overall_accuracy"])


def test_bad_inputs_raise_with_the_values():
    metric = StreamingMeanIoU(3)
    metric.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, 255]], dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"label values \[7\]"):  # found when the matrix is read
        metric.compute()
    metric.reset()
    with pytest.raises(ValueError, match=r"\[300\]"):  # wide labels beyond the table: at once
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 300], [1, 255]]))
    with pytest.raises(ValueError, match=r"\[-1\]"):
        metric.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, -1], [1, 255]]))
    with pytest.raises(ValueError, match="outside"):
        metric.update(torch.tensor([[0, 3]]), torch.tensor([[0, 1]]))
    for huge in (2**24, 2**31 - 1, 2**40):  # the table index must not wrap around to class 0
        with pytest.raises(ValueError, match=rf"outside \[0, 3\): \[{huge}\]"):
            metric.update(torch.tensor([[0, huge]]), torch.tensor([[0, 0]], dtype=torch.uint8))
    assert metric.confusion_matrix.sum() == 0  # nothing was counted
    with pytest.raises(ValueError, match="shape"):
        metric.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="argmax"):
        metric.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        StreamingMeanIoU(300, ignore_index=255)


def test_merge_and_negative_ignore_index():
    rng = np.random.default_rng(3)
    predictions, references = random_maps(rng, 8, 4)
    references = [np.where(reference == IGNORE, -1, reference) for reference in references]
    whole, first, second = StreamingMeanIoU(4, ignore_index=-1), StreamingMeanIoU(4, ignore_index=-1), StreamingMeanIoU(4, ignore_index=-1)
    whole.update(predictions, references)
    first.update(predictions[:3], references[:3])
    second.update(predictions[3:], references[3:])
    assert torch.equal(first.merge(second).confusion_matrix, whole.confusion_matrix)
    assert_same(whole.compute(), reference_mean_iou(predictions, references, 4, ignore_index=-1))


_DISTRIBUTED_WORKER = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np, torch
    from accelerate import Accelerator
    from metaseg_hf.metrics import StreamingMeanIoU, results_to_json

    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    rng = np.random.default_rng(5)
    maps = [(rng.integers(0, 6, (31, 17)), rng.integers(0, 6, (31, 17))) for _ in range(9)]
    for _, label in maps:
        label[rng.random(label.shape) < 0.25] = 255
    metric = StreamingMeanIoU(6)
    for prediction, label in maps[rank::world]:  # each process scores its own shard
        metric.update(torch.from_numpy(prediction), torch.from_numpy(label))
    by_accelerate = metric.synced(accelerator).compute()
    by_torch = metric.synced().compute()  # torch.distributed.all_reduce path
    assert metric.synced().confusion_matrix.sum() == sum(int((l != 255).sum()) for _, l in maps)
    if accelerator.is_main_process:
        json.dump({"world": world, "accelerate": results_to_json(by_accelerate), "torch": results_to_json(by_torch)},
                  open(sys.argv[1], "w"))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group: exiting with it alive can abort gloo's threads
    """
)


@pytest.mark.parametrize("num_processes", [1, 2])
def test_metric_is_equal_across_one_and_two_processes(tmp_path, num_processes):
    script = tmp_path / "worker.py"
    script.write_text(_DISTRIBUTED_WORKER)
    output = tmp_path / "results.json"
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launch = [accelerate, "launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    launch += ["--multi_gpu", "--num_processes", "2"] if num_processes == 2 else ["--cpu", "--num_processes", "1"]
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(launch + [str(script), str(output)], check=True, env=environment, timeout=240, cwd=tmp_path)
    results = json.loads(output.read_text())
    assert results["world"] == num_processes
    rng = np.random.default_rng(5)
    maps = [(rng.integers(0, 6, (31, 17)), rng.integers(0, 6, (31, 17))) for _ in range(9)]
    for _, label in maps:
        label[rng.random(label.shape) < 0.25] = 255
    expected = results_to_json(reference_mean_iou([p for p, _ in maps], [label for _, label in maps], 6))
    for path in ("accelerate", "torch"):
        for key in ("mean_iou", "mean_accuracy", "overall_accuracy"):
            assert results[path][key] == pytest.approx(expected[key], rel=1e-12)
        assert results[path]["per_category_iou"] == pytest.approx(expected["per_category_iou"], rel=1e-12)


def test_evaluate_module_loads_offline(tmp_path):
    code = textwrap.dedent(
        f"""
        import json, sys
        import evaluate, numpy as np
        metric = evaluate.load({str(EVALUATE_METRIC_PATH)!r})
        rng = np.random.default_rng(4)
        predictions = [rng.integers(0, 4, (12, 9)) for _ in range(3)]
        references = [rng.integers(0, 4, (12, 9)) for _ in range(3)]
        references[0][:4] = 255
        results = metric.compute(predictions=predictions, references=references, num_labels=5, ignore_index=255)
        print(json.dumps({{"mean_iou": results["mean_iou"], "iou": [None if np.isnan(v) else v for v in results["per_category_iou"]]}}))
        """
    )
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environment, timeout=120)
    assert completed.returncode == 0, completed.stderr
    results = json.loads(completed.stdout.strip().splitlines()[-1])
    rng = np.random.default_rng(4)
    predictions = [rng.integers(0, 4, (12, 9)) for _ in range(3)]
    references = [rng.integers(0, 4, (12, 9)) for _ in range(3)]
    references[0][:4] = 255
    expected = reference_mean_iou(predictions, references, 5)
    assert results["mean_iou"] == pytest.approx(expected["mean_iou"], rel=1e-12)
    assert results["iou"][4] is None  # class 4 absent everywhere: NaN, skipped in the mean
