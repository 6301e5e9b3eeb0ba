"""Poison-suspicion report: rank a run's training examples by how suspicious they look.

  python -m roclip_jax.experiments.suspicion --workdir=RUN [--out=RUN/suspicion.csv]

Loads the run's latest checkpoint, rebuilds its (poisoned) training source
exactly as the trainer did (`train.build_train_data`: same config, same poison
seed), encodes every training example with the eval preprocessing (the
backdoor trigger stamped on backdoored records, as the trainer saw them, but no
augmentation) and scores it. Higher means more suspicious for every score:

* `own_distance` = 1 - `own_similarity`, the cosine of the image and its own
  caption. A poisoned pair is a mismatch the model has to fight, so it tends
  to fit worse (until the model has memorised it).
* `mixture_risk` = 1 - SafeCLIP's posterior: a 2-component Gaussian mixture is
  fitted to all `own_similarity` values (`safeclip.fit_gmm`) and this is the
  probability that the example belongs to the low-similarity component, the
  one SafeCLIP keeps out of its CLIP loss. Ranks like `own_distance` but reads
  as a probability, so a curator can threshold it.
* `pool_margin` = `pool_top1_similarity` - `own_similarity` (runs with a RoCLIP
  pool only): the best caption in the pool beats the example's own caption by
  this much. This is RoCLIP's own signal: a poisoned image matches clean
  captions of its true class better than its poison caption. Pool rows holding
  the example's own caption and the random initial rows are left out.
* `caption_atypicality` (no pool needed) = 1 - mean cosine between the
  example's caption and the captions of the `neighbors` training examples
  whose captions lie nearest to its image (its own caption excluded). It asks
  "do the captions that fit this image agree with this one?" and looks only at
  caption-caption similarities, the part of the model an attack does not aim
  at, so it still works when the model has learnt the poisoned pair itself
  (own_similarity high). Cross-modal neighbours are used, rather than image
  neighbours, because triggered images cluster together in image space and
  would vouch for each other's target-class captions.

* `lof`, `slof` and `k_distance` (no pool needed): density scores of the
  example's IMAGE embedding among its `density_neighbors` (k, default 16)
  nearest training images, after Huang et al., "Detecting Backdoor Samples in
  Contrastive Language Image Pretraining" (ICLR 2025), who find that backdoored
  examples sit in sparser local neighbourhoods than their neighbours do. With
  d(p, o) = 1 - cos(p, o) on the unit-norm embeddings and N_k(p) the k nearest
  other examples (exactly k, as in scikit-learn; ties at the k-th distance are
  broken arbitrarily):
    - `k_distance` = kdist(p) = max_{o in N_k(p)} d(p, o);
    - `lof` = the Local Outlier Factor (Breunig et al. 2000): with
      reach(p, o) = max(kdist(o), d(p, o)) and the local reachability density
      lrd(p) = 1 / (mean_{o in N_k(p)} reach(p, o) + 1e-10),
      lof(p) = mean_{o in N_k(p)} lrd(o) / lrd(p) (about 1 inside a cluster,
      > 1 for a point sparser than its neighbours). The 1e-10 (scikit-learn's)
      keeps exact duplicates finite: a group of more than k identical images is
      a dense cluster, lof 1;
    - `slof` = the simplified LOF (Schubert et al. 2014), one of the paper's
      detectors: the same ratio with lrd replaced by 1 / (kdist + 1e-10), i.e.
      mean_{o in N_k(p)} kdist(p) / kdist(o), which needs no reachability step.
  The paper uses Euclidean distance; on unit vectors that is
  sqrt(2 d(p, o)), so the neighbours and the `k_distance` ranking are the same,
  only the LOF ratios change. Cosine distance is used because it is the
  geometry the CLIP loss trains. The paper's best detector, DAO (a
  dimensionality-aware LOF), is not implemented here. Neighbours are found in
  row blocks with a top-k, so memory is O(N k) beyond one block.

`score` is `pool_margin` when the run has a pool, else `caption_atypicality`.
The CSV lists examples from the most to the least suspicious. With the run's
`poison_info.json`, the report also gives, for every score, precision@k and
recall@k at k = the number of poisons, and the AUROC (Mann-Whitney rank
formula, ties counted half).
"""
from __future__ import annotations

import copy
import csv
import dataclasses
import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import numpy as np
import scipy.stats

SCORES = ("own_distance", "mixture_risk", "pool_margin", "caption_atypicality", "k_distance", "slof", "lof")
DEFAULT_NEIGHBORS = 10
DEFAULT_DENSITY_NEIGHBORS = 16  # The k of Huang et al.'s usage example (their README).
# scikit-learn's guard in the local reachability density: exact duplicates stay finite.
_DENSITY_EPS = 1e-10
# Similarities held at once when searching neighbours (float64: 128 MiB).
_BLOCK_ELEMENTS = 1 << 24


# ----------------------------------------------------------------------------
# Metrics.


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


# ----------------------------------------------------------------------------
# Scores (NumPy, on unit-norm embeddings).


def nearest_neighbors(queries: np.ndarray, keys: np.ndarray, k: int, *,
                      exclude_self: bool = True,
                      block_elements: int = _BLOCK_ELEMENTS) -> tuple[np.ndarray, np.ndarray]:
  """The k keys of highest dot product with each query: (similarities, indices), [N, k] each,
  most similar first.

  Rows are processed in blocks of about `block_elements` similarities, so memory is O(N k) plus
  one block, never the full [N, M] matrix. With `exclude_self`, queries and keys are the same
  examples (row i of each) and key i is never a neighbour of query i.
  """
  num_queries, num_keys = len(queries), len(keys)
  if exclude_self and num_queries != num_keys:
    raise ValueError(f"exclude_self pairs query i with key i, but there are {num_queries} queries "
                     f"and {num_keys} keys.")
  if not 1 <= k <= num_keys - int(exclude_self):
    raise ValueError(f"k={k} neighbours need more than {num_keys} keys"
                     f"{' (the query itself excluded)' if exclude_self else ''}.")
  rows = max(1, block_elements // max(num_keys, 1))
  similarities = np.empty((num_queries, k), np.float64)
  indices = np.empty((num_queries, k), np.int64)
  for start in range(0, num_queries, rows):
    stop = min(start + rows, num_queries)
    block = queries[start:stop] @ keys.T  # [rows, M]
    if exclude_self:
      block[np.arange(stop - start), np.arange(start, stop)] = -np.inf
    top = np.argpartition(-block, k - 1, axis=1)[:, :k]
    top_sims = np.take_along_axis(block, top, axis=1)
    order = np.argsort(-top_sims, axis=1, kind="stable")
    similarities[start:stop] = np.take_along_axis(top_sims, order, axis=1)
    indices[start:stop] = np.take_along_axis(top, order, axis=1)
  return similarities, indices


def local_outlier_scores(embeddings: np.ndarray, k: int = DEFAULT_DENSITY_NEIGHBORS,
                         block_elements: int = _BLOCK_ELEMENTS) -> dict[str, np.ndarray]:
  """`k_distance`, `slof` and `lof` of every row (formulas in the module docstring), [N] each.

  Rows are L2-normalised first; distances are cosine distances 1 - cos. k is capped at N - 1.
  """
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or len(embeddings) < 2:
    raise ValueError(f"local_outlier_scores needs [N >= 2, d] embeddings, got {embeddings.shape}.")
  if k < 1:
    raise ValueError(f"density_neighbors={k} must be >= 1 (Huang et al. use 16).")
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  k = min(k, len(unit) - 1)
  similarities, neighbors = nearest_neighbors(unit, unit, k, block_elements=block_elements)
  # Rounding can put identical unit vectors a hair below distance 0.
  distances = np.maximum(1.0 - similarities, 0.0)  # [N, k], nearest first.
  k_distance = distances[:, -1]
  reachability = np.maximum(k_distance[neighbors], distances)
  lrd = 1.0 / (reachability.mean(axis=1) + _DENSITY_EPS)
  simple_lrd = 1.0 / (k_distance + _DENSITY_EPS)
  return {"k_distance": k_distance,
          "slof": simple_lrd[neighbors].mean(axis=1) / simple_lrd,
          "lof": lrd[neighbors].mean(axis=1) / lrd}


def score_examples(image_emb: np.ndarray, caption_emb: np.ndarray, ids: np.ndarray, *,
                   pool_emb: np.ndarray | None = None, pool_ids: np.ndarray | None = None,
                   neighbors: int = DEFAULT_NEIGHBORS,
                   density_neighbors: int = DEFAULT_DENSITY_NEIGHBORS) -> dict[str, np.ndarray]:
  """Every score of the module docstring, one [N] array each (pool scores only with a pool).

  Args:
    image_emb, caption_emb: [N, d] unit rows; row i is example i's image and caption.
    ids: [N] example ids.
    pool_emb, pool_ids: [M, d] unit rows and [M] source ids of a RoCLIP pool
      (id -1: a random initial row, ignored).
    neighbors: how many nearest captions `caption_atypicality` averages over.
    density_neighbors: the k of `k_distance`, `slof` and `lof` (nearest images).
  """
  n = len(ids)
  if image_emb.shape != caption_emb.shape or image_emb.shape[0] != n:
    raise ValueError(f"score_examples: images {image_emb.shape}, captions {caption_emb.shape} and {n} ids disagree.")
  if n < 2:
    raise ValueError("score_examples needs at least 2 examples (the neighbour score compares captions).")
  if neighbors < 1:
    raise ValueError(f"neighbors={neighbors} must be >= 1.")
  image_emb, caption_emb = image_emb.astype(np.float64), caption_emb.astype(np.float64)
  own = np.sum(image_emb * caption_emb, axis=1)
  out = {"own_similarity": own, "own_distance": 1.0 - own}
  from roclip_jax import safeclip  # Deferred: pulls in jax.
  out["mixture_risk"] = 1.0 - safeclip.fit_gmm(own).posterior_high(own)

  # Captions nearest to each image, its own caption excluded.
  _, nearest = nearest_neighbors(image_emb, caption_emb, min(neighbors, n - 1))
  agreement = np.einsum("nd,nkd->nk", caption_emb, caption_emb[nearest]).mean(axis=1)
  out["caption_atypicality"] = 1.0 - agreement
  out.update(local_outlier_scores(image_emb, density_neighbors))

  if pool_emb is not None:
    if pool_ids is None or len(pool_ids) != len(pool_emb):
      raise ValueError("score_examples: pool_ids must give one source id per pool row.")
    valid = np.asarray(pool_ids) >= 0
    if valid.any():
      sims = image_emb @ pool_emb[valid].astype(np.float64).T  # [N, M']
      sims[np.asarray(ids)[:, None] == np.asarray(pool_ids)[valid][None, :]] = -np.inf  # Own caption excluded.
      top1 = sims.max(axis=1)
      has_other = np.isfinite(top1)
      out["pool_top1_similarity"] = np.where(has_other, top1, np.nan)
      out["pool_margin"] = np.where(has_other, top1 - own, np.nan)
  out["score"] = out["pool_margin"] if "pool_margin" in out else out["caption_atypicality"]
  return out


def rank_and_evaluate(scores: dict[str, np.ndarray],
                      is_poisoned: np.ndarray | None) -> tuple[np.ndarray, dict[str, dict[str, float]]]:
  """The order of examples (most suspicious first, by `score`) and, with labels,
  precision@k / recall@k (k = number of poisons) and AUROC per score."""
  order = np.argsort(-np.nan_to_num(scores["score"], nan=-np.inf), kind="stable")
  metrics: dict[str, dict[str, float]] = {}
  if is_poisoned is None or not 0 < int(np.sum(is_poisoned)) < len(is_poisoned):
    return order, metrics
  is_poisoned = np.asarray(is_poisoned, bool)
  k = int(is_poisoned.sum())
  for name in SCORES:  # `score` is one of these.
    if name not in scores:
      continue
    values = scores[name]
    finite = np.isfinite(values)
    if not 0 < int(is_poisoned[finite].sum()) < int(finite.sum()):
      continue
    precision, recall = precision_recall_at_k(values[finite], is_poisoned[finite], min(k, int(finite.sum())))
    metrics[name] = {"k": k, "precision_at_k": precision, "recall_at_k": recall,
                     "auroc": auroc(values[finite], is_poisoned[finite]), "num_scored": int(finite.sum())}
  return order, metrics


# ----------------------------------------------------------------------------
# The run's training set.


@dataclasses.dataclass
class TrainingSet:
  """Every decodable training example of a run, eval-preprocessed."""
  ids: np.ndarray  # int64 [N]
  captions: list[str]
  images: np.ndarray  # uint8 [N, S, S, 3], trigger stamped where the trainer stamped it.
  poison_codes: np.ndarray  # int8 [N], the records' `poisoned` field (0 clean).
  num_skipped: int  # Undecodable images left out.


def load_training_set(config: Any) -> TrainingSet:
  """Rebuilds the run's training source (the same poisons, by seed) and reads it all."""
  from roclip_jax import train  # Deferred: pulls in the whole trainer.
  from roclip_jax.data import pipeline
  from roclip_jax.data import poison as poison_lib

  config = copy.deepcopy(config)
  config.data.num_workers = 0  # Only the source is needed; start no worker processes.
  if config.defense == "cleanclip":
    # A CleanCLIP run fine-tuned on a clean subset; the data worth screening is the poisoned
    # training set that subset was drawn from.
    config.defense = "none"
  train_data, _ = train.build_train_data(config, workdir=None)  # workdir=None: writes nothing.
  source = train_data.source
  transform = poison_lib.make_image_transform(config.poison, seed=config.poison.seed) if config.poison.enabled else None
  # The trainer's eval-preprocessing pass (SafeCLIP's scoring pass): one process, ids in order.
  batches = pipeline.scoring_batches(config, source, batch_size=256, image_transform=transform)
  ids, images, codes = [], [], []
  for batch in batches:
    valid = batch["valid"]
    ids.append(batch["id"][valid])
    images.append(batch["image"][valid])
    codes.append(batch["poisoned"][valid])
  ids = np.concatenate(ids)
  if not ids.size:
    raise ValueError("No training image could be decoded; check config.data of the run.")
  # Ids are indices into the source (sources.py), so the captions are read back by id.
  captions = [str(source[int(i)]["caption"]) for i in ids]
  return TrainingSet(ids=ids.astype(np.int64), captions=captions, images=np.concatenate(images),
                     poison_codes=np.concatenate(codes).astype(np.int8), num_skipped=batches.num_skipped)


def _injected_poison_ids(workdir: str) -> set[int] | None:
  path = os.path.join(workdir, "poison_info.json")
  if not os.path.exists(path):
    return None
  from roclip_jax.data import poison as poison_lib
  with open(path) as f:
    return set(poison_lib.PoisonInfo.from_json(f.read()).poisoned_ids)


# ----------------------------------------------------------------------------
# The report.


@dataclasses.dataclass
class SuspicionReport:
  rows: list[dict[str, Any]]  # One per example, most suspicious first (the CSV rows).
  metrics: dict[str, dict[str, float]]  # Per score; empty without poison_info.json.
  num_poisons: int | None  # Injected poisons among the scored examples; None when unknown.
  num_skipped: int
  csv_path: str


def build_report(workdir: str, out: str | None = None, neighbors: int = DEFAULT_NEIGHBORS,
                 step: int | None = None,
                 density_neighbors: int = DEFAULT_DENSITY_NEIGHBORS) -> SuspicionReport:
  """Scores every training example of the run in `workdir` and writes the ranked CSV to `out`
  (default `workdir/suspicion.csv`) and the metrics next to it (`.json`)."""
  from roclip_jax import inspect as inspect_lib  # Deferred: loads jax.

  run = inspect_lib.load(workdir, step=step)
  data = load_training_set(run.config)
  image_emb = run.encode_images(data.images)
  caption_emb = run.encode_texts(data.captions)
  pool_emb = pool_ids = None
  if run.pool is not None:
    pool_emb = np.asarray(run.pool.embeddings, np.float32)
    pool_ids = np.asarray(run.pool.source_ids, np.int64)
  scores = score_examples(image_emb, caption_emb, data.ids, pool_emb=pool_emb, pool_ids=pool_ids,
                          neighbors=neighbors, density_neighbors=density_neighbors)
  injected = _injected_poison_ids(workdir)
  is_poisoned = None if injected is None else np.isin(data.ids, sorted(injected))
  order, metrics = rank_and_evaluate(scores, is_poisoned)

  columns = [c for c in ("own_similarity", "mixture_risk", "pool_top1_similarity", "pool_margin",
                         "caption_atypicality", "k_distance", "slof", "lof", "score")
             if c in scores]
  rows = []
  for rank, i in enumerate(order, start=1):
    row = {"rank": rank, "id": int(data.ids[i]), "caption": data.captions[i]}
    row.update({c: float(scores[c][i]) for c in columns})
    row["poisoned"] = "" if is_poisoned is None else int(is_poisoned[i])
    row["poison_code"] = int(data.poison_codes[i])
    rows.append(row)
  csv_path = out or os.path.join(workdir, "suspicion.csv")
  os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
  with open(csv_path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  report = SuspicionReport(rows=rows, metrics=metrics, num_poisons=None if is_poisoned is None else int(
      is_poisoned.sum()), num_skipped=data.num_skipped, csv_path=csv_path)
  with open(os.path.splitext(csv_path)[0] + ".json", "w") as f:
    json.dump({"step": run.step, "num_examples": len(rows), "num_poisons": report.num_poisons,
               "num_skipped": data.num_skipped, "neighbors": neighbors,
               "density_neighbors": density_neighbors, "metrics": metrics}, f, indent=1)
  return report


def format_metrics(report: SuspicionReport) -> str:
  if not report.metrics:
    return (f"{len(report.rows)} examples scored; no poison_info.json with poisons in the run, "
            "so no detection metrics.")
  lines = [f"{len(report.rows)} examples, {report.num_poisons} injected poisons (k = {report.num_poisons}):",
           f"{'score':<22}{'precision@k':>12}{'recall@k':>10}{'AUROC':>8}"]
  for name, m in report.metrics.items():
    lines.append(f"{name:<22}{m['precision_at_k']:>12.3f}{m['recall_at_k']:>10.3f}{m['auroc']:>8.3f}")
  return "\n".join(lines)


FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a program: importing this module (tests, notebooks) must not
  claim flag names such as --workdir that the trainer's entry points define too."""
  flags.DEFINE_string("workdir", None, "The training run to inspect (its --workdir).")
  flags.DEFINE_string("out", None, "Ranked CSV to write (default: WORKDIR/suspicion.csv).")
  flags.DEFINE_integer("neighbors", DEFAULT_NEIGHBORS, "Nearest captions averaged by caption_atypicality.")
  flags.DEFINE_integer("density_neighbors", DEFAULT_DENSITY_NEIGHBORS,
                       "Nearest images (k) of the density scores k_distance, slof and lof.")
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the --workdir of a finished or checkpointed training run.")
  report = build_report(FLAGS.workdir, FLAGS.out, neighbors=FLAGS.neighbors, step=FLAGS.step,
                        density_neighbors=FLAGS.density_neighbors)
  logging.info("Wrote %s", report.csv_path)
  print(format_metrics(report))
  print(f"Ranked examples: {report.csv_path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
