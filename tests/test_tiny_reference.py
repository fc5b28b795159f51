"""Exact parity with the official MetaSeg code on a tiny model, from files in the repository (every clone).

tests/fixtures/tiny/ was made by running the official implementation (README.md there): a checkpoint whose
architecture matches no preset (so conversion must read it off the shapes), its outputs on a noise batch in
float32 and float64, and a real photo through the official ADE20K test pipeline and `whole` inference. The
large MetaSeg-T reference (tests marked `reference`) checks the same things at full size.
"""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from helpers import ATTENTION_KEYS, STAGE_KEYS, TINY_DIR, official_normalisation, run_reference_batch, sha256_of
from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
from metaseg_hf.conversion import convert_checkpoint, load_official_checkpoint, map_official_key

CHECKPOINT = TINY_DIR / "metaseg-tiny-random.pth"
PHOTO = TINY_DIR / "tiny-photo.png"
OUTPUT_KEYS = ["logits", *STAGE_KEYS, *ATTENTION_KEYS]
LOSSES = {"valid_pixels": "loss_mean_valid_pixels", "all_pixels": "loss_mean_all_pixels"}


@pytest.fixture(scope="module")
def official_config():
    return json.loads((TINY_DIR / "metaseg-tiny-config.json").read_text())


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """The tiny official checkpoint converted by the library function, and what it logged."""
    output = tmp_path_factory.mktemp("tiny") / "metaseg-tiny"
    messages = []
    convert_checkpoint(CHECKPOINT, output, log=messages.append)
    return output, messages


def load_model(converted, **overrides):
    return MetaSegForSemanticSegmentation.from_pretrained(converted[0], **overrides).eval()


@pytest.fixture(scope="module")
def batch():
    return load_file(TINY_DIR / "metaseg-tiny-batch.safetensors")


@pytest.fixture(scope="module")
def truth():
    return load_file(TINY_DIR / "metaseg-tiny-batch-float64.safetensors")


@pytest.fixture(scope="module")
def whole():
    return load_file(TINY_DIR / "tiny-photo-whole.safetensors")


@pytest.fixture(scope="module")
def whole_metadata():
    with safe_open(TINY_DIR / "tiny-photo-whole.safetensors", framework="pt") as file:
        return file.metadata()


@pytest.fixture(scope="module")
def photo():
    with Image.open(PHOTO) as image:
        image.load()
        return image


def test_fixture_files_match_their_checksums():
    """A checkout that mangled the binaries (line endings, LFS pointers) would fail every test below obscurely."""
    for line in (TINY_DIR / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((TINY_DIR / name).read_bytes()).hexdigest() == digest, f"tests/fixtures/tiny/{name}"


# ------------------------------------------------------------------------------------------------
# Conversion of a checkpoint that is no preset
# ------------------------------------------------------------------------------------------------


def test_conversion_reads_the_architecture_off_the_shapes(converted, official_config):
    model = load_model(converted)
    config = model.config
    for key, value in official_config["metaseg_hf_config_equivalent"].items():
        assert getattr(config, key) == value, f"{key}: converted {getattr(config, key)!r} vs official {value!r}"
    assert [config.id2label[index] for index in range(7)] == official_config["classes"]
    assert config.palette == official_config["palette"]
    assert sum(parameter.numel() for parameter in model.parameters()) == 45_735
    messages = converted[1]
    dropped = [message.split(":")[0] for message in messages if message.startswith("dropped")]
    assert dropped == ["dropped decode_head.conv_seg.weight", "dropped decode_head.conv_seg.bias"]
    assert messages[-1].endswith("(45,735 parameters, variant custom)")


def test_converted_weights_equal_the_official_tensors(converted):
    state_dict = load_official_checkpoint(CHECKPOINT)["state_dict"]
    ours = load_model(converted).state_dict()
    mapped = {map_official_key(key): key for key in state_dict if not key.startswith("decode_head.conv_seg.")}
    assert set(mapped) == set(ours)
    for new_key, key in mapped.items():
        assert torch.equal(ours[new_key], state_dict[key]), f"{key} -> {new_key}"


# ------------------------------------------------------------------------------------------------
# The noise batch: every intermediate output and both losses
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("average", list(LOSSES))
def test_float64_matches_the_official_float64_to_1e8(converted, batch, truth, average):
    model = load_model(converted, semantic_loss_average=average).double()
    results = run_reference_batch(model, batch, torch.float64)  # the truth's input is pixel_values.double()
    for key in OUTPUT_KEYS:
        assert results[key].shape == truth[key].shape, key
        assert (results[key] - truth[key]).abs().max().item() <= 1e-8, key
    assert abs(results["loss"].item() - truth[LOSSES[average]].item()) <= 1e-8
    # The two conventions really differ here (14.7% of the labels are ignored), so each is checked.
    assert abs(truth["loss_mean_valid_pixels"].item() - truth["loss_mean_all_pixels"].item()) > 0.1


@pytest.mark.parametrize("average", list(LOSSES))
def test_float32_within_the_reference_tolerances(converted, batch, truth, average):
    model = load_model(converted, semantic_loss_average=average)
    results = run_reference_batch(model, batch, torch.float32)
    for key in OUTPUT_KEYS:
        assert results[key].dtype == torch.float32, key
        difference = (results[key].double() - truth[key]).abs()
        assert difference.max().item() <= 5e-4, key
        assert difference.mean().item() <= 5e-5, key
    assert results["loss"].dtype == torch.float32
    assert abs(results["loss"].item() - truth[LOSSES[average]].item()) <= 5e-5


# ------------------------------------------------------------------------------------------------
# The photo through the image processor and whole inference
# ------------------------------------------------------------------------------------------------


def resized_uint8(processor, image, **overrides) -> torch.Tensor:
    """The processor's resized RGB uint8 image, (H, W, 3): `pixel_values` without rescale and normalisation."""
    values = processor(image, do_rescale=False, do_normalize=False, **overrides)["pixel_values"][0]
    assert torch.equal(values, values.round()) and values.min() >= 0 and values.max() <= 255
    return values.permute(1, 2, 0).to(torch.uint8).contiguous()


def test_both_resizes_are_opencv_exact(photo, whole, whole_metadata):
    processor = MetaSegImageProcessor()
    assert (photo.height, photo.width) == (67, 69)
    assert processor.get_resize_steps(67, 69) == [(512, 527), (512, 544)]
    first = resized_uint8(processor, photo, size_divisor=None)
    assert first.shape == (512, 527, 3)
    assert sha256_of(first) == whole_metadata["first_resize_rgb_uint8_sha256"]
    both = resized_uint8(processor, photo)
    assert both.shape == (512, 544, 3)
    assert torch.equal(both[::8, ::8], whole["resized_rgb_uint8_every8"])
    assert sha256_of(both) == whole_metadata["resized_rgb_uint8_sha256"]


def test_pixel_values_are_the_official_normalisation_bit_for_bit(photo):
    processor = MetaSegImageProcessor()
    pixel_values = processor(photo)["pixel_values"]
    assert pixel_values.dtype == torch.float32 and pixel_values.shape == (1, 3, 512, 544)
    assert torch.equal(pixel_values[0], official_normalisation(resized_uint8(processor, photo)))


def test_every_uint8_value_normalises_as_the_official_pipeline():
    """All 256 values in each channel, no resize: `pixel_values` equals float32 `(x - mean) / std` exactly
    (MMSegmentation keeps mean and std as float32; rescale-then-normalise is off by one rounding on about
    half of these). Without normalisation the values are `x / 255`, and without either the uint8 values."""
    processor = MetaSegImageProcessor(do_resize=False, size_divisor=None)
    values = torch.arange(256, dtype=torch.uint8).view(16, 16, 1).expand(16, 16, 3).contiguous()
    values[..., 1] = values[..., 1].flip(0)  # not the same image in every channel
    assert torch.equal(processor(values.numpy())["pixel_values"][0], official_normalisation(values))
    unit = processor(values.numpy(), do_normalize=False)["pixel_values"][0]
    assert torch.equal(unit, values.permute(2, 0, 1).float() / 255)
    assert unit.min() == 0 and unit.max() == 1
    raw = processor(values.numpy(), do_normalize=False, do_rescale=False)["pixel_values"][0]
    assert torch.equal(raw, values.permute(2, 0, 1).float())


def test_whole_inference_reproduces_the_official_prediction(converted, photo, whole):
    model = load_model(converted)
    processor = MetaSegImageProcessor.from_pretrained(converted[0])
    with torch.no_grad():
        logits = model(processor(photo)["pixel_values"]).logits
    assert logits.shape == whole["logits"].shape == (1, 7, 64, 68)
    assert (logits - whole["logits"]).abs().max().item() <= 5e-4

    prediction = processor.segment(model, str(PHOTO), probabilities_max="full")[0]
    assert prediction.segmentation.shape == (67, 69) and prediction.segmentation.dtype == torch.int64
    assert (prediction.probabilities_max - whole["probabilities_max"][0]).abs().max().item() <= 1e-4
    different = (prediction.segmentation != whole["segmentation"][0]).sum().item()
    assert different == 0, f"{different} of {67 * 69} pixels differ from the official class map"
    assert sorted(np.unique(whole["segmentation"].numpy()).tolist()) == [1, 2, 3, 4, 5, 6]
