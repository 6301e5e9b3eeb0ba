"""CLIP's causal text transformer (OpenAI `encode_text`, HF `CLIPTextTransformer`).

Pooling takes the feature at the end-of-text token, found as the argmax of the token ids in each
row: this relies on the tokenizer padding with 0 and on EOT (49407) being the largest id, as in
OpenAI's and open_clip's tokenizers (Hugging Face pads with EOT, which would still pick the first
EOT since argmax returns the first maximum).

SigLIP's variant (`causal=False`, `pool='last'`): bidirectional attention and the feature at the last
position, which is padding whenever the caption is shorter than the context; SigLIP pads every
caption to the full context with its pad token and uses no attention mask, so the pad tokens are
part of the input the model was trained on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from roclip_jax.models import layers as layers_lib

POOLS = ("eot", "last")


class TextTransformer(nnx.Module):
  """Token + position embeddings -> causal blocks -> final LN -> feature at the EOT position.

  `causal=False` and `pool='last'` give SigLIP's text tower (bidirectional, last position).
  """

  def __init__(
      self,
      *,
      vocab_size: int,
      context_length: int,
      width: int,
      layers: int,
      heads: int,
      mlp_width: int | None = None,
      act: str = "quick_gelu",
      dtype: jnp.dtype = jnp.float32,
      remat: bool = False,
      causal: bool = True,
      pool: str = "eot",
      layer_norm_eps: float = layers_lib.LAYER_NORM_EPS,
      attention_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    if pool not in POOLS:
      raise ValueError(f"pool={pool!r} is unknown; use one of {POOLS}.")
    self.pool = pool
    self.vocab_size = vocab_size
    self.context_length = context_length
    self.dtype = jnp.dtype(dtype)
    self.remat = remat
    # OpenAI initialize_parameters: token std 0.02, positional std 0.01.
    self.token_embedding = nnx.Param(0.02 * jax.random.normal(rngs.params(), (vocab_size, width)))
    self.position_embedding = nnx.Param(0.01 * jax.random.normal(rngs.params(), (context_length, width)))
    self.layers = layers_lib.make_blocks(
        width,
        layers,
        heads,
        mlp_width=mlp_width,
        act=act,
        causal=causal,
        dtype=self.dtype,
        layer_norm_eps=layer_norm_eps,
        attention_impl=attention_impl,
        rngs=rngs,
    )
    self.final_layer_norm = layers_lib.LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)

  def token_features(self, tokens: jax.Array) -> jax.Array:
    """Integer tokens [B, L] (L <= context_length) -> float32 per-position features [B, L, width].

    Position i depends only on tokens[:, :i+1] with the causal mask (CLIP), on all of them without
    (SigLIP); `__call__` pools one position.
    """
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f"tokens must be an integer array [B, L]; got {tokens.dtype}{list(tokens.shape)}.")
    length = tokens.shape[1]
    if length > self.context_length:
      raise ValueError(
          f"tokens have length {length} > context_length={self.context_length}; truncate them in "
          "the tokenizer or raise text.context_length."
      )
    x = jnp.take(self.token_embedding[...], tokens, axis=0)
    x = (x + self.position_embedding[:length]).astype(self.dtype)
    x = layers_lib.apply_blocks(self.layers, x, remat=self.remat)
    return self.final_layer_norm(x.astype(jnp.float32))

  def __call__(self, tokens: jax.Array) -> jax.Array:
    """Integer tokens [B, L] -> float32 feature at each row's EOT (argmax id) position, or at the
    last position (`pool='last'`), [B, D]."""
    features = self.token_features(tokens)
    if self.pool == "last":
      return features[:, -1]
    eot_position = jnp.argmax(tokens, axis=-1)
    return jnp.take_along_axis(features, eot_position[:, None, None], axis=1)[:, 0]


def text_flops(*, context_length: int, width: int, layers: int, mlp_width: int | None = None) -> float:
  """Forward FLOPs of one caption (projection excluded), 2 per multiply-add.

  Per block 8*L*D^2 (q, k, v, out) + 4*L*D*M (the MLP of hidden width M; 24*L*D^2 in all with
  M = 4D) + 4*L^2*D (QK^T and AV), over the full context L (padding included: the tower runs on
  all positions). Embedding lookups cost no FLOPs; norms, softmax and activations are ignored.
  `mlp_width` None means 4 * width.
  """
  length = context_length
  mlp_width = 4 * width if mlp_width is None else mlp_width
  return float(layers * (8 * length * width**2 + 4 * length * width * mlp_width + 4 * length**2 * width))
