"""MetaSeg's depthwise convolutions behind one explicit switch, with Triton kernels for GPUs.

Three computations, each with the same choice of `implementation`:

- `depthwise_conv2d(x, weight, bias, padding)`: one depthwise convolution (stride 1).
- `depthwise_conv2d_gelu(x, weight, bias, padding)`: GELU (exact, erf) of one, the MLP's 3x3 (`MetaSegConvMlp`).
- `msca_spatial(x, local_weight, local_bias, horizontal_*, vertical_*)`: the spatial part of the
  multi-scale convolutional attention (`MetaSegMultiScaleConvAttention` before its 1x1 `channel_mixer`):
  `a = dw_kxk(x) + b; out = a + sum_s dw_sx1(dw_1xs(a) + bh_s) + bv_s`, every convolution zero-padded
  to the same size.

Implementations (`IMPLEMENTATIONS`):

- `"library"`: `F.conv2d(groups=C)` (oneDNN on CPU, cuDNN or PyTorch's generic `conv_depthwise2d` on CUDA).
- `"stencil"`: a sum of kh * kw shifted, per-channel scaled slices in the input's dtype (Inductor fuses it
  into element-wise kernels when compiled).
- `"triton"`: the Triton kernels below; `supports(...)` / `triton_unsupported_reason(...)` say when they
  apply, and this choice raises `ValueError` with the reason otherwise.
- `"auto"`: what has been measured fastest (`resolve_auto`): `"stencil"` while `torch.compile` traces GPU
  inference (autograd off, not CPU; on an H200 in bf16, MetaSeg-T fused + compiled at batch 64 went from
  1155 to 1572 images/s, compilation 28 s -> 128 s), `"library"` everywhere else: eager calls, CPUs
  (oneDNN's kernels are the fast ones there), float64, and training (compiling MetaSeg-T's stencils with
  their backward had not finished after 410 s). The Triton kernels join `"auto"` once a GPU run has
  measured them faster than these; until then they run only when asked for by name.

Triton kernels (built at first use; `triton` is never imported at module level, so the package imports
without it). They run on CUDA, and on CPU tensors only under Triton's interpreter (`TRITON_INTERPRET=1` set
before the first kernel is built; that is how the tests run them):

- All maps are read and written as NHWC: a (B, C, H, W) tensor is used through its (B, H, W, C) view, made
  contiguous if it is not already (free for `channels_last` tensors), and every result is returned as a
  (B, C, H, W) tensor in `channels_last` memory format. Loads are float32, bfloat16 or float16 (weights may be
  float32 with bf16 maps, as under autocast); all sums accumulate in float32; results have the map's dtype,
  weight gradients the weight's. Depthwise weights (C, 1, kh, kw) are used as (kh * kw, C) tap-major matrices.
- Only "same" convolutions: stride 1, odd kh and kw, padding (kh // 2, kw // 2) (all of MetaSeg's).
- `depthwise_forward`: one kh x kw convolution + bias over a [BLOCK_P pixels, BLOCK_C channels] tile, with an
  optional epilogue: GELU, or the GELU backward `grad * gelu'(z)` (recomputing z).
- `depthwise_backward`: input-centred: for each tap it loads the output gradient at the mirrored offset once and
  uses it twice, for the input gradient (times the tap) and for that tap's weight gradient (times the input at the
  tile's own pixels). Weight and bias gradients are summed over the tile's pixels into one (taps, C) partial per
  program, all taps in one pass; the partials are summed by `torch.sum` afterwards.
- `msca_forward`: the whole spatial MSCA in one kernel. A program owns BLOCK_H output rows x BLOCK_W columns x
  BLOCK_C channels and streams down its rows, plus HALO = max(strip) // 2 rows above and below whose `a` and
  horizontal strips it recomputes (the tiles above and below compute them too). Per row step: the kxk output `a`
  of the row, over the tile's columns plus HALO on each side, goes to a ring buffer; after a barrier, the row's
  horizontal strips are computed from it (one load of `a` per column offset, shared by the strips that reach it)
  and go to one ring buffer per strip; after a second barrier, the output row HALO rows above is summed from the
  rings (`a` + each vertical strip over its horizontal strip's rows + biases) and stored. The rings are the
  program's own slice of a scratch tensor in global memory (Triton exposes no shared memory; they stay in L1 / L2),
  (RING_A * BLOCK_WA + strips * RING_H * BLOCK_W) * BLOCK_C elements per program, in the map's dtype: `a` and the
  horizontal strips are rounded to it like the library's outputs are. The barriers (`tl.debug_barrier`, PTX
  `bar.sync`) make the ring writes of all threads visible to the whole program (CUDA's `__syncthreads`
  guarantee for global memory). The interpreter runs programs one at a time, so only a GPU run tests this
  (`benchmarks/bench_depthwise_gpu.py` checks it at float32 first). The MSCA's gate (`* x`) is not fused: it
  follows the 1x1 `channel_mixer`.
- The backward of the fused MSCA recomputes its intermediates (`a` and the horizontal strips, in the map's dtype)
  with `depthwise_forward` instead of saving them (four maps per block less activation memory) and chains
  `depthwise_backward` through the graph: vertical strips (gradient of each horizontal strip output, vertical
  weights and biases), horizontal strips (accumulating the gradient of `a` in float32 in place), then the kxk.
  Eleven kernel launches for three strips; fusing them is left to GPU tuning.

Every Triton computation is a `torch.library.triton_op` with `register_autograd` (`metaseg::depthwise_conv2d`,
`metaseg::msca_spatial`, and their `*_backward` ops), so `torch.compile` captures the kernels without graph
breaks; call `load_triton_ops()` (or run once eagerly) before compiling. Block sizes are heuristics for an H200
(`_depthwise_blocks`, `_msca_blocks`), not yet tuned on one.
"""

import os

import torch
from torch.nn import functional as F

IMPLEMENTATIONS = ("library", "stencil", "triton", "auto")
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
MAX_STRIPS = 3  # the fused MSCA kernel has three strip slots (MetaSeg: 7, 11, 21)

# Programs the fused MSCA kernel aims for before it splits the rows of a map into more blocks (an H200 has
# 132 SMs; a few programs each keep it busy while others wait at their barriers).
MSCA_TARGET_PROGRAMS = 512


def check_implementation(implementation: str) -> str:
    """Returns `implementation` if it is one of `IMPLEMENTATIONS`, else raises a `ValueError` naming them."""
    if implementation not in IMPLEMENTATIONS:
        choices = ", ".join(repr(name) for name in IMPLEMENTATIONS)
        raise ValueError(f"unknown depthwise implementation {implementation!r}: choose one of {choices}")
    return implementation


# --------------------------------------------------------------------------------------------------------------
# Availability


_TRITON_IMPORT_ERROR = None  # "" once triton imported, else the reason it does not


def triton_import_error() -> str | None:
    """Why `import triton` fails (checked once, cached), or None when it works."""
    global _TRITON_IMPORT_ERROR
    if _TRITON_IMPORT_ERROR is None:
        try:
            import triton  # noqa: F401
        except ImportError as error:
            _TRITON_IMPORT_ERROR = f"triton cannot be imported ({error}); pip install 'metaseg-hf[triton]'"
        else:
            _TRITON_IMPORT_ERROR = ""
    return _TRITON_IMPORT_ERROR or None


def triton_importable() -> bool:
    """Whether `import triton` works (checked once, cached)."""
    return triton_import_error() is None


def triton_interpreting() -> bool:
    """Whether Triton's interpreter is requested (`TRITON_INTERPRET=1`): kernels then run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "").strip().lower() in ("1", "true", "yes", "on")


def is_triton_available(tensor: torch.Tensor) -> bool:
    """Whether the Triton kernels can run on `tensor`'s device: Triton importable and a CUDA tensor, or a CPU
    tensor under `TRITON_INTERPRET=1`. Says nothing about shapes or dtypes: see `supports`."""
    return _device_reason(tensor) is None


def _device_reason(tensor: torch.Tensor) -> str | None:
    if not hasattr(torch.library, "triton_op"):
        return f"the Triton ops need torch >= 2.6 (torch.library.triton_op), this is torch {torch.__version__}"
    if tensor.device.type == "cuda":
        if not triton_importable():
            return triton_import_error()
        if tensor.dtype == torch.bfloat16 and torch.cuda.get_device_capability(tensor.device) < (8, 0):
            return "bfloat16 Triton kernels need a GPU of compute capability 8.0 or newer"
        return None
    if tensor.device.type == "cpu" and triton_interpreting():
        return triton_import_error()
    return f"the Triton kernels run on CUDA tensors (or on CPU under TRITON_INTERPRET=1), not on {tensor.device.type}"


def _same_padding_reason(weight: torch.Tensor, padding, channels: int, name: str) -> str | None:
    if weight.dim() != 4 or weight.shape[0] != channels or weight.shape[1] != 1:
        return f"{name} must be a depthwise weight ({channels}, 1, kh, kw), got {tuple(weight.shape)}"
    kernel_height, kernel_width = weight.shape[-2:]
    if kernel_height % 2 == 0 or kernel_width % 2 == 0:
        return f"{name}: the Triton kernels take odd kernel sizes only, got {kernel_height}x{kernel_width}"
    if padding is not None and _pair(padding) != (kernel_height // 2, kernel_width // 2):
        return (
            f"{name}: the Triton kernels compute 'same' convolutions only (padding {kernel_height // 2, kernel_width // 2}"
            f" for a {kernel_height}x{kernel_width} kernel), got padding {_pair(padding)}"
        )
    return None


def _map_reason(x: torch.Tensor) -> str | None:
    if x.dim() != 4:
        return f"the Triton kernels take (B, C, H, W) maps, got shape {tuple(x.shape)}"
    if x.dtype not in TRITON_DTYPES:
        return f"the Triton kernels load float32, bfloat16 or float16, got {x.dtype}"
    if x.numel() == 0:
        return "empty map"
    if x[0].numel() >= 2**31:
        return "one image of the map has 2**31 elements or more (32-bit offsets within an image)"
    return _device_reason(x)


def triton_unsupported_reason(
    x: torch.Tensor, weight: torch.Tensor, padding=None, bias: torch.Tensor | None = None
) -> str | None:
    """Why `depthwise_conv2d(x, weight, bias, padding, "triton")` cannot run, or None if it can."""
    reason = _map_reason(x) or _same_padding_reason(weight, padding, x.shape[1], "weight")
    if reason is None and bias is not None and bias.shape != (x.shape[1],):
        reason = f"bias must have shape ({x.shape[1]},), got {tuple(bias.shape)}"
    return reason


def supports(x: torch.Tensor, weight: torch.Tensor, padding=None, bias: torch.Tensor | None = None) -> bool:
    """Whether the Triton kernels apply to this depthwise convolution (device, dtype, shapes)."""
    return triton_unsupported_reason(x, weight, padding, bias) is None


def msca_unsupported_reason(x, local_weight, horizontal_weights, vertical_weights) -> str | None:
    """Why `msca_spatial(..., implementation="triton")` cannot run on these arguments, or None if it can."""
    reason = _map_reason(x) or _same_padding_reason(local_weight, None, x.shape[1], "local_weight")
    if reason is not None:
        return reason
    if local_weight.shape[-1] != local_weight.shape[-2]:
        return f"local_weight must be square, got {tuple(local_weight.shape[-2:])}"
    if not 1 <= len(horizontal_weights) <= MAX_STRIPS or len(horizontal_weights) != len(vertical_weights):
        return f"the fused MSCA kernel takes 1 to {MAX_STRIPS} strip pairs, got {len(horizontal_weights)} / {len(vertical_weights)}"
    for index, (horizontal, vertical) in enumerate(zip(horizontal_weights, vertical_weights)):
        reason = _same_padding_reason(horizontal, None, x.shape[1], f"horizontal_weights[{index}]") or (
            _same_padding_reason(vertical, None, x.shape[1], f"vertical_weights[{index}]")
        )
        if reason is not None:
            return reason
        if horizontal.shape[-2] != 1 or vertical.shape[-1] != 1 or horizontal.shape[-1] != vertical.shape[-2]:
            return (
                f"strip pair {index} must be (C, 1, 1, s) and (C, 1, s, 1), got {tuple(horizontal.shape)} "
                f"and {tuple(vertical.shape)}"
            )
    return None


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    first, second = value
    return int(first), int(second)


def _require_triton(reason: str | None) -> None:
    if reason is not None:
        raise ValueError(
            f"implementation='triton' cannot run here: {reason}. Set model.config.depthwise_implementation "
            "to 'auto' (or 'library') to run the PyTorch convolutions instead."
        )


# --------------------------------------------------------------------------------------------------------------
# Public API


def depthwise_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding,
    implementation: str = "library",
    *,
    block_sizes: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """Depthwise convolution, stride 1: x (B, C, H, W), weight (C, 1, kh, kw), bias (C,) or None, zero padding
    `padding` (int or (ph, pw)) -> (B, C, H', W').

    `implementation` is one of `IMPLEMENTATIONS` (module docstring). `block_sizes` = (BLOCK_P, BLOCK_C) of the
    Triton kernels, 0 for the default (tests and benchmarks only)."""
    implementation = _resolve(implementation, x, lambda: triton_unsupported_reason(x, weight, padding, bias))
    if implementation == "library":
        return F.conv2d(x, weight, bias, padding=padding, groups=weight.shape[0])
    if implementation == "stencil":
        return stencil_depthwise_conv(x, weight, bias, _pair(padding))
    return _triton_depthwise(x, weight, bias, False, block_sizes)


def depthwise_conv2d_gelu(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    padding,
    implementation: str = "library",
    *,
    block_sizes: tuple[int, int] = (0, 0),
) -> torch.Tensor:
    """`F.gelu(depthwise_conv2d(...))` (exact GELU), as in the MLP of an MSCAN block; the Triton kernel applies the
    GELU to the float32 sums before rounding, the others through `activation_on_map`. Arguments as
    `depthwise_conv2d`."""
    implementation = _resolve(implementation, x, lambda: triton_unsupported_reason(x, weight, padding, bias))
    if implementation == "triton":
        return _triton_depthwise(x, weight, bias, True, block_sizes)
    return activation_on_map(F.gelu, depthwise_conv2d(x, weight, bias, padding, implementation))


def msca_spatial(
    x: torch.Tensor,
    local_weight: torch.Tensor,
    local_bias: torch.Tensor | None,
    horizontal_weights,
    horizontal_biases,
    vertical_weights,
    vertical_biases,
    implementation: str = "library",
    *,
    block_sizes: tuple[int, int, int] = (0, 0, 0),
) -> torch.Tensor:
    """The spatial part of MSCA: `a = dw(x, local) ; a + sum_s dw(dw(a, horizontal_s), vertical_s)`.

    x (B, C, H, W); local_weight (C, 1, k, k) and local_bias (C,) (padding k // 2); for each strip size s,
    horizontal_weights[i] (C, 1, 1, s) (padding (0, s // 2)), vertical_weights[i] (C, 1, s, 1) (padding
    (s // 2, 0)), biases (C,) or None. -> (B, C, H, W). The library and stencil choices sum in the order of
    `MetaSegMultiScaleConvAttention`. `block_sizes` = (BLOCK_H, BLOCK_W, BLOCK_C) of the fused Triton kernel,
    0 for the default (tests and benchmarks only)."""
    horizontal_weights, vertical_weights = list(horizontal_weights), list(vertical_weights)
    horizontal_biases, vertical_biases = list(horizontal_biases), list(vertical_biases)
    implementation = _resolve(
        implementation, x, lambda: msca_unsupported_reason(x, local_weight, horizontal_weights, vertical_weights)
    )
    if implementation == "triton":
        return _triton_msca(
            x,
            local_weight,
            local_bias,
            horizontal_weights,
            horizontal_biases,
            vertical_weights,
            vertical_biases,
            block_sizes,
        )
    kernel = local_weight.shape[-1]
    attention = depthwise_conv2d(x, local_weight, local_bias, kernel // 2, implementation)
    multi_scale = attention
    for horizontal, horizontal_bias, vertical, vertical_bias in zip(
        horizontal_weights, horizontal_biases, vertical_weights, vertical_biases
    ):
        size = horizontal.shape[-1]
        strip = depthwise_conv2d(attention, horizontal, horizontal_bias, (0, size // 2), implementation)
        strip = depthwise_conv2d(strip, vertical, vertical_bias, (size // 2, 0), implementation)
        # A new tensor for the first sum (`attention` is still needed), in place after it.
        multi_scale = multi_scale + strip if multi_scale is attention else multi_scale.add_(strip)
    return multi_scale


def activation_on_map(activation, hidden_states: torch.Tensor) -> torch.Tensor:
    """An element-wise activation of a (B, C, H, W) map. A channels_last map goes through its
    contiguous (B, H, W, C) view: PyTorch's CPU GELU runs ~1.8x faster there than on the
    channels_last tensor itself (equal up to rounding: the two take different vectorised paths);
    other maps are passed as they are."""
    if hidden_states.is_contiguous() or not hidden_states.is_contiguous(memory_format=torch.channels_last):
        return activation(hidden_states)
    return activation(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def resolve_auto(x: torch.Tensor) -> str:
    """What `"auto"` runs for map `x` (module docstring): `"stencil"` while compiling GPU inference, else
    `"library"`."""
    compiling_gpu_inference = torch.compiler.is_compiling() and not x.is_cpu and not torch.is_grad_enabled()
    return "stencil" if compiling_gpu_inference and x.dtype != torch.float64 else "library"


def _resolve(implementation: str, x: torch.Tensor, unsupported_reason) -> str:
    """The implementation to run. "triton" is checked in eager calls only: while torch.compile traces, the
    eager warm-up has checked the same shapes already and the check's device queries would break the graph."""
    check_implementation(implementation)
    if implementation == "auto":
        return resolve_auto(x)
    if implementation == "triton" and not torch.compiler.is_compiling():
        _require_triton(unsupported_reason())
    return implementation


def stencil_depthwise_conv(hidden_states, weight, bias, padding):
    """The depthwise convolution (weight (C, 1, kh, kw), stride 1, zero padding (ph, pw)) as a sum of kh * kw
    shifted, per-channel scaled slices, computed in the input's dtype (under autocast that input is already an
    autocast convolution's output). (B, C, H, W) -> (B, C, H', W')."""
    (kernel_height, kernel_width), (pad_height, pad_width) = weight.shape[-2:], padding
    height = hidden_states.shape[-2] + 2 * pad_height - kernel_height + 1
    width = hidden_states.shape[-1] + 2 * pad_width - kernel_width + 1
    padded = F.pad(hidden_states, (pad_width, pad_width, pad_height, pad_height))
    taps = weight[:, 0].to(hidden_states.dtype).permute(1, 2, 0)[..., None, None]  # (kh, kw, C, 1, 1)
    output = None
    if bias is not None:
        output = bias.to(hidden_states.dtype)[:, None, None].expand(hidden_states.shape[1], height, width)
    for row in range(kernel_height):
        for column in range(kernel_width):
            term = padded[:, :, row : row + height, column : column + width] * taps[row, column]
            output = term if output is None else output + term
    return output


# --------------------------------------------------------------------------------------------------------------
# Triton: entry points (autograd-aware, through the registered ops)


def _bias_or_zeros(bias: torch.Tensor | None, weight: torch.Tensor) -> torch.Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


def _triton_depthwise(x, weight, bias, gelu: bool, block_sizes) -> torch.Tensor:
    load_triton_ops()
    block_p, block_c = block_sizes
    return torch.ops.metaseg.depthwise_conv2d(x, weight, _bias_or_zeros(bias, weight), gelu, block_p, block_c)


def _pack_strips(weights, biases, channels: int, longest: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Strip weights (C, 1, 1, s) or (C, 1, s, 1) -> (num_strips, C, longest), taps left-aligned, zero-padded;
    biases -> (num_strips, C). Differentiable (plain torch ops)."""
    packed = torch.stack(
        [F.pad(weight.reshape(channels, -1), (0, longest - weight.numel() // channels)) for weight in weights]
    )
    packed_bias = torch.stack([_bias_or_zeros(bias, weight) for weight, bias in zip(weights, biases)])
    return packed, packed_bias


def _triton_msca(
    x, local_weight, local_bias, horizontal_weights, horizontal_biases, vertical_weights, vertical_biases, block_sizes
):
    load_triton_ops()
    channels = x.shape[1]
    sizes = [weight.shape[-1] for weight in horizontal_weights]
    longest = max(sizes)
    horizontal, horizontal_bias = _pack_strips(horizontal_weights, horizontal_biases, channels, longest)
    vertical, vertical_bias = _pack_strips(vertical_weights, vertical_biases, channels, longest)
    return torch.ops.metaseg.msca_spatial(
        x,
        local_weight,
        _bias_or_zeros(local_bias, local_weight),
        horizontal,
        horizontal_bias,
        vertical,
        vertical_bias,
        sizes,
        *block_sizes,
    )


# --------------------------------------------------------------------------------------------------------------
# Triton: kernels (defined at first use; module globals so that Triton resolves them from kernel bodies)

triton = None
tl = None
_KERNELS = None


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _next_power_of_2(value: int) -> int:
    return 1 << max(0, int(value) - 1).bit_length()


def triton_kernels():
    """The Triton JIT functions (a dict), defined on first call. Needs triton; under `TRITON_INTERPRET=1` (set
    before this first call) they are interpreter functions that run on CPU tensors."""
    global _KERNELS
    if _KERNELS is None:
        _KERNELS = _define_kernels()
    return _KERNELS


def _define_kernels():
    global triton, tl, _gelu, _gelu_grad
    try:  # in a try block: Transformers' remote-code check then does not require triton to load a model
        import triton
        import triton.language as tl
    except ImportError as error:
        raise ImportError(f"the Triton kernels need triton: pip install 'metaseg-hf[triton]' ({error})") from error

    # Kernel code avoids calls to other @triton.jit functions in its loops: under the interpreter each such call
    # costs milliseconds. The two GELU helpers run once per tile.

    @triton.jit
    def _gelu(z):
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))

    @triton.jit
    def _gelu_grad(z):
        # d/dz [z * Phi(z)] = Phi(z) + z * phi(z)
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)

    @triton.jit
    def depthwise_forward(
        x_ptr,  # (B, H, W, C) map, any of the loaded dtypes
        w_ptr,  # (KH * KW, C) taps
        b_ptr,  # (C,) bias
        g_ptr,  # (B, H, W, C) gradient of GELU's output (EPILOGUE == 2 only; else any pointer)
        out_ptr,  # (B, H, W, C) result
        H,
        W,
        C,
        KH: tl.constexpr,
        KW: tl.constexpr,
        EPILOGUE: tl.constexpr,  # 0: z = conv + bias; 1: gelu(z); 2: g * gelu'(z)
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Same-size depthwise KH x KW convolution + bias of one [BLOCK_P pixels, BLOCK_C channels] tile (pixels
        of one image in row-major order). Grid: (cdiv(H * W, BLOCK_P), B, cdiv(C, BLOCK_C))."""
        pixels = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = pixels // W
        cols = pixels % W
        pixel_ok = pixels < H * W
        channel_ok = channels < C
        channel_mask = channel_ok[None, :]
        tile = tl.program_id(1).to(tl.int64) * H * W * C + pixels[:, None] * C + channels[None, :]
        x_tile = x_ptr + tile
        w_row = w_ptr + channels
        acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kr in tl.static_range(KH):  # input row offset kr - KH // 2
            row_ok = pixel_ok
            if kr < KH // 2:
                row_ok = row_ok & (rows >= KH // 2 - kr)
            if kr > KH // 2:
                row_ok = row_ok & (rows < H - (kr - KH // 2))
            for kc in tl.static_range(KW):  # input column offset kc - KW // 2
                ok = row_ok
                if kc < KW // 2:
                    ok = ok & (cols >= KW // 2 - kc)
                if kc > KW // 2:
                    ok = ok & (cols < W - (kc - KW // 2))
                v = tl.load(
                    x_tile + ((kr - KH // 2) * W + (kc - KW // 2)) * C, mask=ok[:, None] & channel_mask, other=0.0
                )
                tap = tl.load(w_row + (kr * KW + kc) * C, mask=channel_ok, other=0.0)
                acc += v.to(tl.float32) * tap.to(tl.float32)[None, :]
        acc += tl.load(b_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
        mask = pixel_ok[:, None] & channel_mask
        if EPILOGUE == 1:
            acc = _gelu(acc)
        if EPILOGUE == 2:
            acc = tl.load(g_ptr + tile, mask=mask, other=0.0).to(tl.float32) * _gelu_grad(acc)
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def depthwise_backward(
        g_ptr,  # (B, H, W, C) gradient of the convolution's output
        x_ptr,  # (B, H, W, C) the convolution's input
        w_ptr,  # (KH * KW, C) taps
        gx_ptr,  # (B, H, W, C) input gradient (read first when ACCUMULATE)
        gw_ptr,  # (B * num_pixel_blocks, KH * KW, C) float32 weight-gradient partials
        gb_ptr,  # (B * num_pixel_blocks, C) float32 bias-gradient partials
        H,
        W,
        C,
        num_pixel_blocks,
        KH: tl.constexpr,
        KW: tl.constexpr,
        ACCUMULATE: tl.constexpr,
        BLOCK_P: tl.constexpr,
        BLOCK_C: tl.constexpr,
    ):
        """Backward of a same-size depthwise convolution y[o] = sum_k w[k] x[o + k - P] + b for one tile of input
        pixels i: gx[i] = sum_k w[k] g[i + P - k] and, from the same loads, the tile's share of
        gw[k] = sum_i g[i + P - k] x[i] and of gb = sum_i g[i]. Grid: (num_pixel_blocks, B, cdiv(C, BLOCK_C))."""
        pid_p = tl.program_id(0)
        pid_b = tl.program_id(1)
        pixels = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        rows = pixels // W
        cols = pixels % W
        pixel_ok = pixels < H * W
        channel_ok = channels < C
        channel_mask = channel_ok[None, :]
        tile = pid_b.to(tl.int64) * H * W * C + pixels[:, None] * C + channels[None, :]
        g_tile = g_ptr + tile
        w_row = w_ptr + channels
        mask = pixel_ok[:, None] & channel_mask
        x = tl.load(x_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        partial = pid_b.to(tl.int64) * num_pixel_blocks + pid_p
        gw_row = gw_ptr + partial * (KH * KW) * C + channels
        gx = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
        for kr in tl.static_range(KH):  # output row offset KH // 2 - kr
            row_ok = pixel_ok
            if kr > KH // 2:
                row_ok = row_ok & (rows >= kr - KH // 2)
            if kr < KH // 2:
                row_ok = row_ok & (rows < H - (KH // 2 - kr))
            for kc in tl.static_range(KW):  # output column offset KW // 2 - kc
                ok = row_ok
                if kc > KW // 2:
                    ok = ok & (cols >= kc - KW // 2)
                if kc < KW // 2:
                    ok = ok & (cols < W - (KW // 2 - kc))
                g = tl.load(
                    g_tile + ((KH // 2 - kr) * W + (KW // 2 - kc)) * C, mask=ok[:, None] & channel_mask, other=0.0
                )
                g = g.to(tl.float32)
                tap = tl.load(w_row + (kr * KW + kc) * C, mask=channel_ok, other=0.0)
                gx += g * tap.to(tl.float32)[None, :]
                tl.store(gw_row + (kr * KW + kc) * C, tl.sum(g * x, axis=0), mask=channel_ok)
                if kr == KH // 2 and kc == KW // 2:
                    tl.store(gb_ptr + partial * C + channels, tl.sum(g, axis=0), mask=channel_ok)
        if ACCUMULATE:
            gx += tl.load(gx_ptr + tile, mask=mask, other=0.0).to(tl.float32)
        tl.store(gx_ptr + tile, gx.to(gx_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def msca_forward(
        x_ptr,  # (B, H, W, C) map
        out_ptr,  # (B, H, W, C) result
        scratch_ptr,  # per program: a ring (RING_A, BLOCK_WA, BLOCK_C), then strip rings (NS, RING_H, BLOCK_W, BLOCK_C)
        lw_ptr,  # (K * K, C) local taps
        lb_ptr,  # (C,)
        hw_ptr,  # (NS, SMAX, C) horizontal taps, strip i's first S_i rows used
        hb_ptr,  # (NS, C)
        vw_ptr,  # (NS, SMAX, C) vertical taps
        vb_ptr,  # (NS, C)
        H,
        W,
        C,
        num_col_blocks,
        K: tl.constexpr,
        S0: tl.constexpr,
        S1: tl.constexpr,  # 0: no second strip
        S2: tl.constexpr,  # 0: no third strip
        NS: tl.constexpr,  # number of strips
        SMAX: tl.constexpr,
        HALO: tl.constexpr,  # SMAX // 2
        BLOCK_H: tl.constexpr,
        BLOCK_W: tl.constexpr,
        BLOCK_WA: tl.constexpr,  # power of 2 >= BLOCK_W + 2 * HALO
        BLOCK_C: tl.constexpr,
        RING_A: tl.constexpr,  # >= HALO + 2
        RING_H: tl.constexpr,  # >= 2 * HALO + 1
    ):
        """Spatial MSCA for one [BLOCK_H rows, BLOCK_W cols, BLOCK_C channels] output tile per program, streaming
        down BLOCK_H + 2 * HALO row steps: step t computes row r = i0 - HALO + t (its `a` over the tile's columns
        +- HALO, then its horizontal strips) and outputs row r - HALO.
        Grid: (cdiv(H, BLOCK_H) * num_col_blocks, B, cdiv(C, BLOCK_C)).

        Ring sizes: a row's `a` is read (shifted) in its own step and (centre) HALO steps later, and the next
        step writes its slot with no barrier after that centre read: RING_A > HALO + 1. A horizontal strip row is
        read up to 2 * HALO steps after it is written: RING_H > 2 * HALO."""
        pid_tile = tl.program_id(0)
        pid_b = tl.program_id(1)
        pid_c = tl.program_id(2)
        i0 = (pid_tile // num_col_blocks) * BLOCK_H
        j0 = (pid_tile % num_col_blocks) * BLOCK_W
        channels = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
        channel_ok = channels < C
        channel_mask = channel_ok[None, :]
        lanes = tl.arange(0, BLOCK_C)
        cols_a = j0 - HALO + tl.arange(0, BLOCK_WA)  # map columns of the `a` ring rows
        cols = j0 + tl.arange(0, BLOCK_W)
        # offsets of a strip ring row (or of the tile's own BLOCK_W columns of an `a` row), and of an `a` ring row
        ring_tile = tl.arange(0, BLOCK_W)[:, None] * BLOCK_C + lanes[None, :]
        wide_tile = tl.arange(0, BLOCK_WA)[:, None] * BLOCK_C + lanes[None, :]
        program = (pid_b.to(tl.int64) * tl.num_programs(2) + pid_c) * tl.num_programs(0) + pid_tile
        a_ring = scratch_ptr + program * (RING_A * BLOCK_WA * BLOCK_C + NS * RING_H * BLOCK_W * BLOCK_C)
        # strip s, slot q: h_ring + s * strip_stride + q * BLOCK_W * BLOCK_C
        h_ring = a_ring + RING_A * BLOCK_WA * BLOCK_C + ring_tile
        strip_stride = RING_H * (BLOCK_W * BLOCK_C)
        x_tile = x_ptr + pid_b.to(tl.int64) * H * W * C + cols_a[:, None] * C + channels[None, :]
        out_tile = out_ptr + pid_b.to(tl.int64) * H * W * C + cols[:, None] * C + channels[None, :]
        out_mask = (cols < W)[:, None] & channel_mask
        a_cols_ok = ((cols_a >= 0) & (cols_a < W))[:, None]
        lw_row = lw_ptr + channels
        hw_row = hw_ptr + channels
        vw_row = vw_ptr + channels
        local_bias = tl.load(lb_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
        for step in range(BLOCK_H + 2 * HALO):
            r = i0 - HALO + step
            row_ok = (r >= 0) & (r < H)
            # 1. a = local conv + bias on row r, columns j0 - HALO ..., zero outside the map -> its ring slot
            a = tl.zeros([BLOCK_WA, BLOCK_C], dtype=tl.float32)
            if row_ok:
                x_row = x_tile + r * W * C
                for kc in tl.static_range(K):
                    cc = cols_a + (kc - K // 2)
                    col_mask = ((cc >= 0) & (cc < W))[:, None] & channel_mask
                    for kr in tl.static_range(K):
                        rr = r + (kr - K // 2)
                        ok = tl.where((rr >= 0) & (rr < H), col_mask, False)
                        v = tl.load(x_row + ((kr - K // 2) * W + (kc - K // 2)) * C, mask=ok, other=0.0)
                        tap = tl.load(lw_row + (kr * K + kc) * C, mask=channel_ok, other=0.0)
                        a += v.to(tl.float32) * tap.to(tl.float32)[None, :]
                a = tl.where(a_cols_ok, a + local_bias, 0.0)
            slot_a = step % RING_A
            tl.store(a_ring + slot_a * (BLOCK_WA * BLOCK_C) + wide_tile, a.to(a_ring.dtype.element_ty))
            tl.debug_barrier()
            # 2. the horizontal strips of row r (+ bias; zero outside the map: the vertical strips' padding),
            # one load of `a` per column offset d = t - HALO shared by the strips that reach it -> their ring slots
            h0 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
            h1 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
            h2 = tl.zeros([BLOCK_W, BLOCK_C], dtype=tl.float32)
            if row_ok:
                a_row = a_ring + (slot_a * BLOCK_WA + HALO) * BLOCK_C + ring_tile  # `a` at the tile's own columns
                for t in tl.static_range(2 * HALO + 1):
                    v = tl.load(a_row + (t - HALO) * BLOCK_C).to(tl.float32)
                    if t >= HALO - S0 // 2 and t <= HALO + S0 // 2:
                        tap = tl.load(hw_row + (t - HALO + S0 // 2) * C, mask=channel_ok, other=0.0)
                        h0 += v * tap.to(tl.float32)[None, :]
                    if S1 > 0 and t >= HALO - S1 // 2 and t <= HALO + S1 // 2:
                        tap = tl.load(hw_row + (SMAX + t - HALO + S1 // 2) * C, mask=channel_ok, other=0.0)
                        h1 += v * tap.to(tl.float32)[None, :]
                    if S2 > 0 and t >= HALO - S2 // 2 and t <= HALO + S2 // 2:
                        tap = tl.load(hw_row + (2 * SMAX + t - HALO + S2 // 2) * C, mask=channel_ok, other=0.0)
                        h2 += v * tap.to(tl.float32)[None, :]
                h0 += tl.load(hb_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
                if S1 > 0:
                    h1 += tl.load(hb_ptr + C + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
                if S2 > 0:
                    h2 += tl.load(hb_ptr + 2 * C + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
            slot_h = h_ring + (step % RING_H) * (BLOCK_W * BLOCK_C)
            tl.store(slot_h, h0.to(h_ring.dtype.element_ty))
            if S1 > 0:
                tl.store(slot_h + strip_stride, h1.to(h_ring.dtype.element_ty))
            if S2 > 0:
                tl.store(slot_h + 2 * strip_stride, h2.to(h_ring.dtype.element_ty))
            tl.debug_barrier()
            # 3. output row i = r - HALO: its `a` + the vertical strips (taps over the strip rows i + t - HALO,
            # written at steps step - 2 * HALO + t), once the rings hold them all
            i = r - HALO
            if (step >= 2 * HALO) & (i < H):
                out = tl.load(a_ring + (((step - HALO) % RING_A) * BLOCK_WA + HALO) * BLOCK_C + ring_tile)
                out = (
                    out.to(tl.float32) + tl.load(vb_ptr + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
                )
                for t in tl.static_range(2 * HALO + 1):
                    slot = h_ring + ((step - 2 * HALO + t) % RING_H) * (BLOCK_W * BLOCK_C)
                    if t >= HALO - S0 // 2 and t <= HALO + S0 // 2:
                        tap = tl.load(vw_row + (t - HALO + S0 // 2) * C, mask=channel_ok, other=0.0)
                        out += tl.load(slot).to(tl.float32) * tap.to(tl.float32)[None, :]
                    if S1 > 0 and t >= HALO - S1 // 2 and t <= HALO + S1 // 2:
                        tap = tl.load(vw_row + (SMAX + t - HALO + S1 // 2) * C, mask=channel_ok, other=0.0)
                        out += tl.load(slot + strip_stride).to(tl.float32) * tap.to(tl.float32)[None, :]
                    if S2 > 0 and t >= HALO - S2 // 2 and t <= HALO + S2 // 2:
                        tap = tl.load(vw_row + (2 * SMAX + t - HALO + S2 // 2) * C, mask=channel_ok, other=0.0)
                        out += tl.load(slot + 2 * strip_stride).to(tl.float32) * tap.to(tl.float32)[None, :]
                if S1 > 0:
                    out += tl.load(vb_ptr + C + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
                if S2 > 0:
                    out += tl.load(vb_ptr + 2 * C + channels, mask=channel_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(out_tile + i * W * C, out.to(out_ptr.dtype.element_ty), mask=out_mask)

    return {
        "depthwise_forward": depthwise_forward,
        "depthwise_backward": depthwise_backward,
        "msca_forward": msca_forward,
    }


def _launcher(kernel):
    """`wrap_triton(kernel)` (traceable by torch.compile), or under the interpreter the kernel itself, skipped
    when the op is traced with fake or meta tensors (the interpreter would read their data)."""
    try:  # see _define_kernels
        from triton.runtime.jit import JITFunction
    except ImportError as error:
        raise ImportError(f"the Triton kernels need triton: pip install 'metaseg-hf[triton]' ({error})") from error

    if isinstance(kernel, JITFunction):
        return torch.library.wrap_triton(kernel)
    return _InterpretedLauncher(kernel)


class _InterpretedLauncher:
    """Launches an interpreter kernel, except on fake / meta tensors (opcheck's and torch.compile's tracing of the
    op bodies; torch.compile cannot capture interpreted kernels, so compiled graphs need real GPU kernels)."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            from torch._subclasses.fake_tensor import FakeTensor

            tensors = [value for value in args if isinstance(value, torch.Tensor)]
            if any(isinstance(value, FakeTensor) or value.device.type == "meta" for value in tensors):
                return
            self.kernel[grid](*args, **kwargs)

        return launch


def _nhwc(tensor: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> contiguous (B, H, W, C) (a view for channels_last tensors)."""
    return tensor.permute(0, 2, 3, 1).contiguous()


def _nchw_view(tensor: torch.Tensor) -> torch.Tensor:
    """Contiguous (B, H, W, C) -> (B, C, H, W) in channels_last memory format (a view)."""
    return tensor.permute(0, 3, 1, 2)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """Depthwise weight (C, 1, kh, kw) -> contiguous (kh * kw, C)."""
    return weight.reshape(weight.shape[0], -1).t().contiguous()


def _depthwise_blocks(channels: int, block_p: int, block_c: int, tile: int) -> tuple[int, int]:
    """Defaults: up to 32 channels (a 64-byte bf16 vector per pixel) and `tile` // BLOCK_C pixels."""
    block_c = block_c or min(32, _next_power_of_2(channels))
    block_p = block_p or max(16, tile // block_c)
    return block_p, block_c


def _forward(x, taps, bias, kernel_size, epilogue=0, grad=None, block_p=0, block_c=0):
    """Runs `depthwise_forward` on NHWC `x` -> NHWC result of x's dtype."""
    batch, height, width, channels = x.shape
    block_p, block_c = _depthwise_blocks(channels, block_p, block_c, 2048)
    out = torch.empty_like(x)
    grid = (_cdiv(height * width, block_p), batch, _cdiv(channels, block_c))
    _launcher(triton_kernels()["depthwise_forward"])[grid](
        x, taps, bias, x if grad is None else grad, out, height, width, channels,
        KH=kernel_size[0], KW=kernel_size[1], EPILOGUE=epilogue, BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return out


def _backward(grad, x, taps, kernel_size, accumulate_into=None, block_p=0, block_c=0):
    """Runs `depthwise_backward` on NHWC `grad` and `x` -> (input gradient NHWC, weight gradient (kh * kw, C) and
    bias gradient (C,), both float32). With `accumulate_into` (NHWC), the input gradient is added to it in place."""
    batch, height, width, channels = x.shape
    block_p, block_c = _depthwise_blocks(channels, block_p, block_c, 4096)
    num_pixel_blocks = _cdiv(height * width, block_p)
    taps_count = kernel_size[0] * kernel_size[1]
    grad_x = torch.empty_like(x) if accumulate_into is None else accumulate_into
    grad_w = torch.empty((batch * num_pixel_blocks, taps_count, channels), dtype=torch.float32, device=x.device)
    grad_b = torch.empty((batch * num_pixel_blocks, channels), dtype=torch.float32, device=x.device)
    grid = (num_pixel_blocks, batch, _cdiv(channels, block_c))
    _launcher(triton_kernels()["depthwise_backward"])[grid](
        grad, x, taps, grad_x, grad_w, grad_b, height, width, channels, num_pixel_blocks,
        KH=kernel_size[0], KW=kernel_size[1], ACCUMULATE=accumulate_into is not None,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4,
    )  # fmt: skip
    return grad_x, grad_w.sum(0), grad_b.sum(0)


def _msca_blocks(batch, height, width, channels, block_h, block_w, block_c) -> tuple[int, int, int]:
    """Defaults: 16 channels (a 32-byte bf16 vector per pixel), up to 32 columns, and row blocks of up to 64
    rows, halved (down to 16) until the grid has MSCA_TARGET_PROGRAMS programs."""
    block_c = block_c or min(16, _next_power_of_2(channels))
    block_w = block_w or min(32, _next_power_of_2(width))
    if not block_h:
        block_h = min(64, _next_power_of_2(height))
        programs = batch * _cdiv(width, block_w) * _cdiv(channels, block_c)
        while block_h > 16 and programs * _cdiv(height, block_h) < MSCA_TARGET_PROGRAMS:
            block_h //= 2
    return block_h, block_w, block_c


def _msca_forward(
    x, kernel, local_taps, local_bias, horizontal, horizontal_bias, vertical, vertical_bias, sizes, blocks
):
    """Runs `msca_forward` on NHWC `x`; horizontal / vertical are (NS, SMAX, C) taps. -> NHWC result."""
    batch, height, width, channels = x.shape
    longest = horizontal.shape[1]
    halo = longest // 2
    block_h, block_w, block_c = _msca_blocks(batch, height, width, channels, *blocks)
    block_wa = _next_power_of_2(block_w + 2 * halo)
    ring_a, ring_h = halo + 2, 2 * halo + 1
    num_col_blocks = _cdiv(width, block_w)
    grid = (_cdiv(height, block_h) * num_col_blocks, batch, _cdiv(channels, block_c))
    per_program = (ring_a * block_wa + len(sizes) * ring_h * block_w) * block_c
    scratch = torch.empty(grid[0] * grid[1] * grid[2] * per_program, dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    padded = list(sizes) + [0] * (MAX_STRIPS - len(sizes))
    _launcher(triton_kernels()["msca_forward"])[grid](
        x, out, scratch, local_taps, local_bias, horizontal, horizontal_bias, vertical, vertical_bias,
        height, width, channels, num_col_blocks,
        K=kernel, S0=padded[0], S1=padded[1], S2=padded[2], NS=len(sizes), SMAX=longest, HALO=halo,
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_WA=block_wa, BLOCK_C=block_c, RING_A=ring_a, RING_H=ring_h,
        num_warps=4, num_stages=1,
    )  # fmt: skip
    return out


def _strip_taps(packed: torch.Tensor) -> torch.Tensor:
    """(NS, C, SMAX) packed strip weights -> contiguous (NS, SMAX, C)."""
    return packed.transpose(1, 2).contiguous()


# --------------------------------------------------------------------------------------------------------------
# Triton: custom operators

_OPS_LOADED = False


def load_triton_ops() -> None:
    """Registers the `metaseg::*` Triton operators (once; needs triton). Call before `torch.compile`."""
    global _OPS_LOADED
    if not _OPS_LOADED:
        triton_kernels()
        if not _registered("msca_spatial_backward"):  # else another copy of this module (remote code) did it
            _register_ops()
        _OPS_LOADED = True


def _registered(name: str) -> bool:
    try:
        getattr(torch.ops.metaseg, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def _register_ops() -> None:
    @torch.library.triton_op("metaseg::depthwise_conv2d", mutates_args=())
    def depthwise_op(
        x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, gelu: bool, block_p: int, block_c: int
    ) -> torch.Tensor:
        """Same-size depthwise convolution (+ GELU): x (B, C, H, W), weight (C, 1, kh, kw), bias (C,)
        -> (B, C, H, W) channels_last."""
        out = _forward(
            _nhwc(x), _taps(weight), bias, tuple(weight.shape[-2:]), epilogue=1 if gelu else 0,
            block_p=block_p, block_c=block_c,
        )  # fmt: skip
        return _nchw_view(out)

    @torch.library.triton_op("metaseg::depthwise_conv2d_backward", mutates_args=())
    def depthwise_backward_op(
        grad: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor,
        gelu: bool,
        block_p: int,
        block_c: int,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients (x, weight, bias) of `metaseg::depthwise_conv2d`. With GELU, the gradient of the
        pre-activation is recomputed from x first (one more forward pass instead of a saved map)."""
        kernel_size = tuple(weight.shape[-2:])
        x_nhwc, taps, grad_nhwc = _nhwc(x), _taps(weight), _nhwc(grad)
        if gelu:
            grad_nhwc = _forward(
                x_nhwc, taps, bias, kernel_size, epilogue=2, grad=grad_nhwc, block_p=block_p, block_c=block_c
            )
        grad_x, grad_w, grad_b = _backward(grad_nhwc, x_nhwc, taps, kernel_size, block_p=block_p, block_c=block_c)
        return _nchw_view(grad_x), grad_w.t().reshape(weight.shape).to(weight.dtype), grad_b.to(bias.dtype)

    def depthwise_setup(ctx, inputs, output):
        x, weight, bias, gelu, block_p, block_c = inputs
        ctx.save_for_backward(x, weight, bias)
        ctx.options = (gelu, block_p, block_c)

    def depthwise_grad(ctx, grad):
        x, weight, bias = ctx.saved_tensors
        grads = torch.ops.metaseg.depthwise_conv2d_backward(grad, x, weight, bias, *ctx.options)
        return *grads, None, None, None

    torch.library.register_autograd("metaseg::depthwise_conv2d", depthwise_grad, setup_context=depthwise_setup)

    @torch.library.triton_op("metaseg::msca_spatial", mutates_args=())
    def msca_op(
        x: torch.Tensor,
        local_weight: torch.Tensor,
        local_bias: torch.Tensor,
        horizontal_weight: torch.Tensor,
        horizontal_bias: torch.Tensor,
        vertical_weight: torch.Tensor,
        vertical_bias: torch.Tensor,
        strip_sizes: list[int],
        block_h: int,
        block_w: int,
        block_c: int,
    ) -> torch.Tensor:
        """Fused spatial MSCA: x (B, C, H, W), local_weight (C, 1, k, k), local_bias (C,), strips packed as
        (NS, C, SMAX) weights (taps left-aligned, strip i uses strip_sizes[i]) and (NS, C) biases
        -> (B, C, H, W) channels_last."""
        out = _msca_forward(
            _nhwc(x), local_weight.shape[-1], _taps(local_weight), local_bias, _strip_taps(horizontal_weight), horizontal_bias,
            _strip_taps(vertical_weight), vertical_bias, strip_sizes, (block_h, block_w, block_c),
        )  # fmt: skip
        return _nchw_view(out)

    @torch.library.triton_op("metaseg::msca_spatial_backward", mutates_args=())
    def msca_backward_op(
        grad: torch.Tensor,
        x: torch.Tensor,
        local_weight: torch.Tensor,
        local_bias: torch.Tensor,
        horizontal_weight: torch.Tensor,
        horizontal_bias: torch.Tensor,
        vertical_weight: torch.Tensor,
        vertical_bias: torch.Tensor,
        strip_sizes: list[int],
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gradients of `metaseg::msca_spatial` for all seven tensor inputs. Recomputes `a` and the horizontal
        strips (in the map's dtype), then chains the depthwise backward through the vertical strips, the
        horizontal strips (summing the gradient of `a` in float32) and the local convolution."""
        kernel = local_weight.shape[-1]
        longest = horizontal_weight.shape[-1]
        x_nhwc, grad_nhwc, local_taps = _nhwc(x), _nhwc(grad), _taps(local_weight)
        horizontal, vertical = _strip_taps(horizontal_weight), _strip_taps(vertical_weight)
        attention = _forward(x_nhwc, local_taps, local_bias, (kernel, kernel))
        grad_attention = grad_nhwc.to(torch.float32, copy=True)
        grads_h, grads_hb, grads_v, grads_vb = [], [], [], []
        for index, size in enumerate(strip_sizes):
            strip = _forward(attention, horizontal[index, :size], horizontal_bias[index], (1, size))
            grad_strip, grad_v, grad_vb = _backward(grad_nhwc, strip, vertical[index, :size], (size, 1))
            _, grad_h, grad_hb = _backward(
                grad_strip, attention, horizontal[index, :size], (1, size), accumulate_into=grad_attention
            )
            grads_h.append(F.pad(grad_h.t(), (0, longest - size)))
            grads_v.append(F.pad(grad_v.t(), (0, longest - size)))
            grads_hb.append(grad_hb)
            grads_vb.append(grad_vb)
        grad_x, grad_local, grad_local_bias = _backward(grad_attention, x_nhwc, local_taps, (kernel, kernel))
        return (
            _nchw_view(grad_x),
            grad_local.t().reshape(local_weight.shape).to(local_weight.dtype),
            grad_local_bias.to(local_bias.dtype),
            torch.stack(grads_h).to(horizontal_weight.dtype),
            torch.stack(grads_hb).to(horizontal_bias.dtype),
            torch.stack(grads_v).to(vertical_weight.dtype),
            torch.stack(grads_vb).to(vertical_bias.dtype),
        )

    def msca_setup(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:7])
        ctx.strip_sizes = inputs[7]

    def msca_grad(ctx, grad):
        grads = torch.ops.metaseg.msca_spatial_backward(grad, *ctx.saved_tensors, ctx.strip_sizes)
        return *grads, None, None, None, None

    torch.library.register_autograd("metaseg::msca_spatial", msca_grad, setup_context=msca_setup)
