"""Training-step speed of MetaSeg-T / -B (the straight port, in NCHW and channels_last, and compiled)
against Transformers' SegFormer-B0 / -B2, measured side by side in one process.

One step = forward with labels, the model's own loss, backward, AdamW step, at 512x512 crops with 150
classes. CPU (the default without CUDA): float32, batch 2, `--threads 2`. CUDA: batch 16 under bf16
autocast. Prints the median step time (CPU) or images/s and peak memory (CUDA), and the ratios to the
SegFormer peer and to the straight port.

    python benchmarks/bench_training.py [--device cpu|cuda] [--models t,b] [--repeats N] [--write-results]

The fused path is inference-only (`fuse()` refuses training), so training is timed on the straight
port: `port` (NCHW, as `from_pretrained` gives it), `port+cl` (model and batch in channels_last) and,
on CUDA, `port+compile` for the sizes in `--compile-models` (default MetaSeg-T; NCHW;
`common.Compiled`: `torch.compile(fullgraph=True)` on the forward, static height and width with a
dynamic batch unless `--compile-dynamic-hw`; the loss, which checks the labels, runs eagerly; the
depthwise convolutions stay library calls: `config.depthwise_implementation = "auto"` uses the
Inductor-fused stencils for inference only). With `$OUT` set, the report also goes to
`$OUT/bench_training.txt`.
"""

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.use_fault_free_allocator()

import torch  # noqa: E402

FAMILIES = {"t": "metaseg-t", "b": "metaseg-b"}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="t,b", help="comma-separated MetaSeg sizes: t, b")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    parser.add_argument("--size", type=int, default=512, help="crop height and width")
    parser.add_argument("--batch-size", type=int, default=None, help="default: CPU 2, CUDA 16")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default: CPU 4, CUDA 15)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default: CPU 1, CUDA 3)")
    parser.add_argument("--compile-models", default="t", help="CUDA: sizes also timed compiled ('' for none)")
    parser.add_argument("--compile-peers", action="store_true", help="also time compiled SegFormer peers")
    parser.add_argument(
        "--compile-dynamic-hw", action="store_true",
        help="compile with dynamic height and width (falls back to static if Inductor fails to lower it)",
    )
    parser.add_argument("--write-results", action="store_true", help="rewrite this run's section of RESULTS.md")
    return parser.parse_args()


class TrainingStep:
    """forward (with labels unless compiled) -> loss -> backward -> AdamW step, for one model."""

    def __init__(self, model, pixel_values, labels, autocast_dtype=None, compile_=False, dynamic_hw=False):
        self.model = model.train()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.pixel_values, self.labels = pixel_values, labels
        self.autocast_dtype = autocast_dtype
        self.forward = common.Compiled(model, dynamic_hw) if compile_ else None

    def loss(self):
        if self.forward is None:
            return self.model(pixel_values=self.pixel_values, labels=self.labels).loss
        # The loss validates the labels (a data-dependent check): compile the network, not the loss.
        logits = self.forward(pixel_values=self.pixel_values).logits
        return self.model.semantic_segmentation_loss(logits, self.labels)

    def __call__(self):
        self.optimizer.zero_grad(set_to_none=True)
        device_type = self.pixel_values.device.type
        with torch.autocast(device_type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None):
            loss = self.loss()
        loss.backward()
        self.optimizer.step()


def build_steps(args, device: str, batch_size: int, autocast_dtype, compile_sizes: list[str]) -> dict:
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(batch_size, 3, args.size, args.size, generator=generator).to(device)
    labels = torch.randint(0, common.NUM_LABELS, (batch_size, args.size, args.size), generator=generator)
    labels[:, : args.size // 8] = 255  # some ignored pixels, as in real crops
    labels = labels.to(device)
    channels_last = pixel_values.contiguous(memory_format=torch.channels_last)
    steps = {}
    for key in args.models.split(","):
        family = FAMILIES[key]
        peer = common.PEERS[family]
        compile_ = key in compile_sizes
        steps[(family, "port")] = TrainingStep(common.build(family).to(device), pixel_values, labels, autocast_dtype)
        model = common.build(family).to(device).to(memory_format=torch.channels_last)
        steps[(family, "port+cl")] = TrainingStep(model, channels_last, labels, autocast_dtype)
        if compile_:
            steps[(family, "port+compile")] = TrainingStep(
                common.build(family).to(device), pixel_values, labels, autocast_dtype, True, args.compile_dynamic_hw
            )
        steps[(peer, "eager")] = TrainingStep(common.build(peer).to(device), pixel_values, labels, autocast_dtype)
        if compile_ and args.compile_peers:
            steps[(peer, "compile")] = TrainingStep(
                common.build(peer).to(device), pixel_values, labels, autocast_dtype, True, args.compile_dynamic_hw
            )
    return steps


def family_of(name: str) -> str:
    return name if name.startswith("metaseg") else next(f for f, p in common.PEERS.items() if p == name)


def run_cpu(args, report) -> str:
    torch.set_num_threads(args.threads)
    batch_size, repeats, warmup = args.batch_size or 2, args.repeats or 4, args.warmup or 1
    steps = build_steps(args, "cpu", batch_size, None, compile_sizes=[])
    report(f"Timing {len(steps)} training steps round-robin: {warmup} warm-up + {repeats} timed rounds ...")
    started = time.perf_counter()
    times = common.round_robin(steps, repeats=repeats, warmup=warmup)
    report(f"done in {time.perf_counter() - started:.0f} s")
    rows = []
    for (name, variant), values in times.items():
        family = family_of(name)
        peer_s = common.median(times[(common.PEERS[family], "eager")])
        port_s = common.median(times[(family, "port")])
        seconds = common.median(values)
        rows.append([
            name, variant, f"{seconds * 1e3:.0f}", f"{min(values) * 1e3:.0f}", common.spread(values),
            f"{seconds / peer_s:.2f}", f"{seconds / port_s:.2f}" if name.startswith("metaseg") else "",
        ])
    table = common.markdown_table(
        ["model", "variant", "median ms / step", "min ms", "IQR/2", "vs SegFormer peer", "vs straight port"], rows
    )
    report()
    report(table)
    return (
        f"## Training step, CPU, float32, batch {batch_size}, {args.size}x{args.size} crops\n\n"
        f"{common.machine_description('cpu')}, {len(next(iter(times.values())))} timed rounds after {warmup} "
        f"warm-up; forward + loss + backward + AdamW step.\n\n`{common.COMMAND_LINE}`\n\n{table}"
    )


def run_cuda(args, report, device: str = "cuda") -> str:
    torch.backends.cudnn.benchmark = True
    batch_size, repeats, warmup = args.batch_size or 16, args.repeats or 15, args.warmup or 3
    compile_sizes = [key for key in args.compile_models.split(",") if key]
    steps = build_steps(args, device, batch_size, torch.bfloat16, compile_sizes)
    memory, notes = {}, []
    for name, step in list(steps.items()):
        started = time.perf_counter()
        try:
            step()  # compilation, cuDNN autotuning, optimizer state
            torch.cuda.synchronize()
        except Exception as error:  # report and go on with the other models
            notes.append(f"{name[0]} {name[1]} FAILED: {type(error).__name__}: {error}"[:500])
            report(notes[-1])
            del steps[name]
            continue
        if time.perf_counter() - started > 5:
            notes.append(f"{name[0]} {name[1]}: first step {time.perf_counter() - started:.0f} s (warm-up, compilation)")
            report(notes[-1])
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        memory[name] = torch.cuda.max_memory_allocated() - before  # activations and other transients
    for (name, variant), step in steps.items():
        if step.forward is not None:
            mode = "dynamic height/width" if step.forward.dynamic_hw else "static height/width, dynamic batch"
            error = step.forward.error
            notes.append(f"{name} {variant}: compiled with {mode}"
                         + (f" (dynamic failed: {type(error).__name__}: {error})"[:400] if error else ""))
            report(notes[-1])
    times = common.round_robin(steps, repeats=repeats, warmup=warmup, synchronize=torch.cuda.synchronize, budget_s=60)
    rows = []
    for (name, variant), values in times.items():
        family = family_of(name)
        peer_rate = batch_size / common.median(times[(common.PEERS[family], "eager")])
        port_rate = batch_size / common.median(times[(family, "port")])
        rate = batch_size / common.median(values)
        rows.append([
            name, variant, f"{rate:.1f}", common.spread(values), f"{memory[(name, variant)] / 2**30:.1f}",
            f"{rate / peer_rate:.2f}", f"{rate / port_rate:.2f}" if name.startswith("metaseg") else "",
        ])
    table = common.markdown_table(
        ["model", "variant", "images/s", "IQR/2", "step peak GiB (above weights + optimizer)", "speed vs SegFormer peer",
         "speed vs straight port"],
        rows,
    )
    report()
    report(table)
    return (
        f"## Training step, CUDA, bf16 autocast, batch {batch_size}, {args.size}x{args.size} crops\n\n"
        f"{common.machine_description('cuda')}; forward + loss + backward + AdamW step.\n\n"
        f"`{common.COMMAND_LINE}`\n\n{table}\n\n" + "\n".join(f"- {line}" for line in notes)
    )


def main() -> None:
    args = parse_args()
    report = common.Report("bench_training.txt")
    report(common.machine_description(args.device))
    section = run_cuda(args, report) if args.device == "cuda" else run_cpu(args, report)
    if args.write_results:
        common.write_section(f"training-{args.device}", section)


if __name__ == "__main__":
    main()
