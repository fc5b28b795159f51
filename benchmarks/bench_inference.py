"""Inference speed of MetaSeg-T / -B (straight port, channels_last, fused, compiled) against
Transformers' SegFormer-B0 / -B2, measured side by side in one process.

CPU (the default without CUDA): float32, 512x512, batch 1, `--threads 2`; the median latency of
round-robin runs after a warm-up, its ratio to the SegFormer peer and to the straight port, and the
fused path's largest difference from the straight port. CUDA: bf16 weights and inputs at batch 1, 16
and 64: images/s, peak memory (this model's weights + activations), and the bf16-vs-float32 class-map
agreement on the reference photo (`metaseg-t-ade20k-whole.safetensors` through the converted reference
checkpoint, and MetaSeg-T as initialised; target >= 99%).

    python benchmarks/bench_inference.py [--device cpu|cuda] [--models t,b] [--repeats N] [--write-results]

Variants: `port` is what `from_pretrained` gives (NCHW, the official computation order);
`port+cl` is the same model and input in channels_last memory format; `fused` is `model.fuse()`;
`fused+compile` (CUDA: the sizes in `--compile-models`, default MetaSeg-T, at batch > 1; CPU: with
`--compile`) is `common.Compiled(fused)`: `torch.compile(fullgraph=True)`, static height and width with
a dynamic batch unless `--compile-dynamic-hw` (Inductor in torch 2.13 cannot lower the whole network
with symbolic height and width; Dynamo traces it without graph breaks either way). Compiled for a GPU,
the depthwise convolutions are shifted-slice sums that Inductor fuses (`config.depthwise_implementation`
"auto"); `--depthwise-implementation library` compiles them as library calls, `triton` runs the Triton
kernels (every MetaSeg variant).
With `$OUT` set, the printed report is also written to `$OUT/bench_inference.txt`.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.use_fault_free_allocator()

import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from metaseg_hf.ops_metaseg import IMPLEMENTATIONS  # noqa: E402

FAMILIES = {"t": "metaseg-t", "b": "metaseg-b"}
DYNAMIC_HW = False  # --compile-dynamic-hw


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="t,b", help="comma-separated MetaSeg sizes: t, b")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    parser.add_argument("--size", type=int, default=512, help="input height and width")
    parser.add_argument("--batch-sizes", default=None, help="CUDA batch sizes (default 1,16,64); CPU always 1")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: CPU 15, CUDA 20)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: CPU 3, CUDA 5)")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile on CPU (slow to compile)")
    parser.add_argument("--compile-models", default="t", help="CUDA: sizes also timed compiled ('' for none)")
    parser.add_argument("--compile-peers", action="store_true", help="also time compiled SegFormer peers")
    parser.add_argument(
        "--compile-dynamic-hw", action="store_true",
        help="compile with dynamic height and width (falls back to static if Inductor fails to lower it)",
    )
    parser.add_argument(
        "--depthwise-implementation", default="auto", choices=IMPLEMENTATIONS,
        help="config.depthwise_implementation of every MetaSeg variant (default: auto)",
    )
    parser.add_argument(
        "--agreement-compiled", action="store_true",
        help="CUDA: also check the compiled model's class maps (another compilation for the 512x704 photo)",
    )
    parser.add_argument(
        "--compile-batch-1", action="store_true",
        help="CUDA: also time compiled models at batch 1 (dynamic shapes specialise size 1: another compilation)",
    )
    parser.add_argument("--reference-dir", type=Path, default=None, help="official reference data (agreement check)")
    parser.add_argument("--write-results", action="store_true", help="rewrite this run's section of RESULTS.md")
    return parser.parse_args()


def metaseg_variants(family: str, device: str, dtype: torch.dtype, compile_: bool) -> dict:
    """{variant: (model, memory_format)} for one MetaSeg size, all from the same random weights."""
    port = common.build_metaseg(family).to(device=device, dtype=dtype).eval()
    variants = {"port": (port, torch.contiguous_format)}
    channels_last = common.build_metaseg(family).to(device=device, dtype=dtype).eval()
    variants["port+cl"] = (channels_last.to(memory_format=torch.channels_last), torch.channels_last)
    fused = common.build_metaseg(family).to(device=device, dtype=dtype).fuse()
    variants["fused"] = (fused, torch.contiguous_format)
    if compile_:
        compiled = common.build_metaseg(family).to(device=device, dtype=dtype).fuse()
        variants["fused+compile"] = (common.Compiled(compiled, DYNAMIC_HW), torch.contiguous_format)
    return variants


def peer_variants(name: str, device: str, dtype: torch.dtype, compile_: bool) -> dict:
    peer = common.build_segformer(name).to(device=device, dtype=dtype).eval()
    variants = {"eager": (peer, torch.contiguous_format)}
    if compile_:
        compiled = common.build_segformer(name).to(device=device, dtype=dtype).eval()
        variants["compile"] = (common.Compiled(compiled, DYNAMIC_HW), torch.contiguous_format)
    return variants


def logits_of(model, pixel_values):
    return model(pixel_values=pixel_values).logits


def refresh_fused(model) -> None:
    """Recomputes a fused model's folds in place from its (changed) parameters, so that a compiled
    instance keeps its graphs (they hold the fold modules and buffers it was traced with)."""
    previous = {module: module.folded for module in model.modules() if getattr(module, "folded", None) is not None}
    model.fuse()
    with torch.no_grad():
        for module, folded in previous.items():
            fresh = dict(module.folded.named_buffers())
            for name, buffer in folded.named_buffers():
                buffer.copy_(fresh[name])
            module.folded = folded


def run_cpu(args, report) -> str:
    torch.set_num_threads(args.threads)
    repeats, warmup = args.repeats or 15, args.warmup or 3
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(1, 3, args.size, args.size, generator=generator)
    cases, models, checks = {}, {}, []
    with torch.inference_mode():
        for key in args.models.split(","):
            family = FAMILIES[key]
            peer = common.PEERS[family]
            for variant, (model, memory_format) in metaseg_variants(family, "cpu", torch.float32, args.compile).items():
                models[(family, variant)] = (model, pixel_values.contiguous(memory_format=memory_format))
            for variant, (model, _) in peer_variants(peer, "cpu", torch.float32, args.compile).items():
                models[(peer, variant)] = (model, pixel_values)
            reference = logits_of(*models[(family, "port")])
            for variant in [v for (f, v) in models if f == family and v != "port"]:
                difference = (logits_of(*models[(family, variant)]) - reference).abs().max().item()
                checks.append(f"{family} {variant}: max |logits - port logits| = {difference:.2e}")
        for key, (model, inputs) in models.items():
            cases[key] = (lambda model=model, inputs=inputs: model(pixel_values=inputs))
        report(f"Timing {len(cases)} models round-robin: {warmup} warm-up + {repeats} timed rounds ...")
        started = time.perf_counter()
        times = common.round_robin(cases, repeats=repeats, warmup=warmup)
    report(f"done in {time.perf_counter() - started:.0f} s")
    for line in checks:
        report(line)

    rows = []
    for (name, variant), values in times.items():
        family = name if name.startswith("metaseg") else next(f for f, p in common.PEERS.items() if p == name)
        peer_ms = common.median(times[(common.PEERS[family], "eager")]) * 1e3
        port_ms = common.median(times[(family, "port")]) * 1e3
        port_min = min(times[(family, "port")]) * 1e3
        ms, fastest = common.median(values) * 1e3, min(values) * 1e3
        rows.append([
            name, variant, f"{ms:.1f}", f"{fastest:.1f}", common.spread(values), f"{ms / peer_ms:.2f}",
            f"{ms / port_ms:.2f}" if name.startswith("metaseg") else "",
            f"{fastest / port_min:.2f}" if name.startswith("metaseg") else "",
        ])
    table = common.markdown_table(
        ["model", "variant", "median ms", "min ms", "IQR/2", "vs SegFormer peer", "vs straight port",
         "vs straight port (min)"],
        rows,
    )
    report()
    report(table)
    machine = common.machine_description("cpu")
    return (
        f"## Inference, CPU, float32, {args.size}x{args.size}, batch 1\n\n{machine}, "
        f"{len(next(iter(times.values())))} timed rounds after {warmup} warm-up.\n\n"
        f"`{common.COMMAND_LINE}`\n\n{table}\n\n" + "\n".join(f"- {line}" for line in checks)
    )


def reference_dir(args) -> Path:
    if args.reference_dir is not None:
        return args.reference_dir
    for candidate in (
        os.environ.get("METASEG_REFERENCE_DIR"),
        common.REPO_ROOT / "shared" / "reference",
        common.REPO_ROOT.parent / "shared" / "reference",
    ):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return common.REPO_ROOT.parent / "shared" / "reference"


def agreement_check(args, report, compiled=None) -> list[str]:
    """bf16 vs float32 class maps (argmax of the logits resized to the input) on the reference photo.

    Two sets of weights: the converted reference checkpoint (random, with every statistic and layer
    scale randomised: a chaotic network, where rounding the input alone to bf16 already moves many
    classes) and MetaSeg-T as initialised (seed 0). The float32 truth runs with TF32 off.
    `compiled`: the benchmark's compiled fused bf16 MetaSeg-T; it gets each set of weights in place
    (its graphs are kept).
    """
    import tempfile

    from safetensors.torch import load_file

    from metaseg_hf import MetaSegForSemanticSegmentation
    from metaseg_hf.conversion import convert_checkpoint

    folder = reference_dir(args)
    checkpoint, whole = folder / "metaseg-t-ade20k-random.pth", folder / "metaseg-t-ade20k-whole.safetensors"
    if not (checkpoint.is_file() and whole.is_file()):
        line = f"agreement check skipped: {checkpoint.name} / {whole.name} not in {folder} (pass --reference-dir)"
        report(line)
        return [line]
    pixel_values = load_file(whole)["pixel_values"].to(args.device)
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    lines = []
    with tempfile.TemporaryDirectory() as temporary, torch.inference_mode():
        convert_checkpoint(checkpoint, Path(temporary) / "model", log=lambda message: None)
        weights = {
            "reference checkpoint": lambda: MetaSegForSemanticSegmentation.from_pretrained(Path(temporary) / "model"),
            "initialised weights": lambda: common.build_metaseg("metaseg-t"),
        }

        def class_map(model, dtype, inputs=pixel_values):
            logits = model(pixel_values=inputs.to(dtype)).logits.float()
            return F.interpolate(logits, size=pixel_values.shape[-2:], mode="bilinear").argmax(1)

        for source, build in weights.items():
            load = lambda build=build: build().to(args.device).eval()  # noqa: E731
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
            try:
                reference = load()
                truth = class_map(reference, torch.float32)
                rounded_input = class_map(reference, torch.float32, pixel_values.bfloat16().float())
                fused_float32 = class_map(load().fuse(), torch.float32)
            finally:
                torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
            results = {
                "float32 port, input rounded to bf16 (sensitivity)": rounded_input,
                "fused float32": fused_float32,
                "port bf16": class_map(load().to(torch.bfloat16), torch.bfloat16),
                "fused bf16": class_map(load().to(torch.bfloat16).fuse(), torch.bfloat16),
            }
            if compiled is not None:
                try:
                    underlying = compiled._orig_mod
                    underlying.load_state_dict(load().to(torch.bfloat16).state_dict())
                    refresh_fused(underlying)
                    # A batch of two copies reuses the graph compiled for dynamic batch sizes.
                    doubled = pixel_values.expand(2, -1, -1, -1)
                    results["fused+compile bf16"] = class_map(compiled, torch.bfloat16, doubled)[:1]
                except Exception as error:
                    lines.append(f"fused+compile agreement FAILED: {type(error).__name__}: {error}"[:500])
                    report(lines[-1])
            for name, class_map_ in results.items():
                agreement = (class_map_ == truth).float().mean().item()
                verdict = "" if "sensitivity" in name else (" ok" if agreement >= 0.99 else " BELOW the 99% target")
                lines.append(f"class maps, reference photo 1x3x512x704, {source}: {name} vs float32 port: "
                             f"{agreement * 100:.2f}% of pixels agree{verdict}")
                report(lines[-1])
    return lines


def run_cuda(args, report, device: str = "cuda") -> str:
    torch.backends.cudnn.benchmark = True
    batch_sizes = [int(value) for value in (args.batch_sizes or "1,16,64").split(",")]
    repeats, warmup = args.repeats or 20, args.warmup or 5
    compile_sizes = [key for key in args.compile_models.split(",") if key]
    dtype = torch.bfloat16
    rows, notes, compiled_t = [], [], None
    for key in args.models.split(","):
        family = FAMILIES[key]
        peer = common.PEERS[family]
        compile_ = key in compile_sizes
        models = {(family, v): m for v, m in metaseg_variants(family, device, dtype, compile_).items()}
        models.update({(peer, v): m for v, m in peer_variants(peer, device, dtype, compile_ and args.compile_peers).items()})
        if key == "t" and compile_:
            compiled_t = models[(family, "fused+compile")][0]
        for batch_size in batch_sizes:
            pixel_values = torch.randn(batch_size, 3, args.size, args.size, device=device, dtype=dtype)
            cases, memory = {}, {}
            with torch.inference_mode():
                for name, (model, memory_format) in list(models.items()):
                    if "compile" in name[1] and batch_size == 1 and not args.compile_batch_1:
                        continue
                    inputs = pixel_values.contiguous(memory_format=memory_format)
                    started = time.perf_counter()
                    try:
                        model(pixel_values=inputs)  # first call: compilation, cuDNN autotuning
                        torch.cuda.synchronize()
                    except Exception as error:  # report and go on with the other models
                        notes.append(f"{name[0]} {name[1]} batch {batch_size} FAILED: {type(error).__name__}: {error}"[:500])
                        report(notes[-1])
                        del models[name]
                        continue
                    first = time.perf_counter() - started
                    if first > 5:
                        notes.append(f"{name[0]} {name[1]} batch {batch_size}: first call {first:.0f} s (warm-up, compilation)")
                        report(notes[-1])
                    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
                    torch.cuda.reset_peak_memory_stats()
                    before = torch.cuda.memory_allocated()
                    model(pixel_values=inputs)
                    torch.cuda.synchronize()
                    memory[name] = weights + torch.cuda.max_memory_allocated() - before
                    cases[name] = (lambda model=model, inputs=inputs: model(pixel_values=inputs))
                times = common.round_robin(
                    cases, repeats=repeats, warmup=warmup, synchronize=torch.cuda.synchronize, budget_s=30
                )
            peer_rate = batch_size / common.median(times[(peer, "eager")])
            port_rate = batch_size / common.median(times[(family, "port")])
            for (name, variant), values in times.items():
                rate = batch_size / common.median(values)
                rows.append([
                    name, variant, str(batch_size), f"{rate:.1f}", common.spread(values),
                    f"{memory[(name, variant)] / 2**20:.0f}", f"{rate / peer_rate:.2f}",
                    f"{rate / port_rate:.2f}" if name.startswith("metaseg") else "",
                ])
                report(" | ".join(rows[-1]))
        for (name, variant), (model, _) in models.items():
            if isinstance(model, common.Compiled):
                mode = "dynamic height/width" if model.dynamic_hw else "static height/width, dynamic batch"
                notes.append(f"{name} {variant}: compiled with {mode}"
                             + (f" (dynamic failed: {type(model.error).__name__}: {model.error})"[:400] if model.error else ""))
                report(notes[-1])
        del models, cases
        torch.cuda.empty_cache()
    table = common.markdown_table(
        ["model", "variant", "batch", "images/s", "IQR/2", "peak MiB", "speed vs SegFormer peer", "speed vs straight port"],
        rows,
    )
    report()
    report(table)
    agreement = agreement_check(args, report, compiled_t if args.agreement_compiled else None)
    machine = common.machine_description("cuda")
    return (
        f"## Inference, CUDA, bf16, {args.size}x{args.size}\n\n{machine}.\n\n`{common.COMMAND_LINE}`\n\n{table}\n\n"
        + "\n".join(f"- {line}" for line in notes + agreement)
    )


def main() -> None:
    global DYNAMIC_HW
    args = parse_args()
    DYNAMIC_HW = args.compile_dynamic_hw
    common.DEPTHWISE_IMPLEMENTATION = args.depthwise_implementation
    report = common.Report("bench_inference.txt")
    report(common.machine_description(args.device))
    section = run_cuda(args, report) if args.device == "cuda" else run_cpu(args, report)
    if args.write_results:
        common.write_section(f"inference-{args.device}", section)


if __name__ == "__main__":
    main()
