"""Time and peak memory of the suspicion report's scores on synthetic embeddings.

  python -m roclip_jax.bench.suspicion [--num_examples=50000] [--dim=64] [--pool_size=4096] [--block_size=4096]

Draws N random unit image and caption embeddings and a RoCLIP pool of M rows (ids drawn from the
examples', a tenth of the rows random initial ones), then runs
`suspicion.score_examples` (every score: two N x N neighbour searches, k = 16 density
neighbours and 10 caption neighbours, and the pool's top-1) once, and prints its wall time and the
peak host memory it added (ru_maxrss of this process after minus before, so the embeddings
themselves are not counted), plus the device's peak bytes where the backend reports them. The
embedding pass over the images (the other half of the report) is not part of this benchmark.
"""

from __future__ import annotations

import resource
import time
from typing import Any, Callable

from absl import app
from absl import flags
import numpy as np

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_examples", 50_000, "Training examples N.")
flags.DEFINE_integer("dim", 64, "Embedding size d.")
flags.DEFINE_integer("pool_size", 4096, "RoCLIP pool rows M (0: no pool).")
flags.DEFINE_integer("block_size", 4096, "Queries and keys per block of the on-device search.")
flags.DEFINE_integer("seed", 0, "Seed of the synthetic embeddings.")


def synthetic_embeddings(num_examples: int, dim: int, pool_size: int, seed: int) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  unit = lambda rows: (lambda x: (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32))(
      rng.normal(size=(rows, dim))
  )
  ids = np.arange(num_examples, dtype=np.int64)
  pool_ids = rng.choice(ids, pool_size)
  pool_ids[: pool_size // 10] = -1
  return {
      "image_emb": unit(num_examples),
      "caption_emb": unit(num_examples),
      "ids": ids,
      "pool_emb": unit(pool_size) if pool_size else None,
      "pool_ids": pool_ids if pool_size else None,
  }


def _peak_rss_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB.


def measure(score_fn: Callable[..., dict[str, np.ndarray]], inputs: dict[str, Any], **kwargs) -> dict[str, float]:
  """Runs `score_fn(**inputs, **kwargs)` once: seconds and the peak host memory it added (MiB)."""
  before = _peak_rss_mib()
  t0 = time.perf_counter()
  scores = score_fn(**inputs, **kwargs)
  seconds = time.perf_counter() - t0
  assert all(len(v) == len(inputs["ids"]) for v in scores.values())
  return {"seconds": seconds, "added_peak_rss_mib": _peak_rss_mib() - before}


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  from roclip_jax import suspicion  # pylint: disable=g-import-not-at-top

  inputs = synthetic_embeddings(FLAGS.num_examples, FLAGS.dim, FLAGS.pool_size, FLAGS.seed)
  jax.block_until_ready(jax.numpy.zeros(1))  # Start the backend before the baseline is taken.
  result = measure(suspicion.score_examples, inputs, block_size=FLAGS.block_size)
  stats = jax.local_devices()[0].memory_stats() or {}
  device_peak = stats.get("peak_bytes_in_use")
  print(
      f"N={FLAGS.num_examples} d={FLAGS.dim} M={FLAGS.pool_size} block_size={FLAGS.block_size} "
      f"on {jax.local_devices()[0].platform}: {result['seconds']:.1f} s, "
      f"+{result['added_peak_rss_mib']:.0f} MiB peak host memory"
      + (f", {device_peak / 2**20:.0f} MiB peak device memory" if device_peak else "")
  )


if __name__ == "__main__":
  app.run(main)
