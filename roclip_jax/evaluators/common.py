"""What every evaluator shares: the encoder protocol, the eval-data protocol, ranking helpers.

Ranking convention (all evaluators): a tie counts against the claimed outcome. An item is within
the top k iff fewer than k OTHER candidates score at least as high as it. A collapsed model that
gives every candidate the same score therefore gets zero top-1 accuracy, zero recall@1 and zero
attack success, instead of whatever an argsort happens to return.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import numpy as np


class Encoder(Protocol):
  """The model as the evaluators see it; it batches internally."""

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] eval-preprocessed images -> f32 [N, d], L2-normalised."""

  def image_features(self, images: np.ndarray) -> np.ndarray:
    """uint8 [N, S, S, 3] -> f32 [N, f], the un-normalised image-tower output (linear probe)."""

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    """N strings -> f32 [N, d], L2-normalised."""


class EvalSetLike(Protocol):
  """The eval data every loader returns (`roclip_jax.data.pipeline.EvalSet`)."""

  images: np.ndarray  # uint8 [N, S, S, 3], eval-preprocessed
  labels: np.ndarray  # int64 [N]
  captions: list[str]
  ids: np.ndarray  # int64 [N]
  class_names: list[str]
  templates: list[str]


# A zero-argument loader of one eval split, called on first use and cached by its owner.
LoadSplit = Callable[[], EvalSetLike]


class Evaluator(abc.ABC):
  """A named evaluation that runs every `every_steps` training steps (0: only at the end).

  `run(encoder)` returns metrics whose keys start with `<name>/`.
  """

  def __init__(self, name: str, *, every_steps: int):
    if every_steps < 0:
      raise ValueError(f"evals.{name}.every_steps={every_steps} must be >= 0 (0 = only at the end).")
    self.name = name
    self.every_steps = int(every_steps)

  def is_due(self, step: int, total_steps: int) -> bool:
    """Whether to run after training step `step` of `total_steps`."""
    return step == total_steps or (self.every_steps > 0 and step % self.every_steps == 0)

  @abc.abstractmethod
  def run(self, encoder: Encoder) -> dict[str, float]:
    """Evaluates the encoder; keys are `<name>/<metric>`."""

  def _metrics(self, values: dict[str, float]) -> dict[str, float]:
    return {f"{self.name}/{key}": float(value) for key, value in values.items()}


def to_numpy(x) -> np.ndarray:
  """A float32 host array; `device_get` is an explicit transfer, allowed under the trainer's
  `jax_transfer_guard='disallow'`."""
  return np.asarray(jax.device_get(x), np.float32)


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  norm = np.linalg.norm(x, axis=axis, keepdims=True)
  return x / np.maximum(norm, 1e-12)


def rank_of_target(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """[N] number of other candidates scoring >= the target's score, for scores [N, C]."""
  targets = np.asarray(targets)
  target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
  return np.sum(scores >= target_scores, axis=1) - 1


def topk_hits(scores: np.ndarray, targets: np.ndarray, k: int) -> np.ndarray:
  """[N] bool: the target is within the top k (ties count against it), k clipped to #candidates."""
  return rank_of_target(scores, targets) < min(k, scores.shape[1])


def check_encoded(name: str, array: np.ndarray, rows: int) -> np.ndarray:
  """The encoder output as [rows, d] float32, or an error naming the evaluator."""
  array = to_numpy(array)
  if array.ndim != 2 or array.shape[0] != rows:
    raise ValueError(
        f"Evaluator {name!r}: the encoder returned shape {array.shape} for {rows} "
        "inputs; it must return one row per input ([N, d])."
    )
  if not np.all(np.isfinite(array)):
    raise ValueError(f"Evaluator {name!r}: the encoder returned non-finite values.")
  return array


def check_labels(name: str, labels: np.ndarray, num_classes: int) -> np.ndarray:
  """Labels as int64 [N], or an error if one does not index the class names."""
  labels = np.asarray(labels, np.int64)
  if labels.ndim != 1 or (labels.size and (labels.min() < 0 or labels.max() >= num_classes)):
    raise ValueError(
        f"Evaluator {name!r}: labels must be a 1-D array in [0, {num_classes}) "
        "(one per image, indexing class_names); drop unlabelled (-1) examples."
    )
  return labels
