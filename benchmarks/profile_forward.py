"""Where a forward pass spends its time: the top operators / kernels of MetaSeg (straight port or
fused) and SegFormer under `torch.profiler`, as a table per model. It answers "which kernels are
left to make faster" before any optimisation is tried.

    python benchmarks/profile_forward.py [--device cuda] [--models metaseg-t:port,metaseg-t:fused,segformer-b0]
        [--batch-size 64] [--size 512] [--rows 15]

CUDA runs bf16 weights and inputs and sorts by the kernels' own device time; CPU runs float32 and sorts by
self CPU time.
With `$OUT` set the tables are also written to `$OUT/profile_forward.txt`.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.use_fault_free_allocator()

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402


def build(spec: str, device: str, dtype: torch.dtype):
    name, _, variant = spec.partition(":")
    model = common.build(name).to(device=device, dtype=dtype).eval()
    if variant == "fused":
        model.fuse()
    elif variant not in ("", "port"):
        raise SystemExit(f"unknown variant {variant!r} in {spec!r}: use port or fused")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--models", default="metaseg-t:port,metaseg-t:fused,segformer-b0")
    parser.add_argument("--batch-size", type=int, default=None, help="default: CUDA 64, CPU 1")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (CPU runs only)")
    args = parser.parse_args()
    cuda = args.device == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    else:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if cuda else torch.float32
    batch_size = args.batch_size or (64 if cuda else 1)
    report = common.Report("profile_forward.txt")
    report(common.machine_description(args.device))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    sort_by = "self_device_time_total" if cuda else "self_cpu_time_total"
    pixel_values = torch.randn(batch_size, 3, args.size, args.size, device=args.device, dtype=dtype)
    for spec in args.models.split(","):
        model = build(spec, args.device, dtype)
        with torch.inference_mode():
            for _ in range(3):  # warm-up: cuDNN autotuning, allocator
                model(pixel_values=pixel_values)
            if cuda:
                torch.cuda.synchronize()
            with profile(activities=activities) as profiler:
                for _ in range(3):
                    model(pixel_values=pixel_values)
                if cuda:
                    torch.cuda.synchronize()
        report(f"\n=== {spec}, batch {batch_size}, {args.size}x{args.size}, {dtype}, 3 forwards")
        report(profiler.key_averages().table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=70))
        del model


if __name__ == "__main__":
    main()
