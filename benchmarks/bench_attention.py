#!/usr/bin/env python
"""Channel Reduction Attention: `F.scaled_dot_product_attention` vs the explicit rank-1 softmax.

Times `MetaSegChannelReductionAttention.attend` both ways (`fused_kernel=True` / `False`) on the
queries, keys and values of MetaSeg-T's three decoder stages for a 512x704 input (ADE20K's processed
size of a 375x500 photo), random weights, inference, interleaved repeats, medians; also the largest
difference between the two (float32 and float64). The model uses SDPA only on accelerators when the
attention maps are not asked for; this script decides that choice.

    python benchmarks/bench_attention.py [--device cpu|cuda] [--batch 1] [--repeats 50]
"""

import argparse
import sys

from common import median, round_robin, spread, use_fault_free_allocator

use_fault_free_allocator()

import torch  # noqa: E402

from metaseg_hf import MetaSegConfig  # noqa: E402
from metaseg_hf.modeling_metaseg import MetaSegChannelReductionAttention  # noqa: E402


def stage_inputs(config, batch, height, width, device, dtype):
    """Per decoder stage: the module and its (query, key, value) as `forward` builds them."""
    cases = []
    for stage, (channels, heads, ratio) in enumerate(
        zip(config.decoder_hidden_sizes, config.decoder_num_attention_heads, config.decoder_pool_ratios), 2
    ):
        side_h, side_w = -(-height // 2 ** (stage + 1)), -(-width // 2 ** (stage + 1))
        module = MetaSegChannelReductionAttention(config, channels, heads, ratio).to(device, dtype).eval()
        tokens, pooled = side_h * side_w, (side_h // ratio) * (side_w // ratio)
        query = torch.randn(batch, heads, tokens, 1, device=device, dtype=dtype)
        key = torch.randn(batch, heads, 1, pooled, device=device, dtype=dtype)
        value = torch.randn(batch, heads, pooled, channels // heads, device=device, dtype=dtype)
        cases.append((f"stage{stage} N={tokens} M={pooled}", module, (query, key, value)))
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    config = MetaSegConfig.from_preset("metaseg-t-ade20k")
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else None
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, batch {args.batch}")
    with torch.no_grad():
        for dtype in (torch.float64, torch.float32):
            for name, module, inputs in stage_inputs(config, args.batch, 512, 704, device, dtype):
                explicit = module.attend(*inputs, fused_kernel=False)[0]
                difference = (module.attend(*inputs, fused_kernel=True)[0] - explicit).abs().max().item()
                print(f"{name} {str(dtype).removeprefix('torch.')}: max |SDPA - explicit| = {difference:.1e}")
        total = {"explicit": 0.0, "sdpa": 0.0}
        for name, module, inputs in stage_inputs(config, args.batch, 512, 704, device, torch.float32):
            times = round_robin(
                {
                    "explicit": lambda module=module, inputs=inputs: module.attend(*inputs, fused_kernel=False),
                    "sdpa": lambda module=module, inputs=inputs: module.attend(*inputs, fused_kernel=True),
                },
                repeats=args.repeats, warmup=5, synchronize=synchronize,
            )
            explicit, sdpa = median(times["explicit"]), median(times["sdpa"])
            total["explicit"] += explicit
            total["sdpa"] += sdpa
            print(
                f"{name} float32: explicit {explicit * 1e3:.3f} ms ({spread(times['explicit'])}), "
                f"SDPA {sdpa * 1e3:.3f} ms ({spread(times['sdpa'])}), SDPA/explicit {sdpa / explicit:.2f}"
            )
        print(f"all three stages: SDPA/explicit {total['sdpa'] / total['explicit']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
