"""The inference-only fused path (`model.fuse()`): the reference numbers, the same function as the
straight port on other configurations, reversible, refusing to train, exportable with dynamic sizes."""

import pytest
import torch
from safetensors.torch import load_file

from helpers import ATTENTION_KEYS, STAGE_KEYS, run_reference_batch, tiny_config
from metaseg_hf import MetaSegBackbone, MetaSegForSemanticSegmentation, fusion_metaseg, ops_metaseg


@pytest.fixture(scope="module")
def truth(reference):
    return load_file(reference / "metaseg-t-ade20k-batch-float64.safetensors")


def randomised_model(config, seed=0, model_class=MetaSegForSemanticSegmentation):
    """A model whose every bias, norm statistic and layer scale is non-trivial (the initialisation
    zeroes biases and leaves BatchNorm at the identity, which would hide a wrong fold)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    return model


def all_outputs(model, pixel_values):
    with torch.no_grad():
        outputs = model(pixel_values, output_hidden_states=True, output_attentions=True)
    return [outputs.logits, *outputs.hidden_states, *outputs.attentions]


def test_fused_float32_is_within_the_reference_tolerances(converted_dir, truth):
    model = MetaSegForSemanticSegmentation.from_pretrained(converted_dir).fuse()
    results = run_reference_batch(model, truth, torch.float32)
    for key in ["logits", *STAGE_KEYS, *ATTENTION_KEYS]:
        assert results[key].shape == truth[key].shape, key
        difference = (results[key].double() - truth[key]).abs()
        assert difference.max().item() <= 5e-4, key
        assert difference.mean().item() <= 5e-5, key
    assert abs(results["loss"].item() - truth["loss_mean_valid_pixels"].item()) <= 1e-5


def test_fused_float64_matches_the_reference_to_1e8(converted_dir, truth):
    model = MetaSegForSemanticSegmentation.from_pretrained(converted_dir).double().fuse()
    results = run_reference_batch(model, truth, torch.float64)
    for key in ["logits", *STAGE_KEYS, *ATTENTION_KEYS]:
        assert (results[key] - truth[key]).abs().max().item() <= 1e-8, key


CONFIGS = {
    "tiny": tiny_config(),
    "other-kernels-relu": tiny_config(
        attention_kernel_size=3, attention_strip_sizes=[3, 9], hidden_act="relu", mlp_ratios=[3, 2, 4, 1]
    ),
    "three-stages": tiny_config(
        hidden_sizes=[8, 16, 32], depths=[2, 1, 1], mlp_ratios=[2, 2, 2],
        decoder_num_attention_heads=[2, 4], decoder_pool_ratios=[4, 2],
    ),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_fused_equals_unfused_in_float64(name):
    model = randomised_model(CONFIGS[name]).double()
    pixel_values = torch.randn(2, 3, 61, 130, dtype=torch.float64)
    expected = all_outputs(model, pixel_values)
    fused = all_outputs(model.fuse(), pixel_values)
    assert len(fused) == len(expected)
    for got, want in zip(fused, expected):
        assert got.shape == want.shape
        assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("chunk_bytes", [0, 2048])
def test_mlp_channel_chunks_change_nothing(monkeypatch, chunk_bytes):
    model = randomised_model(tiny_config(mlp_ratios=[8, 8, 4, 4]))
    pixel_values = torch.randn(1, 3, 97, 64)
    expected = all_outputs(model, pixel_values)[0]
    monkeypatch.setattr(fusion_metaseg, "MLP_CHUNK_BYTES", chunk_bytes)
    assert len(fusion_metaseg.channel_chunks(pixel_values.new_empty(1, 8, 25, 16), 64)) == (4 if chunk_bytes else 1)
    assert torch.allclose(all_outputs(model.fuse(), pixel_values)[0], expected, rtol=1e-4, atol=1e-4)


def test_fused_backbone_gives_the_same_feature_maps():
    backbone = randomised_model(tiny_config(out_features=["stage2", "stage4"]), model_class=MetaSegBackbone).double()
    pixel_values = torch.randn(1, 3, 64, 80, dtype=torch.float64)
    with torch.no_grad():
        expected = backbone(pixel_values).feature_maps
        fused = backbone.fuse()(pixel_values).feature_maps
    for got, want in zip(fused, expected):
        assert (got - want).abs().max().item() <= 1e-10


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_runs_in_bfloat16(autocast):
    model = randomised_model(tiny_config())
    pixel_values = torch.randn(1, 3, 64, 72)
    expected = all_outputs(model, pixel_values)[0]
    if autocast:
        model.fuse()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = all_outputs(model, pixel_values)[0]
    else:
        logits = all_outputs(model.to(torch.bfloat16).fuse(), pixel_values.to(torch.bfloat16))[0]
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(logits).all()
    assert (logits.float() - expected).abs().max() < 0.1 * expected.abs().max()  # as the straight port's bound


def test_fuse_keeps_the_state_dict_and_reloading_gives_the_straight_port(tmp_path):
    model = randomised_model(tiny_config())
    pixel_values = torch.randn(1, 3, 64, 64)
    state = {key: value.clone() for key, value in model.state_dict().items()}
    before = all_outputs(model, pixel_values)

    model.fuse()
    assert model.is_fused and not model.training
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[key], value) for key, value in state.items())
    fused = all_outputs(model, pixel_values)

    model.save_pretrained(tmp_path)
    reloaded = MetaSegForSemanticSegmentation.from_pretrained(tmp_path)
    assert not reloaded.is_fused
    assert all(torch.allclose(got, want, atol=1e-4) for got, want in zip(all_outputs(reloaded, pixel_values), before))

    model.unfuse()
    assert not model.is_fused
    assert all(torch.equal(got, want) for got, want in zip(all_outputs(model, pixel_values), before))
    assert all(torch.allclose(got, want, rtol=1e-4, atol=1e-4) for got, want in zip(fused, before))


def test_a_fused_model_refuses_to_train_until_unfused():
    model = randomised_model(tiny_config()).fuse()
    with pytest.raises(RuntimeError, match=r"fused for inference.*unfuse\(\)"):
        model.train()
    assert not model.training
    model.eval()  # train(False) stays allowed
    for module in model.modules():  # around every guard: the folded modules still refuse a training-mode forward
        module.training = True
    with pytest.raises(RuntimeError, match=r"fused for inference.*cannot run in training mode"):
        model(torch.randn(1, 3, 64, 64))

    model.unfuse().train()
    labels = torch.randint(0, 5, (1, 64, 64))
    model(torch.randn(1, 3, 64, 64), labels=labels).loss.backward()
    assert all(parameter.grad is not None for parameter in model.parameters())


def test_torch_export_with_dynamic_height_and_width():
    model = randomised_model(tiny_config()).fuse()
    # Sides from 121 up: every pooled key/value map is at least 2x2 (a 1x1 map is a specialisation
    # torch.export cannot fold into the same program).
    height = torch.export.Dim("height", min=121, max=1024)
    width = torch.export.Dim("width", min=121, max=1024)
    program = torch.export.export(
        model, (), {"pixel_values": torch.randn(1, 3, 128, 160)}, dynamic_shapes={"pixel_values": {2: height, 3: width}}
    )
    exported = program.module()
    for size in [(121, 121), (130, 250), (257, 191)]:
        pixel_values = torch.randn(1, 3, *size)
        with torch.no_grad():
            expected = model(pixel_values).logits
            got = exported(pixel_values=pixel_values).logits
        assert got.shape == expected.shape
        assert torch.allclose(got, expected, atol=1e-5)


def test_dynamo_traces_the_fused_model_without_graph_breaks_for_any_size():
    model = randomised_model(tiny_config()).fuse()
    compiled = torch.compile(model, backend="eager", fullgraph=True, dynamic=True)
    for size in [(128, 160), (130, 250)]:
        pixel_values = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert torch.allclose(compiled(pixel_values).logits, model(pixel_values).logits, atol=1e-5)


@pytest.mark.parametrize("bias, affine", [(True, True), (False, False)], ids=["bias-affine", "plain"])
def test_batch_norm_fold_is_pytorchs(bias, affine):
    """FoldedConv.with_batch_norm is torch.nn.utils.fusion.fuse_conv_bn_weights in float64, cast to the weight's
    dtype, for convolutions with and without bias and BatchNorms with and without affine parameters."""
    torch.manual_seed(0)
    conv, norm = torch.nn.Conv2d(4, 6, 3, bias=bias), torch.nn.BatchNorm2d(6, affine=affine).eval()
    norm.running_mean.normal_(), norm.running_var.uniform_(0.5, 2)
    folded = fusion_metaseg.FoldedConv.with_batch_norm(conv, norm)
    weight, fused_bias = torch.nn.utils.fusion.fuse_conv_bn_weights(
        conv.weight.double(), None if conv.bias is None else conv.bias.double(), norm.running_mean.double(),
        norm.running_var.double(), norm.eps, None if norm.weight is None else norm.weight.double(),
        None if norm.bias is None else norm.bias.double(),
    )
    assert folded.weight.dtype == torch.float32 and torch.equal(folded.weight, weight.float())
    assert torch.equal(folded.bias, fused_bias.float())
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(folded.eval()(x), norm(conv(x)), rtol=1e-5, atol=1e-5)
    assert not list(folded.state_dict())  # non-persistent


def test_depthwise_implementation_is_a_validated_config_field():
    with pytest.raises(ValueError, match=r"depthwise_implementation = 'cudnn': must be one of \('library', 'stencil'"):
        tiny_config(depthwise_implementation="cudnn")
    model = randomised_model(tiny_config())
    pixel_values = torch.randn(1, 3, 64, 96)
    expected = all_outputs(model, pixel_values)
    model.config.depthwise_implementation = "stencil"  # read at each call, by the port and the fused model
    for outputs in (all_outputs(model, pixel_values), all_outputs(model.fuse(), pixel_values)):
        assert all(torch.allclose(got, want, rtol=1e-4, atol=1e-4) for got, want in zip(outputs, expected))


@pytest.mark.parametrize("fused", [False, True], ids=["port", "fused"])
def test_stencil_model_traces_whole_and_matches(fused):
    config = tiny_config(attention_kernel_size=3, attention_strip_sizes=[3, 7], depthwise_implementation="stencil")
    model = randomised_model(config)
    pixel_values = torch.randn(1, 3, 128, 160)
    expected = all_outputs(model, pixel_values)[0]
    counted = []
    original = ops_metaseg.stencil_depthwise_conv
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ops_metaseg, "stencil_depthwise_conv", lambda *a: counted.append(1) or original(*a))
        compiled = torch.compile(model.fuse() if fused else model, backend="eager", fullgraph=True)
        with torch.no_grad():
            logits = compiled(pixel_values).logits
    assert counted, "no depthwise convolution took the stencil form"
    assert torch.allclose(logits, expected, rtol=1e-4, atol=1e-4)
