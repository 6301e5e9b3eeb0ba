"""How much does RoCLIP's pool lookup cost next to a train step?

  python -m roclip_jax.bench.pool --config=configs/vitb32.py [--step_batch=512]

Times, on whatever devices are present, (a) the lookup a matching step runs (`RoClip.match`: the
config's variant decides CSLS and own-example exclusion, `roclip.lookup_dtype` the similarity matmul's input
dtype) plus enqueue for a batch of B embeddings, for M in --pool_sizes and d in --dims, and (b) one ViT-B/32
CLIP train step at --step_batch. If the step batch is smaller than B (a CPU cannot run B=512 ViT-B/32 steps
in reasonable time), the step time is scaled linearly to B and the output says so. The first line names the
variant, csls_k, exclusion and lookup dtype timed.

`--lookup_dtype` (or `--config.roclip.lookup_dtype`) sets the config's lookup dtype; `--shard_pool`,
`roclip.shard_pool`. `--approx_max_k` instead times a bench-private cosine top-1 (no CSLS, no exclusion)
taken with `jax.lax.approx_max_k` (TPU's partial-reduction kernel; on CPU and GPU it computes the exact
top-k). `--recall` prints the share of queries whose row under the timed lookup equals the row of the same
rule in float32 at the highest matmul precision, on random unit vectors and on clustered ones (rows and
queries near shared centres, where near-ties are common), then times as usual.
"""

from __future__ import annotations

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from roclip_jax import bench
from roclip_jax import defenses
from roclip_jax import host_runtime
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from roclip_jax.defenses import clip
from roclip_jax.defenses import roclip

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/vitb32.py", "Model/train config whose step is timed.")
flags.DEFINE_list("pool_sizes", ["21845", "65536", "262144"], "Pool sizes M.")
flags.DEFINE_list("dims", ["512", "1024"], "Embedding sizes d.")
flags.DEFINE_integer("batch", 512, "Global batch B of the lookup.")
flags.DEFINE_integer("step_batch", 512, "Batch of the timed train step (scaled to --batch if smaller).")
flags.DEFINE_integer("repeats", 5, "Timed repetitions after one warm-up call.")
flags.DEFINE_bool("shard_pool", False, "Time the sharded pool (needs several devices).")
flags.DEFINE_enum(
    "lookup_dtype", None, list(roclip.LOOKUP_DTYPES), "Sets roclip.lookup_dtype (default: the config's value)."
)
flags.DEFINE_bool("approx_max_k", False, "Cosine top-1 by jax.lax.approx_max_k (fast on TPU; exact elsewhere).")
flags.DEFINE_bool("recall", False, "Print the recall of the timed lookup against its float32 rows.")
flags.DEFINE_float("recall_target", 0.95, "approx_max_k's recall_target.")


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # Compile and warm up.
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def approx_top1(zimg: jax.Array, rows: jax.Array, dtype: str, recall_target: float) -> jax.Array:
  """[B] index of each query's most similar row by `jax.lax.approx_max_k`: the similarity matmul in `dtype`
  (float32 accumulation), plain cosine (no CSLS, no exclusion)."""
  sims = jnp.matmul(zimg.astype(dtype), rows.astype(dtype).T, preferred_element_type=jnp.float32)
  return jax.lax.approx_max_k(sims, 1, recall_target=recall_target)[1][:, 0]


def unit_rows(key: jax.Array, count: int, dim: int, *, centres: jax.Array | None = None, spread: float = 0.0):
  """`count` unit vectors: uniform on the sphere, or a random centre's direction plus Gaussian noise of
  `spread` per coordinate (relative to a unit vector's 1/sqrt(dim)), normalised."""
  noise_key, pick_key = jax.random.split(key)
  z = jax.random.normal(noise_key, (count, dim))
  if centres is not None:
    z = centres[jax.random.randint(pick_key, (count,), 0, centres.shape[0])] * dim**0.5 + spread * z
  return z / jnp.linalg.norm(z, axis=1, keepdims=True)


def lookup_defense(config, size: int, shard_pool: bool) -> roclip.RoClip:
  """The RoCLIP defense of `config` with an M-row pool; the lookup dtype and layout from the flags."""
  config = config.copy_and_resolve_references()
  config.defense = roclip.RoClip.name
  config.roclip.pool_size = size
  config.roclip.shard_pool = shard_pool
  if FLAGS.lookup_dtype is not None:
    config.roclip.lookup_dtype = FLAGS.lookup_dtype
  return roclip.RoClip(config, bench.synthetic_facts(config))


def _unit_pool(rows: jax.Array) -> roclip.Pool:
  size = rows.shape[0]
  pool = roclip.init_pool(jax.random.key(0), size, rows.shape[1])
  return pool.replace(embeddings=rows, source_ids=jnp.arange(size, dtype=jnp.int32) + 2**30)


def recall(defense: roclip.RoClip, mesh, rows: jax.Array, queries: jax.Array, approx: bool) -> float:
  """Share of queries whose timed lookup (`defense.match`, or the approx_max_k top-1) picks the row the same
  rule picks in float32 at the highest matmul precision."""
  shard_pool = defense.config.roclip.shard_pool
  exact_config = defense.config.copy_and_resolve_references()
  exact_config.roclip.lookup_dtype = "float32"
  exact = roclip.RoClip(exact_config, bench.synthetic_facts(exact_config))
  pool = jax.device_put(_unit_pool(rows), roclip.pool_shardings(mesh, shard_pool))
  ids = jax.device_put(jnp.arange(queries.shape[0]), sharding.batch_sharding(mesh))
  queries = jax.device_put(queries, sharding.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    with jax.default_matmul_precision("highest"):
      if approx:
        want = jnp.argmax(queries @ rows.T, axis=1)
      else:
        want = jax.jit(lambda p, q, i: exact.match(p, q, i, mesh).index)(pool, queries, ids)
    if approx:
      dtype = defense.config.roclip.lookup_dtype
      got = jax.jit(approx_top1, static_argnums=(2, 3))(queries, rows, dtype, FLAGS.recall_target)
    else:
      got = jax.jit(lambda p, q, i: defense.match(p, q, i, mesh).index)(pool, queries, ids)
  return float(jnp.mean(got == want))


def time_lookup(defense: roclip.RoClip, mesh, dim: int, batch: int, repeats: int) -> float:
  size, shard_pool = defense.config.roclip.pool_size, defense.config.roclip.shard_pool
  pool = jax.device_put(roclip.init_pool(jax.random.key(0), size, dim), roclip.pool_shardings(mesh, shard_pool))
  z = jax.random.normal(jax.random.key(1), (batch, dim))
  z = jax.device_put(z / jnp.linalg.norm(z, axis=1, keepdims=True), sharding.batch_sharding(mesh))
  ids = jax.device_put(jnp.arange(batch), sharding.batch_sharding(mesh))

  approx = FLAGS.approx_max_k
  if approx and shard_pool:
    raise app.UsageError("--approx_max_k times a replicated pool; drop --shard_pool.")

  @jax.jit
  def lookup_and_enqueue(pool, z, ids):
    if approx:
      rows = approx_top1(z, pool.embeddings, defense.config.roclip.lookup_dtype, FLAGS.recall_target)
      embeddings = pool.embeddings[rows]
    else:  # Exactly the call a matching step makes (the exclusion compares ids even when nothing matches).
      embeddings = defense.match(pool, z, ids, mesh).embeddings
    return embeddings, roclip.enqueue(pool, z, ids, jnp.zeros_like(ids), mesh, shard_pool)

  with jax.set_mesh(mesh):
    return _time(lookup_and_enqueue, pool, z, ids, repeats=repeats)


def time_step(config, mesh, batch: int, repeats: int) -> float:
  config = config.copy_and_resolve_references()
  config.defense = clip.PlainClip.name
  config.data.batch_size = batch
  defense = defenses.from_config(config, bench.synthetic_facts(config))
  tx, schedule = optim.make_optimizer(config.optim, total_steps=1000)
  spec = steps.ModelSpec.create(config.model)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = steps.create_train_state(config, mesh, tx, shardings, defense)
  step = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense)["clip"]
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
  host_runtime.tune()  # What the trainer runs with (roclip_jax/host_runtime.py).
  mesh = sharding.make_mesh([("data", -1)])
  config = FLAGS.config
  device = jax.devices()[0]
  described = lookup_defense(config, int(FLAGS.pool_sizes[0]), FLAGS.shard_pool)
  rc, dtype = described.settings(), described.config.roclip.lookup_dtype
  if FLAGS.approx_max_k:
    lookup = f"bench-private cosine top-1 by approx_max_k (recall_target {FLAGS.recall_target}), {dtype} similarities"
  else:
    lookup = (
        f"RoClip.match: variant {rc.variant}, csls_k={rc.csls_k}, exclude_own={rc.exclude_own}, "
        f"lookup_dtype={dtype}"
    )
  print(
      f"Devices: {jax.device_count()} x {device.device_kind} ({device.platform}); model {config.model.image.type} "
      f"image {config.model.image.image_size}px, embed {config.model.embed_dim}; "
      f"{'sharded' if FLAGS.shard_pool else 'replicated'} pool; lookup {lookup}"
  )
  if FLAGS.recall:
    for size in map(int, FLAGS.pool_sizes):
      defense = lookup_defense(config, size, FLAGS.shard_pool)
      for dim in map(int, FLAGS.dims):
        keys = jax.random.split(jax.random.key(2), 4)
        uniform = recall(
            defense, mesh, unit_rows(keys[0], size, dim), unit_rows(keys[1], FLAGS.batch, dim), FLAGS.approx_max_k
        )
        # 64 clusters whose members sit at cosine ~0.8 to their centre, so many rows are near-ties.
        centres = unit_rows(keys[2], 64, dim)
        rows, queries = (
            unit_rows(k, n, dim, centres=centres, spread=0.75)
            for k, n in zip(jax.random.split(keys[3]), (size, FLAGS.batch))
        )
        clustered = recall(defense, mesh, rows, queries, FLAGS.approx_max_k)
        print(f"recall vs the float32 lookup, M={size} d={dim}: random {uniform:.4f}, clustered {clustered:.4f}")
  step_s = time_step(config, mesh, FLAGS.step_batch, FLAGS.repeats)
  scaled = step_s * FLAGS.batch / FLAGS.step_batch
  note = "" if FLAGS.step_batch == FLAGS.batch else f" (measured at B={FLAGS.step_batch}, scaled linearly)"
  print(f"CLIP train step at B={FLAGS.batch}: {scaled * 1e3:,.1f} ms{note}")
  print(f"{'M':>8} {'d':>5} {'lookup+enqueue ms':>18} {'share of step':>14}")
  for size in map(int, FLAGS.pool_sizes):
    defense = lookup_defense(config, size, FLAGS.shard_pool)
    for dim in map(int, FLAGS.dims):
      t = time_lookup(defense, mesh, dim, FLAGS.batch, FLAGS.repeats)
      print(f"{size:>8} {dim:>5} {t * 1e3:>18.2f} {100 * t / (scaled + t):>13.2f}%")


if __name__ == "__main__":
  app.run(main)
