"""`metaseg_hf.ops_metaseg`: the depthwise implementations behind one switch, and the Triton kernels.

- library / stencil agree with `F.conv2d` (and their compositions) in float64 to 1e-12.
- Every Triton kernel and every gradient it computes (input, weights, biases) against `F.conv2d` + autograd in
  float64, on small odd maps (5x7, 6x5), channels not a multiple of the block, batch 2, with and without bias,
  blocks small enough to give several pixel / row / column / channel blocks. Tolerances, relative to the largest
  reference value: float32 loads 2e-6 (float32 rounding of sums of up to ~100 terms, seen <= 5e-7); bf16 loads
  (inputs, weights and output gradients rounded to bf16, the reference computed from those rounded values)
  1.5e-2: up to three roundings to bf16 (the fused MSCA's `a` and strips, and the result), each up to 2**-8
  relative under the interpreter, which truncates float32 -> bf16 (GPUs round to nearest: half that).

The kernels run on CPU tensors under Triton's interpreter: TRITON_INTERPRET=1 is set below, before the kernels
are built (Triton reads it when `triton.jit` decorates them, at their first use). The interpreter costs tens of ms
per kernel operation, so maps are tiny and the MetaSeg strip sizes (7, 11, 21) are used on one tile only; the
multi-tile halo logic of the fused MSCA kernel is tested with strips (3, 5). Triton tests skip when triton is not
installed (CI installs it with the `triton` extra).
"""

import importlib.util
import sys
from pathlib import Path

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from metaseg_hf import ops_metaseg  # noqa: E402

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_depthwise_gpu.py"
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 1.5e-2}


@pytest.fixture
def triton_interpreter():
    pytest.importorskip("triton", reason="triton is not installed: pip install 'metaseg-hf[triton]' (CI installs it)")
    assert ops_metaseg.triton_interpreting()


def _random(*shape, generator, scale=1.0, dtype=torch.float32):
    """Random values rounded to `dtype`, returned in float64 (the reference's precision)."""
    return (torch.randn(*shape, generator=generator, dtype=torch.float64) * scale).to(dtype).double()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert actual.shape == expected.shape, what
    error = (actual.double() - expected).abs().max().item()
    scale = max(expected.abs().max().item(), 1e-30)
    assert error <= TOLERANCE[dtype] * scale, f"{what}: max |error| {error:.3g} > {TOLERANCE[dtype]} * {scale:.3g}"


def _outputs_and_grads(function, inputs, grad_output):
    """function(*inputs) and the gradients of <output, grad_output> w.r.t. every input that requires grad."""
    output = function(*inputs)
    wanted = [tensor for tensor in inputs if isinstance(tensor, torch.Tensor) and tensor.requires_grad]
    return output, torch.autograd.grad(output, wanted, grad_output)


def _leaves(tensors, dtype):
    """Float64 reference leaves and their `dtype` copies, all requiring grad (None stays None)."""
    reference = [None if t is None else t.clone().requires_grad_(True) for t in tensors]
    loaded = [None if t is None else t.to(dtype).requires_grad_(True) for t in tensors]
    return reference, loaded


# --------------------------------------------------------------------------------------------------------------
# The switch, and the library / stencil implementations


def test_unknown_implementation_names_the_choices():
    x, weight = torch.zeros(1, 2, 3, 3), torch.zeros(2, 1, 3, 3)
    for call in (
        lambda: ops_metaseg.depthwise_conv2d(x, weight, None, 1, "cudnn"),
        lambda: ops_metaseg.depthwise_conv2d_gelu(x, weight, None, 1, "cudnn"),
        lambda: ops_metaseg.msca_spatial(x, torch.zeros(2, 1, 5, 5), None, [], [], [], [], "cudnn"),
    ):
        with pytest.raises(ValueError, match="unknown depthwise implementation 'cudnn'") as error:
            call()
        assert all(repr(name) in str(error.value) for name in ("library", "stencil", "triton", "auto"))


@pytest.mark.parametrize(
    "kernel_size, padding, with_bias",
    [((3, 3), 1, True), ((5, 5), (2, 2), False), ((1, 7), (0, 3), True), ((21, 1), (10, 0), True), ((3, 3), 0, True),
     ((1, 21), (0, 10), False)],
)
def test_library_and_stencil_match_conv2d_in_float64(kernel_size, padding, with_bias):
    generator = torch.Generator().manual_seed(0)
    x = _random(2, 5, 6, 7, generator=generator)
    weight = _random(5, 1, *kernel_size, generator=generator)
    bias = _random(5, generator=generator) if with_bias else None
    expected = F.conv2d(x, weight, bias, padding=padding, groups=5)
    for implementation in ("library", "stencil"):
        actual = ops_metaseg.depthwise_conv2d(x, weight, bias, padding, implementation)
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)
        actual = ops_metaseg.depthwise_conv2d_gelu(x, weight, bias, padding, implementation)
        torch.testing.assert_close(actual, F.gelu(expected), rtol=0, atol=1e-12)


def test_msca_library_and_stencil_match_the_module_formula_in_float64():
    generator = torch.Generator().manual_seed(1)
    x = _random(2, 4, 9, 8, generator=generator)
    local_weight, local_bias = _random(4, 1, 5, 5, generator=generator), _random(4, generator=generator)
    sizes = (7, 11, 21)
    horizontal = [_random(4, 1, 1, s, generator=generator) for s in sizes]
    vertical = [_random(4, 1, s, 1, generator=generator) for s in sizes]
    biases = [_random(4, generator=generator) for _ in range(6)]
    attention = F.conv2d(x, local_weight, local_bias, padding=2, groups=4)
    expected = attention
    for s, h, v, hb, vb in zip(sizes, horizontal, vertical, biases[:3], biases[3:]):
        strip = F.conv2d(attention, h, hb, padding=(0, s // 2), groups=4)
        expected = expected + F.conv2d(strip, v, vb, padding=(s // 2, 0), groups=4)
    for implementation in ("library", "stencil"):
        actual = ops_metaseg.msca_spatial(
            x, local_weight, local_bias, horizontal, biases[:3], vertical, biases[3:], implementation
        )
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


@pytest.fixture
def implementations_run(monkeypatch) -> list:
    """The implementations that the calls of the test run: "triton" (a Triton operator), "stencil" (the
    shifted-slice form) or, when neither, "library" is what ran. Recorded in call order."""
    calls = []
    for name, implementation in (("_triton_depthwise", "triton"), ("_triton_msca", "triton"),
                                 ("stencil_depthwise_conv", "stencil")):
        original = getattr(ops_metaseg, name)
        monkeypatch.setattr(
            ops_metaseg, name, lambda *a, _f=original, _i=implementation, **k: calls.append(_i) or _f(*a, **k)
        )
    return calls


def test_supports_and_reasons(triton_interpreter, implementations_run):
    x, weight = torch.zeros(1, 4, 5, 5), torch.zeros(4, 1, 3, 3)
    assert ops_metaseg.is_triton_available(x) and ops_metaseg.supports(x, weight, 1)
    assert ops_metaseg.supports(x.bfloat16(), weight, (1, 1)) and ops_metaseg.supports(x.half(), weight, 1)
    unsupported = {
        "float64": (x.double(), weight.double(), 1),
        "odd kernel sizes": (x, torch.zeros(4, 1, 2, 3), (1, 1)),
        "'same' convolutions": (x, weight, 0),
        "depthwise weight": (x, torch.zeros(3, 1, 3, 3), 1),
        "(B, C, H, W)": (torch.zeros(4, 5, 5), weight, 1),
    }
    for expected, (inputs, weights, padding) in unsupported.items():
        reason = ops_metaseg.triton_unsupported_reason(inputs, weights, padding)
        assert reason is not None and expected in reason, (expected, reason)
        # "triton" refuses with that reason before running anything
        with pytest.raises(ValueError, match="implementation='triton' cannot run here") as error:
            ops_metaseg.depthwise_conv2d(inputs, weights, None, padding, "triton")
        assert reason in str(error.value) and implementations_run == [], expected
    # "auto" runs the library in eager calls, on inputs Triton takes and on those it does not (Triton joins it
    # once measured faster on a GPU)
    for inputs, weights, padding in [(x, weight, 1), *unsupported.values()][:3]:
        ops_metaseg.depthwise_conv2d(inputs, weights, None, padding, "auto")
        ops_metaseg.depthwise_conv2d_gelu(inputs, weights, None, padding, "auto")
    assert implementations_run == []
    strips = [torch.zeros(4, 1, 1, 3)], [None], [torch.zeros(4, 1, 3, 1)], [None]
    ops_metaseg.msca_spatial(x, torch.zeros(4, 1, 5, 5), None, *strips, "auto")
    assert implementations_run == []
    assert "1 to 3 strip pairs" in ops_metaseg.msca_unsupported_reason(x, torch.zeros(4, 1, 5, 5), [], [])
    with pytest.raises(ValueError, match="1 to 3 strip pairs"):
        ops_metaseg.msca_spatial(x, torch.zeros(4, 1, 5, 5), None, [], [], [], [], "triton")
    assert implementations_run == []
    # ... and the named implementations run as named
    ops_metaseg.depthwise_conv2d(x, weight, None, 1, "triton")
    ops_metaseg.depthwise_conv2d(x, weight, None, 1, "stencil")
    ops_metaseg.msca_spatial(x, torch.zeros(4, 1, 5, 5), None, *strips, "triton")
    assert implementations_run == ["triton", "stencil", "triton"]


def test_auto_runs_stencils_only_while_compiling_gpu_inference(monkeypatch, implementations_run):
    gpu_like, weight = torch.zeros(1, 4, 5, 5, device="meta"), torch.zeros(4, 1, 3, 3, device="meta")
    with torch.no_grad():
        ops_metaseg.depthwise_conv2d(gpu_like, weight, None, 1, "auto")  # eager
        assert implementations_run == []
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        ops_metaseg.depthwise_conv2d(gpu_like, weight, None, 1, "auto")
        assert implementations_run == ["stencil"]
        ops_metaseg.depthwise_conv2d(gpu_like.double(), weight.double(), None, 1, "auto")  # no float64 stencils
        ops_metaseg.depthwise_conv2d(torch.zeros(1, 4, 5, 5), torch.zeros(4, 1, 3, 3), None, 1, "auto")  # CPU: oneDNN
    ops_metaseg.depthwise_conv2d(gpu_like, weight, None, 1, "auto")  # autograd on: training compiles the library
    assert implementations_run == ["stencil"]


def test_no_triton_on_cpu_without_the_interpreter_nor_without_triton(monkeypatch, implementations_run):
    x, weight = torch.zeros(1, 4, 5, 5), torch.zeros(4, 1, 3, 3)
    monkeypatch.setattr(ops_metaseg, "_TRITON_IMPORT_ERROR", "triton cannot be imported (No module named 'triton')")
    assert "triton cannot be imported" in ops_metaseg.triton_unsupported_reason(x, weight, 1)
    assert ops_metaseg.depthwise_conv2d(x, weight, None, 1, "auto").shape == x.shape
    assert implementations_run == []  # the library ran
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not ops_metaseg.is_triton_available(x)
    assert "CUDA" in ops_metaseg.triton_unsupported_reason(x, weight, 1)


# --------------------------------------------------------------------------------------------------------------
# Triton: depthwise convolution (+ GELU), forward and backward


@pytest.mark.parametrize(
    "kernel_size, gelu, with_bias, dtype, block_sizes",
    [
        ((3, 3), True, True, torch.float32, (16, 4)),  # the MLP's op; 3 pixel x 2 channel blocks
        ((3, 3), False, False, torch.float32, (0, 0)),
        ((5, 5), False, True, torch.float32, (32, 8)),
        ((1, 7), False, True, torch.float32, (0, 0)),  # wider than the map
        ((11, 1), False, True, torch.float32, (16, 8)),  # taller than the map
        ((3, 3), True, True, torch.bfloat16, (0, 0)),
        ((1, 21), False, False, torch.bfloat16, (0, 0)),
    ],
)
def test_triton_depthwise_matches_conv2d_and_autograd(
    triton_interpreter, kernel_size, gelu, with_bias, dtype, block_sizes
):
    generator = torch.Generator().manual_seed(2)
    channels = 6
    taps = kernel_size[0] * kernel_size[1]
    padding = (kernel_size[0] // 2, kernel_size[1] // 2)
    x = _random(2, channels, 5, 7, generator=generator, dtype=dtype)
    weight = _random(channels, 1, *kernel_size, generator=generator, scale=taps**-0.5, dtype=dtype)
    bias = _random(channels, generator=generator, dtype=dtype) if with_bias else None
    grad_output = _random(2, channels, 5, 7, generator=generator, dtype=dtype)
    (x_ref, weight_ref, bias_ref), (x_in, weight_in, bias_in) = _leaves([x, weight, bias], dtype)

    def reference(x, weight, bias):
        output = F.conv2d(x, weight, bias, padding=padding, groups=channels)
        return F.gelu(output) if gelu else output

    function = ops_metaseg.depthwise_conv2d_gelu if gelu else ops_metaseg.depthwise_conv2d

    def triton(x, weight, bias):
        return function(x, weight, bias, padding, "triton", block_sizes=block_sizes)

    expected, expected_grads = _outputs_and_grads(reference, (x_ref, weight_ref, bias_ref), grad_output)
    actual, actual_grads = _outputs_and_grads(triton, (x_in, weight_in, bias_in), grad_output.to(dtype))
    assert actual.dtype == dtype and actual.is_contiguous(memory_format=torch.channels_last)
    _assert_close(actual, expected, dtype, "output")
    for name, got, want in zip(("x", "weight", "bias"), actual_grads, expected_grads):
        assert got.dtype == dtype
        _assert_close(got, want, dtype, f"gradient of {name}")


def test_triton_depthwise_takes_nchw_inputs_and_float32_weights_with_bf16_maps(triton_interpreter):
    """An NCHW map is read through a contiguous NHWC copy; float32 weights with a bf16 map (autocast's mix)
    are loaded as they are, the result and input gradient are bf16, the weight gradient float32."""
    generator = torch.Generator().manual_seed(3)
    x = _random(1, 3, 4, 5, generator=generator, dtype=torch.bfloat16)
    weight, bias = _random(3, 1, 3, 3, generator=generator, scale=1 / 3), _random(3, generator=generator)
    x_in = x.bfloat16().requires_grad_(True)
    weight_in, bias_in = weight.float().requires_grad_(True), bias.float().requires_grad_(True)
    output = ops_metaseg.depthwise_conv2d(x_in, weight_in, bias_in, 1, "triton")
    assert output.dtype == torch.bfloat16
    _assert_close(output, F.conv2d(x, weight, bias, padding=1, groups=3), torch.bfloat16, "output")
    grads = torch.autograd.grad(output.float().sum(), (x_in, weight_in, bias_in))
    assert [grad.dtype for grad in grads] == [torch.bfloat16, torch.float32, torch.float32]


# --------------------------------------------------------------------------------------------------------------
# Triton: fused spatial MSCA, forward and backward


def _msca_reference(sizes):
    def reference(x, local_weight, local_bias, *strips):
        channels, count = x.shape[1], len(sizes)
        attention = F.conv2d(x, local_weight, local_bias, padding=local_weight.shape[-1] // 2, groups=channels)
        output = attention
        for index, size in enumerate(sizes):
            h, hb, v, vb = strips[index], strips[count + index], strips[2 * count + index], strips[3 * count + index]
            strip = F.conv2d(attention, h, hb, padding=(0, size // 2), groups=channels)
            output = output + F.conv2d(strip, v, vb, padding=(size // 2, 0), groups=channels)
        return output

    return reference


@pytest.mark.parametrize(
    "shape, kernel, sizes, with_bias, dtype, block_sizes",
    [
        # MetaSeg's sizes on one tile: strips longer than the map, channels 5 of a block of 8
        ((1, 5, 5, 7), 5, (7, 11, 21), True, torch.float32, (0, 0, 0)),
        # batch 2, 2 row x 2 column blocks: halo rows and columns from neighbouring tiles; channels 3 of 4
        ((2, 3, 5, 6), 3, (3, 5), False, torch.float32, (3, 4, 4)),
        # bf16 loads and bf16 rings, three strip slots, 2 row x 2 channel blocks
        ((1, 6, 6, 5), 3, (3, 5, 1), True, torch.bfloat16, (4, 0, 4)),
    ],
)
def test_triton_msca_matches_conv2d_and_autograd(
    triton_interpreter, shape, kernel, sizes, with_bias, dtype, block_sizes
):
    generator = torch.Generator().manual_seed(4)
    channels = shape[1]
    x = _random(*shape, generator=generator, dtype=dtype)
    tensors = [_random(channels, 1, kernel, kernel, generator=generator, scale=1 / kernel, dtype=dtype)]
    tensors.append(_random(channels, generator=generator, dtype=dtype) if with_bias else None)
    strips = [_random(channels, 1, 1, s, generator=generator, scale=s**-0.5, dtype=dtype) for s in sizes]
    strips += [_random(channels, generator=generator, dtype=dtype) if with_bias else None for _ in sizes]
    strips += [_random(channels, 1, s, 1, generator=generator, scale=s**-0.5, dtype=dtype) for s in sizes]
    strips += [_random(channels, generator=generator, dtype=dtype) if with_bias else None for _ in sizes]
    grad_output = _random(*shape, generator=generator, dtype=dtype)
    reference_leaves, loaded_leaves = _leaves([x, *tensors, *strips], dtype)
    count = len(sizes)

    def triton(x, local_weight, local_bias, *strips):
        return ops_metaseg.msca_spatial(
            x, local_weight, local_bias, strips[:count], strips[count : 2 * count], strips[2 * count : 3 * count],
            strips[3 * count :], "triton", block_sizes=block_sizes,
        )  # fmt: skip

    expected, expected_grads = _outputs_and_grads(_msca_reference(sizes), reference_leaves, grad_output)
    actual, actual_grads = _outputs_and_grads(triton, loaded_leaves, grad_output.to(dtype))
    assert actual.dtype == dtype and actual.is_contiguous(memory_format=torch.channels_last)
    _assert_close(actual, expected, dtype, "output")
    names = [
        name
        for name, leaf in zip(
            ["x", "local weight", "local bias"] + [f"strip tensor {i}" for i in range(4 * count)], reference_leaves
        )
        if leaf is not None
    ]
    assert len(actual_grads) == len(expected_grads) == len(names)
    for name, got, want in zip(names, actual_grads, expected_grads):
        assert got.dtype == dtype, name
        _assert_close(got, want, dtype, f"gradient of {name}")


def test_triton_ops_are_registered_custom_ops(triton_interpreter):
    """`torch.library.opcheck` of all four operators: schema, autograd registration (the forward operators)
    and fake-tensor (torch.compile) behaviour."""
    ops_metaseg.load_triton_ops()
    generator = torch.Generator().manual_seed(5)

    def tensor(*shape, grad=False):
        return torch.randn(*shape, generator=generator).requires_grad_(grad)

    checks = ("test_schema", "test_autograd_registration", "test_faketensor")
    x, weight, bias = tensor(1, 3, 4, 5, grad=True), tensor(3, 1, 3, 3, grad=True), tensor(3, grad=True)
    torch.library.opcheck(torch.ops.metaseg.depthwise_conv2d.default, (x, weight, bias, True, 0, 0), test_utils=checks)
    torch.library.opcheck(
        torch.ops.metaseg.depthwise_conv2d_backward.default,
        (tensor(1, 3, 4, 5), x.detach(), weight.detach(), bias.detach(), True, 0, 0),
        test_utils=checks,
    )
    sizes, longest = [3, 5], 5  # strips packed as (NS, C, SMAX) weights, taps left-aligned, and (NS, C) biases
    msca_inputs = [x, tensor(3, 1, 3, 3, grad=True), tensor(3, grad=True), tensor(2, 3, longest, grad=True),
                   tensor(2, 3, grad=True), tensor(2, 3, longest, grad=True), tensor(2, 3, grad=True)]
    torch.library.opcheck(torch.ops.metaseg.msca_spatial.default, (*msca_inputs, sizes, 0, 0, 0), test_utils=checks)
    torch.library.opcheck(
        torch.ops.metaseg.msca_spatial_backward.default,
        (tensor(1, 3, 4, 5), *(value.detach() for value in msca_inputs), sizes),
        test_utils=checks,
    )


# --------------------------------------------------------------------------------------------------------------
# A whole model on the Triton kernels: the straight port (forward and every gradient) and the fused model


def test_a_model_on_the_triton_kernels_matches_the_library_straight_and_fused(triton_interpreter, monkeypatch):
    from helpers import tiny_config
    from metaseg_hf import MetaSegForSemanticSegmentation

    torch.manual_seed(0)
    config = tiny_config(hidden_sizes=[8, 8, 8, 8], decoder_hidden_size=8, attention_strip_sizes=[3, 5, 7])
    model = MetaSegForSemanticSegmentation(config).eval()
    with torch.no_grad():  # non-trivial biases, norms and layer scales (the initialisation hides wrong folds)
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
    pixel_values, labels = torch.randn(1, 3, 57, 64), torch.randint(0, config.num_labels, (1, 57, 64))

    def run(implementation):
        model.config.depthwise_implementation = implementation
        model.zero_grad()
        outputs = model(pixel_values, labels=labels)
        outputs.loss.backward()
        gradients = {name: parameter.grad.clone() for name, parameter in model.named_parameters()}
        return outputs.logits.detach(), gradients

    calls = []
    for name in ("_triton_msca", "_triton_depthwise"):
        original = getattr(ops_metaseg, name)
        monkeypatch.setattr(ops_metaseg, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    expected, expected_gradients = run("library")
    assert not calls
    logits, gradients = run("triton")
    assert sorted(calls) == ["_triton_depthwise"] * 4 + ["_triton_msca"] * 4  # one MSCA and one MLP per block
    assert (logits - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()
    for name, gradient in gradients.items():  # float32 both: bounded by their rounding through the network
        scale = expected_gradients[name].abs().max().item()
        assert (gradient - expected_gradients[name]).abs().max().item() <= 1e-4 * scale, f"gradient of {name}"

    model.fuse()
    calls.clear()
    with torch.no_grad():
        fused = model(pixel_values).logits
    assert sorted(calls) == ["_triton_depthwise"] * 4 + ["_triton_msca"] * 4  # the fused MLP's 3x3 + GELU too
    with torch.no_grad():
        model.config.depthwise_implementation = "library"
        fused_library = model(pixel_values).logits
    assert (fused - fused_library).abs().max().item() <= 1e-4 * expected.abs().max().item()
    assert (fused - expected).abs().max().item() <= 1e-4 * expected.abs().max().item()


# --------------------------------------------------------------------------------------------------------------
# The GPU benchmark script, on CPU: arguments and the no-CUDA message only


def _benchmark_module():
    spec = importlib.util.spec_from_file_location("bench_depthwise_gpu", BENCHMARK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_arguments_and_no_cuda_message(capsys):
    bench = _benchmark_module()
    args = bench.parse_args(["--stages", "1,3", "--ops", "mlp", "--implementations", "library,triton", "--repeat", "3"])
    assert (args.stages, args.ops, args.implementations, args.repeat, args.batch_size) == (
        (1, 3), ("mlp",), ("library", "triton"), 3, 64,
    )  # fmt: skip
    assert bench.stage_shape(1, 64, 512, "mlp") == (64, 256, 128, 128)
    assert bench.stage_shape(4, 64, 512, "msca") == (64, 256, 16, 16)
    for bad in (["--stages", "5"], ["--ops", "conv"], ["--implementations", "cudnn"]):
        with pytest.raises(SystemExit) as error:
            bench.parse_args(bad)
        assert error.value.code == 2
    with pytest.raises(SystemExit) as error:
        bench.main(["--help"])
    assert error.value.code == 0 and "--aot-check" in capsys.readouterr().out
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: the no-CUDA message is not reachable")
    with pytest.raises(SystemExit) as error:
        bench.main(["--stages", "1"])
    assert error.value.code == bench.NO_CUDA_MESSAGE and "needs a CUDA device" in bench.NO_CUDA_MESSAGE


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
