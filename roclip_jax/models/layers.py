"""Transformer building blocks shared by the CLIP image and text towers.

The layout follows Hugging Face's `CLIPEncoderLayer` (separate `q_proj`/`k_proj`/`v_proj`/
`out_proj`, `fc1`/`fc2`, `layer_norm1`/`layer_norm2`) so HF weights map one to one, and OpenAI's
fused `in_proj_weight` splits into three. Kernels are stored `[in, out]` (flax convention): an
importer transposes PyTorch `[out, in]` weights.

Mixed precision: matmuls run in `dtype` (float32 or bfloat16); parameters are always float32;
layer norms and the attention softmax always run in float32, as in OpenAI's fp16 training.

Attention kernels (`model.attention_impl`, `attention_kernel`): by default ('auto') the hand-written
einsum attention below, except on an sm80+ NVIDIA GPU with bfloat16/float16 inputs and a head dim cuDNN
supports, where `jax.nn.dot_product_attention` runs cuDNN's fused kernel. 'xla' and 'cudnn' force
`jax.nn.dot_product_attention` with that implementation.
"""

from __future__ import annotations

from typing import Callable

from absl import logging
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


def einsum_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool) -> jax.Array:
  """Softmax attention over heads with a float32 softmax, written out (materialised logits).

  The default kernel on CPU and TPU: every published table was measured with exactly this arithmetic,
  so it stays as it is (`jax.nn.dot_product_attention`'s XLA path computes the same function with
  different rounding).

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


# `model.attention_impl`: which kernel computes the attention (see `attention_kernel`).
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
# cuDNN's fused (flash) attention takes half-precision inputs only, and head dims that are a multiple of
# 8 up to 128 on every supported GPU (256 from Hopper on; 128 is the limit that holds everywhere).
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_MAX_HEAD_DIM = 128


def _is_cudnn_gpu() -> bool:
  """Whether JAX runs on an NVIDIA GPU recent enough for cuDNN's fused attention (Ampere, sm80+)."""
  if jax.default_backend() != "gpu":
    return False
  capability = getattr(jax.devices()[0], "compute_capability", None)
  try:  # "8.0" on CUDA; ROCm names an architecture ("gfx90a") and has no cuDNN.
    return tuple(int(part) for part in str(capability).split(".")[:2]) >= (8, 0)
  except ValueError:
    return False


def cudnn_supports(dtype: jnp.dtype, head_dim: int) -> bool:
  """Whether cuDNN's fused attention has a kernel for these inputs (the GPU itself aside)."""
  return jnp.dtype(dtype) in _CUDNN_DTYPES and head_dim % 8 == 0 and head_dim <= _CUDNN_MAX_HEAD_DIM


def attention_kernel(impl: str, dtype: jnp.dtype, head_dim: int) -> str:
  """The kernel `model.attention_impl` runs for inputs of `dtype` and `head_dim` on this host.

  * 'auto' (default): 'cudnn' on an sm80+ NVIDIA GPU when `cudnn_supports` the inputs (ViT-B/32 in
    bfloat16: head dim 64 in both towers); 'einsum' (the hand-written `einsum_attention`, bitwise
    what this framework always computed) everywhere else, CPU and TPU included, and for float32.
  * 'xla': `jax.nn.dot_product_attention(implementation='xla')`, on any platform.
  * 'cudnn': `jax.nn.dot_product_attention(implementation='cudnn')`; `dot_product_attention` raises
    a ValueError where it cannot run.

  Raises:
    ValueError: `impl` is not one of ATTENTION_IMPLS.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention_impl={impl!r} is unknown; use one of {ATTENTION_IMPLS}.")
  if impl != "auto":
    return impl
  return "cudnn" if cudnn_supports(dtype, head_dim) and _is_cudnn_gpu() else "einsum"


def dot_product_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, implementation: str = "auto"
) -> jax.Array:
  """Softmax attention over heads with a float32 softmax, by the kernel `implementation` selects.

  Every kernel keeps OpenAI's fp16 recipe: q.k logits accumulate in float32, the causal mask and the
  softmax are applied in float32, and the probabilities are cast to the dtype of `v` for the
  probabilities.v matmul (JAX's XLA path does exactly this; cuDNN's flash kernel keeps its running
  softmax statistics in float32 and feeds half-precision probabilities to the second matmul).

  Args:
    q: [B, Lq, H, Dh] queries, already scaled by Dh**-0.5 (so every kernel gets scale=1).
    k: [B, Lk, H, Dh] keys.
    v: [B, Lk, H, Dh] values.
    causal: if True, query i only sees keys j <= i (requires Lq == Lk).
    implementation: 'auto', 'xla' or 'cudnn' (`attention_kernel`).

  Returns:
    [B, Lq, H, Dh] in the dtype of `v`.

  Raises:
    ValueError: `implementation` is unknown, or 'cudnn' cannot run these inputs on this host.
  """
  kernel = attention_kernel(implementation, q.dtype, q.shape[-1])
  if kernel == "einsum":
    return einsum_attention(q, k, v, causal=causal)
  if kernel == "xla":
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=causal, implementation="xla")
  if implementation == "cudnn" and not cudnn_supports(q.dtype, q.shape[-1]):
    raise ValueError(
        f"model.attention_impl='cudnn' cannot run {q.dtype} inputs with head dim {q.shape[-1]}: cuDNN's fused "
        "attention needs bfloat16/float16 and a head dim that is a multiple of 8 up to 128. Set model.dtype="
        "'bfloat16', or attention_impl='auto' (cuDNN where it applies) or 'xla'."
    )
  try:
    # JAX runs cuDNN's remaining checks (a CUDA GPU, cuDNN's version) while tracing, so they land here.
    return jax.nn.dot_product_attention(q, k, v, scale=1.0, is_causal=causal, implementation="cudnn")
  except (NotImplementedError, RuntimeError, ValueError) as e:
    if implementation == "cudnn":
      raise ValueError(
          f"model.attention_impl='cudnn' cannot run on this host ({jax.default_backend()}: {e}); it needs an "
          "sm80+ NVIDIA GPU with cuDNN. Use attention_impl='auto' (cuDNN where it applies, the einsum "
          "attention elsewhere) or 'xla'."
      ) from e
    # 'auto' picked cuDNN but it refused this shape: the einsum attention computes the same function.
    logging.warning("cuDNN fused attention refused q%s %s (%s); using the einsum attention.", q.shape, q.dtype, e)
    return einsum_attention(q, k, v, causal=causal)


class MultiHeadAttention(nnx.Module):
  """Self-attention with separate q/k/v/out projections (Hugging Face `CLIPAttention` layout).

  `attention_impl` picks the attention kernel (`attention_kernel`) and changes no parameter.
  """

  def __init__(
      self,
      width: int,
      heads: int,
      *,
      dtype: jnp.dtype = jnp.float32,
      in_proj_std: float | None = None,
      out_proj_std: float | None = None,
      attention_impl: str = "auto",
      rngs: nnx.Rngs,
  ):
    """Builds the four projections.

    Args:
      width: model width; must be divisible by `heads`.
      heads: number of attention heads.
      dtype: matmul compute dtype.
      in_proj_std: normal std of the q/k/v kernels (None: PyTorch default init).
      out_proj_std: normal std of the out kernel (None: PyTorch default init).
      attention_impl: 'auto', 'xla' or 'cudnn' (see `attention_kernel`).
      rngs: parameter RNG streams.
    """
    if width % heads:
      raise ValueError(f"width={width} is not divisible by heads={heads}; pick heads that divide it.")
    if attention_impl not in ATTENTION_IMPLS:  # Fail at construction, not at the first call.
      raise ValueError(f"attention_impl={attention_impl!r} is unknown; use one of {ATTENTION_IMPLS}.")
    self.attention_impl = attention_impl
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
    out = dot_product_attention(q, k, v, causal=causal, implementation=self.attention_impl)
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
      attention_impl: str = "auto",
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
      attention_impl: the attention kernel, 'auto', 'xla' or 'cudnn' (`attention_kernel`).
      rngs: parameter RNG streams.
    """
    attn_std = width**-0.5
    proj_std = width**-0.5 * (2 * layers_in_stack) ** -0.5
    fc_std = (2 * width) ** -0.5
    self.causal = causal
    self.layer_norm1 = LayerNorm(width, epsilon=layer_norm_eps, rngs=rngs)
    self.self_attn = MultiHeadAttention(
        width, heads, dtype=dtype, in_proj_std=attn_std, out_proj_std=proj_std, attention_impl=attention_impl, rngs=rngs
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
    attention_impl: str = "auto",
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
              attention_impl=attention_impl,
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
