"""Folding arithmetic and deploy-time building blocks for `MetaSegPreTrainedModel.fuse()`.

The pattern of timm's RepViT / FastViT reparameterisation: each module of `modeling_metaseg` owns a
`fuse()` (or, for the parts its parent folds into, a `fold(...)`) next to its forward, which folds
its eval-mode BatchNorms and layer scales into the neighbouring convolutions and keeps the result in
`module.folded`; its forward then runs on the folded weights. Unlike timm, the train-time parameters
stay where they are and the folds are non-persistent buffers, so the state dict and the saved format
never change, and `unfuse()` (dropping every `folded`) restores the straight port.

What is folded, and why it is exact in real arithmetic (float32 results move by rounding only):

- Eval-mode BatchNorm is a per-channel affine map `s * x + t`. Before a convolution it folds into
  that convolution's weight (`W * s` over input channels) and bias (`W @ t + b`); after one, into
  its output channels (stem, patch embeddings, decoder `linear_fuse`).
- MSCAN block, attention half: `norm1(x)` feeds `proj_in` (folded) and is also the shortcut, so
  `x + ls1 * (proj_out(g) + s1 * x + t1)` is `c * x + proj_out'(g)` with `c = 1 + ls1 * s1` and
  `proj_out'` holding `ls1` in its rows and `ls1 * t1` in its bias.
- MSCAN block, MLP half: `norm2` folds into `fc1`, `layer_scale_2` into `fc2`.
- MSCAN stage: the per-channel `c` of each block is not multiplied in. The residual stream is carried as
  `x / d_k` before block k (`residual_stream_scales`: `d_k = d_(k+1) / c_k`, 1 after the last block),
  `d_k` folded into the input columns of `proj_in` and `fc1`, `1 / d_(k+1)` into the rows of `proj_out`
  and `fc2`, `1 / d_0` into the patch embedding: each half of a block is a plain residual addition, and
  the stage's output (before its LayerNorm) is `x` itself. No per-channel multiply of the stream is left
  (in an int8 export, one integer operator fewer per block, and ONNX Runtime keeps the stream channels-last).
- Decoder: `linear_fuse` on the concatenation of upsampled maps is the sum of its column blocks
  applied to each map; a 1x1 convolution commutes with bilinear resizing (its weights sum to 1),
  so each block is applied at the map's own, lower resolution and the narrow result is resized.
- Channel Reduction Attention: the softmax scale is folded into the query weight.
- Global Meta Block MLP: its 1x1 convolutions run as linears on the (B, N, C) tokens (nothing to fold;
  on CPU 2-3x faster than the same convolutions on a channels_last view at stage 2 of MetaSeg-T).
- On CPU every map is kept `channels_last`, so 1x1 convolutions are GEMMs over contiguous channels,
  the depthwise strips take oneDNN's fast NHWC path (the 1x21 strip is ~30x faster than in NCHW),
  and element-wise activations run on the contiguous NHWC view (`activation_on_map`). On GPUs the
  encoder's maps stay NCHW (cuDNN in bf16 ran MetaSeg-T 20-25% slower in channels_last on an H200);
  the decoder's maps are channels_last views of its tokens on every device (`tokens_to_map`).

The depthwise strip pairs are kept separable: merged into one depthwise 21x21 kernel (the sum of
the outer products plus the identity, exact but for the strip biases at the borders) they cost 2-3x
more on CPU even in NHWC.

Folding is computed in float64 from the parameters and cast to their dtype. A fused model is for
inference only: folded modules refuse training-mode calls.
"""

import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.fusion import fuse_conv_bn_weights

from .ops_metaseg import activation_on_map


def batch_norm_affine(batch_norm: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BatchNorm as `scale * x + shift`, both (C,), in float64."""
    scale = batch_norm.weight.double() / torch.sqrt(batch_norm.running_var.double() + batch_norm.eps)
    shift = batch_norm.bias.double() - batch_norm.running_mean.double() * scale
    return scale, shift


def matrix(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A 1x1 convolution's or a linear layer's weight as an (O, I) matrix and its bias, float64."""
    weight = layer.weight.double()
    return weight.reshape(weight.shape[0], -1), None if layer.bias is None else layer.bias.double()


def residual_stream_scales(residual_scales: list[torch.Tensor], channels: int, device=None) -> list[torch.Tensor]:
    """The per-channel scales d_0 .. d_n (float64, (C,)) by which a fused MSCAN stage of n blocks divides its
    residual stream before each block and after the last: d_n = 1 and d_k = d_(k+1) / c_k, where c_k
    (`MetaSegMscanBlock.residual_scale`) is what block k's attention half multiplies its input by. Carried as
    x / d_k, block k's input scaling c_k is absorbed (x_(k+1) / d_(k+1) = x_k / d_k + ...)."""
    scales = [torch.ones(channels, dtype=torch.float64, device=device)]
    for residual_scale in reversed(residual_scales):
        scales.insert(0, scales[0] / residual_scale)
    return scales


def check_inference(module: nn.Module) -> None:
    """Raises the error of a folded module called in training mode."""
    if module.training:
        raise RuntimeError(
            "This MetaSeg model is fused for inference (model.fuse()): it cannot run in training mode. "
            "Call model.unfuse() (or reload it with from_pretrained) before training."
        )


def preferred_layout(hidden_states: torch.Tensor) -> torch.Tensor:
    """The map in the memory format its device runs fastest: channels_last on CPU (oneDNN's NHWC
    depthwise and 1x1 kernels), NCHW elsewhere (measured on an H200, bf16: channels_last made
    MetaSeg-T 20-25% slower there) and for float64 (no oneDNN kernels). Later layers keep the
    format they are given."""
    if hidden_states.device.type != "cpu" or hidden_states.dtype == torch.float64:
        return hidden_states.contiguous()
    return hidden_states.contiguous(memory_format=torch.channels_last)


class FoldedTensors(nn.Module):
    """Folded tensors of a module (weights, biases, scales, matrices), as non-persistent buffers in `dtype`:
    read as attributes, absent from the state dict (None stays None). The base of `FoldedConv` and
    `FoldedLinear`."""

    def __init__(self, dtype: torch.dtype, **tensors: torch.Tensor | None):
        super().__init__()
        for name, value in tensors.items():
            self.register_buffer(
                name, None if value is None else value.detach().to(dtype).contiguous(), persistent=False
            )


class FoldedConv(FoldedTensors):
    """A convolution whose weight and bias were folded from others (BatchNorm, layer scale), held as
    non-persistent buffers: called like the `nn.Conv2d` it stands for (same geometry, `.weight` and
    `.bias`), absent from the state dict. Refuses training-mode calls.

    `weight` (O, I / groups, kh, kw) and `bias` (O,) or None are float64 folds, stored in the dtype of
    `conv`'s weight; `activation` (optional) follows the convolution, applied by `activation_on_map`.
    """

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None, activation=None):
        super().__init__(conv.weight.dtype, weight=weight, bias=bias)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.activation = activation

    @classmethod
    def with_batch_norm(cls, conv: nn.Conv2d, batch_norm: nn.BatchNorm2d, activation=None,
                        output_scale: torch.Tensor | None = None) -> "FoldedConv":
        """BN(conv(x)) as one convolution (PyTorch's `fuse_conv_bn_weights`, in float64), times `output_scale`
        (O,), float64, when given (before the activation)."""
        def float64(tensor):
            return None if tensor is None else tensor.detach().double()

        weight, bias = fuse_conv_bn_weights(
            float64(conv.weight), float64(conv.bias), float64(batch_norm.running_mean),
            float64(batch_norm.running_var), batch_norm.eps, float64(batch_norm.weight), float64(batch_norm.bias),
        )
        if output_scale is not None:
            weight, bias = weight * output_scale[:, None, None, None], bias * output_scale
        return cls(conv, weight, bias, activation)

    @classmethod
    def pointwise(cls, conv: nn.Conv2d, weight: torch.Tensor, bias: torch.Tensor | None) -> "FoldedConv":
        """A 1x1 convolution from an (O, I) matrix."""
        return cls(conv, weight[:, :, None, None], bias)

    @classmethod
    def after_affine(cls, conv: nn.Conv2d, scale: torch.Tensor, shift: torch.Tensor) -> "FoldedConv":
        """conv(scale * x + shift) for a 1x1 `conv` with a bias, as one 1x1 convolution (scale, shift (I,), float64)."""
        weight, bias = matrix(conv)
        return cls.pointwise(conv, weight * scale, bias + weight @ shift)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_inference(self)
        hidden_states = F.conv2d(hidden_states, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return hidden_states if self.activation is None else activation_on_map(self.activation, hidden_states)

    def extra_repr(self) -> str:
        out_channels, in_channels, *kernel = self.weight.shape
        return f"{in_channels * self.groups}, {out_channels}, kernel_size={tuple(kernel)}, stride={self.stride}, padding={self.padding}"


class FoldedLinear(FoldedTensors):
    """A linear map on (..., I) -> (..., O) from folded (or reshaped) weights: `weight` (O, I) and `bias`
    (O,) or None in float64, held as non-persistent buffers in `dtype`. Refuses training-mode calls."""

    def __init__(self, dtype: torch.dtype, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(dtype, weight=weight, bias=bias)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        check_inference(self)
        return F.linear(hidden_states, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, bias={self.bias is not None}"


# CPU only: a folded MLP computes its wide hidden map in channel chunks of about this many bytes, so that
# fc1 -> depthwise 3x3 -> GELU -> fc2 run on data still in the last-level cache (the depthwise conv
# and GELU are memory-bound; stage 1 of MetaSeg-T has a 16 MiB hidden map at 512x512).
MLP_CHUNK_BYTES = 4 * 2**20


def channel_chunks(hidden_states: torch.Tensor, hidden_channels: int) -> list[slice]:
    """Slices splitting an MLP's hidden channels (one chunk on GPU, for float64 and when traced)."""
    if (
        hidden_states.device.type != "cpu"
        or hidden_states.dtype == torch.float64
        or torch.compiler.is_compiling()
        or not MLP_CHUNK_BYTES
    ):
        return [slice(0, hidden_channels)]
    batch_size, _, height, width = hidden_states.shape
    total = batch_size * height * width * hidden_channels * hidden_states.element_size()
    count = max(1, min(hidden_channels // 16, round(total / MLP_CHUNK_BYTES)))
    step = -(-hidden_channels // count)
    return [slice(start, min(start + step, hidden_channels)) for start in range(0, hidden_channels, step)]
