"""Shared fixtures: the official reference data, a converted reference model, tiny configurations."""

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_FILES = (
    "metaseg-t-ade20k-random.pth",
    "metaseg-t-ade20k-batch.safetensors",
    "metaseg-t-ade20k-batch-float64.safetensors",
    "metaseg-t-ade20k-image.png",
    "metaseg-t-ade20k-whole.safetensors",
    "metaseg-t-ade20k-slide.safetensors",
)


def reference_dir() -> Path:
    """`$METASEG_REFERENCE_DIR`, else `../shared/reference` next to the repository."""
    return Path(os.environ.get("METASEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference")).resolve()


@pytest.fixture(scope="session")
def reference():
    """Path of the reference data; fails (never skips) when it is missing."""
    path = reference_dir()
    missing = [name for name in REFERENCE_FILES if not (path / name).is_file()]
    if missing:
        pytest.fail(
            f"Reference data missing in {path}: {', '.join(missing)}. Set METASEG_REFERENCE_DIR to the folder "
            "holding the official MetaSeg reference outputs.",
            pytrace=False,
        )
    return path


@pytest.fixture(scope="session")
def converted_dir(reference, tmp_path_factory):
    """The reference checkpoint converted with the conversion script's library function."""
    from metaseg_hf.conversion import convert_checkpoint

    output = tmp_path_factory.mktemp("converted") / "metaseg-t-ade20k-random"
    convert_checkpoint(reference / "metaseg-t-ade20k-random.pth", output, log=lambda message: None)
    return output


@pytest.fixture(scope="session")
def reference_model(converted_dir):
    from metaseg_hf import MetaSegForSemanticSegmentation

    return MetaSegForSemanticSegmentation.from_pretrained(converted_dir).eval()


def tiny_config(**overrides):
    """A MetaSeg small enough for fast tests (minimum input side 57 as the official decoder)."""
    from metaseg_hf import MetaSegConfig

    kwargs = dict(
        hidden_sizes=[8, 16, 16, 32],
        depths=[1, 1, 1, 1],
        mlp_ratios=[2, 2, 2, 2],
        decoder_hidden_size=16,
        num_labels=5,
    )
    kwargs.update(overrides)
    return MetaSegConfig(**kwargs)


@pytest.fixture
def tiny_model():
    from metaseg_hf import MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    return MetaSegForSemanticSegmentation(tiny_config()).eval()
