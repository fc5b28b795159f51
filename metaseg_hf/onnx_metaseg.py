"""ONNX export of MetaSeg and inference with ONNX Runtime through the library's processor and post-processing.

`export_onnx(model, output_dir, image_processor)` writes a self-describing folder:

- `model.onnx`: one input `pixel_values` (float32, (batch, channels, height, width), batch, height and width
  dynamic, each side at least `minimum_input_size(config)`: 57 for the official decoders) and one output
  `logits` (float32, (batch, num_labels, ceil(height / 8), ceil(width / 8))), the stride-8 head output
  before any resize, exactly what `MetaSegForSemanticSegmentation` returns;
- `config.json` (architecture, `num_labels` / `id2label`, the official test mode and window) and
  `preprocessor_config.json` (the image processor's settings).

By default the graph is traced from the fused deploy path (`model.fuse()`, see `fusion_metaseg.py`): the
BatchNorms and layer scales folded into the convolutions, fewer and cheaper operators. The export uses
`torch.onnx.export(..., dynamo=True)` (torch.export + onnxscript); it is then checked: the file must keep
batch, height and width symbolic, and ONNX Runtime's logits must match PyTorch's on two inputs of
different batch size and shape. Nothing is left in `output_dir` when a step fails (an operator without an
ONNX implementation, a fixed dimension, a mismatch): the error names what failed.

`ORTMetaSegForSemanticSegmentation.from_pretrained(folder)` runs that file with ONNX Runtime and quacks like
the PyTorch model where the library's inference needs it (`config`, a call returning `.logits`, `predict`),
so `MetaSegImageProcessor.segment(ort_model, image)` and `inference_metaseg.predict` give the same class
maps as PyTorch (whole and slide mode, flip and multi-scale TTA) without the torch network.

onnx, onnxscript and onnxruntime are optional (`pip install "metaseg-hf[onnx]"`): they are imported when a
function here needs them, never by `import metaseg_hf`.
"""

import contextlib
import json
import logging
import os
import shutil
import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_metaseg import MetaSegConfig
from .inference_metaseg import predict
from .modeling_metaseg import check_pixel_values, minimum_input_size

ONNX_FILE_NAME = "model.onnx"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "logits"
INSTALL_HINT = 'pip install "metaseg-hf[onnx]"'
# What the export imports: onnx (the file check), onnxscript (torch.onnx's dynamo exporter), onnxruntime (the
# comparison with PyTorch, unless check=False).
EXPORT_PACKAGES = ("onnx", "onnxscript")
CHECK_PACKAGES = ("onnxruntime",)
# The steps of torch.onnx's exporter, by the class of the exception it raises (torch.onnx._internal.exporter
# ._errors; matched by name, as those classes are not public).
EXPORT_STEPS = {
    "TorchExportError": "capturing the graph with torch.export",
    "ConversionError": "converting the exported program to ONNX",
}
# Traced with this input (batch 2 and unequal sides, every pooled decoder map wider than one token, so that
# no size is specialised to 0, 1 or to the other side); checked with it and with CHECK_SHAPE.
EXAMPLE_SHAPE = (2, 128, 160)
CHECK_SHAPE = (1, 97, 203)


class ONNXExportError(RuntimeError):
    """The model could not be exported to ONNX, or the exported file failed its check; nothing was written."""


def require_onnx(*names: str) -> list:
    """Imports the optional ONNX packages (`onnx`, `onnxscript`, `onnxruntime`) by name, or raises an
    ImportError naming the missing one and the extra that installs them."""
    import importlib

    modules = []
    for name in names:
        try:
            modules.append(importlib.import_module(name))
        except ImportError as error:
            raise ImportError(
                f"{name} is needed for MetaSeg's ONNX export and ONNX Runtime inference but cannot be imported "
                f"({error}). Install the optional dependencies with: {INSTALL_HINT}"
            ) from error
    return modules


@dataclass
class ONNXExportResult:
    """What `export_onnx` wrote and measured.

    path: the `model.onnx` file. opset: its default-domain opset. fused: whether the deploy path was traced.
    max_abs_difference: the largest |ONNX Runtime logits - PyTorch logits| over the checked inputs (None when
    the check was skipped). checked_shapes: the (B, C, H, W) inputs of the check. file_size: bytes.
    """

    path: Path
    opset: int
    fused: bool
    file_size: int
    max_abs_difference: float | None = None
    checked_shapes: list = field(default_factory=list)


class _LogitsOnly(nn.Module):
    """The traced function: (B, C, H, W) pixel values -> (B, num_labels, ceil(H/8), ceil(W/8)) logits."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).logits


def require_export_packages(check: bool = True) -> None:
    """Raises `require_onnx`'s ImportError (the missing package and the extra) unless the packages the export
    needs import: onnx and onnxscript, and onnxruntime with `check`. Called before anything is traced."""
    require_onnx(*EXPORT_PACKAGES, *(CHECK_PACKAGES if check else ()))


def _exception_chain(error: BaseException) -> list:
    """`error` and its causes, outermost first."""
    chain = []
    while error is not None and all(error is not seen for seen in chain):
        chain.append(error)
        error = error.__cause__ or (None if error.__suppress_context__ else error.__context__)
    return chain


def _failed_operator(error: BaseException):
    """The operator of the FX node being processed where `error` was raised (the exporter's frames hold it as a
    local `node`; the innermost one), or None."""
    for frame, _ in reversed(list(traceback.walk_tb(error.__traceback__))):
        node = frame.f_locals.get("node")
        if isinstance(node, torch.fx.Node) and node.op == "call_function":
            return node.target
    return None


def _conversion_summary(error: BaseException) -> str:
    """What a torch.onnx export failure means for the user, read from the exceptions rather than from the
    wording of torch's messages: the step that failed (by the exception's class), the operator being converted
    (from the exporter's frames) and whether it has no ONNX implementation, and the innermost cause."""
    chain = _exception_chain(error)
    class_names = [{cls.__name__ for cls in type(link).__mro__} for link in chain]
    step = next((EXPORT_STEPS[name] for names in class_names for name in EXPORT_STEPS if name in names), None)
    # In the causes only: the outermost exception's frames run through the caller's code.
    operator = next((op for link in reversed(chain[1:]) if (op := _failed_operator(link)) is not None), None)
    root = chain[-1]
    root_text = (str(root).strip().splitlines() or [""])[0]
    cause = f"{type(root).__name__}: {root_text}" if root_text else type(root).__name__
    if operator is not None and any("DispatchError" in names for names in class_names):
        summary = f"no ONNX implementation of the operator {operator}"
    elif operator is not None:
        summary = f"the operator {operator} failed to convert ({cause})"
    else:
        summary = cause
    return f"{summary} (step: {step})" if step else summary


def _trace_to_onnx(module: nn.Module, example: torch.Tensor, path: Path, opset: int | None, min_side: int):
    """torch.onnx.export (dynamo) of `module` with dynamic batch, height and width, saved to `path` as one
    file. Raises ONNXExportError naming the operator or step that failed."""
    batch = torch.export.Dim("batch")
    height = torch.export.Dim("height", min=min_side)
    width = torch.export.Dim("width", min=min_side)
    registration_logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_logger.level
    registration_logger.setLevel(logging.ERROR)  # "torchvision is not installed. Skipping torchvision::nms" x4
    try:
        with torch.no_grad():
            program = torch.onnx.export(
                module.eval(),
                (example,),
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes={INPUT_NAME: {0: batch, 2: height, 3: width}},
                opset_version=opset,
                dynamo=True,
                verbose=False,
            )
        program.save(path, external_data=False)
    except Exception as error:
        raise ONNXExportError(
            f"Cannot export {type(module.model).__name__} to ONNX (opset {opset or 'default'}): "
            f"{_conversion_summary(error)}. Nothing was written. If an operator is missing, try another --opset, "
            "or export the straight port with fuse=False (--no-fuse) if only the fused path uses it."
        ) from error
    finally:
        registration_logger.setLevel(level)


def _check_dynamic_dims(path: Path) -> int:
    """Raises ONNXExportError unless the file's input and output keep batch, height and width symbolic.
    Returns the file's default-domain opset."""
    (onnx,) = require_onnx("onnx")
    model = onnx.load(str(path), load_external_data=False)
    for value, kind in ((model.graph.input[0], "input"), (model.graph.output[0], "output")):
        dims = value.type.tensor_type.shape.dim
        fixed = {axis: dims[axis].dim_value for axis in (0, 2, 3) if not dims[axis].dim_param}
        if fixed:
            raise ONNXExportError(
                f"The exported {kind} {value.name!r} has fixed sizes on axes {fixed} (axis: size) where batch, "
                "height and width must stay dynamic: torch.export specialised them to the example input. Nothing "
                "was written. This is a bug in the traced code path; export with fuse=False (--no-fuse) to "
                "check whether the fused path causes it."
            )
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def _check_inputs(num_channels: int, device) -> list:
    """Deterministic standard-normal pixel values of shapes EXAMPLE_SHAPE and CHECK_SHAPE (B, C, H, W)."""
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(batch, num_channels, height, width, generator=generator).to(device)
        for batch, height, width in (EXAMPLE_SHAPE, CHECK_SHAPE)
    ]


def export_onnx(
    model,
    output_dir,
    image_processor,
    opset: int | None = None,
    fuse: bool = True,
    check: bool = True,
    tolerance: float = 1e-3,
    log=print,
) -> ONNXExportResult:
    """Exports a MetaSeg segmentation model to `output_dir/model.onnx`, with its config and processor settings.

    model: a `MetaSegForSemanticSegmentation` in float32 (anything with `config` whose call returns
    `.logits`; `fuse()` / `unfuse()` / `is_fused` when `fuse`). It is left as it was given (fused only for the
    export). image_processor: saved next to the file (`preprocessor_config.json`). opset: the ONNX opset
    (default: torch.onnx's). fuse: trace the fused deploy path (default) or the model as it is.
    check: run ONNX Runtime on two inputs of different batch size and shape and compare its logits with the
    model's as given (before fusing); fail when the largest difference exceeds `tolerance` times
    max(1, largest |logit|). log: called with progress lines (the largest difference among them).
    Raises ONNXExportError (nothing written) when the export or its check fails, and ImportError, before
    anything is traced, when a package it needs is missing (`require_export_packages`).
    """
    require_export_packages(check)
    output_dir = Path(output_dir)
    parameter = next(model.parameters())
    if parameter.dtype != torch.float32:
        raise ValueError(
            f"export_onnx exports float32 models; this one is {parameter.dtype}. Call model.float() first (the "
            "ONNX input and output are float32)."
        )
    inputs = _check_inputs(model.config.num_channels, parameter.device)
    expected = None
    if check:
        with _traced_form(model, fuse=False), torch.no_grad():
            expected = [model(pixel_values=pixel_values).logits.float().cpu() for pixel_values in inputs]
    with _staged_output(output_dir, ".onnx-export-") as (staging, publish):
        with _traced_form(model, fuse) as fused:
            log(f"exporting {type(model).__name__} ({'fused' if fused else 'straight port'}) to ONNX ...")
            _trace_to_onnx(_LogitsOnly(model), inputs[0], staging / ONNX_FILE_NAME, opset, minimum_input_size(model.config))
        result = ONNXExportResult(
            path=output_dir / ONNX_FILE_NAME,
            opset=_check_dynamic_dims(staging / ONNX_FILE_NAME),
            fused=fused,
            file_size=(staging / ONNX_FILE_NAME).stat().st_size,
        )
        if check:
            result.max_abs_difference = _compare_with_pytorch(staging / ONNX_FILE_NAME, inputs, expected, tolerance, log)
            result.checked_shapes = [tuple(pixel_values.shape) for pixel_values in inputs]
        # The settings only: save_pretrained would also copy the package's code files (for trust_remote_code),
        # which an ONNX folder does not use.
        model.config.to_json_file(staging / "config.json")
        image_processor.to_json_file(staging / "preprocessor_config.json")
        for path in staging.iterdir():
            publish(path)
    log(f"wrote {result.path} ({result.file_size / 2**20:.1f} MiB, opset {result.opset}) with config.json and "
        "preprocessor_config.json")
    return result


@contextlib.contextmanager
def _staged_output(output_dir: Path, prefix: str):
    """A scratch folder inside `output_dir` (created if missing) for an export to write into: yields
    (scratch folder, publish), where `publish(path)` names a file to move into `output_dir` (same name) when
    the block ends without an error. Whatever happens the scratch folder goes, and so does `output_dir` when
    this created it and nothing was published: a failed export leaves the folder as it was."""
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=output_dir))
    published, written = [], False
    try:
        yield staging, published.append
        for path in published:
            os.replace(path, output_dir / Path(path).name)
        written = True
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if created and not written and not any(output_dir.iterdir()):
            output_dir.rmdir()


@contextlib.contextmanager
def _traced_form(model, fuse: bool):
    """The model as it is traced, restored afterwards: eval mode, fused when `fuse` (yields whether it is),
    and its depthwise convolutions as library calls (ONNX `Conv`; "auto" would trace the shifted-slice form for
    a model on a GPU, "triton" a custom operator ONNX has no implementation of)."""
    was_training, was_fused = model.training, bool(getattr(model, "is_fused", False))
    implementation = getattr(model.config, "depthwise_implementation", None)
    model.eval()
    try:
        if fuse and not was_fused:
            model.fuse()
        if implementation is not None:
            model.config.depthwise_implementation = "library"
        yield fuse or was_fused
    finally:
        if implementation is not None:
            model.config.depthwise_implementation = implementation
        if fuse and not was_fused:
            model.unfuse()
        model.train(was_training)


def _compare_with_pytorch(path: Path, inputs: list, expected: list, tolerance: float, log) -> float:
    """Runs the ONNX file with ONNX Runtime on `inputs` and returns the largest |logits - expected|; raises
    ONNXExportError when a shape differs or that exceeds `tolerance` x max(1, largest |expected logit|)."""
    session = create_session(path)
    differences, scale = [], 1.0
    for pixel_values, reference in zip(inputs, expected):
        logits = torch.from_numpy(session.run([OUTPUT_NAME], {INPUT_NAME: pixel_values.cpu().numpy()})[0])
        if logits.shape != reference.shape:
            raise ONNXExportError(
                f"ONNX Runtime returned logits of shape {tuple(logits.shape)} for input {tuple(pixel_values.shape)}; "
                f"PyTorch returns {tuple(reference.shape)}. Nothing was written."
            )
        differences.append((logits - reference).abs().max().item())
        scale = max(scale, reference.abs().max().item())
    shapes = ", ".join("x".join(map(str, pixel_values.shape)) for pixel_values in inputs)
    log(f"ONNX Runtime vs PyTorch logits on inputs {shapes}: max abs difference {max(differences):.3e}")
    if not max(differences) <= tolerance * scale:
        raise ONNXExportError(
            f"ONNX Runtime's logits differ from PyTorch's by up to {max(differences):.3e} (inputs {shapes}; allowed "
            f"{tolerance:g} x max(1, largest |logit| = {scale:.3g})). Nothing was written. Export with fuse=False "
            "(--no-fuse) or another --opset to find the culprit."
        )
    return max(differences)


def create_session(path, num_threads: int | None = None, providers=None, optimization_level: str = "all",
                   profile_prefix: str | None = None, spinning: bool = True):
    """An `onnxruntime.InferenceSession` for `path`.

    num_threads: intra-op threads (default: ONNX Runtime's, one per core). providers: execution providers
    (default: CPU). optimization_level: "disabled", "basic", "extended", "layout" (where the installed ONNX
    Runtime has it) or "all" (default, layout transforms included: blocked NCHWc convolutions on x86).
    profile_prefix: write ONNX Runtime's per-operator profile (JSON) to files with this prefix
    (`session.end_profiling()` returns the name). spinning: let idle worker threads spin (lower latency;
    turn it off when the session shares the CPU with other work).
    """
    (ort,) = require_onnx("onnxruntime")
    levels = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    if hasattr(ort.GraphOptimizationLevel, "ORT_ENABLE_LAYOUT"):
        levels["layout"] = ort.GraphOptimizationLevel.ORT_ENABLE_LAYOUT
    if optimization_level not in levels:
        raise ValueError(f"optimization_level must be one of {sorted(levels)}, got {optimization_level!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = levels[optimization_level]
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be at least 1, got {num_threads}")
        options.intra_op_num_threads = num_threads
        options.inter_op_num_threads = 1
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = str(profile_prefix)
    return ort.InferenceSession(str(path), sess_options=options, providers=providers or ["CPUExecutionProvider"])


class ORTMetaSegForSemanticSegmentation:
    """A MetaSeg segmentation model run by ONNX Runtime from an `export_onnx` folder.

    Has what the library's inference uses of `MetaSegForSemanticSegmentation`: `config` (num_labels,
    id2label, the official test mode and window), a call `model(pixel_values=...)` returning a
    `SemanticSegmenterOutput` whose `logits` are a float32 CPU tensor (B, num_labels, ceil(H/8), ceil(W/8)),
    and `predict(...)`; so `MetaSegImageProcessor.segment(ort_model, images)` works unchanged:

        processor = MetaSegImageProcessor.from_pretrained("onnx_dir")
        model = ORTMetaSegForSemanticSegmentation.from_pretrained("onnx_dir")
        prediction = processor.segment(model, "photo.jpg")[0]   # .segmentation: (H, W) class ids
    """

    def __init__(self, session, config: MetaSegConfig, path: Path | None = None):
        self.session, self.config, self.path = session, config, path
        inputs, outputs = [value.name for value in session.get_inputs()], [value.name for value in session.get_outputs()]
        if inputs != [INPUT_NAME] or OUTPUT_NAME not in outputs:
            raise ValueError(
                f"{path or 'The ONNX model'} has inputs {inputs} and outputs {outputs}; a MetaSeg export has the "
                f"input {INPUT_NAME!r} and the output {OUTPUT_NAME!r}. Export it with examples/export_onnx.py."
            )

    @classmethod
    def from_pretrained(cls, path, num_threads: int | None = None, providers=None, optimization_level: str = "all",
                        **session_kwargs) -> "ORTMetaSegForSemanticSegmentation":
        """Loads `path` (an `export_onnx` folder, or an `.onnx` file in one) and the `config.json` beside it.
        The other arguments go to `create_session`."""
        path = Path(path)
        is_file = path.is_file() or (not path.is_dir() and path.suffix == ".onnx")
        folder, file = (path.parent, path) if is_file else (path, path / ONNX_FILE_NAME)
        if not file.is_file():
            missing = "" if folder.is_dir() else f" (the folder {folder} does not exist)"
            raise FileNotFoundError(
                f"No ONNX model at {file}{missing}. Export one with: python examples/export_onnx.py --model MODEL "
                f"--output_dir {folder}"
            )
        config_file = file.parent / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(
                f"{file} has no config.json beside it (the labels and test mode come from there). Export the model "
                "with examples/export_onnx.py, which writes both, or copy the model's config.json next to it."
            )
        config = MetaSegConfig.from_pretrained(file.parent)
        session = create_session(file, num_threads, providers, optimization_level, **session_kwargs)
        return cls(session, config, file)

    @property
    def device(self) -> torch.device:
        """Where inputs are expected and logits returned: the CPU (ONNX Runtime takes numpy arrays)."""
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    training = False  # as an nn.Module in eval mode: the library's evaluation reads and restores it

    def eval(self) -> "ORTMetaSegForSemanticSegmentation":
        return self

    def __call__(self, pixel_values, labels=None, output_hidden_states=None, output_attentions=None,
                 return_dict=None) -> SemanticSegmenterOutput:
        """(B, C, H, W) float pixel values (torch tensor on any device, or numpy) -> `SemanticSegmenterOutput`
        with `logits` (B, num_labels, ceil(H/8), ceil(W/8)), float32 on the CPU (`(logits,)` with
        `return_dict=False`). The loss, hidden states and attention maps are not in the exported graph."""
        asked = [name for name, value in (("labels", labels), ("output_hidden_states", output_hidden_states),
                                          ("output_attentions", output_attentions)) if value not in (None, False)]
        if asked:
            raise TypeError(
                f"The ONNX model returns logits only; {', '.join(asked)} need(s) the PyTorch model "
                "(MetaSegForSemanticSegmentation)."
            )
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.as_tensor(pixel_values)
        check_pixel_values(pixel_values, self.config, needs_decoder=True)
        array = pixel_values.detach().to("cpu", torch.float32).contiguous().numpy()
        logits = torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: array})[0])
        return (logits,) if return_dict is False else SemanticSegmenterOutput(logits=logits)

    forward = __call__

    def predict(self, pixel_values, original_sizes=None, **kwargs) -> list:
        """As `MetaSegForSemanticSegmentation.predict`: `inference_metaseg.predict` with this model."""
        return predict(self, pixel_values, original_sizes=original_sizes, **kwargs)

    def __repr__(self) -> str:
        providers = self.session.get_providers()
        return f"{type(self).__name__}(path={str(self.path)!r}, num_labels={self.config.num_labels}, providers={providers})"


# ---------------------------------------------------------------------------------------------------
# int8: static quantisation of the export, calibrated on images through the model's own processor
# ---------------------------------------------------------------------------------------------------

QUANTIZATION_FILE_NAME = "quantization.json"
# Parts of the network an int8 export can keep in float32. Each is recognised on the ONNX nodes by the PyTorch
# modules they were traced from (the exporter's class-hierarchy metadata) and by their attributes.
FLOAT_PARTS = {
    "gelu": "the GELUs exact, in float32 between a dequantise and a quantise (otherwise on uint8 as "
            "x * sigmoid(1.702 x): ONNX Runtime's table-driven QLinearSigmoid and a QLinearMul)",
    "stem": "the stem's two convolutions (MetaSegStem)",
    "stem_input": "the stem's first convolution, on the RGB input, and its GELU",
    "classifier": "the decode head's classifier (MetaSegClassifier)",
    "depthwise": "the depthwise convolutions (the MSCA strips and 5x5, the MLPs' 3x3)",
    "attention_spatial": "the MSCA's depthwise 5x5 and strip convolutions (their sum stays integer: ONNX Runtime "
                         "fuses a dequantise-add-quantise into QLinearAdd whether or not the Add was quantised)",
    "decoder_attention": "the decoder's attention maps: the Channel Reduction Attention's logits, softmax and "
                         "product with the values (a float32 softmax needs its consumer in float32 too, or ONNX "
                         "Runtime fuses dequantise-softmax-quantise into QLinearSoftmax)",
}
# Whatever the parts, LayerNorms run in float32 (ONNX Runtime has no integer LayerNormalization on CPU), and
# so do GELUs with "gelu".
# The int8 recipe, chosen by measurement (benchmarks/bench_int8.py; figures in benchmarks/RESULTS.md).
INT8_RECIPE = {
    "quant_format": "qdq",  # QuantizeLinear/DequantizeLinear pairs, fused by ONNX Runtime into integer kernels
    "per_channel": True,  # one weight scale per output channel
    "activation_type": "uint8",
    "weight_type": "int8",  # u8 x s8: the VNNI integer dot products (s8 x s8 ran at 0.44x float32)
    # 7-bit weights (-64..64): no pair of u8 x s8 products can overflow 16 bits, so CPUs without VNNI, whose u8 x s8
    # kernels add pairs in 16 bits with saturation, give the same results as those with it (see
    # cpu_int8_instructions). With 8-bit per-channel weights an AVX2 CPU lost 4.7 mIoU points on the demo model.
    "reduce_range": True,
    "calibration_method": "minmax",
    # The stem's first convolution (3 input channels: the most accurate part to keep, and slow in int8) and the
    # decoder's attention maps (ONNX Runtime's QLinearSoftmax is slower than float32's softmax).
    "float_parts": ("stem_input", "decoder_attention"),
    "optimize_before": True,  # ONNX Runtime's graph optimisation (quant_pre_process) before quantising
}
# CPU flags (Linux /proc/cpuinfo) of the integer dot products behind ONNX Runtime's u8 x s8 kernels, best first.
# With VNNI (or AMX) products are summed in 32 bits; x86 CPUs with only AVX2 or AVX-512BW first add pairs of
# products in 16 bits with saturation (vpmaddubsw), where 8-bit weights can overflow: INT8_RECIPE's reduce_range.
INT8_DOT_PRODUCTS = {
    "amx_int8": "AMX-INT8",
    "avx512_vnni": "AVX-512 VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512bw": "AVX-512BW without VNNI (16-bit pair sums)",
    "avx2": "AVX2 without VNNI (16-bit pair sums)",
    "asimddp": "Arm dot product (SDOT/UDOT)",
}
QUANT_FORMATS = ("qdq", "qoperator")
QUANT_TYPES = ("uint8", "int8")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile", "distribution")
CALIBRATION_SIZE = 64  # images the activation ranges are measured on
HELD_OUT = 8  # images kept back to measure the int8 model's agreement with float32


@dataclass
class ONNXQuantizationResult:
    """What `export_onnx_int8` wrote and measured.

    path: the int8 `model.onnx`. file_size / float_file_size: bytes of it and of the float32 export.
    calibration_images / held_out_images: how many images set the ranges / measured the agreement.
    pixel_agreement: the fraction of class-map pixels (at the held-out images' original sizes, the model's test
    mode) where int8 and float32 agree. logits_max_abs_difference, logits_relative_error (||int8 - float32|| /
    ||float32|| over all held-out logits): the same on the logits. recipe: the settings used.
    """

    path: Path
    file_size: int
    float_file_size: int
    calibration_images: int
    held_out_images: int
    pixel_agreement: float
    logits_max_abs_difference: float
    logits_relative_error: float
    recipe: dict

    @property
    def size_ratio(self) -> float:
        return self.file_size / self.float_file_size


def cpu_int8_instructions(cpuinfo: str | None = None) -> str:
    """The best of `INT8_DOT_PRODUCTS` this CPU has (a key, e.g. "avx512_vnni" or "avx2"), from /proc/cpuinfo's
    flags (or `cpuinfo`, its text); "unknown" where that cannot be read or lists none of them."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return "unknown"
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return next((flag for flag in INT8_DOT_PRODUCTS if flag in flags), "unknown")


def describe_int8_instructions(instructions: str | None = None) -> str:
    """Words for `cpu_int8_instructions()` (or `instructions`, one of its answers), e.g. "AVX-512 VNNI"."""
    instructions = cpu_int8_instructions() if instructions is None else instructions
    return INT8_DOT_PRODUCTS.get(instructions, "integer dot product unknown")


def check_int8_recipe(recipe: dict | None) -> dict:
    """`INT8_RECIPE` updated with `recipe`; raises ValueError naming an unknown key or value and the choices."""
    merged = {**INT8_RECIPE, **(recipe or {})}
    unknown = sorted(set(merged) - set(INT8_RECIPE))
    if unknown:
        raise ValueError(f"Unknown int8 recipe key(s) {unknown}; the keys are {sorted(INT8_RECIPE)}")
    choices = {"quant_format": QUANT_FORMATS, "activation_type": QUANT_TYPES, "weight_type": QUANT_TYPES,
               "calibration_method": CALIBRATION_METHODS}
    for key, allowed in choices.items():
        if merged[key] not in allowed:
            raise ValueError(f"int8 recipe {key}={merged[key]!r}; choose one of {', '.join(allowed)}")
    merged["float_parts"] = tuple(merged["float_parts"])
    bad = [part for part in merged["float_parts"] if part not in FLOAT_PARTS]
    if bad:
        raise ValueError(f"Unknown float part(s) {bad}; the parts are {', '.join(FLOAT_PARTS)}")
    return merged


def _node_parts(model) -> dict:
    """{node name: the FLOAT_PARTS it belongs to} for the nodes of a MetaSeg export (an onnx.ModelProto),
    from the module classes torch.onnx records on each node. Raises ONNXExportError when the file has no such
    record (an export by another tool)."""
    parts, recorded, stem_convolutions = {}, False, 0
    softmaxes = [node for node in model.graph.node if node.op_type == "Softmax"]
    softmax_tensors = {name for node in softmaxes for name in (*node.input, *node.output)}
    # The softmaxes' producers and consumers: the attention logits and their product with the values.
    softmax_neighbours = {
        node.name for node in model.graph.node if softmax_tensors & {*node.input, *node.output}
    }
    for node in model.graph.node:  # in topological order
        metadata = {entry.key: entry.value for entry in node.metadata_props}
        hierarchy = metadata.get("pkg.torch.onnx.class_hierarchy")
        recorded = recorded or hierarchy is not None
        classes = {name.strip(" '\"").rsplit(".", 1)[-1] for name in (hierarchy or "[]").strip("[]").split(",")}
        group = next((attribute.i for attribute in node.attribute if attribute.name == "group"), 1)
        stem = "MetaSegStem" in classes
        stem_convolutions += stem and node.op_type == "Conv"
        parts[node.name] = {
            part
            for part, belongs in (
                ("stem", stem),
                ("stem_input", stem and stem_convolutions == 1),
                ("classifier", "MetaSegClassifier" in classes),
                ("depthwise", node.op_type == "Conv" and group > 1),
                ("attention_spatial", "MetaSegMultiScaleConvAttention" in classes
                 and (node.op_type == "Add" or (node.op_type == "Conv" and group > 1))),
                ("decoder_attention", "MetaSegChannelReductionAttention" in classes
                 and (node.op_type == "Softmax" or node.name in softmax_neighbours)),
            )
            if belongs
        }
    if not recorded:
        raise ONNXExportError(
            "The float32 export records no module classes on its nodes (pkg.torch.onnx.class_hierarchy), so the "
            "parts to keep in float32 cannot be found. Export with torch.onnx's dynamo exporter (export_onnx), or "
            "quantise with float_parts=()."
        )
    return parts


# GELU(x) ~ x * sigmoid(GELU_SIGMOID_SLOPE * x) (Hendrycks & Gimpel 2016, section 2), the form of GELU that
# ONNX Runtime runs on 8-bit tensors: its QLinearSigmoid is a 256-entry table, and the slope folds into the
# table's input scale.
GELU_SIGMOID_SLOPE = 1.702


def _gelu_on_uint8(model) -> int:
    """Rewrites, in place, each `DequantizeLinear -> Gelu -> QuantizeLinear` of a quantised onnx.ModelProto
    (per-tensor scales) into `QLinearSigmoid` (input scale x GELU_SIGMOID_SLOPE) and `QLinearMul` on the 8-bit
    tensor (com.microsoft domain, ONNX Runtime's CPU kernels), which keeps the graph integer from one
    convolution to the next. Returns how many GELUs it rewrote; the others stay as they were."""
    import numpy as np
    from onnx import helper, numpy_helper

    graph = model.graph
    initializers = {tensor.name: tensor for tensor in graph.initializer}
    producer = {output: node for node in graph.node for output in node.output}
    consumers = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def scalar(name):
        return numpy_helper.to_array(initializers[name]) if name in initializers else None

    replacements, removed, added = {}, set(), []
    for gelu in graph.node:
        dequantize, users = producer.get(gelu.input[0]), consumers.get(gelu.output[0], [])
        if (gelu.op_type != "Gelu" or dequantize is None or dequantize.op_type != "DequantizeLinear"
                or len(users) != 1 or users[0].op_type != "QuantizeLinear" or len(consumers[gelu.input[0]]) != 1):
            continue
        quantize = users[0]
        scale, zero_point = (scalar(name) for name in (list(dequantize.input) + [""])[1:3])
        if scale is None or zero_point is None or scale.size != 1 or len(quantize.input) < 3:
            continue
        prefix = f"{gelu.name}_on_uint8"
        lowest = np.iinfo(zero_point.dtype).min  # the sigmoid's [0, 1] on the full 8-bit range
        added += [
            numpy_helper.from_array(np.array(scale.item() * GELU_SIGMOID_SLOPE, np.float32), f"{prefix}_input_scale"),
            numpy_helper.from_array(np.array(1 / 255, np.float32), f"{prefix}_sigmoid_scale"),
            numpy_helper.from_array(np.array(lowest, zero_point.dtype), f"{prefix}_sigmoid_zero_point"),
        ]
        quantised_input, sigmoid = dequantize.input[0], f"{prefix}_sigmoid"
        replacements[id(dequantize)] = [
            helper.make_node(
                "QLinearSigmoid",
                [quantised_input, f"{prefix}_input_scale", dequantize.input[2], f"{prefix}_sigmoid_scale",
                 f"{prefix}_sigmoid_zero_point"],
                [sigmoid], name=f"{prefix}_QLinearSigmoid", domain="com.microsoft",
            ),
            helper.make_node(
                "QLinearMul",
                [quantised_input, dequantize.input[1], dequantize.input[2], sigmoid, f"{prefix}_sigmoid_scale",
                 f"{prefix}_sigmoid_zero_point", quantize.input[1], quantize.input[2]],
                [quantize.output[0]], name=f"{prefix}_QLinearMul", domain="com.microsoft",
            ),
        ]
        removed |= {id(gelu), id(quantize)}
    if not replacements:
        return 0
    nodes = []
    for node in graph.node:
        if id(node) in replacements:
            nodes += replacements[id(node)]
        elif id(node) not in removed:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(added)
    if not any(entry.domain == "com.microsoft" for entry in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return len(replacements)


def _calibration_inputs(images, image_processor, config, count: int, seed: int) -> tuple:
    """Up to `count` images of `images` (an `ImageCollection`, a folder or dataset name, or a list of images
    or paths), drawn in a seeded random order, each preprocessed by the model's image processor: (where they
    come from, [(name, (1, C, H, W) float32 pixel values, (height, width) of the original)]). Raises DataError
    naming the image that cannot be read or does not fit the model, or the source that holds no image."""
    from .data import DataError, ImageCollection, load_images

    if isinstance(images, (str, os.PathLike)):
        images = load_images(images)
    if not isinstance(images, ImageCollection):
        images = ImageCollection("the calibration list", paths=list(images))
        if not images.paths:
            raise DataError("No calibration images: the list is empty. Give a folder of images or a dataset.")
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:count].tolist()
    inputs = []
    for index in order:
        name, image = images.name(index), images.load(index)
        try:  # decoded once, as the processor reads it (EXIF orientation applied): its size is the original's
            pixels = image_processor.read_image(image)
            pixel_values = image_processor(images=pixels, input_data_format="channels_last", return_tensors="pt")["pixel_values"]
        except (TypeError, ValueError) as error:
            raise DataError(f"Calibration image {name} cannot be preprocessed for this model: {error}") from error
        if pixel_values.shape[1] != config.num_channels:
            raise DataError(
                f"Calibration image {name} gives {pixel_values.shape[1]} channels after the image processor, but the "
                f"model takes {config.num_channels} (config.num_channels). Use images with the model's channels, or "
                "the image processor saved with the model."
            )
        inputs.append((name, pixel_values.float().contiguous(), tuple(pixels.shape[:2])))
    return images.source, inputs


def _int8_agreement(float_path: Path, int8_path: Path, config, held_out: list) -> tuple:
    """(class-map pixel agreement, largest |logits difference|, ||difference|| / ||float32 logits||) of the int8
    file against the float32 one on `held_out` [(name, pixel values, original size)]."""
    models = [ORTMetaSegForSemanticSegmentation(create_session(path), config, path) for path in (float_path, int8_path)]
    agree = total = 0
    largest, squared_difference, squared_reference = 0.0, 0.0, 0.0
    for _, pixel_values, size in held_out:
        reference, quantised = (model(pixel_values=pixel_values).logits.double() for model in models)
        difference = quantised - reference
        largest = max(largest, difference.abs().max().item())
        squared_difference += difference.square().sum().item()
        squared_reference += reference.square().sum().item()
        maps = [model.predict(pixel_values, original_sizes=[size])[0].segmentation for model in models]
        agree += (maps[0] == maps[1]).sum().item()
        total += maps[0].numel()
    return agree / total, largest, (squared_difference / max(squared_reference, 1e-30)) ** 0.5


def export_onnx_int8(
    model,
    output_dir,
    image_processor,
    calibration_images,
    calibration_size: int = CALIBRATION_SIZE,
    held_out: int = HELD_OUT,
    recipe: dict | None = None,
    opset: int | None = None,
    seed: int = 0,
    log=print,
) -> ONNXQuantizationResult:
    """Exports a MetaSeg segmentation model to an int8 `output_dir/model.onnx`: `export_onnx` (fused, checked
    against PyTorch), then ONNX Runtime's static quantisation with activation ranges measured on calibration
    images preprocessed by `image_processor`, as the model sees them at test time.

    calibration_images: a folder of images, a `datasets` Hub id or save_to_disk folder (its train split), a
    `data.ImageCollection`, or a list of images / paths. `calibration_size` of them (drawn in a `seed`ed random
    order) set the ranges, and `held_out` more (at most half of what there is) are kept back: on those the int8
    file's class maps and logits are compared with the float32 export's, printed through `log` and returned.
    recipe: changes to `INT8_RECIPE` (format, per-channel, types, calibration method, `float_parts`: which of
    `FLOAT_PARTS` stay in float32).

    Writes model.onnx (int8), config.json, preprocessor_config.json and quantization.json (the recipe and the
    agreement), all at once at the end: on any failure nothing is left in `output_dir`. Raises `DataError`
    (no calibration image, an unreadable one or one the model cannot take: named), ONNXExportError, or an
    ImportError naming the `onnx` extra before anything else.
    """
    require_onnx(*EXPORT_PACKAGES, *CHECK_PACKAGES)
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from .data import DataError

    recipe = check_int8_recipe(recipe)
    if calibration_size < 1 or held_out < 0:
        raise ValueError(f"calibration_size must be at least 1 and held_out at least 0, got {calibration_size} and {held_out}")
    source, inputs = _calibration_inputs(calibration_images, image_processor, model.config, calibration_size + held_out, seed)
    kept_back = min(held_out, len(inputs) // 2)
    if len(inputs) - kept_back < 1 or (held_out and not kept_back):
        raise DataError(
            f"{len(inputs)} calibration image(s): at least 2 are needed, one to calibrate on and one held back to "
            "measure the int8 model's agreement with float32 (or held_out=0)."
        )
    calibration, checked = inputs[: len(inputs) - kept_back], inputs[len(inputs) - kept_back:]

    output_dir = Path(output_dir)
    with _staged_output(output_dir, ".onnx-int8-") as (staging, publish):
        float_result = export_onnx(model, staging / "float32", image_processor, opset=opset, fuse=True, log=log)
        import onnx

        parts = _node_parts(onnx.load(str(float_result.path)))
        excluded = sorted(name for name, belongs in parts.items() if belongs & set(recipe["float_parts"]))
        prepared = staging / "prepared.onnx"
        quant_pre_process(str(float_result.path), str(prepared), skip_optimization=not recipe["optimize_before"])

        class Reader(CalibrationDataReader):
            def __init__(self):
                self.remaining = iter(calibration)

            def get_next(self):
                item = next(self.remaining, None)
                return None if item is None else {INPUT_NAME: item[1].numpy()}

        log(f"calibrating on {len(calibration)} image(s) ({recipe['calibration_method']}), float32 parts: "
            f"{', '.join(recipe['float_parts']) or 'none'} ...")
        quantised = staging / ONNX_FILE_NAME
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        quantize_static(
            str(prepared), str(quantised), Reader(),
            quant_format={"qdq": QuantFormat.QDQ, "qoperator": QuantFormat.QOperator}[recipe["quant_format"]],
            per_channel=recipe["per_channel"],
            reduce_range=recipe["reduce_range"],
            activation_type=types[recipe["activation_type"]],
            weight_type=types[recipe["weight_type"]],
            nodes_to_exclude=excluded,
            calibrate_method=getattr(CalibrationMethod, {"minmax": "MinMax"}.get(recipe["calibration_method"], recipe["calibration_method"].title())),
        )
        if "gelu" not in recipe["float_parts"]:
            graph = onnx.load(str(quantised))
            rewritten = _gelu_on_uint8(graph)
            onnx.save(graph, str(quantised))
            log(f"{rewritten} GELU(s) on uint8 as x * sigmoid({GELU_SIGMOID_SLOPE} x)")
        agreement = (1.0, 0.0, 0.0)
        if checked:
            agreement = _int8_agreement(float_result.path, quantised, model.config, checked)
            log(f"int8 vs float32 on {len(checked)} held-out image(s): class maps agree on {agreement[0]:.4%} of "
                f"pixels; logits: max |difference| {agreement[1]:.3g}, relative error {agreement[2]:.3%}")
        instructions = cpu_int8_instructions()
        if (recipe["activation_type"], recipe["weight_type"], recipe["reduce_range"]) == ("uint8", "int8", False):
            log(f"note: 8-bit weights (reduce_range=False): x86 CPUs without VNNI add pairs of uint8 x int8 products in "
                f"16 bits with saturation, so this file's results depend on the CPU (this one: "
                f"{describe_int8_instructions(instructions)}); reduce_range=True gives the same on every CPU")
        result = ONNXQuantizationResult(
            path=output_dir / ONNX_FILE_NAME, file_size=quantised.stat().st_size,
            float_file_size=float_result.file_size, calibration_images=len(calibration), held_out_images=len(checked),
            pixel_agreement=agreement[0], logits_max_abs_difference=agreement[1], logits_relative_error=agreement[2],
            recipe=recipe,
        )
        summary = {
            "recipe": {**recipe, "float_parts": list(recipe["float_parts"])},
            "calibration": {"source": source, "images": len(calibration), "seed": seed},
            "agreement_with_float32": {"held_out_images": len(checked), "pixel_agreement": agreement[0],
                                       "logits_max_abs_difference": agreement[1], "logits_relative_error": agreement[2],
                                       "cpu_int8_instructions": instructions},
            "file_size": result.file_size, "float32_file_size": result.float_file_size,
        }
        (staging / QUANTIZATION_FILE_NAME).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        for path in (staging / ONNX_FILE_NAME, staging / QUANTIZATION_FILE_NAME, staging / "float32" / "config.json",
                     staging / "float32" / "preprocessor_config.json"):
            publish(path)
    log(f"wrote {result.path} (int8, {result.file_size / 2**20:.1f} MiB, {result.size_ratio:.2f} of float32's "
        f"{result.float_file_size / 2**20:.1f} MiB) with config.json, preprocessor_config.json and {QUANTIZATION_FILE_NAME}")
    return result
