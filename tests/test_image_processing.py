"""MetaSegImageProcessor: parity with the official test pipeline, inputs, labels, batches, saving, errors.

The tiny official photo (tests/fixtures/tiny) runs everywhere; the large reference photo comes through the
`reference` fixture (tests/conftest.py): those tests skip without it, or fail with METASEG_REQUIRE_REFERENCE=1.
"""

import io
import json
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from safetensors import safe_open
from safetensors.torch import load_file
from transformers.modeling_outputs import SemanticSegmenterOutput

from helpers import OFFICIAL_MEAN, OFFICIAL_STD, TINY_DIR, official_normalisation, sha256_of, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation
from metaseg_hf.image_processing_metaseg import LOGITS_STRIDE, MetaSegImageProcessor
from metaseg_hf.presets import DATASETS, IMAGE_MEAN, IMAGE_STD, VARIANTS, variant_image_processor_kwargs
from metaseg_hf.resize_opencv import opencv_linear_resize


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tensors here are small: one thread avoids OpenMP's slow hand-offs on a busy 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def processor():
    return MetaSegImageProcessor()


@pytest.fixture(scope="module")
def whole(reference):
    return load_file(str(reference / "metaseg-t-ade20k-whole.safetensors"))


@pytest.fixture(scope="module")
def photo(reference):
    with Image.open(reference / "metaseg-t-ade20k-image.png") as image:
        image.load()
        return image


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def pixels(processor, image, **kwargs):
    return processor(image, **kwargs)["pixel_values"]


# ------------------------------------------------------------------------------------------------
# Parity with the official pipeline
# ------------------------------------------------------------------------------------------------


def test_pixel_values_match_the_official_pipeline(processor, photo, whole):
    assert (photo.height, photo.width) == (375, 500)
    assert processor.get_resize_steps(375, 500) == [(512, 683), (512, 704)]
    pixel_values = processor(photo)["pixel_values"]
    reference = whole["pixel_values"]
    assert pixel_values.dtype == torch.float32
    assert pixel_values.shape == reference.shape == (1, 3, 512, 704)
    # Bit for bit the official float32 `(x - mean) / std` of the official uint8 image.
    assert torch.equal(pixel_values[0], official_normalisation(official_uint8(whole)))
    # The large reference file itself divided by the float64 std, where MMSegmentation's `Normalize` holds
    # float32 mean and std: one float32 rounding step apart on 10.6% of its values, never more.
    neighbours = torch.stack([torch.nextafter(reference, reference - 1), reference, torch.nextafter(reference, reference + 1)])
    assert (pixel_values == neighbours).any(dim=0).all()


def official_uint8(whole) -> torch.Tensor:
    """The official resized RGB uint8 image (H, W, 3), read back from the reference `pixel_values` (its values
    are (x - mean) / std of integers x within 1e-6, so rounding `value * std + mean` recovers x exactly)."""
    values = whole["pixel_values"][0] * OFFICIAL_STD + OFFICIAL_MEAN
    assert (values - values.round()).abs().max() < 1e-3
    return values.round().to(torch.uint8).permute(1, 2, 0)


def test_intermediate_uint8_resizes(photo, whole):
    """The two OpenCV resizes one by one: 375x500 -> 512x683 (uint8) -> 512x704 (uint8)."""
    rgb = torch.from_numpy(np.array(photo))
    first = opencv_linear_resize(rgb, 512, 683)
    second = opencv_linear_resize(first, 512, 704)
    assert first.shape == (512, 683, 3) and first.dtype == torch.uint8
    assert second.shape == (512, 704, 3) and second.dtype == torch.uint8
    assert torch.equal(second, official_uint8(whole))


def test_post_processing_matches_the_official_whole_mode(processor, whole):
    outputs = SemanticSegmenterOutput(logits=whole["logits"])
    assert whole["logits"].shape == (1, 150, 64, 88)
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(375, 500)])
    assert len(segmentation) == 1 and segmentation[0].shape == (375, 500) and segmentation[0].dtype == torch.int64
    agreement = (segmentation[0] == whole["segmentation"][0]).double().mean().item()
    assert agreement >= 0.995
    probabilities = processor.post_process_semantic_probabilities(outputs, target_sizes=[(375, 500)])[0]
    assert probabilities.shape == (150, 375, 500)
    assert (probabilities.max(dim=0).values - whole["probabilities_max"][0]).abs().max().item() <= 1e-4


def test_resizes_reproduce_the_official_uint8_pixels_of_the_tiny_photo():
    """The tiny official photo (tests/fixtures/tiny), 67x69 -> 512x527 -> 512x544, against the SHA-256 digests
    of the official uint8 images after each resize and every 8th pixel of the last one."""
    with Image.open(TINY_DIR / "tiny-photo.png") as image:
        rgb = torch.from_numpy(np.array(image.convert("RGB")))
    with safe_open(TINY_DIR / "tiny-photo-whole.safetensors", framework="pt") as file:
        metadata, every8 = file.metadata(), file.get_tensor("resized_rgb_uint8_every8")
    first = opencv_linear_resize(rgb, 512, 527)
    second = opencv_linear_resize(first, 512, 544)
    assert first.dtype == second.dtype == torch.uint8
    assert sha256_of(first) == metadata["first_resize_rgb_uint8_sha256"]
    assert torch.equal(second[::8, ::8], every8)
    assert sha256_of(second) == metadata["resized_rgb_uint8_sha256"]


def test_same_size_resize_is_a_copy_and_constant_images_stay_constant():
    image = torch.from_numpy(random_rgb(9, 11))
    assert torch.equal(opencv_linear_resize(image, 9, 11), image)
    constant = torch.full((17, 23, 3), 201, dtype=torch.uint8)
    assert torch.all(opencv_linear_resize(constant, 40, 9) == 201)


def test_defaults_are_the_ade20k_pipeline():
    processor = MetaSegImageProcessor()
    ade20k = variant_image_processor_kwargs("metaseg-t-ade20k")
    assert dict(processor.size) == ade20k["size"] == DATASETS["ade20k"]["size"]
    assert processor.size_divisor == ade20k["size_divisor"] == 32
    assert list(processor.image_mean) == list(IMAGE_MEAN) and list(processor.image_std) == list(IMAGE_STD)
    assert processor.do_rescale and processor.rescale_factor == 1 / 255 and processor.do_normalize
    # Documented decision: labels are not reduced unless asked (the ADE20K checkpoints save True).
    assert processor.do_reduce_labels is False and ade20k["do_reduce_labels"] is True


# ------------------------------------------------------------------------------------------------
# Sizes
# ------------------------------------------------------------------------------------------------


def test_keep_ratio_box_and_size_divisor(processor):
    assert processor.get_resize_steps(1000, 100) == [(2048, 205), (2048, 224)]  # long side limit: 2048/1000
    assert processor.get_resize_steps(100, 120) == [(512, 614), (512, 640)]
    assert processor.get_resize_steps(512, 704) == [(512, 704), (512, 704)]  # both steps are identities
    assert processor.get_resize_steps(375, 500, size_divisor=None) == [(512, 683)]
    assert processor.get_processed_size(375, 500, do_resize=False) == (375, 500)
    assert pixels(processor, random_rgb(30, 40), size_divisor=None).shape == (1, 3, 512, 683)
    assert pixels(processor, random_rgb(30, 40), do_resize=False).shape == (1, 3, 30, 40)


def test_fixed_size_mode_gives_exactly_that_size():
    processor = MetaSegImageProcessor(size={"height": 72, "width": 100})
    assert processor.size_divisor == 32  # not applied in fixed mode
    assert pixels(processor, random_rgb(50, 60)).shape == (1, 3, 72, 100)
    square = pixels(MetaSegImageProcessor(), random_rgb(50, 60), size={"height": 64, "width": 64})
    assert square.shape == (1, 3, 64, 64)


def test_rescale_and_normalize_switches():
    image = random_rgb(64, 64)
    raw = pixels(MetaSegImageProcessor(), image, do_resize=False, do_rescale=False, do_normalize=False)
    assert torch.equal(raw[0], torch.from_numpy(image).permute(2, 0, 1).float())
    rescaled = pixels(MetaSegImageProcessor(), image, do_resize=False, do_normalize=False)
    assert torch.allclose(rescaled, raw / 255)


def test_float_images_in_unit_range_are_already_rescaled():
    """Transformers' convention: with do_rescale=False a float image in [0, 1] is on the rescaled scale, so it
    gives the pixel_values of the same image in uint8 (not 255 times them); uint8 images are then normalised
    as 0-255 values. `segment()` with such a processor reads floats the same way."""
    image = random_rgb(64, 80)
    unit = image.astype(np.float32) / 255
    expected = pixels(MetaSegImageProcessor(), image)
    no_rescale = MetaSegImageProcessor(do_rescale=False)
    assert torch.equal(pixels(no_rescale, unit), expected)
    assert torch.equal(pixels(no_rescale, [unit, image])[0], expected[0])  # per image, in a mixed batch
    assert torch.equal(pixels(MetaSegImageProcessor(), unit), expected)
    assert pixels(no_rescale, image).max() > 100  # uint8, not rescaled: 0-255 values normalised
    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config()).eval()
    from_float = no_rescale.segment(model, unit, return_probabilities=True)[0]
    from_uint8 = MetaSegImageProcessor().segment(model, image, return_probabilities=True)[0]
    assert torch.equal(from_float.probabilities, from_uint8.probabilities)


# ------------------------------------------------------------------------------------------------
# Input kinds
# ------------------------------------------------------------------------------------------------


def test_array_and_tensor_layouts_and_dtypes_agree(processor):
    image = random_rgb(40, 56)
    expected = pixels(processor, Image.fromarray(image))
    chw = np.ascontiguousarray(image.transpose(2, 0, 1))
    variants = {
        "numpy HWC uint8": image,
        "numpy CHW uint8": chw,
        "numpy HWC float32": image.astype(np.float32) / 255,
        "numpy CHW float64": chw.astype(np.float64) / 255,
        "numpy HWC uint16": image.astype(np.uint16) << 8 | 0x5A,
        "numpy HWC int64": image.astype(np.int64),
        "torch CHW uint8": torch.from_numpy(chw),
        "torch HWC uint8": torch.from_numpy(image),
        "torch CHW float": torch.from_numpy(chw).float() / 255,
        "torch CHW bfloat16-safe float16": torch.from_numpy(chw).half() / 255,
        "read-only numpy": np.asarray(Image.fromarray(image)),
        "negative strides": np.ascontiguousarray(image[:, ::-1])[:, ::-1],
    }
    for name, value in variants.items():
        assert torch.equal(pixels(processor, value), expected), name


def test_explicit_layout_rgb_conversion_switch_and_positional_return_tensors(processor):
    chw = np.ascontiguousarray(random_rgb(60, 4, seed=12).transpose(2, 0, 1))  # (3, 60, 4): ambiguous
    expected = pixels(processor, chw.transpose(1, 2, 0), input_data_format="channels_last")
    assert torch.equal(pixels(processor, chw, input_data_format="channels_first"), expected)
    assert torch.equal(pixels(processor, torch.from_numpy(chw), input_data_format="channels_first"), expected)
    with pytest.raises(ValueError, match=r"has 1 channel\(s\), but the processor expects 3 .*do_convert_rgb=False"):
        processor(Image.fromarray(random_rgb(30, 40)[:, :, 0]), do_convert_rgb=False)
    with pytest.raises(ValueError, match=r"has 1 channel\(s\), but the processor expects 3 .*do_convert_rgb=False"):
        processor(random_rgb(30, 40)[:, :, :1], do_convert_rgb=False)
    rgb = random_rgb(30, 40)
    assert torch.equal(pixels(processor, rgb, do_convert_rgb=False), pixels(processor, rgb))
    assert isinstance(processor(random_rgb(30, 40), None, "np")["pixel_values"], np.ndarray)


def test_batches_as_lists_and_4d_tensors(processor):
    first, second = random_rgb(40, 56, seed=1), random_rgb(40, 56, seed=2)
    expected = torch.cat([pixels(processor, first), pixels(processor, second)])
    assert torch.equal(pixels(processor, [first, second]), expected)
    assert torch.equal(pixels(processor, (Image.fromarray(first), Image.fromarray(second))), expected)
    batch = torch.from_numpy(np.stack([first, second])).permute(0, 3, 1, 2)
    assert torch.equal(pixels(processor, batch), expected)


def test_grey_rgba_palette_sixteen_bit_and_cmyk_images(processor):
    rng = np.random.default_rng(3)
    grey = rng.integers(0, 256, (40, 56), dtype=np.uint8)
    grey_rgb = np.repeat(grey[:, :, None], 3, axis=2)
    expected_grey = pixels(processor, grey_rgb)
    assert torch.equal(pixels(processor, Image.fromarray(grey)), expected_grey)
    assert torch.equal(pixels(processor, grey), expected_grey)
    assert torch.equal(pixels(processor, grey[None]), expected_grey)

    # RGBA: the alpha channel is dropped, not composited (OpenCV's colour read).
    rgb = random_rgb(40, 56, seed=4)
    alpha = rng.integers(0, 256, (40, 56, 1), dtype=np.uint8)
    expected_rgb = pixels(processor, rgb)
    assert torch.equal(pixels(processor, Image.fromarray(np.concatenate([rgb, alpha], axis=2))), expected_rgb)
    assert torch.equal(pixels(processor, np.concatenate([rgb, alpha], axis=2)), expected_rgb)

    # Palette: the palette colours, also with transparency, without warnings.
    palette_image = Image.fromarray(rgb).quantize(colors=16)
    palette_colours = np.array(palette_image.convert("RGB"))
    palette_image.info["transparency"] = bytes([0] * 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        palette_pixels = pixels(processor, palette_image)
    assert torch.equal(palette_pixels, pixels(processor, palette_colours))

    # 16-bit grey keeps the high byte.
    sixteen = rng.integers(0, 65536, (40, 56), dtype=np.uint16)
    high_byte = np.repeat((sixteen >> 8).astype(np.uint8)[:, :, None], 3, axis=2)
    pil_sixteen = Image.fromarray(sixteen)
    assert pil_sixteen.mode.startswith("I;16")
    assert torch.equal(pixels(processor, pil_sixteen), pixels(processor, high_byte))
    assert torch.equal(pixels(processor, sixteen), pixels(processor, high_byte))
    assert torch.equal(pixels(processor, Image.fromarray(sixteen.astype(np.int32))), pixels(processor, high_byte))

    cmyk = Image.frombytes("CMYK", (56, 40), rng.integers(0, 256, (40, 56, 4), dtype=np.uint8).tobytes())
    assert torch.equal(pixels(processor, cmyk), pixels(processor, np.array(cmyk.convert("RGB"))))


def test_exif_orientation_and_paths(processor, tmp_path):
    rgb = random_rgb(40, 60, seed=5)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    Image.fromarray(rgb).save(path, exif=exif)
    upright = np.array(Image.fromarray(rgb).transpose(Image.Transpose.ROTATE_270))
    expected = pixels(processor, upright)
    assert expected.shape == (1, 3, 768, 512)  # 60x40 after rotation, not 40x60
    assert torch.equal(pixels(processor, str(path)), expected)
    assert torch.equal(pixels(processor, path), expected)
    with Image.open(path) as opened:
        assert torch.equal(pixels(processor, opened), expected)
        assert torch.equal(pixels(processor, ImageOps.exif_transpose(opened)), expected)


# ------------------------------------------------------------------------------------------------
# Segmentation maps
# ------------------------------------------------------------------------------------------------


def nearest_indices(source, target):
    return [min(int(math.floor(i * (1.0 / (target / source)))), source - 1) for i in range(target)]


def test_label_reduction_is_mmsegmentations():
    label = np.array([[0, 1, 2, 150], [254, 255, 0, 7]], dtype=np.uint8)
    image = random_rgb(2, 4)
    reduced = MetaSegImageProcessor(do_reduce_labels=True)(image, label, do_resize=False)["labels"]
    assert reduced.dtype == torch.int64 and reduced.shape == (1, 2, 4)
    assert reduced[0].tolist() == [[255, 0, 1, 149], [253, 255, 255, 6]]
    kept = MetaSegImageProcessor()(image, label, do_resize=False)["labels"]
    assert kept[0].tolist() == label.tolist()
    assert label.tolist() == [[0, 1, 2, 150], [254, 255, 0, 7]]  # the caller's map is untouched
    label_tensor = torch.from_numpy(label).long()
    MetaSegImageProcessor(do_reduce_labels=True)(image, label_tensor, do_resize=False)
    assert label_tensor.tolist() == label.tolist()


def test_labels_are_resized_with_nearest_neighbour_through_the_image_sizes():
    label = torch.arange(37 * 45, dtype=torch.int64).view(37, 45)  # every pixel distinct: shows the indices
    image = random_rgb(37, 45)
    labels = MetaSegImageProcessor(size={"height": 50, "width": 30})(image, label)["labels"][0]
    assert torch.equal(labels, label[nearest_indices(37, 50)][:, nearest_indices(45, 30)])

    processor = MetaSegImageProcessor()
    outputs = processor(image, label)
    steps = processor.get_resize_steps(37, 45)
    assert steps == [(512, 623), (512, 640)]
    expected = label
    for height, width in steps:
        expected = expected[nearest_indices(expected.shape[0], height)][:, nearest_indices(expected.shape[1], width)]
    assert outputs["labels"].shape == (1, 512, 640)
    assert outputs["pixel_values"].shape == (1, 3, 512, 640)
    assert torch.equal(outputs["labels"][0], expected)


def test_label_input_kinds(processor, tmp_path):
    rng = np.random.default_rng(6)
    label = rng.integers(0, 151, (40, 56), dtype=np.uint8)
    image = random_rgb(40, 56)
    expected = processor(image, label)["labels"]
    palette_label = Image.frombytes("P", (56, 40), label.tobytes())
    palette_label.putpalette(list(rng.integers(0, 256, 768, dtype=np.uint8)))
    path = tmp_path / "label.png"
    Image.fromarray(label).save(path)
    for name, value in {
        "PIL L": Image.fromarray(label),
        "PIL P (indices, not colours)": palette_label,
        "path": path,
        "numpy int32": label.astype(np.int32),
        "torch int64": torch.from_numpy(label).long(),
        "torch (1, H, W)": torch.from_numpy(label)[None],
        "float with integer values": label.astype(np.float32),
    }.items():
        assert torch.equal(processor(image, value)["labels"], expected), name


# ------------------------------------------------------------------------------------------------
# Mixed-size batches
# ------------------------------------------------------------------------------------------------


def test_mixed_size_batches_are_padded_bottom_right(processor):
    small, tall = random_rgb(30, 40, seed=7), random_rgb(45, 35, seed=8)
    small_label = np.full((30, 40), 3, dtype=np.uint8)
    tall_label = np.full((45, 35), 4, dtype=np.uint8)
    outputs = processor([small, tall], [small_label, tall_label], return_processed_sizes=True)
    assert outputs["processed_sizes"].tolist() == [[512, 704], [672, 512]]
    assert outputs["pixel_values"].shape == (2, 3, 672, 704)
    assert outputs["labels"].shape == (2, 672, 704)
    alone = processor(small, small_label)
    assert torch.equal(outputs["pixel_values"][0, :, :512, :704], alone["pixel_values"][0])
    assert torch.all(outputs["pixel_values"][0, :, 512:] == 0)
    assert torch.all(outputs["labels"][0, 512:] == 255) and torch.all(outputs["labels"][0, :512] == 3)
    assert torch.all(outputs["pixel_values"][1, :, :, 512:] == 0)
    assert torch.all(outputs["labels"][1, :, 512:] == 255) and torch.all(outputs["labels"][1, :, :512] == 4)

    fixed = processor([small, tall], do_pad=True, pad_size={"height": 704, "width": 736})
    assert fixed["pixel_values"].shape == (2, 3, 704, 736)
    unpadded = processor([small, tall], do_pad=False, return_tensors=None)
    assert [tuple(x.shape) for x in unpadded["pixel_values"]] == [(3, 512, 704), (3, 672, 512)]
    as_numpy = processor([small, tall], return_tensors="np")
    assert isinstance(as_numpy["pixel_values"], np.ndarray) and as_numpy["pixel_values"].shape == (2, 3, 672, 704)


def reference_post_processing(logits, padded, input_size, target):
    resized = F.interpolate(logits[None], size=padded, mode="bilinear", align_corners=False)
    resized = resized[:, :, : input_size[0], : input_size[1]]
    return F.interpolate(resized, size=target, mode="bilinear", align_corners=False)[0].argmax(dim=0)


def test_post_processing_of_a_padded_batch(processor):
    images = [random_rgb(30, 40, seed=9), random_rgb(45, 35, seed=10)]
    inputs = processor(images, return_processed_sizes=True)
    padded = tuple(inputs["pixel_values"].shape[-2:])
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 6, math.ceil(padded[0] / LOGITS_STRIDE), math.ceil(padded[1] / LOGITS_STRIDE), generator=generator)
    targets = [(30, 40), (45, 35)]
    maps = processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits), target_sizes=targets)
    for logit, processed, target, segmentation in zip(logits, inputs["processed_sizes"].tolist(), targets, maps):
        assert segmentation.shape == target and segmentation.dtype == torch.int64
        assert torch.equal(segmentation, reference_post_processing(logit, padded, processed, target))
    explicit = processor.post_process_semantic_segmentation(
        logits, target_sizes=torch.tensor(targets), input_sizes=inputs["processed_sizes"]
    )
    assert all(torch.equal(a, b) for a, b in zip(explicit, maps))
    probabilities = processor.post_process_semantic_probabilities(logits, target_sizes=targets)
    assert [tuple(p.shape) for p in probabilities] == [(6, 30, 40), (6, 45, 35)]
    assert torch.allclose(probabilities[1].sum(dim=0), torch.ones(45, 35))


def test_post_processing_without_target_sizes_and_full_resolution_logits(processor):
    logits = torch.randn(2, 4, 9, 11)
    maps = processor.post_process_semantic_segmentation(SemanticSegmenterOutput(logits=logits))
    assert all(torch.equal(m, logit.argmax(dim=0)) for m, logit in zip(maps, logits))
    full = torch.randn(1, 4, 512, 704)  # e.g. sliding-window logits at the input size
    segmentation = processor.post_process_semantic_segmentation(full, target_sizes=[(375, 500)])[0]
    expected = F.interpolate(full, size=(375, 500), mode="bilinear", align_corners=False)[0].argmax(dim=0)
    assert torch.equal(segmentation, expected)


def test_post_processing_of_half_precision_logits(processor):
    logits = torch.randn(1, 5, 64, 88).bfloat16()  # what a bf16 model returns through the pipeline
    half = processor.post_process_semantic_segmentation(logits, target_sizes=[(375, 500)])[0]
    full = processor.post_process_semantic_segmentation(logits.float(), target_sizes=[(375, 500)])[0]
    assert torch.equal(half, full)


def test_post_processing_refuses_logits_that_do_not_fit(processor):
    logits = torch.randn(1, 4, 32, 32)  # not the stride-8 map of 375x500's 512x704 input
    with pytest.raises(ValueError, match=r"logits are 32x32.*512x704.*input_sizes"):
        processor.post_process_semantic_segmentation(logits, target_sizes=[(375, 500)])
    with pytest.raises(ValueError, match="2 target sizes for a batch of 1"):
        processor.post_process_semantic_segmentation(logits, target_sizes=[(256, 256), (256, 256)])
    # With the real input size, the same logits are fine.
    segmentation = processor.post_process_semantic_segmentation(logits, [(100, 100)], input_sizes=[(256, 256)])[0]
    assert segmentation.shape == (100, 100)


def test_segmentation_scores_have_segformers_structure(processor):
    """`return_segmentation_scores=True` returns what SegFormer's processor returns: per image a
    `SemanticSegmentationPostProcessorOutput` with `segmentation` and `segmentation_scores` (the raw logits
    resized to the target size); the default stays a list of (H, W) int64 maps."""
    from transformers.image_processing_outputs import SemanticSegmentationPostProcessorOutput
    from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil

    images = [random_rgb(30, 40, seed=9), random_rgb(45, 35, seed=10)]
    padded = tuple(processor(images)["pixel_values"].shape[-2:])
    logits = torch.randn(2, 6, math.ceil(padded[0] / LOGITS_STRIDE), math.ceil(padded[1] / LOGITS_STRIDE), generator=torch.Generator().manual_seed(1))
    outputs = SemanticSegmenterOutput(logits=logits)
    targets = [(30, 40), (45, 35)]
    maps = processor.post_process_semantic_segmentation(outputs, targets)
    scored = processor.post_process_semantic_segmentation(outputs, targets, return_segmentation_scores=True)
    processed = [processor.get_processed_size(*target) for target in targets]
    for logit, size, target, segmentation, item in zip(logits, processed, targets, maps, scored):
        assert isinstance(item, SemanticSegmentationPostProcessorOutput)
        assert set(item.keys()) == {"segmentation", "segmentation_scores"}
        assert item.segmentation_scores.shape == (6, *target) and item.segmentation_scores.dtype == torch.float32
        input_size = F.interpolate(logit[None], size=padded, mode="bilinear", align_corners=False)
        expected = F.interpolate(input_size[:, :, : size[0], : size[1]], size=target, mode="bilinear", align_corners=False)
        torch.testing.assert_close(item["segmentation_scores"], expected[0], rtol=0, atol=1e-5)
        assert item.segmentation.dtype == torch.int64 and torch.equal(item.segmentation, segmentation)
        assert torch.equal(item.segmentation, item.segmentation_scores.argmax(dim=0))

    # SegFormer's own processor as the oracle, on logits at the network input size (no stride-8 resize).
    full = torch.randn(1, 6, 40, 56, generator=torch.Generator().manual_seed(2))
    segformer = SegformerImageProcessorPil().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=full), target_sizes=[(30, 41)], return_segmentation_scores=True
    )[0]
    ours = processor.post_process_semantic_segmentation(
        full, [(30, 41)], return_segmentation_scores=True, input_sizes=[(40, 56)]
    )[0]
    assert type(ours) is type(segformer) and set(ours.keys()) == set(segformer.keys())
    torch.testing.assert_close(ours.segmentation_scores, segformer.segmentation_scores, rtol=0, atol=1e-5)
    assert torch.equal(ours.segmentation, segformer.segmentation)
    native = processor.post_process_semantic_segmentation(full, return_segmentation_scores=True)[0]
    native_segformer = SegformerImageProcessorPil().post_process_semantic_segmentation(
        SemanticSegmenterOutput(logits=full), return_segmentation_scores=True
    )[0]
    assert torch.equal(native.segmentation_scores, native_segformer.segmentation_scores)
    assert torch.equal(native.segmentation, native_segformer.segmentation)


def test_only_semantic_post_processing_for_the_pipeline(processor):
    assert hasattr(processor, "post_process_semantic_segmentation")
    assert not hasattr(processor, "post_process_panoptic_segmentation")
    assert not hasattr(processor, "post_process_instance_segmentation")


def test_pipeline_with_a_tiny_model(processor):
    """`pipeline("image-segmentation")` passes only `target_sizes`; the input size is recomputed from it."""
    from transformers import pipeline

    from metaseg_hf import MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    config = tiny_config()
    model = MetaSegForSemanticSegmentation(config).eval()
    small = MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256})
    image = Image.fromarray(random_rgb(60, 90, seed=11))
    segmenter = pipeline("image-segmentation", model=model, image_processor=small)
    results = segmenter(image)
    with torch.no_grad():
        logits = model(**small(image)).logits
    expected = small.post_process_semantic_segmentation(logits, target_sizes=[(60, 90)])[0]
    assert {result["label"] for result in results} == {config.id2label[c] for c in expected.unique().tolist()}
    for result in results:
        assert result["mask"].size == (90, 60)
        class_id = config.label2id[result["label"]]
        assert np.array_equal(np.array(result["mask"]) > 0, (expected == class_id).numpy())


@pytest.mark.parametrize("num_channels", [1, 4])
def test_a_model_with_other_than_three_channels_through_its_processor(num_channels, tmp_path):
    """image_mean / image_std of length C and do_convert_rgb=False: images keep their own C channels,
    processor -> model -> post-processing works, and the settings survive save/load."""
    from helpers import tiny_config
    from metaseg_hf import MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(num_channels=num_channels)).eval()
    processor = MetaSegImageProcessor(
        size={"shortest_edge": 64, "longest_edge": 256},
        image_mean=[0.5] * num_channels,
        image_std=[0.25] * num_channels,
        do_convert_rgb=False,
    )
    assert processor.num_channels == num_channels
    array = np.random.default_rng(num_channels).integers(0, 256, (60, 90, num_channels), dtype=np.uint8)
    image = Image.fromarray(array[:, :, 0] if num_channels == 1 else array, mode="L" if num_channels == 1 else "RGBA")
    inputs = processor(image)
    assert inputs["pixel_values"].shape == (1, num_channels, 64, 96)
    # Every channel goes through the same OpenCV resize and its own normalisation.
    resized = opencv_linear_resize(torch.from_numpy(array), 64, 96).permute(2, 0, 1).float()
    torch.testing.assert_close(inputs["pixel_values"][0], (resized / 255 - 0.5) / 0.25, rtol=0, atol=1e-5)
    assert torch.equal(processor(array)["pixel_values"], inputs["pixel_values"])
    with torch.no_grad():
        outputs = model(**inputs)
    segmentation = processor.post_process_semantic_segmentation(outputs, target_sizes=[(60, 90)])[0]
    assert segmentation.shape == (60, 90) and segmentation.dtype == torch.int64
    prediction = processor.segment(model, image)[0]
    assert torch.equal(prediction.segmentation, segmentation)

    processor.save_pretrained(tmp_path)
    loaded = MetaSegImageProcessor.from_pretrained(tmp_path)
    assert loaded.num_channels == num_channels and loaded.do_convert_rgb is False
    assert torch.equal(loaded(image)["pixel_values"], inputs["pixel_values"])

    # An RGB tensor given straight to a C-channel model: the fix named is C channels, not "convert to RGB".
    with pytest.raises(ValueError, match=rf"expects num_channels={num_channels}; give {num_channels}-channel images") as error:
        model(torch.randn(1, 3, 64, 64))
    assert "RGB" not in str(error.value) and "do_convert_rgb=False" in str(error.value)

    wrong = random_rgb(60, 90)  # 3 channels for a C-channel processor
    with pytest.raises(ValueError, match=rf"has 3 channel\(s\), but the processor expects {num_channels} "):
        processor(wrong)
    with pytest.raises(ValueError, match=rf"describe {num_channels}-channel images, but do_convert_rgb=True"):
        MetaSegImageProcessor(image_mean=[0.5] * num_channels, image_std=[0.25] * num_channels)
    with pytest.raises(ValueError, match=r"one value per image channel, the same number in both"):
        MetaSegImageProcessor(image_mean=[0.5] * num_channels, image_std=[0.25, 0.25], do_convert_rgb=False)


# ------------------------------------------------------------------------------------------------
# Saving and loading
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_variant_settings_round_trip(variant, tmp_path):
    kwargs = variant_image_processor_kwargs(variant)
    processor = MetaSegImageProcessor(**kwargs)
    processor.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert saved["size_divisor"] == kwargs["size_divisor"]  # Cityscapes' None is written as null
    assert saved["do_reduce_labels"] == kwargs["do_reduce_labels"]
    loaded = MetaSegImageProcessor.from_pretrained(tmp_path)
    for key, value in kwargs.items():
        loaded_value = getattr(loaded, key)
        if key == "size":
            loaded_value = dict(loaded_value)
        elif key in ("image_mean", "image_std"):
            loaded_value = list(loaded_value)
        assert loaded_value == value, key
    assert loaded.to_dict() == processor.to_dict()
    assert loaded.get_resize_steps(375, 500) == processor.get_resize_steps(375, 500)
    image = random_rgb(20, 30)
    assert torch.equal(pixels(loaded, image), pixels(processor, image))


def test_cityscapes_has_no_size_divisor_step(tmp_path):
    processor = MetaSegImageProcessor(**variant_image_processor_kwargs("metaseg-t-cityscapes"))
    assert processor.size_divisor is None
    assert processor.get_resize_steps(375, 500) == [(1024, 1365)]
    assert MetaSegImageProcessor.from_pretrained(_saved(processor, tmp_path)).size_divisor is None
    ade20k_folder = _saved(MetaSegImageProcessor(), tmp_path / "ade20k")
    assert MetaSegImageProcessor.from_pretrained(ade20k_folder, size_divisor=None).size_divisor is None


def _saved(processor, folder):
    processor.save_pretrained(folder)
    return folder


def test_non_base_kwargs_are_declared():
    annotations = MetaSegImageProcessor.valid_kwargs.__annotations__
    assert {"size_divisor", "do_reduce_labels"} <= set(annotations)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_bad_images_raise_clear_errors(processor, tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not an image")
    cases = [
        (None, TypeError, r"`images` is None; expected a PIL image"),
        ([], ValueError, r"`images` is an empty list"),
        (str(text_file), ValueError, r"notes\.txt', which is not a readable image file"),
        (str(tmp_path / "missing.png"), ValueError, r"missing\.png', which does not exist"),
        ("https://example.com/cat.png", ValueError, r"does not download images"),
        (np.zeros((0, 10, 3), dtype=np.uint8), ValueError, r"`images` is empty \(numpy array of shape \(0, 10, 3\)"),
        (np.zeros((10, 12, 5), dtype=np.uint8), ValueError, r"has 10 channels first and 5 last; expected .*C = 1 \("),
        (np.zeros((2, 10, 12), dtype=np.uint8), ValueError, r"has 2 channels first and 12 last"),
        (np.zeros((3, 10, 4), dtype=np.uint8), ValueError, r"could be channels-first or channels-last; pass input"),
        (np.full((10, 12, 3), 2.0, dtype=np.float32), ValueError, r"in \[2\.0, 2\.0\]; expected values in \[0, 1\]"),
        (np.full((10, 12, 3), 300, dtype=np.int32), ValueError, r"int32 image with values in \[300, 300\]; expected"),
        (np.zeros((10, 12, 3), dtype=bool), TypeError, r"has dtype bool; expected uint8"),
        ([[random_rgb(10, 12)]], TypeError, r"`images\[0\]` is a nested list"),
        (3.5, TypeError, r"`images` is a float 3\.5; expected a PIL image"),
        (torch.zeros(1, 2, 3, 4, 5), ValueError, r"torch tensor of shape \(1, 2, 3, 4, 5\).*expected \(H, W\)"),
    ]
    for value, error, message in cases:
        with pytest.raises(error, match=message):
            processor(value)
    with pytest.raises(ValueError, match=r"`images\[1\]` is empty"):
        processor([random_rgb(10, 12), np.zeros((10, 0, 3), dtype=np.uint8)])


def test_bad_segmentation_maps_raise_clear_errors(processor):
    image = random_rgb(10, 12)
    with pytest.raises(ValueError, match=r"`segmentation_maps` is 10x11 but its image is 10x12"):
        processor(image, np.zeros((10, 11), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mode 'RGB'.*expected a single-channel map of class indices"):
        processor(image, Image.fromarray(random_rgb(10, 12)))
    with pytest.raises(ValueError, match=r"Got 2 images but 1 segmentation maps"):
        processor([image, image], [np.zeros((10, 12), dtype=np.uint8)])
    with pytest.raises(ValueError, match=r"holds non-integer values"):
        processor(image, np.full((10, 12), 0.5, dtype=np.float32))
    with pytest.raises(TypeError, match=r"`segmentation_maps` is a int 7; expected a single-channel map"):
        processor(image, 7)


def test_unsupported_settings_raise_clear_errors(processor):
    image = random_rgb(10, 12)
    with pytest.raises(ValueError, match=r"resample=.* only PILImageResampling\.BILINEAR"):
        MetaSegImageProcessor(resample=Image.Resampling.NEAREST)
    with pytest.raises(ValueError, match=r"size=\{'max_height': 5, 'max_width': 5\} is not supported"):
        MetaSegImageProcessor(size={"max_height": 5, "max_width": 5})
    with pytest.raises(ValueError, match=r"size_divisor=0 must be a positive integer or None"):
        processor(image, size_divisor=0)
    with pytest.raises(ValueError, match=r"different sizes \[\(512, 640\), \(640, 512\)\] and do_pad=False"):
        processor([random_rgb(10, 12), random_rgb(12, 10)], do_pad=False)
    with pytest.raises(ValueError, match=r"return_tensors='tf' is not supported"):
        processor(image, return_tensors="tf")
    with pytest.raises(ValueError, match=r"pad_size=.* is smaller than processed image size"):
        processor(image, pad_size={"height": 64, "width": 64})
    with pytest.raises(ValueError, match=r"aspect ratio is too extreme"):
        processor(np.zeros((1, 5000, 3), dtype=np.uint8), input_data_format="channels_last")


def test_legacy_reduce_labels_key_is_refused_by_name(tmp_path):
    """A Transformers 4 `reduce_labels` key would otherwise be kept as an unused attribute (labels unreduced)."""
    with pytest.raises(ValueError, match=r"`reduce_labels=True`.*`do_reduce_labels`"):
        MetaSegImageProcessor(reduce_labels=True)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "MetaSegImageProcessor", "reduce_labels": True}))
    with pytest.raises(ValueError, match="do_reduce_labels"):
        MetaSegImageProcessor.from_pretrained(tmp_path)


def test_exif_transpose_turns_an_image_once():
    from metaseg_hf.image_io import exif_transpose

    image = Image.fromarray(np.arange(8, dtype=np.uint8).reshape(2, 4))
    exif = image.getexif()
    exif[0x0112] = 6  # rotated 90 degrees clockwise
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", exif=exif)
    opened = Image.open(buffer)
    upright = exif_transpose(opened)
    assert upright.size == (2, 4)
    assert np.array_equal(np.asarray(exif_transpose(upright)), np.asarray(upright))
