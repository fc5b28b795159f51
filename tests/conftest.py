"""Shared fixtures, and the `reference` marker: tests that need the large official reference data.

A test that uses the `reference` fixture (directly or through `converted_dir` / `reference_model`), or is
marked `@pytest.mark.reference`, needs `$METASEG_REFERENCE_DIR` (else `../shared/reference` next to the
repository). Without it such tests skip with one reason; with METASEG_REQUIRE_REFERENCE=1 (as in CI) they
fail naming the missing files. Shared helpers are in helpers.py.
"""

import os

# The Triton kernels (metaseg_hf.ops_metaseg) run on CPU tensors under Triton's interpreter. Triton reads
# this when it decorates functions, its own standard library included, so it must be set before anything
# imports triton (torch.onnx and torch.compile do): here, before any test module is collected.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from helpers import TINY_DIR, missing_reference_files, reference_dir, tiny_config  # noqa: E402

REQUIRE_REFERENCE = "METASEG_REQUIRE_REFERENCE"


def reference_required() -> bool:
    return os.environ.get(REQUIRE_REFERENCE, "").strip().lower() not in ("", "0", "false", "no")


def skip_reason(path) -> str:
    return (
        f"needs the large official MetaSeg reference data, not found in {path}: put that folder at "
        "../shared/reference next to the repository or set METASEG_REFERENCE_DIR to it "
        f"({REQUIRE_REFERENCE}=1 turns this skip into a failure)"
    )


def check_reference():
    """Skips (or, with METASEG_REQUIRE_REFERENCE=1, fails) the current test when the data is missing."""
    path = reference_dir()
    missing = missing_reference_files(path)
    if not missing:
        return path
    if reference_required():
        pytest.fail(
            f"{REQUIRE_REFERENCE}=1 but the official reference data is missing in {path}: {', '.join(missing)}. "
            "Set METASEG_REFERENCE_DIR to the folder holding the official MetaSeg reference outputs, or unset "
            f"{REQUIRE_REFERENCE} to skip these tests.",
            pytrace=False,
        )
    pytest.skip(skip_reason(path))


def pytest_collection_modifyitems(config, items):
    """Marks every test that needs the large reference; skips them up front when it is absent."""
    needs_reference = [
        item for item in items
        if "reference" in getattr(item, "fixturenames", ()) or item.get_closest_marker("reference") is not None
    ]
    path = reference_dir()
    skip = None
    if missing_reference_files(path) and not reference_required():
        skip = pytest.mark.skip(reason=skip_reason(path))
    for item in needs_reference:
        if item.get_closest_marker("reference") is None:
            item.add_marker(pytest.mark.reference)
        if skip is not None:
            item.add_marker(skip)


def pytest_runtest_setup(item):
    # Marked tests that reach the folder without the fixture (e.g. in a subprocess) fail here, not obscurely.
    if item.get_closest_marker("reference") is not None:
        check_reference()


@pytest.fixture(scope="session")
def reference():
    """Path of the large reference data (tests using it are marked `reference`, see the module docstring)."""
    return check_reference()


@pytest.fixture(scope="session")
def converted_dir(reference, tmp_path_factory):
    """The reference checkpoint converted with the conversion script's library function."""
    from metaseg_hf.conversion import convert_checkpoint

    output = tmp_path_factory.mktemp("converted") / "metaseg-t-ade20k-random"
    convert_checkpoint(reference / "metaseg-t-ade20k-random.pth", output, log=lambda message: None)
    return output


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny official checkpoint (tests/fixtures/tiny: 7 classes, no preset architecture) converted by the
    library; runs on a fresh clone."""
    from metaseg_hf.conversion import convert_checkpoint

    output = tmp_path_factory.mktemp("tiny") / "metaseg-tiny"
    convert_checkpoint(TINY_DIR / "metaseg-tiny-random.pth", output, log=lambda message: None)
    return output


@pytest.fixture(scope="session")
def reference_model(converted_dir):
    from metaseg_hf import MetaSegForSemanticSegmentation

    return MetaSegForSemanticSegmentation.from_pretrained(converted_dir).eval()


@pytest.fixture
def tiny_model():
    from metaseg_hf import MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    return MetaSegForSemanticSegmentation(tiny_config()).eval()
