"""Contrastive losses, written on the global batch.

Every function takes global-view arrays (all examples of all devices and
hosts). Under `jax.jit` with batch-sharded inputs, GSPMD inserts the
all-gather of the embeddings and its exact transpose in the backward pass, so
each example's negatives are the whole global batch and gradients flow through
the gather. (The original PyTorch code gathers without gradient and relies on
DDP averaging; the two agree up to a constant factor: docs/methods.md,
section 1.)

The SigLIP loss is the exception: it is chunked over the devices by hand
(`jax.shard_map` + a ring of `ppermute`s), so that no device holds more than a
(B/n) x (B/n) block of logits.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import optax

# ln(100): OpenAI CLIP clamps the learnable logit scale so that exp(t) <= 100.
MAX_LOGIT_SCALE = 4.605170185988092


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


# A logit that takes no part in a softmax (finite, so that no gradient is NaN).
_MASKED_LOGIT = -1e9


def clip_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    log_scale: jax.Array,
    same_target: jax.Array | None = None,
    positive_weights: jax.Array | None = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

  Args:
    zimg: [B, d] L2-normalised image embeddings.
    ztxt: [B, d] L2-normalised text embeddings; row i is image i's positive.
      In a RoCLIP matching step this is the image's nearest pool caption.
    log_scale: scalar t; the logits are exp(t) * cosine.
    same_target: optional bool [B, B]; where [i, j] (i != j) is true, pair
      (image i, text j) is neither a positive nor a negative: it is left out
      of both softmaxes (RoCLIP's robust variant, for images matched to the
      same pool caption). None: every off-diagonal pair is a negative.
    positive_weights: optional [B] weights >= 0 of each pair's positive term: image i's
      cross-entropy (row i) and caption i's (column i) count with weight w_i, each
      direction normalised by sum(w) (RoCLIP's own-pair gate, weights 0 or 1). Every
      pair stays a negative for the others. None: all 1, CLIP's mean.
  """
  logits = jnp.exp(log_scale) * zimg @ ztxt.T  # [B, B], rows: images
  labels = jnp.arange(logits.shape[0])
  if same_target is not None:
    excluded = same_target & ~jnp.eye(logits.shape[0], dtype=bool)
    logits = jnp.where(excluded, _MASKED_LOGIT, logits)
  ce_i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  ce_t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels)
  if positive_weights is None:
    loss_i2t, loss_t2i = ce_i2t.mean(), ce_t2i.mean()
  else:
    w = jax.lax.stop_gradient(positive_weights).astype(ce_i2t.dtype)
    total = jnp.maximum(jnp.sum(w), 1.0)  # A batch with no positive left trains negatives only: loss 0.
    loss_i2t, loss_t2i = jnp.sum(w * ce_i2t) / total, jnp.sum(w * ce_t2i) / total
  loss = 0.5 * (loss_i2t + loss_t2i)
  accuracy = 0.5 * (jnp.mean(jnp.argmax(logits, axis=1) == labels) + jnp.mean(jnp.argmax(logits, axis=0) == labels))
  return loss, {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "batch_accuracy": accuracy}


# ----------------------------------------------------------------------------
# SigLIP: the pairwise sigmoid loss (Zhai et al. 2023), chunked over devices.

LOSSES = ("clip", "siglip")


def siglip_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    log_scale: jax.Array,
    bias: jax.Array,
    mesh: jax.sharding.Mesh | None = None,
    axes: tuple[str, ...] = (),
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """-1/B sum_ij log sigmoid(z_ij (exp(t) <x_i, y_j> + b)), z = +1 on the diagonal, -1 elsewhere.

  The B x B logits never exist on one device: with `mesh` and batch `axes`,
  each device scores its image block against one text block at a time and
  passes the text blocks around a ring (`ppermute`, n - 1 hops), so memory is
  (B/n)^2 per device whatever n is. The value and gradients equal the global
  formula (the transpose of a ring shift is the opposite shift).

  Args:
    zimg: [B, d] L2-normalised image embeddings (batch-sharded or not).
    ztxt: [B, d] L2-normalised text embeddings; row i is image i's positive
      (in a RoCLIP matching step, its matched pool caption).
    log_scale: scalar t; the logits are exp(t) * cosine + b.
    bias: scalar b.
    mesh, axes: the device mesh and its batch axes; without them the loss runs
      as one block (e.g. inside a single device or in tests).

  Returns:
    (loss, aux) with aux: `loss_pos` and `loss_neg`, the positive and negative
    pairs' share of the loss, and `batch_accuracy`, the fraction of images
    whose positive logit beats all their negatives.
  """
  global_batch = zimg.shape[0]
  log_scale = jnp.asarray(log_scale, jnp.float32)
  bias = jnp.asarray(bias, jnp.float32)
  num_shards = 1 if mesh is None or not axes else int(np.prod([mesh.shape[a] for a in axes]))
  if num_shards == 1:
    pos, neg, best_neg, pos_logit = _siglip_block_sums(zimg, ztxt, log_scale, bias, diagonal=True)
    return _siglip_outputs(pos, neg, jnp.sum(pos_logit > best_neg), global_batch)
  if global_batch % num_shards:
    raise ValueError(
        f"siglip_loss: the batch {global_batch} is not divisible by the {num_shards} batch shards; "
        "use a batch that is a multiple of the shard count."
    )
  rows = P(axes)
  ring = jax.shard_map(
      functools.partial(_siglip_ring, axes=axes, num_shards=num_shards),
      mesh=mesh,
      in_specs=(rows, rows, P(), P()),
      out_specs=(P(), P(), P()),
  )
  pos, neg, correct = ring(zimg, ztxt, log_scale, bias)
  return _siglip_outputs(pos, neg, correct, global_batch)


def _siglip_outputs(pos, neg, correct, global_batch):
  loss_pos, loss_neg = pos / global_batch, neg / global_batch
  return loss_pos + loss_neg, {
      "loss_pos": loss_pos,
      "loss_neg": loss_neg,
      "batch_accuracy": correct.astype(jnp.float32) / global_batch,
  }


def _siglip_block_sums(zimg, ztxt, log_scale, bias, *, diagonal: bool):
  """One image block against one text block: summed -log sigmoid of the positive
  (diagonal) and negative pairs, each image's best negative logit and its positive logit.

  One reduction over the block (the positives are then taken out through the
  diagonal, an O(B) vector), so XLA needs no B x B array besides the logits
  and, in the backward pass, their gradient.
  """
  logits = jnp.exp(log_scale) * zimg @ ztxt.T + bias
  detached = jax.lax.stop_gradient(logits)
  if not diagonal:  # No positive pair in this block; -log sigmoid(-x) = softplus(x).
    return (
        jnp.zeros((), jnp.float32),
        jnp.sum(jax.nn.softplus(logits)),
        jnp.max(detached, axis=1),
        jnp.full(logits.shape[:1], -jnp.inf),
    )
  is_pos = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0) == jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
  # -log sigmoid(z x) = softplus(-z x): z = -1 off the diagonal, +1 on it.
  total = jnp.sum(jax.nn.softplus(jnp.where(is_pos, -logits, logits)))
  pos_logit = jnp.diagonal(logits)
  pos = jnp.sum(jax.nn.softplus(-pos_logit))
  best_neg = jnp.max(jnp.where(is_pos, -jnp.inf, detached), axis=1)
  return pos, total - pos, best_neg, jax.lax.stop_gradient(pos_logit)


def _siglip_ring(zimg, ztxt, log_scale, bias, *, axes, num_shards):
  """Per device: own block (the positives), then n - 1 text blocks from the ring."""
  pos, neg, best_neg, pos_logit = _siglip_block_sums(zimg, ztxt, log_scale, bias, diagonal=True)
  shift = [(i, (i + 1) % num_shards) for i in range(num_shards)]

  # Rematerialised: the backward pass recomputes each hop's logits instead of
  # keeping all n - 1 blocks of them, so it stores only the [B/n, d] text blocks.
  @jax.checkpoint
  def hop(_, carry):
    block, neg, best_neg = carry
    block = jax.lax.ppermute(block, axes, shift)
    _, block_neg, block_best, _ = _siglip_block_sums(zimg, block, log_scale, bias, diagonal=False)
    return block, neg + block_neg, jnp.maximum(best_neg, block_best)

  _, neg, best_neg = jax.lax.fori_loop(1, num_shards, hop, (ztxt, neg, best_neg))
  correct = jnp.sum(jax.lax.stop_gradient(pos_logit > best_neg))
  return jax.lax.psum(pos, axes), jax.lax.psum(neg, axes), jax.lax.psum(correct, axes)
