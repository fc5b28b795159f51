"""int8 ONNX Runtime against float32 ONNX Runtime, fused PyTorch and SegFormer-B0 on CPU, in one process; with
`--variants`, the quantisation choices side by side (accuracy, speed, size).

The int8 files are written by `metaseg_hf.onnx_metaseg.export_onnx_int8` (the recipe `INT8_RECIPE`, or a
variant of it), calibrated on `--calibration_size` synthetic training scenes through the model's processor.
Timed: 512x512 (`--size`), batch 1, `--threads 2` for every runtime, ONNX Runtime at optimisation level "all"
with its worker threads not spinning (they would slow down the case timed after them; see bench_onnx.py),
round-robin after a warm-up, medians; `speed-up` is ONNX Runtime float32's median over the case's.

    python benchmarks/bench_int8.py --model runs/demo [--variants all] [--profile] [--write-results]

`--model`: a trained MetaSeg folder (the README's demo: `accelerate launch examples/train.py --output_dir
runs/demo`); its mIoU on the synthetic validation scenes is measured for float32 and each int8 file when its
labels are the synthetic ones. Without it: MetaSeg-T (ADE20K preset) with random weights, speed only (random
weights amplify any perturbation, so their int8 agreement says nothing). `--profile`: ONNX Runtime's time per
operator type for float32 and the recipe, and what its graph optimisation fused (operator counts). With
`$OUT` set, the printed report is also written to `$OUT/bench_int8.txt`.
"""

import argparse
import collections
import copy
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.use_fault_free_allocator()

import torch  # noqa: E402

from metaseg_hf.onnx_metaseg import INT8_RECIPE, cpu_int8_instructions, describe_int8_instructions  # noqa: E402

FAMILY = "metaseg-t"
RECIPE = "int8 (recipe)"


def float_parts(*added: str, dropped: tuple = ()) -> dict:
    """A change to INT8_RECIPE's float parts: `dropped` ones back to int8, `added` ones kept in float32."""
    return {"float_parts": tuple(part for part in INT8_RECIPE["float_parts"] if part not in dropped) + added}


# Each variant changes one thing of INT8_RECIPE (`metaseg_hf.onnx_metaseg`), or names a combination.
VARIANTS = {
    "int8 stem": float_parts(dropped=("stem_input",)),
    "float32 stem, both convolutions": float_parts("stem", dropped=("stem_input",)),
    "int8 decoder attention": float_parts(dropped=("decoder_attention",)),
    "+ float32 GELU (exact)": float_parts("gelu"),
    "+ float32 classifier": float_parts("classifier"),
    "+ float32 MSCA spatial": float_parts("attention_spatial"),
    "+ float32 depthwise": float_parts("depthwise"),
    "per-tensor weights": {"per_channel": False},
    "8-bit weights (no reduce_range)": {"reduce_range": False},
    "per-tensor 8-bit weights": {"per_channel": False, "reduce_range": False},
    "QOperator": {"quant_format": "qoperator"},
    "s8 activations": {"activation_type": "int8"},
    "u8 weights": {"weight_type": "uint8"},
    "no graph optimisation first": {"optimize_before": False},
    "percentile calibration": {"calibration_method": "percentile"},
    "entropy calibration": {"calibration_method": "entropy"},
}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a trained MetaSeg folder (default: random-weight MetaSeg-T, speed only)")
    parser.add_argument("--variants", nargs="*", default=[], help=f"'all' or some of: {', '.join(VARIANTS)}")
    parser.add_argument("--calibration_size", type=int, default=None, help="default: the library's CALIBRATION_SIZE")
    parser.add_argument("--threads", type=int, default=2, help="threads of each runtime")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--repeats", type=int, default=20, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--profile", action="store_true", help="ONNX Runtime's time per operator type")
    parser.add_argument("--profile-runs", type=int, default=10, help="runs per profile")
    parser.add_argument("--write-results", action="store_true", help="rewrite this run's section of RESULTS.md")
    args = parser.parse_args()
    args.variants = list(VARIANTS) if args.variants == ["all"] else args.variants
    unknown = [name for name in args.variants if name not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)} or 'all'")
    return args


def synthetic_miou(path: Path, processor, threads: int) -> float:
    """mIoU (%) of an ONNX file on the synthetic validation scenes, the model's test mode."""
    from metaseg_hf.data import SegmentationEvalDataset, load_evaluation_split
    from metaseg_hf.evaluation import evaluate_segmentation
    from metaseg_hf.metrics import StreamingMeanIoU
    from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

    model = ORTMetaSegForSemanticSegmentation.from_pretrained(path, num_threads=threads)
    split, reduce_labels = load_evaluation_split()
    dataset = SegmentationEvalDataset(split, processor, model.config.num_labels, reduce_labels)
    metric = evaluate_segmentation(model, dataset, None, StreamingMeanIoU(model.config.num_labels))
    return 100 * float(metric.compute()["mean_iou"])


def optimised_operators(path: Path, folder: Path) -> collections.Counter:
    """Operator counts of the graph ONNX Runtime runs (after its optimisation at level "all")."""
    import onnx
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(folder / f"{path.parent.name}-optimised.onnx")
    options.log_severity_level = 3
    onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return collections.Counter(node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node)


def main() -> None:
    args = parse_args()
    from bench_onnx import ort_operator_profile, profile_table

    from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
    from metaseg_hf.onnx_metaseg import (
        CALIBRATION_SIZE,
        HELD_OUT,
        INPUT_NAME,
        OUTPUT_NAME,
        check_int8_recipe,
        create_session,
        export_onnx,
        export_onnx_int8,
    )
    from metaseg_hf.synthetic import SYNTHETIC_ID2LABEL, synthetic_images

    report = common.Report("bench_int8.txt")
    torch.set_num_threads(args.threads)
    import onnxruntime

    report(common.machine_description("cpu"))
    report(f"onnxruntime {onnxruntime.__version__}")
    if args.model:
        model = MetaSegForSemanticSegmentation.from_pretrained(args.model).eval()
        processor = MetaSegImageProcessor.from_pretrained(args.model)
        described = args.model
    else:
        model, processor, described = common.build_metaseg(FAMILY).eval(), MetaSegImageProcessor(), f"{FAMILY}, random weights"
    with_miou = {int(key): value for key, value in model.config.id2label.items()} == SYNTHETIC_ID2LABEL
    calibration_size = args.calibration_size or CALIBRATION_SIZE
    recipes = {RECIPE: {}, **{name: VARIANTS[name] for name in args.variants}}
    quiet = lambda line: None  # noqa: E731

    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        float_result = export_onnx(model, folder / "float32", processor, log=quiet)
        report(f"float32 export: {time.perf_counter() - started:.0f} s, {float_result.file_size:,} bytes")
        files = {"float32": float_result.path}
        rows = {"float32": {"recipe": "-", "size": float_result.file_size, "agreement": "-"}}
        for name, changes in recipes.items():
            started = time.perf_counter()
            result = export_onnx_int8(model, folder / f"int8-{len(files)}", processor, synthetic_images("train"),
                                      calibration_size=calibration_size, recipe=changes, log=quiet)
            files[name] = result.path
            changed = {key: value for key, value in check_int8_recipe(changes).items() if value != INT8_RECIPE[key]}
            rows[name] = {
                "recipe": ", ".join(f"{key}={value}" for key, value in changed.items()) or "INT8_RECIPE",
                "size": result.file_size,
                "agreement": f"{result.pixel_agreement:.2%} / {result.logits_relative_error:.1%}",
            }
            report(f"{name}: export {time.perf_counter() - started:.0f} s, {rows[name]}")
        if with_miou:
            for name, path in files.items():
                rows[name]["miou"] = synthetic_miou(path, processor, args.threads)
                report(f"{name}: mIoU {rows[name]['miou']:.2f}")

        pixel_values = torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(0))
        feed = {INPUT_NAME: pixel_values.numpy()}
        cases = {}
        for name, path in files.items():
            session = create_session(path, num_threads=args.threads, spinning=False)
            cases[name] = lambda session=session: session.run([OUTPUT_NAME], feed)
        fused = copy.deepcopy(model).fuse()
        segformer = common.build_segformer(common.PEERS[FAMILY]).eval()
        cases["pytorch fused (float32)"] = lambda: fused(pixel_values=pixel_values)
        cases["segformer-b0, pytorch (float32)"] = lambda: segformer(pixel_values=pixel_values)
        # ONNX Runtime alone first: PyTorch's OpenMP threads spin for a while after each call and slow down
        # whatever runs next (measured: ONNX Runtime float32 ~15% slower right after SegFormer), so the int8
        # speed-up comes from a round-robin of the ONNX files only; then everything together.
        onnx_cases = {name: cases[name] for name in files}
        report(f"Timing {len(onnx_cases)} ONNX files, then all {len(cases)} cases, round-robin: {args.warmup} warm-up + "
               f"{args.repeats} timed rounds each ...")
        with torch.inference_mode():
            alone = common.round_robin(onnx_cases, repeats=args.repeats, warmup=args.warmup)
            together = common.round_robin(cases, repeats=args.repeats, warmup=args.warmup)
        base, base_together = common.median(alone["float32"]), common.median(together["float32"])
        table_rows = []
        for name, values in together.items():
            row = rows.get(name, {})
            table_rows.append([
                name, "onnxruntime" if name in files else "pytorch", row.get("recipe", "-"),
                f"{common.median(alone[name]) * 1e3:.1f} ({common.spread(alone[name])})" if name in alone else "-",
                f"{base / common.median(alone[name]):.2f}" if name in alone else "-",
                f"{common.median(values) * 1e3:.1f} ({common.spread(values)})",
                f"{base_together / common.median(values):.2f}",
                f"{row['size'] / rows['float32']['size']:.2f}" if "size" in row else "-",
                f"{row['miou']:.2f}" if "miou" in row else "-", row.get("agreement", "-"),
            ])
        table = common.markdown_table(
            ["case", "runtime", "changes to the recipe", "ms, ONNX files alone (IQR/2)", "speed-up vs ORT float32",
             "ms, all cases (IQR/2)", "speed-up vs ORT float32, all cases", "file vs float32", "mIoU (synthetic val)",
             "held-out pixels / logits error vs float32"],
            table_rows,
        )
        report()
        report(table)
        profiles = ""
        if args.profile:
            for name in ("float32", RECIPE):
                rows_profile = ort_operator_profile(files[name], pixel_values, args.threads, args.profile_runs, folder)
                operators = optimised_operators(files[name], folder)
                profiles += (
                    f"\n\nONNX Runtime, {name}: time per operator type ({args.profile_runs} runs, `--profile`)\n\n"
                    f"{profile_table(rows_profile, limit=14)}\n\nOperators after ONNX Runtime's optimisation: "
                    + ", ".join(f"{op} {count}" for op, count in operators.most_common())
                )
            report(profiles)

    # One section per kind of integer dot product: the speed-up and the 8-bit weights' accuracy depend on it.
    instructions = cpu_int8_instructions()
    section = (
        f"## int8 ONNX Runtime, CPU with {describe_int8_instructions(instructions)}, "
        f"{args.size}x{args.size}, batch 1 (issue 21)\n\n{common.machine_description('cpu')}, "
        f"onnxruntime {onnxruntime.__version__}, {args.threads} threads each, {args.repeats} timed rounds after "
        f"{args.warmup} warm-up. Model: {described}; calibration: {calibration_size} synthetic training scenes "
        f"through its processor, {HELD_OUT} more held out for the agreement.\n\n`{common.COMMAND_LINE}`\n\n{table}"
        + profiles
    )
    if args.write_results:
        common.write_section(f"int8-cpu-{instructions.replace('_', '-')}", section)


if __name__ == "__main__":
    main()
