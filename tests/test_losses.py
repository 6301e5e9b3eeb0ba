"""The global-batch contrastive loss against an independent NumPy formula, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roclip_jax import losses
from roclip_jax import sharding


def _np_log_softmax(x, axis):
  x = x - x.max(axis=axis, keepdims=True)
  return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def np_clip_loss_and_grads(ximg, xtxt, t):
  """Symmetric InfoNCE of L2-normalised features and its analytic gradient (float64)."""
  ximg, xtxt = ximg.astype(np.float64), xtxt.astype(np.float64)
  ni = np.linalg.norm(ximg, axis=1, keepdims=True)
  nt = np.linalg.norm(xtxt, axis=1, keepdims=True)
  zi, zt = ximg / ni, xtxt / nt
  b = len(zi)
  logits = np.exp(t) * zi @ zt.T
  lr = _np_log_softmax(logits, axis=1)
  lc = _np_log_softmax(logits, axis=0)
  loss = -0.5 * (np.trace(lr) + np.trace(lc)) / b
  # dloss/dlogits: rows (image->text) and columns (text->image), each averaged over B.
  g = 0.5 * ((np.exp(lr) - np.eye(b)) + (np.exp(lc) - np.eye(b))) / b
  gzi = np.exp(t) * g @ zt
  gzt = np.exp(t) * g.T @ zi
  gt = np.sum(g * logits)
  # Through the normalisation z = x/|x|: dx = (g - z (z.g)) / |x|.
  gxi = (gzi - zi * np.sum(zi * gzi, axis=1, keepdims=True)) / ni
  gxt = (gzt - zt * np.sum(zt * gzt, axis=1, keepdims=True)) / nt
  return loss, gxi, gxt, gt


def _loss(ximg, xtxt, t):
  return losses.clip_loss(losses.l2_normalize(ximg), losses.l2_normalize(xtxt), t)[0]


@pytest.mark.parametrize("num_devices", [1, 8])
def test_clip_loss_matches_numpy_on_global_batch(num_devices):
  rng = np.random.default_rng(0)
  b, d = 32, 16
  ximg = rng.normal(size=(b, d)).astype(np.float32)
  xtxt = (ximg + 0.5 * rng.normal(size=(b, d))).astype(np.float32)  # Correlated, like a half-trained model.
  t = np.float32(np.log(1 / 0.07))
  mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:num_devices])
  batch = sharding.batch_sharding(mesh)
  args = (jax.device_put(ximg, batch), jax.device_put(xtxt, batch), jax.device_put(t, sharding.replicated(mesh)))
  with jax.set_mesh(mesh):
    value, grads = jax.jit(jax.value_and_grad(_loss, argnums=(0, 1, 2)))(*args)
  assert len(args[0].sharding.device_set) == num_devices
  ref_loss, ref_gi, ref_gt, ref_gs = np_clip_loss_and_grads(ximg, xtxt, float(t))
  np.testing.assert_allclose(value, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(grads[0], ref_gi, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[1], ref_gt, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads[2], ref_gs, rtol=1e-4, atol=1e-6)


def test_sharded_and_single_device_agree_exactly_enough():
  rng = np.random.default_rng(1)
  ximg, xtxt = rng.normal(size=(2, 64, 8)).astype(np.float32)
  t = np.float32(2.0)
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:n])
    batch = sharding.batch_sharding(mesh)
    with jax.set_mesh(mesh):
      results.append(
          jax.jit(jax.value_and_grad(_loss, argnums=(0, 1)))(
              jax.device_put(ximg, batch), jax.device_put(xtxt, batch), t
          )
      )
  (v1, g1), (v8, g8) = results
  np.testing.assert_allclose(v1, v8, rtol=1e-6)
  for a, b in zip(g1, g8):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_perfect_alignment_gives_low_loss_and_full_accuracy():
  z = np.eye(8, dtype=np.float32)
  loss, aux = losses.clip_loss(jnp.asarray(z), jnp.asarray(z), jnp.float32(np.log(100.0)))
  # Each row: -log(e^100 / (e^100 + 7 e^0)).
  np.testing.assert_allclose(loss, -np.log(np.exp(100.0) / (np.exp(100.0) + 7)), atol=1e-6)
  assert float(aux["batch_accuracy"]) == 1.0


def test_positive_weights_weight_each_pairs_positive_terms_as_numpy():
  """`positive_weights`: row i's and column i's cross-entropy count with w_i, each direction divided
  by sum(w); all pairs stay negatives. A float64 loop over the pairs is the reference."""
  rng = np.random.default_rng(3)
  b, d = 12, 8
  zimg = rng.normal(size=(b, d))
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  ztxt = zimg + 0.7 * rng.normal(size=(b, d))
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  w = (rng.random(b) < 0.5).astype(np.float64)
  w[0] = 1.0
  t = np.log(20.0)
  logits = np.exp(t) * zimg @ ztxt.T
  i2t = sum(w[i] * -_np_log_softmax(logits[i], axis=0)[i] for i in range(b)) / w.sum()
  t2i = sum(w[i] * -_np_log_softmax(logits[:, i], axis=0)[i] for i in range(b)) / w.sum()
  args = (jnp.asarray(zimg, jnp.float32), jnp.asarray(ztxt, jnp.float32), jnp.asarray(t, jnp.float32))
  loss, aux = losses.clip_loss(*args, positive_weights=jnp.asarray(w, jnp.float32))
  np.testing.assert_allclose(float(aux["loss_i2t"]), i2t, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_t2i"]), t2i, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.5 * (i2t + t2i), rtol=1e-5)
  # All ones is CLIP's loss; all zeros leaves nothing to train (loss 0, no NaN).
  np.testing.assert_allclose(
      float(losses.clip_loss(*args, positive_weights=jnp.ones(b))[0]), float(losses.clip_loss(*args)[0]), rtol=1e-6
  )
  assert float(losses.clip_loss(*args, positive_weights=jnp.zeros(b))[0]) == 0.0
