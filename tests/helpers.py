"""Helpers shared by the tests (imported as `from helpers import ...`; the fixtures live in conftest.py).

Where the test data is:
- `FIXTURES / "tiny"`: the tiny official reference (under 1 MB, committed): a non-preset MetaSeg checkpoint,
  its float32 and float64 outputs, a photo through the official test pipeline. Runs on every clone.
- `FIXTURES / "manifests"`: the six official variants' settings and state-dict shapes (committed).
- `reference_dir()`: the large official reference (MetaSeg-T / ADE20K), not in the repository:
  `$METASEG_REFERENCE_DIR`, else `../shared/reference` next to the repository. Tests that need it carry
  the `reference` marker (set in conftest.py) and skip without it, or fail with METASEG_REQUIRE_REFERENCE=1.
"""

import hashlib
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TINY_DIR = FIXTURES / "tiny"
MANIFESTS_DIR = FIXTURES / "manifests"

# The files of the large reference that the tests read.
REFERENCE_FILES = (
    "metaseg-t-ade20k-random.pth",
    "metaseg-t-ade20k-batch.safetensors",
    "metaseg-t-ade20k-batch-float64.safetensors",
    "metaseg-t-ade20k-image.png",
    "metaseg-t-ade20k-whole.safetensors",
    "metaseg-t-ade20k-slide.safetensors",
)
# The official 0-255 normalisation (ImageNet statistics), as MMSegmentation's `Normalize` holds them: float32.
OFFICIAL_MEAN = torch.tensor([123.675, 116.28, 103.53], dtype=torch.float32).view(3, 1, 1)
OFFICIAL_STD = torch.tensor([58.395, 57.12, 57.375], dtype=torch.float32).view(3, 1, 1)


def reference_dir() -> Path:
    """`$METASEG_REFERENCE_DIR`, else `../shared/reference` next to the repository."""
    return Path(os.environ.get("METASEG_REFERENCE_DIR", REPO_ROOT.parent / "shared" / "reference")).resolve()


def missing_reference_files(path: Path | None = None) -> list:
    """The names in REFERENCE_FILES that are not files in `path` (default: `reference_dir()`)."""
    path = reference_dir() if path is None else path
    return [name for name in REFERENCE_FILES if not (path / name).is_file()]


def official_normalisation(rgb_uint8: torch.Tensor) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 `(x - mean) / std` with the official float32 constants."""
    return (rgb_uint8.permute(2, 0, 1).float() - OFFICIAL_MEAN) / OFFICIAL_STD


def sha256_of(array) -> str:
    """SHA-256 of a tensor's or array's bytes in C order (how the reference digests were taken)."""
    if isinstance(array, torch.Tensor):
        array = array.contiguous().numpy()
    return hashlib.sha256(array.tobytes(order="C")).hexdigest()


STAGE_KEYS = [f"hidden_states.{index}" for index in range(4)]
ATTENTION_KEYS = [f"decoder_attentions.stage{stage}" for stage in (2, 3, 4)]


def _status_mb(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key)) // 1024


def peak_rss_mb() -> int:
    """This process's peak resident memory in MB: Linux's VmHWM, which starts afresh at exec. (`ru_maxrss`
    would not: Linux carries it across exec, so a child of a large pytest process reports pytest's RSS.)"""
    return _status_mb("VmHWM:")


def reset_peak_rss_mb() -> int:
    """Resets VmHWM to the current resident memory and returns that, in MB: `peak_rss_mb()` minus it is then
    the peak of what runs next above the loaded process (not hidden below an earlier, higher peak)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    return _status_mb("VmRSS:")


def run_reference_batch(model, batch, dtype):
    """The model's outputs on a reference batch, keyed as in the reference files (model already in `dtype`)."""
    with torch.no_grad():
        outputs = model(
            batch["pixel_values"].to(dtype), labels=batch["labels"], output_hidden_states=True, output_attentions=True
        )
    results = {"logits": outputs.logits, "loss": outputs.loss}
    results.update(zip(STAGE_KEYS, outputs.hidden_states, strict=True))
    results.update(zip(ATTENTION_KEYS, outputs.attentions, strict=True))
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
