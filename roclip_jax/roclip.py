"""The RoCLIP defense: a pool of recent caption embeddings and top-1 matching.

Everything RoCLIP adds to CLIP training lives in this file (ROCLIP.md §1):

* `Pool`: a FIFO ring buffer of M x d L2-normalised, stop-gradient text
  embeddings, held on device inside the train state, so it is sharded, donated
  and checkpointed with the model (the original code loses it on resume).
  It starts as random unit vectors, as lightly's memory bank does.
* `nearest_captions`: each image embedding finds its cosine top-1 row of the
  pool. With a sharded pool every device searches its own rows, then a
  cross-device reduction picks the global winner; the pool is never gathered.
* `enqueue`: writes the current batch's caption embeddings after the query, so
  an image never matches its own caption.
* `matching_loss`: the InfoNCE loss with the matched caption in place of the
  image's own caption, in both directions (§1.4).
* `is_matching_epoch`: epoch e (from 1) is a matching epoch iff e % K == 0.

Sharded layout: with `shard_pool`, row block s of the pool lives on batch shard
s and is written only by that shard's slice of the batch, so enqueueing needs no
communication. The pool is then n independent rings of M/n rows; together they
hold the most recent M/n embeddings of every shard's stream, i.e. the same
steps' captions as one global ring of M rows.
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from roclip_jax import losses
from roclip_jax import sharding as sharding_lib

FIFO_MODES = ("ring", "lightly")


@flax.struct.dataclass
class Pool:
  embeddings: jax.Array  # f32[M, d], unit rows.
  source_ids: jax.Array  # i32[M], example id of the caption in each row; -1 = random init.
  source_poisoned: jax.Array  # i8[M], poison kind of that example; -1 = random init.
  ptr: jax.Array  # i32[], next row to write (inside each shard when sharded).

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]


@flax.struct.dataclass
class Match:
  embeddings: jax.Array  # f32[B, d], the matched pool rows (stop-gradient).
  index: jax.Array  # i32[B], global pool row of each match.
  similarity: jax.Array  # f32[B], cosine of image and matched caption.
  source_poisoned: jax.Array  # i8[B], poison kind of the matched caption's example.


def is_matching_epoch(epoch: int, k: int) -> bool:
  """Epochs count from 1; with K=2 epochs 2, 4, 6, ... are matching epochs."""
  return k > 0 and epoch % k == 0


def init_pool(key: jax.Array, size: int, dim: int) -> Pool:
  """Random unit vectors (lightly's initialisation): the first ~M/B matching
  steps match partly against noise, as in the original."""
  emb = losses.l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))
  return Pool(
      embeddings=emb,
      source_ids=jnp.full((size,), -1, jnp.int32),
      source_poisoned=jnp.full((size,), -1, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
  )


def pool_shardings(mesh: Mesh, shard_pool: bool) -> Pool:
  rows = NamedSharding(mesh, P(sharding_lib.batch_axes(mesh)) if shard_pool else P())
  return Pool(embeddings=rows, source_ids=rows, source_poisoned=rows, ptr=NamedSharding(mesh, P()))


def matching_loss(zimg: jax.Array, match: Match, log_scale: jax.Array):
  """L_RoCLIP (§1.4): InfoNCE of images against their matched captions.

  The own caption does not appear; the matched rows are constants, so only the
  image tower and the logit scale get gradients.
  """
  return losses.clip_loss(zimg, jax.lax.stop_gradient(match.embeddings), log_scale)


# ----------------------------------------------------------------------------
# Matching.


def nearest_captions(pool: Pool, zimg: jax.Array, mesh: Mesh, shard_pool: bool) -> Match:
  """Cosine top-1 pool row for every image (rows and queries are unit vectors).

  Ties go to the lowest pool index, as `argmax` does.
  """
  zimg = jax.lax.stop_gradient(zimg)
  if not shard_pool:
    sims = zimg @ pool.embeddings.T  # [B, M]
    index = jnp.argmax(sims, axis=1).astype(jnp.int32)
    return Match(
        embeddings=pool.embeddings[index],
        index=index,
        similarity=jnp.take_along_axis(sims, index[:, None], axis=1)[:, 0],
        source_poisoned=pool.source_poisoned[index],
    )
  axes = sharding_lib.batch_axes(mesh)
  rows = P(axes)
  fn = jax.shard_map(
      functools.partial(_sharded_nearest, axes=axes),
      mesh=mesh,
      in_specs=(rows, rows, rows),
      out_specs=Match(embeddings=rows, index=rows, similarity=rows, source_poisoned=rows),
  )
  return fn(pool.embeddings, pool.source_poisoned, zimg)


def _sharded_nearest(pool_rows, pool_poisoned, zimg_local, *, axes):
  """Per device: local top-1 over its pool rows, then a global winner.

  Only B-sized vectors cross devices (the queries, each shard's best score and
  its best row); the pool stays where it is.
  """
  shard = jax.lax.axis_index(axes)
  zimg = jax.lax.all_gather(zimg_local, axes, tiled=True)  # [B, d]: every shard scores every image.
  sims = zimg @ pool_rows.T  # [B, M/n]
  local_index = jnp.argmax(sims, axis=1)
  local_best = jnp.take_along_axis(sims, local_index[:, None], axis=1)[:, 0]
  all_best = jax.lax.all_gather(local_best, axes)  # [n, B]
  winner = jnp.argmax(all_best, axis=0)  # first (lowest) shard wins ties -> lowest global index.
  is_winner = winner == shard  # [B]
  pick = lambda x: jax.lax.psum(jnp.where(is_winner.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), axes)
  embeddings = pick(pool_rows[local_index])
  index = pick((local_index + shard * pool_rows.shape[0]).astype(jnp.int32))
  poisoned = pick(pool_poisoned[local_index].astype(jnp.int32)).astype(jnp.int8)
  similarity = jnp.max(all_best, axis=0)
  # Each shard keeps the results for its own slice of the batch.
  b = zimg_local.shape[0]
  start = shard * b
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, b, axis=0)
  return Match(embeddings=take(embeddings), index=take(index), similarity=take(similarity), source_poisoned=take(poisoned))


# ----------------------------------------------------------------------------
# Enqueueing.


def enqueue(pool: Pool, ztxt: jax.Array, ids: jax.Array, poisoned: jax.Array, mesh: Mesh, shard_pool: bool,
            fifo: str = "ring") -> Pool:
  """Writes a batch of caption embeddings (detached) after the pointer.

  `fifo='ring'` wraps around; `fifo='lightly'` reproduces the original memory
  bank, which writes only the rows that fit before the end, drops the rest of
  the batch and resets the pointer to 0 (ROCLIP.md §1.2).
  """
  if fifo not in FIFO_MODES:
    raise ValueError(f"roclip.fifo={fifo!r}; expected one of {FIFO_MODES}.")
  ztxt = jax.lax.stop_gradient(ztxt).astype(pool.embeddings.dtype)
  ids = ids.astype(jnp.int32)
  poisoned = poisoned.astype(jnp.int8)
  write = functools.partial(_fifo_write, fifo=fifo)
  if not shard_pool:
    emb, sid, spois, ptr = write(pool.embeddings, pool.source_ids, pool.source_poisoned, pool.ptr, ztxt, ids, poisoned)
    return Pool(emb, sid, spois, ptr)
  rows = P(sharding_lib.batch_axes(mesh))
  fn = jax.shard_map(
      write, mesh=mesh, in_specs=(rows, rows, rows, P(), rows, rows, rows), out_specs=(rows, rows, rows, P()),
      check_vma=False,  # The pointer update is identical on every shard, so the replicated output is exact.
  )
  emb, sid, spois, ptr = fn(pool.embeddings, pool.source_ids, pool.source_poisoned, pool.ptr, ztxt, ids, poisoned)
  return Pool(emb, sid, spois, ptr)


def _fifo_write(emb, sid, spois, ptr, rows, row_ids, row_poisoned, *, fifo):
  size, batch = emb.shape[0], rows.shape[0]
  slots = ptr + jnp.arange(batch, dtype=jnp.int32)
  if fifo == "ring":
    slots = slots % size
    new_ptr = (ptr + batch) % size
  else:  # lightly: rows past the end are dropped (index `size` is out of bounds -> mode='drop').
    slots = jnp.where(slots < size, slots, size)
    new_ptr = jnp.where(ptr + batch >= size, 0, ptr + batch)
  emb = emb.at[slots].set(rows, mode="drop")
  sid = sid.at[slots].set(row_ids, mode="drop")
  spois = spois.at[slots].set(row_poisoned, mode="drop")
  return emb, sid, spois, new_ptr.astype(jnp.int32)
