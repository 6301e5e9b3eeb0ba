"""The suspicion scores of every training example, from its unit image and caption embeddings.

Higher means more suspicious for every score:

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
  nearest training images (`neighbors.local_outlier_scores`, whose docstring
  gives the formulas).

`score` is `pool_margin` when the run has a pool, else `caption_atypicality`. Every nearest-neighbour
search is `neighbors.nearest_neighbors`; the scores are [N] float64 arrays.
"""

from __future__ import annotations

import numpy as np

from roclip_jax.defenses import safeclip
from roclip_jax.suspicion import neighbors as neighbors_lib

SCORES = ("own_distance", "mixture_risk", "pool_margin", "caption_atypicality", "k_distance", "slof", "lof")
DEFAULT_NEIGHBORS = 10


def score_examples(
    image_emb: np.ndarray,
    caption_emb: np.ndarray,
    ids: np.ndarray,
    *,
    pool_emb: np.ndarray | None = None,
    pool_ids: np.ndarray | None = None,
    neighbors: int = DEFAULT_NEIGHBORS,
    density_neighbors: int = neighbors_lib.DEFAULT_DENSITY_NEIGHBORS,
    block_size: int = neighbors_lib.DEFAULT_BLOCK_SIZE,
) -> dict[str, np.ndarray]:
  """Every score of the module docstring, one [N] float64 array each (pool scores only with a pool).

  Args:
    image_emb, caption_emb: [N, d] unit rows; row i is example i's image and caption.
    ids: [N] example ids.
    pool_emb, pool_ids: [M, d] unit rows and [M] source ids of a RoCLIP pool
      (id -1: a random initial row, ignored).
    neighbors: how many nearest captions `caption_atypicality` averages over.
    density_neighbors: the k of `k_distance`, `slof` and `lof` (nearest images).
    block_size: queries and keys per block of the on-device searches (`neighbors.nearest_neighbors`).
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
  _, nearest = neighbors_lib.nearest_neighbors(image_emb, caption_emb, min(neighbors, n - 1), block_size=block_size)
  agreement = np.empty(n)
  rows = max(1, neighbors_lib.REFINE_ELEMENTS // (nearest.shape[1] * caption_emb.shape[1]))
  for start in range(0, n, rows):
    stop = min(start + rows, n)
    agreement[start:stop] = np.einsum(
        "nd,nkd->nk", caption_emb[start:stop].astype(np.float64), caption_emb[nearest[start:stop]].astype(np.float64)
    ).mean(axis=1)
  out["caption_atypicality"] = 1.0 - agreement
  out.update(neighbors_lib.local_outlier_scores(image_emb, density_neighbors, block_size=block_size))

  if pool_emb is not None:
    if pool_ids is None or len(pool_ids) != len(pool_emb):
      raise ValueError("score_examples: pool_ids must give one source id per pool row.")
    pool_ids = np.asarray(pool_ids, np.int64)
    valid = pool_ids >= 0
    if valid.any():
      # The best pool row other than the random initial ones and the example's own caption.
      top1, _ = neighbors_lib.nearest_neighbors(
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
