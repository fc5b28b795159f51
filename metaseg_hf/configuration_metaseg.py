"""MetaSeg model configuration."""

from transformers.backbone_utils import BackboneConfigMixin
from transformers.configuration_utils import PretrainedConfig
from transformers.utils import logging

from .image_io import IGNORE_INDEX
from .ops_metaseg import IMPLEMENTATIONS
from .presets import VARIANTS, variant_config_kwargs

logger = logging.get_logger(__name__)

INFERENCE_MODES = ("whole", "slide")
LOSS_AVERAGES = ("valid_pixels", "all_pixels")

# Written into every saved config so that a Hub folder loads through each Auto class with
# `trust_remote_code=True` where metaseg-hf is not installed (the code files are saved beside it).
AUTO_MAP = {
    "AutoConfig": "configuration_metaseg.MetaSegConfig",
    "AutoModel": "modeling_metaseg.MetaSegModel",
    "AutoModelForSemanticSegmentation": "modeling_metaseg.MetaSegForSemanticSegmentation",
    "AutoBackbone": "modeling_metaseg.MetaSegBackbone",
}


class MetaSegConfig(BackboneConfigMixin, PretrainedConfig):
    r"""
    Configuration of a MetaSeg model: the MSCAN encoder (four stages of multi-scale convolutional
    attention blocks) and the MetaSeg decoder (one Global Meta Block with Channel Reduction Attention
    per encoder stage 2-4, fused into stride-8 logits). The defaults build the MetaSeg-T
    architecture with Transformers' default two labels; `MetaSegConfig.from_preset(name)` builds
    any of the six official variants with their classes.

    Args:
        num_channels (`int`, defaults to 3): input image channels.
        hidden_sizes (`list[int]`, defaults to `[32, 64, 160, 256]`): MSCAN width of each stage.
        depths (`list[int]`, defaults to `[3, 3, 5, 2]`): MSCAN blocks per stage.
        mlp_ratios (`list[int]`, defaults to `[8, 8, 4, 4]`): MSCAN MLP expansion per stage.
        attention_kernel_size (`int`, defaults to 5): depthwise kernel of the multi-scale
            convolutional attention before its strip branches.
        attention_strip_sizes (`list[int]`, defaults to `[7, 11, 21]`): lengths of the 1xk + kx1
            depthwise strip branches of the multi-scale convolutional attention.
        drop_path_rate (`float`, defaults to 0.1): stochastic depth of the last MSCAN block (linear
            from 0 over all blocks).
        hidden_act (`str`, defaults to `"gelu"`): activation of the encoder and decoder.
        layer_scale_init_value (`float`, defaults to 0.01): initial value of the MSCAN layer scales.
        decoder_hidden_size (`int`, defaults to 128): width of the fused decoder features.
        decoder_num_attention_heads (`list[int]`, defaults to `[2, 4, 8]`): heads of the Channel
            Reduction Attention for encoder stages 2, 3, 4.
        decoder_pool_ratios (`list[int]`, defaults to `[8, 4, 2]`): average-pooling ratio of the keys
            and values for encoder stages 2, 3, 4.
        decoder_mlp_ratio (`int`, defaults to 2): expansion of the Global Meta Block MLP.
        decoder_drop_path_rate (`float`, defaults to 0.1): stochastic depth of each Global Meta Block.
        decoder_hidden_dropout_prob (`float`, defaults to 0.1): dropout inside the Global Meta Block MLP.
        classifier_dropout_prob (`float`, defaults to 0.1): `Dropout2d` before the classifier.
        layer_norm_eps (`float`, defaults to 1e-5): epsilon of the LayerNorms.
        batch_norm_eps (`float`, defaults to 1e-5): epsilon of the BatchNorms.
        initializer_range (`float`, defaults to 0.02): std of the truncated normal for linear layers.
        semantic_loss_ignore_index (`int`, defaults to 255): label value ignored by the loss.
        semantic_loss_average (`str`, defaults to `"valid_pixels"`): `"valid_pixels"` averages the
            cross-entropy over non-ignored pixels (Transformers' convention); `"all_pixels"` divides by
            every pixel, ignored ones included (MMSegmentation 0.24, the official training).
        inference_mode (`str`, defaults to `"whole"`): the official test mode, `"whole"` or `"slide"`.
        sliding_window_size (`int`, *optional*): window side in `"slide"` mode.
        sliding_window_stride (`int`, *optional*): window stride in `"slide"` mode.
        palette (`list[list[int]]`, *optional*): an RGB colour per class, for drawing segmentations. It
            belongs to the classes: when the labels change to another number of classes (`id2label` or
            `num_labels` set on the config, or passed to `from_pretrained` to fine-tune a converted
            checkpoint), the palette is dropped and drawings use generated colours; a saved config whose
            palette does not fit its labels loads without it (with a warning).
        depthwise_implementation (`str`, defaults to `"auto"`): how the encoder's depthwise convolutions
            run (`metaseg_hf.ops_metaseg`): `"library"` (`F.conv2d`), `"stencil"` (shifted-slice sums that
            Inductor fuses), `"triton"` (the Triton kernels, CUDA only, not yet measured on a GPU), or
            `"auto"`: the stencil while `torch.compile` traces GPU inference, the library everywhere else.
            Same weights and results whichever is chosen; can be changed on a loaded model's config.
        out_features / out_indices: stages returned by `MetaSegBackbone` (`"stage1"` ... `"stage4"`).

    Example:

    ```python
    >>> from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation
    >>> config = MetaSegConfig.from_preset("metaseg-b-ade20k")
    >>> model = MetaSegForSemanticSegmentation(config)
    ```
    """

    model_type = "metaseg"
    attribute_map = {"num_hidden_layers": "num_stages"}

    def __init__(
        self,
        num_channels=3,
        hidden_sizes=(32, 64, 160, 256),
        depths=(3, 3, 5, 2),
        mlp_ratios=(8, 8, 4, 4),
        attention_kernel_size=5,
        attention_strip_sizes=(7, 11, 21),
        drop_path_rate=0.1,
        hidden_act="gelu",
        layer_scale_init_value=0.01,
        decoder_hidden_size=128,
        decoder_num_attention_heads=(2, 4, 8),
        decoder_pool_ratios=(8, 4, 2),
        decoder_mlp_ratio=2,
        decoder_drop_path_rate=0.1,
        decoder_hidden_dropout_prob=0.1,
        classifier_dropout_prob=0.1,
        layer_norm_eps=1e-5,
        batch_norm_eps=1e-5,
        initializer_range=0.02,
        semantic_loss_ignore_index=IGNORE_INDEX,
        semantic_loss_average="valid_pixels",
        inference_mode="whole",
        sliding_window_size=None,
        sliding_window_stride=None,
        palette=None,
        depthwise_implementation="auto",
        out_features=None,
        out_indices=None,
        **kwargs,
    ):
        self.num_channels = num_channels
        self.hidden_sizes = list(hidden_sizes)
        self.depths = list(depths)
        self.mlp_ratios = list(mlp_ratios)
        self.attention_kernel_size = attention_kernel_size
        self.attention_strip_sizes = list(attention_strip_sizes)
        self.drop_path_rate = drop_path_rate
        self.hidden_act = hidden_act
        self.layer_scale_init_value = layer_scale_init_value
        self.decoder_hidden_size = decoder_hidden_size
        self.decoder_num_attention_heads = list(decoder_num_attention_heads)
        self.decoder_pool_ratios = list(decoder_pool_ratios)
        self.decoder_mlp_ratio = decoder_mlp_ratio
        self.decoder_drop_path_rate = decoder_drop_path_rate
        self.decoder_hidden_dropout_prob = decoder_hidden_dropout_prob
        self.classifier_dropout_prob = classifier_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.batch_norm_eps = batch_norm_eps
        self.initializer_range = initializer_range
        self.semantic_loss_ignore_index = semantic_loss_ignore_index
        self.semantic_loss_average = semantic_loss_average
        self.inference_mode = inference_mode
        self.sliding_window_size = sliding_window_size
        self.sliding_window_stride = sliding_window_stride
        self.depthwise_implementation = depthwise_implementation
        self._validate()
        self.num_stages = len(self.depths)
        self.stage_names = [f"stage{index}" for index in range(1, self.num_stages + 1)]
        kwargs.setdefault("auto_map", dict(AUTO_MAP))
        for derived in ("num_stages", "stage_names"):  # saved by to_dict, recomputed from depths
            kwargs.pop(derived, None)
        super().__init__(**kwargs)
        if self.id2label is not None:
            missing = sorted(set(range(len(self.id2label))) - set(self.id2label))
            if missing:
                raise ValueError(
                    f"Inconsistent MetaSegConfig: id2label must number the classes 0..{len(self.id2label) - 1} without "
                    f"gaps, but ids {missing} are missing (got ids {sorted(self.id2label)}); renumber the classes or "
                    "map unused ids to a placeholder name"
                )
            if not self.label2id:
                self.label2id = {name: index for index, name in self.id2label.items()}
        # Set after the labels, so that `__setattr__` only drops it for later label changes.
        self.palette = [list(colour) for colour in palette] if palette is not None else None
        if self.palette is not None and len(self.palette) != self.num_labels:
            raise ValueError(
                f"Inconsistent MetaSegConfig: palette has {len(self.palette)} colours but num_labels = {self.num_labels}; "
                "give one colour per class, or palette=None for generated colours"
            )
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)

    def __setattr__(self, key, value):
        # The palette colours the classes it was made for: a new label set with another number of classes
        # (`config.id2label = ...`, `config.num_labels = ...`, or those passed to `from_pretrained`) drops it.
        super().__setattr__(key, value)
        if key == "id2label" and value is not None:
            palette = self.__dict__.get("palette")
            if palette is not None and len(palette) != len(value):
                logger.info(f"MetaSegConfig: the {len(palette)}-colour palette is dropped for the {len(value)} new labels")
                super().__setattr__("palette", None)

    @classmethod
    def from_dict(cls, config_dict, **kwargs):
        """`PretrainedConfig.from_dict`, where the labels may change (`num_labels` / `id2label` passed to
        `from_pretrained`): a saved palette is kept only when it fits the resulting labels, so that a
        fine-tuned model always loads (also one saved with the old classes' palette)."""
        config_dict = dict(config_dict)
        palette = config_dict.pop("palette", None)
        result = super().from_dict(config_dict, **kwargs)
        config = result[0] if isinstance(result, tuple) else result
        if palette is not None and "palette" not in kwargs:
            if len(palette) == config.num_labels:
                config.palette = [list(colour) for colour in palette]
            elif "num_labels" in kwargs or "id2label" in kwargs:  # asked for: a new label set
                logger.info(f"MetaSegConfig: the {len(palette)}-colour palette is dropped for the new labels")
            else:
                logger.warning(
                    f"MetaSegConfig: the saved palette has {len(palette)} colours but the model has {config.num_labels} "
                    "labels; it is dropped (segmentations are drawn with generated colours). Set config.palette "
                    "to one colour per class to keep your own."
                )
        return result

    def _validate(self):
        errors = []
        num_stages = len(self.depths)
        for name in ("hidden_sizes", "mlp_ratios"):
            if len(getattr(self, name)) != num_stages:
                errors.append(
                    f"len({name}) = {len(getattr(self, name))} but len(depths) = {num_stages}: give one value per stage"
                )
        if num_stages < 2:
            errors.append(f"depths = {self.depths}: MetaSeg needs at least two stages (the decoder reads stages 2+)")
        num_decoder_stages = num_stages - 1
        for name in ("decoder_num_attention_heads", "decoder_pool_ratios"):
            if len(getattr(self, name)) != num_decoder_stages:
                errors.append(
                    f"len({name}) = {len(getattr(self, name))} but the decoder reads {num_decoder_stages} stages "
                    f"(stages 2-{num_stages}): give one value per decoder stage"
                )
        if not errors:
            for stage, (width, heads) in enumerate(zip(self.hidden_sizes[1:], self.decoder_num_attention_heads), 2):
                if heads <= 0 or width % heads:
                    errors.append(
                        f"hidden_sizes[{stage - 1}] = {width} (stage {stage}) is not divisible by "
                        f"decoder_num_attention_heads[{stage - 2}] = {heads}"
                    )
        positive = {
            "num_channels": [self.num_channels],
            "depths": self.depths,
            "hidden_sizes": self.hidden_sizes,
            "mlp_ratios": self.mlp_ratios,
            "decoder_pool_ratios": self.decoder_pool_ratios,
            "attention_strip_sizes": self.attention_strip_sizes,
        }
        for name, values in positive.items():
            if any(int(value) != value or value < 1 for value in values):
                errors.append(f"{name} = {values}: every value must be a positive integer")
        kernel_sizes = {"attention_kernel_size": [self.attention_kernel_size], "attention_strip_sizes": self.attention_strip_sizes}
        for name, values in kernel_sizes.items():
            if any(value % 2 == 0 for value in values):
                errors.append(f"{name} = {getattr(self, name)}: kernel sizes must be odd so that padding keeps the map size")
        for name in ("drop_path_rate", "decoder_drop_path_rate", "decoder_hidden_dropout_prob", "classifier_dropout_prob"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                errors.append(f"{name} = {value}: must be in [0, 1)")
        if self.semantic_loss_average not in LOSS_AVERAGES:
            errors.append(f"semantic_loss_average = {self.semantic_loss_average!r}: must be one of {LOSS_AVERAGES}")
        if self.depthwise_implementation not in IMPLEMENTATIONS:
            errors.append(
                f"depthwise_implementation = {self.depthwise_implementation!r}: must be one of {IMPLEMENTATIONS}"
            )
        if self.inference_mode not in INFERENCE_MODES:
            errors.append(f"inference_mode = {self.inference_mode!r}: must be one of {INFERENCE_MODES}")
        elif self.inference_mode == "slide" and (self.sliding_window_size is None or self.sliding_window_stride is None):
            errors.append(
                "inference_mode = 'slide' needs sliding_window_size and sliding_window_stride "
                f"(got {self.sliding_window_size} and {self.sliding_window_stride})"
            )
        if errors:
            raise ValueError("Inconsistent MetaSegConfig:\n  - " + "\n  - ".join(errors))

    @classmethod
    def from_preset(cls, name: str, **kwargs) -> "MetaSegConfig":
        """The configuration of an official variant (`metaseg-{t,b}-{ade20k,cityscapes,coco-stuff164k}`).

        Keyword arguments override the preset, e.g. `num_labels=5` or `id2label={...}` to fine-tune on
        another label set.
        """
        preset = variant_config_kwargs(name)
        if "num_labels" in kwargs or "id2label" in kwargs:
            preset.pop("id2label")
        preset.update(kwargs)
        return cls(**preset)

    @staticmethod
    def preset_names() -> list[str]:
        """Names accepted by `from_preset`."""
        return list(VARIANTS)

    @property
    def decoder_hidden_sizes(self) -> list[int]:
        """Widths of the encoder stages the decoder reads (stages 2 to last)."""
        return self.hidden_sizes[1:]
