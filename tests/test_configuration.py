"""MetaSegConfig: presets reachable by name, inconsistent settings refused with the fields named."""

import pytest

from metaseg_hf import MetaSegConfig
from metaseg_hf.presets import VARIANTS, variant_config_kwargs


def test_every_official_variant_is_a_preset():
    assert MetaSegConfig.preset_names() == list(VARIANTS)
    config = MetaSegConfig.from_preset("metaseg-b-cityscapes")
    assert config.hidden_sizes == [64, 128, 320, 512] and config.depths == [3, 3, 12, 3]
    assert config.decoder_hidden_size == 512 and config.num_labels == 19 and config.id2label[0] == "road"
    assert config.inference_mode == "slide"
    assert (config.sliding_window_size, config.sliding_window_stride) == (1024, 768)
    assert MetaSegConfig.from_preset("metaseg-t-coco-stuff164k").num_labels == 171


def test_preset_overrides_replace_the_label_set():
    config = MetaSegConfig.from_preset("metaseg-t-ade20k", num_labels=3)
    assert config.num_labels == 3 and config.hidden_sizes == [32, 64, 160, 256]
    config = MetaSegConfig.from_preset("metaseg-t-ade20k", id2label={0: "road", 1: "sky"})
    assert config.label2id == {"road": 0, "sky": 1}


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown MetaSeg variant 'metaseg-x'.*metaseg-t-ade20k"):
        MetaSegConfig.from_preset("metaseg-x")
    with pytest.raises(ValueError, match=r"Unknown MetaSeg variant"):
        variant_config_kwargs("nope")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"depths": [3, 3, 5]}, r"len\(hidden_sizes\) = 4 but len\(depths\) = 3"),
        ({"mlp_ratios": [8, 8]}, r"len\(mlp_ratios\) = 2 but len\(depths\) = 4"),
        ({"decoder_num_attention_heads": [2, 4]}, r"len\(decoder_num_attention_heads\) = 2 but the decoder reads 3 stages"),
        ({"decoder_num_attention_heads": [2, 3, 8]}, r"hidden_sizes\[2\] = 160 \(stage 3\) is not divisible by decoder_num_attention_heads\[1\] = 3"),
        ({"decoder_pool_ratios": [8, 0, 2]}, r"decoder_pool_ratios = \[8, 0, 2\]: every value must be a positive integer"),
        ({"attention_strip_sizes": [7, 10, 21]}, r"attention_strip_sizes = \[7, 10, 21\]: kernel sizes must be odd"),
        ({"drop_path_rate": 1.5}, r"drop_path_rate = 1.5: must be in \[0, 1\)"),
        ({"semantic_loss_average": "sum"}, r"semantic_loss_average = 'sum'"),
        ({"inference_mode": "slide"}, r"inference_mode = 'slide' needs sliding_window_size and sliding_window_stride"),
        ({"inference_mode": "tiles"}, r"inference_mode = 'tiles': must be one of"),
        ({"num_labels": 3, "palette": [[0, 0, 0]]}, r"palette has 1 colours but num_labels = 3"),
        ({"id2label": {0: "road", 2: "sky"}}, r"id2label must number the classes 0\.\.1 without gaps, but ids \[1\] are missing"),
    ],
)
def test_inconsistent_settings_fail_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MetaSegConfig(**kwargs)


def test_all_problems_are_reported_at_once():
    with pytest.raises(ValueError) as error:
        MetaSegConfig(depths=[1, 1, 1], drop_path_rate=2.0)
    assert "len(hidden_sizes)" in str(error.value) and "drop_path_rate" in str(error.value)


def test_backbone_stage_names_and_outputs():
    config = MetaSegConfig(out_features=["stage1", "stage3"])
    assert config.stage_names == ["stage1", "stage2", "stage3", "stage4"]
    assert config.out_indices == [0, 2]
    with pytest.raises(ValueError, match="out_features must be a subset of stage_names"):
        MetaSegConfig(out_features=["stem"])
