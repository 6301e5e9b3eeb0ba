"""`RoClip.match`, the lookup a matching step runs, and `roclip.lookup_dtype`, against NumPy brute force."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import sharding
from roclip_jax.defenses import roclip


@functools.cache
def _mesh():
  return sharding.make_mesh([("data", -1)])


def _defense(**fields):
  config = config_lib.base_config()
  config.defense = "roclip"
  for name, value in fields.items():
    config.roclip[name] = value
  return roclip.RoClip(config, defenses.RunFacts(num_examples=64, steps_per_epoch=1))


def _unit(x):
  return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _pool(embeddings, source_ids, mesh, shard_pool):
  size = embeddings.shape[0]
  pool = roclip.Pool(
      embeddings=jnp.asarray(embeddings),
      source_ids=jnp.asarray(source_ids, jnp.int32),
      source_poisoned=jnp.asarray(np.arange(size) % 3, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
      source_labels=jnp.asarray(np.arange(size) % 7, jnp.int32),
  )
  return jax.device_put(pool, roclip.pool_shardings(mesh, shard_pool))


def _run_match(defense, pool, z, ids, mesh):
  sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    return jax.jit(lambda p, q, i: defense.match(p, q, i, mesh))(pool, jax.device_put(z, sh), jax.device_put(ids, sh))


def _reference_scores(z, pool, csls_k, exclude, row_ids, ids):
  """The matching scores by brute force in NumPy float32: cosine, or CSLS 2 cos - mean of each row's
  csls_k largest cosines over the batch; own-example rows at -inf."""
  sims = z @ pool.T
  scores = sims
  if csls_k:
    hubness = np.sort(sims, axis=0)[-min(csls_k, len(z)) :].mean(axis=0)
    scores = 2 * sims - hubness[None, :]
  if exclude:
    scores = np.where(row_ids[None, :] == ids[:, None], -np.inf, scores)
  return scores


def _separated_data(seed, size=256, dim=32, batch=64):
  """Queries each near their own pool row (cosine ~0.95; random rows stay below ~0.6), so no bfloat16
  rounding (~4e-3 on a cosine) can change which row wins. Every 4th query's nearest row is written by
  its own example, for `exclude_own`, and a second row at cosine ~0.8 is then its clear winner."""
  rng = np.random.default_rng(seed)
  pool = _unit(rng.normal(size=(size, dim)))
  rows = rng.choice(size, batch + batch // 4, replace=False)
  near, second = rows[:batch], rows[batch:]
  z = _unit(pool[near] + 0.05 * rng.normal(size=(batch, dim)))
  pool[second] = _unit(z[::4] + 0.12 * rng.normal(size=(len(second), dim)))
  row_ids = np.arange(1000, 1000 + size, dtype=np.int32)
  ids = np.arange(batch, dtype=np.int32)
  row_ids[near[::4]] = ids[::4]
  return pool, z, row_ids, ids


@pytest.mark.parametrize("shard_pool", [False, True])
@pytest.mark.parametrize("variant", ["paper", "robust"])
def test_bfloat16_lookup_picks_the_float32_brute_force_rows(shard_pool, variant):
  mesh = _mesh()
  pool_np, z, row_ids, ids = _separated_data(seed=3 + shard_pool)
  defense = _defense(variant=variant, lookup_dtype="bfloat16", shard_pool=shard_pool)
  rc = defense.settings()
  scores = _reference_scores(z, pool_np, rc.csls_k, rc.exclude_own, row_ids, ids)
  top2 = np.sort(scores, axis=1)[:, -2:]
  assert (top2[:, 1] - top2[:, 0]).min() > 0.05  # The data really are separated far beyond bf16's rounding.
  expected = scores.argmax(axis=1)
  if rc.exclude_own:  # Exclusion moved those queries off their nearest row.
    assert (row_ids[expected] != ids).all() and (scores.argmax(axis=1) != (z @ pool_np.T).argmax(axis=1)).any()
  match = _run_match(defense, _pool(pool_np, row_ids, mesh, shard_pool), z, ids, mesh)
  np.testing.assert_array_equal(np.asarray(match.index), expected)
  np.testing.assert_array_equal(np.asarray(match.embeddings), pool_np[expected])
  np.testing.assert_array_equal(np.asarray(match.source_poisoned), expected % 3)
  np.testing.assert_array_equal(np.asarray(match.source_label), expected % 7)
  # The diagnostics' similarity is the float32 cosine of the chosen row, not a bfloat16-input score.
  chosen = pool_np[expected]
  cosine = np.sum(z * chosen, axis=1) / (np.linalg.norm(z, axis=1) * np.linalg.norm(chosen, axis=1))
  assert match.similarity.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(match.similarity), cosine, rtol=0, atol=2e-6)


@pytest.mark.parametrize("shard_pool", [False, True])
def test_bfloat16_lookup_ties_rows_that_float32_separates(shard_pool):
  """Two rows at cosine 0.9000 and 0.9001 to every query round to the same bfloat16 score (its spacing
  near 0.9 is 2**-8), so the bfloat16 lookup takes the lower index, float32 the closer row: the field
  really changes the matmul, and only on such near-ties."""
  mesh = _mesh()
  size, dim, batch = 64, 16, 8
  rng = np.random.default_rng(0)
  pool_np = rng.normal(size=(size, dim))
  pool_np[:, 0] = 0.0  # Orthogonal to the queries: cosine 0.
  low, high = 5, size - 3  # On different shards when the pool is sharded.
  for row, cos in ((low, 0.9000), (high, 0.9001)):
    pool_np[row] = 0.0
    pool_np[row, 0], pool_np[row, 1] = cos, np.sqrt(1 - cos**2)
  pool_np = _unit(pool_np)
  z = np.zeros((batch, dim), np.float32)
  z[:, 0] = 1.0
  pool = _pool(pool_np, np.arange(size), mesh, shard_pool)
  ids = np.arange(batch, dtype=np.int32)
  got = {}
  for dtype in ("float32", "bfloat16"):
    got[dtype] = _run_match(_defense(variant="paper", lookup_dtype=dtype, shard_pool=shard_pool), pool, z, ids, mesh)
  np.testing.assert_array_equal(np.asarray(got["float32"].index), np.full(batch, high))
  np.testing.assert_array_equal(np.asarray(got["bfloat16"].index), np.full(batch, low))
  np.testing.assert_allclose(np.asarray(got["bfloat16"].similarity), np.full(batch, pool_np[low, 0]), atol=1e-7)


@pytest.mark.parametrize("shard_pool", [False, True])
@pytest.mark.parametrize("variant", ["paper", "robust"])
def test_match_is_the_float32_lookup_with_the_variants_settings(shard_pool, variant):
  """With the default float32 lookup, `match` is `nearest_captions` with the variant's csls_k and
  exclusion, bit for bit, and the matching loss pairs each image with that match."""
  mesh = _mesh()
  pool_np, z, row_ids, ids = _separated_data(seed=11)
  defense = _defense(variant=variant, shard_pool=shard_pool)
  rc = defense.settings()
  pool = _pool(pool_np, row_ids, mesh, shard_pool)
  got = _run_match(defense, pool, z, ids, mesh)
  sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    direct = jax.jit(
        lambda p, q, i: roclip.nearest_captions(p, q, mesh, shard_pool, rc.csls_k, i if rc.exclude_own else None)
    )(pool, jax.device_put(z, sh), jax.device_put(ids, sh))
    kind = defense.step_kinds()["match"]
    batch = {"id": jax.device_put(ids, sh)}
    _, aux = jax.jit(
        lambda p, q: defense.loss(kind, {"image": q}, {"logit_scale": jnp.zeros(())}, p, batch, mesh, None)
    )(pool, jax.device_put(z, sh))
  for field in ("embeddings", "index", "similarity", "source_poisoned", "source_label"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)), np.asarray(getattr(direct, field)), err_msg=field)
    np.testing.assert_array_equal(np.asarray(getattr(aux["match"], field)), np.asarray(getattr(got, field)))
  expected = _reference_scores(z, pool_np, rc.csls_k, rc.exclude_own, row_ids, ids).argmax(axis=1)
  np.testing.assert_array_equal(np.asarray(got.index), expected)


def test_an_unknown_lookup_dtype_is_a_config_error():
  config = config_lib.base_config()
  config.defense = "roclip"
  config.roclip.lookup_dtype = "float16"
  with pytest.raises(config_lib.ConfigError, match=r"config\.roclip\.lookup_dtype.*'float16' is unknown.*'bfloat16'"):
    config_lib.validate(config, num_batch_shards=8)
  config.roclip.lookup_dtype = "bfloat16"
  config_lib.validate(config, num_batch_shards=8)  # Accepted.


@pytest.mark.parametrize("batch,size,k", [(64, 300, 10), (10, 40, 10), (128, 20000, 4), (16, 64, 1)])
def test_cpu_row_hubness_is_top_k_bit_for_bit(batch, size, k):
  """The CPU formulation of CSLS's row hubness returns top_k's mean exactly, duplicates included."""
  rng = np.random.default_rng(batch + size)
  sims = np.round(rng.uniform(-1, 1, size=(batch, size)) * 64).astype(np.float32) / 64  # Many exact ties.
  want = np.sort(sims, axis=0)[::-1][:k]  # Each row's k largest cosines, descending.
  insertion = np.asarray(jax.jit(roclip._row_hubness_by_insertion, static_argnums=1)(jnp.asarray(sims), k))
  top_k = np.asarray(jax.jit(roclip._row_hubness, static_argnums=1)(jnp.asarray(sims), k))
  np.testing.assert_array_equal(insertion.view(np.uint32), top_k.view(np.uint32))
  np.testing.assert_allclose(insertion, want.mean(axis=0), rtol=1e-6)
