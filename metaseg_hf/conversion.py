"""Official MetaSeg / MSCAN checkpoints -> MetaSeg Transformers models.

`load_official_checkpoint` reads an MMSegmentation checkpoint without running any code in it;
`convert_state_dict` maps every official key to this package's names (and says which it drops);
`convert_checkpoint` builds the model, its configuration and image processor. The same mapping
converts ImageNet-pretrained MSCAN backbones (keys without the `backbone.` prefix).
"""

import os
import pickle
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .configuration_metaseg import MetaSegConfig
from .dataset_metadata import DATASET_PALETTES
from .presets import ARCHITECTURES, VARIANTS, variant_config_kwargs

# (official key pattern, our key template), tried in order; the first match wins.
_KEY_RULES = [
    (r"backbone\.patch_embed1\.proj\.0\.(.+)", r"metaseg.encoder.stages.0.patch_embeddings.conv1.\1"),
    (r"backbone\.patch_embed1\.proj\.1\.(.+)", r"metaseg.encoder.stages.0.patch_embeddings.norm1.\1"),
    (r"backbone\.patch_embed1\.proj\.3\.(.+)", r"metaseg.encoder.stages.0.patch_embeddings.conv2.\1"),
    (r"backbone\.patch_embed1\.proj\.4\.(.+)", r"metaseg.encoder.stages.0.patch_embeddings.norm2.\1"),
    (r"backbone\.patch_embed(\d+)\.(proj|norm)\.(.+)", "metaseg.encoder.stages.{0}.patch_embeddings.\\2.\\3"),
    (r"backbone\.block(\d+)\.(\d+)\.(layer_scale_1|layer_scale_2)", "metaseg.encoder.stages.{0}.blocks.\\2.\\3"),
    (r"backbone\.block(\d+)\.(\d+)\.(norm1|norm2)\.(.+)", "metaseg.encoder.stages.{0}.blocks.\\2.\\3.\\4"),
    (r"backbone\.block(\d+)\.(\d+)\.attn\.proj_1\.(.+)", "metaseg.encoder.stages.{0}.blocks.\\2.attention.proj_in.\\3"),
    (r"backbone\.block(\d+)\.(\d+)\.attn\.proj_2\.(.+)", "metaseg.encoder.stages.{0}.blocks.\\2.attention.proj_out.\\3"),
    (
        r"backbone\.block(\d+)\.(\d+)\.attn\.spatial_gating_unit\.conv0\.(.+)",
        "metaseg.encoder.stages.{0}.blocks.\\2.attention.multi_scale_attention.local_conv.\\3",
    ),
    (
        r"backbone\.block(\d+)\.(\d+)\.attn\.spatial_gating_unit\.conv(\d+)_1\.(.+)",
        "metaseg.encoder.stages.{0}.blocks.\\2.attention.multi_scale_attention.horizontal_strips.\\3.\\4",
    ),
    (
        r"backbone\.block(\d+)\.(\d+)\.attn\.spatial_gating_unit\.conv(\d+)_2\.(.+)",
        "metaseg.encoder.stages.{0}.blocks.\\2.attention.multi_scale_attention.vertical_strips.\\3.\\4",
    ),
    (
        r"backbone\.block(\d+)\.(\d+)\.attn\.spatial_gating_unit\.conv3\.(.+)",
        "metaseg.encoder.stages.{0}.blocks.\\2.attention.multi_scale_attention.channel_mixer.\\3",
    ),
    (r"backbone\.block(\d+)\.(\d+)\.mlp\.(fc1|fc2)\.(.+)", "metaseg.encoder.stages.{0}.blocks.\\2.mlp.\\3.\\4"),
    (r"backbone\.block(\d+)\.(\d+)\.mlp\.dwconv\.dwconv\.(.+)", "metaseg.encoder.stages.{0}.blocks.\\2.mlp.depthwise_conv.\\3"),
    (r"backbone\.norm(\d+)\.(.+)", "metaseg.encoder.stages.{0}.layer_norm.\\2"),
    (r"decode_head\.attn(\d+)\.norm1\.(.+)", "decode_head.global_meta_blocks.{1}.layernorm_before.\\2"),
    (r"decode_head\.attn(\d+)\.norm3\.(.+)", "decode_head.global_meta_blocks.{1}.layernorm_after.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.q\.(.+)", "decode_head.global_meta_blocks.{1}.attention.query.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.k\.(.+)", "decode_head.global_meta_blocks.{1}.attention.key.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.v\.(.+)", "decode_head.global_meta_blocks.{1}.attention.value.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.proj\.(.+)", "decode_head.global_meta_blocks.{1}.attention.proj.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.sr\.(.+)", "decode_head.global_meta_blocks.{1}.attention.reduction.\\2"),
    (r"decode_head\.attn(\d+)\.attn\.norm\.(.+)", "decode_head.global_meta_blocks.{1}.attention.layer_norm.\\2"),
    (r"decode_head\.attn(\d+)\.mlp\.(fc1|fc2)\.(.+)", "decode_head.global_meta_blocks.{1}.mlp.\\2.\\3"),
    (r"decode_head\.linear_fuse\.conv\.(.+)", r"decode_head.linear_fuse.\1"),
    (r"decode_head\.linear_fuse\.bn\.(.+)", r"decode_head.batch_norm.\1"),
    (r"decode_head\.linear_pred\.(.+)", r"decode_head.classifier.\1"),
]
_COMPILED_RULES = [(re.compile(pattern + "$"), template) for pattern, template in _KEY_RULES]

# Official keys that exist but are never used: mmseg's base head creates `conv_seg`; ImageNet
# MSCAN checkpoints carry a classifier `head`.
_DROPPED_KEYS = {
    re.compile(r"decode_head\.conv_seg\..+$"): "decode_head.conv_seg is created by MMSegmentation's base head but never used",
    re.compile(r"backbone\.head\..+$"): "the ImageNet classification head is not part of the segmentation model",
}


class CheckpointError(ValueError):
    """An official checkpoint that cannot be read or converted; the message names the file and keys."""


@dataclass
class ConvertedCheckpoint:
    """Result of `convert_state_dict`: our state dict and what was dropped (key -> reason)."""

    state_dict: dict
    dropped: dict = field(default_factory=dict)


def _numpy_safe_globals() -> list:
    """numpy's scalar, dtype and array classes, allow-listed for `torch.load(weights_only=True)`: mmcv's
    `EvalHook(save_best=...)` stores a numpy `best_score` in the checkpoint's `meta`. Rebuilding these
    runs no code beyond numpy's own constructors (the list PyTorch documents for numpy data)."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    dtypes = {type(np.dtype(name)) for name in np.typecodes["All"] if name not in "O"}
    return [core.multiarray.scalar, core.multiarray._reconstruct, np.ndarray, np.dtype, *sorted(dtypes, key=str)]


def load_official_checkpoint(path: str | os.PathLike) -> dict:
    """Reads an official `.pth` with `torch.load(weights_only=True)`: nothing in the file is executed.

    Returns the checkpoint dict (`state_dict`, and `meta` when present). A file whose pickle would
    build arbitrary objects, a truncated file or a non-checkpoint raises `CheckpointError`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise CheckpointError(f"Checkpoint {path} is empty (0 bytes); download it again.")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        forbidden = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if forbidden:
            raise CheckpointError(
                f"Refused to load {path}: its pickle would call {forbidden.group(1)}, which could run code. Nothing "
                "in it was executed. A genuine MMSegmentation checkpoint holds only tensors and plain data; only "
                "load files from sources you trust."
            ) from error
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (it may be truncated or not a .pth file); download it again."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (it may be truncated or not a .pth file): {error}"
        ) from error
    if isinstance(checkpoint, dict) and "state_dict" in checkpoint:
        state_dict = checkpoint["state_dict"]
    elif isinstance(checkpoint, dict) and all(isinstance(value, torch.Tensor) for value in checkpoint.values()):
        state_dict, checkpoint = checkpoint, {"state_dict": checkpoint}
    else:
        raise CheckpointError(
            f"{path} holds a {type(checkpoint).__name__} without a 'state_dict'; expected an MMSegmentation "
            "checkpoint (dict with 'meta' and 'state_dict') or a plain state dict of tensors."
        )
    if not isinstance(state_dict, dict) or not state_dict:
        raise CheckpointError(f"{path}: 'state_dict' is empty or not a dict.")
    return checkpoint


def map_official_key(key: str) -> str | None:
    """Our parameter name for an official key, or None when no rule matches."""
    for pattern, template in _COMPILED_RULES:
        match = pattern.match(key)
        if match:
            # {0}: encoder stage index (official 1-based -> 0-based); {1}: decoder block (attn2 -> 0).
            number = int(match.group(1)) if match.groups() and match.group(1).isdigit() else 0
            return match.expand(template.format(number - 1, number - 2))
    return None


def convert_state_dict(state_dict: dict, backbone_only: bool = False) -> ConvertedCheckpoint:
    """Maps an official state dict to this package's names.

    `backbone_only=True` reads an ImageNet MSCAN checkpoint (keys without `backbone.`) and returns
    the encoder weights named for `MetaSegModel` (`encoder.*`). Unknown keys raise `CheckpointError`
    listing them.
    """
    converted, dropped, unknown = {}, {}, []
    for key, value in state_dict.items():
        official = f"backbone.{key}" if backbone_only and not key.startswith("backbone.") else key
        reason = next((why for pattern, why in _DROPPED_KEYS.items() if pattern.match(official)), None)
        if reason is not None:
            dropped[key] = reason
            continue
        new_key = map_official_key(official)
        if new_key is None or (backbone_only and not new_key.startswith("metaseg.")):
            unknown.append(key)
            continue
        converted[new_key.removeprefix("metaseg.") if backbone_only else new_key] = value
    if unknown:
        shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
        raise CheckpointError(
            f"{len(unknown)} checkpoint keys have no MetaSeg equivalent: {shown}. Is this a MetaSeg "
            f"{'MSCAN backbone' if backbone_only else 'segmentation'} checkpoint?"
        )
    return ConvertedCheckpoint(converted, dropped)


def infer_config_kwargs(state_dict: dict) -> tuple[dict, str | None]:
    """Reads the architecture off the tensor shapes of an official state dict.

    Returns the `MetaSegConfig` keyword arguments and the matching official variant name (None when
    the shapes match no official variant).
    """

    def shape(key):
        if key not in state_dict:
            raise CheckpointError(f"The checkpoint has no {key!r}, which every MetaSeg checkpoint has.")
        return tuple(state_dict[key].shape)

    hidden_sizes, depths, stage = [], [], 1
    while f"backbone.norm{stage}.weight" in state_dict:
        hidden_sizes.append(shape(f"backbone.norm{stage}.weight")[0])
        blocks = {int(m.group(1)) for k in state_dict if (m := re.match(rf"backbone\.block{stage}\.(\d+)\.", k))}
        depths.append(len(blocks))
        stage += 1
    if not hidden_sizes:
        raise CheckpointError("The checkpoint has no 'backbone.norm1.weight': not an MSCAN/MetaSeg checkpoint.")
    mlp_ratios = [shape(f"backbone.block{i}.0.mlp.fc1.weight")[0] // width for i, width in enumerate(hidden_sizes, 1)]
    kwargs = {"hidden_sizes": hidden_sizes, "depths": depths, "mlp_ratios": mlp_ratios}
    if "decode_head.linear_pred.weight" in state_dict:
        kwargs["decoder_hidden_size"] = shape("decode_head.linear_fuse.conv.weight")[0]
        kwargs["num_labels"] = shape("decode_head.linear_pred.weight")[0]
        kwargs["decoder_num_attention_heads"] = [
            shape(f"decode_head.attn{stage}.attn.q.weight")[0] for stage in range(2, len(hidden_sizes) + 1)
        ]
    variant = None
    for name, spec in VARIANTS.items():
        architecture = ARCHITECTURES[spec["architecture"]]
        if (
            list(architecture["hidden_sizes"]) == hidden_sizes
            and list(architecture["depths"]) == depths
            and kwargs.get("decoder_hidden_size") == spec["decoder_hidden_size"]
            and kwargs.get("num_labels") == len(variant_config_kwargs(name)["id2label"])
        ):
            variant = name
    return kwargs, variant


def config_from_checkpoint(checkpoint: dict, model_name: str | None = None) -> tuple[MetaSegConfig, str | None]:
    """The `MetaSegConfig` of an official checkpoint: the named (or inferred) variant's preset, with the
    class names and palette from `meta` when the checkpoint has them."""
    state_dict = checkpoint["state_dict"]
    inferred, variant = infer_config_kwargs(state_dict)
    if model_name is not None:
        if model_name not in VARIANTS:
            raise CheckpointError(f"Unknown --model_name {model_name!r}; known variants: {', '.join(VARIANTS)}.")
        variant = model_name
    kwargs = variant_config_kwargs(variant) if variant else {}
    kwargs.update({key: value for key, value in inferred.items() if key != "num_labels"})
    meta = checkpoint.get("meta") or {}
    classes = meta.get("CLASSES")
    if classes is not None:
        kwargs["id2label"] = dict(enumerate(classes))
    elif "num_labels" in inferred and variant is None:
        kwargs["num_labels"] = inferred["num_labels"]
    if "num_labels" in inferred and len(kwargs.get("id2label", {})) not in (0, inferred["num_labels"]):
        raise CheckpointError(
            f"The checkpoint's classifier has {inferred['num_labels']} classes but "
            f"{'meta CLASSES' if classes is not None else 'variant ' + repr(variant)} lists "
            f"{len(kwargs['id2label'])}; pass the right --model_name."
        )
    palette = meta.get("PALETTE")
    if palette is None and variant is not None:
        palette = DATASET_PALETTES[VARIANTS[variant]["dataset"]]
    if palette is not None:
        kwargs["palette"] = [list(map(int, colour)) for colour in palette]
    return MetaSegConfig(**kwargs), variant


def check_state_dict_matches(model: torch.nn.Module, state_dict: dict, source: str) -> None:
    """Raises `CheckpointError` listing missing, unexpected and wrongly shaped keys."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(state_dict[key].shape)} vs model {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state_dict))
        if tuple(state_dict[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
    if mismatched:
        problems.append(f"shape mismatches ({len(mismatched)}): {'; '.join(mismatched[:20])}")
    if problems:
        raise CheckpointError(f"{source} does not fit the model:\n  " + "\n  ".join(problems))


def convert_checkpoint(
    checkpoint_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    model_name: str | None = None,
    backbone_only: bool = False,
    log=print,
):
    """Converts an official checkpoint into a folder that `from_pretrained` loads.

    Segmentation checkpoints give a `MetaSegForSemanticSegmentation` folder (config, safetensors
    weights, image processor, model card, code for `trust_remote_code`). `backbone_only=True` reads an
    ImageNet MSCAN checkpoint and gives a `MetaSegModel` folder whose encoder initialises
    `MetaSegForSemanticSegmentation.from_pretrained(folder, num_labels=...)` for fine-tuning.
    Returns the converted model.
    """
    from .hub import write_model_card
    from .image_processing_metaseg import MetaSegImageProcessor
    from .modeling_metaseg import MetaSegForSemanticSegmentation, MetaSegModel
    from .presets import variant_image_processor_kwargs

    checkpoint = load_official_checkpoint(checkpoint_path)
    state_dict = checkpoint["state_dict"]
    converted = convert_state_dict(state_dict, backbone_only=backbone_only)
    for key, reason in converted.dropped.items():
        log(f"dropped {key}: {reason}")
    if backbone_only:
        official_names = {f"backbone.{key}" if not key.startswith("backbone.") else key: value for key, value in state_dict.items()}
        kwargs, _ = infer_config_kwargs(official_names)
        config = MetaSegConfig(**kwargs)
        model = MetaSegModel(config)
        variant = None
    else:
        config, variant = config_from_checkpoint(checkpoint, model_name)
        model = MetaSegForSemanticSegmentation(config)
    check_state_dict_matches(model, converted.state_dict, str(checkpoint_path))
    model.load_state_dict(converted.state_dict, strict=True)
    model.eval()

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(output_dir)
    processor_kwargs = variant_image_processor_kwargs(variant) if variant else {}
    MetaSegImageProcessor(**processor_kwargs).save_pretrained(output_dir)
    meta = checkpoint.get("meta") or {}
    source = [f"Converted from the official checkpoint `{Path(checkpoint_path).name}`"]
    if meta.get("mmseg_version"):
        source.append(f"(MMSegmentation {meta['mmseg_version']}, iteration {meta.get('iter', '?')})")
    if variant:
        source.append(f"of variant `{variant}` (official config `{VARIANTS[variant]['official_config']}`)")
    title = variant or ("MetaSeg MSCAN backbone" if backbone_only else "MetaSeg")
    sections = {"Source": " ".join(source) + " with `conversion/convert_metaseg_to_hf.py`."}
    if backbone_only:
        sections["Fine-tuning"] = (
            "ImageNet-pretrained MSCAN encoder only: load it with "
            "`MetaSegForSemanticSegmentation.from_pretrained(folder, num_labels=...)`; the decoder starts from the "
            "official initialisation."
        )
    datasets = [VARIANTS[variant]["dataset"]] if variant else None
    write_model_card(output_dir, config, title, sections, datasets)
    log(f"wrote {output_dir} ({sum(p.numel() for p in model.parameters()):,} parameters, variant {variant or 'custom'})")
    return model
