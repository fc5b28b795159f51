#!/usr/bin/env python
"""Evaluate a MetaSeg model (folder or Hub id) on a labelled split: mIoU, accuracies, per-class table.

Data come through the library's loader (`metaseg_hf.data.load_evaluation_split`, `SegmentationEvalDataset`)
and are scored by the library's evaluation (`metaseg_hf.evaluation.evaluate_segmentation`), the same code
as the validation during training: the official MMSegmentation test logic (whole-image or sliding-window,
optionally with horizontal flip and multi-scale test-time augmentation), predictions scored at each
label's original resolution with the streaming confusion-matrix metric.

    # the embedded demo's model on the synthetic validation scenes
    python examples/evaluate.py --model_name_or_path runs/demo

    # an ONNX export (float32 or int8, examples/export_onnx.py) with ONNX Runtime: the same JSON
    python examples/evaluate.py --onnx runs/demo-int8/model.onnx

    # ADE20K validation, official single-scale / multi-scale + flip
    python examples/evaluate.py --model_name_or_path runs/metaseg-t-ade20k --data_dir data/ADEChallengeData2016 --dataset_format ade20k
    python examples/evaluate.py ... --scales 0.5 0.75 1.0 1.25 1.5 1.75 --flip

    # Cityscapes with the official sliding window
    python examples/evaluate.py ... --dataset_format cityscapes --mode slide --window_size 1024 --window_stride 768

    # on 8 GPUs (or several machines: --num_machines N --machine_rank R --main_process_ip HOST), in bf16
    accelerate launch --multi_gpu --num_processes 8 --mixed_precision bf16 examples/evaluate.py ...

Under `accelerate launch` each process reads and scores its own share of the images (every image exactly
once), the confusion matrices are summed (the scores equal a one-process run's), and the main process
shows one progress bar and writes the table and the JSON.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from torch.utils.data import Subset

import metaseg_hf  # noqa: F401  (registers MetaSeg with the Auto classes)
from metaseg_hf.data import DATASET_FORMATS, DataError, SegmentationEvalDataset, load_evaluation_split
from metaseg_hf.evaluation import evaluate_segmentation
from metaseg_hf.inference_metaseg import WINDOW_BATCH_SIZE
from metaseg_hf.metrics import StreamingMeanIoU, format_results_table, results_to_json


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model_name_or_path", "--model", dest="model_name_or_path",
                        help="a trained MetaSeg folder or Hub id")
    source.add_argument("--onnx", type=Path,
                        help="a model.onnx written by examples/export_onnx.py (float32 or int8), or its folder, run "
                             "with ONNX Runtime on the CPU")
    parser.add_argument("--threads", type=int, help="--onnx: ONNX Runtime threads (default: one per core)")
    parser.add_argument("--dataset_name", help="a `datasets` Hub id or save_to_disk folder")
    parser.add_argument("--split", help="split of --dataset_name (default: validation, val or test)")
    parser.add_argument("--data_dir", "--validation_dir", dest="data_dir",
                        help="split folder (imagefolder) or dataset root (ade20k, cityscapes)")
    parser.add_argument("--dataset_format", choices=DATASET_FORMATS, default="imagefolder")
    parser.add_argument("--image_column_name", help="image column of --dataset_name (found by name otherwise)")
    parser.add_argument("--label_column_name", help="label column of --dataset_name (found by name otherwise)")
    parser.add_argument("--do_reduce_labels", action=argparse.BooleanOptionalAction, default=None,
                        help="default: the dataset layout's (on for ADE20K), else the model's image processor setting")
    parser.add_argument("--mode", choices=("whole", "slide"), help="default: the model's official test mode")
    parser.add_argument("--window_size", type=int, help="slide: window side (default: the model config's)")
    parser.add_argument("--window_stride", type=int, help="slide: window stride (default: the model config's)")
    parser.add_argument("--window_batch_size", type=int, default=WINDOW_BATCH_SIZE)
    parser.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="multi-scale ratios of the test size")
    parser.add_argument("--max_images", type=int, help="evaluate only the first N images")
    parser.add_argument("--dataloader_num_workers", type=int, default=0,
                        help="processes reading and preprocessing images while the model runs")
    parser.add_argument("--device", help="one process only; default: Accelerate's (cuda when available, else cpu)")
    parser.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"),
                        help="autocast precision (default: Accelerate's, e.g. `accelerate launch --mixed_precision bf16`)")
    parser.add_argument("--bf16", action="store_true", help="the same as --mixed_precision bf16")
    parser.add_argument("--output_json", help="default: <model folder>/eval_results.json, or ./eval_results.json")
    parser.add_argument("--trust_remote_code", action="store_true")
    parser.add_argument("--token", help="Hugging Face token for private models or datasets")
    args = parser.parse_args(argv)
    if args.dataset_name and args.data_dir:
        parser.error("give either --dataset_name or --data_dir, not both")
    if args.onnx is not None and (args.device not in (None, "cpu") or args.mixed_precision or args.bf16):
        parser.error("--onnx runs the file as exported, with ONNX Runtime on the CPU: leave out --device, "
                     "--mixed_precision and --bf16")
    if args.bf16:
        if args.mixed_precision not in (None, "bf16"):
            parser.error(f"--bf16 contradicts --mixed_precision {args.mixed_precision}: give one of them")
        args.mixed_precision = "bf16"
    return args


def main(argv=None):
    args = parse_args(argv)
    from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation

    # 1. Processes, device and precision from Accelerate (one process without `accelerate launch`).
    accelerator = Accelerator(cpu=args.device == "cpu")
    precision = args.mixed_precision or accelerator.mixed_precision  # the flag, else `accelerate launch`'s setting
    if args.device is not None and accelerator.num_processes > 1:
        raise SystemExit(f"--device {args.device} names one device, but {accelerator.num_processes} processes run: "
                         "leave --device out under `accelerate launch` (each process takes its own)")
    device = torch.device(args.device) if args.device else accelerator.device

    # 2. Model and its image processor (the official test preprocessing saved with it).
    if args.onnx is not None:  # the exported file with ONNX Runtime, its config and processor settings beside it
        from metaseg_hf import MetaSegImageProcessor
        from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

        model = ORTMetaSegForSemanticSegmentation.from_pretrained(args.onnx, num_threads=args.threads)
        processor = MetaSegImageProcessor.from_pretrained(model.path.parent)
        device = model.device
    else:
        model = AutoModelForSemanticSegmentation.from_pretrained(
            args.model_name_or_path, trust_remote_code=args.trust_remote_code, token=args.token
        ).to(device).eval()
        processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code, token=args.token)
    model_name = str(model.path) if args.onnx is not None else args.model_name_or_path

    # 3. The labelled split, through the library's loader; labels reduced as the layout (or the model) says.
    split, reduce_default = load_evaluation_split(
        dataset_name=args.dataset_name, data_dir=args.data_dir, dataset_format=args.dataset_format, split=args.split,
        image_column=args.image_column_name, label_column=args.label_column_name, token=args.token,
    )
    reduce_labels = next(value for value in (args.do_reduce_labels, reduce_default, processor.do_reduce_labels) if value is not None)
    num_labels, id2label = model.config.num_labels, model.config.id2label
    dataset = SegmentationEvalDataset(split, processor, num_labels, reduce_labels, scales=args.scales)
    if args.max_images is not None:
        dataset = Subset(dataset, range(min(args.max_images, len(dataset))))

    # 4. Inference and scoring: the library's evaluation, the same as during training.
    settings = {
        "model": model_name,
        "runtime": "onnxruntime" if args.onnx is not None else "pytorch",
        "data": split.source,
        "images": len(dataset),
        "mode": args.mode or model.config.inference_mode,
        "window_size": args.window_size or model.config.sliding_window_size,
        "window_stride": args.window_stride or model.config.sliding_window_stride,
        "flip": args.flip,
        "scales": args.scales,
        "reduce_labels": reduce_labels,
        "device": str(device),
        "mixed_precision": precision,
        "num_processes": accelerator.num_processes,
    }
    accelerator.print(f"Evaluating {model_name} on {len(dataset)} images of {split.source}: "
                      f"mode {settings['mode']}, scales {args.scales}, flip {args.flip}, {accelerator.num_processes} process(es)")
    start = time.time()
    metric = StreamingMeanIoU(num_labels, id2label=id2label, device=device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        summed = evaluate_segmentation(
            model, dataset, accelerator, metric, mode=args.mode, window_size=args.window_size,
            window_stride=args.window_stride, flip=args.flip, window_batch_size=args.window_batch_size, progress=True,
            num_workers=args.dataloader_num_workers,
        )
    results = summed.compute()
    settings["seconds"] = round(time.time() - start, 1)
    if accelerator.is_main_process:
        write_report(args, settings, results)
    accelerator.end_training()  # the process group, where there is one
    return 0


def write_report(args, settings: dict, results: dict) -> None:
    """The table on the terminal and the JSON file (main process only)."""
    print(format_results_table(results))
    folder = Path(settings["model"]).parent if args.onnx is not None else Path(args.model_name_or_path)
    output = Path(args.output_json) if args.output_json else (
        folder / "eval_results.json" if folder.is_dir() else Path("eval_results.json")
    )
    output.write_text(json.dumps({"settings": settings, **results_to_json(results)}, indent=2), encoding="utf-8")
    print(f"Wrote {output}")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except DataError as error:  # bad data: the message names the file and the fix; no traceback
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
