"""Poison-suspicion report: AUROC against a brute-force pair count, the scores against loops,
and the report of a tiny backdoored RoCLIP run (structure, not a particular AUROC)."""

import csv
import itertools
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import scipy.stats

from roclip_jax import suspicion
from tests.helpers import tiny_config


def _brute_auroc(scores, labels):
  pos = [s for s, y in zip(scores, labels) if y]
  neg = [s for s, y in zip(scores, labels) if not y]
  wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
  return wins / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(5))
def test_auroc_equals_brute_force_pair_count_with_ties(seed):
  rng = np.random.default_rng(seed)
  n = 30
  scores = rng.integers(0, 6, n).astype(float)  # Few values: many ties.
  labels = rng.random(n) < 0.3
  labels[:2] = [True, False]
  assert suspicion.auroc(scores, labels) == pytest.approx(_brute_auroc(scores, labels), abs=1e-12)


def test_auroc_hand_values_and_bad_input():
  assert suspicion.auroc([0.9, 0.8, 0.1], [1, 1, 0]) == 1.0
  assert suspicion.auroc([0.1, 0.8, 0.9], [1, 1, 0]) == 0.0
  assert suspicion.auroc([0.5, 0.5], [1, 0]) == 0.5
  with pytest.raises(ValueError, match="both classes"):
    suspicion.auroc([0.1, 0.2], [0, 0])
  with pytest.raises(ValueError, match="NaN"):
    suspicion.auroc([np.nan, 0.2], [1, 0])


def test_precision_recall_at_k_by_hand():
  scores = [0.9, 0.1, 0.8, 0.7, 0.2]
  labels = [1, 1, 0, 1, 0]  # Top 3: 0.9 (pos), 0.8 (neg), 0.7 (pos).
  assert suspicion.precision_recall_at_k(scores, labels, 3) == (2 / 3, 2 / 3)
  assert suspicion.precision_recall_at_k(scores, labels, 1) == (1.0, 1 / 3)
  with pytest.raises(ValueError, match="k=0"):
    suspicion.precision_recall_at_k(scores, labels, 0)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_scores_match_explicit_loops():
  rng = np.random.default_rng(0)
  n, m, d, k = 9, 7, 5, 3
  img, cap, pool = _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(n, d))), _unit(rng.normal(size=(m, d)))
  ids = np.arange(100, 100 + n)
  pool_ids = np.array([100, 101, -1, 150, 103, 104, 160])  # Row 2 is a random init row.
  got = suspicion.score_examples(img, cap, ids, pool_emb=pool, pool_ids=pool_ids, neighbors=k)
  for i in range(n):
    own = float(img[i] @ cap[i])
    assert got["own_similarity"][i] == pytest.approx(own)
    others = sorted((j for j in range(n) if j != i), key=lambda j: -float(img[i] @ cap[j]))[:k]
    assert got["caption_atypicality"][i] == pytest.approx(1 - np.mean([cap[i] @ cap[j] for j in others]))
    allowed = [r for r in range(m) if pool_ids[r] >= 0 and pool_ids[r] != ids[i]]
    top1 = max(float(img[i] @ pool[r]) for r in allowed)
    assert got["pool_top1_similarity"][i] == pytest.approx(top1)
    assert got["pool_margin"][i] == pytest.approx(top1 - own)
  np.testing.assert_array_equal(got["score"], got["pool_margin"])
  # The density scores read the image embeddings only, with k capped at the n - 1 other examples.
  density = _brute_local_outlier_scores(img, n - 1)
  for name in ("k_distance", "slof", "lof"):
    np.testing.assert_allclose(got[name], density[name], rtol=1e-6)
  without_pool = suspicion.score_examples(img, cap, ids, neighbors=k)
  assert "pool_margin" not in without_pool
  np.testing.assert_array_equal(without_pool["score"], got["caption_atypicality"])


def _brute_local_outlier_scores(x, k):
  """Textbook k-distance, LOF (Breunig et al. 2000) and simplified LOF, point by point, on the full
  cosine-distance matrix."""
  n = len(x)
  unit = x / np.linalg.norm(x, axis=1, keepdims=True)
  dist = np.zeros((n, n))
  for p in range(n):
    for o in range(n):
      dist[p, o] = max(0.0, 1.0 - float(unit[p] @ unit[o]))
  neighbours = [sorted((o for o in range(n) if o != p), key=lambda o: dist[p, o])[:k] for p in range(n)]
  kdist = [dist[p, neighbours[p][-1]] for p in range(n)]
  lrd = [1.0 / np.mean([max(kdist[o], dist[p, o]) for o in neighbours[p]]) for p in range(n)]
  return {
      "k_distance": np.array(kdist),
      "lof": np.array([np.mean([lrd[o] for o in neighbours[p]]) / lrd[p] for p in range(n)]),
      "slof": np.array([np.mean([kdist[p] / kdist[o] for o in neighbours[p]]) for p in range(n)]),
  }


def _clusters_with_outliers(seed, per_cluster=50, clusters=3, outliers=4, d=8):
  """Tight clusters around random directions, plus random directions far from all of them (last)."""
  rng = np.random.default_rng(seed)
  centers = _unit(rng.normal(size=(clusters, d)))
  points = [c + 0.05 * rng.normal(size=(per_cluster, d)) for c in centers]
  points.append(rng.normal(size=(outliers, d)))
  return np.concatenate(points), np.arange(clusters * per_cluster + outliers) >= clusters * per_cluster


@pytest.mark.parametrize("seed", range(2))
def test_local_outlier_scores_match_brute_force_and_rank_planted_outliers_first(seed):
  x, planted = _clusters_with_outliers(seed)
  k = 7
  # Blocks of 5 queries against 5 keys (154 rows: 31 blocks, the last one short): the blocked top-k is exercised.
  got = suspicion.local_outlier_scores(x, k, block_size=5)
  want = _brute_local_outlier_scores(x, k)
  for name in ("k_distance", "slof", "lof"):
    np.testing.assert_allclose(got[name], want[name], rtol=1e-6, err_msg=name)
    top = np.argsort(-got[name])[: planted.sum()]
    assert planted[top].all(), f"{name}: the planted outliers are not the top scores"
    assert suspicion.auroc(got[name], planted) == 1.0
  # Inside a tight cluster LOF is about 1; the planted outliers are far sparser than their neighbours.
  assert np.median(got["lof"][~planted]) == pytest.approx(1.0, abs=0.15)
  assert got["lof"][planted].min() > 3.0
  whole = suspicion.local_outlier_scores(x, k, block_size=1)  # One row per block.
  for name in got:
    np.testing.assert_allclose(whole[name], got[name], rtol=1e-12)


def test_nearest_neighbors_blocks_agree_with_a_full_sort():
  rng = np.random.default_rng(3)
  queries, keys = _unit(rng.normal(size=(11, 4))), _unit(rng.normal(size=(11, 4)))
  full = queries @ keys.T
  np.fill_diagonal(full, -np.inf)
  for block in (1, 3, 11, 10_000):
    sims, idx = suspicion.nearest_neighbors(queries, keys, 4, block_size=block)
    np.testing.assert_array_equal(idx, np.argsort(-full, axis=1)[:, :4])
    np.testing.assert_allclose(sims, -np.sort(-full, axis=1)[:, :4], rtol=1e-12)
  with pytest.raises(ValueError, match="k=11 neighbours need more than 11 keys"):
    suspicion.nearest_neighbors(queries, keys, 11)


def test_exact_duplicates_get_finite_density_scores():
  rng = np.random.default_rng(4)
  x = np.concatenate([np.repeat(rng.normal(size=(1, 6)), 6, axis=0), rng.normal(size=(20, 6))])
  got = suspicion.local_outlier_scores(x, 3)
  assert all(np.all(np.isfinite(v)) for v in got.values())
  # Six copies of one image with k = 3: each one's neighbours are copies, a perfectly dense cluster.
  np.testing.assert_allclose(got["k_distance"][:6], 0.0, atol=1e-12)
  np.testing.assert_allclose(got["lof"][:6], 1.0, rtol=1e-5)


def _dense_scores(img, cap, ids, pool, pool_ids, neighbors, density_neighbors):
  """The report's scores as they were computed before streaming: full [N, N] and [N, M] float64
  matrices, full sorts. (mixture_risk reuses safeclip.fit_gmm, tested in test_safeclip.)"""
  from roclip_jax.defenses import safeclip

  img, cap, pool = img.astype(np.float64), cap.astype(np.float64), pool.astype(np.float64)
  own = np.sum(img * cap, axis=1)
  out = {"own_similarity": own, "own_distance": 1 - own, "mixture_risk": 1 - safeclip.fit_gmm(own).posterior_high(own)}
  cross = img @ cap.T
  np.fill_diagonal(cross, -np.inf)
  nearest = np.argsort(-cross, axis=1, kind="stable")[:, :neighbors]
  out["caption_atypicality"] = 1 - np.array([np.mean(cap[nearest[i]] @ cap[i]) for i in range(len(ids))])
  out.update(_brute_local_outlier_scores(img, density_neighbors))
  to_pool = img @ pool.T
  to_pool[(pool_ids[None, :] < 0) | (ids[:, None] == pool_ids[None, :])] = -np.inf
  top1 = to_pool.max(axis=1)
  out["pool_top1_similarity"] = np.where(np.isfinite(top1), top1, np.nan)
  out["pool_margin"] = out["pool_top1_similarity"] - own
  out["score"] = out["pool_margin"]
  return out


@pytest.fixture(scope="module")
def streaming_case():
  """Random embeddings (well separated: a float32 search cannot tie) and a pool holding some examples'
  own captions (three rows of example 7's) and random initial rows."""
  rng = np.random.default_rng(7)
  n, m, d = 300, 40, 16
  # float32, as the embedding pass stores them: both computations then start from the same numbers.
  img, cap, pool = (_unit(rng.normal(size=(rows, d))).astype(np.float32) for rows in (n, n, m))
  ids = np.arange(n) * 3  # Ids need not be row indices.
  pool_ids = rng.choice(ids[1:], m)
  pool_ids[:5] = -1
  pool_ids[5:8] = ids[7]
  labels = rng.random(n) < 0.1
  dense = _dense_scores(img, cap, ids, pool, pool_ids, neighbors=10, density_neighbors=16)
  return img, cap, ids, pool, pool_ids, labels, dense


# Blocks larger than N (one block), not dividing N = 300 (64: 5 blocks, the last one of 44), and tiny (7).
@pytest.mark.parametrize("block_size", [4096, 64, 7])
def test_streaming_scores_and_metrics_equal_the_dense_computation(streaming_case, block_size):
  img, cap, ids, pool, pool_ids, labels, dense = streaming_case
  got = suspicion.score_examples(
      img, cap, ids, pool_emb=pool, pool_ids=pool_ids, neighbors=10, density_neighbors=16, block_size=block_size
  )
  assert sorted(got) == sorted(dense)
  # The neighbours are found in float32 on device and their similarities recomputed in float64, so the
  # scores agree with the float64 reference to float64 rounding (summation order), not float32's.
  for name, want in dense.items():
    np.testing.assert_allclose(got[name], want, rtol=1e-9, atol=1e-12, err_msg=name)
  got_order, got_metrics = suspicion.rank_and_evaluate(got, labels)
  want_order, want_metrics = suspicion.rank_and_evaluate(dense, labels)
  np.testing.assert_array_equal(got_order, want_order)
  assert got_metrics.keys() == want_metrics.keys() == set(suspicion.SCORES)
  for name, want in want_metrics.items():
    assert got_metrics[name] == pytest.approx(want, abs=1e-12), name
    assert got_metrics[name]["auroc"] == pytest.approx(_brute_auroc(dense[name], labels), abs=1e-12), name


def test_block_size_smaller_than_n_and_not_dividing_it_gives_the_same_result(streaming_case):
  img, cap, ids, pool, pool_ids, _, _ = streaming_case
  one_block = suspicion.score_examples(img, cap, ids, pool_emb=pool, pool_ids=pool_ids, block_size=len(ids))
  for block_size in (41, 299):  # 300 = 7 * 41 + 13 = 299 + 1.
    blocked = suspicion.score_examples(img, cap, ids, pool_emb=pool, pool_ids=pool_ids, block_size=block_size)
    for name, want in one_block.items():
      np.testing.assert_array_equal(blocked[name], want, err_msg=f"{name}, block_size={block_size}")
  sims, idx = suspicion.nearest_neighbors(img, cap, 5, block_size=41)
  full = img @ cap.T
  np.fill_diagonal(full, -np.inf)
  np.testing.assert_array_equal(idx, np.argsort(-full, axis=1, kind="stable")[:, :5])
  with pytest.raises(ValueError, match="block_size=0"):
    suspicion.nearest_neighbors(img, cap, 5, block_size=0)


def test_nearest_neighbors_with_tags_skips_own_and_invalid_keys():
  rng = np.random.default_rng(5)
  queries, keys = _unit(rng.normal(size=(6, 3))), _unit(rng.normal(size=(9, 3)))
  query_tags, key_tags = np.array([0, 1, 2, 3, 4, 5]), np.array([0, 0, 1, 2, 9, 9, 3, 4, 5])
  key_valid = np.array([True] * 8 + [False])
  sims, idx = suspicion.nearest_neighbors(
      queries, keys, 3, exclude_self=False, query_tags=query_tags, key_tags=key_tags, key_valid=key_valid, block_size=2
  )
  for i in range(6):
    allowed = [j for j in range(9) if key_valid[j] and key_tags[j] != query_tags[i]]
    want = sorted(allowed, key=lambda j: -float(queries[i] @ keys[j]))[:3]
    assert idx[i].tolist() == want
    np.testing.assert_allclose(sims[i], [queries[i] @ keys[j] for j in want], rtol=1e-12)
  # No allowed key at all: -inf and index -1.
  sims, idx = suspicion.nearest_neighbors(
      queries[:1], keys[:2], 1, exclude_self=False, query_tags=query_tags[:1], key_tags=key_tags[:2]
  )
  assert sims[0, 0] == -np.inf and idx[0, 0] == -1
  # In the report: an example whose only pool rows are its own captions gets no pool_margin (NaN).
  ids = np.arange(6)
  got = suspicion.score_examples(
      queries,
      queries[::-1].copy(),
      ids,
      pool_emb=keys[:3],
      pool_ids=np.array([0, -1, 0]),
      neighbors=2,
      density_neighbors=2,
  )
  assert np.isnan(got["pool_margin"][0]) and np.isfinite(got["pool_margin"][1:]).all()
  np.testing.assert_allclose(
      got["pool_top1_similarity"][1:], np.maximum(queries[1:] @ keys[0], queries[1:] @ keys[2]), rtol=1e-12
  )


@pytest.fixture(scope="module")
def poisoned_run(tmp_path_factory, demo_root):
  # 4 backdoored examples, captioned as 'red circle' with the trigger stamped; 6 steps =
  # a CLIP epoch and a RoCLIP matching epoch, so the pool holds captions.
  config = tiny_config(
      demo_root,
      "roclip",
      max_steps=6,
      **{
          "poison.enabled": True,
          "poison.backdoor.enabled": True,
          "poison.backdoor.num_poisons": 4,
          "poison.backdoor.target_class": "red circle",
          "checkpoint.async_save": False,
      },
  )
  workdir = str(tmp_path_factory.mktemp("run"))
  from roclip_jax import train

  train.train_and_evaluate(config, workdir)
  return workdir


def test_report_on_a_tiny_backdoored_run(poisoned_run):
  out = os.path.join(poisoned_run, "report", "s.csv")
  report = suspicion.build_report(poisoned_run, out, neighbors=5)
  with open(os.path.join(poisoned_run, "poison_info.json")) as f:
    injected = set(json.load(f)["backdoor_ids"])
  assert len(injected) == 4
  with open(out) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 48 == len({r["id"] for r in rows})
  assert list(rows[0]) == [
      "rank",
      "id",
      "caption",
      "own_similarity",
      "mixture_risk",
      "pool_top1_similarity",
      "pool_margin",
      "caption_atypicality",
      "k_distance",
      "slof",
      "lof",
      "score",
      "poisoned",
      "poison_code",
  ]
  # mixture_risk: the low component's posterior of a mixture fitted to own_similarity,
  # recomputed with scipy's normal density at the parameters EM converged to.
  from roclip_jax.defenses import safeclip

  own = np.array([float(r["own_similarity"]) for r in rows])
  gmm = safeclip.fit_gmm(own)
  low, high = (w * scipy.stats.norm.pdf(own, m, np.sqrt(v)) for w, m, v in zip(gmm.weights, gmm.means, gmm.variances))
  np.testing.assert_allclose([float(r["mixture_risk"]) for r in rows], low / (low + high), rtol=1e-6, atol=1e-9)
  assert [int(r["rank"]) for r in rows] == list(range(1, 49))
  scores = np.array([float(r["score"]) for r in rows])
  assert np.all(np.diff(scores) <= 0)  # Most suspicious first.
  flagged = {int(r["id"]) for r in rows if r["poisoned"] == "1"}
  assert flagged == injected == {int(r["id"]) for r in rows if r["poison_code"] == "1"}
  assert all("red circle" in r["caption"] for r in rows if int(r["id"]) in injected)
  # The metrics, recomputed from the CSV by brute force.
  labels = [r["poisoned"] == "1" for r in rows]
  for name, column, sign in [
      ("pool_margin", "pool_margin", 1),
      ("caption_atypicality", "caption_atypicality", 1),
      ("own_distance", "own_similarity", -1),
      ("mixture_risk", "mixture_risk", 1),
      ("k_distance", "k_distance", 1),
      ("slof", "slof", 1),
      ("lof", "lof", 1),
  ]:
    values = [sign * float(r[column]) for r in rows]
    m = report.metrics[name]
    assert m["auroc"] == pytest.approx(_brute_auroc(values, labels), abs=1e-9)
    top4 = sorted(range(48), key=lambda i: -values[i])[:4]
    assert m["k"] == 4 and m["precision_at_k"] == m["recall_at_k"] == pytest.approx(sum(labels[i] for i in top4) / 4)
  with open(os.path.splitext(out)[0] + ".json") as f:
    saved = json.load(f)
  assert saved["metrics"] == report.metrics and saved["density_neighbors"] == 16
  text = suspicion.format_metrics(report)
  assert "4 injected poisons" in text and "pool_margin" in text and "AUROC" in text
  assert all(f"\n{name} " in text for name in ("k_distance", "slof", "lof"))


def test_cli_prints_the_metrics_and_writes_the_csv(poisoned_run):
  env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  cmd = [sys.executable, "-m", "roclip_jax.experiments.suspicion"]
  missing = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
  assert missing.returncode != 0 and "--workdir is required" in missing.stderr
  done = subprocess.run(
      cmd + [f"--workdir={poisoned_run}", "--block_size=7"], env=env, capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert "precision@k" in done.stdout and "caption_atypicality" in done.stdout
  assert os.path.exists(os.path.join(poisoned_run, "suspicion.csv"))
