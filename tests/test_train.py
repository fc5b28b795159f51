"""examples/train.py end to end on tiny models: 2-process DDP, kill + resume, every folder layout, push to a
fake Hub, bad data; plus the library's optimizer groups, schedule and checkpoint helpers."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import REPO_ROOT, tiny_config
from test_data import make_ade20k, make_cityscapes, make_imagefolder

TRAIN_SCRIPT = REPO_ROOT / "examples" / "train.py"
ACCELERATE = Path(sys.executable).parent / "accelerate"
FAST = ["--crop_size", "64", "--per_device_train_batch_size", "2", "--dataloader_num_workers", "0", "--logging_steps", "1"]


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory):
    from metaseg_hf import MetaSegForSemanticSegmentation

    folder = tmp_path_factory.mktemp("tiny-model")
    torch.manual_seed(0)
    MetaSegForSemanticSegmentation(tiny_config(num_labels=5)).save_pretrained(folder)  # dropout, drop path as default
    return folder


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    id2label = {str(index): name for index, name in enumerate(["background", "circle", "rectangle", "triangle", "stripes"])}
    make_imagefolder(root / "train", 10, size=(64, 80), id2label=id2label)
    make_imagefolder(root / "val", 3, size=(60, 72))
    return root


def environment(**extra):
    # One thread per process: tiny models gain nothing from two, and a busy machine makes OpenMP's
    # barriers between two threads very slow.
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONUNBUFFERED": "1", **extra}


def run_train(args, launcher=None, env=None, check=True, timeout=300):
    command = (launcher or [sys.executable, str(TRAIN_SCRIPT)]) + [str(arg) for arg in args]
    completed = subprocess.run(command, capture_output=True, text=True, env=env or environment(), timeout=timeout, cwd=REPO_ROOT)
    if check and completed.returncode != 0:
        raise AssertionError(f"train.py failed ({completed.returncode}):\n{completed.stdout[-3000:]}\n{completed.stderr[-6000:]}")
    return completed


def data_args(small_data):
    return ["--train_dir", small_data / "train", "--validation_dir", small_data / "val"]


# ---------------------------------------------------------------------------------------------------
# Multi-process
# ---------------------------------------------------------------------------------------------------


def test_two_process_cpu_ddp_run(tmp_path, tiny_model_dir, small_data):
    launcher = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", str(TRAIN_SCRIPT)]
    output = tmp_path / "ddp"
    run_train(["--model_name_or_path", tiny_model_dir, *data_args(small_data), *FAST, "--max_train_steps", "3",
               "--output_dir", output], launcher=launcher, env=environment(ACCELERATE_USE_CPU="1"))
    results = json.loads((output / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["train_steps"] == 3
    # The 2-process validation (3 images sharded 2 + 1, confusion matrices summed) equals one process's.
    from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
    from metaseg_hf.data import SegmentationEvalDataset, load_segmentation_data
    from metaseg_hf.evaluation import evaluate_segmentation
    from metaseg_hf.metrics import StreamingMeanIoU

    data = load_segmentation_data(train_dir=small_data / "train", validation_dir=small_data / "val")
    model = MetaSegForSemanticSegmentation.from_pretrained(output)
    dataset = SegmentationEvalDataset(data.validation, MetaSegImageProcessor.from_pretrained(output), 5)
    single = evaluate_segmentation(model, dataset, None, StreamingMeanIoU(5)).compute()
    assert results["eval_mean_iou"] == pytest.approx(single["mean_iou"], rel=1e-6)
    assert results["eval_overall_accuracy"] == pytest.approx(single["overall_accuracy"], rel=1e-6)


# ---------------------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------------------

_FAULT_WRAPPER = textwrap.dedent(
    """
    # Runs examples/train.py, logging every optimizer step (its number from AdamW's state and a gradient
    # fingerprint) and SIGKILLing itself after step $KILL_AFTER_STEP or right after the $KILL_IN_SAVE-th
    # save_state (the state written, not yet committed).
    import json, os, runpy, signal, sys
    import accelerate, torch

    log_path, kill_after = os.environ["STEP_LOG"], int(os.environ.get("KILL_AFTER_STEP", "0"))
    kill_in_save, saves = int(os.environ.get("KILL_IN_SAVE", "0")), [0]
    original_step, original_save = torch.optim.AdamW.step, accelerate.Accelerator.save_state

    def step(self, *args, **kwargs):
        grads = sum(float(p.grad.double().sum()) for g in self.param_groups for p in g["params"] if p.grad is not None)
        result = original_step(self, *args, **kwargs)
        number = int(self.state[self.param_groups[0]["params"][0]]["step"])
        with open(log_path, "a") as log:
            log.write(json.dumps({"step": number, "grad": grads}) + "\\n")
        if number == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    def save_state(self, *args, **kwargs):
        result = original_save(self, *args, **kwargs)
        saves[0] += 1
        if saves[0] == kill_in_save:
            os.kill(os.getpid(), signal.SIGKILL)
        return result

    torch.optim.AdamW.step, accelerate.Accelerator.save_state = step, save_state
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


def read_steps(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_sigkill_then_resume_latest_gives_the_uninterrupted_run(tmp_path, tiny_model_dir, small_data):
    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(_FAULT_WRAPPER)
    launcher = [sys.executable, str(wrapper), str(TRAIN_SCRIPT)]
    # 10 images, batch 2: 5 batches an epoch, so step 8 is in the second epoch; checkpoints every 3 steps.
    args = ["--model_name_or_path", tiny_model_dir, *data_args(small_data), *FAST, "--max_train_steps", "8",
            "--checkpointing_steps", "3", "--seed", "7"]

    def train(name, log, resume=False, **faults):
        extra = ["--resume_from_checkpoint", "latest"] if resume else []
        env = environment(STEP_LOG=str(tmp_path / log), **{key.upper(): str(value) for key, value in faults.items()})
        return run_train(args + ["--output_dir", tmp_path / name] + extra, launcher=launcher, env=env, check=False)

    def finished(completed):
        assert completed.returncode == 0, completed.stderr[-4000:]

    finished(train("full", "full.jsonl"))
    full = read_steps(tmp_path / "full.jsonl")
    assert [entry["step"] for entry in full] == list(range(1, 9))

    # Killed after step 5: the newest complete checkpoint is step 3; resuming redoes 4..8 exactly.
    killed = train("killed", "killed.jsonl", kill_after_step=5)
    assert killed.returncode == -signal.SIGKILL
    assert sorted(path.name for path in (tmp_path / "killed").glob("checkpoint-*")) == ["checkpoint-3"]
    finished(train("killed", "resumed.jsonl", resume=True))
    resumed = read_steps(tmp_path / "resumed.jsonl")
    assert [entry["step"] for entry in resumed] == [4, 5, 6, 7, 8]  # no step lost, none repeated
    assert [entry["grad"] for entry in resumed] == [entry["grad"] for entry in full[3:]]  # same data and dropout

    # Killed inside the save of step 6: that folder is never used; resuming starts again from step 3.
    in_save = train("in_save", "in_save.jsonl", kill_in_save=2)
    assert in_save.returncode == -signal.SIGKILL
    folder = tmp_path / "in_save"
    assert sorted(path.name for path in folder.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (folder / ".tmp-checkpoint-6" / "model.safetensors").is_file()  # written, never committed
    finished(train("in_save", "in_save_resumed.jsonl", resume=True))
    assert [entry["step"] for entry in read_steps(tmp_path / "in_save_resumed.jsonl")] == [4, 5, 6, 7, 8]
    assert not (folder / ".tmp-checkpoint-6").exists()

    reference = load_file(tmp_path / "full" / "model.safetensors")
    for name in ("killed", "in_save"):
        weights = load_file(tmp_path / name / "model.safetensors")
        assert weights.keys() == reference.keys()
        different = [key for key in reference if not torch.equal(weights[key], reference[key])]
        assert not different, f"{name}: {len(different)} tensors differ from the uninterrupted run, e.g. {different[:3]}"
    for name in ("full", "killed", "in_save"):
        assert json.loads((tmp_path / name / "all_results.json").read_text())["train_steps"] == 8


def test_accumulation_epoch_checkpoints_total_limit_and_tracking(tmp_path, tiny_model_dir, small_data):
    """10 images, batch 2, 2 batches per step: 3 optimizer steps an epoch (the last batch of an epoch steps
    alone), so 5 steps end in the second epoch after 4 of its 5 batches. An epoch checkpoint is saved at the
    end of each epoch; --checkpoints_total_limit 1 keeps only the newest. --with_tracking logs to TensorBoard."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    wrapper = tmp_path / "fault_wrapper.py"
    wrapper.write_text(_FAULT_WRAPPER)
    output = tmp_path / "out"
    run_train(["--model_name_or_path", tiny_model_dir, *data_args(small_data), *FAST, "--max_train_steps", "5",
               "--gradient_accumulation_steps", "2", "--checkpointing_steps", "epoch", "--checkpoints_total_limit", "1",
               "--with_tracking", "--report_to", "tensorboard", "--output_dir", output],
              launcher=[sys.executable, str(wrapper), str(TRAIN_SCRIPT)], env=environment(STEP_LOG=str(tmp_path / "steps.jsonl")))
    assert [entry["step"] for entry in read_steps(tmp_path / "steps.jsonl")] == [1, 2, 3, 4, 5]  # 5 optimizer steps
    assert [path.name for path in output.glob("checkpoint-*")] == ["checkpoint-5"]  # checkpoint-3 removed by the limit
    state = json.loads((output / "checkpoint-5" / "checkpoint_complete.json").read_text())
    assert (state["completed_steps"], state["epoch"], state["batches_in_epoch"]) == (5, 1, 4)
    events = [path for path in output.rglob("events.out.tfevents.*")]
    assert events, "--with_tracking wrote no TensorBoard events"
    accumulator = EventAccumulator(str(events[0].parent))
    accumulator.Reload()
    assert [event.step for event in accumulator.Scalars("train/loss")] == [1, 2, 3, 4, 5]
    assert "eval/mean_iou" in accumulator.Tags()["scalars"]


class _PlantedCode:
    """Unpickling this runs `os.mkdir(path)`: the trace left by code planted in a checkpoint file."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def test_resume_runs_no_code_planted_in_the_checkpoint_pickles(tmp_path, tiny_model_dir, small_data):
    """Every *.pkl of a checkpoint (and Accelerate's custom-object file, as main's runs wrote it) replaced
    by a pickle that would run code: resuming must not unpickle any of them unsafely."""
    output = tmp_path / "out"
    args = ["--model_name_or_path", tiny_model_dir, *data_args(small_data), *FAST, "--checkpointing_steps", "2",
            "--output_dir", output]
    run_train(args + ["--max_train_steps", "2"])
    checkpoint = output / "checkpoint-2"
    assert "scheduler" in json.loads((checkpoint / "checkpoint_complete.json").read_text())  # kept as plain data
    planted = sorted(checkpoint.glob("*.pkl"))
    assert planted  # Accelerate's RNG states are a pickle
    for index, path in enumerate(planted):
        torch.save(_PlantedCode(tmp_path / f"code-ran-{index}"), path)
    resume = args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    completed = run_train(resume, check=False)
    assert not list(tmp_path.glob("code-ran-*")), "code planted in a checkpoint ran on resume"
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "Resumed from" in completed.stdout and json.loads((output / "all_results.json").read_text())["train_steps"] == 3

    # Accelerate's custom-object file (main's runs saved the scheduler so) is refused before anything is loaded.
    torch.save(_PlantedCode(tmp_path / "code-ran-custom"), output / "checkpoint-2" / "custom_checkpoint_0.pkl")
    refused = run_train(resume, check=False)
    assert not list(tmp_path.glob("code-ran-*")), "code planted in a checkpoint ran on resume"
    assert refused.returncode != 0 and "custom_checkpoint_0.pkl" in refused.stderr and "delete" in refused.stderr


def test_scheduler_is_restored_from_plain_data_or_the_recorded_step():
    from metaseg_hf.checkpoints import restore_scheduler, scheduler_state
    from metaseg_hf.training import create_scheduler

    def scheduler_after(steps):
        optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=0.1)
        scheduler = create_scheduler(optimizer, "polynomial", num_warmup_steps=3, num_training_steps=10)
        for _ in range(steps):
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    _, trained = scheduler_after(5)
    state = json.loads(json.dumps({"completed_steps": 5, "scheduler": scheduler_state(trained)}))
    for saved in (state, {"completed_steps": 5}):  # plain data; older checkpoints: the recorded step
        optimizer, fresh = scheduler_after(0)
        restore_scheduler(fresh, saved)
        assert fresh.last_epoch == 5 and fresh.get_last_lr() == trained.get_last_lr()
        optimizer.step()
        fresh.step()
        trained_copy = scheduler_after(6)[1]
        assert fresh.get_last_lr() == trained_copy.get_last_lr()


# ---------------------------------------------------------------------------------------------------
# Folder layouts, bad data
# ---------------------------------------------------------------------------------------------------


def label_histograms(files, num_labels, reduce_zero_label=False):
    """Each label file's pixel count per class, read straight off the PNGs by the layout's rule."""
    histograms = []
    for path in sorted(files):
        label = np.asarray(Image.open(path)).astype(np.int64)
        if reduce_zero_label:  # ADE20K: 0 ("other") is ignored, class k is stored as k + 1
            label = np.where(label == 0, 255, label - 1)
        histograms.append(np.bincount(label[label != 255], minlength=num_labels).tolist())
    return histograms


@pytest.mark.parametrize("layout", ["imagefolder", "ade20k", "cityscapes"])
def test_one_run_on_each_folder_layout(tmp_path, tiny_model_dir, layout):
    """Two steps of train.py on each layout; the final evaluation must have scored exactly the validation
    labels on disk (pixels per class, after the layout's label rule), at their own resolution."""
    from metaseg_hf import MetaSegConfig, MetaSegImageProcessor

    data = tmp_path / "data"
    if layout == "imagefolder":
        make_imagefolder(data, 6, size=(64, 80))
        expected_labels, expected_reduce = 5, False
        # No validation folder: round(0.15 * 6) = 1 training image is held out, whichever the seed picks.
        candidates = label_histograms((data / "labels").glob("*.png"), 5)
    elif layout == "ade20k":
        make_ade20k(data, counts=(4, 2), size=(64, 80))
        expected_labels, expected_reduce = 150, True
        files = (data / "ADEChallengeData2016" / "annotations" / "validation").glob("*.png")
        candidates = [np.sum(label_histograms(files, 150, reduce_zero_label=True), axis=0).tolist()]
    else:
        make_cityscapes(data, counts=(4, 2), size=(64, 128))
        expected_labels, expected_reduce = 19, False
        candidates = [np.sum(label_histograms((data / "gtFine" / "val").glob("*/*_labelTrainIds.png"), 19), axis=0).tolist()]
    output = tmp_path / "out"
    run_train(["--model_name_or_path", tiny_model_dir, "--train_dir", data, "--dataset_format", layout,
               *FAST, "--max_train_steps", "2", "--output_dir", output])
    results = json.loads((output / "all_results.json").read_text())
    assert results["train_steps"] == 2
    per_class = results["eval_per_class"]
    assert [row["id"] for row in per_class] == list(range(expected_labels))
    label_pixels = [row["label_pixels"] for row in per_class]
    assert label_pixels in candidates, f"evaluated label pixels per class {label_pixels}, expected one of {candidates}"
    assert sum(row["predicted_pixels"] for row in per_class) == sum(label_pixels)  # every valid pixel predicted once
    ious = [row["iou"] for row in per_class if row["iou"] is not None]
    assert results["eval_mean_iou"] == pytest.approx(sum(ious) / len(ious))
    config = MetaSegConfig.from_pretrained(output)
    assert config.num_labels == expected_labels  # the classifier follows the data (re-created when it differs)
    assert MetaSegImageProcessor.from_pretrained(output).do_reduce_labels == expected_reduce
    assert "Training data" in (output / "README.md").read_text()


def test_bad_data_stops_with_the_file_name(tmp_path, tiny_model_dir):
    make_imagefolder(tmp_path / "missing", 3, size=(64, 80))
    (tmp_path / "missing" / "labels" / "img2.png").unlink()
    completed = run_train(["--model_name_or_path", tiny_model_dir, "--train_dir", tmp_path / "missing", *FAST,
                           "--max_train_steps", "1", "--output_dir", tmp_path / "out1"], check=False)
    assert completed.returncode != 0 and "Missing label file for" in completed.stderr and "img2.png" in completed.stderr
    assert "Traceback" not in completed.stderr and completed.stderr.strip().startswith("error: Missing label file")

    make_imagefolder(tmp_path / "range", 4, size=(64, 80), id2label={"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"})
    label = np.zeros((64, 80), dtype=np.uint8)
    label[10:20, 10:20] = 9
    for index in range(4):  # every image, so the first batch meets it whatever the order
        Image_save(label, tmp_path / "range" / "labels" / f"img{index}.png")
    completed = run_train(["--model_name_or_path", tiny_model_dir, "--train_dir", tmp_path / "range", *FAST,
                           "--max_train_steps", "1", "--output_dir", tmp_path / "out2"], check=False)
    assert completed.returncode != 0 and "Label values out of range" in completed.stderr
    assert "labels/img" in completed.stderr and "found 9" in completed.stderr

    # --check_labels reads every label before training: one bad label among many stops the run at once.
    make_imagefolder(tmp_path / "one_bad", 6, size=(64, 80), id2label={"0": "a", "1": "b", "2": "c", "3": "d", "4": "e"})
    Image_save(label, tmp_path / "one_bad" / "labels" / "img5.png")
    completed = run_train(["--model_name_or_path", tiny_model_dir, "--train_dir", tmp_path / "one_bad", *FAST,
                           "--train_val_split", "0", "--check_labels", "--max_train_steps", "1",
                           "--output_dir", tmp_path / "out3"], check=False)
    assert completed.returncode == 2 and "Traceback" not in completed.stderr, completed.stderr[-2000:]
    assert "1 of 6 samples" in completed.stderr and "img5.png" in completed.stderr and "found 9" in completed.stderr
    assert "Training" not in completed.stdout  # stopped before the first step


def Image_save(array, path):
    from PIL import Image

    Image.fromarray(array).save(path)


# ---------------------------------------------------------------------------------------------------
# Push to the Hub (network layer replaced)
# ---------------------------------------------------------------------------------------------------

_FAKE_HUB = textwrap.dedent(
    """
    # A fake Hub behind huggingface_hub's own HTTP client: every request goes to an httpx MockTransport;
    # committed files are written to $FAKE_HUB_DIR/<repo>/. Then runs the script given as argv[1].
    import base64, json, os, re, runpy, sys
    from pathlib import Path
    import httpx2
    from huggingface_hub.utils import set_client_factory

    store, fail = Path(os.environ["FAKE_HUB_DIR"]), os.environ.get("FAKE_HUB_FAIL")

    def handler(request):
        path = request.url.path
        with open(store / "requests.log", "a") as log:
            log.write(f"{request.method} {path}\\n")
        if request.method == "POST" and path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if request.method == "GET" and path == "/api/whoami-v2":
            return httpx2.Response(200, json={"name": "tester", "type": "user", "auth": {}})
        if request.method == "POST" and path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body.get('organization') or 'tester'}/{body['name']}"
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo, "id": "1"})
        if re.fullmatch(r"/api/models/.+/preupload/.+", path):
            files = json.loads(request.content)["files"]
            return httpx2.Response(200, json={"files": [
                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
        match = re.fullmatch(r"/api/models/(.+)/commit/.+", path)
        if match:
            if fail:
                return httpx2.Response(403, json={"error": "simulated: no write access to this repository"})
            for line in request.content.decode().splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    target = store / match.group(1) / item["value"]["path"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(base64.b64decode(item["value"]["content"]))
            commit = f"https://huggingface.co/{match.group(1)}/commit/" + "0" * 40
            return httpx2.Response(200, json={"commitUrl": commit, "commitOid": "0" * 40})
        return httpx2.Response(404, json={"error": "not found"})

    set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(handler), follow_redirects=True))
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    """
)


SECRET_TOKEN = "hf_SecretTokenThatMustNotBePublished"


def test_push_to_hub_uploads_a_pipeline_ready_folder(tmp_path, tiny_model_dir, small_data):
    from PIL import Image
    from transformers import pipeline

    wrapper = tmp_path / "fake_hub.py"
    wrapper.write_text(_FAKE_HUB)
    store = tmp_path / "hub"
    store.mkdir()
    launcher = [sys.executable, str(wrapper), str(TRAIN_SCRIPT)]
    args = ["--model_name_or_path", tiny_model_dir, *data_args(small_data), *FAST, "--max_train_steps", "2",
            "--checkpointing_steps", "1", "--push_to_hub", "--hub_model_id", "metaseg-tiny-test", "--hub_token", SECRET_TOKEN]
    hub_env = {"FAKE_HUB_DIR": str(store), "HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf_home")}
    completed = run_train(args + ["--output_dir", tmp_path / "out"], launcher=launcher, env=environment(**hub_env))
    assert "Uploaded to https://huggingface.co/tester/metaseg-tiny-test" in completed.stdout
    uploaded = store / "tester" / "metaseg-tiny-test"
    names = {path.name for path in uploaded.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"} <= names
    assert not any(name.startswith("checkpoint") for name in names)  # checkpoints stay local
    segmenter = pipeline("image-segmentation", model=str(uploaded))
    segments = segmenter(Image.new("RGB", (90, 70), (120, 60, 30)))
    assert segments and all(segment["mask"].size == (90, 70) for segment in segments)
    assert "mIoU" in (uploaded / "README.md").read_text()
    from huggingface_hub import ModelCard

    card = ModelCard.load(uploaded / "README.md")  # the metadata header parses as the Hub reads it
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-segmentation"
    assert "metaseg" in card.data.tags and card.data.license == "mit"
    # The token given on the command line is in no file written or uploaded (the card records the command).
    assert "--hub_token '<redacted>'" in (uploaded / "README.md").read_text()
    written = [path for folder in (uploaded, tmp_path / "out") for path in folder.rglob("*") if path.is_file()]
    leaking = [str(path) for path in written if SECRET_TOKEN.encode() in path.read_bytes()]
    assert not leaking, f"the Hub token is written in {leaking}"

    # An upload failure reports the error and leaves the local output complete.
    failing = run_train(args + ["--output_dir", tmp_path / "out2"], launcher=launcher,
                        env=environment(**hub_env, FAKE_HUB_FAIL="1"), check=False)
    assert failing.returncode == 1 and "Upload to the Hub failed" in failing.stderr
    local = {path.name for path in (tmp_path / "out2").iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md", "all_results.json"} <= local


# ---------------------------------------------------------------------------------------------------
# Library pieces
# ---------------------------------------------------------------------------------------------------


def test_parameter_groups_follow_the_official_recipe():
    from metaseg_hf import MetaSegForSemanticSegmentation
    from metaseg_hf.presets import OFFICIAL_TRAINING_RECIPE
    from metaseg_hf.training import create_optimizer

    model = MetaSegForSemanticSegmentation(tiny_config())
    optimizer = create_optimizer(model)  # the official defaults
    groups = {group["name"]: group for group in optimizer.param_groups}
    lr, decay = OFFICIAL_TRAINING_RECIPE["learning_rate"], OFFICIAL_TRAINING_RECIPE["weight_decay"]
    assert groups["encoder"]["lr"] == lr and groups["encoder"]["weight_decay"] == decay
    assert groups["encoder_norms"]["weight_decay"] == 0.0
    assert groups["decode_head"]["lr"] == pytest.approx(lr * OFFICIAL_TRAINING_RECIPE["head_lr_multiplier"])
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    norm_names = {names[id(parameter)] for parameter in groups["encoder_norms"]["params"]}
    assert "metaseg.encoder.stages.0.blocks.0.norm1.weight" in norm_names
    assert "metaseg.encoder.stages.3.layer_norm.bias" in norm_names
    assert all(name.startswith("decode_head.") for name in (names[id(p)] for p in groups["decode_head"]["params"]))
    assert sum(len(group["params"]) for group in optimizer.param_groups) == len(list(model.parameters()))


def test_warmup_polynomial_schedule_matches_mmcv():
    from metaseg_hf.training import create_scheduler, warmup_polynomial_factor

    # MMCV: regular = (1 - i / max) ** power; warm-up lr = regular * (1 - (1 - i / W) * (1 - ratio)).
    assert warmup_polynomial_factor(0, 10, 100, 1e-6, 1.0) == pytest.approx(1e-6)
    assert warmup_polynomial_factor(5, 10, 100, 1e-6, 1.0) == pytest.approx(0.95 * (1 - 0.5 * (1 - 1e-6)))
    assert warmup_polynomial_factor(10, 10, 100, 1e-6, 1.0) == pytest.approx(0.9)
    assert warmup_polynomial_factor(100, 10, 100, 1e-6, 1.0) == 0.0
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = create_scheduler(optimizer, "polynomial", 10, 100, 1e-6, 1.0)
    for _ in range(10):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.9)


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    from metaseg_hf.checkpoints import COMPLETE_MARKER, find_latest_checkpoint, resolve_checkpoint

    assert find_latest_checkpoint(tmp_path) is None and resolve_checkpoint("latest", tmp_path) is None
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / COMPLETE_MARKER).write_text(json.dumps({"step": step}))
    (tmp_path / "checkpoint-12").mkdir()  # no marker: an interrupted save
    (tmp_path / ".tmp-checkpoint-14").mkdir()
    assert find_latest_checkpoint(tmp_path).name == "checkpoint-10"
    with pytest.raises(ValueError, match="never"):
        resolve_checkpoint(str(tmp_path / "checkpoint-12"), tmp_path)


def test_backbone_checkpoint_and_preset_build_the_model(tmp_path, reference):
    from metaseg_hf.conversion import convert_state_dict, load_official_checkpoint
    from metaseg_hf.training import build_model

    official = load_official_checkpoint(reference / "metaseg-t-ade20k-random.pth")["state_dict"]
    imagenet = {key.removeprefix("backbone."): value for key, value in official.items() if key.startswith("backbone.")}
    imagenet.update({"head.weight": torch.zeros(1000, 256), "head.bias": torch.zeros(1000)})  # ImageNet classifier
    torch.save({"state_dict": imagenet}, tmp_path / "mscan_t.pth")
    id2label = {0: "sky", 1: "road", 2: "car"}
    model = build_model(id2label, config_name="metaseg-t", backbone_checkpoint=tmp_path / "mscan_t.pth")
    assert model.config.num_labels == 3 and model.config.id2label[2] == "car"
    expected = convert_state_dict(imagenet, backbone_only=True).state_dict
    loaded = model.metaseg.state_dict()
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    with pytest.raises(ValueError, match="Unknown MetaSeg preset 'metaseg-x'"):
        build_model(id2label, config_name="metaseg-x")


def test_a_single_cpu_process_uses_the_cores_under_accelerate_launch(monkeypatch):
    """`accelerate launch` exports OMP_NUM_THREADS=1 by default; a lone CPU process then takes all cores,
    while a thread count the user chose (or several processes) is kept."""
    from types import SimpleNamespace

    from metaseg_hf.training import set_cpu_threads

    previous = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    single = SimpleNamespace(num_processes=1, device=torch.device("cpu"))
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")  # what `accelerate launch` exports
        torch.set_num_threads(1)
        assert set_cpu_threads(single) == cores
        torch.set_num_threads(1)
        assert set_cpu_threads(SimpleNamespace(num_processes=2, device=torch.device("cpu"))) == 1
        assert set_cpu_threads(single, num_threads=1) == 1
        monkeypatch.delenv("ACCELERATE_DYNAMO_BACKEND")  # plain `python train.py` with the user's OMP_NUM_THREADS=1
        assert set_cpu_threads(single) == 1
        with pytest.raises(ValueError, match="num_threads must be at least 1, got 0"):
            set_cpu_threads(single, num_threads=0)
    finally:
        torch.set_num_threads(previous)
