"""The RoCLIP pool: top-1 matching against brute force, FIFO semantics, sharded vs replicated."""
import jax
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from roclip_jax import roclip
from roclip_jax import sharding

MESH = None


def _mesh():
  global MESH
  if MESH is None:
    MESH = sharding.make_mesh([("data", -1)])
  return MESH


def _unit(rng, n, d):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("shard_pool", [False, True])
@pytest.mark.parametrize("size,dim,batch", [(64, 16, 32), (256, 32, 64), (1024, 8, 16)])
def test_top1_matches_brute_force(shard_pool, size, dim, batch):
  mesh = _mesh()
  rng = np.random.default_rng(size + dim)
  pool_np = _unit(rng, size, dim)
  z = _unit(rng, batch, dim)
  pool = roclip.Pool(
      embeddings=jnp.asarray(pool_np), source_ids=jnp.arange(size, dtype=jnp.int32),
      source_poisoned=jnp.asarray(rng.integers(0, 3, size), jnp.int8), ptr=jnp.zeros((), jnp.int32))
  pool = jax.device_put(pool, roclip.pool_shardings(mesh, shard_pool))
  zs = jax.device_put(z, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    match = jax.jit(lambda p, q: roclip.nearest_captions(p, q, mesh, shard_pool))(pool, zs)
  # Brute force: every pair's cosine in float64, then argmax.
  sims = np.array([[float(np.dot(a.astype(np.float64), b)) for b in pool_np] for a in z])
  expected = sims.argmax(axis=1)
  np.testing.assert_array_equal(np.asarray(match.index), expected)
  np.testing.assert_array_equal(np.asarray(match.embeddings), pool_np[expected])
  np.testing.assert_allclose(np.asarray(match.similarity), sims.max(axis=1), atol=1e-5)
  np.testing.assert_array_equal(np.asarray(match.source_poisoned), np.asarray(pool.source_poisoned)[expected])


def _write_batches(pool, batches, mesh, shard_pool, fifo):
  fn = jax.jit(lambda p, z, i: roclip.enqueue(p, z, i, jnp.zeros_like(i, jnp.int8), mesh, shard_pool, fifo))
  with jax.set_mesh(mesh):
    for ids in batches:
      z = jnp.tile(ids[:, None].astype(jnp.float32), (1, 4))  # Row content = its id, to read the order back.
      sh = sharding.batch_sharding(mesh)
      pool = fn(pool, jax.device_put(z, sh), jax.device_put(ids, sh))
  return pool


@settings(max_examples=12, deadline=None)
@given(size_mult=st.integers(1, 6), extra=st.integers(0, 7), batch_mult=st.integers(1, 3), steps=st.integers(1, 9))
def test_ring_pool_holds_the_last_m_embeddings_in_order(size_mult, extra, batch_mult, steps):
  """Replicated ring: after T batches the rows are the last M ids, oldest at `ptr`."""
  mesh = _mesh()
  batch = 8 * batch_mult
  size = max(8 * size_mult + extra, batch)
  pool = roclip.init_pool(jax.random.key(0), size, 4)
  pool = jax.device_put(pool, roclip.pool_shardings(mesh, False))
  stream = np.arange(steps * batch, dtype=np.int32)
  pool = _write_batches(pool, stream.reshape(steps, batch), mesh, False, "ring")
  ids = np.asarray(pool.source_ids)
  ptr = int(pool.ptr)
  written = len(stream)
  assert ptr == written % size
  if written >= size:
    in_order = np.roll(ids, -ptr)  # Oldest first.
    np.testing.assert_array_equal(in_order, stream[-size:])
  else:
    np.testing.assert_array_equal(ids[:written], stream)
    assert (ids[written:] == -1).all()
  np.testing.assert_array_equal(np.asarray(pool.embeddings)[:, 0], np.where(ids >= 0, ids, np.asarray(pool.embeddings)[:, 0]))


@settings(max_examples=8, deadline=None)
@given(rows_per_shard=st.integers(1, 5), local_batch=st.integers(1, 3), steps=st.integers(1, 7))
def test_sharded_ring_pool_each_shard_holds_its_last_rows(rows_per_shard, local_batch, steps):
  """Sharded ring: shard s holds the last M/n ids of its own slice of every batch."""
  mesh = _mesh()
  n = sharding.num_batch_shards(mesh)
  local_size = max(rows_per_shard * local_batch, local_batch)
  size, batch = n * local_size, n * local_batch
  pool = jax.device_put(roclip.init_pool(jax.random.key(0), size, 4), roclip.pool_shardings(mesh, True))
  stream = np.arange(steps * batch, dtype=np.int32).reshape(steps, batch)
  pool = _write_batches(pool, stream, mesh, True, "ring")
  ids = np.asarray(pool.source_ids).reshape(n, local_size)
  ptr = int(pool.ptr)
  for s in range(n):
    local_stream = stream[:, s * local_batch:(s + 1) * local_batch].reshape(-1)
    if len(local_stream) >= local_size:
      np.testing.assert_array_equal(np.roll(ids[s], -ptr), local_stream[-local_size:])
    else:
      np.testing.assert_array_equal(ids[s, :len(local_stream)], local_stream)


def _lightly_reference(size, batches):
  """lightly 1.2.39 MemoryBankModule._dequeue_and_enqueue, transcribed."""
  bank = [-1] * size
  ptr = 0
  for b in batches:
    if ptr + len(b) >= size:
      bank[ptr:] = list(b[: size - ptr])
      ptr = 0
    else:
      bank[ptr:ptr + len(b)] = list(b)
      ptr += len(b)
  return np.array(bank), ptr


@pytest.mark.parametrize("size,batch,steps", [(20, 8, 7), (24, 8, 7), (64, 16, 3)])
def test_lightly_fifo_matches_the_original_memory_bank(size, batch, steps):
  mesh = _mesh()
  pool = jax.device_put(roclip.init_pool(jax.random.key(0), size, 4), roclip.pool_shardings(mesh, False))
  stream = np.arange(steps * batch, dtype=np.int32).reshape(steps, batch)
  pool = _write_batches(pool, stream, mesh, False, "lightly")
  ref_ids, ref_ptr = _lightly_reference(size, stream)
  np.testing.assert_array_equal(np.asarray(pool.source_ids), ref_ids)
  assert int(pool.ptr) == ref_ptr


def test_matching_epoch_schedule():
  assert [e for e in range(1, 9) if roclip.is_matching_epoch(e, 2)] == [2, 4, 6, 8]
  assert [e for e in range(1, 10) if roclip.is_matching_epoch(e, 3)] == [3, 6, 9]


def test_pool_initialisation_is_unit_norm_and_unowned():
  pool = roclip.init_pool(jax.random.key(3), 100, 12)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(pool.embeddings), axis=1), 1.0, rtol=1e-6)
  assert (np.asarray(pool.source_ids) == -1).all() and int(pool.ptr) == 0
