"""Batch segmentation throughput with 1 and N processes: `examples/segment.py` on a folder of photos, run plainly
and under `accelerate launch --multi_gpu --num_processes N` (gloo on CPU, `ACCELERATE_USE_CPU=1`).

MetaSeg-T (ADE20K preset, seeded random weights, official preprocessing: photos resized to 512 on the short
side) on `--images` synthetic 640x480 photos. Each configuration runs `--repeats` times, alternating, into a
fresh output folder; images/s is the image count over the whole command's wall time (start-up and model
loading included, as a user sees it), the median over repeats. The threads are split between the
processes (`OMP_NUM_THREADS` = cores / processes), so every configuration uses the same cores.

    python benchmarks/bench_scale_out.py [--images 24] [--processes 2] [--repeats 2] [--write-results]
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_inputs(folder: Path, count: int, size=(480, 640)) -> None:
    from metaseg_hf.synthetic import render_scene

    folder.mkdir(parents=True)
    for index in range(count):
        render_scene(index, size)[0].save(folder / f"photo{index:04d}.png")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--processes", type=int, default=2, help="the multi-process run's process count")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--write-results", action="store_true", help="update benchmarks/RESULTS.md")
    args = parser.parse_args()
    common.use_fault_free_allocator()

    import torch

    from metaseg_hf import MetaSegImageProcessor
    from metaseg_hf.presets import variant_image_processor_kwargs

    cores = os.cpu_count()
    work = Path(tempfile.mkdtemp(prefix="bench-scale-out-"))
    try:
        model_dir, photos = work / "model", work / "photos"
        common.build_metaseg("metaseg-t").save_pretrained(model_dir)
        MetaSegImageProcessor(**variant_image_processor_kwargs("metaseg-t-ade20k")).save_pretrained(model_dir)
        make_inputs(photos, args.images)
        segment = [str(common.REPO_ROOT / "examples" / "segment.py"), "--model", str(model_dir), str(photos)]
        launch = [str(Path(sys.executable).parent / "accelerate"), "launch", "--multi_gpu", "--num_processes",
                  str(args.processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        configurations = {
            "1 process": ([sys.executable, *segment], 1),
            f"{args.processes} processes": ([*launch, *segment], args.processes),
        }
        times = {name: [] for name in configurations}
        for repeat in range(args.repeats):
            for name, (command, processes) in configurations.items():
                output = work / f"out-{repeat}-{processes}"
                env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HUB_OFFLINE": "1",
                       "OMP_NUM_THREADS": str(max(1, cores // processes)), "PYTHONPATH": str(common.REPO_ROOT)}
                start = time.perf_counter()
                subprocess.run([*command, "--output_dir", str(output)], check=True, env=env, capture_output=True)
                times[name].append(time.perf_counter() - start)
                assert len(list(output.glob("*.json"))) == args.images
                shutil.rmtree(output)
                print(f"{name}: {times[name][-1]:.1f} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    baseline = statistics.median(times["1 process"])
    rows = []
    for name, values in times.items():
        seconds = statistics.median(values)
        rows.append([name, f"{seconds:.1f}", f"{args.images / seconds:.2f}", f"{baseline / seconds:.2f}x"])
    table = common.markdown_table(["examples/segment.py", "wall s (median)", "images/s", "speed-up"], rows)
    text = (f"Batch segmentation, {args.images} photos 640x480 -> MetaSeg-T at 512x683, {cores} CPU cores, "
            f"torch {torch.__version__}, median of {args.repeats} runs each; command: `{common.COMMAND_LINE}`\n\n{table}")
    print(text)
    if args.write_results:
        common.write_section("scale-out-cpu", text)


if __name__ == "__main__":
    main()
