"""The suspicion report of a training run: every training example scored, ranked, written as a CSV.

`build_report` restores the run's checkpoint, rebuilds its (poisoned) training source exactly as
the trainer did (`embedding.training_source`), encodes every example (`embedding.embed_training_set`),
scores it (`scores.score_examples`) and writes the examples from the most to the least suspicious,
by `score`. With the run's `poison_info.json`, the report also gives, for every score, precision@k
and recall@k at k = the number of poisons, and the AUROC (`metrics.rank_and_evaluate`).

The scores and the metrics are [N] float64 arrays in memory (a few times 8 N bytes); the CSV is
written in rank order, a chunk of rows at a time. Every host runs the searches (on its first local
device) and only process 0 writes the files.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

from absl import logging
import jax
import numpy as np

from roclip_jax import defenses
from roclip_jax import runs
from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.suspicion import embedding as embedding_lib
from roclip_jax.suspicion import metrics as metrics_lib
from roclip_jax.suspicion import neighbors as neighbors_lib
from roclip_jax.suspicion import scores as scores_lib

# CSV rows formatted and written at a time.
_CSV_CHUNK_ROWS = 65536

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
    data: embedding_lib.EmbeddedTrainingSet,
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


def _injected_poison_ids(workdir: str) -> set[int] | None:
  path = os.path.join(workdir, "poison_info.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return set(poison_lib.PoisonInfo.from_json(f.read()).poisoned_ids)


def build_report(
    workdir: str,
    out: str | None = None,
    neighbors: int = scores_lib.DEFAULT_NEIGHBORS,
    step: int | None = None,
    density_neighbors: int = neighbors_lib.DEFAULT_DENSITY_NEIGHBORS,
    block_size: int = neighbors_lib.DEFAULT_BLOCK_SIZE,
    batch_size: int = embedding_lib.DEFAULT_BATCH_SIZE,
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
  config, state = runs.restore(workdir, step)
  source, transform = embedding_lib.training_source(config)
  batches = pipeline.scoring_batches(
      config,
      source,
      batch_size=batch_size,
      image_transform=transform,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  data = embedding_lib.embed_training_set(config, state, batches, num_examples=len(source))
  pool_emb = pool_ids = None
  pool = defenses.get(config.defense).caption_pool(state.defense)
  if pool is not None:
    pool_emb = np.asarray(pool.embeddings, np.float32)
    pool_ids = np.asarray(pool.source_ids, np.int64)
  t0 = time.perf_counter()
  scores = scores_lib.score_examples(
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
  order, metrics = metrics_lib.rank_and_evaluate(scores, is_poisoned)

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
              "step": int(jax.device_get(state.step)),
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
