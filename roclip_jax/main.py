"""Entry point: `python -m roclip_jax.main --config=configs/demo.py --workdir=DIR`.

Flags and process setup only; the work happens in `train.train_and_evaluate`.
Overrides: `--config.optim.lr=1e-4`, variants: `--config=configs/rn50.py:defense=roclip`.
"""
from __future__ import annotations

import json
import os

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (a get_config() module).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard files; reused to resume.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _maybe_initialize_distributed() -> None:
  """Joins a multi-process run: explicit flags, or auto-detected TPU pod / SLURM."""
  import jax  # Imported here so XLA flags set by the launcher apply.
  if FLAGS.coordinator_address:
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/roclip_jax/jax_cache"))
  _maybe_initialize_distributed()
  from roclip_jax import metrics
  metrics.quiet_library_logs()
  from roclip_jax import train  # Heavy imports after flag parsing and distributed init.
  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  import jax
  if jax.process_index() == 0:
    logging.info("Final results: %s", results)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}, indent=2))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
