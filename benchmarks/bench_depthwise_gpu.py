"""GPU check of MetaSeg's depthwise implementations (issue #11): library (`F.conv2d`) vs stencil vs Triton.

For MetaSeg-T at a 512x512 input (stage maps 128x128x32, 64x64x64, 32x32x160, 16x16x256; MLP hidden maps x8, x8,
x4, x4 channels), batch 64, bf16, it times with CUDA events (warm-up, then the median of `--repeat` runs):

- `msca`: the spatial part of the multi-scale convolutional attention (depthwise 5x5, the 1x7/7x1, 1x11/11x1,
  1x21/21x1 strip pairs, their sum): `ops_metaseg.msca_spatial`;
- `mlp`: the MLP's depthwise 3x3 + bias + GELU on the hidden map: `ops_metaseg.depthwise_conv2d_gelu`;

each forward only (no autograd) and forward + backward (gradients of the map and of every weight and bias).
Implementations: `library` (NCHW, the layout MetaSeg keeps on GPUs), `library-cl` (channels_last), `stencil`
(NCHW, eager: one kernel per tap unless compiled), `triton` (channels_last, its native layout). Every result and
gradient is compared with the library's in float32 (TF32 off); Triton fails the check when its error is over twice
the bf16 library's (and over 1e-2 relative to the largest reference value).

Before timing, a float32 check on small odd-sized maps with small Triton blocks (several row, column and channel
blocks, batch 2) compares every Triton output and gradient with the library's in float64 (relative 1e-4): it
exercises the fused MSCA kernel's rings and barriers on the GPU. Any failed check makes the exit status 1.

    python benchmarks/bench_depthwise_gpu.py [--batch-size 64] [--size 512] [--stages 1,2,3,4] [--ops msca,mlp]
        [--implementations library,library-cl,stencil,triton] [--passes forward,backward] [--warmup 3] [--repeat 10]
        [--msca-blocks 0,0,0;32,32,16] [--mlp-blocks 0,0;128,32] [--compile]

`--msca-blocks` / `--mlp-blocks` time the Triton ops once per block configuration (one row each; 0 keeps the
default heuristic), for tuning. `--compile` also times `torch.compile(fullgraph=True)`d forwards (a graph break is an
error; slow to compile: minutes for the stencils). The table is printed and, with `$OUT` set, written to `$OUT/bench_depthwise_gpu.txt`. Without a CUDA
device the script stops at once.

    python benchmarks/bench_depthwise_gpu.py --aot-check [--stages ...]

needs no GPU: it compiles every Triton kernel variant the benchmark launches for sm_90 (Hopper) with Triton's
bundled ptxas and prints each compile time (a check that the kernels build outside the interpreter).
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

# MetaSeg-T: channels per stage, MLP ratio per stage, downsampling of the input per stage.
STAGE_CHANNELS = (32, 64, 160, 256)
MLP_RATIOS = (8, 8, 4, 4)
STAGE_STRIDES = (4, 8, 16, 32)
LOCAL_KERNEL = 5
STRIP_SIZES = (7, 11, 21)
IMPLEMENTATIONS = ("library", "library-cl", "stencil", "triton")
NO_CUDA_MESSAGE = (
    "bench_depthwise_gpu.py needs a CUDA device (torch.cuda.is_available() is False): run it on the GPU machine, "
    "or use --aot-check to only compile the Triton kernels for sm_90"
)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--size", type=int, default=512, help="input image size; stage s has size / (4, 8, 16, 32)[s]")
    parser.add_argument("--stages", type=_int_list, default=(1, 2, 3, 4), help="comma-separated, 1 to 4")
    parser.add_argument("--ops", type=_choice_list(("msca", "mlp")), default=("msca", "mlp"))
    parser.add_argument("--implementations", type=_choice_list(IMPLEMENTATIONS), default=IMPLEMENTATIONS)
    parser.add_argument("--passes", type=_choice_list(("forward", "backward")), default=("forward", "backward"))
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument(
        "--msca-blocks", type=_blocks(3), default=((0, 0, 0),),
        help="Triton MSCA block sizes to time, 'BLOCK_H,BLOCK_W,BLOCK_C;...' (0: the default heuristic)",
    )  # fmt: skip
    parser.add_argument(
        "--mlp-blocks", type=_blocks(2), default=((0, 0),),
        help="Triton depthwise block sizes to time, 'BLOCK_P,BLOCK_C;...' (0: the default heuristic)",
    )  # fmt: skip
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd forwards")
    parser.add_argument("--aot-check", action="store_true", help="no GPU: compile the Triton kernels for sm_90")
    args = parser.parse_args(argv)
    if any(stage not in (1, 2, 3, 4) for stage in args.stages):
        parser.error(f"--stages takes 1 to 4, got {args.stages}")
    if args.batch_size < 1 or args.repeat < 1 or args.warmup < 0:
        parser.error("--batch-size and --repeat must be positive, --warmup non-negative")
    return args


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def _blocks(count: int):
    def parse(text: str) -> tuple[tuple[int, ...], ...]:
        try:
            configs = tuple(tuple(int(value) for value in part.split(",")) for part in text.split(";") if part.strip())
        except ValueError:
            configs = ()
        if not configs or any(len(config) != count or min(config) < 0 for config in configs):
            raise argparse.ArgumentTypeError(
                f"expected ';'-separated groups of {count} non-negative integers, got {text!r}"
            )
        return configs

    return parse


def _choice_list(choices):
    def parse(text: str) -> tuple[str, ...]:
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [value for value in values if value not in choices]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return values

    return parse


def stage_shape(stage: int, batch_size: int, size: int, op: str) -> tuple[int, int, int, int]:
    """(B, C, H, W) of the map an op sees at a stage (the MLP's hidden map for `mlp`)."""
    channels = STAGE_CHANNELS[stage - 1] * (MLP_RATIOS[stage - 1] if op == "mlp" else 1)
    side = -(-size // STAGE_STRIDES[stage - 1])
    return batch_size, channels, side, side


def make_params(channels: int, op: str, device, dtype, generator):
    """Random weights and biases (scaled to keep outputs O(1)) for one op."""
    import torch

    def rand(*shape, fan_in=1):
        return (torch.randn(*shape, generator=generator) / fan_in**0.5).to(device=device, dtype=dtype)

    if op == "mlp":
        return {"weight": rand(channels, 1, 3, 3, fan_in=9), "bias": rand(channels)}
    return {
        "local_weight": rand(channels, 1, LOCAL_KERNEL, LOCAL_KERNEL, fan_in=LOCAL_KERNEL**2),
        "local_bias": rand(channels),
        "horizontal_weights": [rand(channels, 1, 1, size, fan_in=size) for size in STRIP_SIZES],
        "horizontal_biases": [rand(channels) for _ in STRIP_SIZES],
        "vertical_weights": [rand(channels, 1, size, 1, fan_in=size) for size in STRIP_SIZES],
        "vertical_biases": [rand(channels) for _ in STRIP_SIZES],
    }


def flat_params(params) -> list:
    flat = []
    for value in params.values():
        flat.extend(value if isinstance(value, list) else [value])
    return flat


def run_op(op: str, x, params, implementation: str, block_sizes=None):
    from metaseg_hf import ops_metaseg

    name = "library" if implementation == "library-cl" else implementation
    extra = {} if block_sizes is None else {"block_sizes": block_sizes}
    if op == "mlp":
        return ops_metaseg.depthwise_conv2d_gelu(x, params["weight"], params["bias"], 1, name, **extra)
    return ops_metaseg.msca_spatial(x, *params.values(), implementation=name, **extra)


def layout(x, implementation: str):
    import torch

    if implementation in ("triton", "library-cl"):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous()


def leaf_params(params):
    """(params with every tensor replaced by a detached leaf that requires grad, the list of those leaves)."""
    leaves, rebuilt = [], {}
    for key, value in params.items():
        if isinstance(value, list):
            rebuilt[key] = [tensor.detach().requires_grad_(True) for tensor in value]
            leaves.extend(rebuilt[key])
        else:
            rebuilt[key] = value.detach().requires_grad_(True)
            leaves.append(rebuilt[key])
    return rebuilt, leaves


def forward_and_grads(op, x, params, implementation, grad_output, block_sizes=None):
    """(output, gradients of x and every parameter) of one implementation."""
    import torch

    x = layout(x, implementation).detach().requires_grad_(True)
    params, leaves = leaf_params(params)
    output = run_op(op, x, params, implementation, block_sizes)
    grads = torch.autograd.grad(output, [x, *leaves], grad_output)
    return output.detach(), grads


def relative_difference(actual, expected) -> tuple[float, float]:
    difference = (actual.double() - expected.double()).abs().max().item()
    return difference, difference / max(expected.double().abs().max().item(), 1e-30)


# (op, map shape, Triton block sizes or None for the defaults) of the float32 check
FLOAT32_CASES = (
    ("msca", (2, 19, 37, 45), (8, 16, 8)),  # 5 row x 3 column x 3 channel blocks
    ("msca", (3, 5, 6, 7), None),
    ("mlp", (2, 37, 29, 31), (64, 16)),
    ("mlp", (1, 3, 5, 7), None),
)


def float32_check(device, cases=FLOAT32_CASES) -> list[str]:
    """Triton at float32 vs the library at float64 (exact enough to be the reference), on small odd maps with small
    blocks; returns failure lines."""
    import torch

    failures = []
    generator = torch.Generator().manual_seed(1)
    for op, shape, block_sizes in cases:
        params = make_params(shape[1], op, device, torch.float32, generator)
        x = torch.randn(shape, generator=generator).to(device)
        grad_output = torch.randn(shape, generator=generator).to(device)
        params64 = {key: [p.double() for p in v] if isinstance(v, list) else v.double() for key, v in params.items()}
        expected = forward_and_grads(op, x.double(), params64, "library", grad_output.double())
        actual = forward_and_grads(op, x, params, "triton", grad_output, block_sizes)
        worst = 0.0
        names = ["output", "grad x"] + [f"grad param {i}" for i in range(len(actual[1]) - 1)]
        for name, got, want in zip(names, [actual[0], *actual[1]], [expected[0], *expected[1]]):
            _, relative = relative_difference(got, want)
            worst = max(worst, relative)
            if not relative <= 1e-4:
                failures.append(f"float32 check {op} {shape} blocks {block_sizes} {name}: relative diff {relative:.2e}")
        print(f"float32 check {op} {shape} blocks {block_sizes}: worst relative diff {worst:.2e}", flush=True)
    return failures


def time_cuda(function, warmup: int, repeat: int) -> float:
    """Median milliseconds of `function()` over `repeat` runs after `warmup` runs, CUDA events."""
    import torch

    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        function()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def variants(args, op: str) -> list[tuple[str, str, tuple | None]]:
    """(label, implementation, Triton block sizes or None) for each row of an op."""
    rows = []
    for implementation in args.implementations:
        if implementation != "triton":
            rows.append((implementation, implementation, None))
            continue
        for blocks in args.msca_blocks if op == "msca" else args.mlp_blocks:
            default = not any(blocks)
            rows.append(("triton" if default else f"triton{list(blocks)}", "triton", None if default else blocks))
    return rows


def benchmark(args) -> tuple[list[str], list[str]]:
    import torch

    device = torch.device("cuda")
    dtype = torch.bfloat16
    lines = [
        f"# {torch.cuda.get_device_name(device)}, torch {torch.__version__}, batch {args.batch_size}, "
        f"{args.size}x{args.size} input, bf16, median of {args.repeat} (warm-up {args.warmup}), milliseconds; "
        "error: max |result - float32 library result| over the output and every gradient, relative to the largest "
        "reference value; vs library: max |triton - library| (both bf16) over the output and every gradient",
        f"{'stage':>5} {'op':>4} {'map (B,C,H,W)':>20} {'implementation':>22} {'forward':>9} {'fwd+bwd':>9}"
        f" {'compiled fwd':>12} {'error':>9} {'vs library':>10}  speed-up vs library",
    ]
    print("\n".join(lines), flush=True)
    failures = []
    generator = torch.Generator().manual_seed(0)
    for stage in args.stages:
        for op in args.ops:
            shape = stage_shape(stage, args.batch_size, args.size, op)
            params = make_params(shape[1], op, device, dtype, generator)
            x = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
            grad_output = torch.randn(shape, generator=generator).to(device=device, dtype=dtype)
            params32 = {key: [p.float() for p in v] if isinstance(v, list) else v.float() for key, v in params.items()}
            tf32 = torch.backends.cudnn.allow_tf32
            torch.backends.cudnn.allow_tf32 = False
            try:
                reference = forward_and_grads(op, x.float(), params32, "library", grad_output.float())
            finally:
                torch.backends.cudnn.allow_tf32 = tf32
            baseline, baseline_error, library_results = None, None, None
            for label, implementation, block_sizes in variants(args, op):
                row = _time_implementation(args, op, x, params, implementation, grad_output, block_sizes)
                output, grads = forward_and_grads(op, x, params, implementation, grad_output, block_sizes)
                results = [output, *grads]
                error = max(
                    relative_difference(got, want)[1] for got, want in zip(results, [reference[0], *reference[1]])
                )
                versus = ""
                if implementation == "triton" and library_results is not None:
                    versus = (
                        f"{max(relative_difference(got, want)[0] for got, want in zip(results, library_results)):.3g}"
                    )
                check = f"{error:.2e}"
                if implementation == "library":
                    baseline, baseline_error, library_results = row, error, results
                elif (
                    implementation == "triton"
                    and baseline_error is not None
                    and not error <= max(2 * baseline_error, 1e-2)
                ):
                    check += " FAIL"
                    failures.append(
                        f"stage {stage} {op} {label}: error {error:.2e} vs the library's {baseline_error:.2e} (bf16)"
                    )
                del output, grads, results
                speedup = ""
                if baseline is not None and implementation != "library":
                    for key, name in (("forward", "fwd"), ("backward", "fwd+bwd")):
                        if row[key] and baseline[key]:
                            speedup += f" x{baseline[key] / row[key]:.2f} {name}"
                line = (
                    f"{stage:>5} {op:>4} {str(shape):>20} {label:>22} {_ms(row['forward']):>9}"
                    f" {_ms(row['backward']):>9} {_ms(row['compiled']):>12} {check:>9} {versus:>10} {speedup}"
                )
                print(line, flush=True)
                lines.append(line)
            del reference, library_results, x, grad_output, params, params32
            torch.cuda.empty_cache()
    return lines, failures


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _time_implementation(args, op, x, params, implementation, grad_output, block_sizes) -> dict:
    import torch

    x = layout(x, implementation)
    grad_output = layout(grad_output, implementation)
    row = {"forward": None, "backward": None, "compiled": None}
    if "forward" in args.passes:
        with torch.no_grad():
            row["forward"] = time_cuda(
                lambda: run_op(op, x, params, implementation, block_sizes), args.warmup, args.repeat
            )
    if "backward" in args.passes:
        x_grad = x.detach().requires_grad_(True)
        leaves_params, leaves = leaf_params(params)

        def forward_backward():
            output = run_op(op, x_grad, leaves_params, implementation, block_sizes)
            torch.autograd.grad(output, [x_grad, *leaves], grad_output)

        row["backward"] = time_cuda(forward_backward, args.warmup, args.repeat)
    if args.compile:
        # fullgraph: a graph break (e.g. around the Triton ops) is an error
        compiled = torch.compile(lambda tensor: run_op(op, tensor, params, implementation, block_sizes), fullgraph=True)
        with torch.no_grad():
            started = time.perf_counter()
            compiled(x)
            torch.cuda.synchronize()
            print(f"  compiled {op} {implementation} in {time.perf_counter() - started:.1f} s", flush=True)
            row["compiled"] = time_cuda(lambda: compiled(x), args.warmup, args.repeat)
    return row


def aot_check(args) -> int:
    """Compiles every Triton kernel variant the benchmark launches for sm_90, without a GPU: the launches are
    recorded (not run) from the real op bodies on CPU tensors of the benchmark's shapes."""
    if os.environ.get("TRITON_INTERPRET", "") not in ("", "0"):
        raise SystemExit("--aot-check compiles real kernels: unset TRITON_INTERPRET")
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from metaseg_hf import ops_metaseg

    ops_metaseg.load_triton_ops()
    launches = {}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def record(*arguments, **keywords):
                pointer = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16"}
                signature = {
                    name: pointer[value.dtype] if isinstance(value, torch.Tensor) else "i32"
                    for name, value in zip(self.kernel.arg_names, arguments)
                }
                options = {key: keywords[key] for key in ("num_warps", "num_stages") if key in keywords}
                constants = {key: value for key, value in keywords.items() if key not in options}
                signature.update(dict.fromkeys(constants, "constexpr"))
                key = (self.kernel.__name__, tuple(sorted(signature.items())), tuple(sorted(constants.items())))
                launches.setdefault(key, (self.kernel, signature, constants, options))

            return record

    original = ops_metaseg._launcher
    ops_metaseg._launcher = Recorder
    try:
        dtype = torch.bfloat16
        generator = torch.Generator().manual_seed(0)
        for stage in args.stages:
            for op in args.ops:
                batch, channels, height, width = stage_shape(stage, args.batch_size, args.size, op)
                x = torch.empty(batch, height, width, channels, dtype=dtype).permute(0, 3, 1, 2)
                params = make_params(channels, op, "cpu", dtype, generator)
                if op == "mlp":
                    weight, bias = params["weight"], params["bias"]
                    torch.ops.metaseg.depthwise_conv2d(x, weight, bias, True, 0, 0)
                    torch.ops.metaseg.depthwise_conv2d_backward(x, x, weight, bias, True, 0, 0)
                else:
                    packed = ops_metaseg._pack_strips(
                        params["horizontal_weights"], params["horizontal_biases"], channels, max(STRIP_SIZES)
                    )
                    packed_vertical = ops_metaseg._pack_strips(
                        params["vertical_weights"], params["vertical_biases"], channels, max(STRIP_SIZES)
                    )
                    arguments = (x, params["local_weight"], params["local_bias"], *packed, *packed_vertical)
                    torch.ops.metaseg.msca_spatial(*arguments, list(STRIP_SIZES), 0, 0, 0)
                    torch.ops.metaseg.msca_spatial_backward(x, *arguments, list(STRIP_SIZES))
    finally:
        ops_metaseg._launcher = original
    target = GPUTarget("cuda", 90, 32)
    total = time.perf_counter()
    for (name, _, _), (kernel, signature, constants, options) in sorted(launches.items(), key=lambda item: item[0][0]):
        started = time.perf_counter()
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constants), target=target, options=options
        )
        ptx = compiled.asm["ptx"]
        print(
            f"{name:>20} {time.perf_counter() - started:6.1f} s  cubin {len(compiled.asm['cubin']):>7} B  "
            f"barriers {ptx.count('bar.sync'):>3}  {dict(constants)}",
            flush=True,
        )
    print(f"compiled {len(launches)} kernel variants for sm_90 in {time.perf_counter() - total:.1f} s")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.aot_check:
        return aot_check(args)
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA_MESSAGE)
    from metaseg_hf import ops_metaseg

    reason = ops_metaseg.triton_unsupported_reason(
        torch.empty(1, 1, 1, 1, device="cuda", dtype=torch.bfloat16), torch.empty(1, 1, 3, 3, device="cuda"), 1
    )
    if reason is not None and "triton" in args.implementations:
        raise SystemExit(f"the Triton kernels cannot run here: {reason}")
    started = time.perf_counter()
    failures = float32_check(torch.device("cuda")) if "triton" in args.implementations else []
    lines, bench_failures = benchmark(args)
    failures += bench_failures
    lines.append(f"# total {time.perf_counter() - started:.0f} s (Triton compilation included)")
    for failure in failures:
        lines.append(f"FAILED: {failure}")
        print(f"FAILED: {failure}", flush=True)
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "bench_depthwise_gpu.txt"
        path.write_text("\n".join(lines) + "\n")
        print(f"wrote {path}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
