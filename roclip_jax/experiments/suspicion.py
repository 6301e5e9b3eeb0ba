"""Poison-suspicion report: rank a run's training examples by how suspicious they look.

  python -m roclip_jax.experiments.suspicion --workdir=RUN [--out=RUN/suspicion.csv] [--block_size=4096]

Writes the ranked CSV and its metrics (`.json`) and prints the metrics. The report, its scores and
how it scales: `roclip_jax/suspicion/` (`suspicion.build_report`).
"""

from __future__ import annotations

from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging

from roclip_jax import host_runtime
from roclip_jax import suspicion
from roclip_jax.suspicion import embedding
from roclip_jax.suspicion import neighbors
from roclip_jax.suspicion import scores

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Only when run as a program: importing this module (tests, notebooks) must not
  claim flag names such as --workdir that the trainer's entry points define too."""
  flags.DEFINE_string("workdir", None, "The training run to inspect (its --workdir).")
  flags.DEFINE_string("out", None, "Ranked CSV to write (default: WORKDIR/suspicion.csv).")
  flags.DEFINE_integer("neighbors", scores.DEFAULT_NEIGHBORS, "Nearest captions averaged by caption_atypicality.")
  flags.DEFINE_integer(
      "density_neighbors",
      neighbors.DEFAULT_DENSITY_NEIGHBORS,
      "Nearest images (k) of the density scores k_distance, slof and lof.",
  )
  flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
  flags.DEFINE_integer(
      "block_size",
      neighbors.DEFAULT_BLOCK_SIZE,
      "Queries and keys per block of the on-device nearest-neighbour search: device memory is "
      "the keys plus one [block_size, block_size] float32 block.",
  )
  flags.DEFINE_integer(
      "batch_size",
      embedding.DEFAULT_BATCH_SIZE,
      "Examples per host per batch of the embedding pass (a multiple of the local device count).",
  )


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required: the --workdir of a finished or checkpointed training run.")
  host_runtime.tune()
  report = suspicion.build_report(
      FLAGS.workdir,
      FLAGS.out,
      neighbors=FLAGS.neighbors,
      step=FLAGS.step,
      density_neighbors=FLAGS.density_neighbors,
      block_size=FLAGS.block_size,
      batch_size=FLAGS.batch_size,
  )
  logging.info("Wrote %s", report.csv_path)
  print(suspicion.format_metrics(report))
  print(f"Ranked examples: {report.csv_path}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
