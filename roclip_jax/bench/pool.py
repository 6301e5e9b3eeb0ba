"""How much does RoCLIP's pool lookup cost next to a train step?

  python -m roclip_jax.bench.pool --config=configs/vitb32.py [--step_batch=512]

Times, on whatever devices are present, (a) one jitted pool query (top-1 over
M rows) plus enqueue for a batch of B embeddings, for M in --pool_sizes and
d in --dims, and (b) one ViT-B/32 CLIP train step at --step_batch. If the step
batch is smaller than B (a CPU cannot run B=512 ViT-B/32 steps in reasonable
time), the step time is scaled linearly to B and the output says so.

Lookup options (the bench's own top-1; `--lookup_dtype=float32 --noapprox_max_k`, the defaults, time
`roclip.nearest_captions` itself): `--lookup_dtype=bfloat16` runs the [B, d] x [d, M] similarity matmul in
bfloat16 with float32 accumulation; `--approx_max_k` takes the top-1 with `jax.lax.approx_max_k` (TPU's
partial-reduction kernel; on CPU and GPU it computes the exact top-k). `--recall` prints the recall of that
top-1 against the exact float32 top-1 on random unit vectors and on clustered ones (rows and queries
near shared centres, where near-ties are common), then times as usual.
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
flags.DEFINE_enum("lookup_dtype", "float32", ["float32", "bfloat16"], "Similarity matmul dtype of the lookup.")
flags.DEFINE_bool("approx_max_k", False, "Top-1 with jax.lax.approx_max_k (fast on TPU; exact elsewhere).")
flags.DEFINE_bool("recall", False, "Print the top-1 recall of the lookup options against exact float32.")
flags.DEFINE_float("recall_target", 0.95, "approx_max_k's recall_target.")


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def top1(zimg: jax.Array, rows: jax.Array, dtype: str, approx: bool, recall_target: float = 0.95) -> jax.Array:
  """[B] index of each query's most similar row: the similarity matmul in `dtype` (float32 accumulation),
  the top-1 by argmax or `jax.lax.approx_max_k`."""
  sims = jnp.matmul(zimg.astype(dtype), rows.astype(dtype).T, preferred_element_type=jnp.float32)
  if approx:
    return jax.lax.approx_max_k(sims, 1, recall_target=recall_target)[1][:, 0]
  return jnp.argmax(sims, axis=1)


def unit_rows(key: jax.Array, count: int, dim: int, *, centres: jax.Array | None = None, spread: float = 0.0):
  """`count` unit vectors: uniform on the sphere, or a random centre's direction plus Gaussian noise of
  `spread` per coordinate (relative to a unit vector's 1/sqrt(dim)), normalised."""
  noise_key, pick_key = jax.random.split(key)
  z = jax.random.normal(noise_key, (count, dim))
  if centres is not None:
    z = centres[jax.random.randint(pick_key, (count,), 0, centres.shape[0])] * dim**0.5 + spread * z
  return z / jnp.linalg.norm(z, axis=1, keepdims=True)


def recall(rows: jax.Array, queries: jax.Array, dtype: str, approx: bool, recall_target: float) -> float:
  """Share of queries whose top-1 (`top1`) is the exact float32 argmax row."""
  with jax.default_matmul_precision("highest"):
    exact = jnp.argmax(queries @ rows.T, axis=1)
  got = jax.jit(top1, static_argnums=(2, 3, 4))(queries, rows, dtype, approx, recall_target)
  return float(jnp.mean(got == exact))


def time_lookup(mesh, size: int, dim: int, batch: int, shard_pool: bool, repeats: int) -> float:
  pool = jax.device_put(roclip.init_pool(jax.random.key(0), size, dim), roclip.pool_shardings(mesh, shard_pool))
  z = jax.random.normal(jax.random.key(1), (batch, dim))
  z = jax.device_put(z / jnp.linalg.norm(z, axis=1, keepdims=True), sharding.batch_sharding(mesh))
  ids = jax.device_put(jnp.arange(batch), sharding.batch_sharding(mesh))

  dtype, approx = FLAGS.lookup_dtype, FLAGS.approx_max_k
  if (dtype != "float32" or approx) and shard_pool:
    raise app.UsageError("--lookup_dtype=bfloat16 / --approx_max_k time a replicated pool; drop --shard_pool.")

  @jax.jit
  def lookup_and_enqueue(pool, z, ids):
    if dtype == "float32" and not approx:
      embeddings = roclip.nearest_captions(pool, z, mesh, shard_pool).embeddings
    else:
      embeddings = pool.embeddings[top1(z, pool.embeddings, dtype, approx, FLAGS.recall_target)]
    return embeddings, roclip.enqueue(pool, z, ids, jnp.zeros_like(ids), mesh, shard_pool)

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
      f"{'sharded' if FLAGS.shard_pool else 'replicated'} pool; lookup {FLAGS.lookup_dtype} similarities, "
      f"top-1 by {'approx_max_k' if FLAGS.approx_max_k else 'argmax'}"
  )
  if FLAGS.recall:
    for size in map(int, FLAGS.pool_sizes):
      for dim in map(int, FLAGS.dims):
        keys = jax.random.split(jax.random.key(2), 4)
        uniform = recall(
            unit_rows(keys[0], size, dim),
            unit_rows(keys[1], FLAGS.batch, dim),
            FLAGS.lookup_dtype,
            FLAGS.approx_max_k,
            FLAGS.recall_target,
        )
        # 64 clusters whose members sit at cosine ~0.8 to their centre, so many rows are near-ties.
        centres = unit_rows(keys[2], 64, dim)
        rows, queries = (
            unit_rows(k, n, dim, centres=centres, spread=0.75)
            for k, n in zip(jax.random.split(keys[3]), (size, FLAGS.batch))
        )
        clustered = recall(rows, queries, FLAGS.lookup_dtype, FLAGS.approx_max_k, FLAGS.recall_target)
        print(f"top-1 recall vs exact float32, M={size} d={dim}: random {uniform:.4f}, clustered {clustered:.4f}")
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
