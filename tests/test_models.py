"""Tests for roclip_jax.models: shapes, pooling, masking, a NumPy block reference, counts."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from roclip_jax import models
from roclip_jax.models import layers as layers_lib

EOT = 49407
BATCH = 3


def _abstract(cfg):
  """The model's graph with shape-only leaves: never materialises weights."""
  return nnx.eval_shape(lambda: models.build(cfg, rngs=nnx.Rngs(0)))


def _with_params_of(cfg, source):
  """A model built from `cfg` (e.g. other dtype/remat) holding `source`'s exact parameters."""
  graphdef, _ = nnx.split(_abstract(cfg))
  return nnx.merge(graphdef, nnx.clone(nnx.state(source)))


def _tokens(rng, eot_positions, length=32):
  """Random ids in [1, EOT) before each row's EOT, then zero padding."""
  tokens = np.zeros((len(eot_positions), length), np.int32)
  for row, eot in enumerate(eot_positions):
    tokens[row, :eot] = rng.integers(1, EOT - 2, size=eot)
    tokens[row, eot] = EOT
  return jnp.asarray(tokens)


def _param_dtypes(model):
  return {leaf.dtype for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))}


@nnx.jit
def _encode(model, images, tokens):
  return model(images, tokens, train=False)


@nnx.jit
def _token_features(text_model, tokens):
  return text_model.token_features(tokens)


@pytest.fixture(scope="module")
def tiny():
  return models.build(models.preset("tiny"), rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tiny_rn():
  return models.build(models.preset("tiny-rn"), rngs=nnx.Rngs(1))


@pytest.fixture(scope="module")
def images():
  return jnp.asarray(np.random.default_rng(0).normal(size=(BATCH, 32, 32, 3)), jnp.float32)


@pytest.fixture(scope="module")
def tokens():
  return _tokens(np.random.default_rng(1), [5, 31, 12])


# ---------------------------------------------------------------- shapes, dtypes and names


def test_vit_and_text_shapes_dtypes(tiny, images, tokens):
  image_features, text_features = _encode(tiny, images, tokens)
  assert image_features.shape == (BATCH, 64) and image_features.dtype == jnp.float32
  assert text_features.shape == (BATCH, 64) and text_features.dtype == jnp.float32
  assert np.isfinite(image_features).all() and np.isfinite(text_features).all()
  assert tiny.logit_scale[...].shape == () and tiny.logit_scale[...].dtype == jnp.float32
  np.testing.assert_allclose(float(tiny.logit_scale[...]), math.log(1 / 0.07), rtol=1e-6)


def test_resnet_shapes_dtypes(tiny_rn, images, tokens):
  image_features, text_features = _encode(tiny_rn, images, tokens)
  assert image_features.shape == (BATCH, 64) and image_features.dtype == jnp.float32
  assert text_features.shape == (BATCH, 64) and text_features.dtype == jnp.float32
  assert np.isfinite(image_features).all()
  assert tiny_rn.visual_projection is None  # attnpool.c_proj already maps to embed_dim (OpenAI)


def test_param_names_follow_hf_and_openai_layouts(tiny, tiny_rn):
  vit_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(tiny, nnx.Param))}
  for path in [
      "vision_model/patch_embedding/kernel",
      "vision_model/class_embedding",
      "vision_model/position_embedding",
      "vision_model/pre_layrnorm/scale",
      "vision_model/layers/1/self_attn/q_proj/kernel",
      "vision_model/layers/1/self_attn/k_proj/bias",
      "vision_model/layers/1/self_attn/v_proj/kernel",
      "vision_model/layers/1/self_attn/out_proj/bias",
      "vision_model/layers/0/layer_norm2/bias",
      "vision_model/layers/0/mlp/fc1/kernel",
      "vision_model/post_layernorm/scale",
      "visual_projection/kernel",
      "text_projection/kernel",
      "text_model/token_embedding",
      "text_model/position_embedding",
      "text_model/final_layer_norm/bias",
      "logit_scale",
  ]:
    assert path in vit_paths, path
  assert "vision_model/patch_embedding/bias" not in vit_paths
  assert "text_projection/bias" not in vit_paths
  rn_paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(tiny_rn))}
  for path in [
      "vision_model/conv3/kernel",
      "vision_model/bn1/mean",
      "vision_model/layer1/0/downsample/0/kernel",
      "vision_model/layer2/0/downsample/1/var",
      "vision_model/layer4/0/bn3/scale",
      "vision_model/attnpool/c_proj/kernel",
      "vision_model/attnpool/positional_embedding",
  ]:
    assert path in rn_paths, path


def test_params_are_float32_and_bn3_starts_at_zero(tiny_rn):
  assert _param_dtypes(tiny_rn) == {np.dtype("float32")}
  np.testing.assert_array_equal(tiny_rn.vision_model.layer3[0].bn3.scale[...], 0.0)


# ---------------------------------------------------------------- text pooling and masking


def test_eot_pooling_ignores_tokens_after_eot_only(tiny, tokens):
  base = tiny.encode_text(tokens)
  after = tokens.at[0, 7].set(123).at[2, 20].set(456)  # rows 0 and 2: after their EOT
  np.testing.assert_allclose(tiny.encode_text(after), base, atol=1e-6)
  before = tokens.at[0, 2].set((tokens[0, 2] + 1) % (EOT - 1) + 1)  # row 0, before its EOT
  changed = tiny.encode_text(before)
  assert np.abs(changed[0] - base[0]).max() > 1e-4
  np.testing.assert_allclose(changed[1:], base[1:], atol=1e-6)  # rows are independent


def test_text_attention_is_causal(tiny, tokens):
  base = _token_features(tiny.text_model, tokens)
  j = 9
  edited = _token_features(tiny.text_model, tokens.at[:, j].set(777))
  np.testing.assert_allclose(edited[:, :j], base[:, :j], atol=1e-6)
  assert (np.abs(edited[:, j:] - base[:, j:]).max(axis=-1) > 1e-4).all()


# ---------------------------------------------------------------- NumPy reference of one block


def _np_layer_norm(x, scale, bias, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * scale + bias


def _np_block(x, p, heads, causal):
  """Pre-LN transformer block, written from the CLIP paper's definition in float64 NumPy."""
  batch, length, width = x.shape
  head_dim = width // heads
  h = _np_layer_norm(x, p["ln1_scale"], p["ln1_bias"])
  q, k, v = (h @ p[f"{n}_w"] + p[f"{n}_b"] for n in "qkv")
  q, k, v = (t.reshape(batch, length, heads, head_dim).transpose(0, 2, 1, 3) for t in (q, k, v))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(head_dim)  # [B, H, L, L]
  if causal:
    logits = np.where(np.tri(length, dtype=bool), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  attn = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, length, width)
  x = x + attn @ p["o_w"] + p["o_b"]
  h = _np_layer_norm(x, p["ln2_scale"], p["ln2_bias"])
  h = h @ p["fc1_w"] + p["fc1_b"]
  h = h / (1 + np.exp(-1.702 * h))  # quick_gelu: h * sigmoid(1.702 h)
  return x + h @ p["fc2_w"] + p["fc2_b"]


@pytest.mark.parametrize("causal", [False, True])
def test_residual_block_matches_numpy(causal):
  width, heads = 16, 4
  block = layers_lib.ResidualAttentionBlock(
      width, heads, layers_in_stack=2, act="quick_gelu", causal=causal, rngs=nnx.Rngs(3)
  )
  rng = np.random.default_rng(4)
  # Non-trivial LN affine params and biases so every term of the formula is exercised.
  for norm in (block.layer_norm1, block.layer_norm2):
    norm.scale[...] = jnp.asarray(rng.normal(1.0, 0.3, width), jnp.float32)
    norm.bias[...] = jnp.asarray(rng.normal(0.0, 0.3, width), jnp.float32)
  for linear in (
      block.self_attn.q_proj,
      block.self_attn.k_proj,
      block.self_attn.v_proj,
      block.self_attn.out_proj,
      block.mlp.fc1,
      block.mlp.fc2,
  ):
    linear.kernel[...] = jnp.asarray(rng.normal(0, 0.3, linear.kernel.shape), jnp.float32)
    linear.bias[...] = jnp.asarray(rng.normal(0, 0.3, linear.bias.shape), jnp.float32)
  f64 = lambda v: np.asarray(v[...], np.float64)
  attn, mlp = block.self_attn, block.mlp
  params = dict(
      ln1_scale=f64(block.layer_norm1.scale),
      ln1_bias=f64(block.layer_norm1.bias),
      ln2_scale=f64(block.layer_norm2.scale),
      ln2_bias=f64(block.layer_norm2.bias),
      q_w=f64(attn.q_proj.kernel),
      q_b=f64(attn.q_proj.bias),
      k_w=f64(attn.k_proj.kernel),
      k_b=f64(attn.k_proj.bias),
      v_w=f64(attn.v_proj.kernel),
      v_b=f64(attn.v_proj.bias),
      o_w=f64(attn.out_proj.kernel),
      o_b=f64(attn.out_proj.bias),
      fc1_w=f64(mlp.fc1.kernel),
      fc1_b=f64(mlp.fc1.bias),
      fc2_w=f64(mlp.fc2.kernel),
      fc2_b=f64(mlp.fc2.bias),
  )
  x = rng.normal(size=(2, 5, width)).astype(np.float32)
  expected = _np_block(x.astype(np.float64), params, heads, causal)
  with jax.default_matmul_precision("highest"):
    got = block(jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- attention kernels (model.attention_impl)


def _today_einsum_attention(q, k, v, causal):
  """The hand-written attention exactly as it was before `attention_impl` existed (same ops, same order)."""
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
  if causal:
    visible = jnp.tril(jnp.ones(logits.shape[-2:], dtype=bool))
    logits = jnp.where(visible, logits, jnp.finfo(jnp.float32).min)
  return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)


def _np_attention(q, k, v, causal):
  """softmax(q k^T + causal mask) v per head in float64 NumPy; q (already scaled), k, v: [B, L, H, Dh]."""
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k)
  if causal:
    logits = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  return np.einsum("bhqk,bkhd->bqhd", weights, v)


def _np_attention_bf16(q, k, v, causal, *, bf16_logits=False):
  """OpenAI's fp16 recipe in NumPy for bfloat16 q, k, v: float32 logits and softmax, the probabilities
  rounded to bfloat16, then probabilities.v rounded to bfloat16.

  `bf16_logits=True` rounds the logits to bfloat16 before the softmax instead: what a kernel with a
  half-precision softmax computes, which the test must tell apart.
  """
  q, k, v = (np.asarray(t, np.float64) for t in (q, k, v))  # bfloat16 values, exact in float64
  logits = np.einsum("bqhd,bkhd->bhqk", q, k).astype(np.float32)
  if bf16_logits:
    logits = logits.astype(jnp.bfloat16).astype(np.float32)
  if causal:
    logits = np.where(np.tri(q.shape[1], k.shape[1], dtype=bool), logits, -np.inf)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights = (weights / weights.sum(-1, keepdims=True)).astype(jnp.bfloat16)
  return np.einsum("bhqk,bkhd->bqhd", weights.astype(np.float64), v).astype(jnp.bfloat16)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_auto_attention_off_gpu_is_the_einsum_attention_bit_for_bit(dtype, causal):
  """The default kernel on CPU/TPU computes exactly what every published table was measured with."""
  rng = np.random.default_rng(5)
  q, k, v = (jnp.asarray(rng.normal(0, 2, size=(2, 7, 3, 24)), dtype) for _ in range(3))
  for fn in (jax.jit, lambda f: f):  # Eagerly and under jit, forward and backward.
    auto = fn(lambda q, k, v: layers_lib.dot_product_attention(q, k, v, causal=causal))
    today = fn(lambda q, k, v: _today_einsum_attention(q, k, v, causal))
    np.testing.assert_array_equal(np.asarray(auto(q, k, v), np.float32), np.asarray(today(q, k, v), np.float32))
  loss = lambda attend: jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v).astype(jnp.float32) ** 2), (0, 1, 2))
  for got, want in zip(
      loss(lambda q, k, v: layers_lib.dot_product_attention(q, k, v, causal=causal))(q, k, v),
      loss(lambda q, k, v: _today_einsum_attention(q, k, v, causal))(q, k, v),
  ):
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("implementation", ["auto", "xla"])
@pytest.mark.parametrize("causal, q_len", [(False, 7), (True, 7), (False, 1)])  # q_len 1: SigLIP's MAP probe
def test_attention_kernels_match_numpy_in_float32(implementation, causal, q_len):
  rng = np.random.default_rng(6)
  # Dh = 24 (scale 24**-0.5 is not a power of two), 3 heads, odd lengths.
  q = (rng.normal(0, 2, size=(2, q_len, 3, 24)) * 24**-0.5).astype(np.float32)
  k, v = (rng.normal(0, 2, size=(2, 7, 3, 24)).astype(np.float32) for _ in range(2))
  with jax.default_matmul_precision("highest"):
    got = layers_lib.dot_product_attention(
        jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, implementation=implementation
    )
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), _np_attention(q, k, v, causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("implementation", ["auto", "xla"])
@pytest.mark.parametrize("causal", [False, True])
def test_bfloat16_attention_computes_the_softmax_in_float32(implementation, causal):
  rng = np.random.default_rng(8)
  shape = (2, 9, 2, 16)
  q, k, v = (rng.normal(size=shape).astype(jnp.bfloat16) for _ in range(3))
  # A shared channel puts every logit near 16 * 4 = 64 with a spread of about 1. Softmax is
  # shift-invariant, so float32 logits keep the spread exactly, while bfloat16 (spacing 0.5 at 64)
  # would move each logit by up to 0.25 and each probability by up to e**0.25 - 1 = 28%.
  q[..., 0], k[..., 0] = 4, 16
  got = layers_lib.dot_product_attention(
      jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), causal=causal, implementation=implementation
  )
  assert got.dtype == jnp.bfloat16
  got = np.asarray(got, np.float64)
  ref = _np_attention_bf16(q, k, v, causal).astype(np.float64)
  half_softmax = _np_attention_bf16(q, k, v, causal, bf16_logits=True).astype(np.float64)
  # With the same float32 softmax a kernel and the reference differ only where a probability or an
  # output rounds to the other neighbouring bfloat16 (a float32-ulp difference in the logits):
  # <= 2u * sum_j p_j |v_j| + u |out| <= 3u max|v|, u = 2**-9. Allow 4u = 2**-7 of max |v|.
  tol = 2**-7 * np.abs(np.asarray(v, np.float64)).max()
  assert np.abs(got - ref).max() <= tol, (np.abs(got - ref).max(), tol)
  # These inputs do tell the two softmax precisions apart (so the check above can fail).
  assert np.abs(half_softmax - ref).max() > 4 * tol, (np.abs(half_softmax - ref).max(), tol)


# Stated tolerances of 'xla' against the einsum attention on whole models: outputs relative to their largest
# magnitude, gradients relative to the largest gradient entry of the model (not per leaf: a leaf like the
# k-projection bias has a gradient that is zero in exact arithmetic, so only rounding noise is left in it).
# float32: both kernels compute the same float32 function and differ by reassociated sums, ~1 float32 ulp
# (1e-7) per attention call, amplified by the depth and, for gradients, by cancelling sums: 1e-5 for
# outputs, 1e-4 for gradients. bfloat16: each kernel may round its bfloat16 intermediates (u = 2**-9 ~ 2e-3)
# at different points, so they may differ by a few u: 2e-2.
_XLA_TOLERANCE = {"float32": (1e-5, 1e-4), "bfloat16": (2e-2, 2e-2)}


@pytest.mark.parametrize("preset", ["tiny", "tiny-siglip"])  # CLIP's causal text; SigLIP's bidirectional + MAP
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_xla_kernel_matches_the_einsum_attention_within_the_stated_tolerance(preset, dtype, images):
  cfg = models.preset(preset)
  cfg.dtype = dtype
  einsum_model = models.build(cfg, rngs=nnx.Rngs(0))
  xla_cfg = models.preset(preset)
  xla_cfg.update(dict(dtype=dtype, attention_impl="xla"))
  xla_model = _with_params_of(xla_cfg, einsum_model)
  tokens = _tokens(np.random.default_rng(2), [5, 31, 12])

  def outputs_and_grads(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      zimg, ztxt = nnx.merge(graphdef, params, rest)(images, tokens)
      return jnp.sum(jnp.tanh(zimg @ ztxt.T)), (zimg, ztxt)

    (_, outs), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return [np.asarray(o, np.float64) for o in outs], [np.asarray(g, np.float64) for g in jax.tree.leaves(grads)]

  (einsum_out, einsum_grads), (xla_out, xla_grads) = outputs_and_grads(einsum_model), outputs_and_grads(xla_model)
  out_tol, grad_tol = _XLA_TOLERANCE[dtype]
  for got, want in zip(xla_out, einsum_out):
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err <= out_tol, (err, out_tol)
  grad_scale = max(np.abs(g).max() for g in einsum_grads)
  err = max(np.abs(got - want).max() for got, want in zip(xla_grads, einsum_grads)) / grad_scale
  assert err <= grad_tol, (err, grad_tol)


@pytest.mark.parametrize("attention_impl", ["auto", "xla"])
def test_text_attention_is_causal_and_siglip_text_bidirectional_with_each_kernel(attention_impl, tokens):
  for preset, causal in (("tiny", True), ("tiny-siglip", False)):
    cfg = models.preset(preset)
    cfg.attention_impl = attention_impl
    text_model = models.build(cfg, rngs=nnx.Rngs(0)).text_model
    base = _token_features(text_model, tokens)
    j = 9
    edited = _token_features(text_model, tokens.at[:, j].set(777))
    before = np.abs(np.asarray(edited[:, :j]) - np.asarray(base[:, :j])).max()
    if causal:
      assert before <= 1e-6, before  # Positions before j never see token j.
    else:
      assert before > 1e-4, before  # Every position sees token j.
    assert (np.abs(edited[:, j:] - base[:, j:]).max(axis=-1) > 1e-4).all()


def test_attention_kernel_choice_per_platform(monkeypatch):
  choose = layers_lib.attention_kernel
  monkeypatch.setattr(layers_lib, "_is_cudnn_gpu", lambda: False)  # As on CPU, TPU or a pre-Ampere GPU.
  assert choose("auto", jnp.bfloat16, 64) == "einsum"
  assert choose("auto", jnp.float32, 64) == "einsum"
  assert choose("xla", jnp.float32, 64) == "xla"
  assert choose("cudnn", jnp.bfloat16, 64) == "cudnn"  # Explicit: `dot_product_attention` explains the refusal.
  with pytest.raises(ValueError, match="attention_impl='flash' is unknown"):
    choose("flash", jnp.float32, 64)
  monkeypatch.setattr(layers_lib, "_is_cudnn_gpu", lambda: True)  # As on an sm80+ NVIDIA GPU.
  assert choose("auto", jnp.bfloat16, 64) == "cudnn"  # ViT-B/32: head dim 64 in both towers.
  assert choose("auto", jnp.float16, 128) == "cudnn"
  assert choose("auto", jnp.float32, 64) == "einsum"  # No float32 fused kernel.
  assert choose("auto", jnp.bfloat16, 12) == "einsum"  # Head dim not a multiple of 8.
  assert choose("auto", jnp.bfloat16, 160) == "einsum"  # Over 128.


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="needs a host where cuDNN cannot run")
def test_auto_falls_back_where_cudnn_refuses_and_forced_cudnn_explains(monkeypatch):
  rng = np.random.default_rng(9)
  q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 2, 16)), jnp.bfloat16) for _ in range(3))
  with pytest.raises(ValueError, match="attention_impl='cudnn' cannot run on this host"):
    layers_lib.dot_product_attention(q, k, v, causal=True, implementation="cudnn")
  with pytest.raises(ValueError, match="needs bfloat16/float16"):
    layers_lib.dot_product_attention(*(t.astype(jnp.float32) for t in (q, k, v)), causal=True, implementation="cudnn")
  # 'auto' believes it is on a GPU and picks cuDNN, which (absent on this host) refuses at trace time.
  monkeypatch.setattr(layers_lib, "_is_cudnn_gpu", lambda: True)
  auto = layers_lib.dot_product_attention(q, k, v, causal=True, implementation="auto")
  np.testing.assert_array_equal(
      np.asarray(auto, np.float32), np.asarray(_today_einsum_attention(q, k, v, True), np.float32)
  )


def test_attention_impl_changes_no_parameter_and_old_configs_build(tiny, images, tokens):
  assert models.preset("tiny").attention_impl == "auto"
  ref = _encode(tiny, images, tokens)
  old = _mutate("tiny", attention_impl=_DELETE)  # A config saved before the field existed.
  model = _with_params_of(old, tiny)  # Fails unless the parameter trees are identical.
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(nnx.state(tiny))
  for got, want in zip(_encode(model, images, tokens), ref):
    np.testing.assert_array_equal(got, want)
  xla = _abstract(_mutate("tiny-siglip", attention_impl="xla"))
  assert jax.tree.structure(nnx.state(xla)) == jax.tree.structure(nnx.state(_abstract(models.preset("tiny-siglip"))))
  kernels = {layer.self_attn.attention_impl for tower in (xla.text_model, xla.vision_model) for layer in tower.layers}
  assert kernels | {xla.vision_model.head.attention.attention_impl} == {"xla"}


def test_gelu_option_is_exact_erf_gelu():
  x = np.linspace(-4, 4, 9)
  expected = 0.5 * x * (1 + np.vectorize(math.erf)(x / math.sqrt(2)))
  np.testing.assert_allclose(layers_lib.activation_by_name("gelu")(jnp.asarray(x)), expected, atol=1e-6)
  np.testing.assert_allclose(layers_lib.quick_gelu(jnp.asarray(x)), x / (1 + np.exp(-1.702 * x)), atol=1e-6)


# ---------------------------------------------------------------- counts (abstract models only)


def test_vit_b32_param_count_matches_openai():
  # OpenAI ViT-B/32: sum(p.numel() for p in model.parameters()) incl. logit_scale.
  assert models.count_params(_abstract(models.preset("ViT-B/32"))) == 151_277_313


def _xla_flops(cfg, encoder, *shapes):
  """Independent count: XLA's cost analysis of the lowered forward (never compiled nor run)."""
  graphdef, state = nnx.split(_abstract(cfg))
  forward = lambda s, *xs: encoder(nnx.merge(graphdef, s), *xs)
  return jax.jit(forward).lower(state, *shapes).cost_analysis()["flops"]


def test_vit_b32_flops_match_open_clip_profile_and_xla():
  cfg = models.preset("ViT-B/32")
  flops = models.flops_per_pair(cfg)
  assert abs(flops - 14.78e9) / 14.78e9 < 0.02  # open_clip model_profile.csv: 14.78 GFLOPs
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  xla_image = _xla_flops(cfg, lambda m, i: m.encode_image(i), images)
  xla_text = _xla_flops(cfg, lambda m, t: m.encode_text(t), tokens)
  # XLA also counts norms, softmax and activations, which the analytic formula leaves out.
  assert abs(xla_image - 8.8e9) / 8.8e9 < 0.02 and abs(xla_text - 6.0e9) / 6.0e9 < 0.02
  assert abs(flops - (xla_image + xla_text)) / (xla_image + xla_text) < 0.015


def test_resnet_flops_agree_with_xla():
  cfg = models.preset("RN50")
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 77), jnp.int32)
  xla_total = _xla_flops(cfg, lambda m, i: m.encode_image(i), images) + _xla_flops(
      cfg, lambda m, t: m.encode_text(t), tokens
  )
  assert abs(models.flops_per_pair(cfg) - xla_total) / xla_total < 0.03


def test_per_tower_mlp_width_sets_shapes_params_and_flops():
  base = models.preset("tiny")  # width 64 in both towers, 2 layers each; mlp_width 0 = 4x = 256.
  cfg = models.preset("tiny")
  cfg.image.mlp_width, cfg.text.mlp_width = 96, 160
  model = _abstract(cfg)
  assert model.vision_model.layers[1].mlp.fc1.kernel.shape == (64, 96)
  assert model.text_model.layers[0].mlp.fc2.kernel.shape == (160, 64)
  # Per block, fc1 + fc2 hold 2 * D * M weights and M + D biases.
  per_block = lambda m: 2 * 64 * m + m + 64
  assert models.count_params(model) - models.count_params(_abstract(base)) == 2 * (
      per_block(96) - per_block(256)
  ) + 2 * (per_block(160) - per_block(256))
  # XLA's count of what the narrower MLPs save, tower by tower (the rest of the graph cancels;
  # the activation's elementwise FLOPs, which the formula ignores, stay within a few percent).
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 32), jnp.int32)
  xla_saved = sum(
      _xla_flops(base, encode, shape) - _xla_flops(cfg, encode, shape)
      for encode, shape in ((lambda m, i: m.encode_image(i), images), (lambda m, t: m.encode_text(t), tokens))
  )
  analytic_saved = models.flops_per_pair(base) - models.flops_per_pair(cfg)
  assert abs(analytic_saved - xla_saved) / xla_saved < 0.05
  # Spelling out 4 * width builds the same model as the default 0.
  explicit = models.preset("tiny")
  explicit.image.mlp_width = explicit.text.mlp_width = 256
  assert models.flops_per_pair(explicit) == models.flops_per_pair(base)
  assert models.count_params(_abstract(explicit)) == models.count_params(_abstract(base))


# ---------------------------------------------------------------- compute dtype, remat, tree mode


def test_bfloat16_compute_stays_close_to_float32(tiny, images, tokens):
  cfg = models.preset("tiny")
  cfg.dtype = "bfloat16"
  bf16 = _with_params_of(cfg, tiny)
  assert _param_dtypes(bf16) == {np.dtype("float32")}
  ref_image, ref_text = _encode(tiny, images, tokens)
  got_image, got_text = _encode(bf16, images, tokens)
  assert got_image.dtype == jnp.float32 and got_text.dtype == jnp.float32
  for got, ref in ((got_image, ref_image), (got_text, ref_text)):
    rel = np.linalg.norm(got - ref, axis=-1) / np.linalg.norm(ref, axis=-1)
    assert (rel < 0.05).all(), rel
    assert (rel > 0).any()  # the bf16 path really ran in lower precision


@pytest.mark.parametrize("policy", ["full", "dots_saveable"])
def test_remat_keeps_outputs_and_gradients(tiny, tokens, policy):
  cfg = models.preset("tiny")
  cfg.remat = True
  cfg.remat_policy = policy
  rematted = _with_params_of(cfg, tiny)

  def loss(model):
    return jnp.sum(model.encode_text(tokens) ** 2)

  grad = nnx.jit(nnx.value_and_grad(loss))
  (value, grads), (value_r, grads_r) = grad(tiny), grad(rematted)
  np.testing.assert_allclose(value_r, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, grads_r)


def test_runs_in_tree_mode_with_split_state(tiny, images, tokens):
  with nnx.set_graph_mode(False):
    graphdef, state = nnx.split(tiny)

    @jax.jit
    def forward(state, images, tokens):
      return nnx.merge(graphdef, state)(images, tokens)

    got_image, got_text = forward(state, images, tokens)
  ref_image, ref_text = _encode(tiny, images, tokens)
  np.testing.assert_allclose(got_image, ref_image, atol=1e-5)
  np.testing.assert_allclose(got_text, ref_text, atol=1e-5)


# ---------------------------------------------------------------- BatchNorm train vs eval


def test_batchnorm_updates_running_stats_only_in_train_mode(tiny_rn, images, tokens):
  model = nnx.clone(tiny_rn)
  stem = model.vision_model
  stats_before = jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat))

  eval_out = nnx.jit(lambda m, x: m.encode_image(x, train=False))(model, images)
  jax.tree.map(np.testing.assert_array_equal, stats_before, jax.tree.map(np.asarray, nnx.state(model, nnx.BatchStat)))
  # Eval mode uses running stats, so a sample's output does not depend on its batch-mates.
  alone = nnx.jit(lambda m, x: m.encode_image(x, train=False))(model, images[:1])
  np.testing.assert_allclose(alone[0], eval_out[0], atol=1e-5)

  conv1_out = np.asarray(stem.conv1(images), np.float64)  # [B, 16, 16, 8]
  nnx.jit(lambda m, x: m.encode_image(x, train=True))(model, images)
  # PyTorch momentum 0.1: running = 0.9 * running + 0.1 * batch statistic (biased variance in flax).
  np.testing.assert_allclose(stem.bn1.mean[...], 0.1 * conv1_out.mean(axis=(0, 1, 2)), atol=1e-5)
  np.testing.assert_allclose(stem.bn1.var[...], 0.9 + 0.1 * conv1_out.var(axis=(0, 1, 2)), atol=1e-5)
  changed = jax.tree.map(lambda a, b: not np.allclose(a, np.asarray(b)), stats_before, nnx.state(model, nnx.BatchStat))
  assert all(jax.tree.leaves(changed))  # every BN layer, down to the downsample branches


# ---------------------------------------------------------------- bad input


def _mutate(name, **changes):
  """The preset with `a__b=value` fields changed (or deleted), free of the preset's type checks."""
  cfg = models.preset(name).to_dict()
  for dotted, value in changes.items():
    parent = cfg
    *path, leaf = dotted.split("__")
    for part in path:
      parent = parent[part]
    if value is _DELETE:
      del parent[leaf]
    else:
      parent[leaf] = value
  return ml_collections.ConfigDict(cfg)


_DELETE = object()


@pytest.mark.parametrize(
    "name, changes, field",
    [
        ("tiny", dict(image__patch_size=7), "image.patch_size"),
        ("tiny", dict(image__heads=3), "image.heads"),
        ("tiny", dict(text__heads=5), "text.heads"),
        ("tiny", dict(image__type="convnext"), "image.type"),
        ("tiny", dict(act="relu"), "act"),
        ("tiny", dict(dtype="float16"), "dtype"),
        ("tiny", dict(remat="yes"), "remat"),
        ("tiny", dict(embed_dim=0), "embed_dim"),
        ("tiny", dict(text__context_length=_DELETE), "text.context_length"),
        ("tiny-rn", dict(image__layers=(1, 1, 1)), "image.layers"),
        ("tiny-rn", dict(image__image_size=48), "image.image_size"),
        ("tiny-rn", dict(image__patch_size=16), "image.patch_size"),
        ("tiny-rn", dict(image__heads=3), "image.heads"),
        ("tiny", dict(image__mlp_width=-1), "image.mlp_width"),
        ("tiny", dict(text__mlp_width=2.5), "text.mlp_width"),
        ("tiny-rn", dict(image__mlp_width=128), "image.mlp_width"),
        ("tiny", dict(image__pool="avg"), "image.pool"),
        ("tiny", dict(image__patch_bias=1), "image.patch_bias"),
        ("tiny", dict(image__pre_norm="no"), "image.pre_norm"),
        ("tiny", dict(text__causal=0), "text.causal"),
        ("tiny", dict(text__pool="first"), "text.pool"),
        ("tiny", dict(text__proj_bias="yes"), "text.proj_bias"),
        ("tiny", dict(layer_norm_eps=0.0), "layer_norm_eps"),
        ("tiny", dict(act="gelu_pytorch_tanh"), "act"),
        ("tiny-siglip", dict(embed_dim=32), "embed_dim"),
        ("tiny-rn", dict(image__pool="map"), "image.pool"),
        ("tiny-rn", dict(image__patch_bias=True), "image.patch_bias"),
        ("tiny", dict(attention_impl="flash"), "attention_impl"),
        ("tiny", dict(attention_impl="cudnn"), "attention_impl"),  # float32: cuDNN has no kernel
    ],
)
def test_build_rejects_bad_configs_naming_the_field(name, changes, field):
  with pytest.raises(ValueError, match=f"`{field}`"):
    models.build(_mutate(name, **changes), rngs=nnx.Rngs(0))


def test_bad_inputs_raise_clear_errors(tiny):
  with pytest.raises(ValueError, match="NHWC"):
    tiny.encode_image(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="context_length"):
    tiny.encode_text(jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match="integer"):
    tiny.encode_text(jnp.zeros((1, 8), jnp.float32))
  with pytest.raises(ValueError, match="unknown"):
    models.preset("ViT-Z/99")


def test_registry_adds_presets_and_refuses_duplicates():
  expected = {"tiny", "tiny-rn", "RN50", "ViT-B/32", "ViT-B/16", "ViT-L/14"}
  assert expected <= set(models.preset_names())
  with pytest.raises(ValueError, match="already registered"):
    models.register("tiny")(lambda: None)
  rn50 = models.preset("RN50")
  assert (rn50.embed_dim, tuple(rn50.image.layers), rn50.image.width, rn50.image.heads) == (1024, (3, 4, 6, 3), 64, 32)
  l14 = models.preset("ViT-L/14")
  assert (l14.embed_dim, l14.image.width, l14.image.layers, l14.image.heads, l14.text.width, l14.text.heads) == (
      768,
      1024,
      24,
      16,
      768,
      12,
  )


# ---------------------------------------------------------------- SigLIP's layout (image.pool='map', ...)


def test_clip_defaults_spelled_out_build_the_same_model_bit_for_bit(tiny, images, tokens):
  """The optional fields' defaults are today's CLIP layout: same parameters, same outputs."""
  cfg = models.preset("tiny")
  cfg.image.update(dict(pool="cls", patch_bias=False, pre_norm=True))
  cfg.text.update(dict(causal=True, pool="eot", proj_bias=False))
  cfg.layer_norm_eps = 1e-5
  explicit = models.build(cfg, rngs=nnx.Rngs(0))
  for a, b in zip(jax.tree.leaves(nnx.state(explicit)), jax.tree.leaves(nnx.state(tiny))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for a, b in zip(_encode(explicit, images, tokens), _encode(tiny, images, tokens)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_tanh_gelu_is_the_tanh_formula():
  x = np.linspace(-4, 4, 9)
  expected = 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
  np.testing.assert_allclose(layers_lib.activation_by_name("gelu_tanh")(jnp.asarray(x)), expected, atol=1e-6)


def _np_gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def _np_attend(q_in, kv_in, attn, heads):
  """Multi-head attention in NumPy from the module's kernels (no mask)."""

  def proj(x, name):
    layer = getattr(attn, name)
    return x @ np.asarray(layer.kernel[...]) + np.asarray(layer.bias[...])

  batch, width = q_in.shape[0], q_in.shape[-1]
  dh = width // heads
  split = lambda t: t.reshape(batch, t.shape[1], heads, dh).transpose(0, 2, 1, 3)
  q, k, v = split(proj(q_in, "q_proj")), split(proj(kv_in, "k_proj")), split(proj(kv_in, "v_proj"))
  logits = q @ k.transpose(0, 1, 3, 2) / math.sqrt(dh)
  weights = np.exp(logits - logits.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  out = (weights @ v).transpose(0, 2, 1, 3).reshape(batch, -1, width)
  return proj(out, "out_proj")


def test_attention_pooling_head_matches_numpy():
  """SigLIP's MAP head: probe attends to the tokens, then x + mlp(layernorm(x)), eps 1e-6."""
  cfg = models.preset("tiny-siglip")
  head = models.build(cfg, rngs=nnx.Rngs(3)).vision_model.head
  tokens = np.random.default_rng(4).normal(size=(2, 16, 64)).astype(np.float32)
  probe = np.broadcast_to(np.asarray(head.probe[...]), (2, 1, 64))
  x = _np_attend(probe, tokens, head.attention, heads=2)
  ln = _np_layer_norm(x, np.asarray(head.layernorm.scale[...]), np.asarray(head.layernorm.bias[...]), 1e-6)
  hidden = _np_gelu_tanh(ln @ np.asarray(head.mlp.fc1.kernel[...]) + np.asarray(head.mlp.fc1.bias[...]))
  expected = (x + hidden @ np.asarray(head.mlp.fc2.kernel[...]) + np.asarray(head.mlp.fc2.bias[...]))[:, 0]
  np.testing.assert_allclose(np.asarray(head(jnp.asarray(tokens))), expected, atol=1e-5, rtol=1e-5)


def test_siglip_layout_shapes_pooling_and_bidirectional_text(images):
  cfg = models.preset("tiny-siglip")
  model = models.build(cfg, rngs=nnx.Rngs(0))
  vision = model.vision_model
  assert not hasattr(vision, "class_embedding") and vision.pre_layrnorm is None
  assert vision.position_embedding.shape == (16, 64)  # (32 / 8)^2 patches, no class token
  assert vision.patch_embedding.bias.shape == (64,) and model.visual_projection is None
  assert model.text_projection.bias.shape == (64,) and model.logit_bias.shape == ()
  img, _ = _encode(model, images, jnp.ones((BATCH, 32), jnp.int32))
  assert img.shape == (BATCH, 64) and img.dtype == jnp.float32
  # Bidirectional attention: position 0 sees later tokens (a causal mask would hide them); the
  # pooled feature is the last position's, a padding position for short captions.
  tokens = np.full((2, 32), 1, np.int32)
  tokens[:, :5] = [[7, 8, 9, 10, 11], [12, 8, 9, 10, 11]]
  features = np.asarray(model.text_model.token_features(jnp.asarray(tokens)))
  later = tokens.copy()
  later[:, 10] = 3
  changed = np.asarray(model.text_model.token_features(jnp.asarray(later)))
  assert np.abs(changed[0, 0] - features[0, 0]).max() > 1e-3  # Position 0 sees position 10.
  pooled = np.asarray(model.text_model(jnp.asarray(tokens)))
  np.testing.assert_array_equal(pooled, features[:, -1])


def test_siglip_b16_param_count_and_flops_agree_with_transformers_and_xla():
  cfg = models.preset("SigLIP-B/16")
  # transformers' SiglipModel(SiglipConfig()), google/siglip-base-patch16-224's shape: 203,155,970
  # parameters (its [1]-shaped logit scale and bias are our two scalars).
  assert models.count_params(_abstract(cfg)) == 203_155_970
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((1, 64), jnp.int32)
  xla_total = _xla_flops(cfg, lambda m, i: m.encode_image(i), images) + _xla_flops(
      cfg, lambda m, t: m.encode_text(t), tokens
  )
  assert abs(models.flops_per_pair(cfg) - xla_total) / xla_total < 0.02
