"""Round trips: save/load, the Auto classes, trust_remote_code without metaseg_hf, an offline Hub cache."""

import json
import shutil
import textwrap

import numpy as np
import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from helpers import BLOCK_METASEG_HF, make_hub_cache, run_python, tiny_config
from metaseg_hf import MetaSegBackbone, MetaSegConfig, MetaSegForSemanticSegmentation, MetaSegModel


@pytest.fixture(scope="module")
def tiny_saved(tmp_path_factory):
    """A tiny model with trained BatchNorm statistics, saved with a processor: (folder, the saved model)."""
    from metaseg_hf import MetaSegImageProcessor

    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(id2label={i: f"class{i}" for i in range(5)}))
    with torch.no_grad():  # BatchNorm statistics other than the initial ones, as after training
        model.train()(torch.randn(2, 3, 64, 64) * 3 + 1)
    folder = tmp_path_factory.mktemp("tiny") / "metaseg-tiny"
    model.eval().save_pretrained(folder)
    MetaSegImageProcessor().save_pretrained(folder)
    return folder, model


@pytest.fixture(scope="module")
def tiny_folder(tiny_saved):
    return tiny_saved[0]


def test_save_load_round_trip_keeps_outputs_and_config(tiny_saved):
    tiny_folder, saved = tiny_saved
    model = MetaSegForSemanticSegmentation.from_pretrained(tiny_folder).eval()
    for name, buffer in saved.state_dict().items():  # running statistics included
        assert torch.equal(model.state_dict()[name], buffer), name
    assert saved.decode_head.batch_norm.num_batches_tracked.item() == 1
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(pixel_values).logits, saved(pixel_values).logits, rtol=0, atol=1e-6)
    assert model.config.id2label[3] == "class3" and model.config.hidden_sizes == [8, 16, 16, 32]
    config = json.loads((tiny_folder / "config.json").read_text())
    assert config["model_type"] == "metaseg"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForSemanticSegmentation", "AutoBackbone"}


def test_config_round_trips_every_preset(tmp_path):
    for name in MetaSegConfig.preset_names():
        config = MetaSegConfig.from_preset(name)
        config.save_pretrained(tmp_path / name)
        loaded = MetaSegConfig.from_pretrained(tmp_path / name)
        assert loaded.to_dict() == config.to_dict(), name


def test_auto_classes_resolve_to_metaseg(tiny_folder):
    assert isinstance(AutoConfig.from_pretrained(tiny_folder), MetaSegConfig)
    assert type(AutoModelForSemanticSegmentation.from_pretrained(tiny_folder)) is MetaSegForSemanticSegmentation
    assert type(AutoModel.from_pretrained(tiny_folder)) is MetaSegModel
    backbone = AutoBackbone.from_config(AutoConfig.from_pretrained(tiny_folder))
    assert type(backbone) is MetaSegBackbone
    loaded = MetaSegBackbone.from_pretrained(tiny_folder, out_indices=[1, 3])
    segmenter = MetaSegForSemanticSegmentation.from_pretrained(tiny_folder)
    assert torch.equal(
        loaded.encoder.stages[1].blocks[0].layer_scale_1, segmenter.metaseg.encoder.stages[1].blocks[0].layer_scale_1
    )
    assert [feature.shape[1] for feature in loaded(torch.randn(1, 3, 64, 64)).feature_maps] == [16, 32]


def test_trust_remote_code_loads_without_metaseg_hf(reference, converted_dir, tmp_path):
    """The converted reference folder, loaded where metaseg_hf cannot be imported, still gives the official logits."""
    script = BLOCK_METASEG_HF + textwrap.dedent(
        f"""
        import torch
        from safetensors.torch import load_file
        from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForSemanticSegmentation
        try:
            import metaseg_hf
            raise SystemExit("metaseg_hf should not be importable here")
        except ModuleNotFoundError:
            pass
        folder = {str(converted_dir)!r}
        model = AutoModelForSemanticSegmentation.from_pretrained(folder, trust_remote_code=True).eval()
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        batch = load_file({str(reference / "metaseg-t-ade20k-batch-float64.safetensors")!r})
        with torch.no_grad():
            logits = model.double()(batch["pixel_values"]).logits
        print("max_abs", (logits - batch["logits"]).abs().max().item())
        assert type(AutoModel.from_pretrained(folder, trust_remote_code=True)).__name__ == "MetaSegModel"
        config = AutoConfig.from_pretrained(folder, trust_remote_code=True)
        assert type(AutoBackbone.from_config(config, trust_remote_code=True)).__name__ == "MetaSegBackbone"
        """
    )
    result = run_python(script, {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules")})
    assert float(result.stdout.split("max_abs")[1]) <= 1e-8


def test_offline_hub_cache_loads_by_repo_id(tiny_folder, tmp_path):
    cache = make_hub_cache(tmp_path / "hub", "metaseg/metaseg-tiny", tiny_folder)
    script = textwrap.dedent(
        """
        import metaseg_hf, torch
        from transformers import AutoConfig, AutoModelForSemanticSegmentation
        model = AutoModelForSemanticSegmentation.from_pretrained("metaseg/metaseg-tiny")
        assert type(model) is metaseg_hf.MetaSegForSemanticSegmentation
        assert model.config.id2label[4] == "class4"
        print("ok")
        """
    )
    result = run_python(script, {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"})
    assert result.stdout.strip().endswith("ok")


def test_offline_missing_repo_fails_fast_with_the_offline_message(tmp_path):
    script = textwrap.dedent(
        """
        import metaseg_hf
        from transformers import AutoModelForSemanticSegmentation
        try:
            AutoModelForSemanticSegmentation.from_pretrained("metaseg/not-in-cache")
        except OSError as error:
            print("OSError:", error)
        """
    )
    result = run_python(script, {"HF_HUB_CACHE": str(tmp_path / "empty"), "HF_HUB_OFFLINE": "1"})
    assert "OSError:" in result.stdout and "offline mode" in result.stdout


NEW_LABELS = {0: "background", 1: "road", 2: "car"}


def test_the_task_guide_route_fine_tune_save_load_pipeline(tiny_dir, tmp_path):
    """Transformers' semantic-segmentation guide with a converted checkpoint (7 classes and their palette):
    `from_pretrained(..., id2label=..., label2id=...)` on 3 labels, `Trainer`, save, then `from_pretrained`
    and `pipeline` on the saved folder give the trained model's predictions with the new labels."""
    from PIL import Image
    from transformers import Trainer, TrainingArguments, pipeline

    from metaseg_hf import MetaSegImageProcessor

    label2id = {name: index for index, name in NEW_LABELS.items()}
    model = AutoModelForSemanticSegmentation.from_pretrained(
        tiny_dir, id2label=NEW_LABELS, label2id=label2id, ignore_mismatched_sizes=True
    )
    assert model.config.num_labels == 3 and model.config.palette is None  # the 7 classes' colours are gone
    generator = torch.Generator().manual_seed(0)
    samples = [
        {"pixel_values": torch.randn(3, 64, 64, generator=generator), "labels": torch.randint(0, 3, (64, 64), generator=generator)}
        for _ in range(4)
    ]
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", dataloader_num_workers=0,
    )
    Trainer(model=model, args=arguments, train_dataset=samples).train()
    folder = tmp_path / "fine-tuned"
    model.save_pretrained(folder)
    MetaSegImageProcessor.from_pretrained(tiny_dir).save_pretrained(folder)

    loaded = MetaSegForSemanticSegmentation.from_pretrained(folder).eval()
    assert loaded.config.id2label == NEW_LABELS and loaded.config.palette is None
    model.eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values).logits, model(pixel_values).logits, rtol=0, atol=1e-6)

    photo = Image.fromarray(torch.randint(0, 256, (60, 80, 3), dtype=torch.uint8, generator=generator).numpy())
    segments = pipeline("image-segmentation", model=str(folder))(photo)
    assert segments and {segment["label"] for segment in segments} <= set(NEW_LABELS.values())
    processor = MetaSegImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        expected = processor.post_process_semantic_segmentation(loaded(**processor(photo)), target_sizes=[(60, 80)])[0]
    for segment in segments:
        mask = torch.from_numpy(np.array(segment["mask"]) == 255)
        assert torch.equal(mask, expected == label2id[segment["label"]])


def test_num_labels_with_ignore_mismatched_sizes_loads_and_reloads(tiny_dir, tmp_path):
    """The route the load error recommends: `num_labels=3, ignore_mismatched_sizes=True` on a checkpoint
    whose config carries a 7-colour palette; the saved model loads again."""
    model = MetaSegForSemanticSegmentation.from_pretrained(tiny_dir, num_labels=3, ignore_mismatched_sizes=True)
    assert model.config.num_labels == 3 and model.config.palette is None
    assert model.decode_head.classifier.out_channels == 3
    model.save_pretrained(tmp_path / "three")
    assert MetaSegForSemanticSegmentation.from_pretrained(tmp_path / "three").config.num_labels == 3


def test_a_palette_that_no_longer_fits_the_labels_never_stops_loading(tiny_folder, tmp_path):
    """Setting new labels on a config drops the old palette; a config saved with a stale palette (as older
    versions wrote) loads without it; a palette that fits is kept."""
    config = MetaSegConfig.from_pretrained(tiny_folder)
    config.palette = [[index, 0, 0] for index in range(5)]
    config.num_labels = 5  # same classes: kept
    assert len(config.palette) == 5
    config.id2label = NEW_LABELS
    assert config.palette is None
    folder = tmp_path / "stale"
    shutil.copytree(tiny_folder, folder)
    saved = json.loads((folder / "config.json").read_text())
    saved["palette"] = [[0, 0, 0]] * 150
    (folder / "config.json").write_text(json.dumps(saved))
    assert MetaSegForSemanticSegmentation.from_pretrained(folder).config.palette is None
    saved["palette"] = [[index, 1, 2] for index in range(5)]
    (folder / "config.json").write_text(json.dumps(saved))
    assert MetaSegConfig.from_pretrained(folder).palette[4] == [4, 1, 2]
