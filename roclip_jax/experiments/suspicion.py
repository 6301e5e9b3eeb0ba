"""Poison-suspicion report: rank a run's training examples by how suspicious they look.

  python -m roclip_jax.experiments.suspicion --workdir=RUN [--out=RUN/suspicion.csv] [--block_size=4096]

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
  broken towards the lower example index):
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
  dimensionality-aware LOF), is not implemented here.

`score` is `pool_margin` when the run has a pool, else `caption_atypicality`.
The CSV lists examples from the most to the least suspicious. With the run's
`poison_info.json`, the report also gives, for every score, precision@k and
recall@k at k = the number of poisons, and the AUROC (Mann-Whitney rank
formula, ties counted half).

How it scales (N training examples, d embedding size, M pool rows, B = `--block_size`):

* One embedding pass, in batches (`pipeline.scoring_batches`): on a multi-host
  run each host decodes and encodes its own slice of the examples, and the
  jitted encoder hands every host the whole global batch's embeddings, as in
  SafeCLIP's scoring pass. Images are dropped as soon as they are encoded; what
  is kept is [N, d] float32 per modality, the ids and poison codes, and the
  captions (for the CSV), so host memory is O(N d) plus the captions.
* Every nearest-neighbour search (the captions nearest each image, the images
  nearest each image, the best pool row) is a blocked top-k on device
  (`nearest_neighbors`): the keys sit on device as [M / B, B, d] blocks, a
  jitted scan multiplies a [B, d] block of queries with one key block at a
  time, takes `lax.top_k` of the [B, B] similarities and merges it with the
  running best k, so device memory is the keys plus one [B, B] block and the
  result is [N, k]; no [N, N] or [N, M] array exists anywhere. The search is in
  float32 and finds 2k candidates; their similarities are recomputed in float64
  on the host (chunk by chunk) and the k best kept, so the scores are those of
  the dense float64 computation unless more than k candidates lie within float32
  rounding (~1e-7) of the k-th similarity.
* The scores and the metrics are [N] float64 arrays in memory (a few times
  8 N bytes); the CSV is written in rank order, a chunk of rows at a time.
  Every host runs the searches (on its first local device) and only process 0
  writes the files.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import functools
import json
import os
import time
from collections.abc import Iterable, Sequence
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from roclip_jax import host_runtime
from roclip_jax import inspect as inspect_lib
from roclip_jax import losses
from roclip_jax import sharding as sharding_lib
from roclip_jax import steps as steps_lib
from roclip_jax import train
from roclip_jax.data import image_ops
from roclip_jax.data import metadata as metadata_lib
from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.defenses import safeclip

SCORES = ("own_distance", "mixture_risk", "pool_margin", "caption_atypicality", "k_distance", "slof", "lof")
DEFAULT_NEIGHBORS = 10
DEFAULT_DENSITY_NEIGHBORS = 16  # The k of Huang et al.'s usage example (their README).
# Queries and keys per block of the on-device search: a [4096, 4096] float32 block is 64 MiB.
DEFAULT_BLOCK_SIZE = 4096
# Examples per host per batch of the embedding pass (as `load_training_set` read them before).
DEFAULT_BATCH_SIZE = 256
# scikit-learn's guard in the local reachability density: exact duplicates stay finite.
_DENSITY_EPS = 1e-10
# float64 elements gathered at once when the found neighbours' similarities are recomputed (32 MiB).
_REFINE_ELEMENTS = 1 << 22
# CSV rows formatted and written at a time.
_CSV_CHUNK_ROWS = 65536


# ----------------------------------------------------------------------------
# Metrics (on [N] score arrays).


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
# Nearest neighbours: a blocked top-k on device.


@functools.cache
def _block_top_k_fn():
  """`_block_top_k` jitted, with k static (built on first use: importing this module needs no jax)."""
  return jax.jit(_block_top_k, static_argnames=("k",))


def _block_top_k(queries, query_tags, key_blocks, key_tags, key_valid, *, k: int):
  """The k best keys of each query row: (float32 similarities, int32 key indices), [B, k] each.

  `key_blocks` [num_blocks, C, d] is scanned one [C, d] block at a time, so the largest
  intermediate is one [B, C] similarity block. Key j is skipped for query i when it is not
  `key_valid` or when `query_tags[i] == key_tags[j]`; a query with fewer than k allowed keys
  gets -inf similarities in the empty places (their indices are meaningless; the caller drops them).
  """
  num_blocks, block, _ = key_blocks.shape
  per_block = min(k, block)

  def merge(best, block_inputs):
    best_sims, best_indices = best
    keys, tags, valid, offset = block_inputs
    # HIGHEST: at default precision a GPU may round the float32 inputs to TF32 (~1e-3) and pick other neighbours.
    sims = jnp.matmul(queries, keys.T, precision=jax.lax.Precision.HIGHEST)
    allowed = valid[None, :] & (query_tags[:, None] != tags[None, :])
    block_sims, block_indices = jax.lax.top_k(jnp.where(allowed, sims, -jnp.inf), per_block)
    # The running best (lower key indices) goes first: top_k prefers the lower position on ties,
    # so equal similarities resolve to the lower key index, as a stable sort of a full row would.
    sims = jnp.concatenate([best_sims, block_sims], axis=1)
    indices = jnp.concatenate([best_indices, block_indices + offset], axis=1)
    top_sims, positions = jax.lax.top_k(sims, k)
    return (top_sims, jnp.take_along_axis(indices, positions, axis=1)), None

  init = (jnp.full((queries.shape[0], k), -jnp.inf, jnp.float32), jnp.full((queries.shape[0], k), -1, jnp.int32))
  offsets = jnp.arange(num_blocks, dtype=jnp.int32) * block
  (sims, indices), _ = jax.lax.scan(merge, init, (key_blocks, key_tags, key_valid, offsets))
  return sims, indices


def _int32_tags(tags: np.ndarray, what: str) -> np.ndarray:
  tags = np.asarray(tags, np.int64)
  if tags.size and (tags.max() >= 2**31 or tags.min() < -(2**31)):
    raise ValueError(f"{what} must fit in int32 for the on-device search; got values in [{tags.min()}, {tags.max()}].")
  return tags.astype(np.int32)


def nearest_neighbors(
    queries: np.ndarray,
    keys: np.ndarray,
    k: int,
    *,
    exclude_self: bool = True,
    query_tags: np.ndarray | None = None,
    key_tags: np.ndarray | None = None,
    key_valid: np.ndarray | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[np.ndarray, np.ndarray]:
  """The k keys of highest dot product with each query: (similarities, indices), [N, k] each,
  most similar first.

  Searched on device in float32 by `_block_top_k`, in blocks of `block_size` queries against
  `block_size` keys, so memory is the keys, O(N k) and one block, never the full [N, M] matrix.
  The device finds 2k candidates; their similarities are recomputed in float64 from `queries` and
  `keys` and the k best kept (a stable sort), so the result is the float64 brute-force one unless
  more than k candidates lie within float32 rounding of the k-th similarity. With `exclude_self`,
  queries and keys are the same examples (row i of each) and key i is never a neighbour of query i.
  With `query_tags` and `key_tags` instead, key j is never a neighbour of query i when their tags
  are equal; keys with `key_valid` False are never neighbours. Places for which no key is allowed
  hold similarity -inf and index -1.
  """
  queries, keys = np.asarray(queries), np.asarray(keys)
  num_queries, num_keys = len(queries), len(keys)
  if queries.ndim != 2 or keys.ndim != 2 or queries.shape[1] != keys.shape[1]:
    raise ValueError(f"nearest_neighbors needs [N, d] queries and [M, d] keys; got {queries.shape} and {keys.shape}.")
  if exclude_self and num_queries != num_keys:
    raise ValueError(
        f"exclude_self pairs query i with key i, but there are {num_queries} queries " f"and {num_keys} keys."
    )
  if exclude_self and (query_tags is not None or key_tags is not None):
    raise ValueError("Pass either exclude_self or query_tags/key_tags (exclude_self tags every row by its index).")
  if (query_tags is None) != (key_tags is None):
    raise ValueError("query_tags and key_tags go together: a key is excluded when its tag equals the query's.")
  if not 1 <= k <= num_keys - int(exclude_self):
    raise ValueError(
        f"k={k} neighbours need more than {num_keys} keys" f"{' (the query itself excluded)' if exclude_self else ''}."
    )
  if block_size < 1:
    raise ValueError(f"block_size={block_size} must be >= 1 (rows of queries and keys per on-device block).")
  if exclude_self:
    query_tags = key_tags = np.arange(num_keys)
  elif query_tags is None:  # Nothing excluded: tags that never meet.
    query_tags, key_tags = np.full(num_queries, -1), np.arange(num_keys)
  query_tags, key_tags = _int32_tags(query_tags, "query_tags"), _int32_tags(key_tags, "key_tags")
  if len(query_tags) != num_queries or len(key_tags) != num_keys:
    raise ValueError(
        f"{len(query_tags)} query tags and {len(key_tags)} key tags for {num_queries} queries and "
        f"{num_keys} keys: give one tag per row."
    )
  key_valid = np.ones(num_keys, bool) if key_valid is None else np.asarray(key_valid, bool)
  if key_valid.shape != (num_keys,):
    raise ValueError(f"key_valid {key_valid.shape} must hold one flag per key ({num_keys}).")

  # Twice as many candidates as asked for are found in float32, and the float64 similarities pick the
  # k best of them: a neighbour that float32 rounding ranks just below the k-th is not lost.
  candidates = min(2 * k, num_keys)
  query_block, key_block = min(block_size, num_queries), min(block_size, num_keys)
  num_key_blocks = -(-num_keys // key_block)
  pad = num_key_blocks * key_block - num_keys
  dim = keys.shape[1]
  device = jax.local_devices()[0]  # Every host searches on its own first device.
  put = lambda x: jax.device_put(x, device)
  key_blocks = put(
      np.concatenate([keys.astype(np.float32), np.zeros((pad, dim), np.float32)]).reshape(
          num_key_blocks, key_block, dim
      )
  )
  tag_blocks = put(np.concatenate([key_tags, np.zeros(pad, np.int32)]).reshape(num_key_blocks, key_block))
  valid_blocks = put(np.concatenate([key_valid, np.zeros(pad, bool)]).reshape(num_key_blocks, key_block))
  found = []
  for start in range(0, num_queries, query_block):
    block = queries[start : start + query_block].astype(np.float32)
    tags = query_tags[start : start + query_block]
    short = query_block - len(block)
    if short:  # The last block, padded to the compiled shape.
      block = np.concatenate([block, np.zeros((short, dim), np.float32)])
      tags = np.concatenate([tags, np.full(short, -1, np.int32)])
    found.append(_block_top_k_fn()(put(block), put(tags), key_blocks, tag_blocks, valid_blocks, k=candidates))
  del key_blocks
  found = jax.device_get(found)
  coarse = np.concatenate([s for s, _ in found])[:num_queries]
  indices = np.concatenate([i for _, i in found])[:num_queries].astype(np.int64)

  # float64 similarities of the found pairs, a chunk of rows at a time.
  similarities = np.full((num_queries, candidates), -np.inf)
  rows = max(1, _REFINE_ELEMENTS // (candidates * dim))
  for start in range(0, num_queries, rows):
    stop = min(start + rows, num_queries)
    idx = indices[start:stop]
    ok = np.isfinite(coarse[start:stop]) & (idx >= 0)
    exact = np.einsum("nd,nkd->nk", queries[start:stop].astype(np.float64), keys[np.maximum(idx, 0)].astype(np.float64))
    similarities[start:stop] = np.where(ok, exact, -np.inf)
  indices[~np.isfinite(similarities)] = -1
  # Stable: equal float64 similarities keep the device's order, the lower key index first.
  order = np.argsort(-similarities, axis=1, kind="stable")[:, :k]
  return np.take_along_axis(similarities, order, axis=1), np.take_along_axis(indices, order, axis=1)


# ----------------------------------------------------------------------------
# Scores (on unit-norm embeddings; [N] float64 arrays).


def local_outlier_scores(
    embeddings: np.ndarray, k: int = DEFAULT_DENSITY_NEIGHBORS, block_size: int = DEFAULT_BLOCK_SIZE
) -> dict[str, np.ndarray]:
  """`k_distance`, `slof` and `lof` of every row (formulas in the module docstring), [N] each.

  Rows are L2-normalised first; distances are cosine distances 1 - cos. k is capped at N - 1.
  Memory: the [N, k] neighbour indices and distances besides the embeddings.
  """
  embeddings = np.asarray(embeddings, np.float64)
  if embeddings.ndim != 2 or len(embeddings) < 2:
    raise ValueError(f"local_outlier_scores needs [N >= 2, d] embeddings, got {embeddings.shape}.")
  if k < 1:
    raise ValueError(f"density_neighbors={k} must be >= 1 (Huang et al. use 16).")
  unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
  k = min(k, len(unit) - 1)
  similarities, neighbors = nearest_neighbors(unit, unit, k, block_size=block_size)
  # Rounding can put identical unit vectors a hair below distance 0.
  distances = np.maximum(1.0 - similarities, 0.0)  # [N, k], nearest first.
  k_distance = distances[:, -1]
  reachability = np.maximum(k_distance[neighbors], distances)
  lrd = 1.0 / (reachability.mean(axis=1) + _DENSITY_EPS)
  simple_lrd = 1.0 / (k_distance + _DENSITY_EPS)
  return {
      "k_distance": k_distance,
      "slof": simple_lrd[neighbors].mean(axis=1) / simple_lrd,
      "lof": lrd[neighbors].mean(axis=1) / lrd,
  }


def score_examples(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    ids: np.ndarray,
    *,
    pool_emb: np.ndarray | None = None,
    pool_ids: np.ndarray | None = None,
    neighbors: int = DEFAULT_NEIGHBORS,
    density_neighbors: int = DEFAULT_DENSITY_NEIGHBORS,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> dict[str, np.ndarray]:
  """Every score of the module docstring, one [N] float64 array each (pool scores only with a pool).

  Args:
    image_emb, caption_emb: [N, d] unit rows; row i is example i's image and caption.
    ids: [N] example ids.
    pool_emb, pool_ids: [M, d] unit rows and [M] source ids of a RoCLIP pool
      (id -1: a random initial row, ignored).
    neighbors: how many nearest captions `caption_atypicality` averages over.
    density_neighbors: the k of `k_distance`, `slof` and `lof` (nearest images).
    block_size: queries and keys per block of the on-device searches (`nearest_neighbors`).
  """
  n = len(ids)
  if image_emb.shape != caption_emb.shape or image_emb.shape[0] != n:
    raise ValueError(f"score_examples: images {image_emb.shape}, captions {caption_emb.shape} and {n} ids disagree.")
  if n < 2:
    raise ValueError("score_examples needs at least 2 examples (the neighbour score compares captions).")
  if neighbors < 1:
    raise ValueError(f"neighbors={neighbors} must be >= 1.")
  own = np.sum(image_emb.astype(np.float64) * caption_emb.astype(np.float64), axis=1)
  out = {"own_similarity": own, "own_distance": 1.0 - own}
  out["mixture_risk"] = 1.0 - safeclip.fit_gmm(own).posterior_high(own)

  # Captions nearest to each image, its own caption excluded.
  _, nearest = nearest_neighbors(image_emb, caption_emb, min(neighbors, n - 1), block_size=block_size)
  agreement = np.empty(n)
  rows = max(1, _REFINE_ELEMENTS // (nearest.shape[1] * caption_emb.shape[1]))
  for start in range(0, n, rows):
    stop = min(start + rows, n)
    agreement[start:stop] = np.einsum(
        "nd,nkd->nk", caption_emb[start:stop].astype(np.float64), caption_emb[nearest[start:stop]].astype(np.float64)
    ).mean(axis=1)
  out["caption_atypicality"] = 1.0 - agreement
  out.update(local_outlier_scores(image_emb, density_neighbors, block_size=block_size))

  if pool_emb is not None:
    if pool_ids is None or len(pool_ids) != len(pool_emb):
      raise ValueError("score_examples: pool_ids must give one source id per pool row.")
    pool_ids = np.asarray(pool_ids, np.int64)
    valid = pool_ids >= 0
    if valid.any():
      # The best pool row other than the random initial ones and the example's own caption.
      top1, _ = nearest_neighbors(
          image_emb,
          pool_emb,
          1,
          exclude_self=False,
          query_tags=np.asarray(ids),
          key_tags=pool_ids,
          key_valid=valid,
          block_size=block_size,
      )
      top1 = top1[:, 0]
      has_other = np.isfinite(top1)
      out["pool_top1_similarity"] = np.where(has_other, top1, np.nan)
      out["pool_margin"] = np.where(has_other, top1 - own, np.nan)
  out["score"] = out["pool_margin"] if "pool_margin" in out else out["caption_atypicality"]
  return out


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
  for name in SCORES:  # `score` is one of these.
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


# ----------------------------------------------------------------------------
# The run's training set, in one streaming embedding pass.


def training_source(config: Any) -> tuple[Any, Any]:
  """The run's training source, rebuilt with the same poisons (by seed), and the image transform
  that stamps the backdoor trigger where the trainer stamped it (None without poisoning)."""

  config = copy.deepcopy(config)
  config.data.num_workers = 0  # Only the source is needed; start no worker processes.
  if config.defense == "cleanclip":
    # A CleanCLIP run fine-tuned on a clean subset; the data worth screening is the poisoned
    # training set that subset was drawn from.
    config.defense = "none"
  train_data, _ = train.build_train_data(config, workdir=None)  # workdir=None: writes nothing.
  transform = poison_lib.make_image_transform(config.poison, seed=config.poison.seed) if config.poison.enabled else None
  return train_data.source, transform


@dataclasses.dataclass
class EmbeddedTrainingSet:
  """Every decodable training example of a run, encoded; rows in ascending id order."""

  ids: np.ndarray  # int64 [N]
  captions: list[str]
  image_emb: np.ndarray  # float32 [N, d], unit rows (eval preprocessing, trigger stamped as in training).
  caption_emb: np.ndarray  # float32 [N, d], unit rows.
  poison_codes: np.ndarray  # int8 [N], the records' `poisoned` field (0 clean).
  num_skipped: int  # Undecodable images left out (over all hosts).


def make_embedding_fn(spec: Any, mesh: Any):
  """Jitted `fn(params, model_state, image_u8, tokens, ids, codes) -> (image_emb, caption_emb, ids, codes)`
  on a global batch (eval mode, unit rows). Every output is replicated, so every host reads back the
  whole global batch, as in SafeCLIP's scoring pass (`safeclip.make_similarity_fn`)."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

  replicated = NamedSharding(mesh, P())

  def embed(params, model_state, images, tokens, ids, codes):
    model = spec.merge(params, model_state)
    image_emb = losses.l2_normalize(model.encode_image(image_ops.normalize(images), train=False))
    return image_emb, losses.l2_normalize(model.encode_text(tokens)), ids, codes

  return jax.jit(embed, out_shardings=(replicated,) * 4)


def _gather_captions(local: np.ndarray) -> np.ndarray:
  """Every host's [B] caption strings, concatenated in process order (the order in which
  `sharding.global_batch` lays out the hosts' rows): UTF-8 bytes padded to the longest."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = [str(c).encode("utf-8") for c in local]
  width = int(np.max(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0))))) or 1
  padded = np.zeros((len(encoded), width), np.uint8)
  for row, text in enumerate(encoded):
    padded[row, : len(text)] = np.frombuffer(text, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
  return np.array([bytes(row).rstrip(b"\0").decode("utf-8") for row in gathered], object)


def embed_training_set(
    run: Any, batches: Iterable[dict[str, np.ndarray]], num_examples: int | None = None
) -> EmbeddedTrainingSet:
  """Encodes `batches` (this host's `pipeline.scoring_batches`; every host must yield as many),
  one batch at a time: images never outlive their batch. Every host gets every example.
  Process 0 shows a progress bar (examples/s) over `num_examples`, the source's length."""

  mesh = sharding_lib.make_mesh([("data", -1)])  # The mesh `inspect.load` restored the state on.
  embed = make_embedding_fn(steps_lib.ModelSpec.create(run.config.model), mesh)
  ids, captions, image_emb, caption_emb, codes = [], [], [], [], []
  start = time.perf_counter()
  num_seen = 0
  with metadata_lib.progress_bar(num_examples, "suspicion: embedding pass", enabled=jax.process_index() == 0) as bar:
    for local in batches:
      batch = sharding_lib.global_batch(
          {
              "image": local["image"],
              "text": local["text"],
              "id": np.where(local["valid"], local["id"], -1).astype(np.int32),
              "code": local["poisoned"].astype(np.int32),
          },
          mesh,
      )
      with jax.set_mesh(mesh):
        out = embed(run.state.params, run.state.model_state, batch["image"], batch["text"], batch["id"], batch["code"])
      batch_image_emb, batch_caption_emb, batch_ids, batch_codes = (np.asarray(x) for x in jax.device_get(out))
      batch_captions = _gather_captions(local["caption"])
      keep = batch_ids >= 0
      ids.append(batch_ids[keep].astype(np.int64))
      image_emb.append(batch_image_emb[keep].astype(np.float32))
      caption_emb.append(batch_caption_emb[keep].astype(np.float32))
      codes.append(batch_codes[keep].astype(np.int8))
      captions.extend(str(c) for c in batch_captions[keep])
      num_seen += int(keep.sum())
      bar.update(int(keep.sum()))  # The global batch: every host's examples.
  if not num_seen:
    raise ValueError("No training image could be decoded; check config.data of the run.")
  num_skipped = int(getattr(batches, "num_skipped", 0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    num_skipped = int(np.sum(multihost_utils.process_allgather(np.int64(num_skipped))))
  ids = np.concatenate(ids)
  order = np.argsort(ids, kind="stable")  # Hosts read strided slices: back to id order.
  seconds = time.perf_counter() - start
  logging.info(
      "Embedding pass: %d examples in %.1f s (%.0f examples/s).", num_seen, seconds, num_seen / max(seconds, 1e-9)
  )
  return EmbeddedTrainingSet(
      ids=ids[order],
      captions=[captions[i] for i in order],
      image_emb=np.concatenate(image_emb)[order],
      caption_emb=np.concatenate(caption_emb)[order],
      poison_codes=np.concatenate(codes)[order],
      num_skipped=num_skipped,
  )


def _injected_poison_ids(workdir: str) -> set[int] | None:
  path = os.path.join(workdir, "poison_info.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return set(poison_lib.PoisonInfo.from_json(f.read()).poisoned_ids)


# ----------------------------------------------------------------------------
# The report.

CSV_SCORE_COLUMNS = (
    "own_similarity",
    "mixture_risk",
    "pool_top1_similarity",
    "pool_margin",
    "caption_atypicality",
    "k_distance",
    "slof",
    "lof",
    "score",
)


@dataclasses.dataclass
class SuspicionReport:
  num_examples: int  # Rows of the CSV.
  metrics: dict[str, dict[str, float]]  # Per score; empty without poison_info.json.
  num_poisons: int | None  # Injected poisons among the scored examples; None when unknown.
  num_skipped: int
  csv_path: str


def write_ranked_csv(
    path: str,
    order: np.ndarray,
    data: EmbeddedTrainingSet,
    scores: dict[str, np.ndarray],
    is_poisoned: np.ndarray | None,
) -> None:
  """The CSV, one row per example in `order` (rank 1 first), written a chunk of rows at a time."""
  columns = [c for c in CSV_SCORE_COLUMNS if c in scores]
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["rank", "id", "caption", *columns, "poisoned", "poison_code"])
    for start in range(0, len(order), _CSV_CHUNK_ROWS):
      chunk = order[start : start + _CSV_CHUNK_ROWS]
      values = [scores[c][chunk].tolist() for c in columns]  # Python floats: written as repr, as before.
      poisoned = [""] * len(chunk) if is_poisoned is None else is_poisoned[chunk].astype(int).tolist()
      writer.writerows(
          [
              start + row + 1,
              int(data.ids[i]),
              data.captions[i],
              *(v[row] for v in values),
              poisoned[row],
              int(data.poison_codes[i]),
          ]
          for row, i in enumerate(chunk)
      )


def build_report(
    workdir: str,
    out: str | None = None,
    neighbors: int = DEFAULT_NEIGHBORS,
    step: int | None = None,
    density_neighbors: int = DEFAULT_DENSITY_NEIGHBORS,
    block_size: int = DEFAULT_BLOCK_SIZE,
    batch_size: int = DEFAULT_BATCH_SIZE,
) -> SuspicionReport:
  """Scores every training example of the run in `workdir` and writes the ranked CSV to `out`
  (default `workdir/suspicion.csv`) and the metrics next to it (`.json`); on a multi-host run
  every host takes part and process 0 writes."""

  if block_size < 1 or batch_size < 1:
    raise ValueError(f"block_size={block_size} and batch_size={batch_size} must be >= 1.")
  if batch_size % jax.local_device_count():
    raise ValueError(
        f"batch_size={batch_size} must be a multiple of the {jax.local_device_count()} local devices "
        "(each host's batch is split over them); pass --batch_size accordingly."
    )
  run = inspect_lib.load(workdir, step=step)
  source, transform = training_source(run.config)
  batches = pipeline.scoring_batches(
      run.config,
      source,
      batch_size=batch_size,
      image_transform=transform,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  data = embed_training_set(run, batches, num_examples=len(source))
  pool_emb = pool_ids = None
  if run.pool is not None:
    pool_emb = np.asarray(run.pool.embeddings, np.float32)
    pool_ids = np.asarray(run.pool.source_ids, np.int64)
  t0 = time.perf_counter()
  scores = score_examples(
      data.image_emb,
      data.caption_emb,
      data.ids,
      pool_emb=pool_emb,
      pool_ids=pool_ids,
      neighbors=neighbors,
      density_neighbors=density_neighbors,
      block_size=block_size,
  )
  logging.info("Scores of %d examples in %.1f s.", len(data.ids), time.perf_counter() - t0)
  injected = _injected_poison_ids(workdir)
  is_poisoned = None if injected is None else np.isin(data.ids, sorted(injected))
  order, metrics = rank_and_evaluate(scores, is_poisoned)

  csv_path = out or os.path.join(workdir, "suspicion.csv")
  report = SuspicionReport(
      num_examples=len(data.ids),
      metrics=metrics,
      num_poisons=None if is_poisoned is None else int(is_poisoned.sum()),
      num_skipped=data.num_skipped,
      csv_path=csv_path,
  )
  if jax.process_index() == 0:
    write_ranked_csv(csv_path, order, data, scores, is_poisoned)
    with open(os.path.splitext(csv_path)[0] + ".json", "w") as f:
      json.dump(
          {
              "step": run.step,
              "num_examples": report.num_examples,
              "num_poisons": report.num_poisons,
              "num_skipped": data.num_skipped,
              "neighbors": neighbors,
              "density_neighbors": density_neighbors,
              "metrics": metrics,
          },
          f,
          indent=1,
      )
  return report


def format_metrics(report: SuspicionReport) -> str:
  if not report.metrics:
    return (
        f"{report.num_examples} examples scored; no poison_info.json with poisons in the run, "
        "so no detection metrics."
    )
  lines = [
      f"{report.num_examples} examples, {report.num_poisons} injected poisons (k = {report.num_poisons}):",
      f"{'score':<22}{'precision@k':>12}{'recall@k':>10}{'AUROC':>8}",
  ]
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
  flags.DEFINE_integer(
      "density_neighbors",
      DEFAULT_DENSITY_NEIGHBORS,
      "Nearest images (k) of the density scores k_distance, slof and lof.",
  )
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
  flags.DEFINE_integer(
      "block_size",
      DEFAULT_BLOCK_SIZE,
      "Queries and keys per block of the on-device nearest-neighbour search: device memory is "
      "the keys plus one [block_size, block_size] float32 block.",
  )
  flags.DEFINE_integer(
      "batch_size",
      DEFAULT_BATCH_SIZE,
      "Examples per host per batch of the embedding pass (a multiple of the local device count).",
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the --workdir of a finished or checkpointed training run.")
  host_runtime.tune()
  report = build_report(
      FLAGS.workdir,
      FLAGS.out,
      neighbors=FLAGS.neighbors,
      step=FLAGS.step,
      density_neighbors=FLAGS.density_neighbors,
      block_size=FLAGS.block_size,
      batch_size=FLAGS.batch_size,
  )
  logging.info("Wrote %s", report.csv_path)
  print(format_metrics(report))
  print(f"Ranked examples: {report.csv_path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
