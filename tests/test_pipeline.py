"""pipeline("image-segmentation") in the three loading modes, with bf16 weights, without prompts."""

import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers import pipeline

from helpers import BLOCK_METASEG_HF, REPO_ROOT, TINY_DIR, make_hub_cache, run_python

# Reconstructs the class map from the pipeline's per-class masks (used inside subprocesses too).
CLASS_MAP_FROM_SEGMENTS = textwrap.dedent(
    """
    import numpy as np
    def class_map(segments, label2id, size):
        result = np.full(size, -1, dtype=np.int64)
        for segment in segments:
            assert segment["score"] is None and segment["mask"].mode == "L"
            mask = np.array(segment["mask"]) == 255
            assert not (result[mask] >= 0).any(), "masks overlap"
            result[mask] = label2id[segment["label"]]
        assert (result >= 0).all(), "masks leave pixels uncovered"
        return result
    """
)
# Makes torchvision look importable to Transformers' choice of image-processor backend, so AutoImageProcessor and
# pipeline() ask for the "torchvision" backend as on most users' machines (pip's torchvision wheels do not load
# beside the CPU build of torch used here, so it cannot simply be installed).
TORCHVISION_LOOKS_INSTALLED = textwrap.dedent(
    """
    from transformers.models.auto import image_processing_auto
    image_processing_auto.is_torchvision_available = lambda: True
    """
)
namespace = {}
exec(CLASS_MAP_FROM_SEGMENTS, namespace)
class_map = namespace["class_map"]


@pytest.fixture(scope="module")
def photo(reference):
    return Image.open(reference / "metaseg-t-ade20k-image.png").convert("RGB")


@pytest.fixture(scope="module")
def official(reference):
    return load_file(reference / "metaseg-t-ade20k-whole.safetensors")["segmentation"][0].numpy()


def test_pipeline_on_a_converted_folder_gives_the_official_prediction(converted_dir, photo, official):
    segmenter = pipeline("image-segmentation", model=str(converted_dir))
    segments = segmenter(photo)
    label2id = {name: index for index, name in segmenter.model.config.id2label.items()}
    assert all(segment["mask"].size == (500, 375) for segment in segments)
    assert len({segment["label"] for segment in segments}) == len(segments)
    predicted = class_map(segments, label2id, (375, 500))
    assert (predicted == official).mean() >= 0.995


def test_pipeline_with_bfloat16_weights_agrees_with_float32(photo, tmp_path):
    """bf16 weights give the float32 class map on nearly every pixel, not only a map of the right shape.
    A MetaSeg-T with the library's initialisation: the reference checkpoint's random weights amplify any
    perturbation (float32 vs float64 already differ by 5e-4; bf16 logits by 30%), so they cannot show it."""
    from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation, MetaSegImageProcessor

    torch.manual_seed(0)
    MetaSegForSemanticSegmentation(MetaSegConfig.from_preset("metaseg-t-ade20k")).save_pretrained(tmp_path)
    MetaSegImageProcessor().save_pretrained(tmp_path)
    maps = []
    for dtype in (torch.float32, torch.bfloat16):
        segmenter = pipeline("image-segmentation", model=str(tmp_path), dtype=dtype)
        assert segmenter.model.dtype == dtype
        label2id = {name: index for index, name in segmenter.model.config.id2label.items()}
        maps.append(class_map(segmenter(photo), label2id, (375, 500)))
    assert len(np.unique(maps[0])) > 10  # a map with many classes, not a constant one
    assert (maps[1] == maps[0]).mean() >= 0.97


def test_pipeline_from_an_offline_hub_cache_without_prompts(converted_dir, reference, tmp_path):
    cache = make_hub_cache(tmp_path / "hub", "metaseg/metaseg-t-ade20k-random", converted_dir)
    script = CLASS_MAP_FROM_SEGMENTS + textwrap.dedent(
        f"""
        import metaseg_hf
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model="metaseg/metaseg-t-ade20k-random")
        segments = segmenter(Image.open({str(reference / "metaseg-t-ade20k-image.png")!r}))
        label2id = {{name: index for index, name in segmenter.model.config.id2label.items()}}
        official = load_file({str(reference / "metaseg-t-ade20k-whole.safetensors")!r})["segmentation"][0].numpy()
        print("agreement", (class_map(segments, label2id, (375, 500)) == official).mean())
        """
    )
    result = run_python(script, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert float(result.stdout.split("agreement")[1]) >= 0.995
    output = result.stdout + result.stderr
    assert "Do you wish to run the custom code" not in output
    assert "is not supported for image-segmentation" not in output


def test_pipeline_with_trust_remote_code_where_metaseg_hf_is_missing(converted_dir, reference, tmp_path):
    script = BLOCK_METASEG_HF + CLASS_MAP_FROM_SEGMENTS + textwrap.dedent(
        f"""
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import pipeline
        segmenter = pipeline("image-segmentation", model={str(converted_dir)!r}, trust_remote_code=True)
        assert type(segmenter.model).__module__.startswith("transformers_modules")
        assert type(segmenter.image_processor).__module__.startswith("transformers_modules")
        segments = segmenter(Image.open({str(reference / "metaseg-t-ade20k-image.png")!r}))
        label2id = {{name: index for index, name in segmenter.model.config.id2label.items()}}
        official = load_file({str(reference / "metaseg-t-ade20k-whole.safetensors")!r})["segmentation"][0].numpy()
        print("agreement", (class_map(segments, label2id, (375, 500)) == official).mean())
        """
    )
    result = run_python(script, {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert float(result.stdout.split("agreement")[1]) >= 0.995


def test_pipeline_masks_cover_each_image_at_its_own_size(converted_dir):
    segmenter = pipeline("image-segmentation", model=str(converted_dir))
    images = [Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))
              for seed, (h, w) in enumerate([(90, 160), (300, 120)])]
    for image, segments in zip(images, segmenter(images)):
        assert all(segment["mask"].size == image.size for segment in segments)


@pytest.mark.parametrize("remote_code", [False, True], ids=["registered", "trust_remote_code"])
def test_no_backend_fallback_warning_where_torchvision_is_installed(tiny_dir, tmp_path, remote_code):
    """With torchvision importable, Transformers asks for the "torchvision" image-processor backend; MetaSeg's
    processor serves it (registered, and in the converted folder's auto_map), so loading is quiet and every
    backend gives the same, official, pixel_values and predictions."""
    from metaseg_hf import MetaSegImageProcessor

    with Image.open(TINY_DIR / "tiny-photo.png") as photo:
        expected = MetaSegImageProcessor.from_pretrained(tiny_dir)(photo)["pixel_values"]
    torch.save(expected, tmp_path / "expected.pt")
    script = (BLOCK_METASEG_HF if remote_code else "import metaseg_hf\n") + TORCHVISION_LOOKS_INSTALLED
    script += CLASS_MAP_FROM_SEGMENTS + textwrap.dedent(
        f"""
        import torch
        from PIL import Image
        from safetensors.torch import load_file
        from transformers import AutoImageProcessor, pipeline
        folder, kwargs = {str(tiny_dir)!r}, dict(trust_remote_code={remote_code})
        photo = Image.open({str(TINY_DIR / "tiny-photo.png")!r})
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        for backend in (None, "torchvision", "pil"):
            processor = AutoImageProcessor.from_pretrained(folder, backend=backend, **kwargs)
            assert type(processor).__name__ == "MetaSegImageProcessor", type(processor)
            assert type(processor).__module__.startswith("transformers_modules") == {remote_code}
            assert torch.equal(processor(photo)["pixel_values"], expected), backend
        segmenter = pipeline("image-segmentation", model=folder, **kwargs)
        segments = segmenter(photo)
        label2id = {{name: index for index, name in segmenter.model.config.id2label.items()}}
        official = load_file({str(TINY_DIR / "tiny-photo-whole.safetensors")!r})["segmentation"][0].numpy()
        print("agreement", (class_map(segments, label2id, official.shape) == official).mean())
        """
    )
    # PYTHONPATH: the package under test, wherever another copy is installed.
    environment = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": str(REPO_ROOT)}
    result = run_python(script, environment)
    assert float(result.stdout.split("agreement")[1]) >= 0.995
    output = result.stdout + result.stderr
    assert "backend is not available" not in output and "Falling back" not in output, output
