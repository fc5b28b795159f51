"""ONNX export (`metaseg_hf.onnx_metaseg`, examples/export_onnx.py) and ONNX Runtime inference.

Each model is exported once per session: the tiny official fixture (tests/fixtures/tiny, 7 classes, every
clone) and, with the large reference data, the converted official MetaSeg-T checkpoint (150 classes). The
ONNX Runtime model must reproduce PyTorch's logits and the official predictions through the same processor
and post-processing, with dynamic batch, height and width.
"""

import contextlib
import importlib.util
import io
import json
import sys
import textwrap

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from transformers.modeling_outputs import SemanticSegmenterOutput

from helpers import REPO_ROOT, TINY_DIR, run_python, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(not HAS_ONNX, reason='needs the ONNX extra: pip install "metaseg-hf[onnx]"')

sys.path.insert(0, str(REPO_ROOT / "examples"))
import export_onnx as export_cli  # noqa: E402
import segment as segment_cli  # noqa: E402

TINY_PHOTO = TINY_DIR / "tiny-photo.png"


def agreement(first: torch.Tensor, second: torch.Tensor) -> float:
    return (first == second).float().mean().item()


@pytest.fixture(scope="session")
def tiny_export(tiny_dir, tmp_path_factory):
    """The tiny model exported by the CLI (fused path, checked): (folder, printed output)."""
    if not HAS_ONNX:
        pytest.skip('needs the ONNX extra: pip install "metaseg-hf[onnx]"')
    output = tmp_path_factory.mktemp("tiny-onnx") / "exported"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = export_cli.main(["--model", str(tiny_dir), "--output_dir", str(output)])
    assert exit_code == 0
    return output, printed.getvalue().splitlines()


@pytest.fixture(scope="session")
def tiny_models(tiny_dir, tiny_export):
    from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

    torch_model = MetaSegForSemanticSegmentation.from_pretrained(tiny_dir).eval()
    ort_model = ORTMetaSegForSemanticSegmentation.from_pretrained(tiny_export[0], num_threads=2)
    return torch_model, ort_model, MetaSegImageProcessor.from_pretrained(tiny_export[0])


@pytest.fixture(scope="session")
def reference_export(converted_dir, tmp_path_factory):
    """The converted official MetaSeg-T checkpoint exported by the library function: (folder, result).

    Its config asks for the Triton depthwise kernels, which cannot run here: the export must trace ONNX `Conv`s
    whatever the PyTorch runtime choice, and leave the model and its saved config as they were given."""
    if not HAS_ONNX:
        pytest.skip('needs the ONNX extra: pip install "metaseg-hf[onnx]"')
    from metaseg_hf.onnx_metaseg import export_onnx

    output = tmp_path_factory.mktemp("reference-onnx")
    model = MetaSegForSemanticSegmentation.from_pretrained(converted_dir, depthwise_implementation="triton").eval()
    result = export_onnx(model, output, MetaSegImageProcessor.from_pretrained(converted_dir), log=lambda line: None)
    assert not model.is_fused and model.config.depthwise_implementation == "triton"
    return output, result


@pytest.fixture(scope="session")
def reference_ort_model(reference_export):
    from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

    return ORTMetaSegForSemanticSegmentation.from_pretrained(reference_export[0], num_threads=2)


@pytest.fixture(scope="module")
def whole(reference):
    return load_file(reference / "metaseg-t-ade20k-whole.safetensors")


# The official MetaSeg-T checkpoint (large reference data)


@needs_onnx
def test_reference_export_is_checked_on_two_batch_sizes_and_shapes(reference_export):
    folder, result = reference_export
    assert result.path == folder / "model.onnx" and result.path.is_file() and result.fused
    assert result.file_size == result.path.stat().st_size
    assert result.max_abs_difference is not None and result.max_abs_difference <= 1e-3
    (batch_a, _, *size_a), (batch_b, _, *size_b) = result.checked_shapes
    assert batch_a != batch_b and size_a != size_b
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "metaseg" and len(config["id2label"]) == 150
    assert config["depthwise_implementation"] == "triton"  # saved as given; the graph holds plain Convs


@needs_onnx
def test_onnx_runtime_logits_match_pytorch_on_the_reference_photo(reference_model, reference_ort_model, whole):
    with torch.no_grad():
        expected = reference_model(whole["pixel_values"]).logits
    logits = reference_ort_model(pixel_values=whole["pixel_values"]).logits
    assert logits.shape == expected.shape == (1, 150, 64, 88) and logits.dtype == torch.float32
    assert (logits - expected).abs().max().item() <= 1e-3
    assert (logits - whole["logits"]).abs().max().item() <= 1e-3  # the official head output


@needs_onnx
def test_onnx_runtime_reproduces_the_official_predictions(reference, reference_ort_model, whole):
    prediction = reference_ort_model.predict(
        whole["pixel_values"], original_sizes=[(375, 500)], mode="whole", probabilities_max="full"
    )[0]
    assert agreement(prediction.segmentation, whole["segmentation"][0]) >= 0.995
    assert (prediction.probabilities_max - whole["probabilities_max"][0]).abs().max().item() <= 1e-4
    slide = load_file(reference / "metaseg-t-ade20k-slide.safetensors")
    prediction = reference_ort_model.predict(
        whole["pixel_values"], original_sizes=[(375, 500)], mode="slide", window_size=256, window_stride=171,
        window_batch_size=6, probabilities_max="full",
    )[0]
    assert agreement(prediction.segmentation, slide["segmentation"][0]) >= 0.995
    assert (prediction.probabilities_max - slide["probabilities_max"][0]).abs().max().item() <= 1e-4


@needs_onnx
def test_reference_export_has_dynamic_batch_height_and_width(reference_model, reference_ort_model):
    import onnx

    graph = onnx.load(str(reference_ort_model.path), load_external_data=False).graph
    dims = [dim.dim_param or dim.dim_value for dim in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "height", "width"]
    assert graph.output[0].type.tensor_type.shape.dim[1].dim_value == 150
    assert {node.domain for node in graph.node} == {""}  # standard ONNX operators only, no custom ones
    assert "Conv" in {node.op_type for node in graph.node}
    generator = torch.Generator().manual_seed(1)
    for shape in [(3, 3, 57, 90), (1, 3, 161, 64)]:
        pixel_values = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = reference_model(pixel_values).logits
        logits = reference_ort_model(pixel_values).logits
        assert logits.shape == expected.shape
        assert (logits - expected).abs().max().item() <= 1e-3


# The tiny official checkpoint (every clone)


@needs_onnx
def test_cli_writes_a_self_describing_folder_and_prints_the_difference(tiny_dir, tiny_export):
    folder, lines = tiny_export
    assert sorted(path.name for path in folder.iterdir()) == ["config.json", "model.onnx", "preprocessor_config.json"]
    difference = [line for line in lines if "ONNX Runtime vs PyTorch logits" in line]
    assert len(difference) == 1 and float(difference[0].rsplit(" ", 1)[1]) <= 2e-4
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "metaseg" and len(config["id2label"]) == 7
    assert MetaSegImageProcessor.from_pretrained(folder).to_dict() == MetaSegImageProcessor.from_pretrained(tiny_dir).to_dict()


@needs_onnx
def test_tiny_onnx_reproduces_the_official_photo_prediction(tiny_models):
    _, ort_model, processor = tiny_models
    official = load_file(TINY_DIR / "tiny-photo-whole.safetensors")
    assert ort_model.config.num_labels == 7 and ort_model.config.id2label[1] == "building"
    logits = ort_model(processor(str(TINY_PHOTO))["pixel_values"]).logits
    assert logits.shape == official["logits"].shape == (1, 7, 64, 68)
    assert (logits - official["logits"]).abs().max().item() <= 5e-4
    prediction = processor.segment(ort_model, str(TINY_PHOTO), probabilities_max="full")[0]
    assert agreement(prediction.segmentation, official["segmentation"][0]) >= 0.995
    assert (prediction.probabilities_max - official["probabilities_max"][0]).abs().max().item() <= 1e-4


@needs_onnx
@pytest.mark.parametrize(
    "options",
    [{}, {"flip": True}, {"mode": "slide", "window_size": 256, "window_stride": 171, "flip": True},
     {"scales": (0.75, 1.25)}],
    ids=["whole", "flip", "slide-flip", "multi-scale"],
)
def test_segment_gives_pytorchs_class_maps(tiny_models, options):
    torch_model, ort_model, processor = tiny_models
    image = Image.open(TINY_PHOTO).resize((150, 110))
    expected = processor.segment(torch_model, image, probabilities_max="full", **options)[0]
    prediction = processor.segment(ort_model, image, probabilities_max="full", **options)[0]
    assert prediction.segmentation.shape == (110, 150)
    assert agreement(prediction.segmentation, expected.segmentation) >= 0.999
    assert (prediction.probabilities_max - expected.probabilities_max).abs().max().item() <= 1e-4


@needs_onnx
def test_one_file_takes_other_batch_sizes_and_shapes(tiny_models):
    torch_model, ort_model, _ = tiny_models
    generator = torch.Generator().manual_seed(2)
    for shape in [(1, 3, 57, 57), (4, 3, 75, 130), (2, 3, 300, 64)]:
        pixel_values = torch.randn(shape, generator=generator)
        with torch.no_grad():
            expected = torch_model(pixel_values).logits
        output = ort_model(pixel_values=pixel_values)
        assert isinstance(output, SemanticSegmenterOutput)
        assert output.logits.shape == expected.shape == (shape[0], 7, -(-shape[2] // 8), -(-shape[3] // 8))
        assert (output.logits - expected).abs().max().item() <= 2e-4


@needs_onnx
def test_onnx_model_refuses_what_the_graph_cannot_do(tiny_models):
    _, ort_model, _ = tiny_models
    with pytest.raises(ValueError, match="at least 57 pixels"):
        ort_model(torch.randn(1, 3, 56, 100))
    with pytest.raises(ValueError, match="3 channels|num_channels=3"):
        ort_model(torch.randn(1, 4, 64, 64))
    with pytest.raises(TypeError, match="output_hidden_states need.*PyTorch model"):
        ort_model(torch.randn(1, 3, 64, 64), output_hidden_states=True)
    assert ort_model(torch.randn(1, 3, 64, 64).numpy(), return_dict=False)[0].shape == (1, 7, 8, 8)


@needs_onnx
def test_segment_cli_with_onnx_writes_the_same_class_maps(tiny_dir, tiny_export, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.open(TINY_PHOTO).resize((120, 90)).save(photos / "cat.png")
    args = [str(photos), "--flip"]
    assert segment_cli.main(["--model", str(tiny_dir), *args, "--output_dir", str(tmp_path / "torch")]) == 0
    assert segment_cli.main(["--onnx", str(tiny_export[0] / "model.onnx"), *args, "--output_dir", str(tmp_path / "ort")]) == 0
    expected = torch.tensor(list(Image.open(tmp_path / "torch" / "cat_classes.png").getdata()))
    written = torch.tensor(list(Image.open(tmp_path / "ort" / "cat_classes.png").getdata()))
    assert agreement(written, expected) >= 0.999
    summary = json.loads((tmp_path / "ort" / "cat.json").read_text())
    assert {row["label"] for row in summary["classes"]} <= set(json.loads((tiny_dir / "config.json").read_text())["id2label"].values())


def test_onnx_model_folder_errors_name_the_fix(tmp_path):
    """Each error names the file looked for and the export command into the folder the user gave."""
    from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

    empty, missing = tmp_path / "empty", tmp_path / "missing"
    empty.mkdir()
    cases = {
        empty: (empty / "model.onnx", empty),
        missing: (missing / "model.onnx", missing),  # not yet exported: export into it, not beside it
        missing / "model.onnx": (missing / "model.onnx", missing),
        empty / "other.onnx": (empty / "other.onnx", empty),
    }
    for given, (file, folder) in cases.items():
        with pytest.raises(FileNotFoundError) as error:
            ORTMetaSegForSemanticSegmentation.from_pretrained(given)
        message = str(error.value)
        assert message.startswith(f"No ONNX model at {file}")
        assert message.endswith(f"python examples/export_onnx.py --model MODEL --output_dir {folder}")
        assert ("does not exist" in message) == (folder == missing)
    (empty / "model.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=rf"{empty / 'model.onnx'} has no config.json beside it"):
        ORTMetaSegForSemanticSegmentation.from_pretrained(empty)


# Failures leave nothing behind; the optional packages stay optional


class _CumulativeMaxModel(torch.nn.Module):
    """A stand-in segmentation model using an operator without an ONNX implementation (aten.cummax)."""

    def __init__(self):
        super().__init__()
        self.config = tiny_config()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, pixel_values):
        logits = torch.cummax(pixel_values * self.scale, dim=1).values[:, :1].repeat(1, 5, 1, 1)
        return SemanticSegmenterOutput(logits=logits)


@needs_onnx
def test_unsupported_operator_is_named_and_nothing_is_written(tmp_path):
    from metaseg_hf.onnx_metaseg import ONNXExportError, export_onnx

    existing, new = tmp_path / "existing", tmp_path / "new"
    existing.mkdir()
    for output_dir in (existing, new):
        with pytest.raises(ONNXExportError, match=r"aten\.cummax.*Nothing was written"):
            export_onnx(_CumulativeMaxModel(), output_dir, MetaSegImageProcessor(), fuse=False, log=lambda line: None)
    assert list(existing.iterdir()) == [] and not new.exists()


@needs_onnx
def test_export_refuses_half_precision_naming_the_fix(tmp_path):
    from metaseg_hf.onnx_metaseg import export_onnx

    model = MetaSegForSemanticSegmentation(tiny_config()).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"torch.bfloat16.*model.float\(\)"):
        export_onnx(model, tmp_path / "out", MetaSegImageProcessor())
    assert not (tmp_path / "out").exists()


def test_conversion_summary_reads_the_exceptions_not_the_wording():
    """The operator and the step come from the exception classes and the exporter's frames: reworded torch
    messages give the same summary."""
    errors = pytest.importorskip("torch.onnx._internal.exporter._errors")
    from metaseg_hf.onnx_metaseg import _conversion_summary

    graph = torch.fx.Graph()
    node = graph.call_function(torch.ops.aten.cummax.default, (graph.placeholder("x"), 1))

    def translate(node):
        raise errors.DispatchError("reworded in a future torch")

    def convert(kind, node):
        try:
            translate(node)
        except errors.DispatchError as error:
            raise kind("a new wording of step 3, no summary section") from error

    with pytest.raises(errors.ConversionError) as caught:
        convert(errors.ConversionError, node)
    assert _conversion_summary(caught.value) == (
        "no ONNX implementation of the operator aten.cummax.default (step: converting the exported program to ONNX)"
    )
    try:
        raise errors.TorchExportError("step 1 in other words") from ValueError("data-dependent branch\nmore lines")
    except errors.TorchExportError as error:
        assert _conversion_summary(error) == (
            "ValueError: data-dependent branch (step: capturing the graph with torch.export)"
        )


def _tracing_recorder(monkeypatch) -> list:
    """Records calls of torch.onnx.export (the tracing)."""
    calls = []
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: calls.append(args))
    return calls


@pytest.mark.parametrize("package", ["onnx", "onnxscript", "onnxruntime"])
def test_missing_package_is_named_with_the_extra_before_tracing(monkeypatch, tmp_path, capsys, package):
    from metaseg_hf.onnx_metaseg import ONNXExportError, export_onnx

    traced = _tracing_recorder(monkeypatch)
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed
    message = rf'{package} is needed.*Install the optional dependencies with: pip install "metaseg-hf\[onnx\]"'
    with pytest.raises(ImportError, match=message):
        export_onnx(MetaSegForSemanticSegmentation(tiny_config()), tmp_path / "out", MetaSegImageProcessor())
    assert not traced and not (tmp_path / "out").exists()
    if package == "onnxruntime":  # only the check needs it: without the check, the export goes on to tracing
        with pytest.raises(ONNXExportError):  # the recorder returns no program to save
            export_onnx(MetaSegForSemanticSegmentation(tiny_config()), tmp_path / "out", MetaSegImageProcessor(),
                        check=False, log=lambda line: None)
        assert len(traced) == 1
        traced.clear()
    # The CLI says it before loading the model (a Hub id would be downloaded first).
    assert export_cli.main(["--model", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "cli")]) == 1
    assert f"error: {package} is needed" in capsys.readouterr().err and not traced


def test_onnx_packages_are_optional():
    """On a machine without onnx, onnxscript and onnxruntime, `import metaseg_hf` and its ONNX module work, and
    each ONNX entry point raises an ImportError naming the first missing package and the extra."""
    script = textwrap.dedent(
        """
        import importlib.abc, importlib.machinery, sys
        class _Missing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
            # Importing onnx, onnxscript or onnxruntime fails as where they are not installed.
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("onnx", "onnxscript", "onnxruntime"):
                    return importlib.machinery.ModuleSpec(name, self)
            def create_module(self, spec):
                raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)
        sys.meta_path.insert(0, _Missing())
        import tempfile
        from pathlib import Path
        import metaseg_hf
        from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
        from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation, create_session, export_onnx
        from helpers import tiny_config
        model = MetaSegForSemanticSegmentation(tiny_config())
        folder = Path(tempfile.mkdtemp())  # what from_pretrained looks for, before it starts ONNX Runtime
        model.config.to_json_file(folder / "config.json")
        (folder / "model.onnx").write_bytes(b"")
        calls = {
            "export": lambda: export_onnx(model, "unused", MetaSegImageProcessor()),
            "export without check": lambda: export_onnx(model, "unused", MetaSegImageProcessor(), check=False),
            "session": lambda: create_session("model.onnx"),
            "from_pretrained": lambda: ORTMetaSegForSemanticSegmentation.from_pretrained(folder),
        }
        for what, call in calls.items():
            try:
                call()
            except ImportError as error:
                print(what, "|", str(error).split(" is needed")[0], "|", str(error).rsplit(": ", 1)[1])
        """
    )
    result = run_python(script, env_overrides={"PYTHONPATH": f"{REPO_ROOT}:{REPO_ROOT / 'tests'}"}).stdout
    assert result.strip().splitlines() == [
        'export | onnx | pip install "metaseg-hf[onnx]"',
        'export without check | onnx | pip install "metaseg-hf[onnx]"',
        'session | onnxruntime | pip install "metaseg-hf[onnx]"',
        'from_pretrained | onnxruntime | pip install "metaseg-hf[onnx]"',
    ], result
