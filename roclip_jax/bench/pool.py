"""How much does RoCLIP's pool lookup cost next to a train step?

  python -m roclip_jax.bench.pool --config=configs/vitb32.py [--step_batch=512]

Times, on whatever devices are present, (a) one jitted pool query (top-1 over
M rows) plus enqueue for a batch of B embeddings, for M in --pool_sizes and
d in --dims, and (b) one ViT-B/32 CLIP train step at --step_batch. If the step
batch is smaller than B (a CPU cannot run B=512 ViT-B/32 steps in reasonable
time), the step time is scaled linearly to B and the output says so.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from roclip_jax.defenses import roclip

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/vitb32.py", "Model/train config whose step is timed.")
flags.DEFINE_list("pool_sizes", ["21845", "65536", "262144"], "Pool sizes M.")
flags.DEFINE_list("dims", ["512", "1024"], "Embedding sizes d.")
flags.DEFINE_integer("batch", 512, "Global batch B of the lookup.")
flags.DEFINE_integer("step_batch", 512, "Batch of the timed train step (scaled to --batch if smaller).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions after one warm-up call.")
flags.DEFINE_bool("shard_pool", False, "Time the sharded pool (needs several devices).")


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def time_lookup(mesh, size: int, dim: int, batch: int, shard_pool: bool, repeats: int) -> float:
  pool = jax.device_put(roclip.init_pool(jax.random.key(0), size, dim), roclip.pool_shardings(mesh, shard_pool))
  z = jax.random.normal(jax.random.key(1), (batch, dim))
  z = jax.device_put(z / jnp.linalg.norm(z, axis=1, keepdims=True), sharding.batch_sharding(mesh))
  ids = jax.device_put(jnp.arange(batch), sharding.batch_sharding(mesh))

  @jax.jit
  def lookup_and_enqueue(pool, z, ids):
    match = roclip.nearest_captions(pool, z, mesh, shard_pool)
    return match.embeddings, roclip.enqueue(pool, z, ids, jnp.zeros_like(ids), mesh, shard_pool)

  with jax.set_mesh(mesh):
    return _time(lookup_and_enqueue, pool, z, ids, repeats=repeats)


def time_step(config, mesh, batch: int, repeats: int) -> float:
  config = config.copy_and_resolve_references()
  config.defense = "none"
  config.data.batch_size = batch
  tx, schedule = optim.make_optimizer(config.optim, total_steps=1000)
  spec = steps.ModelSpec.create(config.model)
  _, shardings = steps.abstract_train_state(config, mesh, tx)
  state = steps.create_train_state(config, mesh, tx, shardings)
  step = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings)["clip"]
  size, ctx = config.model.image.image_size, config.model.text.context_length
  rng = np.random.default_rng(0)
  local = {
      "image": rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
      "text": rng.integers(1, 49407, (batch, ctx)).astype(np.int32),
      "id": np.arange(batch, dtype=np.int64),
      "label": np.zeros(batch, np.int64),
      "poisoned": np.zeros(batch, np.int8),
  }
  data = sharding.global_batch(local, mesh)
  holder = [state]

  def run(data):
    holder[0], metrics = step(holder[0], data)
    return metrics["loss"]

  with jax.set_mesh(mesh):
    return _time(run, data, repeats=repeats)


def main(argv) -> None:
  del argv
  mesh = sharding.make_mesh([("data", -1)])
  config = FLAGS.config
  device = jax.devices()[0]
  print(
      f"Devices: {jax.device_count()} x {device.device_kind} ({device.platform}); model {config.model.image.type} "
      f"image {config.model.image.image_size}px, embed {config.model.embed_dim}; "
      f"{'sharded' if FLAGS.shard_pool else 'replicated'} pool"
  )
  step_s = time_step(config, mesh, FLAGS.step_batch, FLAGS.repeats)
  scaled = step_s * FLAGS.batch / FLAGS.step_batch
  note = "" if FLAGS.step_batch == FLAGS.batch else f" (measured at B={FLAGS.step_batch}, scaled linearly)"
  print(f"CLIP train step at B={FLAGS.batch}: {scaled * 1e3:,.1f} ms{note}")
  print(f"{'M':>8} {'d':>5} {'lookup+enqueue ms':>18} {'share of step':>14}")
  for size in map(int, FLAGS.pool_sizes):
    for dim in map(int, FLAGS.dims):
      t = time_lookup(mesh, size, dim, FLAGS.batch, FLAGS.shard_pool, FLAGS.repeats)
      print(f"{size:>8} {dim:>5} {t * 1e3:>18.2f} {100 * t / (scaled + t):>13.2f}%")


if __name__ == "__main__":
  app.run(main)
