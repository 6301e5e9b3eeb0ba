"""Transformer building blocks shared by the CLIP image and text towers.

The layout follows Hugging Face's `CLIPEncoderLayer` (separate `q_proj`/`k_proj`/`v_proj`/
`out_proj`, `fc1`/`fc2`, `layer_norm1`/`layer_norm2`) so HF weights map one to one, and OpenAI's
fused `in_proj_weight` splits into three. Kernels are stored `[in, out]` (flax convention): an
importer transposes PyTorch `[out, in]` weights.

Mixed precision: matmuls run in `dtype` (float32 or bfloat16); parameters are always float32;
layer norms and the attention softmax always run in float32, as in OpenAI's fp16 training.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

LAYER_NORM_EPS = 1e-5

Initializer = jax.nn.initializers.Initializer


def quick_gelu(x: jax.Array) -> jax.Array:
  """OpenAI CLIP's sigmoid approximation of GELU: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def exact_gelu(x: jax.Array) -> jax.Array:
  """The erf GELU that Hugging Face calls "gelu"."""
  return jax.nn.gelu(x, approximate=False)


def tanh_gelu(x: jax.Array) -> jax.Array:
  """The tanh approximation of GELU: Hugging Face's "gelu_pytorch_tanh" (SigLIP) and "gelu_new"."""
  return jax.nn.gelu(x, approximate=True)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": quick_gelu,
    "gelu": exact_gelu,
    "gelu_tanh": tanh_gelu,
}


def activation_by_name(name: str) -> Callable[[jax.Array], jax.Array]:
  """Looks up an MLP activation; raises a ValueError listing the valid names."""
  if name not in ACTIVATIONS:
    raise ValueError(f"act={name!r} is unknown; use one of {sorted(ACTIVATIONS)}.")
  return ACTIVATIONS[name]


def torch_default_init() -> Initializer:
  """PyTorch's default Linear/Conv init (kaiming_uniform, a=sqrt(5)): U(+-1/sqrt(fan_in))."""
  return jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LayerNorm(nnx.LayerNorm):
  """LayerNorm (eps 1e-5 as in CLIP; SigLIP uses 1e-6) computed in float32, cast back to the input dtype.

  Mirrors OpenAI's fp16-safe `LayerNorm` subclass: the statistics of a bfloat16 residual stream are
  taken in float32, while the stream itself keeps its compute dtype.
  """

  def __init__(self, num_features: int, *, epsilon: float = LAYER_NORM_EPS, rngs: nnx.Rngs):
    super().__init__(num_features, epsilon=epsilon, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:  # pytype: disable=signature-mismatch
    return super().__call__(x.astype(jnp.float32)).astype(x.dtype)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
  """Softmax attention over heads with a float32 softmax.

  Args:
    q: [B, Lq, H, Dh] queries, already scaled by Dh**-0.5.
    k: [B, Lk, H, Dh] keys.
    v: [B, Lk, H, Dh] values.
    causal: if True, query i only sees keys j <= i (requires Lq == Lk).

  Returns:
    [B, Lq, H, Dh] in the dtype of `v`.
  """
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if causal:
    q_len, k_len = logits.shape[-2:]
    visible = jnp.tril(jnp.ones((q_len, k_len), dtype=bool))
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v/out projections (Hugging Face `CLIPAttention` layout)."""

  def __init__(
      self,
      width: int,
      heads: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      in_proj_std: float | None = None,
      out_proj_std: float | None = None,
      rngs: nnx.Rngs,
  ):
    """Builds the four projections.

    Args:
      width: model width; must be divisible by `heads`.
      heads: number of attention heads.
      dtype: matmul compute dtype.
      in_proj_std: normal std of the q/k/v kernels (None: PyTorch default init).
      out_proj_std: normal std of the out kernel (None: PyTorch default init).
      rngs: parameter RNG streams.
    """
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}; pick heads that divide it.")
    self.width = width
    self.heads = heads
    self.head_dim = width // heads
    self.dtype = dtype

    def linear(std: float | None) -> nnx.Linear:
      init = torch_default_init() if std is None else jax.nn.initializers.normal(std)
      return nnx.Linear(
          width,
          width,
          use_bias=True,
          dtype=dtype,
          param_dtype=jnp.float32,
          kernel_init=init,
          bias_init=jax.nn.initializers.zeros,
          rngs=rngs,
      )

    self.q_proj = linear(in_proj_std)
    self.k_proj = linear(in_proj_std)
    self.v_proj = linear(in_proj_std)
    self.out_proj = linear(out_proj_std)

  def __call__(self, x: jax.Array, *, causal: bool = False) -> jax.Array:
    """Self-attention: [B, L, width] -> [B, L, width]."""
    return self.attend(x, x, causal=causal)

  def attend(self, queries: jax.Array, tokens: jax.Array, *, causal: bool = False) -> jax.Array:
    """`queries` [B, Lq, width] attend to `tokens` [B, Lk, width] -> [B, Lq, width].

    Cross-attention is what SigLIP's attention-pooling head does with its learned probe.
    """
    batch = queries.shape[0]
    split = lambda t: t.reshape(batch, t.shape[1], self.heads, self.head_dim)
    q = split(self.q_proj(queries)) * jnp.asarray(self.head_dim**-0.5, self.dtype)
    k = split(self.k_proj(tokens))
    v = split(self.v_proj(tokens))
    out = dot_product_attention(q, k, v, causal=causal)
    return self.out_proj(out.reshape(batch, queries.shape[1], self.width))


class MLP(nnx.Module):
  """Two-layer feed-forward block `fc2(act(fc1(x)))` with hidden size `mlp_width`.

  `mlp_width` None means OpenAI's 4 * width; other CLIP-family models differ (ViT-bigG-14:
  8192 for width 1664; SigLIP So400m: 4304 for 1152).
  """

  def __init__(
      self,
      width: int,
      *,
      mlp_width: int | None = None,
      act: str = "quick_gelu",
      dtype: jnp.dtype = jnp.float32,
      fc1_std: float | None = None,
      fc2_std: float | None = None,
      rngs: nnx.Rngs,
  ):
    self.act = act
    activation_by_name(act)  # fail at construction, not at the first call
    hidden = 4 * width if mlp_width is None else mlp_width
    init = lambda std: torch_default_init() if std is None else jax.nn.initializers.normal(std)
    self.fc1 = nnx.Linear(
        width,
        hidden,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=init(fc1_std),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )
    self.fc2 = nnx.Linear(
        hidden,
        width,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=init(fc2_std),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(activation_by_name(self.act)(self.fc1(x)))


class ResidualAttentionBlock(nnx.Module):
  """Pre-LN transformer block: x + attn(ln1(x)), then x + mlp(ln2(x))."""

  def __init__(
      self,
      width: int,
      heads: int,
      *,
      layers_in_stack: int,
      mlp_width: int | None = None,
      act: str = "quick_gelu",
      causal: bool = False,
      dtype: jnp.dtype = jnp.float32,
      layer_norm_eps: float = LAYER_NORM_EPS,
      rngs: nnx.Rngs,
  ):
    """Builds one block with OpenAI CLIP's `initialize_parameters` stds.

    Args:
      width: residual width.
      heads: attention heads (must divide width).
      layers_in_stack: depth of the whole stack; scales the output-projection std
        (width**-0.5 * (2*layers)**-0.5) so the residual stream's variance stays bounded.
      mlp_width: hidden width of the MLP (None: 4 * width).
      act: 'quick_gelu' or 'gelu'.
      causal: mask future positions (text tower).
      dtype: matmul compute dtype.
      layer_norm_eps: epsilon of both layer norms.
      rngs: parameter RNG streams.
    """
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers_in_stack) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.causal = causal
    self.layer_norm1 = LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.self_attn = MultiHeadAttention(
        width, heads, dtype=dtype, in_proj_std=attn_std, out_proj_std=proj_std, rngs=rngs
    )
    self.layer_norm2 = LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.mlp = MLP(width, mlp_width=mlp_width, act=act, dtype=dtype, fc1_std=fc_std, fc2_std=proj_std, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = x + self.self_attn(self.layer_norm1(x), causal=self.causal).astype(x.dtype)
    return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


def _apply_block(block: ResidualAttentionBlock, x: jax.Array) -> jax.Array:
  # A free function: nnx.remat refuses bound methods.
  return block(x)


def make_blocks(
    width: int,
    layers: int,
    heads: int,
    *,
    act: str,
    causal: bool,
    dtype: jnp.dtype,
    rngs: nnx.Rngs,
    mlp_width: int | None = None,
    layer_norm_eps: float = LAYER_NORM_EPS,
) -> nnx.List:
  """A stack of `layers` independent ResidualAttentionBlocks (no shared submodules)."""
  return nnx.List(
      [
          ResidualAttentionBlock(
              width,
              heads,
              layers_in_stack=layers,
              mlp_width=mlp_width,
              act=act,
              causal=causal,
              dtype=dtype,
              layer_norm_eps=layer_norm_eps,
              rngs=rngs,
          )
          for _ in range(layers)
      ]
  )


# `model.remat`: False, True (= 'full'), or a policy naming what each block keeps for the backward pass.
REMAT_POLICIES = {
    "full": None,  # Keep nothing: recompute the whole block (least memory).
    "dots_saveable": jax.checkpoint_policies.dots_saveable,  # Keep matmul outputs, recompute the rest.
    "dots_no_batch_saveable": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def apply_blocks(blocks: nnx.List, x: jax.Array, *, remat: bool | str) -> jax.Array:
  """Runs the stack; with `remat`, each block's activations are recomputed in the backward pass."""
  if remat:
    policy = REMAT_POLICIES["full" if remat is True else remat]  # `remat` is True or a policy name.
    apply = nnx.remat(_apply_block, policy=policy)
  else:
    apply = _apply_block
  for block in blocks:
    x = apply(block, x)
  return x
