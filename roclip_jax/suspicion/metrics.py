"""How well a score finds the injected poisons: precision@k, recall@k and AUROC, on [N] score arrays."""

from __future__ import annotations

import numpy as np
import scipy.stats

from roclip_jax.suspicion import scores as scores_lib


def auroc(scores: np.ndarray, is_positive: np.ndarray) -> float:
  """P(score of a random positive > score of a random negative), ties counting 1/2.

  By the Mann-Whitney identity: (sum of the positives' ranks - P(P+1)/2) / (P N),
  with average ranks for ties.
  """
  scores = np.asarray(scores, np.float64)
  is_positive = np.asarray(is_positive, bool)
  if scores.shape != is_positive.shape or scores.ndim != 1:
    raise ValueError(f"auroc: scores {scores.shape} and labels {is_positive.shape} must be equal-length vectors.")
  num_pos = int(is_positive.sum())
  num_neg = is_positive.size - num_pos
  if num_pos == 0 or num_neg == 0:
    raise ValueError(f"auroc needs both classes; got {num_pos} positives and {num_neg} negatives.")
  if not np.all(np.isfinite(scores)):
    raise ValueError("auroc: scores contain NaN or inf; drop those examples first.")
  ranks = scipy.stats.rankdata(scores)  # 1-based, ties averaged.
  return float((ranks[is_positive].sum() - num_pos * (num_pos + 1) / 2) / (num_pos * num_neg))


def precision_recall_at_k(scores: np.ndarray, is_positive: np.ndarray, k: int) -> tuple[float, float]:
  """Precision and recall of the k highest scores (ties broken by position, as a stable sort does)."""
  is_positive = np.asarray(is_positive, bool)
  if not 1 <= k <= is_positive.size:
    raise ValueError(f"k={k} must lie in [1, {is_positive.size}].")
  top = np.argsort(-np.asarray(scores, np.float64), kind="stable")[:k]
  hits = int(is_positive[top].sum())
  total = int(is_positive.sum())
  return hits / k, (hits / total if total else float("nan"))


def rank_and_evaluate(
    scores: dict[str, np.ndarray], is_poisoned: np.ndarray | None
) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
  """The order of examples (most suspicious first, by `score`) and, with labels,
  precision@k / recall@k (k = number of poisons) and AUROC per score."""
  order = np.argsort(-np.nan_to_num(scores["score"], nan=-np.inf), kind="stable")
  metrics: dict[str, dict[str, float]] = {}
  if is_poisoned is None or not 0 < int(np.sum(is_poisoned)) < len(is_poisoned):
    return order, metrics
  is_poisoned = np.asarray(is_poisoned, bool)
  k = int(is_poisoned.sum())
  for name in scores_lib.SCORES:  # `score` is one of these.
    if name not in scores:
      continue
    values = scores[name]
    finite = np.isfinite(values)
    if not 0 < int(is_poisoned[finite].sum()) < int(finite.sum()):
      continue
    precision, recall = precision_recall_at_k(values[finite], is_poisoned[finite], min(k, int(finite.sum())))
    metrics[name] = {
        "k": k,
        "precision_at_k": precision,
        "recall_at_k": recall,
        "auroc": auroc(values[finite], is_poisoned[finite]),
        "num_scored": int(finite.sum()),
    }
  return order, metrics
