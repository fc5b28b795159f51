"""Shared fixtures: the official reference data, a converted reference model, tiny configurations."""

import os
import shutil
import subprocess
import sys
import textwrap
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


STAGE_KEYS = [f"hidden_states.{index}" for index in range(4)]
ATTENTION_KEYS = [f"decoder_attentions.stage{stage}" for stage in (2, 3, 4)]


def run_reference_batch(model, batch, dtype):
    """The model's outputs on a reference batch, keyed as in the reference files (model already in `dtype`)."""
    with torch.no_grad():
        outputs = model(
            batch["pixel_values"].to(dtype), labels=batch["labels"], output_hidden_states=True, output_attentions=True
        )
    results = {"logits": outputs.logits, "loss": outputs.loss}
    results.update(zip(STAGE_KEYS, outputs.hidden_states))
    results.update(zip(ATTENTION_KEYS, outputs.attentions))
    return results


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


# Prepended to subprocess scripts: makes `import metaseg_hf` fail as on a machine without the package.
BLOCK_METASEG_HF = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "metaseg_hf" or name.startswith("metaseg_hf."):
                raise ModuleNotFoundError("metaseg_hf is blocked in this test", name=name)
    sys.meta_path.insert(0, _Block())
    """
)


def run_python(script: str, env_overrides: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env.update(env_overrides or {})
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=cwd or REPO_ROOT.parent, timeout=300
    )
    assert result.returncode == 0, f"subprocess failed:\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


def make_hub_cache(cache, repo_id, folder, commit="0123456789abcdef0123456789abcdef01234567"):
    """Lays `folder` out as `huggingface_hub` caches a downloaded repository."""
    repo_dir = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo_dir / "snapshots" / commit)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return cache
