"""Inference-only twins of the MetaSeg modules, for `MetaSegPreTrainedModel.fuse()`.

The pattern of timm's FastViT / RepViT `reparameterize()`: each train-time module keeps its
parameters (the state dict and the saved format never change) and gains a deploy-time twin whose
weights are folded from them, held as non-persistent buffers. What is folded, and why it is exact
in real arithmetic (float32 results move by rounding only):

- Eval-mode BatchNorm is a per-channel affine map `s * x + t`. Before a convolution it folds into
  that convolution's weight (`W * s` over input channels) and bias (`W @ t + b`); after one, into
  its output channels (stem, patch embeddings, decoder `linear_fuse`).
- MSCAN block, attention half: `norm1(x)` feeds `proj_in` (folded) and is also the shortcut, so
  `x + ls1 * (proj_out(g) + s1 * x + t1)` becomes `(1 + ls1 * s1) * x + proj_out'(g)` where
  `proj_out'` has `ls1` folded into its rows and `ls1 * t1` into its bias: one `addcmul`.
- MSCAN block, MLP half: `norm2` folds into `fc1`, `layer_scale_2` into `fc2`.
- Decoder: `linear_fuse` on the concatenation of upsampled maps is the sum of its column blocks
  applied to each map; a 1x1 convolution commutes with bilinear resizing (its weights sum to 1),
  so each block is applied at the map's own, lower resolution and the narrow result is resized.
- Channel Reduction Attention: the softmax scale is folded into the query weight; the logits
  `q k^T` (one scalar per head each) are a broadcast product instead of a matmul with inner size 1.
- On CPU every map is kept `channels_last`, so 1x1 convolutions are GEMMs over contiguous channels,
  the depthwise strips take oneDNN's fast NHWC path (the 1x21 strip is ~30x faster than in NCHW),
  and token <-> map changes in the decoder are views, not copies. On GPUs maps stay NCHW (cuDNN in
  bf16 ran MetaSeg-T 20-25% slower in channels_last on an H200).

The depthwise strip pairs are kept separable: merged into one depthwise 21x21 kernel (the sum of
the outer products plus the identity, exact but for the strip biases at the borders) they cost 2-3x
more on CPU even in NHWC.

Folding is computed in float64 from the parameters and cast to their dtype. A fused model is for
inference only: its twins refuse training-mode calls, and `unfuse()` (or reloading) restores the
train-time path.
"""

import torch
from torch import nn
from torch.nn import functional as F

from .ops_metaseg import depthwise_conv2d, msca_spatial


def _batch_norm_affine(batch_norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as `scale * x + shift`, both (C,), in float64."""
    scale = batch_norm.weight.double() / torch.sqrt(batch_norm.running_var.double() + batch_norm.eps)
    shift = batch_norm.bias.double() - batch_norm.running_mean.double() * scale
    return scale, shift


def _conv_then_batch_norm(conv: nn.Conv2d, batch_norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """BN(conv(x)) as one convolution: weight (O, I, k, k) and bias (O,), float64."""
    scale, shift = _batch_norm_affine(batch_norm)
    weight = conv.weight.double() * scale[:, None, None, None]
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    return weight, bias


def _matrix(conv: nn.Conv2d) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1x1 convolution's weight as a (O, I) matrix and its bias, float64."""
    bias = None if conv.bias is None else conv.bias.double()
    return conv.weight.double()[:, :, 0, 0], bias


def _as_1x1(matrix: torch.Tensor) -> torch.Tensor:
    """(O, I) -> (O, I, 1, 1) convolution weight."""
    return matrix[:, :, None, None]


def _preferred_layout(hidden_states: torch.Tensor) -> torch.Tensor:
    """The map in the memory format its device runs fastest: channels_last on CPU (oneDNN's NHWC
    depthwise and 1x1 kernels), NCHW elsewhere (measured on an H200, bf16: channels_last made
    MetaSeg-T 20-25% slower there) and for float64 (no oneDNN kernels). Later layers keep the
    format they are given."""
    if hidden_states.device.type != "cpu" or hidden_states.dtype == torch.float64:
        return hidden_states.contiguous()
    return hidden_states.contiguous(memory_format=torch.channels_last)


def _on_map(activation: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    """An element-wise activation of a (B, C, H, W) map, applied through its (B, H, W, C) view: for a
    channels_last map that view is contiguous, and PyTorch's CPU GELU runs ~1.8x faster on it than on
    the channels_last tensor itself (same values)."""
    return activation(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _pointwise_conv(hidden_states: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """1x1 convolution of a (B, C, H, W) map with an (O, C, 1, 1) weight. A convolution
    rather than `F.linear` on the NHWC view: as fast on CPU (oneDNN), and cuDNN's choice on GPU."""
    return F.conv2d(hidden_states, weight, bias)


# CPU only: the MLP's wide hidden map is computed in channel chunks of about this many bytes, so that
# fc1 -> depthwise 3x3 -> GELU -> fc2 run on data still in the last-level cache (the depthwise conv
# and GELU are memory-bound; stage 1 of MetaSeg-T has a 16 MiB hidden map at 512x512).
MLP_CHUNK_BYTES = 4 * 2**20


def _channel_chunks(hidden_states: torch.Tensor, hidden_channels: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] splitting the MLP's hidden channels (one chunk on GPU and when traced)."""
    if (
        hidden_states.device.type != "cpu"
        or hidden_states.dtype == torch.float64
        or torch.compiler.is_compiling()
        or not MLP_CHUNK_BYTES
    ):
        return [(0, hidden_channels)]
    batch_size, _, height, width = hidden_states.shape
    total = batch_size * height * width * hidden_channels * hidden_states.element_size()
    count = max(1, min(hidden_channels // 16, round(total / MLP_CHUNK_BYTES)))
    step = -(-hidden_channels // count)
    return [(start, min(start + step, hidden_channels)) for start in range(0, hidden_channels, step)]


class _FusedModule(nn.Module):
    """Base of the twins: float64 folds stored as non-persistent buffers in the source dtype."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self._dtype = dtype

    def _store(self, name: str, value: torch.Tensor | None) -> None:
        if value is not None:
            value = value.detach().to(self._dtype).contiguous()
        self.register_buffer(name, value, persistent=False)

    def _check_inference(self) -> None:
        if self.training:
            raise RuntimeError(
                "This MetaSeg model is fused for inference (model.fuse()): it cannot run in training mode. "
                "Call model.unfuse() (or reload it with from_pretrained) before training."
            )


class FusedConvBatchNorm(_FusedModule):
    """Conv + BatchNorm (+ activation) as one convolution. (B, C_in, H, W) -> (B, C_out, H', W') in the
    device's preferred memory format."""

    def __init__(self, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, activation: nn.Module | None = None):
        super().__init__(conv.weight.dtype)
        weight, bias = _conv_then_batch_norm(conv, batch_norm)
        self._store("weight", weight)
        self._store("bias", bias)
        self.stride, self.padding = conv.stride, conv.padding
        self.activation = activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = F.conv2d(_preferred_layout(hidden_states), self.weight, self.bias, self.stride, self.padding)
        return hidden_states if self.activation is None else _on_map(self.activation, hidden_states)


class FusedMscanBlock(_FusedModule):
    """Deploy twin of `MetaSegMscanBlock`: BatchNorms and layer scales folded into the 1x1 convs.

    (B, C, H, W) -> (B, C, H, W), in the memory format it is given.
    """

    def __init__(self, block: nn.Module):
        super().__init__(block.layer_scale_1.dtype)
        attention, mlp = block.attention, block.mlp
        msca = attention.multi_scale_attention
        layer_scale_1, layer_scale_2 = block.layer_scale_1.double(), block.layer_scale_2.double()

        scale_1, shift_1 = _batch_norm_affine(block.norm1)
        weight, bias = _matrix(attention.proj_in)
        self._store("proj_in_weight", _as_1x1(weight * scale_1))
        self._store("proj_in_bias", bias + weight @ shift_1)
        self.config = msca.config  # depthwise_implementation, read at each call as in the straight port
        self._store("local_weight", msca.local_conv.weight.double())
        self._store("local_bias", msca.local_conv.bias.double())
        self.num_strips = len(msca.horizontal_strips)
        for index, (horizontal, vertical) in enumerate(zip(msca.horizontal_strips, msca.vertical_strips)):
            self._store(f"horizontal_{index}_weight", horizontal.weight.double())
            self._store(f"horizontal_{index}_bias", horizontal.bias.double())
            self._store(f"vertical_{index}_weight", vertical.weight.double())
            self._store(f"vertical_{index}_bias", vertical.bias.double())
        weight, bias = _matrix(msca.channel_mixer)
        self._store("mixer_weight", _as_1x1(weight))
        self._store("mixer_bias", bias)
        # x + ls1 * (proj_out(g) + s1 * x + t1) = (1 + ls1 * s1) * x + [ls1 * proj_out](g) + ls1 * t1
        weight, bias = _matrix(attention.proj_out)
        self._store("proj_out_weight", _as_1x1(weight * layer_scale_1[:, None]))
        self._store("proj_out_bias", layer_scale_1 * (bias + shift_1))
        self._store("shortcut_scale", (layer_scale_1 * scale_1)[:, None, None])
        self._store("residual_scale", (1 + layer_scale_1 * scale_1)[:, None, None])

        scale_2, shift_2 = _batch_norm_affine(block.norm2)
        weight, bias = _matrix(mlp.fc1)
        self._store("fc1_weight", _as_1x1(weight * scale_2))
        self._store("fc1_bias", bias + weight @ shift_2)
        self._store("depthwise_weight", mlp.depthwise_conv.weight.double())
        self._store("depthwise_bias", mlp.depthwise_conv.bias.double())
        self.depthwise_padding = mlp.depthwise_conv.padding
        weight, bias = _matrix(mlp.fc2)
        self._store("fc2_weight", _as_1x1(weight * layer_scale_2[:, None]))
        self._store("fc2_bias", bias * layer_scale_2)
        self.attention_activation = attention.activation
        self.mlp_activation = mlp.activation

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        gate = _on_map(self.attention_activation, _pointwise_conv(hidden_states, self.proj_in_weight, self.proj_in_bias))
        strips = range(self.num_strips)
        multi_scale = msca_spatial(
            gate,
            self.local_weight,
            self.local_bias,
            [getattr(self, f"horizontal_{index}_weight") for index in strips],
            [getattr(self, f"horizontal_{index}_bias") for index in strips],
            [getattr(self, f"vertical_{index}_weight") for index in strips],
            [getattr(self, f"vertical_{index}_bias") for index in strips],
            self.config.depthwise_implementation,
        )
        attended = _pointwise_conv(multi_scale, self.mixer_weight, self.mixer_bias).mul_(gate)
        attended = _pointwise_conv(attended, self.proj_out_weight, self.proj_out_bias)
        if hidden_states.dtype in (torch.float32, torch.float64):
            hidden_states = torch.addcmul(attended, hidden_states, self.residual_scale)
        else:  # 1 + ls1 * s1 is not representable in half precision: add the small term on its own
            hidden_states = torch.addcmul(attended, hidden_states, self.shortcut_scale).add_(hidden_states)

        transformed = None
        for start, stop in _channel_chunks(hidden_states, self.fc1_weight.shape[0]):
            part = _pointwise_conv(hidden_states, self.fc1_weight[start:stop], self.fc1_bias[start:stop])
            part = depthwise_conv2d(
                part,
                self.depthwise_weight[start:stop],
                self.depthwise_bias[start:stop],
                self.depthwise_padding,
                self.config.depthwise_implementation,
            )
            part = _on_map(self.mlp_activation, part)
            if transformed is None:
                transformed = _pointwise_conv(part, self.fc2_weight[:, start:stop], self.fc2_bias)
            else:
                transformed.add_(_pointwise_conv(part, self.fc2_weight[:, start:stop], None))
        return hidden_states + transformed


class FusedMscanStage(_FusedModule):
    """Deploy twin of `MetaSegStage`: folded patch embedding, fused blocks, LayerNorm on the
    NHWC view without copies. (B, C_in, H, W) -> (B, C, H', W'), channels_last on CPU."""

    def __init__(self, stage: nn.Module):
        super().__init__(stage.layer_norm.weight.dtype)
        embeddings = stage.patch_embeddings
        if hasattr(embeddings, "conv1"):  # the stage-1 stem
            self.patch_embeddings = nn.Sequential(
                FusedConvBatchNorm(embeddings.conv1, embeddings.norm1, embeddings.activation),
                FusedConvBatchNorm(embeddings.conv2, embeddings.norm2),
            )
        else:
            self.patch_embeddings = FusedConvBatchNorm(embeddings.proj, embeddings.norm)
        self.blocks = nn.ModuleList(FusedMscanBlock(block) for block in stage.blocks)
        self._store("layer_norm_weight", stage.layer_norm.weight)
        self._store("layer_norm_bias", stage.layer_norm.bias)
        self.layer_norm_eps = stage.layer_norm.eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._check_inference()
        hidden_states = self.patch_embeddings(hidden_states)
        for block in self.blocks:
            hidden_states = block(hidden_states)
        hidden_states = F.layer_norm(
            hidden_states.permute(0, 2, 3, 1),
            (hidden_states.shape[1],),
            self.layer_norm_weight,
            self.layer_norm_bias,
            self.layer_norm_eps,
        )
        return hidden_states.permute(0, 3, 1, 2)


class FusedGlobalMetaBlock(_FusedModule):
    """Deploy twin of `MetaSegGlobalMetaBlock`, entirely on (B, N, C) tokens (the MLP's 1x1 convs are
    linears). (B, C, H, W) map -> ((B, N, C) tokens, (B, heads, N, M) attention)."""

    def __init__(self, block: nn.Module):
        super().__init__(block.layernorm_before.weight.dtype)
        attention = block.attention
        self.num_heads, self.head_dim, self.pool_ratio = attention.num_heads, attention.head_dim, attention.pool_ratio
        self.layer_norm_eps = (block.layernorm_before.eps, attention.layer_norm.eps, block.layernorm_after.eps)
        self._store("layernorm_before_weight", block.layernorm_before.weight)
        self._store("layernorm_before_bias", block.layernorm_before.bias)
        self._store("query_weight", attention.query.weight.double() * attention.scale)
        reduction_weight, reduction_bias = _matrix(attention.reduction)
        self._store("reduction_weight", reduction_weight)
        self._store("reduction_bias", reduction_bias)
        self._store("reduction_norm_weight", attention.layer_norm.weight)
        self._store("reduction_norm_bias", attention.layer_norm.bias)
        self._store("key_weight", attention.key.weight)
        self._store("value_weight", attention.value.weight)
        self._store("proj_weight", attention.proj.weight)
        self._store("proj_bias", attention.proj.bias)
        self._store("layernorm_after_weight", block.layernorm_after.weight)
        self._store("layernorm_after_bias", block.layernorm_after.bias)
        fc1_weight, fc1_bias = _matrix(block.mlp.fc1)
        fc2_weight, fc2_bias = _matrix(block.mlp.fc2)
        self._store("fc1_weight", fc1_weight)
        self._store("fc1_bias", fc1_bias)
        self._store("fc2_weight", fc2_weight)
        self._store("fc2_bias", fc2_bias)
        self.attention_activation = attention.activation
        self.mlp_activation = block.mlp.activation

    def forward(self, feature_map: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size, channels, height, width = feature_map.shape
        eps_before, eps_reduction, eps_after = self.layer_norm_eps
        tokens = feature_map.permute(0, 2, 3, 1).reshape(batch_size, height * width, channels)  # a view if channels_last
        normed = F.layer_norm(tokens, (channels,), self.layernorm_before_weight, self.layernorm_before_bias, eps_before)

        query = F.linear(normed, self.query_weight).transpose(1, 2).unsqueeze(-1)  # (B, heads, N, 1), scaled
        pooled = F.avg_pool2d(normed.view(batch_size, height, width, channels).permute(0, 3, 1, 2), self.pool_ratio)
        pooled = F.linear(pooled.permute(0, 2, 3, 1).flatten(1, 2), self.reduction_weight, self.reduction_bias)
        pooled = F.layer_norm(pooled, (channels,), self.reduction_norm_weight, self.reduction_norm_bias, eps_reduction)
        pooled = self.attention_activation(pooled)  # (B, M, C)
        key = F.linear(pooled, self.key_weight).transpose(1, 2).unsqueeze(-2)  # (B, heads, 1, M)
        value = F.linear(pooled, self.value_weight).view(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        attention = (query * key).softmax(dim=-1)  # rank-1 logits: a broadcast product, (B, heads, N, M)
        context = (attention @ value).transpose(1, 2).reshape(batch_size, height * width, channels)
        tokens = tokens + F.linear(context, self.proj_weight, self.proj_bias)

        normed = F.layer_norm(tokens, (channels,), self.layernorm_after_weight, self.layernorm_after_bias, eps_after)
        transformed = self.mlp_activation(F.linear(normed, self.fc1_weight, self.fc1_bias))
        return tokens + F.linear(transformed, self.fc2_weight, self.fc2_bias), attention


class FusedDecodeHead(_FusedModule):
    """Deploy twin of `MetaSegDecodeHead`: `linear_fuse` + BatchNorm folded and split per input
    stage, each part applied before the resize to stage 2's size.

    Encoder maps -> logits (B, num_labels, ceil(H/8), ceil(W/8)) and the attention maps.
    """

    def __init__(self, head: nn.Module):
        super().__init__(head.classifier.weight.dtype)
        self.global_meta_blocks = nn.ModuleList(FusedGlobalMetaBlock(block) for block in head.global_meta_blocks)
        weight, bias = _conv_then_batch_norm(head.linear_fuse, head.batch_norm)
        widths = [block.attention.value.weight.shape[0] for block in head.global_meta_blocks]
        # The original concatenates the maps last stage first: column blocks in reversed stage order.
        blocks = torch.split(weight[:, :, 0, 0], widths[::-1], dim=1)[::-1]
        for index, block in enumerate(blocks):
            self._store(f"fuse_{index}_weight", block)
        self._store("fuse_bias", bias)
        classifier_weight, classifier_bias = _matrix(head.classifier)
        self._store("classifier_weight", _as_1x1(classifier_weight))
        self._store("classifier_bias", classifier_bias)
        self.activation = head.activation

    def forward(self, encoder_hidden_states: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check_inference()
        decoder_inputs = encoder_hidden_states[1:]
        batch_size, _, target_height, target_width = decoder_inputs[0].shape
        fused, attentions = None, ()
        for index, (block, feature_map) in enumerate(zip(self.global_meta_blocks, decoder_inputs)):
            height, width = feature_map.shape[-2:]
            tokens, attention = block(feature_map)
            attentions += (attention,)
            bias = self.fuse_bias if index == 0 else None
            projected = F.linear(tokens, getattr(self, f"fuse_{index}_weight"), bias)
            projected = projected.view(batch_size, height, width, -1).permute(0, 3, 1, 2)
            if index == 0:
                fused = projected
            else:  # always resized: a same-size bilinear resize is the identity, and no shape test to trace
                fused = fused.add_(
                    F.interpolate(projected, size=(target_height, target_width), mode="bilinear", align_corners=False)
                )
        hidden_states = _on_map(self.activation, fused)
        logits = _pointwise_conv(hidden_states, self.classifier_weight, self.classifier_bias)
        return logits.contiguous(), attentions  # NCHW, as the straight port's: cheap, and what resizes expect
