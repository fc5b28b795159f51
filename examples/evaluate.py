#!/usr/bin/env python
"""Evaluate a MetaSeg model (folder or Hub id) on a labelled split: mIoU, accuracies, per-class table.

Inference follows the official MMSegmentation test logic (`metaseg_hf.inference_metaseg.segment`):
whole-image or sliding-window, optionally with horizontal flip and multi-scale test-time augmentation;
predictions are scored at each label's original resolution with the streaming confusion-matrix metric.

    # the embedded demo's model on the synthetic validation scenes
    python examples/evaluate.py --model_name_or_path runs/demo

    # ADE20K validation, official single-scale / multi-scale + flip
    python examples/evaluate.py --model_name_or_path runs/metaseg-t-ade20k --data_dir data/ADEChallengeData2016 --dataset_format ade20k
    python examples/evaluate.py ... --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip

    # Cityscapes with the official sliding window
    python examples/evaluate.py ... --dataset_format cityscapes --mode slide --window_size 1024 --window_stride 768
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.data import (
    DATASET_FORMATS,
    SegmentationSplit,
    ade20k_pairs,
    cityscapes_pairs,
    imagefolder_pairs,
    load_segmentation_data,
    prepare_label,
)
from metaseg_hf.inference_metaseg import segment
from metaseg_hf.metrics import StreamingMeanIoU, format_results_table, results_to_json
from metaseg_hf.presets import DATASETS


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model_name_or_path", "--model", dest="model_name_or_path", required=True,
                        help="a trained MetaSeg folder or Hub id")
    parser.add_argument("--dataset_name", help="a `datasets` Hub id or save_to_disk folder")
    parser.add_argument("--split", default="validation", help="split of --dataset_name")
    parser.add_argument("--data_dir", "--validation_dir", dest="data_dir",
                        help="split folder (imagefolder) or dataset root (ade20k, cityscapes)")
    parser.add_argument("--dataset_format", choices=DATASET_FORMATS, default="imagefolder")
    parser.add_argument("--do_reduce_labels", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the model's image processor setting (on for ADE20K models)")
    parser.add_argument("--mode", choices=("whole", "slide"), help="default: the model's official test mode")
    parser.add_argument("--window_size", type=int, help="slide: window side (default: the model config's)")
    parser.add_argument("--window_stride", type=int, help="slide: window stride (default: the model config's)")
    parser.add_argument("--window_batch_size", type=int, default=4)
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale ratios of the test size")
    parser.add_argument("--max_images", type=int, help="evaluate only the first N images")
    parser.add_argument("--device", help="default: cuda when available, else cpu")
    parser.add_argument("--bf16", action="store_true", help="run the model in bfloat16 (GPU)")
    parser.add_argument("--output_json", help="default: <model folder>/eval_results.json, or ./eval_results.json")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--token", help="Hugging Face token for private models or datasets")
    return parser.parse_args(argv)


def load_split(args, reduce_default: bool) -> tuple[SegmentationSplit, bool]:
    """The labelled split to score and whether its labels are reduced (ADE20K style)."""
    if args.dataset_name:
        data = load_segmentation_data(dataset_name=args.dataset_name, train_val_split=0)
        import datasets

        path = Path(args.dataset_name)
        loaded = datasets.load_from_disk(str(path)) if path.is_dir() else datasets.load_dataset(args.dataset_name, split=args.split)
        if isinstance(loaded, datasets.DatasetDict):
            loaded = loaded[args.split]
        split = SegmentationSplit(args.split, f"{args.dataset_name}[{args.split}]", dataset=loaded,
                                  image_column=data.train.image_column, label_column=data.train.label_column)
        return split, reduce_default
    if args.data_dir:
        if args.dataset_format == "imagefolder":
            return SegmentationSplit("validation", args.data_dir, pairs=imagefolder_pairs(args.data_dir)), reduce_default
        read_pairs = ade20k_pairs if args.dataset_format == "ade20k" else cityscapes_pairs
        split = SegmentationSplit("validation", f"{args.dataset_format} {args.data_dir}", pairs=read_pairs(args.data_dir, "validation"))
        return split, DATASETS[args.dataset_format]["do_reduce_labels"]
    return load_segmentation_data().validation, False  # the synthetic validation scenes


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    model = AutoModelForSemanticSegmentation.from_pretrained(
        args.model_name_or_path, trust_remote_code=args.trust_remote_code, token=args.token, dtype=dtype
    ).to(device).eval()
    processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code, token=args.token)
    split, reduce_default = load_split(args, bool(getattr(processor, "do_reduce_labels", False)))
    reduce_labels = reduce_default if args.do_reduce_labels is None else args.do_reduce_labels
    if args.data_dir is None and args.dataset_name is None:
        reduce_labels = False if args.do_reduce_labels is None else args.do_reduce_labels
    num_labels, id2label = model.config.num_labels, model.config.id2label
    metric = StreamingMeanIoU(num_labels, id2label=id2label, device=device)
    count = len(split) if args.max_images is None else min(args.max_images, len(split))
    settings = {
        "model": args.model_name_or_path,
        "data": split.source,
        "images": count,
        "mode": args.mode or model.config.inference_mode,
        "window_size": args.window_size or model.config.sliding_window_size,
        "window_stride": args.window_stride or model.config.sliding_window_stride,
        "flip": args.flip,
        "scales": args.scales,
        "reduce_labels": reduce_labels,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    }
    print(f"Evaluating {args.model_name_or_path} on {count} images of {split.source}: mode {settings['mode']}, "
          f"scales {args.scales}, flip {args.flip}")
    start = time.time()
    for index in tqdm(range(count)):
        image, label, name = split.load(index)
        label = prepare_label(label, name, num_labels, reduce_labels)
        prediction = segment(
            model, processor, image, mode=args.mode, window_size=args.window_size, window_stride=args.window_stride,
            flip=args.flip, scales=tuple(args.scales), window_batch_size=args.window_batch_size,
        )[0]
        metric.update(prediction.segmentation, torch.from_numpy(label))
    results = metric.compute()
    settings["seconds"] = round(time.time() - start, 1)
    print(format_results_table(results))
    output = Path(args.output_json) if args.output_json else (
        Path(args.model_name_or_path) / "eval_results.json" if Path(args.model_name_or_path).is_dir() else Path("eval_results.json")
    )
    output.write_text(json.dumps({"settings": settings, **results_to_json(results)}, indent=2), encoding="utf-8")
    print(f"Wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
