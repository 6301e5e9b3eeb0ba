"""CLIP's Vision Transformer image tower (OpenAI `VisionTransformer`, HF `CLIPVisionTransformer`).

Attribute names follow Hugging Face (`patch_embedding`, `class_embedding`, `position_embedding`,
`pre_layrnorm` [sic], `layers`, `post_layernorm`). The tower returns the post-LN CLS feature
[B, width]; the projection to the joint embedding lives in `clip.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from roclip_jax.models import layers as layers_lib


class VisionTransformer(nnx.Module):
  """Patchify -> [CLS; patches] + positions -> pre-LN -> blocks -> post-LN(CLS)."""

  def __init__(
      self, *, image_size: int, patch_size: int, width: int, layers: int, heads: int,
      mlp_width: int | None = None, act: str = "quick_gelu", dtype: jnp.dtype = jnp.float32,
      remat: bool = False, rngs: nnx.Rngs):
    if patch_size <= 0 or image_size % patch_size:
      raise ValueError(
          f"image_size={image_size} is not divisible by patch_size={patch_size}; "
          "choose a patch size that tiles the image.")
    self.image_size = image_size
    self.patch_size = patch_size
    self.width = width
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    grid = image_size // patch_size
    scale = width ** -0.5  # OpenAI: class/positional embeddings ~ N(0, 1/width)
    self.patch_embedding = nnx.Conv(
        3, width, kernel_size=(patch_size, patch_size), strides=(patch_size, patch_size),
        padding="VALID", use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=layers_lib.torch_default_init(), rngs=rngs)
    self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
    self.position_embedding = nnx.Param(
        scale * jax.random.normal(rngs.params(), (grid * grid + 1, width)))
    self.pre_layrnorm = layers_lib.LayerNorm(width, rngs=rngs)
    self.layers = layers_lib.make_blocks(
        width, layers, heads, mlp_width=mlp_width, act=act, causal=False, dtype=self.dtype,
        rngs=rngs)
    self.post_layernorm = layers_lib.LayerNorm(width, rngs=rngs)

  def __call__(self, images: jax.Array) -> jax.Array:
    """Float NHWC images [B, image_size, image_size, 3] -> float32 pooled CLS feature [B, width]."""
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"images have shape {tuple(images.shape)}; expected NHWC [B, *{expected}] "
          "(transpose NCHW inputs, resize to the model's image_size).")
    x = self.patch_embedding(images.astype(self.dtype))  # [B, g, g, width]
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)  # row-major (h, w), as torch's flatten of [C, g, g]
    cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (batch, 1, self.width))
    x = jnp.concatenate([cls, x], axis=1) + self.position_embedding[...].astype(self.dtype)
    x = self.pre_layrnorm(x)
    x = layers_lib.apply_blocks(self.layers, x, remat=self.remat)
    # The pooled feature feeds the float32 projection: normalise it in float32 and keep it there.
    return self.post_layernorm(x[:, 0].astype(jnp.float32))


def vit_flops(*, image_size: int, patch_size: int, width: int, layers: int,
              mlp_width: int | None = None) -> float:
  """Forward FLOPs of one image through the tower (projection excluded), 2 per multiply-add.

  Counts only matmuls/convolutions: patch conv N*(3*p*p)*D, then per block
  8*T*D^2 (q,k,v,out: 4*T*D^2 MACs) + 4*T*D*M (MLP of hidden width M: 2*T*D*M MACs; with
  M = 4D that makes 24*T*D^2 in all) + 4*T^2*D (QK^T and AV), with N = (image_size/p)^2 patches
  and T = N + 1 tokens. LayerNorm, softmax, GELU and adds are ignored (they are < 1% at these
  sizes), matching open_clip's profile. `mlp_width` None means 4 * width.
  """
  patches = (image_size // patch_size) ** 2
  tokens = patches + 1
  mlp_width = 4 * width if mlp_width is None else mlp_width
  patch_conv = 2 * patches * 3 * patch_size * patch_size * width
  per_block = 8 * tokens * width ** 2 + 4 * tokens * width * mlp_width + 4 * tokens ** 2 * width
  return float(patch_conv + layers * per_block)
