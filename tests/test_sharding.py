"""FSDP sharding rules, the (data, fsdp) mesh, exact gradient accumulation, bf16 steps and the AOT dry run."""

import math

from hypothesis import given, settings, strategies as st
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
import pytest

from roclip_jax import config_lib
from roclip_jax import models
from roclip_jax import optim
from roclip_jax.defenses import roclip
from roclip_jax import sharding
from roclip_jax import steps
from tests.helpers import defense_for, random_batch

FSDP_MESH = [("data", 2), ("fsdp", 4)]


def _config(defense="none", batch=16, mesh=FSDP_MESH, **overrides):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 8
  c.mesh = mesh
  c.defense = defense
  c.data.batch_size = batch
  c.roclip.pool_size = 64
  c.optim.warmup_steps = 0
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  config_lib.validate(c, 8 if mesh != [("data", 1)] else 1)
  return c


def _mesh(spec):
  n = math.prod(s for _, s in spec)
  return sharding.make_mesh(spec, devices=jax.devices()[:n])


def _abstract_params(config):
  tx, _ = optim.make_optimizer(config.optim, 10)
  return jax.eval_shape(lambda: steps.init_train_state(config, tx, defense_for(config))).params


def _specs_by_path(specs):
  flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
  return {sharding.path_str(path): spec for path, spec in flat}


def _sharded(specs):
  return {k: v for k, v in _specs_by_path(specs).items() if v != P()}


# ----------------------------------------------------------------------------
# Rules.

_TOWER_MLPS = {
    f"{tower}/layers/{i}/mlp/{fc}/kernel": spec
    for tower in ("text_model", "vision_model")
    for i in range(2)
    for fc, spec in (("fc1", P(None, "fsdp")), ("fc2", P("fsdp")))
}


def test_golden_default_specs_for_the_tiny_preset():
  """fsdp=4, min size 2**14: the 64x256 MLP kernels on their 256 side, and the token table."""
  config = _config()
  specs = sharding.param_specs(_abstract_params(config), _mesh(FSDP_MESH), min_size=config.fsdp_min_size)
  assert _sharded(specs) == dict(_TOWER_MLPS, **{"text_model/token_embedding": P("fsdp")})


def test_golden_specs_with_custom_rules_first_match_wins():
  rules = [
      ("text_model/token_embedding", "replicate"),
      (r".*self_attn/q_proj/kernel", (None, "fsdp")),
      ("visual_projection/kernel", [["data", "fsdp"]]),  # Lists, as a config reloaded from JSON holds them.
      (r"vision_model/.*", "replicate"),
  ]
  specs = sharding.param_specs(_abstract_params(_config()), _mesh(FSDP_MESH), rules, min_size=2**14)
  expected = {k: v for k, v in _TOWER_MLPS.items() if k.startswith("text_model")}
  expected.update(
      {
          f"{t}/layers/{i}/self_attn/q_proj/kernel": P(None, "fsdp")
          for t in ("text_model", "vision_model")
          for i in range(2)
      }
  )
  expected["visual_projection/kernel"] = P(("data", "fsdp"))
  assert _sharded(specs) == expected


def test_no_fsdp_axis_or_size_one_replicates_everything():
  params = _abstract_params(_config())
  for spec in ([("data", 8)], [("data", 8), ("fsdp", 1)]):
    assert _sharded(sharding.param_specs(params, _mesh(spec), min_size=0)) == {}


@settings(max_examples=60, deadline=None)
@given(shape=st.lists(st.integers(1, 24), min_size=0, max_size=4), fsdp=st.integers(1, 6), min_size=st.integers(0, 300))
def test_fsdp_rule_against_brute_force(shape, fsdp, min_size):
  spec = sharding.fsdp_spec(shape, fsdp, min_size)
  divisible = [d for d in range(len(shape)) if shape[d] % fsdp == 0]
  if fsdp == 1 or math.prod(shape) < max(min_size, 1) or not divisible:
    assert spec == P()
  else:
    best = max(divisible, key=lambda d: (shape[d], d))  # Largest; ties -> last dimension.
    assert spec == P(*([None] * best + ["fsdp"]))


def test_optimizer_moments_are_sharded_like_their_params():
  config = _config()
  mesh = _mesh(FSDP_MESH)
  tx, _ = optim.make_optimizer(config.optim, 10)
  abstract, shardings = steps.abstract_train_state(config, mesh, tx, defense_for(config))
  param_specs = _specs_by_path(jax.tree.map(lambda s: s.spec, shardings.params))
  adam = shardings.opt_state[0][0]  # chain -> adamw chain -> ScaleByAdamState
  for moments in (adam.mu, adam.nu):
    assert _specs_by_path(jax.tree.map(lambda s: s.spec, moments)) == param_specs
  assert adam.count.spec == P()
  n_sharded = sum(s.spec != P() for s in jax.tree.leaves(shardings.opt_state))
  assert n_sharded == 2 * len(_sharded(jax.tree.map(lambda s: s.spec, shardings.params))) == 18


@pytest.mark.parametrize(
    "rules, message",
    [
        ([(".*", "shard_everything")], "unknown rule"),
        ([("(", "replicate")], "bad regex"),
        ([(".*token_embedding", ("model",))], "names mesh axis 'model'"),
        ([(".*token_embedding", (None, ("data", "fsdp"), None))], "has 3 entries"),
        ([(".*position_embedding", ("fsdp",))], "not divisible"),  # Vision: 5 positions over 4 devices.
    ],
)
def test_bad_rules_raise_errors_naming_the_problem(rules, message):
  params = _abstract_params(_config())
  with pytest.raises(ValueError, match=message):
    sharding.param_specs(params, _mesh(FSDP_MESH), rules)


def test_config_validation_rejects_bad_scale_fields():
  with pytest.raises(config_lib.ConfigError, match="sharding_rules"):
    _config(sharding_rules=[("a", "b", "c")])
  with pytest.raises(config_lib.ConfigError, match=r"grad_accum_steps.*multiple of 16"):
    _config(batch=24, grad_accum_steps=2)  # 12 rows per micro-batch over 8 shards.
  with pytest.raises(config_lib.ConfigError, match="grad_accum_steps"):
    _config(grad_accum_steps=0)


# ----------------------------------------------------------------------------
# The batch and the RoCLIP pool over both axes.


def test_batch_is_split_over_data_and_fsdp_in_device_order():
  mesh = _mesh(FSDP_MESH)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"))
  x = np.arange(16 * 3).reshape(16, 3)
  arr = sharding.global_batch({"x": x}, mesh)["x"]
  for d, device in enumerate(mesh.devices.flat):  # Row-major over (data, fsdp): 2 rows per device.
    shard = next(s for s in arr.addressable_shards if s.device == device)
    np.testing.assert_array_equal(np.asarray(shard.data), x[2 * d : 2 * d + 2])


def test_sharded_pool_lookup_and_enqueue_over_data_and_fsdp():
  mesh = _mesh(FSDP_MESH)
  rng = np.random.default_rng(0)
  unit = lambda a: a / np.linalg.norm(a, axis=1, keepdims=True)
  emb = unit(rng.normal(size=(64, 16))).astype(np.float32)
  pool = roclip.Pool(
      jnp.asarray(emb),
      jnp.arange(64, dtype=jnp.int32),
      jnp.asarray(np.arange(64) % 3, jnp.int8),
      jnp.zeros((), jnp.int32),
      jnp.asarray(np.arange(64) % 5, jnp.int32),
  )
  pool = jax.device_put(pool, roclip.pool_shardings(mesh, True))
  zimg = unit(rng.normal(size=(16, 16))).astype(np.float32)
  with jax.set_mesh(mesh):
    match = jax.jit(lambda p, z: roclip.nearest_captions(p, z, mesh, True))(
        pool, jax.device_put(zimg, sharding.batch_sharding(mesh))
    )
  best = np.argmax(zimg @ emb.T, axis=1)  # Brute force over the whole pool.
  np.testing.assert_array_equal(np.asarray(match.index), best)
  np.testing.assert_allclose(np.asarray(match.embeddings), emb[best])
  np.testing.assert_array_equal(np.asarray(match.source_poisoned), best % 3)
  np.testing.assert_array_equal(np.asarray(match.source_label), best % 5)

  ztxt = unit(rng.normal(size=(16, 16))).astype(np.float32)
  with jax.set_mesh(mesh):
    new = jax.jit(lambda p, z, i, q: roclip.enqueue(p, z, i, q, mesh, True))(
        pool,
        *(
            jax.device_put(a, sharding.batch_sharding(mesh))
            for a in (ztxt, np.arange(100, 116, dtype=np.int32), np.ones(16, np.int8))
        ),
    )
  # Shard s (row-major over data x fsdp) owns pool rows 8s..8s+7 and writes its 2 batch rows at its pointer 0.
  expected = emb.copy()
  for s in range(8):
    expected[8 * s : 8 * s + 2] = ztxt[2 * s : 2 * s + 2]
  np.testing.assert_allclose(np.asarray(new.embeddings), expected)
  assert int(new.ptr) == 2


# ----------------------------------------------------------------------------
# Steps: mesh invariance, accumulation, bf16.


def _pool_config(**overrides):
  # The robust variant: matching steps (the gated default has none unless asked).
  return _config("roclip", **{"roclip.update_pool_every_step": True, "roclip.variant": "robust"}, **overrides)


@pytest.fixture(scope="module")
def initial_state():
  """The initial train state (with a 64-row pool) as host arrays: compiled once, placed on any mesh.

  Parameters do not depend on the compute dtype, the batch size or the pool's layout.
  """
  config = _pool_config()
  mesh = _mesh([("data", 1)])
  tx, _ = optim.make_optimizer(config.optim, total_steps=100)
  defense = defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  return jax.device_get(steps.create_train_state(config, mesh, tx, shardings, defense))


def _run_steps(config, mesh_spec, modes, host_state):
  """`modes` train steps from `host_state` on a mesh; returns losses, host params and the device state."""
  mesh = _mesh(mesh_spec)
  tx, schedule = optim.make_optimizer(config.optim, total_steps=100)
  spec = steps.ModelSpec.create(config.model)
  defense = defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  if config.defense != "roclip":  # No pool, and no RoCLIP counters in the stats.
    host_state = host_state.replace(defense=None, stats=jax.device_get(steps.init_stats(defense)))
  state = jax.device_put(host_state, shardings)
  fns = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense)
  losses = []
  with jax.set_mesh(mesh):
    for i, mode in enumerate(modes):
      state, metrics = fns[mode](state, sharding.global_batch(random_batch(i, batch=config.data.batch_size), mesh))
      losses.append(float(metrics["loss"]))
  return losses, jax.device_get(state.params), state


@pytest.fixture(scope="module")
def mesh_runs(initial_state):
  """A CLIP step that fills the pool, then a RoCLIP matching step, on three meshes."""
  return {
      name: _run_steps(_pool_config(), spec, ["clip", "match"], initial_state)
      for name, spec in (("fsdp", FSDP_MESH), ("data", [("data", 8)]), ("single", [("data", 1)]))
  }


def test_train_steps_agree_on_fsdp_data_and_single_device_meshes(mesh_runs, initial_state):
  losses, params, state = mesh_runs["fsdp"]
  assert state.params["text_model"]["token_embedding"].sharding.spec == P("fsdp")
  assert int(state.defense.ptr) == 32  # Both steps enqueued their 16 captions.
  for other in ("data", "single"):
    np.testing.assert_allclose(losses, mesh_runs[other][0], rtol=1e-5)
    for path, a in jax.tree_util.tree_flatten_with_path(params)[0]:
      b = mesh_runs[other][1]
      for k in path:
        b = b[k.key]
      # Adam turns float noise in (mathematically) zero gradients, like the k_proj bias's, into updates
      # of up to ~1e-5 (lr 5e-4); a wrong gradient moves weights by ~lr per step.
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5, err_msg=f"{other}: {sharding.path_str(path)}")
  # The steps did change the weights (a no-op step would also "agree").
  moved = max(
      float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(initial_state.params))
  )
  assert moved > 5e-4


def test_accumulated_gradient_equals_full_batch_gradient(initial_state):
  """4 micro-batches of 8 vs one batch of 32, for RoCLIP's matching step with a sharded pool (the plain
  CLIP step and every other defense's: tests/test_defenses.py)."""
  config = _config(
      "roclip", batch=32, mesh=[("data", 4), ("fsdp", 2)], **{"roclip.shard_pool": True, "roclip.variant": "robust"}
  )
  mesh = _mesh(config.mesh)
  tx, _ = optim.make_optimizer(config.optim, 10)
  spec = steps.ModelSpec.create(config.model)
  defense = defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = jax.device_put(initial_state, shardings)
  batch = sharding.global_batch(random_batch(batch=32), mesh)
  kind = defense.step_kinds()["match"]
  results = []
  for accum in (1, 4):
    c = config.copy_and_resolve_references()
    c.grad_accum_steps = accum
    with jax.set_mesh(mesh):
      loss, aux, grads, _ = jax.jit(
          lambda s, b: steps.loss_and_grads(s, b, spec=spec, mesh=mesh, config=c, kind=kind, defense=defense)
      )(state, batch)
    results.append((float(loss), jax.device_get(grads), aux))
  (l1, g1, a1), (l4, g4, a4) = results
  np.testing.assert_allclose(l4, l1, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(a4["z"]["text"]), np.asarray(a1["z"]["text"]), atol=1e-5)
  largest = max(float(np.abs(g).max()) for g in jax.tree.leaves(g1))
  for path, a in jax.tree_util.tree_flatten_with_path(g1)[0]:
    b = g4
    for k in path:
      b = b[k.key]
    # Relative to each leaf, plus a floor for leaves whose exact gradient is 0 (k_proj biases: softmax
    # ignores a shift of all keys), where both runs hold only float noise.
    np.testing.assert_allclose(
        b, a, atol=1e-4 * float(np.abs(a).max()) + 1e-6 * largest, err_msg=sharding.path_str(path)
    )
  assert float(optax.global_norm(g1)) > 0
  np.testing.assert_array_equal(np.asarray(a4["match"].index), np.asarray(a1["match"].index))
  assert not any(np.any(g) for g in jax.tree.leaves(g4["text_model"]))


def test_bfloat16_step_runs_and_keeps_float32_master_weights(mesh_runs, initial_state):
  loss32 = mesh_runs["single"][0][0]  # The same first batch and weights, in float32 (a CLIP loss).
  (loss16,), params, state = _run_steps(_config(**{"model.dtype": "bfloat16"}), FSDP_MESH, ["clip"], initial_state)
  assert np.isfinite(loss16) and loss16 != loss32
  np.testing.assert_allclose(loss16, loss32, rtol=2e-2)  # Only the matmul precision differs.
  assert {x.dtype for x in jax.tree.leaves(params)} == {np.dtype(np.float32)}
  adam = state.opt_state[0][0]
  assert {x.dtype for x in jax.tree.leaves((adam.mu, adam.nu))} == {np.dtype(np.float32)}


# ----------------------------------------------------------------------------
# AOT dry run.


def _leaf_bytes(shape, shards):
  return math.prod(shape) * 4 // shards


def test_aot_compile_reports_memory_and_flops(mesh_runs):
  """The dry run's compile, on the first test's config (its compiled steps are in the persistent cache)."""
  config = _pool_config()
  reports = {
      name: report
      for name, (_, report) in steps.aot_compile(config, _mesh(FSDP_MESH), defense_for(config), total_steps=100).items()
  }  # _run_steps' schedule.
  assert set(reports) == {"clip", "match"}
  params = _abstract_params(config)
  sharded = dict(_TOWER_MLPS, **{"text_model/token_embedding": P("fsdp")})
  # Hand count: params + Adam's mu and nu (f32, a quarter per device where sharded) + two int32 step
  # counts (Adam's and the learning-rate schedule's).
  expected_param_bytes = (
      3
      * sum(
          _leaf_bytes(x.shape, 4 if sharding.path_str(p) in sharded else 1)
          for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
      )
      + 2 * 4
  )
  per_device = config.data.batch_size / 8
  # Text tower by hand (2 layers, 8 tokens, width 64) + its projection: a matching step skips its backward.
  text_forward = 2 * (24 * 8 * 64**2 + 4 * 8**2 * 64) + 2 * 64 * 64
  analytic = {"clip": 3 * models.flops_per_pair(config.model) * per_device}
  analytic["match"] = analytic["clip"] - 2 * text_forward * per_device
  for name, report in reports.items():
    assert report.num_devices == 8
    assert report.param_bytes == expected_param_bytes
    assert report.analytic_flops == pytest.approx(analytic[name])
    # XLA also counts norms, softmax, the loss and AdamW, so its count is larger, but of the same order.
    assert analytic[name] < report.flops < 20 * analytic[name]
    assert report.peak_bytes >= report.argument_bytes >= expected_param_bytes
