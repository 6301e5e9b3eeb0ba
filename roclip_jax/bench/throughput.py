r"""Training throughput of the real train step on synthetic batches, with MFU and RoCLIP's lookup share.

  python -m roclip_jax.bench.throughput --config=configs/vitb32.py                # the config's batch
  python -m roclip_jax.bench.throughput --config=configs/vitb32.py:bf16 --batch=1024 --steps=20
  python -m roclip_jax.bench.throughput --config=configs/vitb32.py --preset=tiny --batch=64   # CPU-sized

Builds exactly the step the trainer runs (`steps.make_train_steps`: mesh and FSDP rules from the config,
explicit shardings, donation, `grad_accum_steps`, bf16/remat), feeds it random uint8 images and int32
tokens (no data pipeline) and reports:

* compile time and steps/s of the CLIP step; pairs/s per device;
* MFU: 3 x `models.flops_per_pair` x batch per step (forward + backward matmuls) over the device's peak
  (a table of bf16 dense peaks by device kind; on a CPU, a measured matmul peak in the config's dtype);
* peak device memory (`memory_stats()` where the backend has it, else XLA's compile-time estimate);
* RoCLIP's cost: a matching step against a CLIP step at the same config, and the pool lookup plus
  enqueue alone, as a share of the matching step;
* on CPU, the same training step in PyTorch with Hugging Face's `CLIPModel` (AdamW, CLIP loss, same
  architecture and batch), timed in alternating rounds with ours (`--rounds`), and the ratio of the two
  step times: the median over rounds, with the lowest and highest round;
* the host settings the trainer applies (roclip_jax/host_runtime.py) and the minor page faults per CLIP
  step; with `--breakdown`, the CLIP step's op time by phase and its largest ops (`bench.step_profile`).

`ROCLIP_JAX_HOST_TUNING=0` times the step without the host settings (the "before" of
docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import resource
import time
from typing import Any, Callable

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from roclip_jax import bench
from roclip_jax import config_lib
from roclip_jax import host_runtime
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from roclip_jax.bench import step_profile
from roclip_jax.data import image_ops
from roclip_jax.models import layers
from roclip_jax.defenses import roclip

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/vitb32.py", "Experiment config whose train step is timed.")
flags.DEFINE_string(
    "preset", None, "Replace config.model by this preset (keeping dtype/remat/attention_impl), e.g. 'tiny'."
)
flags.DEFINE_integer("batch", None, "Global batch (default: config.data.batch_size).")
flags.DEFINE_integer("steps", 10, "Timed steps per measurement, after warm-up.")
flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
flags.DEFINE_bool("breakdown", False, "Also profile the CLIP step: op time by phase and the largest ops.")
flags.DEFINE_integer("rounds", 5, "Alternating rounds of the PyTorch comparison (each times --steps steps per side).")
flags.DEFINE_enum("torch", "auto", ["auto", "on", "off"], "PyTorch/HF comparison (auto: on CPU only).")

# Dense bf16 peak FLOP/s per device (vendor figures; H100/H200 SXM without sparsity). Matched in order
# against `device.device_kind`, so more specific names come first.
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("TPU v6 lite", 918e12),
    ("TPU v6e", 918e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5p", 459e12),
    ("TPU v5", 459e12),
    ("TPU v4", 275e12),
    ("TPU v3", 123e12),
)


def peak_flops(device: Any) -> float | None:
  kind = device.device_kind
  return next((peak for name, peak in PEAK_FLOPS if name.lower() in kind.lower()), None)


def measured_matmul_peak(dtype: Any, size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of one large jitted matmul on the default device: a practical peak for CPUs."""
  a = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(repeats):
    out = matmul(a)
  out.block_until_ready()
  return repeats * 2 * size**3 / (time.perf_counter() - t0)


def synthetic_batch(config: ml_collections.ConfigDict, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Random images and captions shaped like the pipeline's (BOS, words, EOT, zero padding)."""
  rng = np.random.default_rng(seed)
  size, length = config.model.image.image_size, config.model.text.context_length
  vocab = config.model.text.vocab_size
  tokens = rng.integers(1, vocab - 2, size=(batch, length)).astype(np.int32)
  ends = rng.integers(2, length, size=batch)  # EOT position; the rest is padding.
  tokens[:, 0] = vocab - 2
  tokens[np.arange(batch), ends] = vocab - 1
  tokens[np.arange(length)[None, :] > ends[:, None]] = 0
  return {
      "image": rng.integers(0, 256, size=(batch, size, size, 3), dtype=np.uint8),
      "text": tokens,
      "id": np.arange(batch, dtype=np.int32),
      "label": np.zeros(batch, np.int32),
      "poisoned": np.zeros(batch, np.int8),
  }


def seconds_per_call(fn: Callable[[], Any], steps: int, warmup: int) -> float:
  """Median wall time of `steps` calls, each waited for: robust to a shared, noisy machine."""
  return timed_calls(fn, steps, warmup)[0]


def timed_calls(fn: Callable[[], Any], steps: int, warmup: int) -> tuple[float, float]:
  """(median seconds per call, minor page faults per call) over `steps` calls after `warmup` untimed ones.

  Minor faults count the pages the process touched for the first time (the kernel zero-fills each):
  a step that reuses its memory has almost none (roclip_jax/host_runtime.py).
  """
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
  return float(np.median(times)), faults


@dataclasses.dataclass
class JaxResult:
  compile_seconds: float
  clip_step_seconds: float
  clip_step_page_faults: float
  match_step_seconds: float
  lookup_seconds: float
  peak_memory_bytes: int | None
  memory_source: str
  breakdown: step_profile.Breakdown | None  # The CLIP step's op times by phase (--breakdown).
  clip_call: Callable[[], Any]  # One more CLIP step (for the interleaved PyTorch comparison).


def bench_jax(config: ml_collections.ConfigDict, steps_timed: int, warmup: int, breakdown: bool = False) -> JaxResult:
  """Compiles and times the CLIP and RoCLIP matching steps, and the pool lookup alone."""
  mesh = sharding.make_mesh(config.mesh)
  defense = roclip.RoClip(config, bench.synthetic_facts(config))
  tx, schedule = optim.make_optimizer(config.optim, total_steps=10_000)
  spec = steps.ModelSpec.create(config.model)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  fns = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense)
  holder = {"state": steps.create_train_state(config, mesh, tx, shardings, defense)}
  batch = sharding.global_batch(synthetic_batch(config, config.data.batch_size), mesh)

  with jax.set_mesh(mesh):
    t0 = time.perf_counter()
    compiled = {name: fn.lower(holder["state"], batch).compile() for name, fn in fns.items()}
    compile_seconds = (time.perf_counter() - t0) / len(compiled)

    def run(name: str) -> Callable[[], Any]:
      def call():
        holder["state"], metrics = compiled[name](holder["state"], batch)  # The state is donated.
        return metrics["loss"]

      return call

    clip_s, clip_faults = timed_calls(run("clip"), steps_timed, warmup)
    profile = step_profile.profile_calls(compiled["clip"], run("clip")) if breakdown else None
    match_s = seconds_per_call(run("match"), steps_timed, warmup)
    shard_pool = bool(config.roclip.shard_pool)
    zimg = jax.device_put(
        np.asarray(jax.random.normal(jax.random.key(1), (config.data.batch_size, config.model.embed_dim))),
        sharding.batch_sharding(mesh),
    )

    @jax.jit
    def lookup(pool, z, ids, poisoned):  # What a matching step adds: the config's lookup, then the enqueue.
      z = z / jnp.linalg.norm(z, axis=1, keepdims=True)
      match = defense.match(pool, z, ids, mesh)
      return match.index, roclip.enqueue(pool, z, ids, poisoned, mesh, shard_pool, config.roclip.fifo)

    lookup_s = seconds_per_call(
        lambda: lookup(holder["state"].defense, zimg, batch["id"], batch["poisoned"]), steps_timed, warmup
    )

  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    peak, source = int(stats["peak_bytes_in_use"]), "memory_stats"
  else:
    a = compiled["clip"].memory_analysis()
    peak = (
        None
        if a is None
        else max(
            int(getattr(a, "peak_memory_in_bytes", 0) or 0),
            a.argument_size_in_bytes + a.output_size_in_bytes - a.alias_size_in_bytes + a.temp_size_in_bytes,
        )
    )
    source = "XLA's compile-time estimate for the CLIP step"
  return JaxResult(compile_seconds, clip_s, clip_faults, match_s, lookup_s, peak, source, profile, run("clip"))


def torch_step(config: ml_collections.ConfigDict) -> Callable[[], Any]:
  """One training step of Hugging Face's `CLIPModel` (PyTorch, CPU) at the same size and batch, as a call."""
  import torch
  import transformers

  model_cfg = config.model
  if model_cfg.image.type != "vit":
    raise ValueError("The PyTorch comparison covers ViT image towers only; use a ViT preset.")
  text, image = model_cfg.text, model_cfg.image
  hf_config = transformers.CLIPConfig(
      text_config=dict(
          vocab_size=text.vocab_size,
          hidden_size=text.width,
          intermediate_size=models.mlp_width(text),
          num_hidden_layers=text.layers,
          num_attention_heads=text.heads,
          max_position_embeddings=text.context_length,
          hidden_act=model_cfg.act,
          projection_dim=model_cfg.embed_dim,
      ),
      vision_config=dict(
          hidden_size=image.width,
          intermediate_size=models.mlp_width(image),
          num_hidden_layers=image.layers,
          num_attention_heads=image.heads,
          image_size=image.image_size,
          patch_size=image.patch_size,
          hidden_act=model_cfg.act,
          projection_dim=model_cfg.embed_dim,
      ),
      projection_dim=model_cfg.embed_dim,
  )
  torch.manual_seed(0)
  model = transformers.CLIPModel(hf_config).train()
  o = config.optim
  optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay)
  batch = synthetic_batch(config, config.data.batch_size)
  pixels = torch.from_numpy(np.ascontiguousarray(image_ops.normalize(batch["image"]).transpose(0, 3, 1, 2)))
  tokens = torch.from_numpy(batch["text"].astype(np.int64))

  def step():
    optimizer.zero_grad(set_to_none=True)
    loss = model(input_ids=tokens, pixel_values=pixels, return_loss=True).loss  # Symmetric InfoNCE.
    loss.backward()
    optimizer.step()
    return loss

  return step  # Torch on CPU is synchronous: the call returns when the step is done.


def interleaved_ratio(ours: Callable[[], Any], theirs: Callable[[], Any], rounds: int, steps: int, warmup: int):
  """Per round, the median step time of each side over `steps` steps, the two sides taking turns.

  A shared machine's load drifts over minutes; timing the sides in alternation exposes both to the same
  load, and the median over rounds of the per-round ratio ignores a round that one side had to itself.
  Returns (median ratio ours/theirs, lowest, highest, our median seconds, their median seconds).
  """
  ratios, ours_s, theirs_s = [], [], []
  for round_index in range(rounds):
    a = seconds_per_call(ours, steps, warmup if round_index == 0 else 1)
    b = seconds_per_call(theirs, steps, warmup if round_index == 0 else 1)
    ratios.append(a / b)
    ours_s.append(a)
    theirs_s.append(b)
  return float(np.median(ratios)), min(ratios), max(ratios), float(np.median(ours_s)), float(np.median(theirs_s))


def bench_config(base: ml_collections.ConfigDict, preset: str | None, batch: int | None) -> ml_collections.ConfigDict:
  """The config to time: RoCLIP on (for the matching step), optional model preset and batch."""
  config = base.copy_and_resolve_references()
  if preset:
    dtype, remat = config.model.dtype, config.model.remat
    impl = models.attention_impl(config.model)  # A runtime choice, like dtype: the preset keeps it.
    config.model = models.preset(preset)
    config.model.update(dict(dtype=dtype, remat=remat, attention_impl=impl))
  if batch:
    config.data.batch_size = batch
  config.defense = roclip.RoClip.name
  config.roclip.pool_size = max(config.roclip.pool_size, config.data.batch_size)
  config.data.source = "demo"  # Batches are synthetic: no source is read, so none needs configuring.
  mesh = sharding.make_mesh(config.mesh)
  config_lib.validate(config, sharding.num_batch_shards(mesh))
  return config


def attention_kernels(model_cfg: ml_collections.ConfigDict) -> str:
  """What `model.attention_impl` runs on this host per transformer tower, e.g. 'auto -> cudnn'."""
  dtype = models.COMPUTE_DTYPES[model_cfg.dtype]
  impl = models.attention_impl(model_cfg)
  towers = [("text", model_cfg.text)] + ([("image", model_cfg.image)] if model_cfg.image.type == "vit" else [])
  kernels = {name: layers.attention_kernel(impl, dtype, tower.width // tower.heads) for name, tower in towers}
  if len(set(kernels.values())) == 1:
    return f"{impl} -> {next(iter(kernels.values()))}"
  return f"{impl} -> " + ", ".join(f"{name} {kernel}" for name, kernel in kernels.items())


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  host_settings = host_runtime.tune()  # What the trainer runs with (roclip_jax/host_runtime.py).
  config = bench_config(FLAGS.config, FLAGS.preset, FLAGS.batch)
  devices = jax.devices()
  device = devices[0]
  n, b = len(devices), config.data.batch_size
  m = config.model
  print(
      f"devices: {n} x {device.device_kind} ({device.platform}); model {FLAGS.preset or 'from config'} "
      f"({m.image.type} {m.image.image_size}px, embed {m.embed_dim}, {m.dtype}, remat={m.remat}, "
      f"attention {attention_kernels(m)}); "
      f"global batch {b}; mesh {tuple(map(tuple, config.mesh))}; grad_accum_steps {config.grad_accum_steps}; "
      f"pool {config.roclip.pool_size} ({'sharded' if config.roclip.shard_pool else 'replicated'})"
  )

  result = bench_jax(config, FLAGS.steps, FLAGS.warmup, FLAGS.breakdown)
  step_s = result.clip_step_seconds
  flops_per_step = 3 * models.flops_per_pair(m) * b
  achieved = flops_per_step / step_s / n
  print(f"compile: {result.compile_seconds:.1f} s per step function")
  print(f"CLIP step: {step_s * 1e3:.1f} ms = {1 / step_s:.2f} steps/s, {b / step_s / n:,.1f} pairs/s per device")
  if result.breakdown is not None:
    print(result.breakdown.format(step_s))
  print(
      f"host: {'; '.join(host_settings) or 'defaults'}; {result.clip_step_page_faults:,.0f} minor page faults per step"
  )
  print(
      f"model FLOPs: {flops_per_step:.3e} per step (3 x {models.flops_per_pair(m):.3e} per pair x {b}); "
      f"{achieved:.3e} FLOP/s per device"
  )
  peak = peak_flops(device)
  if peak is not None:
    print(f"MFU: {100 * achieved / peak:.1f}% of {peak:.3g} FLOP/s ({device.device_kind} bf16 dense peak)")
  elif device.platform == "cpu":
    measured = measured_matmul_peak(jnp.dtype(m.dtype))
    print(
        f"MFU: n/a on CPU (no rated peak); {100 * achieved / measured:.1f}% of a measured {m.dtype} matmul "
        f"peak of {measured:.3g} FLOP/s"
    )
  else:
    print(f"MFU: n/a (no peak FLOP/s known for {device.device_kind!r}; add it to PEAK_FLOPS)")
  memory = "n/a" if result.peak_memory_bytes is None else f"{result.peak_memory_bytes / 2**30:.3f} GiB"
  print(f"peak memory per device: {memory} ({result.memory_source})")
  match_s, lookup_s = result.match_step_seconds, result.lookup_seconds
  described = roclip.RoClip(config, bench.synthetic_facts(config)).describe()
  print(
      f"RoCLIP matching step ({described}): {match_s * 1e3:.1f} ms "
      f"({match_s / step_s:.2f}x the CLIP step; it skips the text backward); its pool lookup + enqueue alone: "
      f"{lookup_s * 1e3:.2f} ms = "
      f"{100 * lookup_s / match_s:.1f}% of the matching step"
  )

  if FLAGS.torch == "on" or (FLAGS.torch == "auto" and device.platform == "cpu"):
    try:
      theirs = torch_step(config)
    except ImportError as e:
      print(f"PyTorch comparison skipped: {e} (pip install torch==2.13.0 for the CPU build).")
    else:
      import torch

      ratio, low, high, ours_s, theirs_s = interleaved_ratio(
          result.clip_call, theirs, FLAGS.rounds, FLAGS.steps, FLAGS.warmup
      )
      print(
          f"PyTorch {torch.__version__} + HF CLIPModel, same model and batch, AdamW, {torch.get_num_threads()} "
          f"threads, {FLAGS.rounds} alternating rounds of {FLAGS.steps} steps: ours {ours_s * 1e3:.1f} ms, "
          f"PyTorch {theirs_s * 1e3:.1f} ms per step; ours / PyTorch = {ratio:.2f} (rounds {low:.2f}-{high:.2f})"
      )


if __name__ == "__main__":
  app.run(main)
