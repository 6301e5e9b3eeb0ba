"""Batched, jitted inference of a trained model: what evaluators and notebooks use.

Inputs are padded to a fixed batch size, so every call reuses one compiled
function per tower no matter how many examples come in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from roclip_jax import losses
from roclip_jax.data import image_ops
from roclip_jax.data import tokenizer as tokenizer_lib

Tokenizer = Callable[[list[str]], np.ndarray]  # captions -> int token ids [N, context_length]


class Encoder:
  """Encodes images (uint8, eval-preprocessed) and texts with fixed params.

  Defaults: our OpenAI BPE tokenizer and CLIP's image mean/std. Imported checkpoints of other
  families (SigLIP: SentencePiece, mean = std = 0.5) pass their own `tokenizer` and `image_mean`/
  `image_std`; `tokenizer=False` means there is none, and only `encode_tokens` takes text.
  """

  def __init__(
      self,
      spec,
      params,
      model_state,
      *,
      context_length: int,
      batch_size: int = 256,
      tokenizer: Tokenizer | None | bool = None,
      image_mean: Sequence[float] | None = None,
      image_std: Sequence[float] | None = None,
      missing_tokenizer_hint: str = "pass a tokenizer to the Encoder",
  ):
    self._params = params
    self._model_state = model_state
    self._batch_size = batch_size
    self._context_length = context_length
    self._missing_tokenizer_hint = missing_tokenizer_hint
    if tokenizer is None:
      tokenizer = tokenizer_lib.get_tokenizer(context_length)
    self._tokenizer = tokenizer or None
    if (image_mean is None) != (image_std is None):
      raise ValueError("Encoder: pass both image_mean and image_std, or neither (CLIP's).")
    if image_mean is None:
      normalize = image_ops.normalize  # CLIP's constants, the exact arithmetic training uses.
    else:
      mean, std = np.asarray(image_mean, np.float32), np.asarray(image_std, np.float32)
      normalize = lambda images: (images.astype(np.float32) / 255.0 - mean) / std

    @jax.jit
    def image_features(params, model_state, images):
      model = spec.merge(params, model_state)
      return model.encode_image(normalize(images), train=False)

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
      chunk = inputs[start : start + bs]
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
    if self._tokenizer is None:
      raise ValueError(
          f"This model has no tokenizer for text, so texts cannot be encoded; "
          f"{self._missing_tokenizer_hint}, or call encode_tokens with token ids."
      )
    return self.encode_tokens(self._tokenizer(list(texts)))

  def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """Integer token ids [N, context_length] (as the model's tokenizer pads them) -> unit rows."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer) or tokens.shape[1] != self._context_length:
      raise ValueError(
          f"tokens must be integer ids [N, {self._context_length}] (padded to the model's "
          f"context length); got {tokens.dtype}{list(tokens.shape)}."
      )
    return np.asarray(losses.l2_normalize(jnp.asarray(self._batched(self._text_fn, tokens.astype(np.int32)))))
