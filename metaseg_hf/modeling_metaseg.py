"""PyTorch MetaSeg: the MSCAN encoder and the MetaSeg decoder (Global Meta Blocks with Channel Reduction Attention).

Reads top to bottom as the paper's diagram: stem / patch embeddings -> multi-scale convolutional
attention -> MSCAN block -> stage -> encoder; Channel Reduction Attention -> Global Meta Block ->
decode head -> task models.

`model.fuse()` switches a model to its inference-only deploy form: the modules that own a `fuse()`
(MSCAN stage, for its patch embedding and blocks; Channel Reduction Attention; decode head) fold their
BatchNorms and layer scales into the neighbouring convolutions (`fusion_metaseg` has the arithmetic) and
run the same forward on the folded weights; `model.unfuse()` or reloading restores the straight port.
"""

import math

import torch
from torch import nn
from torch.nn import functional as F
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BackboneOutput, BaseModelOutputWithNoAttention, SemanticSegmenterOutput
from transformers.modeling_utils import PreTrainedModel
from transformers.processing_utils import Unpack
from transformers.utils import TransformersKwargs, logging
from transformers.utils.generic import can_return_tuple

from .configuration_metaseg import MetaSegConfig
from .fusion_metaseg import (
    FoldedConv,
    FoldedLinear,
    batch_norm_affine,
    channel_chunks,
    check_inference,
    matrix,
    preferred_layout,
    residual_stream_scales,
)
from .inference_metaseg import SegmentationPrediction, predict
from .ops_metaseg import activation_on_map, depthwise_conv2d, depthwise_conv2d_gelu, msca_spatial

logger = logging.get_logger(__name__)


def drop_path(hidden_states: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: drops whole residual branches per sample, rescaling the kept ones."""
    if drop_prob == 0.0 or not training:
        return hidden_states
    keep_prob = 1 - drop_prob
    shape = (hidden_states.shape[0],) + (1,) * (hidden_states.ndim - 1)
    random_tensor = torch.rand(shape, dtype=hidden_states.dtype, device=hidden_states.device)
    random_tensor = torch.floor(random_tensor + keep_prob)
    return hidden_states.div(keep_prob) * random_tensor


class MetaSegDropPath(nn.Module):
    """Stochastic depth (identity in eval mode or when `drop_prob` is 0)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return drop_path(hidden_states, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"p={self.drop_prob}"


# ---------------------------------------------------------------------------------------------------
# MSCAN encoder
# ---------------------------------------------------------------------------------------------------


class MetaSegStem(nn.Module):
    """Stage-1 patch embedding: two 3x3 stride-2 convolutions with BatchNorm, GELU between.

    (B, num_channels, H, W) -> (B, hidden_sizes[0], ceil(H/4), ceil(W/4)).
    """

    def __init__(self, config: MetaSegConfig, out_channels: int):
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = nn.Conv2d(config.num_channels, mid_channels, kernel_size=3, stride=2, padding=1)
        self.norm1 = nn.BatchNorm2d(mid_channels, eps=config.batch_norm_eps)
        self.activation = ACT2FN[config.hidden_act]
        self.conv2 = nn.Conv2d(mid_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm2 = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps)
        self.folded = None  # set by `fuse()`

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return self.folded(preferred_layout(pixel_values))
        hidden_states = self.activation(self.norm1(self.conv1(pixel_values)))
        return self.norm2(self.conv2(hidden_states))

    def fold(self, output_scale: torch.Tensor) -> None:
        """Each convolution and its BatchNorm as one convolution, the output multiplied by `output_scale` (C,),
        float64 (`MetaSegStage.fuse`)."""
        self.folded = nn.Sequential(
            FoldedConv.with_batch_norm(self.conv1, self.norm1, self.activation),
            FoldedConv.with_batch_norm(self.conv2, self.norm2, output_scale=output_scale),
        )


class MetaSegOverlapPatchEmbeddings(nn.Module):
    """Stage 2-4 downsampling: 3x3 stride-2 convolution and BatchNorm. (B, C_in, H, W) -> (B, C, ceil(H/2), ceil(W/2))."""

    def __init__(self, config: MetaSegConfig, in_channels: int, out_channels: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, eps=config.batch_norm_eps)
        self.folded = None  # set by `fuse()`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.folded is not None:
            return self.folded(preferred_layout(hidden_states))
        return self.norm(self.proj(hidden_states))

    def fold(self, output_scale: torch.Tensor) -> None:
        """The convolution and its BatchNorm as one convolution, the output multiplied by `output_scale` (C,),
        float64 (`MetaSegStage.fuse`)."""
        self.folded = FoldedConv.with_batch_norm(self.proj, self.norm, output_scale=output_scale)


class MetaSegDepthwiseConv(nn.Conv2d):
    """Depthwise convolution (one filter per channel, stride 1): `nn.Conv2d` with `groups = channels`,
    the same parameters and results, run by `ops_metaseg.depthwise_conv2d` as
    `config.depthwise_implementation` says (read at each call). (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, config: MetaSegConfig, channels: int, kernel_size, padding):
        super().__init__(channels, channels, kernel_size, padding=padding, groups=channels)
        self.config = config

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return depthwise_conv2d(
            hidden_states, self.weight, self.bias, self.padding, self.config.depthwise_implementation
        )


class MetaSegMultiScaleConvAttention(nn.Module):
    """Multi-scale convolutional attention (MSCA).

    A depthwise k x k convolution, then depthwise strip pairs (1 x s then s x 1, for each strip size)
    on its output, summed with it, mixed by a 1x1 convolution and used as a multiplicative gate on the
    input. (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, config: MetaSegConfig, channels: int):
        super().__init__()
        self.config = config
        kernel = config.attention_kernel_size
        self.local_conv = MetaSegDepthwiseConv(config, channels, kernel, padding=kernel // 2)
        self.horizontal_strips = nn.ModuleList(
            MetaSegDepthwiseConv(config, channels, (1, size), padding=(0, size // 2))
            for size in config.attention_strip_sizes
        )
        self.vertical_strips = nn.ModuleList(
            MetaSegDepthwiseConv(config, channels, (size, 1), padding=(size // 2, 0))
            for size in config.attention_strip_sizes
        )
        self.channel_mixer = nn.Conv2d(channels, channels, 1)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The local conv and strip pairs summed: one fused kernel with `depthwise_implementation="triton"`.
        multi_scale = msca_spatial(
            hidden_states,
            self.local_conv.weight,
            self.local_conv.bias,
            [strip.weight for strip in self.horizontal_strips],
            [strip.bias for strip in self.horizontal_strips],
            [strip.weight for strip in self.vertical_strips],
            [strip.bias for strip in self.vertical_strips],
            self.config.depthwise_implementation,
        )
        return self.channel_mixer(multi_scale) * hidden_states


class MetaSegSpatialAttention(GradientCheckpointingLayer):
    """The attention half of an MSCAN block: 1x1 conv, GELU, MSCA gate, 1x1 conv, plus its input.

    (B, C, H, W) -> (B, C, H, W). Folded (`fold`), the shortcut is left to the block. With gradient
    checkpointing it is recomputed in the backward pass; it holds no running state (see `MetaSegMscanBlock`).
    """

    def __init__(self, config: MetaSegConfig, channels: int):
        super().__init__()
        self.proj_in = nn.Conv2d(channels, channels, 1)
        self.activation = ACT2FN[config.hidden_act]
        self.multi_scale_attention = MetaSegMultiScaleConvAttention(config, channels)
        self.proj_out = nn.Conv2d(channels, channels, 1)
        self.folded = None  # set by `fold()`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        proj_in, proj_out = (self.proj_in, self.proj_out) if self.folded is None else self.folded
        attended = activation_on_map(self.activation, proj_in(hidden_states))
        attended = proj_out(self.multi_scale_attention(attended))
        return attended + hidden_states if self.folded is None else attended

    def fold(self, input_scale: torch.Tensor, input_shift: torch.Tensor, layer_scale: torch.Tensor) -> None:
        """Folds the affine map `input_scale * x + input_shift` in front of it (the block's BatchNorm) into
        `proj_in`, and `layer_scale` and the shortcut's `layer_scale * input_shift` into `proj_out`; the
        shortcut's `layer_scale * input_scale * x` is the block's. All (C,), float64."""
        proj_in = FoldedConv.after_affine(self.proj_in, input_scale, input_shift)
        weight, bias = matrix(self.proj_out)
        proj_out = FoldedConv.pointwise(self.proj_out, weight * layer_scale[:, None], layer_scale * (bias + input_shift))
        self.folded = nn.ModuleList([proj_in, proj_out])


class MetaSegConvMlp(GradientCheckpointingLayer):
    """MSCAN feed-forward: 1x1 conv, depthwise 3x3 conv, GELU, 1x1 conv. (B, C, H, W) -> (B, C, H, W).
    With gradient checkpointing it is recomputed in the backward pass (its wide hidden map is not kept)."""

    def __init__(self, config: MetaSegConfig, channels: int, hidden_channels: int):
        super().__init__()
        self.config = config
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.depthwise_conv = MetaSegDepthwiseConv(config, hidden_channels, 3, padding=1)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)
        self.folded = None  # set by `fold()`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = (self.fc1, self.fc2) if self.folded is None else self.folded
        chunks = [None] if self.folded is None else channel_chunks(hidden_states, fc1.weight.shape[0])
        if len(chunks) == 1:
            return fc2(self._depthwise_activation(fc1(hidden_states)))
        # Folded on CPU: the hidden map in channel chunks that stay in cache (`fusion_metaseg.MLP_CHUNK_BYTES`).
        transformed = None
        for chunk in chunks:
            part = self._depthwise_activation(F.conv2d(hidden_states, fc1.weight[chunk], fc1.bias[chunk]), chunk)
            if transformed is None:
                transformed = F.conv2d(part, fc2.weight[:, chunk], fc2.bias)
            else:
                transformed.add_(F.conv2d(part, fc2.weight[:, chunk]))
        return transformed

    def _depthwise_activation(self, hidden_states: torch.Tensor, channels: slice | None = None) -> torch.Tensor:
        """The depthwise 3x3 and the activation, on all hidden channels or on the slice `channels`."""
        conv, implementation = self.depthwise_conv, self.config.depthwise_implementation
        weight, bias = (conv.weight, conv.bias) if channels is None else (conv.weight[channels], conv.bias[channels])
        if self.config.hidden_act == "gelu":  # exact GELU, fused into the convolution's kernel where there is one
            return depthwise_conv2d_gelu(hidden_states, weight, bias, conv.padding, implementation)
        if channels is None:
            return self.activation(conv(hidden_states))
        hidden_states = depthwise_conv2d(hidden_states, weight, bias, conv.padding, implementation)
        return activation_on_map(self.activation, hidden_states)

    def fold(self, input_scale: torch.Tensor, input_shift: torch.Tensor, layer_scale: torch.Tensor) -> None:
        """Folds the affine map `input_scale * x + input_shift` in front of it (the block's BatchNorm) into
        `fc1` and `layer_scale` behind it into `fc2`. All (C,), float64."""
        fc1 = FoldedConv.after_affine(self.fc1, input_scale, input_shift)
        weight, bias = matrix(self.fc2)
        fc2 = FoldedConv.pointwise(self.fc2, weight * layer_scale[:, None], bias * layer_scale)
        self.folded = nn.ModuleList([fc1, fc2])


class MetaSegMscanBlock(nn.Module):
    """MSCAN block: x + ls1 * SpatialAttention(BN(x)), then x + ls2 * MLP(BN(x)). (B, C, H, W) -> same.

    Gradient checkpointing recomputes the attention and the MLP, not the block: a recomputed BatchNorm in
    train mode would update its running statistics a second time in every step."""

    def __init__(self, config: MetaSegConfig, channels: int, mlp_ratio: int, drop_path_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels, eps=config.batch_norm_eps)
        self.attention = MetaSegSpatialAttention(config, channels)
        self.norm2 = nn.BatchNorm2d(channels, eps=config.batch_norm_eps)
        self.mlp = MetaSegConvMlp(config, channels, channels * mlp_ratio)
        self.layer_scale_1 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
        self.layer_scale_2 = nn.Parameter(torch.full((channels,), float(config.layer_scale_init_value)))
        self.drop_path = MetaSegDropPath(drop_path_rate)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.attention.folded is None:
            attended = self.attention(self.norm1(hidden_states))
            hidden_states = hidden_states + self.drop_path(self.layer_scale_1[:, None, None] * attended)
            transformed = self.mlp(self.norm2(hidden_states))
            return hidden_states + self.drop_path(self.layer_scale_2[:, None, None] * transformed)
        # Folded (`MetaSegStage.fuse`): the norms are in proj_in and fc1, the layer scales in proj_out and fc2, and
        # the residual stream is carried rescaled per channel, so that both halves are plain residual additions.
        check_inference(self)
        hidden_states = hidden_states + self.attention(hidden_states)
        return hidden_states + self.mlp(hidden_states)

    def residual_scale(self) -> torch.Tensor:
        """1 + ls1 * s1 (C,), float64: what the attention half multiplies its input by once the BatchNorm shortcut
        ls1 * (s1 * x + t1) is split off (its shift goes into proj_out's bias)."""
        return 1 + self.layer_scale_1.double() * batch_norm_affine(self.norm1)[0]

    def fold(self, stream_scale: torch.Tensor, next_stream_scale: torch.Tensor) -> None:
        """Folds both BatchNorms and layer scales into the 1x1 convolutions next to them, for a residual stream
        carried as x / stream_scale before the block and x / next_stream_scale after it (C,), float64;
        `residual_stream_scales` makes next_stream_scale = residual_scale() * stream_scale."""
        scale_1, shift_1 = batch_norm_affine(self.norm1)
        self.attention.fold(scale_1 * stream_scale, shift_1, self.layer_scale_1.double() / next_stream_scale)
        scale_2, shift_2 = batch_norm_affine(self.norm2)
        self.mlp.fold(scale_2 * next_stream_scale, shift_2, self.layer_scale_2.double() / next_stream_scale)


class MetaSegStage(nn.Module):
    """One MSCAN stage: patch embedding (the stem for stage 1), MSCAN blocks, LayerNorm over channels.

    (B, C_in, H, W) -> (B, C, ceil(H/s), ceil(W/s)) with s = 4 for stage 1 and 2 otherwise.
    """

    def __init__(self, config: MetaSegConfig, stage_index: int, drop_path_rates: list[float]):
        super().__init__()
        channels = config.hidden_sizes[stage_index]
        if stage_index == 0:
            self.patch_embeddings = MetaSegStem(config, channels)
        else:
            self.patch_embeddings = MetaSegOverlapPatchEmbeddings(config, config.hidden_sizes[stage_index - 1], channels)
        self.blocks = nn.ModuleList(
            MetaSegMscanBlock(config, channels, config.mlp_ratios[stage_index], rate) for rate in drop_path_rates
        )
        self.layer_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = self.patch_embeddings(hidden_states)
        # A model converted with `.to(memory_format=torch.channels_last)` (or fused, on CPU) keeps that layout.
        channels_last = not hidden_states.is_contiguous() and hidden_states.is_contiguous(
            memory_format=torch.channels_last
        )
        for block in self.blocks:
            hidden_states = block(hidden_states)
        # LayerNorm over channels, in channels-last order, back to (B, C, H, W).
        hidden_states = self.layer_norm(hidden_states.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return hidden_states.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)

    def fuse(self) -> None:
        """Folds the BatchNorms and layer scales of the patch embedding and the blocks into their convolutions,
        with the blocks' residual stream carried rescaled per channel (`fusion_metaseg.residual_stream_scales`)."""
        channels, device = self.layer_norm.normalized_shape[0], self.layer_norm.weight.device
        scales = residual_stream_scales([block.residual_scale() for block in self.blocks], channels, device)
        self.patch_embeddings.fold(output_scale=1 / scales[0])
        for block, stream_scale, next_stream_scale in zip(self.blocks, scales, scales[1:]):
            block.fold(stream_scale, next_stream_scale)


class MetaSegEncoder(nn.Module):
    """The MSCAN encoder: four stages at strides 4, 8, 16, 32. Returns every stage's (B, C_i, H_i, W_i) map."""

    def __init__(self, config: MetaSegConfig):
        super().__init__()
        total_depth = sum(config.depths)
        rates = [config.drop_path_rate * index / max(total_depth - 1, 1) for index in range(total_depth)]
        starts = [sum(config.depths[:index]) for index in range(len(config.depths))]
        self.stages = nn.ModuleList(
            MetaSegStage(config, index, rates[start : start + depth])
            for index, (start, depth) in enumerate(zip(starts, config.depths))
        )

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        hidden_states = pixel_values
        stage_outputs = ()
        for stage in self.stages:
            hidden_states = stage(hidden_states)
            stage_outputs += (hidden_states,)
        return stage_outputs


# ---------------------------------------------------------------------------------------------------
# MetaSeg decoder
# ---------------------------------------------------------------------------------------------------


def tokens_to_map(tokens: torch.Tensor, height: int, width: int, official_strides: bool) -> torch.Tensor:
    """(B, N, C) tokens as a (B, C, H, W) map, a view.

    `official_strides`: as the official code makes it (`transpose(1, 2).reshape(...)`). The strides decide
    which CPU kernels pool and convolve the map, and so the last bits of the results: with them a batch
    of one gives the official numbers bit for bit, but its degenerate batch stride makes the next
    convolution copy the map. Otherwise (the fused model) contiguous tokens give a channels_last view
    that needs no copy."""
    batch_size, _, channels = tokens.shape
    if not official_strides and tokens.is_contiguous():
        return tokens.view(batch_size, height, width, channels).permute(0, 3, 1, 2)
    return tokens.transpose(1, 2).reshape(batch_size, channels, height, width)


def use_attention_kernel(query: torch.Tensor, output_attentions: bool) -> bool:
    """Whether Channel Reduction Attention runs as `F.scaled_dot_product_attention`: on accelerators when
    the attention maps are not asked for. On CPU the explicit rank-1 softmax is 1.5-2.4x faster than SDPA
    (`benchmarks/bench_attention.py`, MetaSeg-T's decoder stages at 512x704)."""
    return not output_attentions and query.device.type != "cpu"


class MetaSegChannelReductionAttention(nn.Module):
    """Channel Reduction Attention (CRA).

    Queries and keys are one scalar per head (`query`, `key`: C -> heads); values are full width.
    Keys and values come from the map average-pooled by `pool_ratio` (floor), a 1x1 conv, LayerNorm
    and GELU. Tokens (B, N, C) with N = H * W -> (B, N, C), and the attention maps
    (B, heads, N, M) for the M pooled tokens (None where `use_attention_kernel` runs the attention as
    `F.scaled_dot_product_attention`, which does not materialise them).
    """

    def __init__(self, config: MetaSegConfig, channels: int, num_heads: int, pool_ratio: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = channels // num_heads
        self.scale = self.head_dim**-0.5
        self.pool_ratio = pool_ratio
        self.query = nn.Linear(channels, num_heads, bias=False)
        self.key = nn.Linear(channels, num_heads, bias=False)
        self.value = nn.Linear(channels, channels, bias=False)
        self.pool = nn.AvgPool2d(pool_ratio, pool_ratio)
        self.reduction = nn.Conv2d(channels, channels, kernel_size=1)
        self.layer_norm = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.activation = ACT2FN[config.hidden_act]
        self.proj = nn.Linear(channels, channels)
        self.folded = None  # set by `fuse()`: the query weight with the scale folded in

    def forward(
        self, hidden_states: torch.Tensor, height: int, width: int, output_attentions: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch_size, num_tokens, channels = hidden_states.shape
        query = (self.query if self.folded is None else self.folded)(hidden_states)
        query = query.transpose(1, 2).unsqueeze(-1)  # (B, heads, N, 1)
        feature_map = tokens_to_map(hidden_states, height, width, official_strides=self.folded is None)
        pooled = self.reduction(self.pool(feature_map)).flatten(2).transpose(1, 2)  # (B, M, C)
        pooled = self.activation(self.layer_norm(pooled))
        key = self.key(pooled).transpose(1, 2).unsqueeze(-2)  # (B, heads, 1, M)
        value = self.value(pooled).reshape(batch_size, -1, self.num_heads, self.head_dim).transpose(1, 2)
        context, attention = self.attend(query, key, value, fused_kernel=use_attention_kernel(query, output_attentions))
        return self.proj(context.transpose(1, 2).reshape(batch_size, num_tokens, channels)), attention

    def attend(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, fused_kernel: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """softmax(scale * query key^T) value for query (B, heads, N, 1), key (B, heads, 1, M), value
        (B, heads, M, head_dim): the context (B, heads, N, head_dim) and the attention maps (B, heads, N, M),
        or, with `fused_kernel`, `F.scaled_dot_product_attention` and None (same values to float rounding)."""
        scale = 1.0 if self.folded is not None else self.scale  # fused: the scale is in the query weight
        if fused_kernel:
            return F.scaled_dot_product_attention(query, key.transpose(-1, -2), value, scale=scale), None
        # Rank-1 logits: a broadcast product, equal to `query @ key^T` (inner size 1) without the matmul.
        logits = query * key if self.folded is not None else (query * key) * self.scale
        attention = logits.softmax(dim=-1)  # (B, heads, N, M)
        return attention @ value, attention

    def fuse(self) -> None:
        """Folds the softmax scale into the query weight."""
        self.folded = FoldedLinear(self.query.weight.dtype, self.query.weight.double() * self.scale)


class MetaSegDecoderMlp(nn.Module):
    """Global Meta Block MLP: 1x1 conv (C -> rC), GELU, dropout, 1x1 conv, dropout. No depthwise conv.

    (B, C, H, W) map -> (B, C, H, W); fused (`fuse`), (B, N, C) tokens -> (B, N, C), the convolutions as linears.
    """

    def __init__(self, config: MetaSegConfig, channels: int):
        super().__init__()
        hidden_channels = channels * config.decoder_mlp_ratio
        self.fc1 = nn.Conv2d(channels, hidden_channels, 1)
        self.activation = ACT2FN[config.hidden_act]
        self.fc2 = nn.Conv2d(hidden_channels, channels, 1)
        self.dropout = nn.Dropout(config.decoder_hidden_dropout_prob)
        self.folded = None  # set by `fuse()`

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        fc1, fc2 = (self.fc1, self.fc2) if self.folded is None else self.folded
        hidden_states = self.dropout(self.activation(fc1(hidden_states)))
        return self.dropout(fc2(hidden_states))

    def fuse(self) -> None:
        """The 1x1 convolutions as linears on tokens (no map views or copies around them)."""
        dtype = self.fc1.weight.dtype
        self.folded = nn.ModuleList(FoldedLinear(dtype, *matrix(conv)) for conv in (self.fc1, self.fc2))


class MetaSegGlobalMetaBlock(GradientCheckpointingLayer):
    """Global Meta Block (pre-norm): x + DropPath(CRA(LN(x))), then x + DropPath(MLP(LN(x))).

    (B, C, H, W) map -> ((B, C, H, W) map, (B, heads, H*W, M) attention).
    """

    def __init__(self, config: MetaSegConfig, channels: int, num_heads: int, pool_ratio: int):
        super().__init__()
        self.layernorm_before = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.attention = MetaSegChannelReductionAttention(config, channels, num_heads, pool_ratio)
        self.layernorm_after = nn.LayerNorm(channels, eps=config.layer_norm_eps)
        self.mlp = MetaSegDecoderMlp(config, channels)
        self.drop_path = MetaSegDropPath(config.decoder_drop_path_rate)

    def forward(self, feature_map: torch.Tensor, output_attentions: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        height, width = feature_map.shape[-2:]
        official_strides = self.attention.folded is None  # fused: channels_last views (see `tokens_to_map`)
        tokens = feature_map.flatten(2).transpose(1, 2)  # (B, N, C)
        attended, attention = self.attention(self.layernorm_before(tokens), height, width, output_attentions)
        tokens = tokens + self.drop_path(attended)
        normed = self.layernorm_after(tokens)
        if self.mlp.folded is None:  # the official 1x1 convolutions on the map
            transformed = self.mlp(tokens_to_map(normed, height, width, official_strides)).flatten(2).transpose(1, 2)
        else:  # fused: the same, as linears on the tokens
            transformed = self.mlp(normed)
        tokens = tokens + self.drop_path(transformed)
        return tokens_to_map(tokens, height, width, official_strides), attention


class MetaSegClassifier(nn.Conv2d):
    """The 1x1 convolution giving the logits (official `linear_pred`). Unlike the other convolutions it
    keeps PyTorch's default initialisation, as in the official code (small logits at the start)."""


class MetaSegDecodeHead(nn.Module):
    """MetaSeg decoder: a Global Meta Block on each of encoder stages 2-4, each resized to stage 2's
    size, concatenated (last stage first), fused by 1x1 conv + BatchNorm + ReLU, then classified.

    Encoder maps -> logits (B, num_labels, ceil(H/8), ceil(W/8)) and the CRA attention maps.
    """

    def __init__(self, config: MetaSegConfig):
        super().__init__()
        self.global_meta_blocks = nn.ModuleList(
            MetaSegGlobalMetaBlock(config, channels, heads, pool_ratio)
            for channels, heads, pool_ratio in zip(
                config.decoder_hidden_sizes, config.decoder_num_attention_heads, config.decoder_pool_ratios
            )
        )
        self.linear_fuse = nn.Conv2d(sum(config.decoder_hidden_sizes), config.decoder_hidden_size, 1, bias=False)
        self.batch_norm = nn.BatchNorm2d(config.decoder_hidden_size, eps=config.batch_norm_eps)
        self.activation = nn.ReLU()
        self.dropout = nn.Dropout2d(config.classifier_dropout_prob)
        self.classifier = MetaSegClassifier(config.decoder_hidden_size, config.num_labels, 1)
        self.folded = None  # set by `fuse()`: linear_fuse with the BatchNorm, one linear map per input stage

    def forward(
        self, encoder_hidden_states: tuple[torch.Tensor, ...], output_attentions: bool = True
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        decoder_inputs = encoder_hidden_states[1:]
        target_size = decoder_inputs[0].shape[-2:]
        resized, attentions = [], ()
        for index, (block, feature_map) in enumerate(zip(self.global_meta_blocks, decoder_inputs)):
            feature_map, attention = block(feature_map, output_attentions)
            attentions += (attention,)
            if self.folded is not None:  # this stage's part of linear_fuse, before the resize (they commute), on NHWC
                feature_map = self.folded[index](feature_map.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
            if index > 0:  # the later stages are smaller (an index, not a shape test: traced graphs keep no guard)
                feature_map = F.interpolate(feature_map, size=target_size, mode="bilinear", align_corners=False)
            resized.append(feature_map)
        if self.folded is None:
            hidden_states = self.batch_norm(self.linear_fuse(torch.cat(resized[::-1], dim=1)))
        else:  # summed into the first resized map, a tensor of this forward's own (0 + 1 = 1 + 0 exactly)
            hidden_states = resized[0] if len(resized) == 1 else resized[1].add_(resized[0])
            for feature_map in resized[2:]:
                hidden_states = hidden_states.add_(feature_map)
        hidden_states = self.dropout(activation_on_map(self.activation, hidden_states))
        # NCHW logits also from a channels_last model: the loss's resize and log-softmax over classes
        # are several times slower on channels_last logits (a no-op for the default NCHW model).
        return self.classifier(hidden_states).contiguous(), attentions

    def fuse(self) -> None:
        """`linear_fuse` and its BatchNorm as one linear map per input stage, on the NHWC view of its map (its
        column blocks; the maps are concatenated last stage first), the bias on the first."""
        scale, shift = batch_norm_affine(self.batch_norm)
        weight = matrix(self.linear_fuse)[0] * scale[:, None]
        widths = [block.attention.value.weight.shape[0] for block in self.global_meta_blocks]
        blocks = torch.split(weight, widths[::-1], dim=1)[::-1]
        dtype = self.linear_fuse.weight.dtype
        self.folded = nn.ModuleList(
            FoldedLinear(dtype, block, shift if index == 0 else None) for index, block in enumerate(blocks)
        )


# ---------------------------------------------------------------------------------------------------
# Pretrained-model plumbing and task models
# ---------------------------------------------------------------------------------------------------


def minimum_input_size(config: MetaSegConfig) -> int:
    """Smallest image side the decoder accepts: every pooled key/value map must be non-empty.

    Stage i (1-based) has side ceil(side / 2^(i+1)); decoder stage i pools by `decoder_pool_ratios[i-2]`.
    """
    side = 1
    while any(
        math.ceil(side / 2 ** (stage + 1)) < ratio for stage, ratio in enumerate(config.decoder_pool_ratios, start=2)
    ):
        side += 1
    return side


def check_on_device(condition: torch.Tensor, message: str, error=None) -> None:
    """Fails unless every element of the boolean tensor `condition` is true, without making the host wait.

    On CPU in eager mode the value is read (nothing to wait for) and `error()` (default: a `ValueError`
    with `message`) is raised. On an accelerator, or while `torch.compile` traces, it is
    `torch._assert_async`: no device-to-host synchronisation and no graph break; a failure surfaces as a
    device-side assertion (`RuntimeError` on CPU) carrying `message`.
    """
    if condition.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(condition.all()):
            raise error() if error is not None else ValueError(message)
        return
    torch._assert_async(condition.all(), message)


def check_pixel_values(
    pixel_values: torch.Tensor, config: MetaSegConfig, needs_decoder: bool, check_values: bool = True
) -> None:
    """Raises a `ValueError` naming the problem when `pixel_values` cannot go through the network.

    `check_values`: also refuse NaN / infinite values (`check_on_device`; skipped while `torch.compile` or
    `torch.export` traces, so exported graphs carry no assertion). The segmentation model leaves that to
    `MetaSegModel`, so that a forward checks the values once."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(f"pixel_values must be a torch.Tensor of shape (batch, {config.num_channels}, height, width), got {type(pixel_values).__name__}")
    if pixel_values.ndim != 4:
        raise ValueError(
            f"pixel_values must have shape (batch, {config.num_channels}, height, width), got shape "
            f"{tuple(pixel_values.shape)}; add a batch dimension with pixel_values[None] for a single image"
        )
    if pixel_values.shape[1] != config.num_channels:
        fix = (
            "convert the image to RGB (the image processor does)"
            if config.num_channels == 3
            else f"give {config.num_channels}-channel images (a MetaSegImageProcessor with {config.num_channels} "
            "image_mean/image_std values and do_convert_rgb=False prepares them)"
        )
        raise ValueError(
            f"pixel_values has {pixel_values.shape[1]} channels (shape {tuple(pixel_values.shape)}) but the model "
            f"expects num_channels={config.num_channels}; {fix}"
        )
    if pixel_values.shape[0] == 0:
        raise ValueError(f"pixel_values is an empty batch (shape {tuple(pixel_values.shape)})")
    if not pixel_values.is_floating_point():
        raise TypeError(
            f"pixel_values must be a floating-point tensor, got {pixel_values.dtype}; normalise the image with "
            "MetaSegImageProcessor"
        )
    if check_values and not torch.compiler.is_compiling():
        check_on_device(
            torch.isfinite(pixel_values),
            "pixel_values contains NaN or infinite values; the outputs would be NaN. Check how the image was "
            "decoded and normalised (MetaSegImageProcessor refuses such images).",
        )
    if needs_decoder:
        minimum = minimum_input_size(config)
        height, width = pixel_values.shape[-2:]
        if min(height, width) < minimum:
            raise ValueError(
                f"Input of {height}x{width} pixels is too small: MetaSeg's decoder pools stage maps by "
                f"{config.decoder_pool_ratios}, which needs height and width of at least {minimum} pixels. "
                "Resize or pad the image (the image processor resizes to the official size)."
            )


class MetaSegPreTrainedModel(PreTrainedModel):
    """Weights initialisation (the official MSCAN/MetaSeg scheme) and loading for all MetaSeg models."""

    config_class = MetaSegConfig
    config: MetaSegConfig
    base_model_prefix = "metaseg"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["MetaSegStage", "MetaSegGlobalMetaBlock"]

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, with Transformers' semantics and errors that name the problem.

        As in Transformers: `output_loading_info=True` returns `(model, info)`; missing, unexpected and
        mismatched keys are listed in Transformers' load report and in `info`; weights missing from the
        checkpoint are initialised by `_init_weights` (so `from_pretrained(None, config=config,
        state_dict={})` gives a freshly initialised model, and an encoder-only checkpoint loads into the
        segmentation model with the decoder initialised). On top of the report, a warning in MetaSeg's terms
        when no MetaSeg tensor was found (a foreign or unconverted checkpoint) or encoder weights are missing
        (the encoder would be partly random).

        Why this override exists (SegFormer has none): two of Transformers 5's errors do not say what is
        wrong. A truncated or corrupt `model.safetensors` raises safetensors' bare "Error while deserializing
        header" without the file's name, here an `OSError` naming the file; shapes that disagree raise "look at
        the above report", here a `RuntimeError` naming the keys, both shapes and the `ignore_mismatched_sizes`
        fix (Transformers' report is still logged first). Transformers has no hook for either: the safetensors
        files are opened inside `_load_pretrained_model` and the mismatch error is raised while the report is
        logged. Nothing else is changed: the arguments go through to Transformers untouched.
        """
        from safetensors import SafetensorError

        want_info = kwargs.pop("output_loading_info", False)
        ignore_mismatched = kwargs.pop("ignore_mismatched_sizes", False)
        source = pretrained_model_name_or_path or "the given state_dict"
        try:
            # Transformers raises a bare "look at the above report" RuntimeError on shape mismatches: load with
            # them ignored, then raise with the keys and shapes in the message.
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *args, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"The weights of {source} (model.safetensors) cannot be read: the file is truncated or corrupt "
                f"({error}). Download or save the model again."
            ) from error
        if info["mismatched_keys"] and not ignore_mismatched:
            shapes = [
                f"{key}: checkpoint {tuple(saved)} vs model {tuple(expected)}"
                for key, saved, expected in sorted(info["mismatched_keys"])
            ]
            raise RuntimeError(
                f"The weights of {source} do not fit this MetaSeg configuration for {cls.__name__}: shape "
                f"mismatches ({len(shapes)}): {'; '.join(shapes[:10])}. To fine-tune on another label set, pass "
                "num_labels=... with ignore_mismatched_sizes=True."
            )
        expected_keys = set(model.state_dict())
        if info["missing_keys"] >= expected_keys:
            unexpected = sorted(info["unexpected_keys"])
            logger.warning(
                f"The weights of {source} are not MetaSeg weights for {cls.__name__}: none of the "
                f"{len(expected_keys)} MetaSeg tensors was found (unexpected keys ({len(unexpected)}): "
                f"{', '.join(unexpected[:10]) or 'none'}), so every weight is newly initialised. Convert an "
                "official checkpoint with conversion/convert_metaseg_to_hf.py, or load the folder that "
                "save_pretrained wrote."
            )
        elif encoder_missing := sorted(key for key in info["missing_keys"] if "encoder." in key):
            logger.warning(
                f"The weights of {source} are incomplete for {cls.__name__}: missing encoder weights "
                f"({len(encoder_missing)}): {', '.join(encoder_missing[:10])}, newly initialised, so the encoder "
                "is partly random. Save or convert the model again."
            )
        return (model, info) if want_info else model

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Truncated normal for linears, fan-out normal for convs, unit norms, layer scales at their init value."""
        if isinstance(module, nn.Linear):
            init.trunc_normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, MetaSegClassifier):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            bound = 1 / math.sqrt(module.in_channels * module.kernel_size[0] * module.kernel_size[1])
            init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            init.normal_(module.weight, mean=0.0, std=math.sqrt(2.0 / fan_out))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            if isinstance(module, nn.BatchNorm2d):
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif isinstance(module, MetaSegMscanBlock):
            init.constant_(module.layer_scale_1, self.config.layer_scale_init_value)
            init.constant_(module.layer_scale_2, self.config.layer_scale_init_value)

    @torch.no_grad()
    def fuse(self):
        """Switches to the inference-only deploy form and returns the model (in eval mode).

        Every submodule that owns a `fuse()` (MSCAN stages, for their patch embeddings and blocks; Channel
        Reduction Attention; decode head) folds its eval-mode BatchNorms, layer scales and softmax scale into the
        neighbouring convolutions and runs its forward on the folded weights; on CPU maps are kept
        channels_last. Outputs equal the straight port's up to float rounding (float32: within 5e-4 of
        the float64 reference). The parameters and the state dict are unchanged (saving a fused model
        saves the ordinary weights); the folds are a snapshot of them: call `fuse()` again after
        changing weights. Training a fused model is refused; call `unfuse()`, or reload with
        `from_pretrained`, which always gives the straight port.
        """
        owners = [
            module
            for module in self.modules()
            if not isinstance(module, PreTrainedModel) and callable(getattr(module, "fuse", None))
        ]
        for module in owners:
            module.fuse()
        return self.eval()

    def unfuse(self):
        """Drops the folds of `fuse()`: back to the straight port (trainable). Returns the model."""
        for module in self.modules():
            if getattr(module, "folded", None) is not None:
                module.folded = None
        return self

    @property
    def is_fused(self) -> bool:
        """Whether `fuse()` switched this model to the inference-only deploy form."""
        return any(getattr(module, "folded", None) is not None for module in self.modules())

    def train(self, mode: bool = True):
        """`nn.Module.train`, refused on a fused model (its folded weights cannot learn)."""
        if mode and self.is_fused:
            raise RuntimeError(
                f"{type(self).__name__} is fused for inference (model.fuse()) and cannot train: call "
                "model.unfuse() first, or reload it with from_pretrained."
            )
        return super().train(mode)


class MetaSegModel(MetaSegPreTrainedModel):
    """The bare MSCAN encoder. `last_hidden_state` is stage 4's map (B, C_4, ceil(H/32), ceil(W/32));
    `hidden_states` are the four stage maps (after their LayerNorm) when asked for."""

    _keys_to_ignore_on_load_unexpected = [r"^decode_head\."]  # loading the encoder of a segmentation model

    def __init__(self, config: MetaSegConfig):
        super().__init__(config)
        self.encoder = MetaSegEncoder(config)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]
    ) -> BaseModelOutputWithNoAttention:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see `MetaSegImageProcessor`).
        """
        check_pixel_values(pixel_values, self.config, needs_decoder=False)
        stage_outputs = self.encoder(pixel_values)
        return BaseModelOutputWithNoAttention(last_hidden_state=stage_outputs[-1], hidden_states=stage_outputs)


class MetaSegBackbone(BackboneMixin, MetaSegPreTrainedModel):
    """MSCAN as a Transformers backbone: `feature_maps` are the stages named by `config.out_features`
    (`"stage1"` ... `"stage4"`, strides 4 to 32), for use under other heads (`AutoBackbone`)."""

    has_attentions = False
    _keys_to_ignore_on_load_unexpected = [r"^decode_head\."]

    def __init__(self, config: MetaSegConfig):
        super().__init__(config)
        self.encoder = MetaSegEncoder(config)
        self.num_features = list(config.hidden_sizes)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(self, pixel_values: torch.Tensor, **kwargs: Unpack[TransformersKwargs]) -> BackboneOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see `MetaSegImageProcessor`).
        """
        check_pixel_values(pixel_values, self.config, needs_decoder=False)
        stage_outputs = self.encoder(pixel_values)
        feature_maps = tuple(
            output for name, output in zip(self.stage_names, stage_outputs) if name in self.out_features
        )
        return BackboneOutput(feature_maps=feature_maps, hidden_states=stage_outputs)


class MetaSegForSemanticSegmentation(MetaSegPreTrainedModel):
    """MetaSeg: MSCAN encoder + MetaSeg decoder. `logits` are (B, num_labels, ceil(H/8), ceil(W/8)),
    exactly the official head's output before any resize."""

    def __init__(self, config: MetaSegConfig):
        super().__init__(config)
        self.metaseg = MetaSegModel(config)
        self.decode_head = MetaSegDecodeHead(config)
        self.post_init()

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> SemanticSegmenterOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, num_channels, height, width)`):
            Normalised images (see `MetaSegImageProcessor`); any height and width of at least
            `minimum_input_size(config)` (57 for the official decoders).
        labels (`torch.LongTensor` of shape `(batch_size, label_height, label_width)`, *optional*):
            Class ids in `[0, num_labels)` or `config.semantic_loss_ignore_index`. The logits are
            upsampled bilinearly to the label size and the cross-entropy is taken in float32.
        """
        check_pixel_values(pixel_values, self.config, needs_decoder=True, check_values=False)  # values: in MetaSegModel
        # The decoder reads every stage, so they are always computed; `filter_output_hidden_states`
        # drops them from the output unless asked for. The attention maps are a by-product (on CPU).
        stage_outputs = self.metaseg(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        logits, attentions = self.decode_head(stage_outputs, bool(output_attentions))
        loss = self.semantic_segmentation_loss(logits, labels) if labels is not None else None
        return SemanticSegmenterOutput(
            loss=loss, logits=logits, hidden_states=stage_outputs, attentions=attentions if output_attentions else None
        )

    def predict(self, pixel_values: torch.Tensor, original_sizes=None, **kwargs) -> list[SegmentationPrediction]:
        """Official test-time inference on processed images: `whole` or `slide` mode (default: the
        config's), optional flip TTA, class maps and probabilities at each image's original size.
        See `metaseg_hf.inference_metaseg.predict` for the arguments."""
        return predict(self, pixel_values, original_sizes=original_sizes, **kwargs)

    def semantic_segmentation_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the logits upsampled to the label size, in float32 (also under autocast).

        Averaged over valid pixels or over all pixels per `config.semantic_loss_average`; a masked
        binary cross-entropy when `num_labels == 1`.
        """
        ignore_index = self.config.semantic_loss_ignore_index
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if labels.ndim != 3 or labels.shape[0] != logits.shape[0]:
            raise ValueError(
                f"labels must have shape (batch, height, width) with batch {logits.shape[0]}, got {tuple(labels.shape)}"
            )
        if labels.is_floating_point():
            raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}")
        labels = labels.long()
        num_classes = 2 if self.config.num_labels == 1 else self.config.num_labels
        valid = (labels == ignore_index) | ((labels >= 0) & (labels < num_classes))
        advice = (
            f"Map them to class ids or to {ignore_index} (for ADE20K-style labels where 0 means 'other', use "
            "do_reduce_labels=True in the image processor)."
        )

        def named_error():  # on CPU, the values are named
            found = torch.unique(labels[~valid]).tolist()
            shown = ", ".join(map(str, found[:10])) + (", ..." if len(found) > 10 else "")
            return ValueError(
                f"labels contain values outside [0, {num_classes}) that are not the ignore index {ignore_index}: "
                f"{shown}. {advice}"
            )

        check_on_device(
            valid,
            f"labels contain values outside [0, {num_classes}) that are not the ignore index {ignore_index}. {advice}",
            named_error,
        )
        with torch.autocast(device_type=logits.device.type, enabled=False):
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            upsampled = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
            if self.config.num_labels == 1:
                valid = (labels != ignore_index).float()
                per_pixel = F.binary_cross_entropy_with_logits(
                    upsampled.squeeze(1), labels.clamp(0, 1).float(), reduction="none"
                )
                if self.config.semantic_loss_average == "all_pixels":
                    return (per_pixel * valid).mean()
                return (per_pixel * valid).sum() / valid.sum().clamp(min=1)
            per_pixel = F.cross_entropy(upsampled, labels, ignore_index=ignore_index, reduction="none")
            if self.config.semantic_loss_average == "all_pixels":
                return per_pixel.mean()
            num_valid = (labels != ignore_index).sum()
            return per_pixel.sum() / num_valid.clamp(min=1)


__all__ = [
    "MetaSegBackbone",
    "MetaSegForSemanticSegmentation",
    "MetaSegModel",
    "MetaSegPreTrainedModel",
    "minimum_input_size",
]
