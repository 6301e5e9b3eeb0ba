"""Image <-> text retrieval recall@k on an eval split's (image, caption) pairs, one caption each.

Image i's correct text is caption i and vice versa. Recall@k is the fraction of queries whose
correct item is within the top k by cosine (ties count against it, see `common`).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from roclip_jax.evaluators import common


def recall_at_k(similarity: np.ndarray, ks: Sequence[int]) -> dict[str, float]:
  """Recall@k both ways for a square [N images, N texts] similarity with matches on the diagonal."""
  diagonal = np.arange(similarity.shape[0])
  i2t = common.rank_of_target(similarity, diagonal)
  t2i = common.rank_of_target(similarity.T, diagonal)
  metrics = {}
  for k in ks:
    metrics[f"i2t_r{k}"] = float(np.mean(i2t < k))
    metrics[f"t2i_r{k}"] = float(np.mean(t2i < k))
  return metrics


class RetrievalEvaluator(common.Evaluator):
  """Image->text and text->image R@1/5/10 (or `ks`)."""

  def __init__(self, name: str, *, every_steps: int, load_split: common.LoadSplit, ks: Sequence[int] = (1, 5, 10)):
    super().__init__(name, every_steps=every_steps)
    if not ks or min(ks) < 1:
      raise ValueError(f"evals.{name}.ks={ks!r} must be positive integers.")
    self._load_split = load_split
    self._ks = tuple(int(k) for k in ks)

  @functools.cached_property
  def _data(self) -> common.EvalSetLike:
    data = self._load_split()
    if len(data.captions) != len(data.images):
      raise ValueError(
          f"Evaluator {self.name!r} needs one caption per image, got "
          f"{len(data.captions)} captions for {len(data.images)} images."
      )
    return data

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    data = self._data
    n = len(data.images)
    images = common.check_encoded(self.name, encoder.encode_images(data.images), n)
    texts = common.check_encoded(self.name, encoder.encode_texts(list(data.captions)), n)
    similarity = common.l2_normalize(images) @ common.l2_normalize(texts).T
    return self._metrics(recall_at_k(similarity, self._ks))
