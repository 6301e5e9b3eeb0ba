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
