"""Conversion of official checkpoints: key mapping for all six variants, safety, errors, the CLI."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import MANIFESTS_DIR, REPO_ROOT, TINY_DIR
from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation
from metaseg_hf.conversion import (
    CheckpointError,
    convert_checkpoint,
    convert_state_dict,
    infer_config_kwargs,
    load_official_checkpoint,
    map_official_key,
)
from metaseg_hf.presets import VARIANTS

sys.path.insert(0, str(REPO_ROOT / "conversion"))
import convert_metaseg_to_hf  # noqa: E402

TINY_CHECKPOINT = TINY_DIR / "metaseg-tiny-random.pth"


def manifest(name):
    """The official variant's manifest (copied from the reference data into tests/fixtures/manifests)."""
    return json.loads((MANIFESTS_DIR / f"{name}.json").read_text())


def test_every_variant_has_a_manifest():
    assert sorted(path.stem for path in MANIFESTS_DIR.glob("*.json")) == sorted(VARIANTS)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_preset_covers_the_official_state_dict_one_to_one(name):
    official = manifest(name)
    config = MetaSegConfig.from_preset(name)
    with torch.device("meta"):
        model = MetaSegForSemanticSegmentation(config)
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    mapped = {}
    for key, shape in official["state_dict"].items():
        if key.startswith("decode_head.conv_seg."):
            continue
        new_key = map_official_key(key)
        assert new_key is not None, f"{key} has no mapping"
        assert new_key not in mapped, f"{key} and {mapped[new_key]} map to the same {new_key}"
        mapped[new_key] = key
        assert ours.get(new_key) == shape, f"{key} -> {new_key}: {ours.get(new_key)} vs official {shape}"
    assert set(mapped) == set(ours)
    assert sum(p.numel() for p in model.parameters()) == official["num_parameters_without_conv_seg"]
    assert config.id2label[0] == official["classes"][0] and config.num_labels == len(official["classes"])
    assert config.inference_mode == official["test_cfg"]["mode"]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_is_inferred_from_the_shapes(name):
    shapes = manifest(name)["state_dict"]
    state_dict = {key: torch.empty(shape, device="meta") for key, shape in shapes.items()}
    kwargs, variant = infer_config_kwargs(state_dict)
    assert variant == name
    assert kwargs["num_labels"] == len(manifest(name)["classes"])


def test_conversion_writes_a_complete_folder(converted_dir, reference):
    files = {path.name for path in converted_dir.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= files
    assert {"modeling_metaseg.py", "configuration_metaseg.py", "image_processing_metaseg.py"} <= files
    config = json.loads((converted_dir / "config.json").read_text())
    checkpoint = load_official_checkpoint(reference / "metaseg-t-ade20k-random.pth")
    assert [config["id2label"][str(i)] for i in range(150)] == list(checkpoint["meta"]["CLASSES"])
    assert config["palette"][:2] == [list(colour) for colour in checkpoint["meta"]["PALETTE"][:2]]
    card = (converted_dir / "README.md").read_text()
    assert "metaseg-t-ade20k" in card and "license: mit" in card and "pipeline(" in card


def test_converted_weights_equal_the_official_tensors(reference, reference_model):
    state_dict = load_official_checkpoint(reference / "metaseg-t-ade20k-random.pth")["state_dict"]
    ours = reference_model.state_dict()
    for key, value in state_dict.items():
        new_key = map_official_key(key)
        if new_key is not None:
            assert torch.equal(ours[new_key], value), key


def test_cli_converts_and_reports_dropped_keys(reference, tmp_path, capsys):
    exit_code = convert_metaseg_to_hf.main(
        ["--checkpoint", str(reference / "metaseg-t-ade20k-random.pth"), "--output_dir", str(tmp_path / "out"),
         "--model_name", "metaseg-t-ade20k"]
    )
    assert exit_code == 0
    output = capsys.readouterr().out
    assert "dropped decode_head.conv_seg.weight" in output and "4,662,166 parameters" in output
    assert MetaSegForSemanticSegmentation.from_pretrained(tmp_path / "out").config.num_labels == 150


class _RunsCodeWhenUnpickled:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_would_run_code_is_refused_and_nothing_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"meta": _RunsCodeWhenUnpickled(marker), "state_dict": {"w": torch.zeros(1)}}, path)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match=r"Refused to load .*evil\.pth: its pickle would call io\.open.*Nothing in it was executed"):
        load_official_checkpoint(path)
    assert not marker.exists()
    assert convert_metaseg_to_hf.main(["--checkpoint", str(path), "--output_dir", str(tmp_path / "out")]) == 1
    assert "Refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_numpy_values_in_meta_load_and_nothing_runs(tmp_path):
    """mmcv's EvalHook(save_best=...) stores a numpy best_score: a genuine checkpoint, read with weights_only."""
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pth"
    meta = {"hook_msgs": {"best_score": np.float64(0.4123), "best_ckpt": "best_mIoU.pth", "scores": np.arange(3.0)},
            "CLASSES": ("a", "b"), "PALETTE": [[0, 0, 0], [255, 255, 255]]}
    torch.save({"meta": meta, "state_dict": {"w": torch.zeros(1)}}, path)
    checkpoint = load_official_checkpoint(path)
    assert checkpoint["meta"]["hook_msgs"]["best_score"] == np.float64(0.4123)
    assert np.array_equal(checkpoint["meta"]["hook_msgs"]["scores"], np.arange(3.0))
    torch.save({"meta": {"best_score": np.float32(1.0), "evil": _RunsCodeWhenUnpickled(marker)}, "state_dict": {}}, path)
    with pytest.raises(CheckpointError, match=r"its pickle would call io\.open"):
        load_official_checkpoint(path)
    assert not marker.exists()


def test_truncated_empty_and_foreign_files_name_the_file(tmp_path):
    data = TINY_CHECKPOINT.read_bytes()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"truncated\.pth is not a readable PyTorch checkpoint"):
        load_official_checkpoint(truncated)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pth is empty"):
        load_official_checkpoint(empty)
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match=r"notes\.pth is not a readable PyTorch checkpoint"):
        load_official_checkpoint(text)
    with pytest.raises(CheckpointError, match=r"missing\.pth does not exist"):
        load_official_checkpoint(tmp_path / "missing.pth")
    listing = tmp_path / "list.pth"
    torch.save([1, 2], listing)
    with pytest.raises(CheckpointError, match=r"list\.pth holds a list without a 'state_dict'"):
        load_official_checkpoint(listing)


def test_unknown_keys_and_wrong_shapes_are_listed(reference, tmp_path):
    checkpoint = load_official_checkpoint(reference / "metaseg-t-ade20k-random.pth")
    state_dict = dict(checkpoint["state_dict"])
    state_dict["backbone.extra_layer.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointError, match=r"1 checkpoint keys have no MetaSeg equivalent: backbone\.extra_layer\.weight"):
        convert_state_dict(state_dict)

    state_dict = dict(checkpoint["state_dict"])
    state_dict["backbone.block1.0.attn.proj_1.weight"] = torch.zeros(32, 16, 1, 1)
    path = tmp_path / "wrong_shape.pth"
    torch.save({"meta": checkpoint["meta"], "state_dict": state_dict}, path)
    with pytest.raises(
        CheckpointError,
        match=r"wrong_shape\.pth does not fit the model:\n.*shape mismatches \(1\): "
        r"metaseg\.encoder\.stages\.0\.blocks\.0\.attention\.proj_in\.weight: checkpoint \(32, 16, 1, 1\) vs model \(32, 32, 1, 1\)",
    ):
        convert_checkpoint(path, tmp_path / "out", log=lambda message: None)

    state_dict = dict(checkpoint["state_dict"])
    del state_dict["decode_head.attn2.attn.sr.bias"]
    path = tmp_path / "missing_key.pth"
    torch.save({"state_dict": state_dict}, path)
    with pytest.raises(CheckpointError, match=r"missing keys \(1\): decode_head\.global_meta_blocks\.0\.attention\.reduction\.bias"):
        convert_checkpoint(path, tmp_path / "out2", log=lambda message: None)


def test_state_dict_of_another_architecture_is_refused(tmp_path):
    path = tmp_path / "resnet.pth"
    torch.save({"state_dict": {"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 64)}}, path)
    with pytest.raises(CheckpointError, match=r"2 checkpoint keys have no MetaSeg equivalent: conv1\.weight, fc\.weight"):
        convert_checkpoint(path, tmp_path / "out", log=lambda message: None)


def test_imagenet_backbone_initialises_the_encoder_for_fine_tuning(reference, reference_model, tmp_path):
    state_dict = load_official_checkpoint(reference / "metaseg-t-ade20k-random.pth")["state_dict"]
    backbone = {key.removeprefix("backbone."): value for key, value in state_dict.items() if key.startswith("backbone.")}
    backbone["head.weight"], backbone["head.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    path = tmp_path / "mscan_t_imagenet.pth"
    torch.save({"state_dict": backbone}, path)
    messages = []
    convert_checkpoint(path, tmp_path / "mscan-t", backbone_only=True, log=messages.append)
    assert any("dropped head.weight" in message for message in messages)

    model = MetaSegForSemanticSegmentation.from_pretrained(tmp_path / "mscan-t", num_labels=3)
    assert model.config.num_labels == 3 and model.decode_head.classifier.out_channels == 3
    expected = reference_model.metaseg.state_dict()
    for key, value in model.metaseg.state_dict().items():
        assert torch.equal(value, expected[key]), key


def test_push_to_hub_uploads_the_converted_folder(tmp_path, monkeypatch):
    from huggingface_hub import HfApi

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = repo_id
        return f"https://huggingface.co/{repo_id}"

    def upload_folder(self, folder_path, repo_id, **kwargs):
        calls["uploaded"] = sorted(path.name for path in Path(folder_path).iterdir())
        calls["repo_id"] = repo_id

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    exit_code = convert_metaseg_to_hf.main(
        ["--checkpoint", str(TINY_CHECKPOINT), "--output_dir", str(tmp_path / "out"), "--push_to_hub", "someone/metaseg-tiny"]
    )
    assert exit_code == 0
    assert calls["create_repo"] == calls["repo_id"] == "someone/metaseg-tiny"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "modeling_metaseg.py"} <= set(
        calls["uploaded"]
    )
