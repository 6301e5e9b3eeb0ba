"""Contrastive losses, written on the global batch.

Every function takes global-view arrays (all examples of all devices and
hosts). Under `jax.jit` with batch-sharded inputs, GSPMD inserts the
all-gather of the embeddings and its exact transpose in the backward pass, so
each example's negatives are the whole global batch and gradients flow through
the gather. (The original PyTorch code gathers without gradient and relies on
DDP averaging; the two agree up to a constant factor, ROCLIP.md §1.1.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

# ln(100): OpenAI CLIP clamps the learnable logit scale so that exp(t) <= 100.
MAX_LOGIT_SCALE = 4.605170185988092


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


def clip_loss(zimg: jax.Array, ztxt: jax.Array, log_scale: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Symmetric InfoNCE: mean of image->text and text->image cross-entropies.

  Args:
    zimg: [B, d] L2-normalised image embeddings.
    ztxt: [B, d] L2-normalised text embeddings; row i is image i's positive.
      In a RoCLIP matching step this is the image's nearest pool caption.
    log_scale: scalar t; the logits are exp(t) * cosine.
  """
  logits = jnp.exp(log_scale) * zimg @ ztxt.T  # [B, B], rows: images
  labels = jnp.arange(logits.shape[0])
  loss_i2t = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  loss_t2i = optax.softmax_cross_entropy_with_integer_labels(logits.T, labels).mean()
  loss = 0.5 * (loss_i2t + loss_t2i)
  accuracy = 0.5 * (
      jnp.mean(jnp.argmax(logits, axis=1) == labels) + jnp.mean(jnp.argmax(logits, axis=0) == labels)
  )
  return loss, {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "batch_accuracy": accuracy}
