"""The RoCLIP pool: top-1 matching against brute force, FIFO semantics, sharded vs replicated."""

import jax
import jax.numpy as jnp
from hypothesis import given, settings, strategies as st
import numpy as np
import pytest

from roclip_jax.defenses import roclip
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
      embeddings=jnp.asarray(pool_np),
      source_ids=jnp.arange(size, dtype=jnp.int32),
      source_poisoned=jnp.asarray(rng.integers(0, 3, size), jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
      source_labels=jnp.asarray(rng.integers(-1, 5, size), jnp.int32),
  )
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
  np.testing.assert_array_equal(np.asarray(match.source_label), np.asarray(pool.source_labels)[expected])


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
  np.testing.assert_array_equal(
      np.asarray(pool.embeddings)[:, 0], np.where(ids >= 0, ids, np.asarray(pool.embeddings)[:, 0])
  )


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
    local_stream = stream[:, s * local_batch : (s + 1) * local_batch].reshape(-1)
    if len(local_stream) >= local_size:
      np.testing.assert_array_equal(np.roll(ids[s], -ptr), local_stream[-local_size:])
    else:
      np.testing.assert_array_equal(ids[s, : len(local_stream)], local_stream)


def _lightly_reference(size, batches):
  """lightly 1.2.39 MemoryBankModule._dequeue_and_enqueue, transcribed."""
  bank = [-1] * size
  ptr = 0
  for b in batches:
    if ptr + len(b) >= size:
      bank[ptr:] = list(b[: size - ptr])
      ptr = 0
    else:
      bank[ptr : ptr + len(b)] = list(b)
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


# ----------------------------------------------------------------------------
# The robust variant: schedule, CSLS matching, duplicate masking; diagnostics and collapse detector.


def test_matching_schedule_with_a_first_epoch():
  assert [e for e in range(1, 11) if roclip.is_matching_epoch(e, 2, 4)] == [4, 6, 8, 10]
  assert [e for e in range(1, 11) if roclip.is_matching_epoch(e, 3, 5)] == [5, 8]


def _roclip_cfg(**fields):
  import ml_collections  # pylint: disable=import-outside-toplevel

  base = dict(k=2, variant="paper", first_epoch=None, update_pool_every_step=None, csls_k=None, mask_duplicates=None)
  base.update(fields)
  return ml_collections.ConfigDict(base)


def test_settings_paper_robust_and_explicit_overrides():
  paper = roclip.settings(_roclip_cfg(), steps_per_epoch=48, warmup_steps=100)
  assert (paper.first_epoch, paper.pool_every_step, paper.csls_k, paper.mask_duplicates) == (2, False, 0, False)
  robust = roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=48, warmup_steps=100)
  # The warm-up ends inside epoch 3 (steps 97..144), so the first matching epoch of the k=2 schedule after it is 4.
  assert (robust.first_epoch, robust.pool_every_step, robust.csls_k, robust.mask_duplicates) == (4, True, 10, True)
  # When the warm-up ends inside epoch 1 (1M pairs at batch 512: 1953 steps per epoch), it is the paper's schedule.
  assert roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=1953, warmup_steps=1000).first_epoch == 2
  # A warm-up of 5.1 epochs: epoch 6 still warms up, so the k=2 schedule starts at 8.
  assert roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=1953, warmup_steps=10000).first_epoch == 8
  assert roclip.settings(_roclip_cfg(variant="robust", k=3), steps_per_epoch=1953, warmup_steps=1000).first_epoch == 3
  ablated = roclip.settings(
      _roclip_cfg(variant="robust", csls_k=0, first_epoch=2), steps_per_epoch=48, warmup_steps=100
  )
  assert (ablated.first_epoch, ablated.csls_k, ablated.mask_duplicates) == (2, 0, True)
  with pytest.raises(ValueError, match="variant"):
    roclip.settings(_roclip_cfg(variant="nope"))


def _csls_reference(z, pool, k):
  """CSLS (Conneau et al. 2018) in float64: 2 cos(x, y) - r_img(x) - r_pool(y), argmax over pool rows."""
  sims = z.astype(np.float64) @ pool.astype(np.float64).T
  r_pool = np.sort(sims, axis=0)[-k:].mean(axis=0)  # Each row's mean cosine to its k nearest images.
  r_img = np.sort(sims, axis=1)[:, -k:].mean(axis=1)
  scores = 2 * sims - r_img[:, None] - r_pool[None, :]
  return scores.argmax(axis=1), sims


@pytest.mark.parametrize("shard_pool", [False, True])
@pytest.mark.parametrize("k", [1, 4])
def test_csls_matching_matches_the_formula(shard_pool, k):
  mesh = _mesh()
  rng = np.random.default_rng(k)
  size, dim, batch = 64, 8, 32
  # Images around one direction; pool row 5 is that direction (a hub, close to all of them), rows
  # 10..41 are noisy copies of the individual images (their own "captions").
  hub = _unit(rng, 1, dim)
  z = hub + 0.6 * _unit(rng, batch, dim)
  z = (z / np.linalg.norm(z, axis=1, keepdims=True)).astype(np.float32)
  pool_np = _unit(rng, size, dim)
  pool_np[5] = hub[0]
  own = z + 0.6 * _unit(rng, batch, dim)
  pool_np[10 : 10 + batch] = own / np.linalg.norm(own, axis=1, keepdims=True)
  pool = roclip.Pool(
      embeddings=jnp.asarray(pool_np),
      source_ids=jnp.arange(size, dtype=jnp.int32),
      source_poisoned=jnp.zeros(size, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
      source_labels=jnp.arange(size, dtype=jnp.int32),
  )
  pool = jax.device_put(pool, roclip.pool_shardings(mesh, shard_pool))
  with jax.set_mesh(mesh):
    match = jax.jit(lambda p, q: roclip.nearest_captions(p, q, mesh, shard_pool, csls_k=k))(
        pool, jax.device_put(z, sharding.batch_sharding(mesh))
    )
  expected, sims = _csls_reference(z, pool_np, k)
  np.testing.assert_array_equal(np.asarray(match.index), expected)
  np.testing.assert_allclose(np.asarray(match.similarity), sims[np.arange(batch), expected], atol=1e-5)
  np.testing.assert_array_equal(np.asarray(match.source_label), expected)
  top1 = np.argmax(sims, axis=1)
  assert (top1 == 5).sum() > (expected == 5).sum()  # The hub lost images ...
  assert len(set(expected)) > len(set(top1))  # ... and the batch matched more distinct rows.


def _masked_infonce_reference(zimg, zmatch, index, scale):
  """Float64, loop by loop: InfoNCE where pairs sharing a matched row are left out of each other's softmax."""
  n = len(index)
  logits = scale * zimg.astype(np.float64) @ zmatch.astype(np.float64).T
  i2t = t2i = 0.0
  for i in range(n):
    keep = [j for j in range(n) if j == i or index[j] != index[i]]
    i2t -= logits[i, i] - np.log(np.sum(np.exp(logits[i, keep])))
    t2i -= logits[i, i] - np.log(np.sum(np.exp(logits[keep, i])))
  return 0.5 * (i2t + t2i) / n


def test_matching_loss_with_duplicate_masking_matches_numpy():
  rng = np.random.default_rng(0)
  zimg, pool_np = _unit(rng, 12, 6), _unit(rng, 5, 6)
  index = np.array([0, 1, 1, 2, 0, 3, 1, 4, 4, 2, 0, 3], np.int32)  # Rows shared by 2-3 images.
  match = roclip.Match(
      embeddings=jnp.asarray(pool_np[index]),
      index=jnp.asarray(index),
      similarity=jnp.zeros(12),
      source_poisoned=jnp.zeros(12, jnp.int8),
  )
  log_scale = np.log(10.0)
  masked, _ = roclip.matching_loss(jnp.asarray(zimg), match, jnp.asarray(log_scale), mask_duplicates=True)
  np.testing.assert_allclose(float(masked), _masked_infonce_reference(zimg, pool_np[index], index, 10.0), rtol=1e-5)
  # The paper's loss keeps every off-diagonal pair as a negative: the reference with all indices distinct.
  paper, _ = roclip.matching_loss(jnp.asarray(zimg), match, jnp.asarray(log_scale))
  np.testing.assert_allclose(
      float(paper), _masked_infonce_reference(zimg, pool_np[index], np.arange(12), 10.0), rtol=1e-5
  )
  # Without duplicate matches the two losses are the same function.
  distinct = match.replace(index=jnp.arange(12, dtype=jnp.int32))
  a, _ = roclip.matching_loss(jnp.asarray(zimg), distinct, jnp.asarray(log_scale), mask_duplicates=True)
  b, _ = roclip.matching_loss(jnp.asarray(zimg), distinct, jnp.asarray(log_scale))
  assert float(a) == float(b)
  # Gradients stay finite where pairs are masked.
  grad = jax.grad(lambda z: roclip.matching_loss(z, match, jnp.asarray(log_scale), mask_duplicates=True)[0])(
      jnp.asarray(zimg)
  )
  assert np.isfinite(np.asarray(grad)).all()


def _diagnostics(zimg, ztxt, index, pool_labels, labels, poisoned, source_poisoned, similarity):
  match = roclip.Match(
      embeddings=jnp.zeros_like(jnp.asarray(zimg)),
      index=jnp.asarray(index, jnp.int32),
      similarity=jnp.asarray(similarity, jnp.float32),
      source_poisoned=jnp.asarray(source_poisoned, jnp.int8),
      source_label=jnp.asarray(pool_labels[index], jnp.int32),
  )
  return {
      k: float(v)
      for k, v in roclip.step_diagnostics(
          jnp.asarray(zimg), jnp.asarray(ztxt), match, jnp.asarray(labels), jnp.asarray(poisoned)
      ).items()
  }


def test_step_diagnostics_match_numpy():
  rng = np.random.default_rng(1)
  b = 16
  zimg, ztxt = _unit(rng, b, 4), _unit(rng, b, 4)
  index = rng.integers(0, 6, b)
  pool_labels = np.array([0, 1, 2, -1, 1, 0])
  labels = rng.integers(0, 3, b)
  labels[0] = -1
  poisoned = (np.arange(b) % 5 == 0).astype(np.int8)
  source_poisoned = (np.arange(b) % 3 == 0).astype(np.int8)
  similarity = rng.uniform(size=b)
  got = _diagnostics(zimg, ztxt, index, pool_labels, labels, poisoned, source_poisoned, similarity)
  _, counts = np.unique(index, return_counts=True)
  labelled = (labels >= 0) & (pool_labels[index] >= 0)
  assert got["distinct_matches"] == len(counts)
  assert got["largest_hub"] == counts.max()
  np.testing.assert_allclose(got["own_similarity"], np.mean(np.sum(zimg * ztxt, axis=1)), rtol=1e-5)
  np.testing.assert_allclose(got["match_similarity"], similarity.mean(), rtol=1e-5)
  assert got["labelled_matches"] == labelled.sum()
  assert got["matched_same_class"] == (labelled & (labels == pool_labels[index])).sum()
  assert got["poisoned_in_batch"] == poisoned.sum()
  assert got["poisoned_matched_clean"] == ((poisoned > 0) & (source_poisoned == 0)).sum()


def _epoch_row(zimg, ztxt, index, pool_labels, labels, similarity, steps=3):
  step = _diagnostics(
      zimg, ztxt, index, pool_labels, labels, np.zeros(len(index), np.int8), np.zeros(len(index), np.int8), similarity
  )
  return roclip.epoch_diagnostics({k: steps * v for k, v in step.items()}, batch_size=len(index))


def test_collapse_detector_on_a_constructed_collapse_and_a_healthy_batch():
  rng = np.random.default_rng(2)
  b, classes = 128, 10
  labels = np.arange(b) % classes
  zimg = _unit(rng, b, 16)
  ztxt = zimg + 0.3 * _unit(rng, b, 16)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  own = np.sum(zimg * ztxt, axis=1)
  # Collapse: every image matched to one pool row, a caption nearly orthogonal to all of them.
  pool_labels = np.arange(1000) % classes
  collapsed = _epoch_row(zimg, ztxt, np.full(b, 7), pool_labels, labels, np.full(b, 0.02))
  assert collapsed["roclip/distinct_match_frac"] == 1 / b and collapsed["roclip/largest_hub"] == b
  found = roclip.collapse_warnings(collapsed, classes)
  assert len(found) == 3 and "hubness" in found[0] and "drift" in found[1] and "random" in found[2]
  # Healthy: distinct rows, each of the image's own class, matched about as closely as the own caption.
  healthy_index = np.arange(b) * 7 % 1000
  healthy_index = healthy_index - healthy_index % classes + labels  # Same class as the image.
  healthy = _epoch_row(zimg, ztxt, healthy_index, pool_labels, labels, own)
  assert healthy["roclip/matched_same_class_frac"] == 1.0
  assert roclip.collapse_warnings(healthy, classes) == []
  # Without labels the same-class check is skipped, the others still run.
  assert len(roclip.collapse_warnings(collapsed, None)) == 2


@pytest.mark.parametrize("shard_pool", [False, True])
def test_an_image_never_matches_its_own_examples_caption(shard_pool):
  mesh = _mesh()
  rng = np.random.default_rng(7)
  size, dim, batch = 64, 8, 16
  z = _unit(rng, batch, dim)
  pool_np = _unit(rng, size, dim)
  row_ids = np.arange(1000, 1000 + size, dtype=np.int32)
  ids = np.arange(batch, dtype=np.int32) + 500
  # Rows 3k hold image k's own caption (from an earlier epoch): its closest row by far.
  for k in range(batch):
    pool_np[3 * k] = z[k]
    row_ids[3 * k] = ids[k]
  pool = roclip.Pool(
      embeddings=jnp.asarray(pool_np),
      source_ids=jnp.asarray(row_ids),
      source_poisoned=jnp.zeros(size, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
      source_labels=jnp.zeros(size, jnp.int32),
  )
  pool = jax.device_put(pool, roclip.pool_shardings(mesh, shard_pool))
  sh = sharding.batch_sharding(mesh)
  with jax.set_mesh(mesh):
    fn = jax.jit(lambda p, q, i: roclip.nearest_captions(p, q, mesh, shard_pool, exclude_ids=i))
    excluded = fn(pool, jax.device_put(z, sh), jax.device_put(ids, sh))
    plain = jax.jit(lambda p, q: roclip.nearest_captions(p, q, mesh, shard_pool))(pool, jax.device_put(z, sh))
  np.testing.assert_array_equal(np.asarray(plain.index), 3 * np.arange(batch))  # Without it: the own caption.
  sims = z.astype(np.float64) @ pool_np.T.astype(np.float64)
  sims[row_ids[None, :] == ids[:, None]] = -np.inf
  np.testing.assert_array_equal(np.asarray(excluded.index), sims.argmax(axis=1))
  assert not (row_ids[np.asarray(excluded.index)] == ids).any()
