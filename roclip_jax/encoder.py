"""Batched, jitted inference of a trained model: what evaluators and notebooks use.

Inputs are padded to a fixed batch size, so every call reuses one compiled
function per tower no matter how many examples come in.
"""
from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from roclip_jax import losses
from roclip_jax.data import image_ops
from roclip_jax.data import tokenizer as tokenizer_lib


class Encoder:
  """Encodes images (uint8, eval-preprocessed) and texts with fixed params."""

  def __init__(self, spec, params, model_state, *, context_length: int, batch_size: int = 256):
    self._params = params
    self._model_state = model_state
    self._batch_size = batch_size
    self._tokenizer = tokenizer_lib.get_tokenizer(context_length)

    @jax.jit
    def image_features(params, model_state, images):
      model = spec.merge(params, model_state)
      return model.encode_image(image_ops.normalize(images), train=False)

    @jax.jit
    def text_features(params, model_state, tokens):
      return spec.merge(params, model_state).encode_text(tokens)

    self._image_fn = image_features
    self._text_fn = text_features

  def _batched(self, fn, inputs: np.ndarray) -> np.ndarray:
    n = len(inputs)
    if n == 0:
      raise ValueError("Nothing to encode: got 0 inputs.")
    bs = self._batch_size
    outputs = []
    for start in range(0, n, bs):
      chunk = inputs[start:start + bs]
      pad = bs - len(chunk)
      if pad:
        chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
      outputs.append(np.asarray(fn(self._params, self._model_state, chunk))[: bs - pad])
    return np.concatenate(outputs).astype(np.float32)

  def image_features(self, images: np.ndarray) -> np.ndarray:
    """Un-normalised image-tower output (the linear-probe features)."""
    return self._batched(self._image_fn, np.asarray(images, np.uint8))

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    return np.asarray(losses.l2_normalize(jnp.asarray(self.image_features(images))))

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    tokens = self._tokenizer(list(texts))
    return np.asarray(losses.l2_normalize(jnp.asarray(self._batched(self._text_fn, tokens))))
