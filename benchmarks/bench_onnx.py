"""ONNX Runtime against PyTorch on CPU: MetaSeg-T exported by `metaseg_hf.onnx_metaseg.export_onnx` (the fused
deploy path), the same model fused in PyTorch (`model.fuse()`), and Transformers' SegFormer-B0, measured side
by side in one process.

float32, 512x512, batch 1, `--threads 2` for both runtimes (ONNX Runtime: intra-op threads, graph
optimisation level "all", i.e. with its layout transforms; PyTorch: `torch.set_num_threads`); the median
latency of round-robin runs after a warm-up, its ratio to the fused PyTorch path and to SegFormer-B0, the
export time, the file size and ONNX Runtime's largest logit difference from PyTorch at the benchmark size.
`--profile` adds ONNX Runtime's per-operator profile (share of node time per operator type) and PyTorch's
for the fused model, to say where either spends its time.

    python benchmarks/bench_onnx.py [--threads 2] [--repeats 15] [--profile] [--write-results]

ONNX Runtime's idle worker threads spin by default; in a round-robin with PyTorch they keep the cores busy
while the next case runs (measured: PyTorch fused ~35% slower right after a spinning session), so spinning is
off. `--spinning` also times a spinning session (`onnxruntime+spin`); it then penalises the case after it.
With `$OUT` set, the printed report is also written to `$OUT/bench_onnx.txt`.
"""

import argparse
import collections
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.use_fault_free_allocator()

import torch  # noqa: E402

FAMILY = "metaseg-t"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="threads of each runtime")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--repeats", type=int, default=15, help="timed rounds")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds")
    parser.add_argument("--opset", type=int, default=None, help="ONNX opset (default: torch.onnx's)")
    parser.add_argument("--spinning", action="store_true", help="also time ONNX Runtime with spinning threads")
    parser.add_argument("--profile", action="store_true", help="per-operator profiles of ONNX Runtime and PyTorch")
    parser.add_argument("--profile-runs", type=int, default=10, help="runs per profile")
    parser.add_argument("--write-results", action="store_true", help="rewrite this run's section of RESULTS.md")
    return parser.parse_args()


def ort_operator_profile(model_path: Path, pixel_values: torch.Tensor, threads: int, runs: int, folder: Path) -> list:
    """[(operator type, share of node time, ms per run)] from ONNX Runtime's profiler, largest first."""
    from metaseg_hf.onnx_metaseg import INPUT_NAME, create_session

    session = create_session(model_path, num_threads=threads, profile_prefix=folder / "ort_profile", spinning=False)
    feed = {INPUT_NAME: pixel_values.numpy()}
    session.run(None, feed)  # the first run also allocates
    for _ in range(runs):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            totals[event["args"]["op_name"]] += event["dur"]
    everything = sum(totals.values())
    # The first run (allocation) is in the trace too: per-run figures divide by runs + 1.
    return [(name, value / everything, value / 1e3 / (runs + 1)) for name, value in totals.most_common()]


def torch_operator_profile(model, pixel_values: torch.Tensor, runs: int) -> list:
    """[(aten operator, share of self CPU time, ms per run)] of `model` from torch.profiler, largest first."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU]) as profiler:
        for _ in range(runs):
            model(pixel_values=pixel_values)
    totals = collections.Counter()
    for event in profiler.key_averages():
        totals[event.key] += event.self_cpu_time_total
    everything = sum(totals.values())
    return [(name, value / everything, value / 1e3 / runs) for name, value in totals.most_common()]


def profile_table(rows: list, limit: int = 10) -> str:
    return common.markdown_table(
        ["operator", "share", "ms / run (profiled)"],
        [[name, f"{share * 100:.1f}%", f"{ms:.1f}"] for name, share, ms in rows[:limit]],
    )


def main() -> None:
    args = parse_args()
    from metaseg_hf import MetaSegImageProcessor
    from metaseg_hf.onnx_metaseg import INPUT_NAME, OUTPUT_NAME, create_session, export_onnx

    report = common.Report("bench_onnx.txt")
    torch.set_num_threads(args.threads)
    report(common.machine_description("cpu"))
    import onnxruntime

    report(f"onnxruntime {onnxruntime.__version__}")
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, args.size, args.size, generator=generator)
    notes = []
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        started = time.perf_counter()
        result = export_onnx(common.build_metaseg(FAMILY).eval(), folder / "onnx", MetaSegImageProcessor(),
                             opset=args.opset, log=report)
        notes.append(
            f"export (`export_onnx`, fused, opset {result.opset}, with its ONNX Runtime check): "
            f"{time.perf_counter() - started:.0f} s; `model.onnx` {result.file_size / 2**20:.1f} MiB "
            f"({result.file_size:,} bytes); check on {len(result.checked_shapes)} inputs: max |ORT - PyTorch| "
            f"{result.max_abs_difference:.2e}"
        )
        report(notes[-1])
        fused = common.build_metaseg(FAMILY).eval().fuse()
        segformer = common.build_segformer(common.PEERS[FAMILY]).eval()
        sessions = {"onnxruntime": create_session(result.path, num_threads=args.threads, spinning=False)}
        if args.spinning:
            sessions["onnxruntime+spin"] = create_session(result.path, num_threads=args.threads, spinning=True)
        feed = {INPUT_NAME: pixel_values.numpy()}
        with torch.inference_mode():
            expected = fused(pixel_values=pixel_values).logits
        for name, session in sessions.items():
            logits = torch.from_numpy(session.run([OUTPUT_NAME], feed)[0])
            notes.append(f"{name} vs PyTorch fused at 1x3x{args.size}x{args.size}: max |logits difference| = "
                         f"{(logits - expected).abs().max().item():.2e}")
            report(notes[-1])

        cases = {(FAMILY, name): (lambda session=session: session.run([OUTPUT_NAME], feed)) for name, session in sessions.items()}
        cases[(FAMILY, "pytorch fused")] = lambda: fused(pixel_values=pixel_values)
        cases[(common.PEERS[FAMILY], "pytorch eager")] = lambda: segformer(pixel_values=pixel_values)
        report(f"Timing {len(cases)} cases round-robin: {args.warmup} warm-up + {args.repeats} timed rounds ...")
        with torch.inference_mode():
            times = common.round_robin(cases, repeats=args.repeats, warmup=args.warmup)
        fused_times = times[(FAMILY, "pytorch fused")]
        peer_times = times[(common.PEERS[FAMILY], "pytorch eager")]
        rows = []
        for (model, variant), values in times.items():
            ms, fastest = common.median(values) * 1e3, min(values) * 1e3
            rows.append([
                model, variant, f"{ms:.1f}", f"{fastest:.1f}", common.spread(values),
                f"{common.median(values) / common.median(fused_times):.2f}", f"{fastest / (min(fused_times) * 1e3):.2f}",
                f"{common.median(values) / common.median(peer_times):.2f}",
            ])
        table = common.markdown_table(
            ["model", "runtime", "median ms", "min ms", "IQR/2", "vs PyTorch fused", "vs PyTorch fused (min)",
             "vs SegFormer-B0"],
            rows,
        )
        report()
        report(table)
        profiles = ""
        if args.profile:
            ort_rows = ort_operator_profile(result.path, pixel_values, args.threads, args.profile_runs, folder)
            torch_rows = torch_operator_profile(fused, pixel_values, args.profile_runs)
            profiles = (
                f"\n\nONNX Runtime, share of node time by operator type ({args.profile_runs} runs, `--profile`):\n\n"
                f"{profile_table(ort_rows)}\n\nPyTorch fused, share of self CPU time by operator (torch.profiler; "
                "its times are summed over threads and include the profiler's overhead):\n\n"
                f"{profile_table(torch_rows)}"
            )
            report(profiles)
    machine = common.machine_description("cpu")
    section = (
        f"## ONNX Runtime vs PyTorch, CPU, float32, {args.size}x{args.size}, batch 1\n\n{machine}, "
        f"onnxruntime {onnxruntime.__version__}, {args.threads} threads each, {len(fused_times)} timed rounds after "
        f"{args.warmup} warm-up.\n\n`{common.COMMAND_LINE}`\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in notes) + profiles
    )
    if args.write_results:
        common.write_section("onnx-cpu", section)


if __name__ == "__main__":
    main()
