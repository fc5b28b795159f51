"""The library side of fine-tuning MetaSeg, so that `examples/train.py` stays a list of steps.

- `build_model`: a pretrained folder / Hub id, an official preset or architecture trained from scratch,
  optionally an ImageNet MSCAN checkpoint for the encoder; the classifier follows the data's labels.
- `create_optimizer`: AdamW with the official parameter groups (decode head at 10x the learning
  rate, no weight decay on the encoder's BatchNorm and LayerNorm parameters).
- `create_scheduler`: MMCV's linear warm-up + polynomial decay (`"polynomial"`), or any Transformers
  scheduler by name.
- `save_checkpoint` / `find_latest_checkpoint`: crash-safe `accelerator.save_state` checkpoints.
- `evaluate_segmentation`: whole-image validation on every process, summed into one metric.
- `training_card_sections`: the model card's training data, recipe and results.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .metrics import StreamingMeanIoU
from .presets import ARCHITECTURES, DATASETS, OFFICIAL_TRAINING_RECIPE, VARIANTS

CHECKPOINT_PREFIX = "checkpoint-"
COMPLETE_MARKER = "checkpoint_complete.json"
_TEMPORARY_PREFIX = ".tmp-" + CHECKPOINT_PREFIX
_TRASH_PREFIX = ".old-" + CHECKPOINT_PREFIX


# ---------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------


def preset_config_kwargs(config_name: str) -> dict:
    """`MetaSegConfig` keyword arguments of a preset: an official variant (`"metaseg-t-ade20k"`) or an
    architecture (`"metaseg-t"`, `"metaseg-b"`, `"t"`, `"b"`; decoder width of its ADE20K variant)."""
    from .presets import variant_config_kwargs

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
    raise ValueError(f"Unknown --config_name {config_name!r}; use a config folder / JSON file or one of: {', '.join(known)}")


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
        if getattr(config, "model_type", None) == "metaseg" and config.palette is not None and len(config.palette) != len(id2label):
            config.palette = None  # the palette belongs to the old classes
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


def convert_to_sync_batchnorm(model: nn.Module) -> nn.Module:
    """BatchNorm -> SyncBatchNorm (statistics over all GPUs' samples), for multi-GPU training."""
    return nn.SyncBatchNorm.convert_sync_batchnorm(model)


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
# Crash-safe checkpoints
# ---------------------------------------------------------------------------------------------------


def _fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")) + [folder]:
        try:
            descriptor = os.open(path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.fsync(descriptor)
        except OSError:
            pass
        finally:
            os.close(descriptor)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The step of a `checkpoint-<step>` folder name (None for other names)."""
    match = re.fullmatch(re.escape(CHECKPOINT_PREFIX) + r"(\d+)", Path(path).name)
    return int(match.group(1)) if match else None


def is_complete_checkpoint(path: str | os.PathLike) -> bool:
    """True for a `checkpoint-<step>` folder whose save finished (it holds the completion marker)."""
    path = Path(path)
    return path.is_dir() and checkpoint_step(path) is not None and (path / COMPLETE_MARKER).is_file()


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in `output_dir`, oldest step first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [path for path in output_dir.iterdir() if is_complete_checkpoint(path)]
    return sorted(found, key=checkpoint_step)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in `output_dir` (None when there is none). Folders of saves
    that were interrupted are never returned: they lack the marker or keep their temporary name."""
    checkpoints = list_checkpoints(output_dir)
    return checkpoints[-1] if checkpoints else None


def resolve_checkpoint(value: str, output_dir: str | os.PathLike) -> Path | None:
    """`--resume_from_checkpoint`: `"latest"` -> the newest complete checkpoint of `output_dir` (None
    when there is none yet: the run starts from scratch), or a path that must be a complete checkpoint."""
    if value == "latest":
        return find_latest_checkpoint(output_dir)
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"--resume_from_checkpoint {value}: no such folder")
    if not (path / COMPLETE_MARKER).is_file():
        raise ValueError(
            f"--resume_from_checkpoint {value}: {COMPLETE_MARKER} is missing, so this checkpoint's save never "
            f"finished; use --resume_from_checkpoint latest to pick the newest complete one"
        )
    return path


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """The training position saved with a checkpoint (`completed_steps`, `epoch`, `batches_in_epoch`, ...)."""
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Deletes the temporary folders of interrupted saves; returns what it removed (main process only)."""
    output_dir = Path(output_dir)
    removed = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.is_dir() and (path.name.startswith(_TEMPORARY_PREFIX) or path.name.startswith(_TRASH_PREFIX)):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def save_checkpoint(accelerator, output_dir: str | os.PathLike, step: int, training_state: dict,
                    total_limit: int | None = None) -> Path:
    """`accelerator.save_state` into `output_dir/checkpoint-<step>`, crash-safely. Call it on every process.

    The state is written into a temporary folder; once every process has finished, the main process
    writes the completion marker (with `training_state`), flushes everything to disk and renames the
    folder to `checkpoint-<step>` in one atomic step. A kill at any moment leaves either no
    `checkpoint-<step>` or a complete one, so `find_latest_checkpoint` never picks a broken save.
    `total_limit` keeps only that many newest checkpoints.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
    temporary = output_dir / f"{_TEMPORARY_PREFIX}{step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if temporary.exists():
            shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        marker = temporary / COMPLETE_MARKER
        marker.write_text(json.dumps({"step": step, **training_state}, indent=2), encoding="utf-8")
        _fsync_tree(temporary)
        if final.exists():  # re-saving a step (a resumed run repeating a save): swap the folders
            trash = output_dir / f"{_TRASH_PREFIX}{step}"
            if trash.exists():
                shutil.rmtree(trash)
            os.replace(final, trash)
            os.replace(temporary, final)
            shutil.rmtree(trash)
        else:
            os.replace(temporary, final)
        _fsync_tree_dir(output_dir)
        if total_limit is not None and total_limit > 0:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _fsync_tree_dir(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------------
# Evaluation during training
# ---------------------------------------------------------------------------------------------------


def logits_to_label_size(logits: torch.Tensor, input_size, label_size) -> torch.Tensor:
    """Official `whole` inference resize: (C, h8, w8) logits -> bilinear to the network input size,
    then to the label's original size; returns the (H, W) argmax."""
    logits = logits[None].float()
    if tuple(logits.shape[-2:]) != tuple(input_size):
        logits = F.interpolate(logits, size=tuple(input_size), mode="bilinear", align_corners=False)
    if tuple(logits.shape[-2:]) != tuple(label_size):
        logits = F.interpolate(logits, size=tuple(label_size), mode="bilinear", align_corners=False)
    return logits[0].argmax(dim=0)


@torch.no_grad()
def evaluate_segmentation(model, dataset, accelerator, metric: StreamingMeanIoU, batch_size: int = 1,
                          num_workers: int = 0) -> StreamingMeanIoU:
    """Scores `model` (whole-image inference) on an evaluation dataset, on every process at once.

    Each process takes every `num_processes`-th image (no padding, no duplicates: each image is
    counted once), predicts at the processed size, resizes the logits to the label's original size
    and adds the argmax to its confusion matrix; the matrices are then summed over processes.
    Processes with fewer images run a repeated image without scoring it, so every process makes the
    same number of forward calls (needed by FSDP / DeepSpeed). Returns the summed metric.
    Only one batch of logits exists at a time. `accelerator=None` evaluates every image in this
    process, on the model's device, and returns `metric` itself.
    """
    from torch.utils.data import DataLoader, Subset

    from .data import collate_list, shard_indices

    was_training = model.training
    model.eval()
    metric.reset()
    count = len(dataset)
    process_index, num_processes = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    device = accelerator.device if accelerator else next(model.parameters()).device
    indices = shard_indices(count, process_index, num_processes)
    per_process = math.ceil(count / num_processes)
    scored = [True] * len(indices)
    if len(indices) < per_process:  # pad with unscored repeats so that every process runs as many batches
        indices += [indices[0] if indices else 0] * (per_process - len(indices))
        scored += [False] * (per_process - len(scored))
    loader = DataLoader(
        Subset(dataset, indices), batch_size=batch_size, collate_fn=collate_list, num_workers=num_workers,
        generator=torch.Generator(),
    )
    position = 0
    for batch in loader:
        groups = {}
        for offset, item in enumerate(batch):
            groups.setdefault(tuple(item["pixel_values"].shape), []).append((position + offset, item))
        position += len(batch)
        for shape, members in groups.items():
            pixel_values = torch.stack([item["pixel_values"] for _, item in members]).to(device)
            logits = model(pixel_values=pixel_values).logits
            for (index, item), item_logits in zip(members, logits):
                if not scored[index]:
                    continue
                prediction = logits_to_label_size(item_logits, shape[-2:], item["labels"].shape[-2:])
                metric.update(prediction, item["labels"].to(prediction.device))
    if was_training:
        model.train()
    return metric.synced(accelerator) if accelerator is not None else metric


# ---------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------


def _percent(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.2f}"


def training_card_sections(data_description: str, id2label: dict, hyperparameters: dict, results: dict | None,
                           command: str | None = None) -> dict[str, str]:
    """Model-card sections (heading -> markdown) for a trained model: training data, training
    procedure (the resolved recipe), evaluation results with a per-class table."""
    names = [id2label[index] for index in sorted(id2label)]
    shown = ", ".join(f"`{name}`" for name in names[:40]) + (f" ... ({len(names)} in all)" if len(names) > 40 else "")
    sections = {"Training data": f"Trained on {data_description}.\n\n{len(names)} classes: {shown}."}
    rows = ["| setting | value |", "|---|---|"] + [f"| {key} | {value} |" for key, value in hyperparameters.items()]
    procedure = "Trained with `examples/train.py` of metaseg-hf (Accelerate).\n\n" + "\n".join(rows)
    if command:
        procedure += f"\n\nCommand:\n\n```bash\n{command}\n```"
    sections["Training procedure"] = procedure
    if results:
        lines = [
            f"Validation (whole-image inference at the official test size, scored at the labels' original resolution): "
            f"**mIoU {_percent(results['mean_iou'])}**, mean accuracy {_percent(results['mean_accuracy'])}, "
            f"overall accuracy {_percent(results['overall_accuracy'])}.",
            "",
            "| class | IoU | accuracy |",
            "|---|---|---|",
        ]
        lines += [f"| {row['name']} | {_percent(row['iou'])} | {_percent(row['accuracy'])} |" for row in results["per_class"]]
        sections["Evaluation results"] = "\n".join(lines)
    return sections


__all__ = [
    "CHECKPOINT_PREFIX",
    "COMPLETE_MARKER",
    "build_image_processor",
    "build_model",
    "checkpoint_step",
    "convert_to_sync_batchnorm",
    "create_optimizer",
    "create_scheduler",
    "evaluate_segmentation",
    "find_latest_checkpoint",
    "is_complete_checkpoint",
    "list_checkpoints",
    "load_backbone_checkpoint",
    "logits_to_label_size",
    "parameter_groups",
    "preset_config_kwargs",
    "read_training_state",
    "remove_incomplete_checkpoints",
    "resolve_checkpoint",
    "save_checkpoint",
    "training_card_sections",
    "warmup_polynomial_factor",
]
