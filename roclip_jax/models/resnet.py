"""OpenAI CLIP's `ModifiedResNet` image tower (the RN50 encoder of the CLIP and RoCLIP papers).

Differences from torchvision's ResNet, all kept: a 3-conv stem with an average pool instead of a
max pool; anti-aliased strided convolutions (an avgpool(stride) before `conv3` and in the
`downsample` branch instead of a stride on the conv); an attention-pooling head instead of global
average pooling. Attribute names mirror OpenAI's (`conv1`, `bn1`, ..., `layer1`..`layer4`,
`attnpool`, and `downsample` with children 0 = conv, 1 = BatchNorm) so a weight importer can map
them, and so name-based weight-decay rules see the same names as the reference code.

BatchNorm follows PyTorch's defaults (momentum 0.1, i.e. flax momentum 0.9; eps 1e-5); its running
statistics live in `nnx.BatchStat` and are updated only when `train=True`. One difference from
PyTorch: flax tracks the biased batch variance, PyTorch the unbiased one.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from roclip_jax.models import layers as layers_lib

EXPANSION = 4  # Bottleneck output channels = planes * EXPANSION
BN_MOMENTUM = 0.9
BN_EPS = 1e-5
_PAD1 = ((1, 1), (1, 1))  # PyTorch padding=1; "SAME" would pad (0, 1) on strided even inputs


def _conv(in_ch: int, out_ch: int, kernel: int, *, stride: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Conv:
  return nnx.Conv(
      in_ch,
      out_ch,
      kernel_size=(kernel, kernel),
      strides=(stride, stride),
      padding=_PAD1 if kernel == 3 else "VALID",
      use_bias=False,
      dtype=dtype,
      param_dtype=jnp.float32,
      kernel_init=layers_lib.torch_default_init(),
      rngs=rngs,
  )


def _batch_norm(features: int, *, dtype: jnp.dtype, zero_scale: bool = False, rngs: nnx.Rngs) -> nnx.BatchNorm:
  scale_init = jax.nn.initializers.zeros if zero_scale else jax.nn.initializers.ones
  return nnx.BatchNorm(
      features,
      momentum=BN_MOMENTUM,
      epsilon=BN_EPS,
      dtype=dtype,
      param_dtype=jnp.float32,
      scale_init=scale_init,
      rngs=rngs,
  )


def _avg_pool(x: jax.Array, size: int) -> jax.Array:
  """PyTorch AvgPool2d(size): window = stride = size, no padding."""
  if size == 1:
    return x
  return nnx.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nnx.Module):
  """1x1 -> 3x3 -> avgpool(stride) -> 1x1 (x4 channels), plus an identity or downsample branch."""

  def __init__(self, in_ch: int, planes: int, *, stride: int = 1, dtype: jnp.dtype, rngs: nnx.Rngs):
    self.stride = stride
    out_ch = planes * EXPANSION
    self.conv1 = _conv(in_ch, planes, 1, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(planes, planes, 3, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(planes, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(planes, out_ch, 1, dtype=dtype, rngs=rngs)
    # OpenAI zero-inits the last BN scale so each residual branch starts as the identity.
    self.bn3 = _batch_norm(out_ch, dtype=dtype, zero_scale=True, rngs=rngs)
    if stride > 1 or in_ch != out_ch:
      # OpenAI's Sequential("-1": AvgPool2d, "0": Conv2d, "1": BatchNorm2d); the pool has no params.
      self.downsample = nnx.List(
          [_conv(in_ch, out_ch, 1, dtype=dtype, rngs=rngs), _batch_norm(out_ch, dtype=dtype, rngs=rngs)]
      )
    else:
      self.downsample = None

  def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
    eval_mode = not train
    out = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=eval_mode))
    out = jax.nn.relu(self.bn2(self.conv2(out), use_running_average=eval_mode))
    out = _avg_pool(out, self.stride)
    out = self.bn3(self.conv3(out), use_running_average=eval_mode)
    identity = x
    if self.downsample is not None:
      conv, bn = self.downsample
      identity = bn(conv(_avg_pool(x, self.stride)), use_running_average=eval_mode)
    return jax.nn.relu(out + identity.astype(out.dtype))


class AttentionPool2d(nnx.Module):
  """The mean token queries all HW+1 tokens: CLIP's replacement for global average pooling."""

  def __init__(
      self, *, spatial_dim: int, embed_dim: int, heads: int, output_dim: int, dtype: jnp.dtype, rngs: nnx.Rngs
  ):
    if embed_dim % heads:
      raise ValueError(
          f"attention-pool width {embed_dim} (= 32*width) is not divisible by heads={heads}; "
          "pick heads that divide it (OpenAI uses width*32//64)."
      )
    self.heads = heads
    self.head_dim = embed_dim // heads
    self.dtype = dtype
    self.positional_embedding = nnx.Param(
        jax.random.normal(rngs.params(), (spatial_dim**2 + 1, embed_dim)) * embed_dim**-0.5
    )
    std = embed_dim**-0.5  # OpenAI initialize_parameters: c_proj.in_features ** -0.5

    def linear(out_dim: int) -> nnx.Linear:
      return nnx.Linear(
          embed_dim,
          out_dim,
          dtype=dtype,
          param_dtype=jnp.float32,
          kernel_init=jax.nn.initializers.normal(std),
          bias_init=jax.nn.initializers.zeros,
          rngs=rngs,
      )

    self.q_proj = linear(embed_dim)
    self.k_proj = linear(embed_dim)
    self.v_proj = linear(embed_dim)
    self.c_proj = linear(output_dim)

  def __call__(self, x: jax.Array) -> jax.Array:
    """[B, H, W, C] feature map -> [B, output_dim]."""
    batch, height, width, channels = x.shape
    tokens = x.reshape(batch, height * width, channels)
    tokens = jnp.concatenate([tokens.mean(axis=1, keepdims=True), tokens], axis=1)
    tokens = tokens + self.positional_embedding[...].astype(tokens.dtype)
    heads = lambda t: t.reshape(batch, t.shape[1], self.heads, self.head_dim)
    q = heads(self.q_proj(tokens[:, :1])) * jnp.asarray(self.head_dim**-0.5, self.dtype)
    k = heads(self.k_proj(tokens))
    v = heads(self.v_proj(tokens))
    # One query token leaves a fused kernel nothing to save: the pool keeps the einsum attention everywhere.
    pooled = layers_lib.einsum_attention(q, k, v, causal=False)  # [B, 1, heads, head_dim]
    return self.c_proj(pooled.reshape(batch, channels))


class ModifiedResNet(nnx.Module):
  """Stem (3 convs, avgpool 2) -> layer1..layer4 of Bottlenecks -> AttentionPool2d."""

  def __init__(
      self,
      *,
      image_size: int,
      layers: Sequence[int],
      width: int,
      heads: int,
      output_dim: int,
      dtype: jnp.dtype = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if image_size % 32:
      raise ValueError(f"image_size={image_size} must be a multiple of 32 for the ResNet (total stride 32).")
    if len(layers) != 4:
      raise ValueError(f"layers={tuple(layers)} must give 4 stage depths, e.g. (3, 4, 6, 3).")
    self.image_size = image_size
    self.dtype = jnp.dtype(dtype)
    dtype = self.dtype
    half = width // 2
    self.conv1 = _conv(3, half, 3, stride=2, dtype=dtype, rngs=rngs)
    self.bn1 = _batch_norm(half, dtype=dtype, rngs=rngs)
    self.conv2 = _conv(half, half, 3, dtype=dtype, rngs=rngs)
    self.bn2 = _batch_norm(half, dtype=dtype, rngs=rngs)
    self.conv3 = _conv(half, width, 3, dtype=dtype, rngs=rngs)
    self.bn3 = _batch_norm(width, dtype=dtype, rngs=rngs)

    in_ch = width

    def stage(planes: int, depth: int, stride: int) -> nnx.List:
      nonlocal in_ch
      blocks = [Bottleneck(in_ch, planes, stride=stride, dtype=dtype, rngs=rngs)]
      in_ch = planes * EXPANSION
      blocks += [Bottleneck(in_ch, planes, dtype=dtype, rngs=rngs) for _ in range(1, depth)]
      return nnx.List(blocks)

    self.layer1 = stage(width, layers[0], 1)
    self.layer2 = stage(width * 2, layers[1], 2)
    self.layer3 = stage(width * 4, layers[2], 2)
    self.layer4 = stage(width * 8, layers[3], 2)
    self.attnpool = AttentionPool2d(
        spatial_dim=image_size // 32, embed_dim=width * 32, heads=heads, output_dim=output_dim, dtype=dtype, rngs=rngs
    )

  def __call__(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Float NHWC images [B, S, S, 3] -> [B, output_dim]; `train`: batch (else running) BN stats."""
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"images have shape {tuple(images.shape)}; expected NHWC [B, *{expected}] "
          "(transpose NCHW inputs, resize to the model's image_size)."
      )
    eval_mode = not train
    x = images.astype(self.dtype)
    x = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=eval_mode))
    x = jax.nn.relu(self.bn2(self.conv2(x), use_running_average=eval_mode))
    x = jax.nn.relu(self.bn3(self.conv3(x), use_running_average=eval_mode))
    x = _avg_pool(x, 2)
    for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
      for block in stage:
        x = block(x, train=train)
    return self.attnpool(x)


def resnet_flops(*, image_size: int, layers: Sequence[int], width: int, output_dim: int) -> float:
  """Forward FLOPs of one image (2 per multiply-add), convolutions and attention pool only.

  A conv costs 2 * H_out * W_out * C_in * C_out * k^2. The attention pool projects all T = HW+1
  tokens to k and v, only the query token to q, attends (2 * 2 * T * E) and projects to
  `output_dim`. BatchNorm, ReLU and average pools are ignored.
  """

  def conv(res: int, c_in: int, c_out: int, k: int) -> int:
    return 2 * res * res * c_in * c_out * k * k

  res = image_size // 2
  half = width // 2
  total = conv(res, 3, half, 3) + conv(res, half, half, 3) + conv(res, half, width, 3)
  res //= 2
  in_ch = width
  for stage_index, depth in enumerate(layers):
    planes = width * 2**stage_index
    out_ch = planes * EXPANSION
    for block_index in range(depth):
      stride = 2 if stage_index > 0 and block_index == 0 else 1
      out_res = res // stride
      total += conv(res, in_ch, planes, 1) + conv(res, planes, planes, 3)
      total += conv(out_res, planes, out_ch, 1)
      if stride > 1 or in_ch != out_ch:
        total += conv(out_res, in_ch, out_ch, 1)
      in_ch, res = out_ch, out_res
  embed = width * 32
  tokens = res * res + 1
  total += 2 * embed * embed * (1 + 2 * tokens) + 4 * tokens * embed + 2 * embed * output_dim
  return float(total)
