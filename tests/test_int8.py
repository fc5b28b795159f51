"""int8 ONNX export (`metaseg_hf.onnx_metaseg.export_onnx_int8`, `examples/export_onnx.py --quantize int8`) and
scoring ONNX files (`examples/evaluate.py --onnx`), on a tiny model.

The tiny model is a freshly initialised `tiny_config()` MetaSeg, not the tiny official checkpoint: that one's
random weights amplify any perturbation (1% input noise changes its logits by 17%, a trained MetaSeg-T's by
0.5%), so no quantisation can agree with its float32 logits. One int8 export per module, calibrated on a small
image folder; the error paths stop before anything is traced, except the one that checks that a failure after
the float32 export leaves nothing behind.
"""

import contextlib
import importlib.util
import io
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO_ROOT, TINY_DIR, tiny_config
from metaseg_hf import MetaSegForSemanticSegmentation, MetaSegImageProcessor
from metaseg_hf.data import DataError
from test_data import make_imagefolder

HAS_ONNX = all(importlib.util.find_spec(name) for name in ("onnx", "onnxscript", "onnxruntime"))
pytestmark = pytest.mark.skipif(not HAS_ONNX, reason='needs the ONNX extra: pip install "metaseg-hf[onnx]"')

sys.path.insert(0, str(REPO_ROOT / "examples"))
import export_onnx as export_cli  # noqa: E402


def run_cli(argv) -> tuple:
    """(exit code, printed lines) of examples/export_onnx.py."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exit_code = export_cli.main(argv)
    return exit_code, printed.getvalue().splitlines()


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    """An image/label folder of 6 scenes: the label PNGs must not be taken for calibration images."""
    return make_imagefolder(tmp_path_factory.mktemp("calibration") / "scenes", 6, size=(60, 80))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model") / "tiny"
    torch.manual_seed(0)
    MetaSegForSemanticSegmentation(tiny_config()).eval().save_pretrained(folder)
    MetaSegImageProcessor(size={"shortest_edge": 64, "longest_edge": 256}).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def int8_export(model_dir, calibration_folder, tmp_path_factory):
    """The tiny model exported in int8 by the CLI (4 calibration images, 2 held out): (folder, printed lines)."""
    output = tmp_path_factory.mktemp("int8") / "tiny-int8"
    exit_code, lines = run_cli(["--model", str(model_dir), "--output_dir", str(output), "--quantize", "int8",
                                "--calibration_data", str(calibration_folder), "--calibration_size", "4", "--held_out", "2"])
    assert exit_code == 0, lines
    return output, lines


@pytest.fixture(scope="module")
def float_export(model_dir, tmp_path_factory):
    from metaseg_hf.onnx_metaseg import export_onnx

    output = tmp_path_factory.mktemp("float32") / "tiny-float32"
    model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    export_onnx(model, output, MetaSegImageProcessor.from_pretrained(model_dir), log=lambda line: None)
    return output


def test_int8_export_writes_a_quantised_self_describing_folder(model_dir, int8_export, float_export):
    import onnx

    from metaseg_hf.onnx_metaseg import INT8_RECIPE, cpu_int8_instructions

    folder, lines = int8_export
    assert sorted(path.name for path in folder.iterdir()) == [
        "config.json", "model.onnx", "preprocessor_config.json", "quantization.json"
    ]
    summary = json.loads((folder / "quantization.json").read_text())
    assert summary["recipe"] == {**INT8_RECIPE, "float_parts": list(INT8_RECIPE["float_parts"])}
    assert summary["calibration"]["images"] == 4 and summary["calibration"]["source"].endswith("images")
    agreement = summary["agreement_with_float32"]
    assert agreement["held_out_images"] == 2
    assert agreement["cpu_int8_instructions"] == cpu_int8_instructions()  # the CPU the agreement was measured on
    # The agreement printed is the one saved.
    printed = next(line for line in lines if line.startswith("int8 vs float32 on 2 held-out image(s)"))
    assert f"{agreement['pixel_agreement']:.4%}" in printed and f"{agreement['logits_max_abs_difference']:.3g}" in printed
    # 94% on this random tiny model with INT8_RECIPE (95% with the whole stem in float32); 99.5% on the trained demo.
    assert 0.9 < agreement["pixel_agreement"] <= 1 and 0 < agreement["logits_relative_error"] < 0.1
    assert summary["file_size"] == (folder / "model.onnx").stat().st_size
    assert summary["float32_file_size"] == (float_export / "model.onnx").stat().st_size

    # Integer arithmetic between the convolutions: the GELUs on uint8; the stem's first convolution and the decoder's
    # attention maps (the float parts) in float32, without QLinearSoftmax.
    graph = onnx.load(str(folder / "model.onnx")).graph
    operators = [node.op_type for node in graph.node]
    assert operators.count("QLinearSigmoid") == operators.count("QLinearMul") > 0
    assert operators.count("Gelu") == 1  # the stem's, after its float32 first convolution
    producers = {output: node.op_type for node in graph.node for output in node.output}
    float_convolutions = [node.input[0] for node in graph.node
                          if node.op_type == "Conv" and producers.get(node.input[1]) != "DequantizeLinear"]
    assert float_convolutions == ["pixel_values"]
    softmax_users = [node.op_type for node in graph.node
                     if any(producers.get(name) == "Softmax" for name in node.input)]
    assert softmax_users and set(softmax_users) == {"MatMul"}  # not a QuantizeLinear: no QLinearSoftmax
    assert "QuantizeLinear" in operators and "DequantizeLinear" in operators
    assert json.loads((folder / "config.json").read_text()) == json.loads((float_export / "config.json").read_text())
    assert MetaSegImageProcessor.from_pretrained(folder).to_dict() == MetaSegImageProcessor.from_pretrained(model_dir).to_dict()


def int8_weights(path) -> list:
    """The int8 tensors of a quantised file that feed a DequantizeLinear: its weights (and per-channel zero points)."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(path)).graph
    dequantised = {node.input[0] for node in graph.node if node.op_type == "DequantizeLinear"}
    return [numpy_helper.to_array(tensor) for tensor in graph.initializer
            if tensor.name in dequantised and tensor.data_type == onnx.TensorProto.INT8]


def test_int8_weights_cannot_saturate_cpus_without_vnni(model_dir, int8_export, calibration_folder, tmp_path):
    """x86 CPUs without VNNI add pairs of uint8 x int8 products in 16 bits with saturation: the recipe's 7-bit weights
    keep 2 x 255 x |w| within int16, so its results do not depend on the CPU. 8-bit weights do not, and say so."""
    from metaseg_hf.onnx_metaseg import export_onnx_int8

    largest = max(int(np.abs(weight.astype(np.int32)).max()) for weight in int8_weights(int8_export[0] / "model.onnx"))
    assert 0 < largest and 2 * 255 * largest <= np.iinfo(np.int16).max

    lines = []
    model = MetaSegForSemanticSegmentation.from_pretrained(model_dir).eval()
    result = export_onnx_int8(model, tmp_path / "8-bit", MetaSegImageProcessor.from_pretrained(model_dir),
                              calibration_folder, calibration_size=2, held_out=1, recipe={"reduce_range": False},
                              log=lines.append)
    largest = max(int(np.abs(weight.astype(np.int32)).max()) for weight in int8_weights(result.path))
    assert 2 * 255 * largest > np.iinfo(np.int16).max
    assert any(line.startswith("note: 8-bit weights (reduce_range=False)") and "depend on the CPU" in line
               for line in lines), lines


def test_cpu_int8_instructions_are_read_from_cpuinfo():
    from metaseg_hf.onnx_metaseg import INT8_DOT_PRODUCTS, cpu_int8_instructions

    zen4 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni avx512_bf16\n"
    assert cpu_int8_instructions(zen4) == "avx512_vnni"
    assert cpu_int8_instructions("flags\t: fpu sse2 avx avx2 fma\n") == "avx2"
    assert cpu_int8_instructions("Features\t: fp asimd asimddp sve\n") == "asimddp"
    assert cpu_int8_instructions("flags\t: fpu sse2\n") == cpu_int8_instructions("") == "unknown"
    assert cpu_int8_instructions() in (*INT8_DOT_PRODUCTS, "unknown")


def test_int8_model_segments_like_float32(int8_export, float_export):
    from metaseg_hf.onnx_metaseg import ORTMetaSegForSemanticSegmentation

    processor = MetaSegImageProcessor.from_pretrained(int8_export[0])
    photo = Image.open(TINY_DIR / "tiny-photo.png")  # not a calibration scene
    maps = [
        processor.segment(ORTMetaSegForSemanticSegmentation.from_pretrained(folder, num_threads=2), photo)[0].segmentation
        for folder in (int8_export[0], float_export)
    ]
    assert maps[0].shape == (photo.height, photo.width)
    assert (maps[0] == maps[1]).float().mean().item() > 0.95


def test_evaluate_scores_onnx_files_with_the_same_json(model_dir, int8_export, float_export, tmp_path):
    spec = importlib.util.spec_from_file_location("evaluate_example", REPO_ROOT / "examples" / "evaluate.py")
    evaluate_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_script)
    make_imagefolder(tmp_path / "val", 2, size=(60, 72))
    results = {}
    for name, source in (("pytorch", ["--model", str(model_dir), "--device", "cpu"]),
                         ("float32", ["--onnx", str(float_export / "model.onnx"), "--threads", "2"]),
                         ("int8", ["--onnx", str(int8_export[0])])):
        output = tmp_path / f"{name}.json"
        assert evaluate_script.main([*source, "--data_dir", str(tmp_path / "val"), "--output_json", str(output)]) == 0
        results[name] = json.loads(output.read_text())
    assert set(results["int8"]) == set(results["pytorch"])
    assert results["pytorch"]["settings"]["runtime"] == "pytorch"
    assert results["float32"]["settings"]["runtime"] == results["int8"]["settings"]["runtime"] == "onnxruntime"
    assert results["int8"]["settings"]["model"] == str(int8_export[0] / "model.onnx")
    # float32 ONNX Runtime: PyTorch's scores (logits within 1e-5).
    assert results["float32"]["mean_iou"] == pytest.approx(results["pytorch"]["mean_iou"], abs=1e-3)
    assert 0 <= results["int8"]["mean_iou"] <= 1

    # Without --output_json the file goes beside the ONNX file; PyTorch-only options are refused.
    assert evaluate_script.main(["--onnx", str(int8_export[0] / "model.onnx"), "--data_dir", str(tmp_path / "val")]) == 0
    assert json.loads((int8_export[0] / "eval_results.json").read_text())["settings"]["images"] == 2
    (int8_export[0] / "eval_results.json").unlink()
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--onnx", "model.onnx", "--bf16"])
    with pytest.raises(SystemExit):
        evaluate_script.parse_args(["--onnx", "model.onnx", "--model", str(model_dir)])


def test_gelu_on_uint8_is_gelu_within_the_quantisation_step(tmp_path):
    """`_gelu_on_uint8` turns DequantizeLinear -> Gelu -> QuantizeLinear into QLinearSigmoid and QLinearMul;
    ONNX Runtime's result is GELU within one output step plus the sigmoid form's own error (< 0.021)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from metaseg_hf.onnx_metaseg import _gelu_on_uint8, create_session

    in_scale, in_zero, out_scale, out_zero = 8 / 255, 128, 4.2 / 255, 11  # GELU's range: [-0.17, 3.98]
    constants = [
        numpy_helper.from_array(np.array(in_scale, np.float32), "in_scale"),
        numpy_helper.from_array(np.array(in_zero, np.uint8), "in_zero"),
        numpy_helper.from_array(np.array(out_scale, np.float32), "out_scale"),
        numpy_helper.from_array(np.array(out_zero, np.uint8), "out_zero"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "in_scale", "in_zero"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "in_scale", "in_zero"], ["xd"]),
        helper.make_node("Gelu", ["xd"], ["g"]),
        helper.make_node("QuantizeLinear", ["g", "out_scale", "out_zero"], ["gq"]),
        helper.make_node("DequantizeLinear", ["gq", "out_scale", "out_zero"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [256])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [256])], constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])
    assert _gelu_on_uint8(model) == 1
    assert [node.op_type for node in model.graph.node] == [
        "QuantizeLinear", "QLinearSigmoid", "QLinearMul", "DequantizeLinear"
    ]
    onnx.checker.check_model(model)
    x = ((np.arange(256) - in_zero) * in_scale).astype(np.float32)  # every uint8 input
    onnx.save(model, str(tmp_path / "gelu.onnx"))
    y = create_session(tmp_path / "gelu.onnx", num_threads=1).run(None, {"x": x})[0]
    gelu = torch.nn.functional.gelu(torch.from_numpy(x).double()).numpy()
    assert np.abs(y - gelu).max() <= out_scale + 0.021
    assert _gelu_on_uint8(model) == 0  # nothing left to rewrite


# Errors: named, before anything is traced, and nothing written


def test_cli_refuses_int8_arguments_that_do_not_fit(model_dir, tmp_path, capsys):
    for argv, message in (
        (["--quantize", "int8"], "--quantize int8 needs --calibration_data"),
        (["--calibration_data", "photos"], "--calibration_data is for --quantize int8"),
        (["--quantize", "int8", "--calibration_data", "photos", "--no-fuse"], "leave out --no-fuse"),
        (["--quantize", "int8", "--calibration_data", "photos", "--float_parts", "head"], "invalid choice: 'head'"),
    ):
        with pytest.raises(SystemExit):
            export_cli.parse_args(["--model", str(model_dir), "--output_dir", str(tmp_path / "out"), *argv])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ["empty", "label folders only", "a file", "unreadable image"])
def test_bad_calibration_data_is_named_and_nothing_is_written(tmp_path, capsys, monkeypatch, case):
    import torch.onnx

    traced = []
    monkeypatch.setattr(torch.onnx, "export", lambda *args, **kwargs: traced.append(args))
    data = tmp_path / "calibration"
    data.mkdir()
    if case == "label folders only":
        make_imagefolder(data, 2)
        for image in (data / "images").iterdir():
            image.unlink()
    elif case == "a file":
        data = tmp_path / "photo.png"
        Image.new("RGB", (64, 64)).save(data)
    elif case == "unreadable image":
        make_imagefolder(data, 3)
        (data / "images" / "img1.jpg").write_bytes(b"not a JPEG")
    model_dir = tmp_path / "model"
    MetaSegForSemanticSegmentation(tiny_config()).save_pretrained(model_dir)
    MetaSegImageProcessor().save_pretrained(model_dir)
    capsys.readouterr()
    output = tmp_path / "out"
    exit_code, _ = run_cli(["--model", str(model_dir), "--output_dir", str(output), "--quantize", "int8",
                            "--calibration_data", str(data), "--calibration_size", "2", "--held_out", "1"])
    error = capsys.readouterr().err
    assert exit_code == 1 and "error: " in error
    expected = {"empty": str(data), "label folders only": str(data / "images"), "a file": f"{data} is a file",
                "unreadable image": str(data / "images" / "img1.jpg")}[case]
    assert expected in error, error
    assert not output.exists() and not traced


def test_images_the_model_cannot_take_are_refused_by_name(tmp_path):
    from metaseg_hf.onnx_metaseg import export_onnx_int8

    folder = make_imagefolder(tmp_path / "photos", 2)
    model = MetaSegForSemanticSegmentation(tiny_config(num_channels=4)).eval()
    with pytest.raises(DataError, match=r"img\d\.jpg gives 3 channels .* takes 4 \(config.num_channels\)"):
        export_onnx_int8(model, tmp_path / "out", MetaSegImageProcessor(), folder, log=lambda line: None)
    with pytest.raises(DataError, match="at least 2 are needed"):  # one to calibrate on, one to check
        export_onnx_int8(MetaSegForSemanticSegmentation(tiny_config()).eval(), tmp_path / "out", MetaSegImageProcessor(),
                         [folder / "images" / "img0.jpg"], log=lambda line: None)
    assert not (tmp_path / "out").exists()


def test_unknown_recipe_entries_are_named_with_the_choices():
    from metaseg_hf.onnx_metaseg import check_int8_recipe

    with pytest.raises(ValueError, match=r"Unknown float part\(s\) \['head'\]; the parts are gelu, stem"):
        check_int8_recipe({"float_parts": ["head"]})
    with pytest.raises(ValueError, match=r"Unknown int8 recipe key\(s\) \['bits'\]"):
        check_int8_recipe({"bits": 4})
    with pytest.raises(ValueError, match="calibration_method='kl'; choose one of minmax, entropy"):
        check_int8_recipe({"calibration_method": "kl"})


def test_a_failure_after_the_float_export_leaves_the_folder_as_it_was(tmp_path, calibration_folder, monkeypatch):
    import onnxruntime.quantization

    from metaseg_hf.onnx_metaseg import export_onnx_int8

    def broken(*args, **kwargs):
        raise RuntimeError("quantiser failed")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_static", broken)
    output = tmp_path / "existing"
    output.mkdir()
    (output / "notes.txt").write_text("kept")
    model = MetaSegForSemanticSegmentation(tiny_config()).eval()
    with pytest.raises(RuntimeError, match="quantiser failed"):
        export_onnx_int8(model, output, MetaSegImageProcessor(), calibration_folder, calibration_size=2, held_out=1,
                         log=lambda line: None)
    assert [path.name for path in output.iterdir()] == ["notes.txt"]


def test_missing_onnxruntime_names_the_extra_before_anything_else(tmp_path, capsys, monkeypatch, calibration_folder):
    from metaseg_hf.onnx_metaseg import export_onnx_int8

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ImportError, match=r'onnxruntime is needed.*pip install "metaseg-hf\[onnx\]"'):
        export_onnx_int8(MetaSegForSemanticSegmentation(tiny_config()), tmp_path / "out", MetaSegImageProcessor(),
                         calibration_folder)
    exit_code, _ = run_cli(["--model", str(tmp_path / "no-such-model"), "--output_dir", str(tmp_path / "out"),
                            "--quantize", "int8", "--calibration_data", str(calibration_folder)])
    assert exit_code == 1 and 'error: onnxruntime is needed' in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_calibration_images_come_from_folders_datasets_and_the_synthetic_scenes(tmp_path, calibration_folder):
    import datasets

    from metaseg_hf.data import load_images

    folder = load_images(calibration_folder)  # an image/label folder: its images/, not the label PNGs
    assert len(folder) == 6 and all(path.parent.name == "images" for path in folder.paths)
    rows = datasets.Dataset.from_dict({"img": [Image.new("RGB", (40, 30))] * 3, "label": [1, 2, 3]},
                                      features=datasets.Features({"img": datasets.Image(), "label": datasets.Value("int64")}))
    datasets.DatasetDict({"train": rows, "validation": rows.select([0])}).save_to_disk(tmp_path / "saved")
    saved = load_images(tmp_path / "saved", split="validation")
    assert len(saved) == 1 and saved.name(0).endswith("saved[validation] row 0")
    assert saved.load(0).size == (40, 30)  # a PIL image, decoded by the library (EXIF orientation applied later)
    with pytest.raises(DataError, match=r"has no 'test' split \(splits: train, validation\)"):
        load_images(tmp_path / "saved", split="test")

    args = export_cli.parse_args(["--model", "m", "--output_dir", str(tmp_path / "out"), "--quantize", "int8",
                                  "--calibration_data", "synthetic"])
    scenes = export_cli.calibration_images(args)
    assert len(scenes) == 400 and scenes.name(3) == "the synthetic train scenes row 3"


def test_the_command_line_defaults_are_the_int8_recipe():
    from metaseg_hf.onnx_metaseg import INT8_RECIPE

    arguments = ["--model", "m", "--output_dir", "out", "--quantize", "int8", "--calibration_data", "synthetic"]
    recipe = export_cli.int8_recipe(export_cli.parse_args(arguments))
    assert recipe == {key: INT8_RECIPE[key] for key in recipe} and recipe["reduce_range"] is True
    assert export_cli.int8_recipe(export_cli.parse_args([*arguments, "--no-reduce_range", "--no-per_channel"]))[
        "reduce_range"] is False
