"""Transformers' own common test mixins, fetched for test_transformers_common.py (imported, not collected).

Transformers ships its model-test mixins (`tests/test_{modeling,configuration,backbone,image_processing}_common.py`)
in its source distribution, not in the wheel. `load_common_tests()` downloads the sdist of the *installed*
transformers version with pip (`pip download --no-deps --no-binary :all: transformers==X`), keeps those four
files in a cache outside the repository (`$METASEG_HF_CACHE`, default `~/.cache/metaseg-hf`, so later runs do
not download again) and imports them as the package `transformers_common_tests`. Nothing of Transformers' code
is committed here. The sdist holds only the top-level test files, not the helpers they import; those get
stand-ins below (`STAND_INS`): MetaSeg generates no text and has no export tests of Transformers' own.
"""

import importlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from pathlib import Path

import transformers

PACKAGE = "transformers_common_tests"
COMMON_FILES = tuple(
    f"test_{name}_common.py" for name in ("modeling", "configuration", "backbone", "image_processing")
)
# CI sets this (see .ci/run): the download being impossible is then a failure, not a skip.
REQUIRE_VARIABLE = "METASEG_REQUIRE_COMMON_TESTS"


class CommonTestsUnavailable(Exception):
    """The common test files cannot be had (no registry, a development version of transformers, ...)."""


def common_tests_required() -> bool:
    return os.environ.get(REQUIRE_VARIABLE, "").strip().lower() not in ("", "0", "false", "no")


def cache_dir() -> Path:
    return Path(os.environ.get("METASEG_HF_CACHE", Path.home() / ".cache" / "metaseg-hf"))


def fetch_common_tests(version: str = transformers.__version__, timeout: int = 300) -> Path:
    """The folder holding `COMMON_FILES` of transformers `version`, downloaded into the cache if not there yet."""
    folder = cache_dir() / f"transformers-{version}-tests"
    if all((folder / name).is_file() for name in (*COMMON_FILES, "__init__.py")):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder.parent) as scratch:
        command = [
            sys.executable, "-m", "pip", "download", "--quiet", "--retries", "2", "--no-deps", "--no-binary", ":all:",
            "--dest", scratch, f"transformers=={version}",
        ]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except (OSError, subprocess.TimeoutExpired) as error:
            raise CommonTestsUnavailable(f"`{' '.join(command[2:])}` did not finish: {error}") from error
        archives = sorted(Path(scratch).glob("transformers-*.tar.gz"))
        if result.returncode != 0 or not archives:
            output = (result.stderr or result.stdout).strip().splitlines()[-3:]
            raise CommonTestsUnavailable(
                f"the sdist of transformers {version} could not be downloaded from the package registry "
                f"(`{' '.join(command[2:])}` exited {result.returncode}: {' | '.join(output)})"
            )
        unpacked = Path(scratch) / "tests"
        unpacked.mkdir()
        with tarfile.open(archives[0]) as archive:
            members = {Path(member.name).name: member for member in archive.getmembers()
                       if Path(member.name).parent.name == "tests" and Path(member.name).name in COMMON_FILES}
            missing = sorted(set(COMMON_FILES) - set(members))
            if missing:
                raise CommonTestsUnavailable(f"the sdist of transformers {version} has no tests/{', tests/'.join(missing)}")
            for name, member in members.items():
                (unpacked / name).write_bytes(archive.extractfile(member).read())
        # Transformers' tests/__init__.py is empty, and not in the sdist; test_configuration_common.py runs it.
        (unpacked / "__init__.py").write_text("")
        shutil.rmtree(folder, ignore_errors=True)
        unpacked.rename(folder)  # complete or absent: a killed run leaves no half-filled cache
    return folder


def _stand_in(name: str, **attributes) -> None:
    module = types.ModuleType(f"{PACKAGE}.{name}")
    module.__dict__.update(attributes)
    sys.modules[module.__name__] = module


# Common keyword arguments of every config with values other than their defaults, for ConfigTester's
# `check_config_arguments_init` (Transformers keeps its list in tests/utils/test_configuration_utils.py, which the
# sdist does not ship). Only arguments that Transformers 5's `PreTrainedConfig` still takes.
CONFIG_COMMON_KWARGS = {
    "return_dict": False,
    "output_hidden_states": True,
    "output_attentions": True,
    "dtype": "float16",
    "chunk_size_feed_forward": 5,
    "architectures": ["BertModel"],
    "id2label": {0: "label"},
    "label2id": {"label": "0"},
    "problem_type": "regression",
}

STAND_INS = {
    # Mixed into ModelTesterMixin: Transformers' torch.export tests, in tests/exporters (not in the sdist).
    "exporters.test_export": {"ExportTesterMixin": type("ExportTesterMixin", (), {})},
    # Text generation tests, for generative models only (ModelTesterMixin checks that none is mixed in).
    "generation.test_utils": {"GenerationTesterMixin": type("GenerationTesterMixin", (), {})},
    "utils.test_configuration_utils": {"config_common_kwargs": CONFIG_COMMON_KWARGS},
}


# Transformers' CI fetches its test images from the Hub beforehand (utils/fetch_hub_objects_for_ci.py, not in
# the sdist); tests here download nothing, so every test image is the repository's own photo.
TEST_PHOTO = Path(__file__).resolve().parent / "fixtures" / "tiny" / "tiny-photo.png"


def _local_test_image(url: str) -> str:
    return str(TEST_PHOTO)


def load_common_tests() -> types.SimpleNamespace:
    """Fetches (or finds in the cache) and imports the common test modules: `.modeling`, `.configuration`,
    `.backbone`, `.image_processing`. Raises `CommonTestsUnavailable` with the reason when impossible."""
    try:
        import parameterized  # noqa: F401  (the common tests' own test dependency; in the [dev] extra)
    except ModuleNotFoundError as error:
        raise CommonTestsUnavailable("the common tests need `parameterized` (pip install -e '.[dev]')") from error
    folder = fetch_common_tests()
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(folder)]
        sys.modules[PACKAGE] = package
        for dotted, attributes in STAND_INS.items():
            parent = dotted.rsplit(".", 1)[0]
            if f"{PACKAGE}.{parent}" not in sys.modules:
                _stand_in(parent)
            _stand_in(dotted, **attributes)
        fetch_module = types.ModuleType("fetch_hub_objects_for_ci")
        fetch_module.url_to_local_path = _local_test_image
        sys.modules.setdefault(fetch_module.__name__, fetch_module)
    try:
        return types.SimpleNamespace(
            **{name: importlib.import_module(f"{PACKAGE}.test_{name}_common")
               for name in ("modeling", "configuration", "backbone", "image_processing")}
        )
    except ImportError as error:  # e.g. a later version importing another helper that has no stand-in yet
        raise CommonTestsUnavailable(f"the common tests of transformers {transformers.__version__} do not import "
                                     f"here ({type(error).__name__}: {error}); add a stand-in in {__file__}") from error
