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
  # Since issue 22 the robust start is also no earlier than the middle of the run: 16 epochs -> epoch 8,
  # 17 -> 10 (the k=2 schedule's first epoch >= 9); a run whose warm-up ends later keeps the later start.
  assert (
      roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=40, warmup_steps=100, num_epochs=16).first_epoch
      == 8
  )
  assert (
      roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=40, warmup_steps=100, num_epochs=17).first_epoch
      == 10
  )
  assert (
      roclip.settings(_roclip_cfg(variant="robust"), steps_per_epoch=10, warmup_steps=100, num_epochs=16).first_epoch
      == 12
  )
  assert roclip.settings(_roclip_cfg(), steps_per_epoch=40, warmup_steps=100, num_epochs=16).first_epoch == 2  # paper
  assert roclip.settings(_roclip_cfg(variant="robust")).content_targets is True
  assert roclip.settings(_roclip_cfg()).content_targets is False
  with pytest.raises(ValueError, match="variant"):
    roclip.settings(_roclip_cfg(variant="nope"))
  # The gated default: no matching epochs unless first_epoch is set; the gate from the first epoch
  # after the warm-up (inside epoch 3 at 40 steps per epoch -> 4).
  gated = roclip.settings(_roclip_cfg(variant="gated"), steps_per_epoch=40, warmup_steps=100, num_epochs=16)
  assert (gated.first_epoch, gated.own_pair_gate, gated.gate_first_epoch, gated.gate_quorum) == (
      roclip.NO_MATCHING,
      True,
      4,
      0.5,
  )
  assert not any(roclip.is_matching_epoch(e, gated.k, gated.first_epoch) for e in range(1, 40))
  assert roclip.settings(_roclip_cfg(variant="gated", first_epoch=8)).first_epoch == 8
  assert roclip.settings(_roclip_cfg(variant="robust")).own_pair_gate is False
  assert roclip.settings(_roclip_cfg()).own_pair_gate is False
  # The gate's memory: on in the gated variant, off where there is no gate to remember.
  assert gated.gate_memory is True
  assert roclip.settings(_roclip_cfg(variant="gated", gate_memory=False)).gate_memory is False
  assert roclip.settings(_roclip_cfg(variant="robust", gate_memory=True)).gate_memory is False
  assert roclip.settings(_roclip_cfg(variant="paper")).gate_memory is False
  # The image tower's evidence excuses in the gated variant; the gate compares rows unless told.
  assert (gated.image_evidence, gated.content_evidence) == ("excuse", "none")
  assert roclip.settings(_roclip_cfg(variant="gated", image_evidence="none")).image_evidence == "none"
  assert roclip.settings(_roclip_cfg(variant="robust", image_evidence="pass")).image_evidence == "none"
  assert roclip.settings(_roclip_cfg(variant="gated", content_evidence="pass")).content_evidence == "pass"


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


# Content targets (issue 22): duplicates by what a caption says, not by its pool row.


def _content_target_reference(zimg, captions, scale):
  """Float64, loop by loop: cross-entropy against T[i] = softmax_j(scale cos(c_i, c_j)), both directions."""
  zimg, captions = zimg.astype(np.float64), captions.astype(np.float64)
  n = len(zimg)
  logits = scale * zimg @ captions.T
  text = scale * captions @ captions.T
  total_i2t = total_t2i = 0.0
  for i in range(n):
    target = np.exp(text[i] - text[i].max())
    target /= target.sum()
    row = logits[i] - np.log(np.sum(np.exp(logits[i])))  # image i over captions
    col = logits[:, i] - np.log(np.sum(np.exp(logits[:, i])))  # caption i over images
    total_i2t -= np.dot(target, row)
    total_t2i -= np.dot(target, col)
  return 0.5 * (total_i2t + total_t2i) / n


def test_content_target_loss_matches_numpy():
  rng = np.random.default_rng(3)
  zimg, rows = _unit(rng, 12, 6), _unit(rng, 5, 6)
  index = np.array([0, 1, 1, 2, 0, 3, 1, 4, 4, 2, 0, 3], np.int32)
  captions = rows[index].copy()
  captions[11] = rows[1]  # A different row index holding the same vector as images 1, 2 and 6's.
  match = roclip.Match(
      embeddings=jnp.asarray(captions),
      index=jnp.asarray(index),
      similarity=jnp.zeros(12),
      source_poisoned=jnp.zeros(12, jnp.int8),
  )
  for scale in (5.0, 30.0):
    got, aux = roclip.matching_loss(jnp.asarray(zimg), match, jnp.asarray(np.log(scale)), content_targets=True)
    np.testing.assert_allclose(float(got), _content_target_reference(zimg, captions, scale), rtol=1e-5)
    np.testing.assert_allclose(float(aux["loss_i2t"] + aux["loss_t2i"]), 2 * float(got), rtol=1e-6)
  # Far-apart captions at a sharp scale: the targets are one-hot and the loss is the paper's InfoNCE.
  distinct = match.replace(embeddings=jnp.asarray(np.eye(12, dtype=np.float32)))  # Orthogonal captions.
  wide = jnp.asarray(np.pad(zimg, ((0, 0), (0, 6))))  # The same unit images in 12 dimensions.
  soft, _ = roclip.matching_loss(wide, distinct, jnp.asarray(np.log(100.0)), content_targets=True)
  paper, _ = roclip.matching_loss(wide, distinct, jnp.asarray(np.log(100.0)))
  np.testing.assert_allclose(float(soft), float(paper), rtol=1e-4)
  # The text side is a constant: only the image embeddings and the scale get gradients, all finite.
  grads = jax.grad(lambda z, c, t: roclip.soft_target_clip_loss(z, jax.lax.stop_gradient(c), t)[0], argnums=(0, 2))(
      jnp.asarray(zimg), jnp.asarray(captions), jnp.asarray(np.log(10.0))
  )
  assert all(np.isfinite(np.asarray(g)).all() for g in grads)


def test_alignment_sums_and_best_epoch_match_numpy():
  rng = np.random.default_rng(5)
  b = 16
  zimg = _unit(rng, b, 8)
  ztxt = zimg + 0.9 * _unit(rng, b, 8)
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  ztxt[3] = ztxt[2]  # Identical captions: both images count as finding theirs if it is the closest.
  got = {k: float(v) for k, v in roclip.alignment_sums(jnp.asarray(zimg), jnp.asarray(ztxt)).items()}
  sims = zimg.astype(np.float64) @ ztxt.astype(np.float64).T
  found = [sims[i, i] >= sims[i].max() - 1e-7 for i in range(b)]
  np.testing.assert_allclose(got["epoch_own_similarity"], np.mean(np.diagonal(sims)), rtol=1e-5)
  assert got["epoch_own_retrieval"] == pytest.approx(np.mean(found))
  assert got["epoch_steps"] == 1.0
  # Folding: the best epoch is a max over finished epochs' means; only at an epoch's first step.
  stats = {f"roclip/{k}": jnp.zeros(()) for k in roclip.DIAGNOSTIC_SUMS + roclip.ALIGNMENT_SUMS + roclip.BEST_EPOCH}
  history = [(0.30, 0.50, None), (0.10, 0.20, 0.40), (0.35, 0.60, None), (0.05, 0.10, 0.20)]  # (own, retr, match)
  best = {"own": 0.0, "retr": 0.0, "match": 0.0}
  for own, retrieval, matched in history:
    steps = 4.0
    stats["roclip/epoch_own_similarity"] = jnp.asarray(own * steps)
    stats["roclip/epoch_own_retrieval"] = jnp.asarray(retrieval * steps)
    stats["roclip/epoch_steps"] = jnp.asarray(steps)
    stats["roclip/match_similarity"] = jnp.asarray(0.0 if matched is None else matched * steps)
    stats["roclip/steps"] = jnp.asarray(0.0 if matched is None else steps)
    unchanged = roclip.fold_best_epoch(stats, jnp.asarray(False))  # Mid-epoch: nothing moves.
    assert all(float(unchanged[k]) == float(stats[k]) for k in unchanged)
    stats.update(roclip.fold_best_epoch(stats, jnp.asarray(True)))
    best = {
        "own": max(best["own"], own),
        "retr": max(best["retr"], retrieval),
        "match": best["match"] if matched is None else max(best["match"], matched),
    }
    assert float(stats["roclip/best_own_similarity"]) == pytest.approx(best["own"])
    assert float(stats["roclip/best_own_retrieval"]) == pytest.approx(best["retr"])
    assert float(stats["roclip/best_match_similarity"]) == pytest.approx(best["match"])


def _replay(epochs):
  """Epoch rows as `MatchingMonitor` writes them, from per-matching-epoch means, with the run's best
  earlier epoch (`BEST_EPOCH`) folded in the order the epochs ran."""
  rows, best = [], {}
  for epoch in epochs:
    row = {f"roclip/{k}": v for k, v in epoch.items()}
    row.update({f"roclip/best_{k}": v for k, v in best.items()})
    rows.append(row)
    for key in ("own_similarity", "own_retrieval", "match_similarity"):
      if key in epoch:
        best[key] = max(best.get(key, 0.0), epoch[key])
  return rows


# Issue 22's run (real handwritten digits, templated captions, the robust variant before content
# targets), per matching epoch 4, 6, 8, 10, 12: zero-shot fell from ~30% to 12.5% after epoch 4 and
# never came back, while the old detector stayed silent.
ISSUE_22_MATCHING_EPOCHS = [
    dict(match_similarity=0.413, own_similarity=0.135, distinct_match_frac=0.548, largest_hub=8),
    dict(match_similarity=0.052, own_similarity=0.026, distinct_match_frac=0.209, largest_hub=25),
    dict(match_similarity=0.073, own_similarity=0.020, distinct_match_frac=0.222, largest_hub=23),
    dict(match_similarity=0.073, own_similarity=0.018, distinct_match_frac=0.323, largest_hub=18),
    dict(match_similarity=0.080, own_similarity=0.030, distinct_match_frac=0.391, largest_hub=15),
]


def test_collapse_detector_fires_on_the_replayed_collapse_of_issue_22():
  rows = _replay(ISSUE_22_MATCHING_EPOCHS)
  old_rules = roclip.CollapseThresholds(lost_alignment=0.0)  # The detector before issue 22.
  assert all(roclip.collapse_warnings(r, None, old_rules) == [] for r in rows)  # What the issue saw.
  found = [roclip.collapse_warnings(r, None) for r in rows]
  assert found[0] == []  # The first matching epoch has no earlier epoch in this replay.
  for warnings in found[1:]:
    assert warnings and all("lost alignment" in w for w in warnings)
    assert any("matched-caption cosine" in w for w in warnings)
    assert any("own-caption cosine" in w for w in warnings)


def test_collapse_detector_compares_with_the_last_clip_epochs_before_matching():
  """With the CLIP epochs' alignment in the record, the first matching epoch is judged too."""
  clip_epochs = [dict(own_similarity=0.20, own_retrieval=0.30), dict(own_similarity=0.31, own_retrieval=0.52)]
  collapsing = clip_epochs + [
      dict(match_similarity=0.41, own_similarity=0.135, own_retrieval=0.21, distinct_match_frac=0.55, largest_hub=8)
  ]
  first_matching = _replay(collapsing)[-1]
  found = roclip.collapse_warnings(first_matching, None)
  assert len(found) == 2 and "own caption in the batch: 21.0%" in found[0] and "own-caption cosine" in found[1]
  # A matching epoch that keeps what the CLIP epochs learnt (alignment dips by less than half) is healthy.
  healthy = clip_epochs + [
      dict(match_similarity=0.45, own_similarity=0.25, own_retrieval=0.40, distinct_match_frac=0.40, largest_hub=12)
  ]
  assert roclip.collapse_warnings(_replay(healthy)[-1], None) == []


def _gate_inputs(matched, pool):
  """The `Match` of rows `matched` ([B, d]) and a clean `Pool` of rows `pool` ([M, d]), as the gate reads them."""
  b, m = len(matched), len(pool)
  match = roclip.Match(
      embeddings=jnp.asarray(matched, jnp.float32),
      index=jnp.arange(b, dtype=jnp.int32),
      similarity=jnp.zeros(b),
      source_poisoned=jnp.zeros(b, jnp.int8),
  )
  pool_state = roclip.Pool(
      embeddings=jnp.asarray(pool),
      source_ids=jnp.arange(m, dtype=jnp.int32),
      source_poisoned=jnp.zeros(m, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
  )
  return match, pool_state


def _np_excused(ztxt, keep, pool):
  """Pairs with peers (other captions within the gate's halfway rule) most of whom fail."""
  mean_row = pool.mean(axis=0)
  excused = []
  for i in range(len(ztxt)):
    peers = [j for j in range(len(ztxt)) if j != i and ztxt[i] @ ztxt[j] >= 0.5 * (1 + ztxt[i] @ mean_row)]
    excused.append(bool(peers) and sum(keep[j] for j in peers) < len(peers) / 2)
  return np.array(excused, np.float64)


def _np_image_sides(zimg, ztxt, matched, pool):
  """Images closer on average to the other images whose captions say what their own caption says than
  to those whose captions say what their match says (each group by the gate's halfway rule)."""
  mean_row = pool.mean(axis=0)
  sided = []
  for i in range(len(zimg)):
    others = [j for j in range(len(zimg)) if j != i]
    own = [j for j in others if ztxt[i] @ ztxt[j] >= 0.5 * (1 + ztxt[i] @ mean_row)]
    via_match = [j for j in others if matched[i] @ ztxt[j] >= 0.5 * (1 + matched[i] @ mean_row)]
    sided.append(
        bool(own)
        and bool(via_match)
        and np.mean([zimg[i] @ zimg[j] for j in own]) > np.mean([zimg[i] @ zimg[j] for j in via_match])
    )
  return np.array(sided, np.float64)


def _np_content_gate(zimg, ztxt, matched, pool, ids=None, pool_ids=None):
  """Images at least as close on average to the pool captions that say what their own caption says as
  to those that say what their match says (each group by the gate's halfway rule, without the rows
  written from the image's own example); False where the first group is empty."""
  mean_row = pool.mean(axis=0)
  passed = []
  for i in range(len(zimg)):
    usable = [r for r in range(len(pool)) if ids is None or pool_ids[r] != ids[i]]
    own = [r for r in usable if ztxt[i] @ pool[r] >= 0.5 * (1 + ztxt[i] @ mean_row)]
    via_match = [r for r in usable if matched[i] @ pool[r] >= 0.5 * (1 + matched[i] @ mean_row)]
    to_match = np.mean([zimg[i] @ pool[r] for r in via_match]) if via_match else 0.0
    passed.append(bool(own) and np.mean([zimg[i] @ pool[r] for r in own]) >= to_match)
  return np.array(passed, np.float64)


def _np_gated_loss(
    zimg,
    ztxt,
    matched,
    pool,
    log_scale,
    quorum,
    past=None,
    drop_untrusted=False,
    gate_peers=False,
    image_excuse=False,
    contents="none",
    judged=None,
):
  """The own-pair gate and CLIP's loss over the kept positives, in float64 loops. `past`: each
  pair's earlier gate decisions (lists of booleans); a pair then keeps its positive where at least
  half of those and this one passed. `drop_untrusted`: CLIP's loss of the sub-batch of trusted pairs
  alone (the others are no one's negatives). `judged`: the (image, caption) embeddings every decision
  reads, where they are not the trained `zimg`, `ztxt`."""
  b = len(zimg)
  trained_img, trained_txt = zimg, ztxt
  if judged is not None:
    zimg, ztxt = judged
  mean_row = pool.mean(axis=0)
  keep = np.array([ztxt[i] @ matched[i] >= 0.5 * (1 + ztxt[i] @ mean_row) for i in range(b)], np.float64)
  overruled = (_np_content_gate(zimg, ztxt, matched, pool) > 0) & (keep == 0) if contents != "none" else None
  if contents == "pass":  # A row failure passes where the two contents' pool captions overrule it.
    keep = np.maximum(keep, overruled)
  # An excused failure is no decision: the pair keeps its positive, or with a memory its past must
  # hold more passes than fails.
  excused = (_np_excused(ztxt, keep, pool) > 0) & (keep == 0) if gate_peers else np.zeros(b, bool)
  if image_excuse:  # The image tower contradicting the lookup's reading also excuses a failure.
    excused = excused | ((_np_image_sides(zimg, ztxt, matched, pool) > 0) & (keep == 0))
  if contents == "excuse":  # So does the comparison of the two contents overruling it.
    excused = excused | overruled
  trusted = np.maximum(keep, excused)
  if past is not None:
    votes = [list(past[i]) + [bool(keep[i])] for i in range(b)]
    trusted = np.array([sum(v) >= len(v) - sum(v) for v in votes], np.float64)
    # An excused failure: no vote; more passes than fails so far.
    trusted = np.where(excused, [sum(p) > len(p) - sum(p) for p in past], trusted).astype(np.float64)
  weights = trusted if keep.mean() >= quorum else np.ones(b)
  zimg, ztxt = trained_img, trained_txt  # The loss trains the trained views.
  if drop_untrusted:
    sub = [i for i in range(b) if weights[i] > 0]
    logits = np.exp(log_scale) * zimg[sub] @ ztxt[sub].T
    n = len(sub)
    i2t = -sum(logits[r, r] - np.log(sum(np.exp(logits[r, c]) for c in range(n))) for r in range(n))
    t2i = -sum(logits[c, c] - np.log(sum(np.exp(logits[r, c]) for r in range(n))) for c in range(n))
    return keep, 0.5 * (i2t + t2i) / max(n, 1)
  logits = np.exp(log_scale) * zimg @ ztxt.T
  log_rows = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  log_cols = logits - np.log(np.exp(logits).sum(axis=0, keepdims=True))
  total = max(weights.sum(), 1.0)
  i2t = -sum(weights[i] * log_rows[i, i] for i in range(b)) / total
  t2i = -sum(weights[i] * log_cols[i, i] for i in range(b)) / total
  return keep, 0.5 * (i2t + t2i)


def _gated_losses(
    zimg,
    ztxt,
    matched,
    pool,
    past,
    drop_untrusted,
    gate_peers=False,
    image_evidence="none",
    content_evidence="none",
    judged=None,
):
  """The float64 reference (`_np_gated_loss`: keep, loss) and `roclip.gated_pair_loss` (loss, aux) of
  one batch, with the memory holding `past` (None: no memory), at logit scale 10; `judged`: the
  (image, caption) embeddings the decisions read (None: the trained ones)."""
  log_scale = np.log(10.0)
  keep_ref, loss_ref = _np_gated_loss(
      *(x.astype(np.float64) for x in (zimg, ztxt, matched, pool)),
      log_scale,
      roclip.GATE_QUORUM,
      past,
      drop_untrusted,
      gate_peers=gate_peers,
      image_excuse=image_evidence == "excuse",
      contents=content_evidence,
      judged=None if judged is None else tuple(x.astype(np.float64) for x in judged),
  )
  margins = None if past is None else jnp.asarray([2 * sum(p) - len(p) for p in past], jnp.int8)
  match, pool_state = _gate_inputs(matched, pool)
  loss, aux = roclip.gated_pair_loss(
      jnp.asarray(zimg),
      jnp.asarray(ztxt),
      match,
      pool_state,
      {"logit_scale": jnp.asarray(log_scale, jnp.float32)},
      votes=margins,
      drop_untrusted=drop_untrusted,
      gate_peers=gate_peers,
      image_evidence=image_evidence,
      content_evidence=content_evidence,
      judged=None if judged is None else tuple(jnp.asarray(x) for x in judged),
  )
  return keep_ref, loss_ref, loss, aux


@pytest.mark.parametrize("agreeing", [12, 5])  # Above and below the quorum of half the batch of 16.
@pytest.mark.parametrize("memory", [False, True])
@pytest.mark.parametrize("drop_untrusted", [False, True])
def test_own_pair_gate_and_gated_loss_match_numpy(agreeing, memory, drop_untrusted):
  """A caption passes the gate when its matched pool row is closer to it than halfway from the pool's
  mean row; the gated loss trains only passing pairs' positives, and all pairs when under half pass.
  With the memory, a pair keeps its positive where most of its decisions so far and this one passed.
  Leaving untrusted pairs out, the loss is CLIP's over the trusted pairs alone."""
  rng = np.random.default_rng(agreeing)
  b, d = 16, 12
  pool = _unit(rng, 40, d)
  ztxt = _unit(rng, b, d)
  # The first `agreeing` captions matched a near-copy of themselves (a paraphrase), the rest a caption
  # about something else (a pool row turned away from the own caption).
  near = ztxt + 0.2 * _unit(rng, b, d)
  other = pool[:b] - 0.8 * ztxt
  matched = np.where(
      np.arange(b)[:, None] < agreeing,
      near / np.linalg.norm(near, axis=1, keepdims=True),
      other / np.linalg.norm(other, axis=1, keepdims=True),
  )
  zimg = _unit(rng, b, d)
  match, pool_state = _gate_inputs(matched, pool)
  # Histories of 0-3 earlier decisions, some of which outvote this step's.
  past = [list(rng.random(int(rng.integers(0, 4))) < 0.5) for _ in range(b)] if memory else None
  keep_ref, loss_ref, loss, aux = _gated_losses(zimg, ztxt, matched, pool, past, drop_untrusted)
  assert keep_ref[:agreeing].all() and not keep_ref[agreeing:].any()  # The construction holds.
  keep = roclip.own_pair_gate(jnp.asarray(ztxt), match, pool_state)
  np.testing.assert_array_equal(np.asarray(keep), keep_ref)
  np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
  assert float(aux["gate_active"]) == float(agreeing / b >= roclip.GATE_QUORUM)


@pytest.mark.parametrize("drop_untrusted", [False, True])
def test_peers_excuse_the_failures_of_content_the_model_has_not_learnt(drop_untrusted):
  """A failing pair is excused where most of the other captions that say the same fail too, not
  where most of them pass, nor where it has no such peer; an excused failure is no vote. The gated
  loss with peers against float64 loops, with the memory."""
  rng = np.random.default_rng(3)
  d = 16
  pool = _unit(rng, 40, d)
  centres = _unit(rng, 3, d)
  # Captions: 7 about centre 0 (6 pass, 1 fails: the odd one out), 5 about centre 1 (1 passes, 4
  # fail: content not learnt yet), 1 about centre 2 alone (fails, no peer), 3 unrelated (pass).
  group = np.array([0] * 7 + [1] * 5 + [2] + [-1] * 3)
  passing = np.array([1] * 6 + [0] + [1] + [0] * 4 + [0] + [1] * 3, bool)
  b = len(group)
  ztxt = np.where((group >= 0)[:, None], centres[np.maximum(group, 0)] + 0.15 * _unit(rng, b, d), _unit(rng, b, d))
  ztxt /= np.linalg.norm(ztxt, axis=1, keepdims=True)
  near, other = ztxt + 0.1 * _unit(rng, b, d), pool[:b] - 0.9 * ztxt
  matched = np.where(passing[:, None], near, other)
  matched /= np.linalg.norm(matched, axis=1, keepdims=True)
  match, pool_state = _gate_inputs(matched, pool)
  keep = np.asarray(roclip.own_pair_gate(jnp.asarray(ztxt), match, pool_state))
  np.testing.assert_array_equal(keep, passing)  # The construction holds.
  excused = np.asarray(roclip.excused_by_peers(jnp.asarray(ztxt), jnp.asarray(keep), pool_state))
  np.testing.assert_array_equal(excused, _np_excused(ztxt.astype(np.float64), keep, pool.astype(np.float64)))
  failing_excused = np.flatnonzero(excused * (1 - keep))
  np.testing.assert_array_equal(failing_excused, [8, 9, 10, 11])  # Group 1's failures only.
  zimg = _unit(rng, b, d)
  past = [list(rng.random(int(rng.integers(0, 4))) < 0.5) for _ in range(b)]
  margins = jnp.asarray([2 * sum(p) - len(p) for p in past], jnp.int8)
  _, loss_ref, loss, aux = _gated_losses(zimg, ztxt, matched, pool, past, drop_untrusted, gate_peers=True)
  np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(aux["gate_excused"]), excused * (1 - keep))
  # The memory: excused failures leave their margins where they were.
  after = roclip.record_votes(margins, jnp.arange(b), aux["gate"], aux["gate_active"], aux["gate_excused"])
  expected = [2 * sum(p) - len(p) + (0 if i in failing_excused else 2 * int(keep[i]) - 1) for i, p in enumerate(past)]
  np.testing.assert_array_equal(np.asarray(after), expected)


def test_image_evidence_excuses_a_failure_the_image_tower_contradicts():
  """A failing pair whose image looks more like the images captioned as its own caption than like
  those captioned as its match is excused (`image_evidence='excuse'`); one that looks like its match's
  images (a poisoned pair) is not. The side taken and the gated loss against float64 loops."""
  rng = np.random.default_rng(5)
  d = 16
  pool = _unit(rng, 40, d)
  text_centres, image_centres = _unit(rng, 2, d), _unit(rng, 2, d)
  # Two contents, 6 pairs each. Pair 0 (content 0) fails with a match about content 1 but its image
  # is a content-0 image: a clean pair the lookup gets wrong. Pair 6 (captioned as content 1) fails
  # with a match about content 0 and its image is a content-0 image: a poisoned pair.
  content = np.array([0] * 6 + [1] * 6)
  shows = content.copy()
  shows[6] = 0
  b = len(content)
  ztxt = text_centres[content] + 0.15 * _unit(rng, b, d)
  zimg = image_centres[shows] + 0.3 * _unit(rng, b, d)
  ztxt, zimg = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (ztxt, zimg))
  matched = text_centres[content] + 0.1 * _unit(rng, b, d)
  matched[0], matched[6] = text_centres[1], text_centres[0]
  matched /= np.linalg.norm(matched, axis=1, keepdims=True)
  match, pool_state = _gate_inputs(matched, pool)
  keep = np.asarray(roclip.own_pair_gate(jnp.asarray(ztxt), match, pool_state))
  np.testing.assert_array_equal(np.flatnonzero(keep == 0), [0, 6])  # The construction holds.
  sided = np.asarray(roclip.image_sides_with_caption(jnp.asarray(zimg), jnp.asarray(ztxt), match, pool_state))
  reference = _np_image_sides(*(x.astype(np.float64) for x in (zimg, ztxt, matched, pool)))
  np.testing.assert_array_equal(sided, reference)
  assert sided[0] == 1 and sided[6] == 0
  past = [list(rng.random(int(rng.integers(0, 4))) < 0.5) for _ in range(b)]
  past[0] = [True, True]  # A history that trusts an excused pair (margin >= 1).
  for drop_untrusted in (False, True):
    _, loss_ref, loss, aux = _gated_losses(
        zimg, ztxt, matched, pool, past, drop_untrusted, gate_peers=True, image_evidence="excuse"
    )
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    assert float(aux["gate_excused"][0]) == 1 and float(aux["gate_excused"][6]) == 0
    assert float(aux["gate_weights"][0]) == 1  # Excused, and its history holds more passes.


def test_comparing_contents_passes_a_pair_whose_nearest_row_is_an_odd_paraphrase():
  """`content_evidence='pass'`: a row failure passes where the image is on average at least as close to
  the pool captions of its own caption's content as to those of its match's. A clean image whose
  nearest row is an odd paraphrase of another content passes; a poisoned image, close to the captions
  of what it shows, still fails; rows written from the image's own example count for neither
  content. The gate and the gated loss against float64 loops, with the memory."""
  rng = np.random.default_rng(7)
  d = 16
  centres = _unit(rng, 2, d)
  # The pool: 6 paraphrases of each content, one odd paraphrase of content 1 (row 12), 20 others.
  paraphrases = np.repeat(centres, 6, axis=0) + 0.15 * _unit(rng, 12, d)
  odd_direction = _unit(rng, 1, d)[0]
  odd_direction -= centres.T @ np.linalg.lstsq(centres.T, odd_direction, rcond=None)[0]  # Off both contents.
  odd_direction /= np.linalg.norm(odd_direction)
  odd = centres[1] + odd_direction
  pool = np.concatenate([paraphrases, odd[None], _unit(rng, 20, d)])
  pool /= np.linalg.norm(pool, axis=1, keepdims=True)
  # Pairs 0-5 are captioned as content 0, 6-11 as content 1. Image 0 (content 0) leans toward the odd
  # row, its nearest; image 6 is poisoned: captioned as content 1, it shows content 0.
  content = np.array([0] * 6 + [1] * 6)
  b = len(content)
  ztxt = centres[content] + 0.15 * _unit(rng, b, d)
  zimg = centres[content] + 0.3 * _unit(rng, b, d)
  zimg[0] = 0.45 * centres[0] + 0.9 * odd_direction
  zimg[6] = centres[0] + 0.3 * _unit(rng, 1, d)[0]
  ztxt, zimg = (x / np.linalg.norm(x, axis=1, keepdims=True) for x in (ztxt, zimg))
  nearest = np.argmax(zimg @ pool.T, axis=1)
  matched = pool[nearest]
  assert nearest[0] == 12 and nearest[6] < 6  # The construction holds: the lookup as described.
  match, pool_state = _gate_inputs(matched, pool)
  rows_fail = np.flatnonzero(np.asarray(roclip.own_pair_gate(jnp.asarray(ztxt), match, pool_state)) == 0)
  assert 0 in rows_fail and 6 in rows_fail
  passed = np.asarray(roclip.content_gate(*(jnp.asarray(x) for x in (zimg, ztxt)), match, pool_state))
  np.testing.assert_array_equal(passed, _np_content_gate(*(x.astype(np.float64) for x in (zimg, ztxt, matched, pool))))
  assert passed[0] == 1 and passed[6] == 0
  # Every pool row that says what caption 0 says written from example 0 itself: for image 0 its
  # caption's content has no caption left.
  says_caption_0 = pool @ ztxt[0] >= 0.5 * (1 + ztxt[0] @ pool.mean(axis=0))
  ids, pool_ids = np.arange(b), np.where(says_caption_0, 0, 100 + np.arange(len(pool)))
  own_rows = pool_state.replace(source_ids=jnp.asarray(pool_ids, jnp.int32))
  excluded = np.asarray(roclip.content_gate(jnp.asarray(zimg), jnp.asarray(ztxt), match, own_rows, jnp.asarray(ids)))
  np.testing.assert_array_equal(
      excluded, _np_content_gate(*(x.astype(np.float64) for x in (zimg, ztxt, matched, pool)), ids, pool_ids)
  )
  assert excluded[0] == 0
  past = [list(rng.random(int(rng.integers(0, 4))) < 0.5) for _ in range(b)]
  for drop_untrusted in (False, True):
    keep_ref, loss_ref, loss, aux = _gated_losses(
        zimg, ztxt, matched, pool, past, drop_untrusted, gate_peers=True, content_evidence="pass"
    )
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux["gate"]), keep_ref)
    assert keep_ref[0] == 1 and keep_ref[6] == 0
  # As an excuse: the overruled failure abstains (trusted on a history of passes), the poison does not.
  past[0], past[6] = [True, True], [True, True]
  for drop_untrusted in (False, True):
    keep_ref, loss_ref, loss, aux = _gated_losses(
        zimg, ztxt, matched, pool, past, drop_untrusted, gate_peers=True, content_evidence="excuse"
    )
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    assert keep_ref[0] == 0 and float(aux["gate_excused"][0]) == 1 and float(aux["gate_weights"][0]) == 1
    assert float(aux["gate_excused"][6]) == 0


def test_the_gate_judges_the_plain_views_and_trains_the_augmented_ones():
  """`judged` (`gate_views='plain'`): every decision (the gate, the peers, the image evidence) reads
  the un-augmented views' embeddings, and the loss trains the augmented ones. A pair whose augmented
  caption (EDA) drifted off its content fails on its augmented views and passes on its plain ones;
  the gated loss with the memory against float64 loops, with both views."""
  rng = np.random.default_rng(11)
  b, d = 16, 12
  pool = _unit(rng, 40, d)
  plain_txt = _unit(rng, b, d)
  near = plain_txt + 0.2 * _unit(rng, b, d)
  matched = np.where(np.arange(b)[:, None] < 10, near, pool[:b] - 0.8 * plain_txt)  # 10 agree, 6 do not.
  matched /= np.linalg.norm(matched, axis=1, keepdims=True)
  # The augmented captions: pairs 0-2 drifted off their match (a word replaced), the others barely moved.
  drifted = np.arange(b)[:, None] < 3
  aug_txt = np.where(drifted, plain_txt - 1.2 * matched, plain_txt + 0.05 * _unit(rng, b, d))
  aug_txt /= np.linalg.norm(aug_txt, axis=1, keepdims=True)
  plain_img, aug_img = _unit(rng, b, d), _unit(rng, b, d)
  match, pool_state = _gate_inputs(matched, pool)
  on_plain = np.asarray(roclip.own_pair_gate(jnp.asarray(plain_txt), match, pool_state))
  on_aug = np.asarray(roclip.own_pair_gate(jnp.asarray(aug_txt), match, pool_state))
  assert on_plain[:3].all() and not on_aug[:3].any()  # The construction holds.
  past = [list(rng.random(int(rng.integers(0, 4))) < 0.5) for _ in range(b)]
  for drop_untrusted in (False, True):
    keep_ref, loss_ref, loss, aux = _gated_losses(
        aug_img,
        aug_txt,
        matched,
        pool,
        past,
        drop_untrusted,
        gate_peers=True,
        image_evidence="excuse",
        judged=(plain_img, plain_txt),
    )
    np.testing.assert_array_equal(np.asarray(aux["gate"]), keep_ref)
    np.testing.assert_array_equal(keep_ref, on_plain)
    np.testing.assert_allclose(float(loss), loss_ref, rtol=1e-5)
    # The loss is the one of the augmented views: judged on the plain views and trained on them, it differs.
    _, loss_on_plain, _, _ = _gated_losses(
        plain_img, plain_txt, matched, pool, past, drop_untrusted, gate_peers=True, image_evidence="excuse"
    )
    assert abs(loss_on_plain - loss_ref) > 1e-3


def test_gate_votes_keep_the_majority_of_each_examples_decisions():
  """`record_votes` + `trusted_pairs` over many steps against per-example lists of decisions: only
  steps where the gate acted vote; a pair is trusted where at least half its votes (this one
  included) passed; the int8 margin saturates instead of wrapping."""
  rng = np.random.default_rng(0)
  num_examples, b = 20, 8
  votes = jnp.zeros((num_examples,), jnp.int8)
  history = [[] for _ in range(num_examples)]
  for _ in range(30):
    ids = rng.choice(num_examples, size=b, replace=False)
    keep = (rng.random(b) < np.where(ids < 5, 0.2, 0.7)).astype(np.float32)  # Ids 0-4 fail mostly.
    active = float(rng.random() < 0.8)
    trusted = roclip.trusted_pairs(jnp.asarray(keep), votes[jnp.asarray(ids)])
    expected = [sum(history[i] + [k > 0]) * 2 >= len(history[i]) + 1 for i, k in zip(ids, keep)]
    np.testing.assert_array_equal(np.asarray(trusted), np.asarray(expected, np.float32))
    votes = roclip.record_votes(votes, jnp.asarray(ids), jnp.asarray(keep), jnp.asarray(active))
    if active:
      for i, k in zip(ids, keep):
        history[i].append(bool(k))
  np.testing.assert_array_equal(np.asarray(votes), [2 * sum(h) - len(h) for h in history])
  # Without a memory the step's own decision stands.
  keep = jnp.asarray([1.0, 0.0, 1.0])
  np.testing.assert_array_equal(np.asarray(roclip.trusted_pairs(keep, None)), np.asarray(keep))
  # 200 passes: the margin stops at 127, and one fail later still leaves the pair trusted.
  streak = jnp.zeros((1,), jnp.int8)
  for _ in range(200):
    streak = roclip.record_votes(streak, jnp.zeros((1,), jnp.int32), jnp.ones((1,)), jnp.ones(()))
  assert int(streak[0]) == 127
  assert float(roclip.trusted_pairs(jnp.zeros((1,)), streak)[0]) == 1.0


@pytest.mark.parametrize("gate_views", ["plain", "plain_text"])
def test_gate_views_pick_the_evidence_the_gated_step_encodes_end_to_end(demo_root, tmp_path, gate_views):
  """`gate_views`: an unknown value is refused; the plain views are read only where the gate judges by
  them and the data is augmented; the gated step encodes them forward only ('plain_text': the
  caption alone), and a short run with the plain views trains and logs the gate."""
  from roclip_jax import config_lib, defenses, metrics as metrics_lib, train  # pylint: disable=g-import-not-at-top
  from roclip_jax.errors import ConfigError  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top

  overrides = {"roclip.variant": "gated", "roclip.gate_first_epoch": 1, "roclip.gate_quorum": 0.0, "max_steps": 4}
  config = helpers.tiny_config(demo_root, "roclip", **overrides, **{"roclip.gate_views": "sideways"})
  with pytest.raises(ConfigError, match=r"roclip.gate_views.*sideways.*plain_text"):
    config_lib.validate(config, 1)
  config = helpers.tiny_config(demo_root, "roclip", **overrides, **{"roclip.gate_views": gate_views})
  assert not defenses.get("roclip").plain_views(config)  # No augmentation: the views are the plain ones.
  config.augment.text = True
  assert defenses.get("roclip").plain_views(config)
  kind = helpers.defense_for(config).step_kinds()["gated"]
  assert kind.evidence_views == {"plain": ("image_plain", "text_plain"), "plain_text": ("text_plain",)}[gate_views]
  if gate_views == "plain":  # Its views are a superset of 'plain_text''s: one run covers the wiring.
    train.train_and_evaluate(config, str(tmp_path))
    rows = [r for r in metrics_lib.read_metrics(str(tmp_path)) if r["kind"] == "epoch"]
    assert rows and all(0 <= r["roclip/gate_kept_frac"] <= 1 for r in rows)
