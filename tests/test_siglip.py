"""SigLIP's sigmoid loss: the ring-chunked loss against the global formula in NumPy, on 1 and 8 devices."""

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import pytest

from roclip_jax import config_lib
from roclip_jax import losses
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from tests import helpers

B, D = 16, 8


def _np_siglip(zimg, ztxt, t, b):
  """The paper's formula, with its gradient by hand: d/dlogit of -log sigmoid(z l) is -z sigmoid(-z l)."""
  zimg, ztxt = zimg.astype(np.float64), ztxt.astype(np.float64)
  z = 2 * np.eye(len(zimg)) - 1
  logits = np.exp(t) * zimg @ ztxt.T + b
  loss = np.sum(np.log1p(np.exp(-z * logits))) / len(zimg)
  g_logits = -z / (1 + np.exp(z * logits)) / len(zimg)
  g_zimg = np.exp(t) * g_logits @ ztxt
  g_ztxt = np.exp(t) * g_logits.T @ zimg
  g_t = np.sum(g_logits * (logits - b))
  g_b = np.sum(g_logits)
  neg = np.where(np.eye(len(zimg), dtype=bool), -np.inf, logits)
  accuracy = np.mean(np.diag(logits) > neg.max(axis=1))
  return loss, (g_zimg, g_ztxt, g_t, g_b), accuracy


def _embeddings(seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(2, B, D)).astype(np.float32)
  x[1] += 0.8 * x[0]  # Correlated pairs, so some images are classified right and some not.
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.mark.parametrize(
    "mesh_spec, num_devices", [([("data", -1)], 1), ([("data", -1)], 8), ([("data", 4), ("fsdp", 2)], 8)]
)
def test_siglip_matches_numpy_value_and_gradients(mesh_spec, num_devices):
  """Value, batch accuracy and gradients w.r.t. both embeddings, scale and bias; the ring runs
  over every batch axis of the mesh (8 shards on the last two meshes)."""
  zimg, ztxt = _embeddings()
  t, b = np.float32(np.log(10.0)), np.float32(-3.0)
  mesh = sharding.make_mesh(mesh_spec, devices=jax.devices()[:num_devices])
  axes = sharding.batch_axes(mesh)
  rows = NamedSharding(mesh, P(axes))

  def loss(zi, zt, t, b):
    return losses.siglip_loss(zi, zt, t, b, mesh=mesh, axes=axes)

  with jax.set_mesh(mesh):
    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    args = (jax.device_put(zimg, rows), jax.device_put(ztxt, rows), t, b)
    (value, aux), grads = fn(*args)
    hlo = fn.lower(*args).compile().as_text()
  if num_devices > 1:  # Text blocks travel around the ring; no device gathers the whole batch.
    assert "collective-permute" in hlo and "all-gather" not in hlo
  want, want_grads, want_acc = _np_siglip(zimg, ztxt, t, b)
  np.testing.assert_allclose(value, want, rtol=1e-5)
  np.testing.assert_allclose(aux["loss_pos"] + aux["loss_neg"], want, rtol=1e-5)
  for got, ref in zip(grads, want_grads):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-6)
  assert 0 < want_acc < 1
  np.testing.assert_allclose(aux["batch_accuracy"], want_acc)


def test_siglip_hand_computed_two_pairs():
  """Orthogonal pairs at SigLIP's init (t = ln 10, b = -10): positive logits 10*1 - 10 = 0,
  negative logits 10*0 - 10 = -10, so the loss is (2 ln 2 + 2 ln(1 + e^-10)) / 2."""
  eye = jnp.eye(2)
  value, aux = losses.siglip_loss(eye, eye, np.log(10.0), -10.0)
  np.testing.assert_allclose(value, np.log(2.0) + np.log1p(np.exp(-10.0)), rtol=1e-6)
  np.testing.assert_allclose(aux["batch_accuracy"], 1.0)


def _config(loss="siglip", logit_bias=True, accum=1):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 8
  c.model.logit_bias = logit_bias
  c.loss = loss
  c.data.batch_size = B
  c.grad_accum_steps = accum
  c.roclip.pool_size = 32
  c.optim.warmup_steps = 0
  return c


def test_validation_names_the_missing_bias():
  with pytest.raises(config_lib.ConfigError, match="model.logit_bias"):
    config_lib.validate(_config(logit_bias=False))
  with pytest.raises(config_lib.ConfigError, match="config.loss"):
    config_lib.validate(_config(loss="hinge"))
  with_weights = _config()
  with_weights.init_from = __file__  # Exists; the model's bias has nothing to load from it.
  with pytest.raises(config_lib.ConfigError, match="init_from.*logit_bias"):
    config_lib.validate(with_weights)
  config_lib.validate(_config())


def test_model_bias_parameter_only_when_asked():
  c = _config()
  with_bias = steps.ModelSpec.create(c.model).params_template
  c.model.logit_bias = False
  without = steps.ModelSpec.create(c.model).params_template
  assert "logit_bias" in with_bias and "logit_bias" not in without


def _batch(rng):
  tokens = rng.integers(1, 1000, size=(B, 8)).astype(np.int32)
  tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 49406, 49407, 0
  return {
      "image": rng.integers(0, 256, size=(B, 16, 16, 3), dtype=np.uint8),
      "text": tokens,
      "id": np.arange(B, dtype=np.int64),
      "label": np.zeros(B, np.int64),
      "poisoned": np.zeros(B, np.int8),
  }


@pytest.mark.parametrize("match", [False, True])
def test_train_step_siglip_loss_equals_numpy_on_the_step_embeddings(match):
  """The step's SigLIP loss on 8 devices equals the formula on the model's own embeddings,
  and accumulated micro-batches give the same loss and gradients."""
  config = _config()
  config.defense = "roclip" if match else "none"
  config.roclip.variant = "robust"  # Its matching step, with SigLIP's loss (the gated default needs loss='clip').
  mesh = sharding.make_mesh([("data", -1)])
  tx, _ = optim.make_optimizer(config.optim, total_steps=10)
  spec = steps.ModelSpec.create(config.model)
  defense = helpers.defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = steps.create_train_state(config, mesh, tx, shardings, defense)
  host = _batch(np.random.default_rng(0))
  batch = sharding.global_batch(host, mesh)
  kind = defense.step_kinds()["match" if match else "clip"]
  run = lambda cfg: jax.jit(
      lambda s, b: steps.loss_and_grads(s, b, spec=spec, mesh=mesh, config=cfg, kind=kind, defense=defense)
  )
  with jax.set_mesh(mesh):
    loss, aux, grads, _ = run(config)(state, batch)
    accum = ml_collections.ConfigDict(config.to_dict())
    accum.grad_accum_steps = 2
    loss2, _, grads2, _ = run(accum)(state, batch)
  zimg = np.asarray(jax.device_get(aux["z"]["image"]))
  ztxt = np.asarray(jax.device_get(aux["match"].embeddings if match else aux["z"]["text"]))
  params = jax.device_get(state.params)
  want, (_, _, g_t, g_b), _ = _np_siglip(zimg, ztxt, params["logit_scale"], params["logit_bias"])
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(grads["logit_bias"], g_b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grads["logit_scale"], g_t, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(loss2, loss, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(grads2), jax.tree.leaves(grads)):
    np.testing.assert_allclose(a, b, rtol=2e-3, atol=2e-6)
