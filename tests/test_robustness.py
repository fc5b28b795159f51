"""Hostile input across the package: broken weights, configs and images, bad tensors.

Every case must end in an error that names the thing and the fix, or in a correct result with
bounded memory, never in a silent wrong answer. Cases that belong to one feature live beside it
(checkpoint conversion: test_conversion.py; processor inputs: test_image_processing.py; labels:
test_modeling.py; datasets and killed training runs: test_data.py / test_train.py).
"""

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from helpers import REPO_ROOT, tiny_config
from metaseg_hf import (
    MetaSegBackbone,
    MetaSegConfig,
    MetaSegForSemanticSegmentation,
    MetaSegImageProcessor,
    MetaSegModel,
)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("robust") / "ok"
    MetaSegForSemanticSegmentation(tiny_config()).save_pretrained(folder)
    return folder


def broken_copy(saved, tmp_path, name):
    folder = tmp_path / name
    shutil.copytree(saved, folder)
    return folder


# --------------------------------------------------------------------------- weights and configs


def test_truncated_safetensors_names_the_file(saved, tmp_path):
    folder = broken_copy(saved, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(OSError, match=r"model\.safetensors.*truncated or corrupt"):
        MetaSegForSemanticSegmentation.from_pretrained(folder)


def test_folder_without_weights_says_so(saved, tmp_path):
    folder = broken_copy(saved, tmp_path, "no-weights")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match=r"no file named model\.safetensors.*no-weights"):
        MetaSegForSemanticSegmentation.from_pretrained(folder)


def test_weights_of_another_architecture_load_with_every_weight_reported_missing(saved, tmp_path, caplog):
    """Transformers' semantics (its common test `test_model_weights_reload_no_missing_tied_weights`): a foreign
    checkpoint loads, every weight is reported missing and initialised; MetaSeg adds a warning with the fix."""
    folder = broken_copy(saved, tmp_path, "other")
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="metaseg_hf"):
        model, info = MetaSegForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == set(model.state_dict()) and info["unexpected_keys"] == {"conv1.weight"}
    assert all(torch.isfinite(tensor.float()).all() for tensor in model.state_dict().values())
    assert re.search(
        rf"not MetaSeg weights.*none of the {len(model.state_dict())} MetaSeg tensors was found.*unexpected keys "
        r"\(1\): conv1\.weight.*conversion/convert_metaseg_to_hf\.py",
        caplog.text,
    ), caplog.text


def test_an_empty_state_dict_gives_an_initialised_model(saved):
    """Transformers' `from_pretrained(None, config=..., state_dict={})` (its `test_can_init_all_missing_weights`
    also compares the values with `__init__`'s): every weight is initialised on the CPU, none left on meta."""
    config = MetaSegConfig.from_pretrained(saved)
    model = MetaSegForSemanticSegmentation.from_pretrained(None, config=config, state_dict={}).eval()
    assert model.state_dict().keys() == MetaSegForSemanticSegmentation(config).state_dict().keys()
    assert all(value.device.type == "cpu" for value in model.state_dict().values())
    block = model.metaseg.encoder.stages[1].blocks[0]
    assert torch.all(block.layer_scale_1 == config.layer_scale_init_value)
    assert torch.all(block.norm2.running_var == 1)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 64, 64)).logits).all()


def test_one_tensor_of_the_wrong_shape_is_named(saved, tmp_path):
    folder = broken_copy(saved, tmp_path, "shape")
    state_dict = load_file(folder / "model.safetensors")
    state_dict["metaseg.encoder.stages.1.blocks.0.mlp.fc1.weight"] = torch.zeros(8, 16, 1, 1)
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    # RuntimeError, as Transformers raises for size mismatches, but naming the key, both shapes and the fix.
    with pytest.raises(
        RuntimeError,
        match=r"(?s)metaseg\.encoder\.stages\.1\.blocks\.0\.mlp\.fc1\.weight: checkpoint \(8, 16, 1, 1\) vs model "
        r"\(32, 16, 1, 1\).*ignore_mismatched_sizes=True",
    ):
        MetaSegForSemanticSegmentation.from_pretrained(folder)


def test_unexpected_keys_are_reported_not_raised(saved, tmp_path):
    """Transformers' semantics: extra tensors (another head, an EMA copy) load with a report, not an error."""
    folder = broken_copy(saved, tmp_path, "extra")
    state_dict = load_file(folder / "model.safetensors")
    state_dict["auxiliary_head.weight"] = torch.zeros(2, 2)
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    model, info = MetaSegForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    assert info["unexpected_keys"] == {"auxiliary_head.weight"}
    assert info["missing_keys"] == set() and info["mismatched_keys"] == set()
    reference = MetaSegForSemanticSegmentation.from_pretrained(saved)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def test_explicit_state_dict_is_loaded(saved):
    """Transformers 5's `from_pretrained(None, config=..., state_dict=...)` loads the given tensors."""
    state_dict = load_file(saved / "model.safetensors")
    state_dict["decode_head.classifier.bias"] = torch.arange(5, dtype=torch.float32)
    config = MetaSegConfig.from_pretrained(saved)
    model = MetaSegForSemanticSegmentation.from_pretrained(None, config=config, state_dict=state_dict)
    assert torch.equal(model.decode_head.classifier.bias, torch.arange(5, dtype=torch.float32))


def test_changing_the_label_set_is_allowed_when_asked(saved):
    model = MetaSegForSemanticSegmentation.from_pretrained(saved, num_labels=3, ignore_mismatched_sizes=True)
    assert model.decode_head.classifier.out_channels == 3


def test_missing_encoder_weights_are_named_in_a_warning_missing_decoder_is_fine(saved, tmp_path, caplog):
    folder = broken_copy(saved, tmp_path, "partial")
    state_dict = load_file(folder / "model.safetensors")
    del state_dict["metaseg.encoder.stages.2.layer_norm.weight"]
    save_file(state_dict, folder / "model.safetensors", metadata={"format": "pt"})
    with caplog.at_level("WARNING", logger="metaseg_hf"):
        _, info = MetaSegForSemanticSegmentation.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == {"metaseg.encoder.stages.2.layer_norm.weight"}
    assert re.search(
        r"missing encoder weights \(1\): metaseg\.encoder\.stages\.2\.layer_norm\.weight.*partly random", caplog.text
    ), caplog.text
    caplog.clear()
    encoder_only = tmp_path / "encoder-only"
    MetaSegModel(tiny_config()).save_pretrained(encoder_only)
    with caplog.at_level("WARNING", logger="metaseg_hf"):
        assert MetaSegForSemanticSegmentation.from_pretrained(encoder_only).decode_head is not None
    assert not [record for record in caplog.records if record.name.startswith("metaseg_hf")], caplog.text


def test_base_models_load_from_a_segmentation_checkpoint_without_unexpected_keys(saved):
    for model_class in (MetaSegModel, MetaSegBackbone):
        _, info = model_class.from_pretrained(saved, output_loading_info=True)
        assert info["unexpected_keys"] == set() and info["missing_keys"] == set(), model_class.__name__


def test_config_whose_fields_disagree_or_is_not_json(saved, tmp_path):
    folder = broken_copy(saved, tmp_path, "config")
    config = json.loads((folder / "config.json").read_text())
    config["depths"] = [1, 1, 1]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"(?s)Inconsistent MetaSegConfig:.*len\(hidden_sizes\) = 4 but len\(depths\) = 3"):
        MetaSegForSemanticSegmentation.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(OSError, match=r"config\.json' is not a valid JSON file"):
        MetaSegForSemanticSegmentation.from_pretrained(folder)


# --------------------------------------------------------------------------- images


@pytest.fixture(scope="module")
def processor():
    return MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})


def jpeg_bytes(height=48, width=64):
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("zero.png", b"", r"zero\.png', which is not a readable image file"),
        ("text.jpg", b"just some text", r"text\.jpg', which is not a readable image file"),
        ("truncated.jpg", jpeg_bytes()[:300], r"truncated\.jpg', which is not a readable image file"),
    ],
)
def test_unreadable_image_files_are_named(processor, tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        processor(str(path))


def test_one_pixel_image_segments_at_its_size(processor, tiny_model):
    prediction = processor.segment(tiny_model, Image.new("RGB", (1, 1), (200, 10, 10)))[0]
    assert prediction.segmentation.shape == (1, 1)


def test_image_below_the_network_minimum_without_resize(processor, tiny_model):
    pixel_values = processor(np.zeros((40, 300, 3), dtype=np.uint8), do_resize=False, return_tensors="pt")["pixel_values"]
    with pytest.raises(ValueError, match=r"40x300 pixels is too small.*at least 57 pixels"):
        tiny_model(pixel_values)


def test_nan_and_inf_are_refused(processor, tiny_model):
    image = np.random.default_rng(0).random((64, 64, 3)).astype(np.float32)
    image[3, 4, 0] = np.nan
    with pytest.raises(ValueError, match=r"1 NaN or infinite values"):
        processor(image)
    pixel_values = torch.zeros(1, 3, 64, 64)
    pixel_values[0, 1, 2, 3] = float("inf")
    with pytest.raises(ValueError, match=r"pixel_values contains NaN or infinite values"):
        tiny_model(pixel_values)


def test_10000x10000_photo_is_handled_with_bounded_memory():
    """A 100-megapixel photo: preprocessing resizes it into the official box, and the class map at full
    size is produced band by band (the (num_labels, 10000, 10000) probabilities are never held)."""
    script = textwrap.dedent(
        """
        import sys, numpy as np, torch
        sys.path.insert(0, "tests")
        from helpers import peak_rss_mb, tiny_config
        from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
        torch.manual_seed(0)
        model = MetaSegForSemanticSegmentation(tiny_config(num_labels=19)).eval()
        image = np.zeros((10000, 10000, 3), dtype=np.uint8)
        image[:, 5000:] = 200
        prediction = MetaSegImageProcessor().segment(model, image)[0]
        assert prediction.segmentation.shape == (10000, 10000)
        print(peak_rss_mb())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.strip().splitlines()[-1])
    # The image (286 MB), the class map (763 MB int64) and the confidence map (381 MB) are the floor;
    # (19, 10000, 10000) float32 probabilities alone would be 7248 MB.
    assert peak_mb < 3000, f"peak RSS {peak_mb} MB"
