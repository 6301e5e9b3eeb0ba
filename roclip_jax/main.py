"""Entry point: `python -m roclip_jax.main --config=configs/demo.py --workdir=DIR`.

Flags and process setup only; the work happens in `train.train_and_evaluate`.
Overrides: `--config.optim.lr=1e-4`, variants: `--config=configs/rn50.py:defense=roclip`.

Multi-host: every process runs this same command. TPU pods and SLURM jobs
(`srun`, one task per GPU) are detected by `jax.distributed.initialize()`;
elsewhere pass `--coordinator_address=host:port --num_processes=N
--process_id=i` (see launch/). Only process 0 writes metrics, the config and
logs at INFO; checkpoints are written by all processes together (orbax).

Dry run: `--config.dry_run=True --config.dry_run_devices=256` compiles the
step for a 256-device mesh on fake CPU devices, prints per-device memory and
FLOPs, and exits without reading data.
"""

from __future__ import annotations

import json
import os
import re

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from roclip_jax import host_runtime

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Experiment config file (a get_config() module).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and TensorBoard files; reused to resume.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for multi-host runs outside TPU/SLURM.")
flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-host run (with --coordinator_address).")
flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def _use_fake_cpu_devices(count: int) -> None:
  """Makes the CPU backend expose `count` devices, for a dry run of a big mesh.

  Works because flag parsing imported jax but did not start a backend; XLA
  reads XLA_FLAGS when the first backend starts.
  """
  import jax
  from jax._src import xla_bridge

  if xla_bridge.backends_are_initialized():
    raise RuntimeError(
        "config.dry_run_devices: a jax backend started before main(); set "
        f"XLA_FLAGS=--xla_force_host_platform_device_count={count} JAX_PLATFORMS=cpu yourself."
    )
  flags_env = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
  os.environ["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={count}".strip()
  if "xla_cpu_enable_concurrency_optimized_scheduler" not in flags_env:  # See README, "Installation and platform".
    os.environ["XLA_FLAGS"] += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
  jax.config.update("jax_platforms", "cpu")


def _maybe_initialize_distributed() -> None:
  """Joins a multi-process run: explicit flags, or auto-detected TPU pod / SLURM."""
  import jax  # Imported here so XLA flags set by the launcher apply.

  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise app.UsageError("--coordinator_address needs --num_processes and --process_id too.")
    jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
  elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 or os.environ.get("TPU_WORKER_HOSTNAMES", "").count(",") > 0:
    jax.distributed.initialize()


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/roclip_jax/jax_cache"))
  host_settings = host_runtime.tune()  # Before any backend starts (roclip_jax/host_runtime.py says why).
  dry_run_devices = FLAGS.config.dry_run_devices if FLAGS.config.dry_run else 0
  if dry_run_devices:
    _use_fake_cpu_devices(dry_run_devices)  # One process, many fake devices: no distributed init.
  else:
    _maybe_initialize_distributed()
  from roclip_jax import metrics

  metrics.quiet_library_logs()
  import jax

  if jax.process_index() != 0:
    logging.set_verbosity(logging.WARNING)  # One process's INFO lines are enough.
  logging.info("Host runtime: %s", "; ".join(host_settings) or "defaults")
  from roclip_jax import train  # Heavy imports after flag parsing and distributed init.

  results = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  if jax.process_index() == 0:
    logging.info("Final results: %s", results)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in results.items()}, indent=2))


def run() -> None:
  app.run(main)


if __name__ == "__main__":
  run()
