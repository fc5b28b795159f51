"""The library side of fine-tuning MetaSeg, so that `examples/train.py` stays a list of steps.

- `build_model`: a pretrained folder / Hub id, an official preset or architecture trained from scratch,
  optionally an ImageNet MSCAN checkpoint for the encoder; the classifier follows the data's labels.
- `create_optimizer`: AdamW with the official parameter groups (decode head at 10x the learning
  rate, no weight decay on the encoder's BatchNorm and LayerNorm parameters).
- `create_scheduler`: MMCV's linear warm-up + polynomial decay (`"polynomial"`), or any Transformers
  scheduler by name.
- `set_cpu_threads`: a single CPU process uses the machine's cores, also under `accelerate launch`.

The rest of a training run lives with what it is about: the data and augmentation in `data.py`,
crash-safe checkpoints in `checkpoints.py`, the validation in `evaluation.py`, the model card in `hub.py`,
preset names in `presets.py`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from .presets import DATASETS, OFFICIAL_TRAINING_RECIPE, preset_config_kwargs

# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def load_backbone_checkpoint(model, path: str | os.PathLike) -> None:
    """Loads ImageNet MSCAN weights into `model.metaseg` (the encoder), from an official `.pth`
    (keys with or without `backbone.`) or a folder converted with `backbone_only=True`.
    Raises with the missing / unexpected keys when the encoder does not match."""
    from .conversion import check_state_dict_matches, convert_state_dict, load_official_checkpoint

    path = Path(path)
    encoder = model.metaseg
    if path.is_dir():
        from .modeling_metaseg import MetaSegModel

        state_dict = MetaSegModel.from_pretrained(path).state_dict()
    else:
        state_dict = convert_state_dict(load_official_checkpoint(path)["state_dict"], backbone_only=True).state_dict
    check_state_dict_matches(encoder, state_dict, str(path))
    encoder.load_state_dict(state_dict, strict=True)


def build_model(
    id2label: dict,
    model_name_or_path: str | None = None,
    config_name: str | None = None,
    backbone_checkpoint: str | None = None,
    trust_remote_code: bool = False,
    token: str | None = None,
    **config_overrides,
):
    """The model to fine-tune, with one output per class of `id2label`.

    - `model_name_or_path`: a MetaSeg folder or Hub id (a segmentation model, or an encoder-only
      `MetaSegModel` folder); the classifier is re-created (`ignore_mismatched_sizes`) when the
      number of labels differs.
    - otherwise `config_name` (a preset, see `preset_config_kwargs`, or a config folder / JSON
      file) built from scratch; `"metaseg-t"` when neither is given.
    - `backbone_checkpoint`: ImageNet MSCAN weights loaded into the encoder afterwards.
    `config_overrides` (e.g. `semantic_loss_average`) are set on the configuration.
    """
    from .configuration_metaseg import MetaSegConfig
    from .modeling_metaseg import MetaSegForSemanticSegmentation

    id2label = {int(key): str(value) for key, value in id2label.items()}
    label2id = {value: key for key, value in id2label.items()}
    if model_name_or_path:
        from transformers import AutoConfig, AutoModelForSemanticSegmentation

        config = AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code, token=token)
        config.id2label, config.label2id = id2label, label2id
        for key, value in config_overrides.items():
            setattr(config, key, value)
        model = AutoModelForSemanticSegmentation.from_pretrained(
            model_name_or_path, config=config, ignore_mismatched_sizes=True, trust_remote_code=trust_remote_code, token=token
        )
    else:
        name = config_name or "metaseg-t"
        path = Path(name)
        if path.is_dir() or path.suffix == ".json":
            kwargs = MetaSegConfig.from_pretrained(path).to_dict() if path.is_dir() else json.loads(path.read_text())
            for key in ("id2label", "label2id", "num_labels", "palette", "architectures", "transformers_version", "model_type", "auto_map"):
                kwargs.pop(key, None)
        else:
            kwargs = preset_config_kwargs(name)
            kwargs.pop("id2label", None)
        kwargs.update(config_overrides)
        model = MetaSegForSemanticSegmentation(MetaSegConfig(**kwargs, id2label=id2label, label2id=label2id))
    if backbone_checkpoint:
        load_backbone_checkpoint(model, backbone_checkpoint)
    return model


def build_image_processor(model_name_or_path: str | None, dataset_format: str, do_reduce_labels: bool,
                          image_size: int | None = None, token: str | None = None):
    """The image processor saved next to the trained model: the pretrained folder's when it has one,
    else the official test pipeline of the dataset layout (ADE20K / Cityscapes), else the default one;
    for the synthetic scenes, a (4 x size, size) box as ADE20K's (2048, 512). Label reduction follows the data."""
    from .image_processing_metaseg import MetaSegImageProcessor

    processor = None
    if model_name_or_path:
        try:
            processor = MetaSegImageProcessor.from_pretrained(model_name_or_path, token=token)
        except (OSError, ValueError):
            processor = None
    if processor is None:
        if dataset_format in DATASETS:
            dataset = DATASETS[dataset_format]
            processor = MetaSegImageProcessor(size=dict(dataset["size"]), size_divisor=dataset["size_divisor"])
        elif dataset_format == "synthetic" and image_size:
            processor = MetaSegImageProcessor(size={"shortest_edge": image_size, "longest_edge": 4 * image_size})
        else:
            processor = MetaSegImageProcessor()
    processor.do_reduce_labels = bool(do_reduce_labels)
    return processor


# ---------------------------------------------------------------------------------------------------
# Optimizer and schedule
# ---------------------------------------------------------------------------------------------------


def parameter_groups(
    model: nn.Module,
    learning_rate: float,
    weight_decay: float,
    head_lr_multiplier: float = OFFICIAL_TRAINING_RECIPE["head_lr_multiplier"],
    no_decay_on_norms: bool = OFFICIAL_TRAINING_RECIPE["no_decay_on_norms"],
) -> list[dict]:
    """AdamW parameter groups of the official recipe.

    - `encoder`: the MSCAN encoder at `learning_rate` with `weight_decay`;
    - `encoder_norms`: its BatchNorm and LayerNorm weights and biases, without weight decay when
      `no_decay_on_norms` (the official `paramwise_cfg` matches parameter names containing "norm";
      here every encoder normalisation layer is matched by type, the stem's BatchNorms included);
    - `decode_head`: everything else (the decoder and classifier) at `head_lr_multiplier` x the
      learning rate, with weight decay (the official "head" key matches before "norm").
    Empty groups are left out; every trainable parameter is in exactly one group.
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
    norm_parameters = set()
    encoder_parameters = set()
    encoder = getattr(model, "metaseg", None)
    if encoder is None:
        raise ValueError(f"{type(model).__name__} has no `metaseg` encoder; expected a MetaSegForSemanticSegmentation")
    for module in encoder.modules():
        if isinstance(module, norm_types):
            norm_parameters.update(id(parameter) for parameter in module.parameters(recurse=False))
    encoder_parameters.update(id(parameter) for parameter in encoder.parameters())
    groups = {"encoder": [], "encoder_norms": [], "decode_head": []}
    for parameter in model.parameters():
        if not parameter.requires_grad:
            continue
        if id(parameter) in encoder_parameters:
            groups["encoder_norms" if id(parameter) in norm_parameters else "encoder"].append(parameter)
        else:
            groups["decode_head"].append(parameter)
    settings = {
        "encoder": (learning_rate, weight_decay),
        "encoder_norms": (learning_rate, 0.0 if no_decay_on_norms else weight_decay),
        "decode_head": (learning_rate * head_lr_multiplier, weight_decay),
    }
    return [
        {"name": name, "params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def create_optimizer(
    model: nn.Module,
    learning_rate: float = OFFICIAL_TRAINING_RECIPE["learning_rate"],
    weight_decay: float = OFFICIAL_TRAINING_RECIPE["weight_decay"],
    head_lr_multiplier: float = OFFICIAL_TRAINING_RECIPE["head_lr_multiplier"],
    no_decay_on_norms: bool = OFFICIAL_TRAINING_RECIPE["no_decay_on_norms"],
    betas: tuple[float, float] = (OFFICIAL_TRAINING_RECIPE["adam_beta1"], OFFICIAL_TRAINING_RECIPE["adam_beta2"]),
) -> torch.optim.AdamW:
    """AdamW over `parameter_groups` (the official optimizer)."""
    groups = parameter_groups(model, learning_rate, weight_decay, head_lr_multiplier, no_decay_on_norms)
    return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, weight_decay=weight_decay)


def warmup_polynomial_factor(step: int, num_warmup_steps: int, num_training_steps: int,
                             warmup_ratio: float = OFFICIAL_TRAINING_RECIPE["warmup_ratio"],
                             power: float = OFFICIAL_TRAINING_RECIPE["poly_power"]) -> float:
    """MMCV's `poly` policy with linear warm-up, as a factor of the base learning rate at 0-based `step`.

    poly(step) = (1 - step / num_training_steps) ** power (down to 0 at the end); during warm-up it is
    multiplied by 1 - (1 - step / num_warmup_steps) * (1 - warmup_ratio), rising from warmup_ratio.
    """
    progress = min(step, num_training_steps) / max(num_training_steps, 1)
    factor = (1.0 - progress) ** power
    if step < num_warmup_steps:
        factor *= 1.0 - (1.0 - step / num_warmup_steps) * (1.0 - warmup_ratio)
    return factor


def create_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = OFFICIAL_TRAINING_RECIPE["lr_scheduler_type"],
    num_warmup_steps: int = OFFICIAL_TRAINING_RECIPE["num_warmup_steps"],
    num_training_steps: int = OFFICIAL_TRAINING_RECIPE["max_train_steps"],
    warmup_ratio: float = OFFICIAL_TRAINING_RECIPE["warmup_ratio"],
    power: float = OFFICIAL_TRAINING_RECIPE["poly_power"],
):
    """The learning-rate schedule, stepped once per optimizer step.

    `"polynomial"` is the official MMCV schedule (`warmup_polynomial_factor`); any other name is
    passed to `transformers.get_scheduler` (`"linear"`, `"cosine"`, `"constant_with_warmup"`, ...).
    """
    if name == "polynomial":
        def factor(step):
            return warmup_polynomial_factor(step, num_warmup_steps, num_training_steps, warmup_ratio, power)

        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    from transformers import get_scheduler

    return get_scheduler(name, optimizer, num_warmup_steps=num_warmup_steps, num_training_steps=num_training_steps)


# ---------------------------------------------------------------------------------------------------
# CPU threads
# ---------------------------------------------------------------------------------------------------

# Exported by `accelerate launch` into the script's environment, whatever its flags and config.
_ACCELERATE_LAUNCH_VARIABLE = "ACCELERATE_DYNAMO_BACKEND"


def set_cpu_threads(accelerator, num_threads: int | None = None) -> int:
    """Sets torch's intra-op threads of a single-process CPU run and returns the number in use.

    `num_threads` when given. Otherwise all the cores this process may use when the thread count is
    `accelerate launch`'s default: without `--num_cpu_threads_per_process` or a config it exports
    OMP_NUM_THREADS=1 (the value it reads from the environment, 1 when unset), which leaves one process on one
    core (the CPU demo ran 5 minutes on 2 cores instead of about half of that). A thread count the user set
    (OMP_NUM_THREADS other than 1, or a plain `python` run) is kept; under `accelerate launch`, an explicit
    OMP_NUM_THREADS=1 looks like the default, so pass `num_threads=1` for one thread. Runs with several
    processes or on an accelerator keep what Accelerate set.
    """
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        torch.set_num_threads(num_threads)
    elif (
        accelerator.num_processes == 1
        and accelerator.device.type == "cpu"
        and os.environ.get("OMP_NUM_THREADS") == "1"
        and _ACCELERATE_LAUNCH_VARIABLE in os.environ
    ):
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))
    return torch.get_num_threads()


__all__ = [
    "build_image_processor",
    "build_model",
    "create_optimizer",
    "create_scheduler",
    "load_backbone_checkpoint",
    "parameter_groups",
    "set_cpu_threads",
    "warmup_polynomial_factor",
]
