"""CLIP's Vision Transformer image tower (OpenAI `VisionTransformer`, HF `CLIPVisionTransformer`).

Attribute names follow Hugging Face (`patch_embedding`, `class_embedding`, `position_embedding`,
`pre_layrnorm` [sic], `layers`, `post_layernorm`, and SigLIP's `head`). The tower returns the post-LN
CLS feature [B, width], or SigLIP's attention-pooled one; the projection to the joint embedding
(CLIP only) lives in `clip.py`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from roclip_jax.models import layers as layers_lib

POOLS = ("cls", "map")


class AttentionPoolingHead(nnx.Module):
  """SigLIP's multi-head attention pooling ("MAP", HF `SiglipMultiheadAttentionPoolingHead`).

  A learned probe attends to every token; then `x + mlp(layernorm(x))`, with the tower's MLP width
  and activation. Attribute names follow Hugging Face (`probe`, `attention`, `layernorm`, `mlp`).
  """

  def __init__(
      self,
      width: int,
      heads: int,
      *,
      mlp_width: int | None,
      act: str,
      dtype: jnp.dtype,
      layer_norm_eps: float,
      attention_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    self.probe = nnx.Param(width**-0.5 * jax.random.normal(rngs.params(), (1, 1, width)))
    self.attention = layers_lib.MultiHeadAttention(width, heads, dtype=dtype, attention_impl=attention_impl, rngs=rngs)
    self.layernorm = layers_lib.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.mlp = layers_lib.MLP(width, mlp_width=mlp_width, act=act, dtype=dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """[B, T, width] -> [B, width] in the dtype of `tokens`."""
    probe = jnp.broadcast_to(self.probe[...].astype(tokens.dtype), (tokens.shape[0], 1, tokens.shape[-1]))
    x = self.attention.attend(probe, tokens).astype(tokens.dtype)
    x = x + self.mlp(self.layernorm(x)).astype(x.dtype)
    return x[:, 0]


class VisionTransformer(nnx.Module):
  """Patchify -> [CLS; patches] + positions -> pre-LN -> blocks -> post-LN(CLS).

  SigLIP's variant (`pool='map'`, `patch_bias=True`, `pre_norm=False`): patches (no class token)
  + positions -> blocks -> post-LN over all tokens -> attention-pooling head.
  """

  def __init__(
      self,
      *,
      image_size: int,
      patch_size: int,
      width: int,
      layers: int,
      heads: int,
      mlp_width: int | None = None,
      act: str = "quick_gelu",
      dtype: jnp.dtype = jnp.float32,
      remat: bool = False,
      pool: str = "cls",
      patch_bias: bool = False,
      pre_norm: bool = True,
      layer_norm_eps: float = layers_lib.LAYER_NORM_EPS,
      attention_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    if patch_size <= 0 or image_size % patch_size:
      raise ValueError(
          f"image_size={image_size} is not divisible by patch_size={patch_size}; "
          "choose a patch size that tiles the image."
      )
    if pool not in POOLS:
      raise ValueError(f"pool={pool!r} is unknown; use one of {POOLS}.")
    self.image_size = image_size
    self.patch_size = patch_size
    self.width = width
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    self.pool = pool
    grid = image_size // patch_size
    scale = width**-0.5  # OpenAI: class/positional embeddings ~ N(0, 1/width)
    self.patch_embedding = nnx.Conv(
        3,
        width,
        kernel_size=(patch_size, patch_size),
        strides=(patch_size, patch_size),
        padding="VALID",
        use_bias=patch_bias,
        dtype=self.dtype,
        param_dtype=jnp.float32,
        kernel_init=layers_lib.torch_default_init(),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )
    # The draws happen in this order for the CLIP layout, so its initial weights stay as they were.
    if pool == "cls":
      self.class_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (width,)))
    tokens = grid * grid + (pool == "cls")
    self.position_embedding = nnx.Param(scale * jax.random.normal(rngs.params(), (tokens, width)))
    if pre_norm:
      self.pre_layrnorm = layers_lib.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    else:
      self.pre_layrnorm = None
    self.layers = layers_lib.make_blocks(
        width,
        layers,
        heads,
        mlp_width=mlp_width,
        act=act,
        causal=False,
        dtype=self.dtype,
        layer_norm_eps=layer_norm_eps,
        attention_impl=attention_impl,
        rngs=rngs,
    )
    self.post_layernorm = layers_lib.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    if pool == "map":
      self.head = AttentionPoolingHead(
          width,
          heads,
          mlp_width=mlp_width,
          act=act,
          dtype=self.dtype,
          layer_norm_eps=layer_norm_eps,
          attention_impl=attention_impl,
          rngs=rngs,
      )

  def __call__(self, images: jax.Array) -> jax.Array:
    """Float NHWC images [B, image_size, image_size, 3] -> float32 pooled feature [B, width]."""
    expected = (self.image_size, self.image_size, 3)
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
      raise ValueError(
          f"images have shape {tuple(images.shape)}; expected NHWC [B, *{expected}] "
          "(transpose NCHW inputs, resize to the model's image_size)."
      )
    x = self.patch_embedding(images.astype(self.dtype))  # [B, g, g, width]
    batch = x.shape[0]
    x = x.reshape(batch, -1, self.width)  # row-major (h, w), as torch's flatten of [C, g, g]
    if self.pool == "cls":
      cls = jnp.broadcast_to(self.class_embedding[...].astype(self.dtype), (batch, 1, self.width))
      x = jnp.concatenate([cls, x], axis=1)
    x = x + self.position_embedding[...].astype(self.dtype)
    if self.pre_layrnorm is not None:
      x = self.pre_layrnorm(x)
    x = layers_lib.apply_blocks(self.layers, x, remat=self.remat)
    if self.pool == "map":
      return self.head(self.post_layernorm(x)).astype(jnp.float32)
    # The pooled feature feeds the float32 projection: normalise it in float32 and keep it there.
    return self.post_layernorm(x[:, 0].astype(jnp.float32))


def vit_flops(
    *, image_size: int, patch_size: int, width: int, layers: int, mlp_width: int | None = None, pool: str = "cls"
) -> float:
  """Forward FLOPs of one image through the tower (projection excluded), 2 per multiply-add.

  Counts only matmuls/convolutions: patch conv N*(3*p*p)*D, then per block
  8*T*D^2 (q,k,v,out: 4*T*D^2 MACs) + 4*T*D*M (MLP of hidden width M: 2*T*D*M MACs; with
  M = 4D that makes 24*T*D^2 in all) + 4*T^2*D (QK^T and AV), with N = (image_size/p)^2 patches
  and T = N + 1 tokens. LayerNorm, softmax, GELU and adds are ignored (they are < 1% at these
  sizes), matching open_clip's profile. `mlp_width` None means 4 * width.
  `pool='map'` (SigLIP): T = N (no class token), plus the head: the probe's q and out projections
  4*D^2, k and v of every token 4*T*D^2, attention 4*T*D, and one MLP row 4*D*M.
  """
  patches = (image_size // patch_size) ** 2
  tokens = patches + 1 if pool == "cls" else patches
  mlp_width = 4 * width if mlp_width is None else mlp_width
  patch_conv = 2 * patches * 3 * patch_size * patch_size * width
  per_block = 8 * tokens * width**2 + 4 * tokens * width * mlp_width + 4 * tokens**2 * width
  head = 0 if pool == "cls" else 4 * width**2 + 4 * tokens * width**2 + 4 * tokens * width + 4 * width * mlp_width
  return float(patch_conv + layers * per_block + head)
