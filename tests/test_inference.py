"""Whole and sliding-window inference against the official test logic; bounded memory on large images."""

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from helpers import REPO_ROOT, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation
from metaseg_hf.inference_metaseg import logits_to_prediction, predict, sliding_window_logits, window_starts


@pytest.fixture(scope="module")
def whole(reference):
    return load_file(reference / "metaseg-t-ade20k-whole.safetensors")


def test_whole_mode_reproduces_the_official_prediction(reference_model, whole):
    prediction = reference_model.predict(
        whole["pixel_values"], original_sizes=[(375, 500)], mode="whole", probabilities_max="full"
    )[0]
    agreement = (prediction.segmentation == whole["segmentation"][0]).float().mean().item()
    assert agreement >= 0.995
    assert (prediction.probabilities_max - whole["probabilities_max"][0]).abs().max().item() <= 1e-4


def test_slide_mode_reproduces_the_official_prediction(reference, reference_model, whole):
    slide = load_file(reference / "metaseg-t-ade20k-slide.safetensors")
    prediction = predict(
        reference_model, whole["pixel_values"], original_sizes=[(375, 500)], mode="slide", window_size=256,
        window_stride=171, window_batch_size=5, probabilities_max="full",
    )[0]
    agreement = (prediction.segmentation == slide["segmentation"][0]).float().mean().item()
    assert agreement >= 0.995
    assert (prediction.probabilities_max - slide["probabilities_max"][0]).abs().max().item() <= 1e-4


def test_official_window_grid():
    # 512x704 with 256/171: 3 rows (0, 171, 256) and 4 columns (0, 171, 342, 448): 12 windows.
    assert window_starts(512, 256, 171) == [0, 171, 256]
    assert window_starts(704, 256, 171) == [0, 171, 342, 448]
    assert window_starts(200, 256, 171) == [0]


def test_window_batch_size_does_not_change_the_result(tiny_model):
    pixel_values = torch.randn(2, 3, 150, 170)
    one = sliding_window_logits(tiny_model, pixel_values, 64, 48, window_batch_size=1)
    many = sliding_window_logits(tiny_model, pixel_values, (64, 64), (48, 48), window_batch_size=7)
    assert one.shape == (2, 5, 150, 170)
    assert torch.allclose(one, many, atol=1e-5)


def test_slide_with_one_window_covering_the_image_equals_whole(tiny_model):
    pixel_values = torch.randn(1, 3, 96, 120)
    slide = predict(tiny_model, pixel_values, mode="slide", window_size=(96, 120), window_stride=64)[0]
    whole = predict(tiny_model, pixel_values, mode="whole")[0]
    assert torch.equal(slide.segmentation, whole.segmentation)


def test_flip_averages_probabilities_of_both_passes(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 96)
    prediction = predict(tiny_model, pixel_values, flip=True, return_probabilities=True)[0]
    with torch.no_grad():
        plain = tiny_model(pixel_values).logits
        flipped = tiny_model(pixel_values.flip(-1)).logits
    def probabilities(logits):
        return F.interpolate(logits, size=(64, 96), mode="bilinear", align_corners=False)[0].softmax(0)
    expected = (probabilities(plain) + probabilities(flipped).flip(-1)) / 2
    assert torch.allclose(prediction.probabilities, expected, atol=1e-5)
    assert torch.equal(prediction.segmentation, expected.argmax(0))


def test_banded_resize_equals_a_full_resize():
    logits = torch.randn(7, 33, 45)
    full = F.interpolate(logits[None], size=(301, 407), mode="bilinear", align_corners=False)[0].softmax(0)
    prediction = logits_to_prediction([logits], (301, 407), return_probabilities=True, band_elements=7 * 407 * 10)
    assert torch.allclose(prediction.probabilities, full, atol=1e-6)
    single = logits_to_prediction([logits], (301, 407), band_elements=7 * 407 * 3, probabilities_max="full")
    assert torch.equal(single.segmentation, full.argmax(0))
    assert torch.allclose(single.probabilities_max, full.max(0).values, atol=1e-6)


def test_a_padded_batch_gives_what_each_image_alone_gives(tiny_model):
    """Padding changes the logits of real pixels (Channel Reduction Attention pools over the whole canvas),
    so each image of a padded batch runs on its own valid region: the same prediction as the image alone."""
    padded = torch.randn(3, 3, 96, 112)
    input_sizes = [(64, 80), (96, 112), (64, 80)]
    original_sizes = [(128, 160), (96, 112), (70, 90)]
    batched = predict(tiny_model, padded, original_sizes=original_sizes, input_sizes=input_sizes,
                      return_probabilities=True)
    for index, ((height, width), original_size) in enumerate(zip(input_sizes, original_sizes)):
        alone = predict(tiny_model, padded[index : index + 1, :, :height, :width].contiguous(),
                        original_sizes=[original_size], return_probabilities=True)[0]
        assert batched[index].segmentation.shape == original_size
        torch.testing.assert_close(batched[index].probabilities, alone.probabilities, rtol=0, atol=1e-5)
        assert (batched[index].segmentation == alone.segmentation).float().mean() > 0.999
    with torch.no_grad():  # the padded forward differs (what predict must not return)
        whole_canvas = F.interpolate(tiny_model(padded[:1]).logits, size=(96, 112), mode="bilinear", align_corners=False)
    crop = F.interpolate(whole_canvas[:, :, :64, :80], size=(128, 160), mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(crop.softmax(0), batched[0].probabilities, atol=1e-3)
    with pytest.raises(ValueError, match=r"3 images but 1 input_sizes"):
        predict(tiny_model, padded, input_sizes=[(64, 80)])


def test_mixed_size_photos_batched_through_the_processor_and_the_pipeline(tiny_model, tmp_path):
    """A 75x100 and a 100x75 photo (processed 64x88 and 88x64): `predict` on the processor's padded batch
    and `pipeline(..., batch_size=2)` return what one-at-a-time calls return (Transformers' own pipeline
    would stop in its collate with "Sizes of tensors must match")."""
    import numpy as np
    from PIL import Image
    from transformers import pipeline

    from metaseg_hf import MetaSegImageProcessor

    processor = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}, size_divisor=8)
    rng = np.random.default_rng(0)
    photos = [Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)) for shape in [(75, 100, 3), (100, 75, 3)]]
    alone = processor.segment(tiny_model, photos, return_probabilities=True)
    inputs = processor(photos, return_processed_sizes=True)
    assert inputs["pixel_values"].shape == (2, 3, 88, 88)
    batched = tiny_model.predict(inputs["pixel_values"], original_sizes=[(75, 100), (100, 75)],
                                 input_sizes=inputs["processed_sizes"].tolist(), return_probabilities=True)
    for one, other in zip(alone, batched, strict=True):
        torch.testing.assert_close(other.probabilities, one.probabilities, rtol=0, atol=1e-5)

    tiny_model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path))
    for single, together in zip([segmenter(photo) for photo in photos], segmenter(photos, batch_size=2), strict=True):
        masks = {segment["label"]: np.array(segment["mask"]) for segment in single}
        assert {segment["label"]: np.array(segment["mask"]) for segment in together}.keys() == masks.keys()
        for segment in together:
            assert np.array_equal(np.array(segment["mask"]), masks[segment["label"]])


def test_slide_mode_needs_a_window(tiny_model):
    with pytest.raises(ValueError, match="window_size is required in 'slide' mode"):
        predict(tiny_model, torch.randn(1, 3, 64, 64), mode="slide")
    with pytest.raises(ValueError, match="mode must be 'whole' or 'slide'"):
        predict(tiny_model, torch.randn(1, 3, 64, 64), mode="tiles")


def test_config_test_mode_is_the_default():
    model = MetaSegForSemanticSegmentation(
        tiny_config(inference_mode="slide", sliding_window_size=64, sliding_window_stride=32)
    ).eval()
    pixel_values = torch.randn(1, 3, 100, 100)
    default = model.predict(pixel_values)[0]
    explicit = model.predict(pixel_values, mode="slide", window_size=64, window_stride=32)[0]
    assert torch.equal(default.segmentation, explicit.segmentation)


def test_4000x6000_output_with_bounded_memory():
    """Class maps at 4000x6000 without materialising (num_labels, 4000, 6000) probabilities."""
    script = textwrap.dedent(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        from helpers import peak_rss_mb, tiny_config
        from metaseg_hf import MetaSegForSemanticSegmentation
        torch.manual_seed(0)
        model = MetaSegForSemanticSegmentation(tiny_config(num_labels=19)).eval()
        prediction = model.predict(torch.randn(1, 3, 512, 768), original_sizes=[(4000, 6000)])[0]
        assert prediction.segmentation.shape == (4000, 6000) and prediction.probabilities is None
        print(peak_rss_mb())
        """
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    peak_mb = int(result.stdout.strip().splitlines()[-1])
    # (19, 4000, 6000) float32 probabilities alone would take 1824 MB.
    assert peak_mb < 1500, f"peak RSS {peak_mb} MB"
