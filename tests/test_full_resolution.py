"""Class maps at the original size: exact against `F.interpolate` + argmax (random logits, hard cases,
every public entry), binary models, single photos with `pad_size`, bounded memory."""

import subprocess
import sys
import textwrap
from unittest import mock

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from helpers import REPO_ROOT, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
from metaseg_hf.class_maps import (
    UpsampledLogits,
    augmented_argmax,
    augmented_argmax_pays,
    bilinear_source,
    interpolate_pair,
    resized_argmax,
    upsampled_argmax,
    upsampled_argmax_applies,
    upsampled_argmax_pays,
)
from metaseg_hf.inference_metaseg import logits_to_prediction, predict, resize_logits, segment


def reference_map(logits, size):
    """The official computation, done in full: F.interpolate in float32, then argmax."""
    return F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0].argmax(0)


def assert_exact(ours, expected, logits, size):
    """Equal everywhere except where the two classes tie within float rounding in the full resize."""
    assert ours.shape == expected.shape and ours.dtype == torch.int64
    differ = (ours != expected).nonzero()
    if len(differ):
        full = F.interpolate(logits[None].float(), size=size, mode="bilinear", align_corners=False)[0]
        rows, columns = differ[:, 0], differ[:, 1]
        gap = full[ours[rows, columns], rows, columns] - full[expected[rows, columns], rows, columns]
        assert gap.abs().max().item() <= 1e-5 * max(full.abs().max().item(), 1.0), f"{len(differ)} pixels differ"
        assert len(differ) <= max(1, ours.numel() // 10**6), f"{len(differ)} near-ties of {ours.numel()}"


HARD_CASES = {
    "random-upsampling": (lambda: torch.randn(19, 37, 53), (301, 413)),
    "odd-sizes": (lambda: torch.randn(7, 13, 11) * 5, (97, 89)),
    "flat-logits": (lambda: torch.randn(150, 16, 22) * 0.01, (250, 333)),
    "near-ties": (lambda: torch.randn(1, 20, 24).repeat(6, 1, 1) + torch.randn(6, 1, 1) * 1e-6, (200, 230)),
    "exact-ties": (lambda: torch.randn(1, 20, 24).repeat(4, 1, 1), (160, 200)),
    "constant-map": (lambda: torch.ones(5, 12, 14) * torch.arange(5.0)[:, None, None], (120, 150)),
    "single-cell-winner": (lambda: torch.zeros(3, 9, 9).index_fill_(0, torch.tensor([2]), 1.0), (90, 90)),
    "one-pixel-input": (lambda: torch.randn(5, 1, 1), (40, 50)),
    "one-row-input": (lambda: torch.randn(5, 1, 30), (8, 300)),
    "one-pixel-output": (lambda: torch.randn(5, 30, 40), (1, 1)),
    "one-row-output": (lambda: torch.randn(5, 30, 40), (1, 257)),
    "downsampling": (lambda: torch.randn(9, 64, 88), (37, 51)),
    "mixed-up-and-down": (lambda: torch.randn(9, 64, 20), (40, 200)),
    "two-classes": (lambda: torch.randn(2, 31, 29), (400, 333)),
    "large-magnitudes": (lambda: torch.randn(6, 21, 17) * 1e4, (210, 170)),
}


@pytest.mark.parametrize("case", HARD_CASES, ids=list(HARD_CASES))
def test_class_map_is_the_full_resize_argmax(case):
    torch.manual_seed(0)
    make, size = HARD_CASES[case]
    logits = make()
    expected = reference_map(logits, size)
    assert_exact(resized_argmax(logits, size), expected, logits, size)
    assert_exact(logits_to_prediction([logits], size).segmentation, expected, logits, size)
    # Small bands: the bound and the block writes per band of cell rows agree with one band.
    assert_exact(resized_argmax(logits, size, band_elements=1), expected, logits, size)


def two_step_reference(logits, input_size, size, crop=None):
    """The official two resizes in full (stride-8 logits -> network input, cropped -> original size), then argmax."""
    resized = F.interpolate(logits[None], size=input_size, mode="bilinear", align_corners=False)[0]
    if crop is not None:
        resized = resized[:, : crop[0], : crop[1]]
    return reference_map(resized, size), resized


TWO_STEP_CASES = {
    # name: (logits, network input size, crop or None, original size)
    "stride-8": (lambda: torch.randn(19, 24, 32) * 3, (192, 256), None, (601, 803)),
    "portrait": (lambda: torch.randn(11, 32, 24), (256, 192), None, (801, 600)),
    "flat-logits": (lambda: torch.randn(150, 16, 22) * 0.01, (128, 176), None, (700, 950)),
    "non-integer-factors": (lambda: torch.randn(9, 17, 23), (131, 179), None, (613, 905)),
    "padded-crop": (lambda: torch.randn(7, 16, 16), (128, 128), (96, 128), (500, 667)),
    "factor-one-first-resize": (lambda: torch.randn(5, 70, 90), (70, 90), None, (420, 540)),
    "near-ties": (lambda: torch.randn(1, 12, 16).repeat(6, 1, 1) + torch.randn(6, 1, 1) * 1e-6, (96, 128), None, (500, 640)),
    "exact-ties": (lambda: torch.randn(1, 12, 16).repeat(4, 1, 1), (96, 128), None, (480, 640)),
    "constant-map": (lambda: torch.ones(5, 12, 14) * torch.arange(5.0)[:, None, None], (96, 112), None, (480, 560)),
    "two-classes": (lambda: torch.randn(2, 31, 29), (248, 232), None, (1000, 930)),
    "large-magnitudes": (lambda: torch.randn(6, 21, 17) * 1e4, (168, 136), None, (840, 680)),
    "one-logit-row": (lambda: torch.randn(5, 1, 40), (8, 320), None, (60, 1500)),
    # The second resize keeps or shrinks: photos at or below the network input size.
    "same-size": (lambda: torch.randn(19, 24, 32), (192, 256), None, (192, 256)),
    "same-size-cropped": (lambda: torch.randn(7, 16, 16), (128, 128), (96, 128), (96, 128)),
    "downsampling": (lambda: torch.randn(19, 24, 32) * 3, (192, 256), None, (150, 211)),
    "down-and-up": (lambda: torch.randn(9, 24, 32), (192, 256), None, (700, 90)),
    "one-pixel-wide": (lambda: torch.randn(5, 16, 20), (128, 160), None, (600, 2)),
}


@pytest.mark.parametrize("case", TWO_STEP_CASES, ids=list(TWO_STEP_CASES))
def test_class_map_from_stride_8_logits_is_the_two_resizes_argmax(case):
    torch.manual_seed(0)
    make, input_size, crop, size = TWO_STEP_CASES[case]
    logits = make()
    upsampled = UpsampledLogits(logits, input_size, crop)
    assert upsampled_argmax_applies(upsampled, size)
    expected, resized = two_step_reference(logits, input_size, size, crop)
    # PyTorch's own arithmetic, fused multiply-adds included: equal, not only up to near-ties.
    assert torch.equal(upsampled_argmax(upsampled, size), expected)
    assert torch.equal(upsampled.materialize(), resized)
    assert_exact(logits_to_prediction([upsampled], size).segmentation, expected, resized, size)


def test_public_entries_take_the_two_resize_path_and_give_the_official_map():
    """19 classes at a 256x352 network input (1.7 M input-size values, enough for `upsampled_argmax`):
    `segment`, `model.predict` and `post_process_semantic_segmentation` give the official map, for a photo
    larger and one smaller than the network input."""
    import metaseg_hf.inference_metaseg as inference

    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(num_labels=19)).eval()
    processor = MetaSegImageProcessor(size={"shortest_edge": 256, "longest_edge": 352})
    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return upsampled_argmax(*args, **kwargs)

    for height, width in ((900, 1234), (200, 270)):
        image = (np.random.default_rng(height).random((height, width, 3)) * 255).astype(np.uint8)
        pixel_values = processor(image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            logits = model(pixel_values).logits
        expected, _ = two_step_reference(logits[0], tuple(pixel_values.shape[-2:]), (height, width))
        with mock.patch.object(inference, "upsampled_argmax", counted):
            maps = [
                processor.segment(model, image)[0].segmentation,
                model.predict(pixel_values, original_sizes=[(height, width)])[0].segmentation,
                processor.post_process_semantic_segmentation(logits, target_sizes=[(height, width)])[0],
            ]
        assert len(calls) == 3
        calls.clear()
        for segmentation in maps:
            assert torch.equal(segmentation, expected)


def smooth_logits(num_labels, height, width, input_size, scale=3.0):
    """Input-size logits as a network gives them: random stride-8 values resized to the input size."""
    return F.interpolate(torch.randn(1, num_labels, height, width) * scale, size=input_size, mode="bilinear", align_corners=False)[0]


AUGMENTED_CASES = {
    # name: (maps, original size)
    "flip": (lambda: [smooth_logits(19, 16, 20, (128, 160)), smooth_logits(19, 16, 20, (128, 160))], (600, 700)),
    "scales": (lambda: [smooth_logits(7, 16, 20, (128, 160)), smooth_logits(7, 8, 10, (64, 80)), smooth_logits(7, 24, 30, (192, 240))], (500, 650)),
    "flat-150-classes": (lambda: [smooth_logits(150, 16, 22, (128, 176), 0.3) for _ in range(2)], (700, 900)),
    "downsampling": (lambda: [smooth_logits(9, 32, 40, (256, 320)) for _ in range(2)], (150, 170)),
    "near-ties": (lambda: [torch.randn(1, 40, 50).repeat(5, 1, 1) + torch.randn(5, 1, 1) * 1e-6, torch.randn(1, 40, 50).repeat(5, 1, 1)], (300, 370)),
    "exact-ties": (lambda: [torch.randn(1, 40, 50).repeat(4, 1, 1)] * 2, (300, 370)),
    "constant-map": (lambda: [torch.ones(5, 30, 40) * torch.arange(5.0)[:, None, None]] * 3, (240, 320)),
}


@pytest.mark.parametrize("case", AUGMENTED_CASES, ids=list(AUGMENTED_CASES))
def test_augmented_class_map_is_the_mean_softmax_argmax(case):
    """`augmented_argmax` against the full computation (every class resized and soft-maxed, band by band)."""
    torch.manual_seed(0)
    make, size = AUGMENTED_CASES[case]
    maps = make()
    expected = logits_to_prediction(maps, size, probabilities_max="full")
    assert torch.equal(augmented_argmax(maps, size), expected.segmentation)
    if augmented_argmax_pays(maps, size):
        cheap = logits_to_prediction(maps, size, probabilities_max="input")
        assert torch.equal(cheap.segmentation, expected.segmentation)
        assert cheap.probabilities_max.shape == size
        assert abs(cheap.probabilities_max.mean().item() - expected.probabilities_max.mean().item()) < 0.05


def test_non_finite_logits_take_the_full_computation():
    """A class masked with -inf is outside the bounds' arithmetic: the maps are resized in full, band by band."""
    torch.manual_seed(0)
    logits = torch.randn(19, 32, 40)
    logits[3, :10] = -torch.inf
    upsampled = UpsampledLogits(logits, (256, 320))
    size = (1000, 1250)
    assert upsampled_argmax_applies(upsampled, size) and not upsampled_argmax_pays(upsampled, size)
    resized = upsampled.materialize()
    expected = resize_logits(resized, size).argmax(0)
    assert torch.equal(logits_to_prediction([upsampled], size).segmentation, expected)
    maps = [resized, resized.flip(-1)]
    assert not augmented_argmax_pays(maps, size)
    full = logits_to_prediction(maps, size, probabilities_max="full")
    assert torch.equal(logits_to_prediction(maps, size).segmentation, full.segmentation)


def test_flip_and_scales_through_segment_take_the_pruned_path():
    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(num_labels=19)).eval()
    processor = MetaSegImageProcessor(size={"shortest_edge": 128, "longest_edge": 176})
    image = (np.random.default_rng(3).random((900, 1200, 3)) * 255).astype(np.uint8)
    import metaseg_hf.inference_metaseg as inference

    calls = []

    def counted(*args, **kwargs):
        calls.append(1)
        return augmented_argmax(*args, **kwargs)

    for options in ({"flip": True}, {"flip": True, "scales": (0.75, 1.0)}):
        full = processor.segment(model, image, probabilities_max="full", **options)[0].segmentation
        with mock.patch.object(inference, "augmented_argmax", counted):
            pruned = processor.segment(model, image, **options)[0].segmentation
        assert calls and torch.equal(pruned, full)
        calls.clear()


def test_interpolate_pair_is_the_kernel_arithmetic_bit_for_bit():
    torch.manual_seed(0)
    logits = torch.randn(3, 37, 53) * 7
    for size in ((300, 420), (64, 71), (37, 900)):
        resized = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0]
        rows, columns = (bilinear_source(length, source, "cpu") for length, source in zip(size, logits.shape[1:]))
        (top, bottom, row_weight), (left, right, column_weight) = rows, columns
        upper = interpolate_pair(logits[:, top][:, :, left], logits[:, top][:, :, right], 1 - column_weight, column_weight)
        lower = interpolate_pair(logits[:, bottom][:, :, left], logits[:, bottom][:, :, right], 1 - column_weight, column_weight)
        ours = interpolate_pair(upper, lower, (1 - row_weight)[:, None], row_weight[:, None])
        assert torch.equal(ours, resized), f"{size}: {(ours != resized).float().mean():.1%} of values differ"
        # The band resize of `post_process_semantic_probabilities`, segmentation scores and augmented maps.
        assert torch.equal(resize_logits(logits, size), resized)


def test_two_resizes_outside_the_pruned_path_are_done_in_full():
    """One class, a first resize that shrinks, and maps PyTorch resizes with its other kernel: the map is still
    the official one."""
    torch.manual_seed(0)
    cases = [
        (torch.randn(1, 16, 20), (128, 160), (640, 800)),  # binary: the logit thresholded at 0
        (torch.randn(5, 6, 7), (48, 56), (300, 350)),  # input height + width <= 128
        (torch.randn(5, 16, 20), (128, 160), (60, 50)),  # original height + width <= 128
        (torch.randn(5, 16, 20), (8, 10), (300, 350)),  # logits larger than the input: not upsampling
    ]
    for logits, input_size, size in cases:
        upsampled = UpsampledLogits(logits, input_size)
        assert not upsampled_argmax_applies(upsampled, size)
        expected, resized = two_step_reference(logits, input_size, size)
        if logits.shape[0] == 1:
            expected = (F.interpolate(resized[None], size=size, mode="bilinear", align_corners=False)[0, 0] > 0).long()
        assert_exact(logits_to_prediction([upsampled], size).segmentation, expected, resized, size)


def test_bound_prunes_but_keeps_every_possible_winner():
    """A class that wins at one pixel inside a cell only: the corners' bound must keep it."""
    logits = torch.zeros(3, 2, 2)
    logits[0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    logits[1] = torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    logits[2] = 0.3  # never a corner's maximum, but wins in the cell's middle
    size = (40, 40)
    expected = reference_map(logits, size)
    assert (expected == 2).any()
    assert torch.equal(resized_argmax(logits, size), expected)


def test_public_entries_give_the_exact_map_whole_slide_flip_multiscale():
    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(num_labels=7)).eval()
    processor = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 96})
    image = (np.random.default_rng(0).random((241, 317, 3)) * 255).astype(np.uint8)
    pixel_values = processor(image, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        logits = model(pixel_values).logits
    input_size = tuple(pixel_values.shape[-2:])
    input_logits = F.interpolate(logits, size=input_size, mode="bilinear", align_corners=False)[0]
    expected = reference_map(input_logits, (241, 317))
    assert_exact(processor.segment(model, image)[0].segmentation, expected, input_logits, (241, 317))
    assert_exact(model.predict(pixel_values, original_sizes=[(241, 317)])[0].segmentation, expected, input_logits, (241, 317))
    post = processor.post_process_semantic_segmentation(model(pixel_values), target_sizes=[(241, 317)])[0]
    assert_exact(post, expected, input_logits, (241, 317))
    # Slide mode: the windows' averaged logits, resized once.
    slide_logits = predict(model, pixel_values, mode="slide", window_size=64, window_stride=40, return_probabilities=True)
    slide = predict(model, pixel_values, original_sizes=[(241, 317)], mode="slide", window_size=64, window_stride=40)[0]
    from metaseg_hf.inference_metaseg import sliding_window_logits

    windows = sliding_window_logits(model, pixel_values, 64, 40)[0]
    assert slide_logits[0].probabilities.shape[0] == 7
    assert_exact(slide.segmentation, reference_map(windows, (241, 317)), windows, (241, 317))
    # Flip and multi-scale (averaged softmax): the band path, against the same computation in full.
    for options in ({"flip": True}, {"scales": (0.75, 1.25)}):
        prediction = segment(model, processor, image, probabilities_max="full", **options)[0]
        probabilities = segment(model, processor, image, return_probabilities=True, **options)[0].probabilities
        assert torch.equal(prediction.segmentation, probabilities.argmax(0))
        assert torch.allclose(prediction.probabilities_max, probabilities.max(0).values)


def test_probabilities_max_is_offered_on_request():
    torch.manual_seed(0)
    # Input-size logits are smooth (the network's stride-8 logits resized): as such, not as white noise.
    logits = F.interpolate(torch.randn(1, 5, 5, 6) * 3, size=(40, 48), mode="bilinear", align_corners=False)[0]
    size = (400, 480)
    full = F.interpolate(logits[None], size=size, mode="bilinear", align_corners=False)[0].softmax(0).max(0).values
    assert logits_to_prediction([logits], size).probabilities_max is None
    exact = logits_to_prediction([logits], size, probabilities_max="full").probabilities_max
    assert torch.allclose(exact, full, atol=1e-6)
    cheap = logits_to_prediction([logits], size, probabilities_max="input").probabilities_max
    at_input = logits.softmax(0).max(0).values
    expected = F.interpolate(at_input[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
    assert cheap.shape == size and torch.allclose(cheap, expected)
    assert abs(cheap.mean().item() - full.mean().item()) < 0.02
    with pytest.raises(ValueError, match=r"probabilities_max must be one of \(None, 'full', 'input'\), got 'all'"):
        logits_to_prediction([logits], size, probabilities_max="all")


def test_binary_model_thresholds_the_logit_at_zero():
    """num_labels=1 (trained with BCE): class 1 where the logit is above 0, the sigmoid as probability."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 12, 16)
    size = (96, 128)
    resized = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0, 0]
    expected = (resized > 0).long()
    assert 0.2 < expected.float().mean() < 0.8
    processor = MetaSegImageProcessor()
    post = processor.post_process_semantic_segmentation(logits, target_sizes=[size], input_sizes=[(96, 128)])[0]
    assert torch.equal(post, expected)
    scores = processor.post_process_semantic_segmentation(
        logits, target_sizes=[size], input_sizes=[(96, 128)], return_segmentation_scores=True
    )[0]
    assert torch.equal(scores["segmentation"], expected)
    probabilities = processor.post_process_semantic_probabilities(logits, target_sizes=[size], input_sizes=[(96, 128)])[0]
    assert torch.allclose(probabilities[0], resized.sigmoid())
    prediction = logits_to_prediction([logits[0]], size, probabilities_max="full")
    assert torch.equal(prediction.segmentation, expected)
    assert torch.allclose(prediction.probabilities_max, torch.where(resized > 0, resized.sigmoid(), 1 - resized.sigmoid()))
    # Through the model: predict and segment, with flip (mean sigmoid above 1/2).
    model = MetaSegForSemanticSegmentation(tiny_config(num_labels=1)).eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        model_logits = F.interpolate(model(pixel_values).logits, size=(64, 96), mode="bilinear", align_corners=False)[0]
    assert torch.equal(model.predict(pixel_values)[0].segmentation, (model_logits[0] > 0).long())
    flipped = predict(model, pixel_values, flip=True, return_probabilities=True)[0]
    assert torch.equal(flipped.segmentation, (flipped.probabilities[0] > 0.5).long())
    image = (np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)
    segmented = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 96}).segment(model, image)[0]
    assert segmented.segmentation.shape == (70, 90) and set(segmented.segmentation.unique().tolist()) <= {0, 1}


def test_segment_with_pad_size_does_not_stretch_the_canvas(tiny_model):
    image = (np.random.default_rng(2).random((70, 120, 3)) * 255).astype(np.uint8)
    plain = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 128})
    padded = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}, pad_size={"height": 128, "width": 160})
    assert padded(image, return_tensors="pt")["pixel_values"].shape[-2:] == (128, 160)
    expected = plain.segment(tiny_model, image)[0].segmentation
    assert torch.equal(padded.segment(tiny_model, image)[0].segmentation, expected)


def run_with_peak(script: str) -> tuple[int, int]:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], cwd=REPO_ROOT, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    before, after = result.stdout.strip().splitlines()[-1].split()
    return int(before), int(after)


def test_post_processing_a_batch_holds_one_image_at_a_time():
    """B=8: each image's input-size map is resized, reduced and freed before the next is made."""
    before, peak = run_with_peak(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        from helpers import peak_rss_mb, reset_peak_rss_mb
        from metaseg_hf import MetaSegImageProcessor
        processor = MetaSegImageProcessor()
        logits = torch.randn(8, 150, 32, 44)
        processor.post_process_semantic_segmentation(logits[:1], target_sizes=[(20, 30)], input_sizes=[(256, 352)])
        before = reset_peak_rss_mb()
        maps = processor.post_process_semantic_segmentation(
            logits, target_sizes=[(300, 400)] * 8, input_sizes=[(256, 352)] * 8
        )
        assert len(maps) == 8 and maps[0].shape == (300, 400)
        print(before, peak_rss_mb())
        """
    )
    # One (150, 256, 352) float32 input-size map is 54 MB; all eight at once would be 432 MB.
    assert peak - before < 250, f"post-processing 8 images took {peak - before} MB above the loaded process"


def test_12_megapixel_class_map_within_memory_bound():
    """A 4000x3000 photo's class map from 150-class logits at 512x704: at most 1 GB above the loaded process
    (the full resize would be 7.2 GB, the banded softmax of the earlier code 1.6 GB)."""
    before, peak = run_with_peak(
        """
        import sys, torch
        sys.path.insert(0, "tests")
        from helpers import peak_rss_mb, reset_peak_rss_mb
        from metaseg_hf import MetaSegImageProcessor
        torch.manual_seed(0)
        processor = MetaSegImageProcessor()
        logits = torch.randn(1, 150, 64, 88)
        processor.post_process_semantic_segmentation(logits, target_sizes=[(60, 80)], input_sizes=[(512, 704)])
        before = reset_peak_rss_mb()
        segmentation = processor.post_process_semantic_segmentation(
            logits, target_sizes=[(3000, 4000)], input_sizes=[(512, 704)]
        )[0]
        assert segmentation.shape == (3000, 4000)
        print(before, peak_rss_mb())
        """
    )
    assert peak - before < 1000, f"{peak - before} MB above the loaded process"
