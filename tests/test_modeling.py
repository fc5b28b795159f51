"""The model against the official reference outputs, and its behaviour on every kind of input."""

import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import ATTENTION_KEYS, STAGE_KEYS, run_reference_batch, tiny_config
from metaseg_hf import (
    MetaSegBackbone,
    MetaSegConfig,
    MetaSegForSemanticSegmentation,
    MetaSegModel,
    minimum_input_size,
    modeling_metaseg,
)


@pytest.fixture(scope="module")
def truth(reference):
    return load_file(reference / "metaseg-t-ade20k-batch-float64.safetensors")


def test_float64_matches_official_to_1e8(reference_model, truth):
    results = run_reference_batch(reference_model.to(torch.float64), truth, torch.float64)
    reference_model.float()
    for key in ["logits", *STAGE_KEYS, *ATTENTION_KEYS]:
        assert results[key].shape == truth[key].shape, key
        assert (results[key] - truth[key]).abs().max().item() <= 1e-8, key


def test_float32_within_reference_tolerances(reference, reference_model, truth):
    batch = load_file(reference / "metaseg-t-ade20k-batch.safetensors")
    assert torch.equal(batch["pixel_values"].double(), truth["pixel_values"])
    results = run_reference_batch(reference_model.to(torch.float32), batch, torch.float32)
    for key in ["logits", *STAGE_KEYS, *ATTENTION_KEYS]:
        difference = (results[key].double() - truth[key]).abs()
        assert difference.max().item() <= 5e-4, key
        assert difference.mean().item() <= 5e-5, key


@pytest.mark.parametrize(
    "average, key", [("valid_pixels", "loss_mean_valid_pixels"), ("all_pixels", "loss_mean_all_pixels")]
)
def test_loss_matches_both_official_conventions(reference, reference_model, truth, average, key):
    batch = load_file(reference / "metaseg-t-ade20k-batch.safetensors")
    reference_model.config.semantic_loss_average = average
    try:
        loss = run_reference_batch(reference_model.to(torch.float32), batch, torch.float32)["loss"]
    finally:
        reference_model.config.semantic_loss_average = "valid_pixels"
    assert loss.dtype == torch.float32
    assert abs(loss.item() - truth[key].item()) <= 1e-5


def test_loss_is_float32_under_bfloat16_autocast(tiny_model):
    pixel_values = torch.randn(1, 3, 64, 72)
    labels = torch.randint(0, 5, (1, 64, 72))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = tiny_model(pixel_values, labels=labels)
    assert outputs.logits.dtype == torch.bfloat16
    assert outputs.loss.dtype == torch.float32
    assert torch.isfinite(outputs.loss)


@pytest.mark.parametrize("height, width", [(57, 57), (61, 130), (250, 333), (97, 64)])
def test_any_accepted_size_gives_stride_8_logits(tiny_model, height, width):
    with torch.no_grad():
        outputs = tiny_model(torch.randn(1, 3, height, width), output_hidden_states=True)
    assert outputs.logits.shape == (1, 5, math.ceil(height / 8), math.ceil(width / 8))
    for stage, hidden in enumerate(outputs.hidden_states):
        stride = 2 ** (stage + 2)
        assert hidden.shape[-2:] == (math.ceil(height / stride), math.ceil(width / stride))


def test_minimum_input_size_is_57_and_smaller_inputs_are_refused(tiny_model):
    assert minimum_input_size(tiny_model.config) == 57
    with pytest.raises(ValueError, match=r"56x300 pixels is too small.*at least 57 pixels"):
        tiny_model(torch.randn(1, 3, 56, 300))


@pytest.mark.parametrize(
    "pixel_values, error, message",
    [
        (torch.randn(3, 64, 64), ValueError, r"shape \(batch, 3, height, width\).*pixel_values\[None\]"),
        (torch.randn(1, 4, 64, 64), ValueError, r"4 channels.*num_channels=3"),
        (torch.randn(0, 3, 64, 64), ValueError, r"empty batch"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.uint8), TypeError, r"floating-point.*MetaSegImageProcessor"),
    ],
)
def test_bad_pixel_values_are_refused_with_the_fix(tiny_model, pixel_values, error, message):
    with pytest.raises(error, match=message):
        tiny_model(pixel_values)


def test_labels_out_of_range_are_named(tiny_model):
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    labels[0, 0, :3] = torch.tensor([7, 255, -1])
    with pytest.raises(ValueError, match=r"outside \[0, 5\).*ignore index 255: -1, 7"):
        tiny_model(torch.randn(1, 3, 64, 64), labels=labels)


def test_the_input_is_checked_once_per_forward(tiny_model, monkeypatch):
    """One `isfinite` pass over pixel_values per forward (each is a host synchronisation on a GPU)."""
    calls = []
    isfinite = torch.isfinite
    monkeypatch.setattr(torch, "isfinite", lambda tensor: calls.append(tuple(tensor.shape)) or isfinite(tensor))
    tiny_model(torch.randn(1, 3, 64, 64), labels=torch.zeros(1, 64, 64, dtype=torch.long))
    assert calls == [(1, 3, 64, 64)]


def test_the_loss_compiles_as_one_graph_and_still_refuses_bad_labels(tiny_model):
    """The label check is an assertion on the device, not a data-dependent branch: `torch.compile(fullgraph=True)`
    traces the loss in one graph (no host synchronisation), and out-of-range labels still fail with the message."""
    logits = torch.randn(2, 5, 8, 8)
    labels = torch.randint(0, 5, (2, 64, 64))
    labels[:, :4] = 255
    compiled = torch.compile(tiny_model.semantic_segmentation_loss, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(logits, labels), tiny_model.semantic_segmentation_loss(logits, labels))
    labels[0, 10, 10] = 9
    with pytest.raises(RuntimeError, match=r"labels contain values outside \[0, 5\)"):
        compiled(logits, labels)
    training = torch.compile(tiny_model.train(), fullgraph=True, backend="eager")  # a whole training forward
    labels[0, 10, 10] = 1
    assert torch.isfinite(training(torch.randn(2, 3, 64, 64), labels=labels).loss)


def test_loss_matches_a_direct_computation_and_ignores_255(tiny_model):
    torch.manual_seed(1)
    pixel_values = torch.randn(2, 3, 64, 80)
    labels = torch.randint(0, 5, (2, 64, 80))
    labels[:, :10] = 255
    outputs = tiny_model(pixel_values, labels=labels)
    upsampled = torch.nn.functional.interpolate(outputs.logits, size=(64, 80), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(upsampled, labels, ignore_index=255)
    assert torch.allclose(outputs.loss, expected, atol=1e-6)


def test_single_label_uses_masked_binary_cross_entropy():
    model = MetaSegForSemanticSegmentation(tiny_config(num_labels=1)).eval()
    labels = torch.randint(0, 2, (1, 64, 64))
    labels[0, :8] = 255
    outputs = model(torch.randn(1, 3, 64, 64), labels=labels)
    upsampled = torch.nn.functional.interpolate(outputs.logits, size=(64, 64), mode="bilinear", align_corners=False)
    valid = labels != 255
    expected = torch.nn.functional.binary_cross_entropy_with_logits(upsampled[:, 0][valid], labels[valid].float())
    assert torch.allclose(outputs.loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"outside \[0, 2\)"):
        model(torch.randn(1, 3, 64, 64), labels=torch.full((1, 64, 64), 3))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_and_inputs_run(tiny_model, dtype):
    reference = tiny_model(torch.ones(1, 3, 64, 64)).logits
    model = tiny_model.to(dtype)
    logits = model(torch.ones(1, 3, 64, 64, dtype=dtype)).logits
    assert logits.dtype == dtype
    assert torch.isfinite(logits).all()
    assert (logits.float() - reference).abs().max() < 0.1 * reference.abs().max()


def test_return_dict_false_gives_a_tuple(tiny_model):
    labels = torch.zeros(1, 64, 64, dtype=torch.long)
    loss, logits, hidden_states, attentions = tiny_model(
        torch.randn(1, 3, 64, 64), labels=labels, output_hidden_states=True, output_attentions=True, return_dict=False
    )
    assert loss.ndim == 0 and logits.shape == (1, 5, 8, 8)
    assert len(hidden_states) == 4 and len(attentions) == 3


def test_output_settings_follow_the_config_as_in_transformers():
    """`output_hidden_states` / `output_attentions` / `return_dict` default to the config's values in all
    three models; without them only the logits (feature maps, last stage) come back."""
    torch.manual_seed(0)
    pixel_values = torch.randn(1, 3, 64, 64)
    plain = MetaSegForSemanticSegmentation(tiny_config()).eval()
    outputs = plain(pixel_values)
    assert outputs.hidden_states is None and outputs.attentions is None
    assert len(plain(pixel_values, return_dict=False)) == 1
    verbose = tiny_config(output_hidden_states=True, output_attentions=True, return_dict=False)
    segmentation = MetaSegForSemanticSegmentation(verbose).eval()
    segmentation.load_state_dict(plain.state_dict())
    logits, hidden_states, attentions = segmentation(pixel_values)
    assert torch.equal(logits, outputs.logits)
    assert [h.shape[1] for h in hidden_states] == [8, 16, 16, 32] and len(attentions) == 3
    last_hidden_state, encoder_hidden_states = MetaSegModel(verbose)(pixel_values)
    assert last_hidden_state.shape == (1, 32, 2, 2) and len(encoder_hidden_states) == 4
    feature_maps, backbone_hidden_states = MetaSegBackbone(verbose)(pixel_values)
    assert [f.shape[1] for f in feature_maps] == [32] and len(backbone_hidden_states) == 4  # default: last stage
    assert MetaSegBackbone(tiny_config(out_features=["stage2"]))(pixel_values, return_dict=False)[0][0].shape[1] == 16


def test_gradient_checkpointing_in_train_mode_gives_the_same_step():
    """A training step with gradient checkpointing equals one without, BatchNorm in train mode: the same
    gradients, and every running statistic updated once (a recomputed BatchNorm would update it twice)."""
    config = tiny_config(drop_path_rate=0.0, decoder_drop_path_rate=0.0, decoder_hidden_dropout_prob=0.0,
                         classifier_dropout_prob=0.0)
    torch.manual_seed(0)
    plain = MetaSegForSemanticSegmentation(config).train()
    checkpointed = MetaSegForSemanticSegmentation(config).train()
    checkpointed.load_state_dict(plain.state_dict())
    checkpointed.activation_checkpointing_enable()
    layers = [module for module in checkpointed.modules() if getattr(module, "gradient_checkpointing", False)]
    assert layers and not any(isinstance(m, torch.nn.BatchNorm2d) for layer in layers for m in layer.modules())
    pixel_values, labels = torch.randn(2, 3, 64, 64), torch.randint(0, 5, (2, 64, 64))
    for model in (plain, checkpointed):
        model(pixel_values, labels=labels).loss.backward()
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    for (name, parameter), other in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(other.grad, parameter.grad, rtol=0, atol=1e-6, msg=name)
    for (name, buffer), other in zip(plain.named_buffers(), checkpointed.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert buffer.item() == other.item() == 1, name
        torch.testing.assert_close(other, buffer, rtol=0, atol=1e-6, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(checkpointed.eval()(pixel_values).logits, plain.eval()(pixel_values).logits,
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("fused", [False, True], ids=["port", "fused"])
def test_channel_reduction_attention_as_sdpa_equals_the_explicit_softmax(tiny_model, monkeypatch, fused):
    """Where the attention maps are not asked for on an accelerator, CRA is `F.scaled_dot_product_attention`
    (forced here on CPU): the same logits as the explicit path, and no attention maps are made."""
    model = tiny_model.double()
    model = model.fuse() if fused else model
    pixel_values = torch.randn(2, 3, 64, 72, dtype=torch.float64)
    with torch.no_grad():
        explicit = model(pixel_values, output_attentions=True)
        monkeypatch.setattr(modeling_metaseg, "use_attention_kernel", lambda query, output_attentions: not output_attentions)
        kernel = model(pixel_values)
        again = model(pixel_values, output_attentions=True)
    assert kernel.attentions is None and len(again.attentions) == 3
    torch.testing.assert_close(kernel.logits, explicit.logits, rtol=0, atol=1e-12)
    assert torch.equal(again.logits, explicit.logits)


@pytest.mark.parametrize("fused", [False, True], ids=["port", "fused"])
def test_forward_hooks_see_the_same_outputs_with_and_without_autograd(tiny_model, fused):
    """Feature extraction with hooks under `torch.no_grad()`: no module's output is changed in place
    after its hooks ran (an in-place gate or sum would differ between the two modes)."""
    model = tiny_model.fuse() if fused else tiny_model
    pixel_values = torch.randn(1, 3, 64, 72)
    recorded = {}

    def record(name):
        return lambda module, inputs, output: recorded.setdefault(name, []).append(
            output.detach() if isinstance(output, torch.Tensor) else None  # kept by reference, as users do
        )

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    with torch.no_grad():
        model(pixel_values)
    with torch.enable_grad():
        model(pixel_values)
    for handle in handles:
        handle.remove()
    assert len(recorded) > 40
    for name, outputs in recorded.items():  # some modules (drop path, dropout) run more than once per forward
        half = len(outputs) // 2
        for without_grad, with_grad in zip(outputs[:half], outputs[half:], strict=True):
            assert (without_grad is None) == (with_grad is None), name
            assert without_grad is None or torch.equal(without_grad, with_grad), name


def test_initialisation_follows_the_official_scheme():
    torch.manual_seed(0)
    model = MetaSegForSemanticSegmentation(MetaSegConfig.from_preset("metaseg-t-ade20k"))
    block = model.metaseg.encoder.stages[0].blocks[0]
    assert torch.all(block.layer_scale_1 == 0.01) and torch.all(block.layer_scale_2 == 0.01)
    fc1 = block.mlp.fc1.weight  # 1x1 conv 32 -> 256: std sqrt(2 / 256)
    assert abs(fc1.std().item() - math.sqrt(2 / 256)) < 0.1 * math.sqrt(2 / 256)
    assert torch.all(block.mlp.fc1.bias == 0)
    # timm's trunc_normal_(std=0.02) as the official code: truncated at +-2 absolute, so plain N(0, 0.02^2).
    value = model.decode_head.global_meta_blocks[2].attention.value.weight
    assert abs(value.std().item() - 0.02) < 0.002 and abs(value.mean().item()) < 0.002
    assert torch.all(model.decode_head.batch_norm.weight == 1) and torch.all(block.norm1.running_var == 1)
    # The classifier keeps PyTorch's default init, as the official linear_pred: U(+-1/sqrt(fan_in)).
    classifier = model.decode_head.classifier.weight
    assert classifier.abs().max() <= 1 / math.sqrt(128) and classifier.std() > 0.5 / math.sqrt(3 * 128)
    norm = model.decode_head.global_meta_blocks[0].layernorm_before
    assert torch.all(norm.weight == 1) and torch.all(norm.bias == 0)


def test_stochastic_depth_increases_linearly_over_the_encoder():
    model = MetaSegModel(MetaSegConfig(drop_path_rate=0.3, depths=[1, 1, 1, 1]))
    rates = [stage.blocks[0].drop_path.drop_prob for stage in model.encoder.stages]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])


def test_base_model_returns_all_stages(tiny_model):
    encoder = MetaSegModel(tiny_model.config)
    encoder.load_state_dict(tiny_model.metaseg.state_dict())
    encoder.eval()
    pixel_values = torch.randn(1, 3, 64, 96)
    outputs = encoder(pixel_values, output_hidden_states=True)
    full = tiny_model(pixel_values, output_hidden_states=True)
    assert torch.equal(outputs.last_hidden_state, full.hidden_states[-1])
    assert all(torch.equal(a, b) for a, b in zip(outputs.hidden_states, full.hidden_states, strict=True))
    # The bare encoder has no decoder and therefore no minimum size.
    assert encoder(torch.randn(1, 3, 16, 16)).last_hidden_state.shape == (1, 32, 1, 1)


def test_backbone_returns_the_requested_stages():
    config = tiny_config(out_features=["stage2", "stage4"])
    backbone = MetaSegBackbone(config).eval()
    outputs = backbone(torch.randn(1, 3, 64, 64))
    assert [feature.shape[1] for feature in outputs.feature_maps] == [16, 32]
    assert backbone.channels == [16, 32]
    assert outputs.hidden_states is None
    config = tiny_config(out_indices=[0, 1, 2, 3])
    assert MetaSegBackbone(config).out_features == ["stage1", "stage2", "stage3", "stage4"]
