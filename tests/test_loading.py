"""Round trips: save/load, the Auto classes, trust_remote_code without metaseg_hf, an offline Hub cache."""

import json
import textwrap

import pytest
import torch
from transformers import AutoBackbone, AutoConfig, AutoModel, AutoModelForSemanticSegmentation

from helpers import BLOCK_METASEG_HF, make_hub_cache, run_python, tiny_config
from metaseg_hf import MetaSegBackbone, MetaSegConfig, MetaSegForSemanticSegmentation, MetaSegModel


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from metaseg_hf import MetaSegImageProcessor

    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(tiny_config(id2label={i: f"class{i}" for i in range(5)})).eval()
    folder = tmp_path_factory.mktemp("tiny") / "metaseg-tiny"
    model.save_pretrained(folder)
    MetaSegImageProcessor().save_pretrained(folder)
    return folder


def test_save_load_round_trip_keeps_outputs_and_config(tiny_folder):
    model = MetaSegForSemanticSegmentation.from_pretrained(tiny_folder).eval()
    again = MetaSegForSemanticSegmentation.from_pretrained(tiny_folder).eval()
    pixel_values = torch.randn(1, 3, 64, 64)
    assert torch.equal(model(pixel_values).logits, again(pixel_values).logits)
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
