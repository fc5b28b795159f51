"""examples/evaluate.py and examples/segment.py over two gloo processes (`accelerate launch --multi_gpu` on CPU):
every image read by exactly one process, results equal to one process, errors reported once; and segment.py's
resumable, atomic outputs (a SIGKILL mid-write, then a rerun; a rerun that writes nothing)."""

import json
import os
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, tiny_config
from test_data import make_imagefolder

sys.path.insert(0, str(REPO_ROOT / "examples"))
import segment  # noqa: E402

ACCELERATE = Path(sys.executable).parent / "accelerate"
TWO_PROCESSES = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                 "--mixed_precision", "no", "--dynamo_backend", "no"]

# Runs an example script as __main__ after patching one function to log "<rank> <item>" lines to $READ_LOG, so
# that a test sees which process read which image.
_READ_LOGGER = """
import os, runpy, sys
from pathlib import Path
sys.path.insert(0, {repo!r})
import metaseg_hf.data as data, metaseg_hf.image_processing_metaseg as processing

def log(item):
    with open(os.environ["READ_LOG"], "a") as file:
        file.write(f"{{os.environ.get('RANK', '0')}} {{item}}\\n")

get_item = data.SegmentationEvalDataset.__getitem__
def logged_get_item(self, index):
    log(index)
    return get_item(self, index)
data.SegmentationEvalDataset.__getitem__ = logged_get_item

to_rgb = processing.MetaSegImageProcessor.to_rgb
def logged_to_rgb(self, image, *args, **kwargs):
    log(Path(image).name)
    return to_rgb(self, image, *args, **kwargs)
processing.MetaSegImageProcessor.to_rgb = logged_to_rgb

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
"""


def environment(**extra):
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def launch_logged(tmp_path, script: str, args: list, launcher=TWO_PROCESSES) -> tuple[subprocess.CompletedProcess, dict]:
    """Runs examples/<script> under `launcher`; returns the process and {rank: [items read]}."""
    wrapper, log = tmp_path / "read_logger.py", tmp_path / f"{script}.reads"
    wrapper.write_text(_READ_LOGGER.format(repo=str(REPO_ROOT)))
    command = [*launcher, str(wrapper), str(REPO_ROOT / "examples" / script), *map(str, args)]
    completed = subprocess.run(command, capture_output=True, text=True, env=environment(READ_LOG=str(log)),
                               timeout=300, cwd=tmp_path)
    reads = defaultdict(list)
    for line in log.read_text().splitlines() if log.exists() else []:
        rank, item = line.split(" ", 1)
        reads[int(rank)].append(item)
    return completed, dict(reads)


def assert_each_read_by_one_process(reads: dict, expected: set):
    assert sorted(reads) == [0, 1], f"both processes should have read images: {reads}"
    first, second = set(reads[0]), set(reads[1])
    assert not first & second, f"images read by both processes: {first & second}"
    assert first | second == expected


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor

    folder = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    MetaSegForSemanticSegmentation(tiny_config(id2label={i: f"class {i}" for i in range(5)})).eval().save_pretrained(folder)
    MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}).save_pretrained(folder)
    return folder


@pytest.fixture
def one_thread():
    """The reference runs in this process with one thread, as each launched process does: same arithmetic."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def photos(tmp_path):
    """Five inputs (an odd count), one of them unreadable."""
    folder = tmp_path / "photos"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for index, size in enumerate([(40, 56), (48, 48), (36, 60), (52, 44)]):
        Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(folder / f"p{index}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    return folder


def output_files(folder: Path) -> dict:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_two_process_evaluation_reads_each_image_once_and_equals_one_process(tmp_path, model_dir, one_thread):
    evaluate_script = REPO_ROOT / "examples" / "evaluate.py"
    data = make_imagefolder(tmp_path / "val", 5, size=(44, 52))
    common = ["--model", model_dir, "--data_dir", data, "--flip"]
    single = subprocess.run([sys.executable, str(evaluate_script), *map(str, common), "--output_json", str(tmp_path / "one.json")],
                            capture_output=True, text=True, env=environment(), timeout=300, cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    completed, reads = launch_logged(tmp_path, "evaluate.py", [*common, "--output_json", tmp_path / "two.json"])
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert_each_read_by_one_process(reads, {str(index) for index in range(5)})
    one, two = (json.loads((tmp_path / name).read_text()) for name in ("one.json", "two.json"))
    assert two["settings"]["num_processes"] == 2 and one["settings"]["num_processes"] == 1
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"):
        assert two[key] == one[key], key  # integer confusion matrices summed: exactly equal
    assert completed.stdout.count("Wrote ") == 1  # table and JSON written once, by the main process


def test_two_process_segmentation_splits_the_inputs_and_reports_errors_once(tmp_path, model_dir, photos, one_thread):
    reference = tmp_path / "one"
    assert segment.main(["--model", str(model_dir), str(photos), "--output_dir", str(reference)]) == 1
    output = tmp_path / "two"
    completed, reads = launch_logged(tmp_path, "segment.py", ["--model", model_dir, photos, "--output_dir", output])
    assert completed.returncode != 0  # the unreadable file fails the run, after the others are written
    assert_each_read_by_one_process(reads, {"p0.png", "p1.png", "p2.png", "p3.png", "broken.jpg"})
    assert output_files(output) == output_files(reference)  # byte for byte, 4 images x 4 files
    assert len(output_files(output)) == 16
    log = completed.stdout + completed.stderr
    mentions = [line for line in log.splitlines() if "broken.jpg" in line]
    assert len(mentions) == 1 and "not a readable image file" in mentions[0]  # once, in the main process's summary
    assert "1 error(s)" in log
    assert "segmented 4 of 5 images" in completed.stdout and "with 2 processes" in completed.stdout


def test_rerun_writes_nothing_and_overwrite_redoes(tmp_path, model_dir, photos, capsys):
    output = tmp_path / "out"
    arguments = ["--model", str(model_dir), str(photos / "p0.png"), str(photos / "p1.png"), "--output_dir", str(output)]
    assert segment.main(arguments) == 0
    written = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    capsys.readouterr()
    assert segment.main(arguments) == 0
    assert "skipped 2 image(s)" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in output.iterdir()} == written
    assert segment.main([*arguments, "--overwrite"]) == 0
    assert "skipped" not in capsys.readouterr().out
    rewritten = {path.name: path.stat().st_mtime_ns for path in output.iterdir()}
    assert rewritten.keys() == written.keys() and all(rewritten[name] > written[name] for name in written)


_KILL_DURING_WRITE = """
import os, runpy, signal, sys
sys.path.insert(0, {repo!r})
# SIGKILL after the temporary file of the 6th output is written, before its rename: image 1 is whole, image 2
# has one file and a partial one.
replace, calls = os.replace, [0]
def dying_replace(source, target):
    calls[0] += 1
    if calls[0] == 6:
        os.kill(os.getpid(), signal.SIGKILL)
    replace(source, target)
os.replace = dying_replace
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_sigkill_mid_write_then_rerun_completes_every_file(tmp_path, model_dir, photos, capsys, one_thread):
    good = [str(photos / f"p{index}.png") for index in range(4)]
    output = tmp_path / "out"
    wrapper = tmp_path / "kill.py"
    wrapper.write_text(_KILL_DURING_WRITE.format(repo=str(REPO_ROOT)))
    killed = subprocess.run([sys.executable, str(wrapper), str(REPO_ROOT / "examples" / "segment.py"), "--model",
                             str(model_dir), *good, "--output_dir", str(output)],
                            capture_output=True, text=True, env=environment(), timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(path.name for path in output.iterdir()) == [
        ".p1_overlay.png.partial", "p0.json", "p0_classes.png", "p0_legend.png", "p0_overlay.png", "p1_classes.png"]

    assert segment.main(["--model", str(model_dir), *good, "--output_dir", str(output)]) == 0
    assert "skipped 1 image(s)" in capsys.readouterr().out
    clean = tmp_path / "clean"
    assert segment.main(["--model", str(model_dir), *good, "--output_dir", str(clean)]) == 0
    assert output_files(output) == output_files(clean)  # every file whole, no partial file left


def test_output_names_are_distinct_and_stable():
    paths = [Path("x.png"), Path("x_2.png"), Path("d2/x.png"), Path("d3/x.jpg"), Path("y.png")]
    assert segment.output_stems(paths) == ["x", "x_2", "x_3", "x_4", "y"]
    reversed_names = segment.output_stems(paths[::-1])
    assert reversed_names == ["y", "x", "x_3", "x_2", "x_4"] and len(set(reversed_names)) == len(paths)


def test_evaluation_mixed_precision_flag_runs_under_autocast(tmp_path, model_dir, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("evaluate_example", REPO_ROOT / "examples" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    data = make_imagefolder(tmp_path / "val", 2, size=(44, 52))
    seen = []
    original = evaluate_script.evaluate_segmentation

    def recording(*args, **kwargs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
        return original(*args, **kwargs)

    monkeypatch.setattr(evaluate_script, "evaluate_segmentation", recording)
    results = {}
    for name, flags in (("float32", []), ("bf16", ["--bf16"])):
        output = tmp_path / f"{name}.json"
        assert evaluate_script.main(["--model", str(model_dir), "--data_dir", str(data), "--device", "cpu",
                                     "--output_json", str(output), *flags]) == 0
        results[name] = json.loads(output.read_text())
    assert seen == [None, torch.bfloat16]
    assert results["bf16"]["settings"]["mixed_precision"] == "bf16"
    assert results["float32"]["settings"]["mixed_precision"] == "no"
    assert abs(results["bf16"]["overall_accuracy"] - results["float32"]["overall_accuracy"]) < 0.05
