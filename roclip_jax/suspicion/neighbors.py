"""Nearest neighbours of unit embeddings: a blocked top-k on device, and local outlier scores.

`nearest_neighbors` keeps the keys on device as [M / B, B, d] blocks (B = `block_size`); a jitted
scan multiplies a [B, d] block of queries with one key block at a time, takes `lax.top_k` of the
[B, B] similarities and merges it with the running best k, so device memory is the keys plus one
[B, B] block and the result is [N, k]; no [N, N] or [N, M] array exists anywhere. The search is in
float32 and finds 2k candidates; their similarities are recomputed in float64 on the host (chunk by
chunk) and the k best kept, so the result is that of the dense float64 computation unless more than
k candidates lie within float32 rounding (~1e-7) of the k-th similarity. Every host searches on its
first local device.

`local_outlier_scores` gives the density scores `k_distance`, `slof` and `lof` of each embedding
among its k nearest others, after Huang et al., "Detecting Backdoor Samples in Contrastive Language
Image Pretraining" (ICLR 2025), who find that backdoored examples sit in sparser local
neighbourhoods than their neighbours do. With d(p, o) = 1 - cos(p, o) on the unit-norm embeddings
and N_k(p) the k nearest other examples (exactly k, as in scikit-learn; ties at the k-th distance
are broken towards the lower example index):

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

The paper uses Euclidean distance; on unit vectors that is sqrt(2 d(p, o)), so the neighbours and
the `k_distance` ranking are the same, only the LOF ratios change. Cosine distance is used because
it is the geometry the CLIP loss trains. The paper's best detector, DAO (a dimensionality-aware
LOF), is not implemented here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

DEFAULT_DENSITY_NEIGHBORS = 16  # The k of Huang et al.'s usage example (their README).
# Queries and keys per block of the on-device search: a [4096, 4096] float32 block is 64 MiB.
DEFAULT_BLOCK_SIZE = 4096
# scikit-learn's guard in the local reachability density: exact duplicates stay finite.
_DENSITY_EPS = 1e-10
# float64 elements gathered at once on the host when the similarities of found neighbours are
# computed (32 MiB).
REFINE_ELEMENTS = 1 << 22


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
  rows = max(1, REFINE_ELEMENTS // (candidates * dim))
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
