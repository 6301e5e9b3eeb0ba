"""The jitted train step: RoCLIP's matching loss against NumPy, zero text gradient, CLIP step on 8 devices."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roclip_jax import defenses
from roclip_jax import config_lib
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from roclip_jax.data import image_ops
from tests.helpers import defense_for, random_batch

B = 16


def _config(shard_pool=False, defense="roclip"):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size = 16
  c.model.image.patch_size = 8
  c.model.text.context_length = 8
  c.defense = defense
  c.data.batch_size = B
  c.roclip.pool_size = 64
  c.roclip.variant = "paper"  # The NumPy reference below is the paper's cosine top-1 matching.
  c.roclip.shard_pool = shard_pool
  c.optim.warmup_steps = 0
  return c


def _setup(config):
  mesh = sharding.make_mesh([("data", -1)])
  tx, schedule = optim.make_optimizer(config.optim, total_steps=100)
  spec = steps.ModelSpec.create(config.model)
  defense = defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = steps.create_train_state(config, mesh, tx, shardings, defense)
  return mesh, tx, schedule, spec, shardings, state


def _np_matching_loss(zimg, pool, scale):
  """docs/roclip.md, section 1, in NumPy: brute-force NN caption replaces the positive in both directions."""
  zimg = zimg.astype(np.float64)
  nn = pool[np.argmax(zimg @ pool.T, axis=1)].astype(np.float64)
  logits = scale * zimg @ nn.T

  def ce_diag(l):
    l = l - l.max(axis=1, keepdims=True)
    return -np.mean(np.diag(l) - np.log(np.exp(l).sum(axis=1)))

  return 0.5 * (ce_diag(logits) + ce_diag(logits.T))


@pytest.mark.parametrize("shard_pool", [False, True])
def test_matching_loss_matches_numpy_and_text_gradient_is_zero(shard_pool):
  config = _config(shard_pool)
  mesh, tx, schedule, spec, shardings, state = _setup(config)
  batch = sharding.global_batch(random_batch(), mesh)
  defense = defense_for(config)
  kind = defense.step_kinds()["match"]
  with jax.set_mesh(mesh):
    loss, aux, grads, _ = jax.jit(
        lambda s, b: steps.loss_and_grads(s, b, spec=spec, mesh=mesh, config=config, kind=kind, defense=defense)
    )(state, batch)
  # Independent reference: image embeddings from the model, the rest in NumPy.
  model = spec.merge(jax.device_get(state.params), jax.device_get(state.model_state))
  zimg = np.array(model.encode_image(image_ops.normalize(jnp.asarray(random_batch()["image"])), train=True))
  zimg /= np.linalg.norm(zimg, axis=1, keepdims=True)
  pool = np.asarray(state.defense.embeddings)
  expected = _np_matching_loss(zimg, pool, np.exp(float(state.params["logit_scale"])))
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)
  np.testing.assert_array_equal(np.asarray(aux["match"].index), np.argmax(zimg @ pool.T, axis=1))
  for name in ("text_model", "text_projection"):
    for g in jax.tree.leaves(grads[name]):
      assert not np.any(np.asarray(g)), f"{name} got a non-zero gradient in a matching step"
  assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grads["vision_model"]))
  assert float(grads["logit_scale"]) != 0.0


def test_matching_step_leaves_text_tower_unchanged_without_decay_and_fills_pool():
  config = _config()
  config.optim.weight_decay = 0.0  # Without decay or momentum, zero gradients mean no update at all.
  mesh, tx, schedule, spec, shardings, state = _setup(config)
  fns = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense_for(config))
  before = jax.device_get(state.params)
  with jax.set_mesh(mesh):
    state, metrics = fns["match"](state, sharding.global_batch(random_batch(), mesh))
  after = jax.device_get(state.params)
  for a, b in zip(jax.tree.leaves(before["text_model"]), jax.tree.leaves(after["text_model"])):
    np.testing.assert_array_equal(a, b)
  assert any(
      np.any(a != b) for a, b in zip(jax.tree.leaves(before["vision_model"]), jax.tree.leaves(after["vision_model"]))
  )
  ids = np.asarray(state.defense.source_ids)
  np.testing.assert_array_equal(ids[:B], np.arange(B))  # Enqueued after the query, in batch order.
  assert int(state.defense.ptr) == B
  stats = jax.device_get(state.stats)  # The epoch's matching sums, kept in the state.
  assert float(stats["roclip/poisoned_in_batch"]) == 4.0 and float(stats["roclip/steps"]) == 1.0
  assert float(stats["roclip/poisoned_matched_clean"]) == 0.0  # Every row is still random init: none is "clean".
  assert float(stats["roclip/distinct_matches"]) == float(metrics["roclip/distinct_matches"]) >= 1.0


def test_clip_step_same_on_one_and_eight_devices():
  config = _config(defense="none")
  results = []
  for n in (1, 8):
    mesh = sharding.make_mesh([("data", -1)], devices=jax.devices()[:n])
    tx, schedule = optim.make_optimizer(config.optim, total_steps=100)
    spec = steps.ModelSpec.create(config.model)
    defense = defense_for(config)
    _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
    state = steps.create_train_state(config, mesh, tx, shardings, defense)
    fn = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense)["clip"]
    with jax.set_mesh(mesh):
      for seed in range(2):
        state, metrics = fn(state, sharding.global_batch(random_batch(seed), mesh))
    results.append((float(metrics["loss"]), jax.device_get(state.params)))
  (l1, p1), (l8, p8) = results
  np.testing.assert_allclose(l1, l8, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_logit_scale_is_clamped_at_ln_100():
  config = _config(defense="none")
  config.optim.lr = 10.0  # Absurd on purpose: one step pushes the scale far past the clamp.
  mesh, tx, schedule, spec, shardings, state = _setup(config)
  state = state.replace(params=dict(state.params, logit_scale=jnp.float32(4.6)))
  fn = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense_for(config))["clip"]
  with jax.set_mesh(mesh):
    state, _ = fn(state, sharding.global_batch(random_batch(), mesh))
  assert 0.0 <= float(state.params["logit_scale"]) <= np.log(100) + 1e-6


def test_device_augmentation_runs_inside_the_step():
  from roclip_jax.data import augment  # pylint: disable=g-import-not-at-top

  config = _config(defense="none")
  config.augment.placement, config.augment.image = "device", True
  size = augment.device_source_size(config.augment, 16)  # 18
  rng = np.random.default_rng(0)
  batch = random_batch(3)
  sources = rng.integers(0, 256, size=(B, size, size, 3), dtype=np.uint8)
  params = [augment.sample_params(rng, config.augment, size, size) for _ in range(B)]
  packed = np.stack([augment.pack_params(p, size, size, size) for p in params])
  host = np.stack([augment.apply_params(im, p, 16) for im, p in zip(sources, params)])
  two_views = defenses.StepKind("two", image_views=("image", "image2"), text_views=("text",))
  device_batch = dict(batch, image=sources, image2=sources, image_augment=packed, image2_augment=packed[::-1])
  out = jax.jit(lambda b: steps.augment_on_device(b, config, two_views, 2))(device_batch)
  assert "image_augment" not in out and "image2_augment" not in out
  # Against the host's numpy + PIL on the same draws (rounding amplified by the colour ops, see test_augment).
  host2 = np.stack([augment.apply_params(im, p, 16) for im, p in zip(sources, params[::-1])])
  for view, expected in (("image", host), ("image2", host2)):
    diff = np.abs(np.asarray(out[view]) - expected)
    assert diff.max() <= 6.0 and diff.mean() < 0.6, view
  # A kind that reads one view drops the other view's parameters and leaves it alone.
  one_view = steps.augment_on_device(device_batch, config, defenses.StepKind("one"), 2)
  assert one_view["image2"] is sources and "image2_augment" not in one_view
  with pytest.raises(ValueError, match="no 'image_augment'"):
    steps.augment_on_device(batch, config, defenses.StepKind("one"), 1)

  # The jitted train step takes the pipeline's batch (shapes as abstract_batch says) and trains.
  mesh, tx, schedule, spec, shardings, state = _setup(config)
  step_batch = dict(batch, image=sources, image_augment=packed, skipped=np.zeros(B, np.int32))
  abstract = steps.abstract_batch(config, mesh, defense_for(config))
  assert {k: (v.shape, v.dtype) for k, v in abstract.items() if k not in ("id", "label")} == {
      k: (np.shape(v), np.asarray(v).dtype) for k, v in step_batch.items() if k not in ("id", "label")
  }
  fn = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense_for(config))["clip"]
  with jax.set_mesh(mesh):
    state, metrics = fn(state, sharding.global_batch(step_batch, mesh))
  assert np.isfinite(float(metrics["loss"])) and int(state.step) == 1
