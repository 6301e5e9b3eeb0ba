"""Train state and the jitted train step, shared by every defense.

One step function, parametrised by the run's `defenses.Defense` and one of its
`StepKind`s: the step encodes the views the kind names, hands the unit
embeddings to the defense's loss, applies the optimizer, then lets the defense
update its own state (a pool or bank of embeddings, say) and counters. This file
names no defense (docs/architecture.md). The trainer compiles one step per
kind and picks one on the host per epoch. Nothing here reads a value back to
the host.

Scale: parameters and Adam moments are placed by `sharding.py`'s rules (FSDP
over the `fsdp` mesh axis) and GSPMD inserts the gathers; `grad_accum_steps`
splits the batch into micro-batches with the exact full-batch gradient for
every defense; `aot_compile` compiles the steps from shapes alone (the dry run).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from roclip_jax import defenses
from roclip_jax import losses
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding as sharding_lib
from roclip_jax.data import augment
from roclip_jax.data import image_ops
from roclip_jax.models import text as text_lib

ModelSpec = models.ModelSpec
StepKind = defenses.StepKind


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]
  params: dict[str, Any]  # nnx.Param values as a plain nested dict (orbax- and notebook-friendly).
  model_state: dict[str, Any]  # Other model variables, e.g. BatchNorm statistics of the ResNet.
  opt_state: optax.OptState
  # The defense's device state (`Defense.init_state`), e.g. a pool of caption embeddings; None if it has none.
  defense: Any
  # Running counters, summed on device over the global batch and checkpointed with the rest, so they
  # are right on every host and after a resume: `skipped_examples` since the start of training, plus
  # the defense's (`Defense.init_stats`).
  stats: dict[str, jax.Array]


def init_train_state(
    config: ml_collections.ConfigDict, tx: optax.GradientTransformation, defense: defenses.Defense
) -> TrainState:
  """Builds the initial state; meant to run under `jax.jit` with out_shardings."""
  # Three keys, the third unused, so that a seed still draws the model and the defense's state it
  # drew when the state carried a step key.
  model_key, defense_key, _ = jax.random.split(jax.random.PRNGKey(config.seed), 3)
  model = models.build(config.model, rngs=nnx.Rngs(params=model_key))
  params, model_state = ModelSpec.split(model)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      model_state=model_state,
      opt_state=tx.init(params),
      defense=defense.init_state(defense_key),
      stats=init_stats(defense),
  )


def init_stats(defense: defenses.Defense) -> dict[str, jax.Array]:
  return {"skipped_examples": jnp.zeros((), jnp.int32), **defense.init_stats()}


def state_shardings(
    abstract_state: TrainState, mesh: Mesh, config: ml_collections.ConfigDict, defense: defenses.Defense
) -> TrainState:
  """Parameters sharded by `config.sharding_rules` (FSDP by default), optimizer
  moments like their parameters, the defense's state as it asks, the rest replicated."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, abstract_state)
  params = sharding_lib.param_shardings(abstract_state.params, mesh, config.sharding_rules, config.fsdp_min_size)
  opt_state = sharding_lib.mirror_param_shardings(abstract_state.opt_state, abstract_state.params, params, mesh)
  shardings = shardings.replace(params=params, opt_state=opt_state)
  if abstract_state.defense is not None:
    shardings = shardings.replace(defense=defense.state_shardings(mesh))
  return shardings


def abstract_train_state(config, mesh, tx, defense: defenses.Defense) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the train state, without allocating it."""
  abstract = jax.eval_shape(functools.partial(init_train_state, config, tx, defense))
  return abstract, state_shardings(abstract, mesh, config, defense)


def create_train_state(config, mesh, tx, shardings: TrainState, defense: defenses.Defense) -> TrainState:
  """Initialises the state directly in its sharded layout."""
  with jax.set_mesh(mesh):
    return jax.jit(functools.partial(init_train_state, config, tx, defense), out_shardings=shardings)()


# Scalar parameters of the loss itself (not of a tower); `logit_bias` exists only with model.logit_bias.
LOSS_SCALARS = ("logit_scale", "logit_bias")
# Loss components a step reports besides `loss`: every scalar entry of the loss's aux whose name starts
# with this (InfoNCE's two directions, SigLIP's two pair kinds, a defense's own terms), so a defense
# adds a term by returning it; the trainer keeps no list of them.
LOSS_PART_PREFIX = "loss_"


def pair_loss(config: ml_collections.ConfigDict, mesh: Mesh):
  """`fn(zimg, ztxt, scalars) -> (loss, aux)` for `config.loss`, row i of ztxt being image i's positive.

  `scalars` holds the loss's parameters (`LOSS_SCALARS` present in the params).
  The SigLIP loss is chunked over the mesh's batch axes (`losses.siglip_loss`).
  """
  if config.loss == "siglip":
    axes = sharding_lib.batch_axes(mesh)
    return lambda zimg, ztxt, scalars: losses.siglip_loss(
        zimg, ztxt, scalars["logit_scale"], scalars["logit_bias"], mesh=mesh, axes=axes
    )
  if config.loss != "clip":
    raise ValueError(f"config.loss={config.loss!r} is unknown; use one of {losses.LOSSES}.")
  return lambda zimg, ztxt, scalars: losses.clip_loss(zimg, ztxt, scalars["logit_scale"])


def _loss_scalars(params: dict[str, Any]) -> dict[str, jax.Array]:
  return {k: params[k] for k in LOSS_SCALARS if k in params}


def _locked_views(kind: StepKind, lock: str) -> tuple[str, ...]:
  """The views of `kind` encoded by the tower `config.optim.lock` names ('' = none)."""
  return {"image": kind.image_views, "text": kind.text_views}.get(lock, ())


def _gather(z: dict[str, jax.Array], mesh: Mesh) -> dict[str, jax.Array]:
  """All views' [B, d] embeddings on every device with one all-gather, not one per loss term: fewer
  collectives, and on CPU several concurrent ones can starve each other of threads."""
  keys = tuple(z)
  gathered = jax.lax.with_sharding_constraint(jnp.stack([z[k] for k in keys]), NamedSharding(mesh, P()))
  return dict(zip(keys, gathered))


def _forward_only(
    model: Any, batch: dict[str, jax.Array], image_keys: tuple[str, ...], text_keys: tuple[str, ...]
) -> dict[str, jax.Array]:
  """Unit embeddings of the views `image_keys` (in inference mode) and `text_keys`, stop-gradient: for
  the evidence views a loss judges its pairs by, and a kind's text views without a gradient."""
  z = {key: losses.l2_normalize(model.encode_image(image_ops.normalize(batch[key]), train=False)) for key in image_keys}
  z.update({key: losses.l2_normalize(model.encode_text(batch[key])) for key in text_keys})
  return jax.tree.map(jax.lax.stop_gradient, z)


def _evidence_embeddings(model: Any, batch: dict[str, jax.Array], kind: StepKind) -> dict[str, jax.Array]:
  """`kind`'s evidence views (`StepKind.evidence_image_views`, `evidence_text_views`), forward only."""
  return _forward_only(model, batch, kind.evidence_image_views, kind.evidence_text_views)


def loss_and_grads(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    spec: ModelSpec,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    kind: StepKind,
    defense: defenses.Defense,
):
  """The step's loss, its auxiliary outputs, the parameter gradients and the new model state.

  The auxiliary outputs are the defense's plus `z`: the step's unit embeddings
  of every view (stop-gradient), which the defense's state update reads.

  With `config.grad_accum_steps` > 1 the gradient is accumulated over
  micro-batches but still equals the full-batch gradient (see
  `_accumulated_loss_and_grads`). A locked tower (`config.optim.lock`) runs in
  inference mode (a ResNet's BatchNorm statistics stay fixed) and gets no
  gradient, which also skips its backward pass.
  """
  if config.grad_accum_steps > 1:
    return _accumulated_loss_and_grads(
        state, batch, spec=spec, mesh=mesh, config=config, kind=kind, defense=defense, accum=config.grad_accum_steps
    )
  lock = config.optim["lock"]
  locked = _locked_views(kind, lock)
  compute_pair_loss = pair_loss(config, mesh)
  images = {key: image_ops.normalize(batch[key]) for key in kind.image_views}
  # Outside the differentiated function: a kind's text views without a gradient (exactly zero) and
  # its evidence views.
  model_now = spec.merge(state.params, state.model_state)
  frozen = _forward_only(model_now, batch, (), () if kind.text_grad else kind.text_views)
  evidence = _evidence_embeddings(model_now, batch, kind)

  def loss_fn(params):
    model = spec.merge(params, state.model_state)
    z = dict(evidence)
    for key in kind.image_views:
      z[key] = losses.l2_normalize(model.encode_image(images[key], train=lock != "image"))
    for key in kind.text_views:
      z[key] = frozen[key] if key in frozen else losses.l2_normalize(model.encode_text(batch[key]))
    for key in locked:
      z[key] = jax.lax.stop_gradient(z[key])
    if kind.gather:
      z = _gather(z, mesh)
    loss, aux = defense.loss(kind, z, _loss_scalars(params), state.defense, batch, mesh, compute_pair_loss)
    _, new_model_state = ModelSpec.split(model)
    return loss, (dict(aux, z=jax.tree.map(jax.lax.stop_gradient, z)), new_model_state)

  (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, aux, grads, new_model_state


# ----------------------------------------------------------------------------
# Gradient accumulation.


def split_micro_batches(x: jax.Array, accum: int, mesh: Mesh) -> jax.Array:
  """[B, ...] -> [accum, B/accum, ...]; micro-batch k holds rows k, k+accum, ...

  Strided rather than contiguous so that each micro-batch is spread over all
  batch shards (every device keeps working) and the reshape moves no data:
  a device's contiguous rows split evenly into all micro-batches whenever
  B/accum is a multiple of the shard count (`config_lib.validate` checks).
  """
  micro = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
  return jax.lax.with_sharding_constraint(micro, NamedSharding(mesh, P(None, sharding_lib.batch_axes(mesh))))


def join_micro_batches(x: jax.Array, mesh: Mesh) -> jax.Array:
  """Inverse of `split_micro_batches`: back to the original batch order."""
  full = x.swapaxes(0, 1).reshape((x.shape[0] * x.shape[1],) + x.shape[2:])
  return jax.lax.with_sharding_constraint(full, sharding_lib.batch_sharding(mesh))


def _accumulated_loss_and_grads(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    spec: ModelSpec,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    kind: StepKind,
    defense: defenses.Defense,
    accum: int,
):
  """Exact gradient accumulation for any loss of the batch's embeddings (embedding caching).

  Averaging per-micro-batch InfoNCE gradients would change the loss: each
  example would see B/accum - 1 negatives instead of B - 1. Instead (the
  "gradient cache" of open_clip's --accum-freq and GradCache):

  1. forward every micro-batch without gradient and keep only the L2-normalised
     embeddings, [B, d] per view;
  2. compute the defense's full-batch loss and its gradient with respect to
     those embeddings and to the loss's scalars (cheap: B x B logits);
  3. for each micro-batch, recompute its embeddings with gradient and pull the
     cached embedding gradient back to the parameters (a VJP), summing.

  By the chain rule the sum is the full-batch gradient, for every defense,
  since a defense's loss sees only the embeddings; peak activation memory is
  one micro-batch's. The loss's own scalars (logit scale, SigLIP's bias) get
  their gradient once, in step 2. Views without a gradient (a locked tower, or
  the text of a `text_grad=False` kind) are not recomputed in step 3. Models
  with batch statistics (the ResNet's BatchNorm) normalise per micro-batch, so
  for them the result is exact only for the micro-batched forward; running
  statistics advance once per micro-batch and view.
  """
  lock = config.optim["lock"]
  compute_pair_loss = pair_loss(config, mesh)
  encoded = kind.views + kind.evidence_views
  micro = {key: split_micro_batches(batch[key], accum, mesh) for key in encoded}
  locked = _locked_views(kind, lock)
  trained = tuple(key for key in kind.views if key not in locked and (key in kind.image_views or kind.text_grad))

  def embed(params, model_state, key, values):
    """Unit embeddings of one view's micro-batch and the model state after it."""
    model = spec.merge(params, model_state)
    if key in kind.image_views:
      z = model.encode_image(image_ops.normalize(values), train=lock != "image")
    else:
      z = model.encode_text(values)
    return losses.l2_normalize(z), ModelSpec.split(model)[1]

  # 1. Embeddings of the whole batch, one micro-batch at a time, no gradient (the evidence views too).
  def forward(_, micro_batch):
    z = {key: embed(state.params, state.model_state, key, micro_batch[key])[0] for key in kind.views}
    return None, dict(z, **_evidence_embeddings(spec.merge(state.params, state.model_state), micro_batch, kind))

  _, z_micro = jax.lax.scan(forward, None, micro)
  z = {key: join_micro_batches(z_micro[key], mesh) for key in encoded}

  # 2. The full-batch loss and its gradient at the cached embeddings.
  def full_batch_loss(z_trained, scalars):
    z_all = {key: z_trained.get(key, z[key]) for key in encoded}
    if kind.gather:
      z_all = _gather(z_all, mesh)
    return defense.loss(kind, z_all, scalars, state.defense, batch, mesh, compute_pair_loss)

  (loss, aux), (g_z, g_scalars) = jax.value_and_grad(full_batch_loss, argnums=(0, 1), has_aux=True)(
      {key: z[key] for key in trained}, _loss_scalars(state.params)
  )

  # 3. Per micro-batch: recompute with gradient, pull the cached gradient back.
  grad_shardings = sharding_lib.param_shardings(state.params, mesh, config.sharding_rules, config.fsdp_min_size)

  def backward(carry, micro_batch):
    grads, model_state = carry

    def pullback(params):
      total, new_model_state = jnp.zeros((), jnp.float32), model_state
      for key in trained:
        z_key, new_model_state = embed(params, new_model_state, key, micro_batch[key])
        total = total + jnp.sum(z_key * micro_batch["grad/" + key])
      return total, new_model_state

    micro_grads, new_model_state = jax.grad(pullback, has_aux=True)(state.params)
    grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, micro_grads), grad_shardings)
    return (grads, new_model_state), None

  zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), grad_shardings)
  backward_in = {key: micro[key] for key in trained}
  backward_in.update({"grad/" + key: split_micro_batches(g_z[key], accum, mesh) for key in trained})
  (grads, new_model_state), _ = jax.lax.scan(backward, (zeros, state.model_state), backward_in)
  grads = dict(grads, **{k: grads[k] + g for k, g in g_scalars.items()})
  if kind.gather:
    z = _gather(z, mesh)
  return loss, dict(aux, z=z), grads, new_model_state


def augment_on_device(
    batch: dict[str, jax.Array], config: ml_collections.ConfigDict, kind: StepKind, views: int
) -> dict[str, jax.Array]:
  """`config.augment.placement='device'`: augments, before encoding, each image view of `kind` that the
  pipeline left to the device (the whole image at `augment.device_source_size` plus the parameters it
  drew, `augment.params_key(view)`), to the model's image size; float32 in [0, 255], unrounded.

  Parameters of views this kind does not read are dropped unused. With placement='host' the batch is
  returned as it is.
  """
  on_device = augment.device_views(config.augment, views)
  if not on_device:
    return batch
  batch = dict(batch)
  for view in on_device:
    key = augment.params_key(view)
    if key not in batch:
      raise ValueError(
          f"config.augment.placement='device' but the batch has no {key!r}: build the data with "
          "pipeline.make_train_data from the same config (and the defense's views)."
      )
    packed = batch.pop(key)
    if view in kind.image_views:
      batch[view] = augment.apply_packed_batch_jax(batch[view], packed, config.model.image.image_size)
  return batch


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    spec: ModelSpec,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    mesh: Mesh,
    config: ml_collections.ConfigDict,
    defense: defenses.Defense,
    kind: StepKind,
) -> tuple[TrainState, dict[str, jax.Array]]:
  batch = dict(batch)
  skipped = batch.pop("skipped", None)
  batch = augment_on_device(batch, config, kind, defense.views)
  loss, aux, grads, new_model_state = loss_and_grads(
      state, batch, spec=spec, mesh=mesh, config=config, kind=kind, defense=defense
  )
  z = aux.pop("z")
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.MAX_LOGIT_SCALE)
  defense_state = defense.update_state(kind, state.defense, z, aux, batch, mesh)

  metrics = {
      "loss": loss,
      **{k: v for k, v in aux.items() if k.startswith(LOSS_PART_PREFIX) and jnp.ndim(v) == 0},
      "batch_accuracy": aux["batch_accuracy"],
      "lr": schedule(state.step),
      "logit_scale": jnp.exp(params["logit_scale"]),
      **({"logit_bias": params["logit_bias"]} if "logit_bias" in params else {}),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
  }
  stats = dict(state.stats)
  if skipped is not None:  # Summed over the global batch: every host's skips.
    stats["skipped_examples"] = stats["skipped_examples"] + jnp.sum(skipped).astype(jnp.int32)
  stats, defense_metrics = defense.update_stats(kind, stats, z, aux, batch, state.step)
  metrics.update(defense_metrics, skipped_examples=stats["skipped_examples"])
  new_state = state.replace(
      step=state.step + 1,
      params=params,
      model_state=new_model_state,
      opt_state=opt_state,
      defense=defense_state,
      stats=stats,
  )
  return new_state, metrics


def make_train_steps(
    config, mesh, spec, tx, schedule, shardings: TrainState, defense: defenses.Defense
) -> dict[str, Any]:
  """One jitted step per step kind of the defense, by name, with explicit shardings and the state donated."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  steps = {}
  for name, kind in defense.step_kinds().items():
    fn = functools.partial(
        train_step, spec=spec, tx=tx, schedule=schedule, mesh=mesh, config=config, defense=defense, kind=kind
    )
    steps[name] = jax.jit(
        fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated), donate_argnums=0
    )
  return steps


# ----------------------------------------------------------------------------
# Ahead-of-time compilation (the dry run).


def abstract_batch(
    config: ml_collections.ConfigDict, mesh: Mesh, defense: defenses.Defense
) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of one global training batch (as `global_batch` makes it)."""
  b, size, length = config.data.batch_size, config.model.image.image_size, config.model.text.context_length
  sh = sharding_lib.batch_sharding(mesh)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  # int64 ids and labels from the pipeline become int32 on device (jax_enable_x64 is off).
  batch = {
      "image": sds((b, size, size, 3), jnp.uint8),
      "text": sds((b, length), jnp.int32),
      "id": sds((b,), jnp.int32),
      "label": sds((b,), jnp.int32),
      "poisoned": sds((b,), jnp.int8),
      "skipped": sds((b,), jnp.int32),
  }
  views = defense.views
  if views == 2:
    batch.update(image2=batch["image"], text2=batch["text"])
  if defense.plain_views(config):
    batch.update(image_plain=batch["image"], text_plain=batch["text"])
  on_device = augment.device_views(config.augment, views)
  if on_device:
    source = augment.device_source_size(config.augment, size)
    for view in on_device:
      batch[view] = sds((b, source, source, 3), jnp.uint8)
      batch[augment.params_key(view)] = sds((b, augment.NUM_PACKED), jnp.float32)
  return batch


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What compiling one train step for a mesh says about it, per device."""

  kind: str  # The step kind's name.
  num_devices: int
  compile_seconds: float
  flops: float | None  # XLA's count for one device's program (all ops, not just matmuls).
  analytic_flops: float  # Matmul FLOPs (models.flops_per_pair) of forward + backward, the device's share.
  peak_bytes: int | None  # Arguments + outputs - donated + temporaries, or XLA's peak if larger.
  argument_bytes: int
  temp_bytes: int
  param_bytes: int  # Parameters and optimizer state held by one device (after FSDP).

  def summary(self) -> str:
    gib = lambda n: "n/a" if n is None else f"{n / 2**30:.3f} GiB"
    flops = "n/a" if self.flops is None else f"{self.flops:.3e}"
    return (
        f"step '{self.kind}' on {self.num_devices} devices: compiled in {self.compile_seconds:.1f}s; per device: "
        f"peak memory {gib(self.peak_bytes)} (arguments {gib(self.argument_bytes)}, temporaries "
        f"{gib(self.temp_bytes)}, params+optimizer {gib(self.param_bytes)}), FLOPs {flops} "
        f"(analytic matmul FLOPs {self.analytic_flops:.3e})"
    )


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard_shape = s.shard_shape(x.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def aot_compile(
    config: ml_collections.ConfigDict, mesh: Mesh, defense: defenses.Defense, total_steps: int = 1_000_000
) -> dict[str, tuple[Any, CompileReport]]:
  """Lowers and compiles every step kind of `defense` for `mesh` from shapes alone.

  Nothing is allocated and no data is read, so this runs on fake CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) to check a large
  run's per-device memory before it is launched. `total_steps` only changes
  the learning-rate schedule's constants, not memory or FLOPs.
  """
  tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps)
  spec = ModelSpec.create(config.model)
  abstract, shardings = abstract_train_state(config, mesh, tx, defense)
  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  batch_in = abstract_batch(config, mesh, defense)
  per_device_batch = config.data.batch_size / mesh.size
  pair_flops = models.flops_per_pair(config.model)
  text = config.model.text
  text_flops = text_lib.text_flops(context_length=text.context_length, width=text.width, layers=text.layers) + (
      2 * text.width * config.model.embed_dim
  )
  param_bytes = _bytes_per_device((abstract.params, abstract.opt_state), (shardings.params, shardings.opt_state))
  out = {}
  kinds = defense.step_kinds()
  for name, fn in make_train_steps(config, mesh, spec, tx, schedule, shardings, defense).items():
    # Forward + backward = 3x the forward's matmuls, per view; a kind without text gradient runs the
    # text tower forward only.
    kind = kinds[name]
    analytic = (
        3 * pair_flops * len(kind.image_views) - (2 * text_flops * len(kind.text_views) if not kind.text_grad else 0)
    ) * per_device_batch
    t0 = time.perf_counter()
    with jax.set_mesh(mesh):
      compiled = fn.lower(state_in, batch_in).compile()
    seconds = time.perf_counter() - t0
    memory = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost["flops"]) if cost and "flops" in cost else None
    peak = None
    argument_bytes = temp_bytes = 0
    if memory is not None:
      argument_bytes, temp_bytes = int(memory.argument_size_in_bytes), int(memory.temp_size_in_bytes)
      # Some backends (CPU) report a peak that leaves out the temporaries: take the larger.
      peak = max(
          int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
          argument_bytes + int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes) + temp_bytes,
      )
    out[name] = (
        compiled,
        CompileReport(
            kind=name,
            num_devices=mesh.size,
            compile_seconds=seconds,
            flops=flops,
            analytic_flops=analytic,
            peak_bytes=peak,
            argument_bytes=argument_bytes,
            temp_bytes=temp_bytes,
            param_bytes=param_bytes,
        ),
    )
  return out
