"""The one place where the official MetaSeg variants, datasets and constants are written down.

Everything here is data read from the official configurations (``hyunwoo137/MetaSeg``,
``local_configs/metaseg/``): the configuration, the image processor, the conversion script, the
examples and the tests all read it from here instead of repeating numbers.
"""

from .dataset_metadata import DATASET_CLASSES

# Official normalisation: ImageNet statistics on the 0-255 scale, RGB order. The image processor
# rescales by 1/255 first, as Transformers processors do, so it uses them divided by 255.
OFFICIAL_IMAGE_MEAN = (123.675, 116.28, 103.53)
OFFICIAL_IMAGE_STD = (58.395, 57.12, 57.375)
IMAGE_MEAN = tuple(value / 255 for value in OFFICIAL_IMAGE_MEAN)
IMAGE_STD = tuple(value / 255 for value in OFFICIAL_IMAGE_STD)

# The official multi-scale test (`MultiScaleFlipAug` with `aug_test`): resize ratios of the processor's box,
# each also flipped.
TTA_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

# MSCAN encoder sizes. MLP ratios, layer scale and stochastic depth are shared by both sizes.
ARCHITECTURES = {
    "t": {"hidden_sizes": (32, 64, 160, 256), "depths": (3, 3, 5, 2)},
    "b": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 3, 12, 3)},
}

# The official test pipeline per dataset: keep-ratio resize into the (long, short) box, then (ADE20K
# and COCO-Stuff only) up to a multiple of `size_divisor`. `crop_size` is the training crop.
DATASETS = {
    "ade20k": {
        "size": {"shortest_edge": 512, "longest_edge": 2048},
        "size_divisor": 32,
        "do_reduce_labels": True,
        "crop_size": 512,
    },
    "cityscapes": {
        "size": {"shortest_edge": 1024, "longest_edge": 2048},
        "size_divisor": None,
        "do_reduce_labels": False,
        "crop_size": 1024,
    },
    "coco-stuff164k": {
        "size": {"shortest_edge": 512, "longest_edge": 2048},
        "size_divisor": 32,
        "do_reduce_labels": False,
        "crop_size": 512,
    },
}

# The six official checkpoints. `inference` is the official `test_cfg`.
VARIANTS = {
    "metaseg-t-ade20k": {
        "architecture": "t",
        "dataset": "ade20k",
        "decoder_hidden_size": 128,
        "inference": {"mode": "whole"},
        "official_config": "metaseg.tiny.512x512.ade.160k.py",
    },
    "metaseg-b-ade20k": {
        "architecture": "b",
        "dataset": "ade20k",
        "decoder_hidden_size": 768,
        "inference": {"mode": "whole"},
        "official_config": "metaseg.base.512x512.ade.160k.py",
    },
    "metaseg-t-cityscapes": {
        "architecture": "t",
        "dataset": "cityscapes",
        "decoder_hidden_size": 128,
        "inference": {"mode": "whole"},
        "official_config": "metaseg.tiny.1024x1024.city.160k.py",
    },
    "metaseg-b-cityscapes": {
        "architecture": "b",
        "dataset": "cityscapes",
        "decoder_hidden_size": 512,
        "inference": {"mode": "slide", "crop_size": 1024, "stride": 768},
        "official_config": "metaseg.base.1024x1024.city.160k.py",
    },
    "metaseg-t-coco-stuff164k": {
        "architecture": "t",
        "dataset": "coco-stuff164k",
        "decoder_hidden_size": 128,
        "inference": {"mode": "whole"},
        "official_config": "metaseg.tiny.512x512.coco_stuff164k.80k.py",
    },
    "metaseg-b-coco-stuff164k": {
        "architecture": "b",
        "dataset": "coco-stuff164k",
        "decoder_hidden_size": 768,
        "inference": {"mode": "whole"},
        "official_config": "metaseg.base.512x512.coco_stuff164k.80k.py",
    },
}


def _check_variant(name: str) -> dict:
    if name not in VARIANTS:
        raise ValueError(f"Unknown MetaSeg variant {name!r}. Known variants: {', '.join(VARIANTS)}.")
    return VARIANTS[name]


def variant_config_kwargs(name: str) -> dict:
    """`MetaSegConfig` keyword arguments of an official variant (architecture, labels, test mode)."""
    variant = _check_variant(name)
    classes = DATASET_CLASSES[variant["dataset"]]
    inference = variant["inference"]
    kwargs = dict(ARCHITECTURES[variant["architecture"]])
    kwargs.update(
        decoder_hidden_size=variant["decoder_hidden_size"],
        id2label=dict(enumerate(classes)),
        inference_mode=inference["mode"],
    )
    if inference["mode"] == "slide":
        kwargs.update(sliding_window_size=inference["crop_size"], sliding_window_stride=inference["stride"])
    return kwargs


def variant_image_processor_kwargs(name: str) -> dict:
    """`MetaSegImageProcessor` keyword arguments reproducing the variant's official test pipeline."""
    dataset = DATASETS[_check_variant(name)["dataset"]]
    return {
        "size": dict(dataset["size"]),
        "size_divisor": dataset["size_divisor"],
        "do_reduce_labels": dataset["do_reduce_labels"],
        "image_mean": list(IMAGE_MEAN),
        "image_std": list(IMAGE_STD),
    }


def preset_config_kwargs(config_name: str) -> dict:
    """`MetaSegConfig` keyword arguments of a preset: an official variant (`"metaseg-t-ade20k"`) or an
    architecture (`"metaseg-t"`, `"metaseg-b"`, `"t"`, `"b"`; decoder width of its ADE20K variant)."""
    name = config_name.lower()
    if name in VARIANTS:
        return variant_config_kwargs(name)
    short = name.removeprefix("metaseg-").removeprefix("metaseg_")
    if short in ARCHITECTURES:
        variant = next(key for key, spec in VARIANTS.items() if spec["architecture"] == short)
        kwargs = dict(ARCHITECTURES[short])
        kwargs["decoder_hidden_size"] = VARIANTS[variant]["decoder_hidden_size"]
        return kwargs
    known = [f"metaseg-{key}" for key in ARCHITECTURES] + list(VARIANTS)
    raise ValueError(
        f"Unknown MetaSeg preset {config_name!r}; use a config folder / JSON file or one of: {', '.join(known)}"
    )


# The official training recipe (`metaseg.*.160k.py` + `schedule_160k_adamw.py` + the dataset
# pipelines). `examples/train.py` uses it as its defaults; every entry is one of its CLI flags.
OFFICIAL_TRAINING_RECIPE = {
    # AdamW; the decode head trains at 10x the learning rate; encoder normalisation layers
    # (BatchNorm and LayerNorm) without weight decay.
    "learning_rate": 6e-5,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "weight_decay": 0.01,
    "head_lr_multiplier": 10.0,
    "no_decay_on_norms": True,
    # Linear warm-up from warmup_ratio * lr over num_warmup_steps, then polynomial decay to 0.
    "lr_scheduler_type": "polynomial",
    "num_warmup_steps": 1500,
    "warmup_ratio": 1e-6,
    "poly_power": 1.0,
    "max_train_steps": 160_000,
    # Crops per optimizer step. The official configs set 8 per GPU (ADE20K, COCO-Stuff; 4 for
    # Cityscapes) and leave the GPU count to the launcher; 16 is the usual 2 x 8 (SegFormer's and
    # SegNeXt's ADE20K batch). train.py derives the per-device batch from it.
    "total_batch_size": 16,
    # Augmentation: random rescale of the (2048, crop) box by 0.5-2.0, random crop (retried up to
    # 10 times while one class covers more than cat_max_ratio of it), horizontal flip, photometric
    # distortion, then padding to the crop (image 0, labels with the ignore index).
    "scale_range": (0.5, 2.0),
    "cat_max_ratio": 0.75,
    "flip_probability": 0.5,
    "photometric_distortion": True,
    # MMSegmentation 0.24 averages the cross-entropy over all pixels, ignored ones included.
    "semantic_loss_average": "all_pixels",
}
