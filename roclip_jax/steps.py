"""Train state and the jitted train step, shared by every defense.

One step function, parametrised by `StepMode`: a plain CLIP step, a RoCLIP
matching step (docs/roclip.md, section 1) optionally writing the pool, a
SafeCLIP phase (`safeclip.py`) or a CleanCLIP fine-tuning step
(`cleanclip.py`). The trainer compiles one step per mode it needs and picks one
on the host per epoch. Nothing here reads a value back to the host.

Scale: parameters and Adam moments are placed by `sharding.py`'s rules (FSDP
over the `fsdp` mesh axis) and GSPMD inserts the gathers; `grad_accum_steps`
splits the batch into micro-batches with the exact full-batch gradient;
`aot_compile` compiles the steps from shapes alone (the dry run).
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

from roclip_jax import cleanclip
from roclip_jax import config_lib
from roclip_jax import losses
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import roclip
from roclip_jax import safeclip
from roclip_jax import sharding as sharding_lib
from roclip_jax.data import image_ops
from roclip_jax.models import text as text_lib


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]
  params: dict[str, Any]  # nnx.Param values as a plain nested dict (orbax- and notebook-friendly).
  model_state: dict[str, Any]  # Other model variables, e.g. BatchNorm statistics of the ResNet.
  opt_state: optax.OptState
  pool: roclip.Pool | None  # None unless the defense uses RoCLIP's pool.
  rng: jax.Array  # u32[2] raw key, advanced every step.
  safeclip: safeclip.SafeState | None = None  # SafeCLIP's banks and safe mask; None for other defenses.
  # Running counters, summed on device over the global batch and checkpointed with the rest, so they
  # are right on every host and after a resume: `skipped_examples` since the start of training and,
  # with RoCLIP's pool, the current epoch's matching diagnostics (`roclip.DIAGNOSTIC_SUMS`, reset at
  # the first step of each epoch).
  stats: dict[str, jax.Array] | None = None


# What a step computes: the plain pair loss, RoCLIP's matching loss, a SafeCLIP
# phase, or CleanCLIP's fine-tuning loss. The last four read two views.
STEP_KINDS = ("clip", "roclip_match", *safeclip.PHASES, "cleanclip")
TWO_VIEW_KINDS = (*safeclip.PHASES, "cleanclip")


@dataclasses.dataclass(frozen=True)
class StepMode:
  kind: str = "clip"  # One of STEP_KINDS.
  enqueue: bool = False  # Write this batch's caption embeddings into RoCLIP's pool.

  def __post_init__(self):
    if self.kind not in STEP_KINDS:
      raise ValueError(f"StepMode.kind={self.kind!r} is not one of {STEP_KINDS}.")

  @property
  def match(self) -> bool:
    """Pair each image with its nearest pool caption (a RoCLIP matching step)."""
    return self.kind == "roclip_match"

  @property
  def two_views(self) -> bool:
    return self.kind in TWO_VIEW_KINDS

  @property
  def name(self) -> str:
    return self.kind + ("+pool" if self.enqueue and not self.match else "")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The static half of an NNX model, to rebuild it from plain-dict state."""
  graphdef: Any
  params_template: nnx.State
  rest_template: nnx.State

  @classmethod
  def create(cls, model_cfg: ml_collections.ConfigDict) -> "ModelSpec":
    abstract = nnx.eval_shape(lambda: models.build(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return cls(graphdef, params, rest)

  def merge(self, params: dict, model_state: dict) -> nnx.Module:
    p = jax.tree.map(lambda x: x, self.params_template)
    nnx.replace_by_pure_dict(p, params)
    r = jax.tree.map(lambda x: x, self.rest_template)
    nnx.replace_by_pure_dict(r, model_state)
    return nnx.merge(self.graphdef, p, r)

  @staticmethod
  def split(model: nnx.Module) -> tuple[dict, dict]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def uses_pool(config: ml_collections.ConfigDict) -> bool:
  return config.defense == "roclip"


def num_views(config: ml_collections.ConfigDict) -> int:
  """Views of each example the defense's steps read (the pipeline's `data.views`)."""
  return 2 if config.defense in config_lib.TWO_VIEW_DEFENSES else 1


def init_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
  """Builds the initial state; meant to run under `jax.jit` with out_shardings."""
  key = jax.random.PRNGKey(config.seed)
  model_key, pool_key, step_key = jax.random.split(key, 3)
  safe_key = jax.random.fold_in(pool_key, 1)
  model = models.build(config.model, rngs=nnx.Rngs(params=model_key))
  params, model_state = ModelSpec.split(model)
  pool = None
  if uses_pool(config):
    pool = roclip.init_pool(pool_key, config.roclip.pool_size, config.model.embed_dim)
  safe_state = None
  if config.defense == "safeclip":
    safe_state = safeclip.init_state(safe_key, config.safeclip, config.model.embed_dim)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params), pool=pool,
      rng=step_key, safeclip=safe_state, stats=init_stats(config),
  )


def init_stats(config: ml_collections.ConfigDict) -> dict[str, jax.Array]:
  stats = {"skipped_examples": jnp.zeros((), jnp.int32)}
  if uses_pool(config):
    stats.update({f"roclip/{k}": jnp.zeros((), jnp.float32) for k in roclip.DIAGNOSTIC_SUMS})
  return stats


def roclip_settings(config: ml_collections.ConfigDict, steps_per_epoch: int = 1) -> roclip.Settings:
  return roclip.settings(config.roclip, steps_per_epoch=steps_per_epoch, warmup_steps=config.optim.warmup_steps)


def state_shardings(abstract_state: TrainState, mesh: Mesh, config: ml_collections.ConfigDict) -> TrainState:
  """Parameters sharded by `config.sharding_rules` (FSDP by default), optimizer
  moments like their parameters, the pool as `roclip.shard_pool` asks, the
  rest replicated."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, abstract_state)
  params = sharding_lib.param_shardings(abstract_state.params, mesh, config.get("sharding_rules", None),
                                        config.get("fsdp_min_size", sharding_lib.DEFAULT_FSDP_MIN_SIZE))
  opt_state = sharding_lib.mirror_param_shardings(abstract_state.opt_state, abstract_state.params, params, mesh)
  shardings = shardings.replace(params=params, opt_state=opt_state)
  if abstract_state.pool is not None:
    shardings = shardings.replace(pool=roclip.pool_shardings(mesh, config.roclip.shard_pool))
  if abstract_state.safeclip is not None:
    shardings = shardings.replace(safeclip=safeclip.state_shardings(mesh))
  return shardings


def abstract_train_state(config, mesh, tx) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the train state, without allocating it."""
  abstract = jax.eval_shape(functools.partial(init_train_state, config, tx))
  return abstract, state_shardings(abstract, mesh, config)


def create_train_state(config, mesh, tx, shardings: TrainState) -> TrainState:
  """Initialises the state directly in its sharded layout."""
  with jax.set_mesh(mesh):
    return jax.jit(functools.partial(init_train_state, config, tx), out_shardings=shardings)()


# Scalar parameters of the loss itself (not of a tower); `logit_bias` exists only with model.logit_bias.
LOSS_SCALARS = ("logit_scale", "logit_bias")
# Loss components a step may report besides `loss` (InfoNCE's two directions, SigLIP's two pair
# kinds, SafeCLIP's and CleanCLIP's terms).
LOSS_PARTS = ("loss_i2t", "loss_t2i", "loss_pos", "loss_neg", "loss_clip", "loss_unimodal", "loss_cross",
              "loss_inmodal")


def locked_tower(config: ml_collections.ConfigDict) -> str:
  """'', 'image' or 'text': the tower `optim.make_optimizer` leaves untouched."""
  return config.optim.get("lock", "")


def pair_loss(config: ml_collections.ConfigDict, mesh: Mesh):
  """`fn(zimg, ztxt, scalars) -> (loss, aux)` for `config.loss`, row i of ztxt being image i's positive.

  `scalars` holds the loss's parameters (`LOSS_SCALARS` present in the params).
  The SigLIP loss is chunked over the mesh's batch axes (`losses.siglip_loss`).
  """
  loss = config.get("loss", "clip")
  if loss == "siglip":
    axes = sharding_lib.batch_axes(mesh)
    return lambda zimg, ztxt, scalars: losses.siglip_loss(zimg, ztxt, scalars["logit_scale"], scalars["logit_bias"],
                                                          mesh=mesh, axes=axes)
  if loss != "clip":
    raise ValueError(f"config.loss={loss!r} is unknown; use one of {losses.LOSSES}.")
  return lambda zimg, ztxt, scalars: losses.clip_loss(zimg, ztxt, scalars["logit_scale"])


def _matching_loss(config, mesh, zimg, match: roclip.Match, scalars):
  """RoCLIP's matching loss with the configured pair loss: matched captions replace the positives.

  The method: docs/roclip.md, section 1.
  """
  if config.get("loss", "clip") == "clip":
    return roclip.matching_loss(zimg, match, scalars["logit_scale"], roclip_settings(config).mask_duplicates)
  return pair_loss(config, mesh)(zimg, jax.lax.stop_gradient(match.embeddings), scalars)


def _loss_scalars(params: dict[str, Any]) -> dict[str, jax.Array]:
  return {k: params[k] for k in LOSS_SCALARS if k in params}


def loss_and_grads(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, mesh: Mesh,
                   config: ml_collections.ConfigDict, mode: StepMode):
  """The step's loss, its auxiliary outputs and the parameter gradients.

  With `config.grad_accum_steps` > 1 the gradient is accumulated over
  micro-batches but still equals the full-batch gradient (see
  `_accumulated_loss_and_grads`). A locked tower (`config.optim.lock`) runs in
  inference mode (a ResNet's BatchNorm statistics stay fixed) and gets no
  gradient, which also skips its backward pass.
  """
  if mode.two_views:
    return _two_view_loss_and_grads(state, batch, spec=spec, mesh=mesh, config=config, mode=mode)
  accum = int(config.get("grad_accum_steps", 1))
  if accum > 1:
    return _accumulated_loss_and_grads(state, batch, spec=spec, mesh=mesh, config=config, mode=mode, accum=accum)
  images = image_ops.normalize(batch["image"])
  tokens = batch["text"]
  shard_pool = bool(config.roclip.shard_pool) if state.pool is not None else False
  lock = locked_tower(config)
  compute_loss = pair_loss(config, mesh)

  if mode.match:
    # Matching step: captions only feed the pool, so the text tower runs
    # forward only; its gradient is exactly zero (AdamW still applies momentum
    # and weight decay to it, as the original does: docs/methods.md, section 4).
    text_model = spec.merge(state.params, state.model_state)
    ztxt = jax.lax.stop_gradient(losses.l2_normalize(text_model.encode_text(tokens)))

  def loss_fn(params):
    model = spec.merge(params, state.model_state)
    zimg = losses.l2_normalize(model.encode_image(images, train=lock != "image"))
    if lock == "image":
      zimg = jax.lax.stop_gradient(zimg)
    scalars = _loss_scalars(params)
    if mode.match:
      rc = roclip_settings(config)
      match = roclip.nearest_captions(state.pool, zimg, mesh, shard_pool, rc.csls_k,
                                      batch["id"] if rc.exclude_own else None)
      loss, aux = _matching_loss(config, mesh, zimg, match, scalars)
      aux = dict(aux, match=match, ztxt=ztxt)
    else:
      zt = losses.l2_normalize(model.encode_text(tokens))
      if lock == "text":
        zt = jax.lax.stop_gradient(zt)
      loss, aux = compute_loss(zimg, zt, scalars)
      aux = dict(aux, ztxt=jax.lax.stop_gradient(zt))
    aux = dict(aux, zimg=jax.lax.stop_gradient(zimg))
    _, new_model_state = ModelSpec.split(model)
    return loss, (aux, new_model_state)

  (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, aux, grads, new_model_state


def _two_view_loss_and_grads(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, mesh: Mesh,
                             config: ml_collections.ConfigDict, mode: StepMode):
  """SafeCLIP's and CleanCLIP's steps: both towers on both views (`image`/`text`, `image2`/`text2`)."""
  lock = locked_tower(config)
  replicated = NamedSharding(mesh, P())

  def loss_fn(params):
    model = spec.merge(params, state.model_state)
    z = {}
    for key in ("image", "image2"):
      z[key] = losses.l2_normalize(model.encode_image(image_ops.normalize(batch[key]), train=lock != "image"))
    for key in ("text", "text2"):
      z[key] = losses.l2_normalize(model.encode_text(batch[key]))
    for key in TOWER_KEYS.get(lock, ()):
      z[key] = jax.lax.stop_gradient(z[key])
    # One all-gather of the four [B, d] embeddings (and the ids), not one per loss term: fewer
    # collectives, and on CPU several concurrent ones can starve each other of threads.
    keys = tuple(z)
    gathered = jax.lax.with_sharding_constraint(jnp.stack([z[k] for k in keys]), replicated)
    z = dict(zip(keys, gathered))
    ids = jax.lax.with_sharding_constraint(batch["id"], replicated)
    scalars = _loss_scalars(params)
    if mode.kind == "cleanclip":
      loss, aux = cleanclip.step_loss(z, scalars, config.cleanclip, pair_loss(config, mesh))
    else:
      loss, aux = safeclip.step_loss(mode.kind, z, state.safeclip, ids, scalars["logit_scale"])
    aux = dict(aux, zimg=jax.lax.stop_gradient(z["image"]), ztxt=jax.lax.stop_gradient(z["text"]))
    _, new_model_state = ModelSpec.split(model)
    return loss, (aux, new_model_state)

  (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, aux, grads, new_model_state


# Embedding keys of each tower, for locking in two-view steps.
TOWER_KEYS = {"image": ("image", "image2"), "text": ("text", "text2")}


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


def _accumulated_loss_and_grads(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, mesh: Mesh,
                                config: ml_collections.ConfigDict, mode: StepMode, accum: int):
  """Exact gradient accumulation for a contrastive loss (embedding caching).

  Averaging per-micro-batch InfoNCE gradients would change the loss: each
  example would see B/accum - 1 negatives instead of B - 1. Instead (the
  "gradient cache" of open_clip's --accum-freq and GradCache):

  1. forward every micro-batch without gradient and keep only the L2-normalised
     embeddings, [B, d] per tower;
  2. compute the full-batch loss and its gradient with respect to those
     embeddings and to the logit scale (cheap: B x B logits);
  3. for each micro-batch, recompute its embeddings with gradient and pull the
     cached embedding gradient back to the parameters (a VJP), summing.

  By the chain rule the sum is the full-batch gradient; peak activation memory
  is one micro-batch's. The logit scale's gradient is taken once in step 2,
  not once per micro-batch. In a matching step the positives are pool rows
  (constants) matched with the cached image embeddings, so only the image
  tower is recomputed. Models with batch statistics (the ResNet's BatchNorm)
  normalise per micro-batch, so for them the result is exact only for the
  micro-batched forward; running statistics advance once per micro-batch.
  The loss's own scalars (logit scale, SigLIP's bias) get their gradient in
  step 2; a locked tower is not recomputed in step 3.
  """
  shard_pool = bool(config.roclip.shard_pool) if state.pool is not None else False
  lock = locked_tower(config)
  images_mb = split_micro_batches(batch["image"], accum, mesh)
  tokens_mb = split_micro_batches(batch["text"], accum, mesh)

  def embed_images(params, model_state, images_u8):
    model = spec.merge(params, model_state)
    zimg = losses.l2_normalize(model.encode_image(image_ops.normalize(images_u8), train=lock != "image"))
    return zimg, ModelSpec.split(model)[1]

  def embed_texts(params, model_state, tokens):
    return losses.l2_normalize(spec.merge(params, model_state).encode_text(tokens))

  # 1. Embeddings of the whole batch, one micro-batch at a time, no gradient.
  def forward(_, micro):
    images_u8, tokens = micro
    zimg, _ = embed_images(state.params, state.model_state, images_u8)
    return None, (zimg, embed_texts(state.params, state.model_state, tokens))

  _, (zimg_mb, ztxt_mb) = jax.lax.scan(forward, None, (images_mb, tokens_mb))
  zimg, ztxt = join_micro_batches(zimg_mb, mesh), join_micro_batches(ztxt_mb, mesh)

  # 2. The full-batch loss and its gradient at the cached embeddings.
  scalars = _loss_scalars(state.params)
  if mode.match:
    rc = roclip_settings(config)
    match = roclip.nearest_captions(state.pool, zimg, mesh, shard_pool, rc.csls_k, batch["id"] if rc.exclude_own else None)
    (loss, aux), (g_zimg, g_scalars) = jax.value_and_grad(
        lambda zi, s: _matching_loss(config, mesh, zi, match, s), argnums=(0, 1), has_aux=True)(zimg, scalars)
    g_ztxt = jnp.zeros_like(ztxt)  # Unused: the text tower gets no gradient in a matching step.
    aux = dict(aux, match=match, ztxt=ztxt)
  else:
    (loss, aux), (g_zimg, g_ztxt, g_scalars) = jax.value_and_grad(
        pair_loss(config, mesh), argnums=(0, 1, 2), has_aux=True)(zimg, ztxt, scalars)
    aux = dict(aux, ztxt=ztxt)
  aux = dict(aux, zimg=zimg)

  # 3. Per micro-batch: recompute with gradient, pull the cached gradient back.
  grad_shardings = sharding_lib.param_shardings(state.params, mesh, config.get("sharding_rules", None),
                                                config.get("fsdp_min_size", sharding_lib.DEFAULT_FSDP_MIN_SIZE))

  def backward(carry, micro):
    grads, model_state = carry
    images_u8, tokens, g_zi, g_zt = micro

    def pullback(params):
      zi, new_model_state = embed_images(params, model_state, images_u8)
      total = jnp.zeros((), jnp.float32) if lock == "image" else jnp.sum(zi * g_zi)
      if not mode.match and lock != "text":
        total = total + jnp.sum(embed_texts(params, model_state, tokens) * g_zt)
      return total, new_model_state

    micro_grads, new_model_state = jax.grad(pullback, has_aux=True)(state.params)
    grads = jax.lax.with_sharding_constraint(jax.tree.map(jnp.add, grads, micro_grads), grad_shardings)
    return (grads, new_model_state), None

  zeros = jax.lax.with_sharding_constraint(jax.tree.map(jnp.zeros_like, state.params), grad_shardings)
  micro_grads_in = (images_mb, tokens_mb, split_micro_batches(g_zimg, accum, mesh),
                    split_micro_batches(g_ztxt, accum, mesh))
  (grads, new_model_state), _ = jax.lax.scan(backward, (zeros, state.model_state), micro_grads_in)
  grads = dict(grads, **{k: grads[k] + g for k, g in g_scalars.items()})
  return loss, aux, grads, new_model_state


def train_step(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mesh: Mesh, config: ml_collections.ConfigDict,
               mode: StepMode, steps_per_epoch: int = 1) -> tuple[TrainState, dict[str, jax.Array]]:
  batch = dict(batch)
  skipped = batch.pop("skipped", None)
  loss, aux, grads, new_model_state = loss_and_grads(state, batch, spec=spec, mesh=mesh, config=config, mode=mode)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.MAX_LOGIT_SCALE)

  pool = state.pool
  if mode.enqueue:
    shard_pool = bool(config.roclip.shard_pool)
    pool = roclip.enqueue(pool, aux["ztxt"], batch["id"], batch["poisoned"], mesh, shard_pool, config.roclip.fifo,
                          labels=batch.get("label"))
  safe_state = state.safeclip
  if safe_state is not None:
    safe_state = safeclip.write_banks(safe_state, {"image": aux["zimg"], "text": aux["ztxt"]}, batch["id"],
                                      batch["poisoned"], mesh)

  metrics = {
      "loss": loss,
      **{k: aux[k] for k in LOSS_PARTS if k in aux},
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
  if "roclip/steps" in stats:
    # The epoch's matching diagnostics: zeroed by the epoch's first step, so the sums in a checkpoint
    # taken mid-epoch cover exactly the steps before it.
    first_of_epoch = state.step % steps_per_epoch == 0
    for key in roclip.DIAGNOSTIC_SUMS:
      stats[f"roclip/{key}"] = jnp.where(first_of_epoch, 0.0, stats[f"roclip/{key}"])
    if mode.match:
      labels = batch.get("label", jnp.full_like(batch["id"], -1))
      step_diag = roclip.step_diagnostics(aux["zimg"], aux["ztxt"], aux["match"], labels, batch["poisoned"])
      for key, value in step_diag.items():
        stats[f"roclip/{key}"] = stats[f"roclip/{key}"] + value
      metrics["roclip/match_similarity"] = step_diag["match_similarity"]
      metrics["roclip/distinct_matches"] = step_diag["distinct_matches"]
  metrics["skipped_examples"] = stats["skipped_examples"]
  for key in ("image_nn_similarity", "text_nn_similarity", "safe_in_batch"):
    if key in aux:
      metrics[f"safeclip/{key}"] = aux[key]
  if "safe" in aux:  # A safe_split step: the batch's poisons that got the CLIP loss.
    metrics["safeclip/poisoned_in_safe"] = jnp.sum(aux["safe"] & (batch["poisoned"] > 0)).astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state, opt_state=opt_state,
                            pool=pool, rng=jax.random.split(state.rng)[0], safeclip=safe_state, stats=stats)
  return new_state, metrics


def step_modes(config: ml_collections.ConfigDict) -> dict[str, StepMode]:
  """The step modes a run may need, by name: 'clip', plus 'match' for RoCLIP; SafeCLIP's
  phases; CleanCLIP's step."""
  if config.defense == "safeclip":
    return {phase: StepMode(kind=phase) for phase in safeclip.PHASES}
  if config.defense == "cleanclip":
    return {"cleanclip": StepMode(kind="cleanclip")}
  if not uses_pool(config):
    return {"clip": StepMode()}
  every_step = roclip_settings(config).pool_every_step
  return {"clip": StepMode(enqueue=every_step), "match": StepMode(kind="roclip_match", enqueue=True)}


def mode_for_epoch(config: ml_collections.ConfigDict, epoch: int, steps_per_epoch: int = 1) -> str:
  if config.defense == "safeclip":
    return safeclip.phase_for_epoch(config.safeclip, epoch)
  if config.defense == "cleanclip":
    return "cleanclip"
  if uses_pool(config):
    rc = roclip_settings(config, steps_per_epoch)
    if roclip.is_matching_epoch(epoch, rc.k, rc.first_epoch):
      return "match"
  return "clip"


def make_train_steps(config, mesh, spec, tx, schedule, shardings: TrainState, steps_per_epoch: int = 1) -> dict[str, Any]:
  """One jitted step per mode, with explicit shardings and the state donated."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  steps = {}
  for name, mode in step_modes(config).items():
    fn = functools.partial(train_step, spec=spec, tx=tx, schedule=schedule, mesh=mesh, config=config, mode=mode,
                           steps_per_epoch=steps_per_epoch)
    steps[name] = jax.jit(fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                          donate_argnums=0)
  return steps


# ----------------------------------------------------------------------------
# Ahead-of-time compilation (the dry run).


def abstract_batch(config: ml_collections.ConfigDict, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes, dtypes and shardings of one global training batch (as `global_batch` makes it)."""
  b, size, length = config.data.batch_size, config.model.image.image_size, config.model.text.context_length
  sh = sharding_lib.batch_sharding(mesh)
  sds = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
  # int64 ids and labels from the pipeline become int32 on device (jax_enable_x64 is off).
  batch = {"image": sds((b, size, size, 3), jnp.uint8), "text": sds((b, length), jnp.int32),
           "id": sds((b,), jnp.int32), "label": sds((b,), jnp.int32), "poisoned": sds((b,), jnp.int8),
           "skipped": sds((b,), jnp.int32)}
  if num_views(config) == 2:
    batch.update(image2=batch["image"], text2=batch["text"])
  return batch


@dataclasses.dataclass(frozen=True)
class CompileReport:
  """What compiling one train step for a mesh says about it, per device."""
  mode: str
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
    return (f"step '{self.mode}' on {self.num_devices} devices: compiled in {self.compile_seconds:.1f}s; per device: "
            f"peak memory {gib(self.peak_bytes)} (arguments {gib(self.argument_bytes)}, temporaries "
            f"{gib(self.temp_bytes)}, params+optimizer {gib(self.param_bytes)}), FLOPs {flops} "
            f"(analytic matmul FLOPs {self.analytic_flops:.3e})")


def _bytes_per_device(abstract: Any, shardings: Any) -> int:
  total = 0
  for x, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings)):
    shard_shape = s.shard_shape(x.shape)
    total += int(np.prod(shard_shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
  return total


def aot_compile(config: ml_collections.ConfigDict, mesh: Mesh,
                total_steps: int = 1_000_000) -> dict[str, tuple[Any, CompileReport]]:
  """Lowers and compiles every step mode for `mesh` from shapes alone.

  Nothing is allocated and no data is read, so this runs on fake CPU devices
  (`XLA_FLAGS=--xla_force_host_platform_device_count=N`) to check a large
  run's per-device memory before it is launched. `total_steps` only changes
  the learning-rate schedule's constants, not memory or FLOPs.
  """
  tx, schedule = optim.make_optimizer(config.optim, total_steps=total_steps)
  spec = ModelSpec.create(config.model)
  abstract, shardings = abstract_train_state(config, mesh, tx)
  state_in = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
  batch_in = abstract_batch(config, mesh)
  per_device_batch = config.data.batch_size / mesh.size
  pair_flops = models.flops_per_pair(config.model)
  text = config.model.text
  text_flops = text_lib.text_flops(context_length=text.context_length, width=text.width, layers=text.layers) + (
      2 * text.width * config.model.embed_dim)
  param_bytes = _bytes_per_device((abstract.params, abstract.opt_state), (shardings.params, shardings.opt_state))
  out = {}
  for name, fn in make_train_steps(config, mesh, spec, tx, schedule, shardings).items():
    # Forward + backward = 3x the forward's matmuls; a matching step runs the text tower forward
    # only; a two-view step runs both towers on both views.
    mode = step_modes(config)[name]
    analytic = (3 * pair_flops * (2 if mode.two_views else 1) - (2 * text_flops if mode.match else 0)
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
      peak = max(int(getattr(memory, "peak_memory_in_bytes", 0) or 0),
                 argument_bytes + int(memory.output_size_in_bytes) - int(memory.alias_size_in_bytes) + temp_bytes)
    out[name] = (compiled, CompileReport(
        mode=name, num_devices=mesh.size, compile_seconds=seconds, flops=flops, analytic_flops=analytic,
        peak_bytes=peak, argument_bytes=argument_bytes, temp_bytes=temp_bytes, param_bytes=param_bytes))
  return out
