"""Shared helpers of the MetaSeg speed benchmarks (`bench_inference.py`, `bench_training.py`).

- `use_fault_free_allocator()`: re-executes the script with glibc told to keep freed memory
  (`MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1000000000000`); otherwise large tensors are page-faulted
  in again on every call and timings depend on the process's allocation history.
- Model builders: MetaSeg (random weights, an official preset) as the straight port, with
  channels_last, fused (`model.fuse()`), or compiled; Transformers' SegFormer B0 / B2 from config.
- `round_robin()`: every case timed in turn in one process after a warm-up, so that load from
  elsewhere on the machine hits all of them alike; medians are reported.
- `write_section()`: rewrites one marked section of `benchmarks/RESULTS.md`, keeping the rest (and,
  with `$OUT` set, copies the updated file to `$OUT/RESULTS.md`).
"""

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

ALLOCATOR_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "1000000000000"}
REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS = REPO_ROOT / "benchmarks" / "RESULTS.md"
COMMAND_LINE = "python " + " ".join(shlex.quote(argument) for argument in sys.argv)


def use_fault_free_allocator() -> None:
    """Re-executes the running script with the allocator settings unless they are already set."""
    if any(os.environ.get(key) != value for key, value in ALLOCATOR_ENV.items()):
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, **ALLOCATOR_ENV})


if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

SEGFORMER_SIZES = {
    "segformer-b0": dict(hidden_sizes=[32, 64, 160, 256], depths=[2, 2, 2, 2], decoder_hidden_size=256),
    "segformer-b2": dict(hidden_sizes=[64, 128, 320, 512], depths=[3, 4, 6, 3], decoder_hidden_size=768),
}
METASEG_PRESETS = {"metaseg-t": "metaseg-t-ade20k", "metaseg-b": "metaseg-b-ade20k"}
PEERS = {"metaseg-t": "segformer-b0", "metaseg-b": "segformer-b2"}
NUM_LABELS = 150


# `config.depthwise_implementation` of every MetaSeg the benchmarks build (`--depthwise-implementation`).
DEPTHWISE_IMPLEMENTATION = "auto"


def build_metaseg(name: str):
    """MetaSeg-T or -B (ADE20K preset, 150 labels) with seeded random weights, the straight port."""
    import torch

    from metaseg_hf import MetaSegConfig, MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    config = MetaSegConfig.from_preset(METASEG_PRESETS[name], depthwise_implementation=DEPTHWISE_IMPLEMENTATION)
    return MetaSegForSemanticSegmentation(config)


def build_segformer(name: str):
    """Transformers' SegFormer B0 / B2 built from config (random weights, 150 labels)."""
    import torch
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    torch.manual_seed(0)
    config = SegformerConfig(num_attention_heads=[1, 2, 5, 8], num_labels=NUM_LABELS, **SEGFORMER_SIZES[name])
    return SegformerForSemanticSegmentation(config)


def build(name: str):
    return build_segformer(name) if name.startswith("segformer") else build_metaseg(name)


class Compiled:
    """`torch.compile(model, fullgraph=True)`, called with `pixel_values=` like the model.

    `dynamic_hw=True`: dynamic height, width and batch (`dynamic=True`). Otherwise static height and
    width with a dynamic batch (`mark_dynamic` on dim 0): Inductor in torch 2.13 fails to lower the
    full MetaSeg network (the straight port as well as the fused one) with symbolic height and width
    (a ValueRangeError in a convolution's layout), while Dynamo traces it whole either way. If the
    dynamic compilation fails, this falls back to the static one and keeps the error in `.error`.
    """

    def __init__(self, model, dynamic_hw: bool = False):
        import torch

        self._orig_mod, self.dynamic_hw, self.error = model, dynamic_hw, None
        self.compiled = torch.compile(model, dynamic=True if dynamic_hw else False, fullgraph=True)

    def __call__(self, pixel_values, **kwargs):
        import torch

        if self.dynamic_hw:
            try:
                return self.compiled(pixel_values=pixel_values, **kwargs)
            except Exception as error:  # fall back to static height and width
                self.error, self.dynamic_hw = error, False
                self.compiled = torch.compile(self._orig_mod, dynamic=False, fullgraph=True)
        if pixel_values.shape[0] > 1:
            torch._dynamo.mark_dynamic(pixel_values, 0)
        return self.compiled(pixel_values=pixel_values, **kwargs)

    def parameters(self):
        return self._orig_mod.parameters()

    def buffers(self):
        return self._orig_mod.buffers()


def round_robin(cases: dict, repeats: int, warmup: int, synchronize=None, budget_s: float | None = None) -> dict:
    """Times each `cases[name]()` `repeats` times, interleaved, after `warmup` untimed rounds.

    Returns {name: [seconds, ...]}. `synchronize` (e.g. `torch.cuda.synchronize`) runs around each
    call; with `budget_s`, rounds stop early (keeping at least 3) once the budget is spent.
    """
    sync = synchronize or (lambda: None)
    for _ in range(warmup):
        for function in cases.values():
            function()
    sync()
    times = {name: [] for name in cases}
    started = time.perf_counter()
    for round_index in range(repeats):
        for name, function in cases.items():
            sync()
            start = time.perf_counter()
            function()
            sync()
            times[name].append(time.perf_counter() - start)
        if budget_s is not None and round_index >= 2 and time.perf_counter() - started > budget_s:
            break
    return times


def median(values) -> float:
    return statistics.median(values)


def spread(values) -> str:
    """Interquartile range relative to the median, e.g. '±4%': how noisy a figure is."""
    if len(values) < 4:
        return "n/a"
    quartiles = statistics.quantiles(values, n=4)
    return f"±{(quartiles[2] - quartiles[0]) / 2 / statistics.median(values) * 100:.0f}%"


def machine_description(device: str) -> str:
    import torch
    import transformers

    if device == "cuda":
        hardware = f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    else:
        model = platform.processor() or "unknown CPU"
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
        from metaseg_hf.onnx_metaseg import describe_int8_instructions

        hardware = f"{model} ({describe_int8_instructions()}), {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    try:
        load = ", load average {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())
    except OSError:
        load = ""
    return (
        f"{datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}; {hardware}{load}; torch {torch.__version__}, "
        f"transformers {transformers.__version__}, Python {platform.python_version()}"
    )


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_section(name: str, text: str, path: Path = RESULTS) -> None:
    """Replaces the section between `<!-- begin NAME -->` and `<!-- end NAME -->` in RESULTS.md
    (appending it when absent) and leaves the rest of the file alone."""
    begin, end = f"<!-- begin {name} -->", f"<!-- end {name} -->"
    block = f"{begin}\n{text.strip()}\n{end}\n"
    content = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if begin in content and end in content:
        head, rest = content.split(begin, 1)
        tail = rest.split(end, 1)[1].lstrip("\n")
        content = head + block + ("\n" + tail if tail else "")
    else:
        content = content.rstrip("\n") + "\n\n" + block
    path.write_text(content)
    print(f"wrote section {name!r} of {path}")
    out = os.environ.get("OUT")
    if out:  # on a lent GPU machine only $OUT comes back: return the whole updated file there
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / path.name).write_text(content)
        print(f"copied it to {Path(out) / path.name}")


class Report:
    """Collects printed lines; also appends them to `$OUT/<file_name>` when `$OUT` is set."""

    def __init__(self, file_name: str):
        self.lines = []
        out = os.environ.get("OUT")
        self.path = Path(out) / file_name if out else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)
        if self.path is not None:
            with self.path.open("a") as handle:
                handle.write(line + "\n")
