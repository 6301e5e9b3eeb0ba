"""Train state and the jitted train step, shared by every defense.

One step function, parametrised by `StepMode`: a plain CLIP step, or a RoCLIP
matching step (ROCLIP.md §1.4), optionally writing the pool. The trainer
compiles one step per mode it needs and picks one on the host per epoch.
Nothing here reads a value back to the host.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax
from flax import nnx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import optax

from roclip_jax import losses
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import roclip
from roclip_jax import sharding as sharding_lib
from roclip_jax.data import image_ops


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # i32[]
  params: dict[str, Any]  # nnx.Param values as a plain nested dict (orbax- and notebook-friendly).
  model_state: dict[str, Any]  # Other model variables, e.g. BatchNorm statistics of the ResNet.
  opt_state: optax.OptState
  pool: roclip.Pool | None  # None unless the defense uses RoCLIP's pool.
  rng: jax.Array  # u32[2] raw key, advanced every step.


@dataclasses.dataclass(frozen=True)
class StepMode:
  match: bool = False  # Pair each image with its nearest pool caption (a RoCLIP matching step).
  enqueue: bool = False  # Write this batch's caption embeddings into the pool.

  @property
  def name(self) -> str:
    return "roclip_match" if self.match else ("clip+pool" if self.enqueue else "clip")


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


def init_train_state(config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> TrainState:
  """Builds the initial state; meant to run under `jax.jit` with out_shardings."""
  key = jax.random.PRNGKey(config.seed)
  model_key, pool_key, step_key = jax.random.split(key, 3)
  model = models.build(config.model, rngs=nnx.Rngs(params=model_key))
  params, model_state = ModelSpec.split(model)
  pool = None
  if uses_pool(config):
    pool = roclip.init_pool(pool_key, config.roclip.pool_size, config.model.embed_dim)
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, model_state=model_state, opt_state=tx.init(params), pool=pool,
      rng=step_key,
  )


def state_shardings(abstract_state: TrainState, mesh: Mesh, config: ml_collections.ConfigDict) -> TrainState:
  """Parameters and optimizer state replicated; the pool sharded if asked."""
  replicated = NamedSharding(mesh, P())
  shardings = jax.tree.map(lambda _: replicated, abstract_state)
  if abstract_state.pool is not None:
    shardings = shardings.replace(pool=roclip.pool_shardings(mesh, config.roclip.shard_pool))
  return shardings


def abstract_train_state(config, mesh, tx) -> tuple[TrainState, TrainState]:
  """Shapes and shardings of the train state, without allocating it."""
  abstract = jax.eval_shape(functools.partial(init_train_state, config, tx))
  return abstract, state_shardings(abstract, mesh, config)


def create_train_state(config, mesh, tx, shardings: TrainState) -> TrainState:
  """Initialises the state directly in its sharded layout."""
  with jax.set_mesh(mesh):
    return jax.jit(functools.partial(init_train_state, config, tx), out_shardings=shardings)()


def loss_and_grads(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, mesh: Mesh,
                   config: ml_collections.ConfigDict, mode: StepMode):
  """The step's loss, its auxiliary outputs and the parameter gradients."""
  images = image_ops.normalize(batch["image"])
  tokens = batch["text"]
  shard_pool = bool(config.roclip.shard_pool) if state.pool is not None else False

  if mode.match:
    # Matching step: captions only feed the pool, so the text tower runs
    # forward only; its gradient is exactly zero (AdamW still applies momentum
    # and weight decay to it, as the original does, ROCLIP.md §1.4).
    text_model = spec.merge(state.params, state.model_state)
    ztxt = jax.lax.stop_gradient(losses.l2_normalize(text_model.encode_text(tokens)))

  def loss_fn(params):
    model = spec.merge(params, state.model_state)
    zimg = losses.l2_normalize(model.encode_image(images, train=True))
    log_scale = params["logit_scale"]
    if mode.match:
      match = roclip.nearest_captions(state.pool, zimg, mesh, shard_pool)
      loss, aux = roclip.matching_loss(zimg, match, log_scale)
      aux = dict(aux, match=match, ztxt=ztxt)
    else:
      zt = losses.l2_normalize(model.encode_text(tokens))
      loss, aux = losses.clip_loss(zimg, zt, log_scale)
      aux = dict(aux, ztxt=jax.lax.stop_gradient(zt))
    _, new_model_state = ModelSpec.split(model)
    return loss, (aux, new_model_state)

  (loss, (aux, new_model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  return loss, aux, grads, new_model_state


def train_step(state: TrainState, batch: dict[str, jax.Array], *, spec: ModelSpec, tx: optax.GradientTransformation,
               schedule: optax.Schedule, mesh: Mesh, config: ml_collections.ConfigDict,
               mode: StepMode) -> tuple[TrainState, dict[str, jax.Array]]:
  loss, aux, grads, new_model_state = loss_and_grads(state, batch, spec=spec, mesh=mesh, config=config, mode=mode)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  params["logit_scale"] = jnp.clip(params["logit_scale"], 0.0, losses.MAX_LOGIT_SCALE)

  pool = state.pool
  if mode.enqueue:
    shard_pool = bool(config.roclip.shard_pool)
    pool = roclip.enqueue(pool, aux["ztxt"], batch["id"], batch["poisoned"], mesh, shard_pool, config.roclip.fifo)

  metrics = {
      "loss": loss,
      "loss_i2t": aux["loss_i2t"],
      "loss_t2i": aux["loss_t2i"],
      "batch_accuracy": aux["batch_accuracy"],
      "lr": schedule(state.step),
      "logit_scale": jnp.exp(params["logit_scale"]),
      "grad_norm": optax.global_norm(grads),
      "param_norm": optax.global_norm(params),
  }
  if mode.match:
    match = aux["match"]
    poisoned = batch["poisoned"] > 0
    metrics["roclip/match_similarity"] = jnp.mean(match.similarity)
    metrics["roclip/poisoned_in_batch"] = jnp.sum(poisoned).astype(jnp.float32)
    # Poisoned images of this batch matched to a caption that came from a clean
    # example: the defense breaking the poisoned pair, as intended.
    metrics["roclip/poisoned_matched_clean"] = jnp.sum(poisoned & (match.source_poisoned == 0)).astype(jnp.float32)
  new_state = state.replace(step=state.step + 1, params=params, model_state=new_model_state, opt_state=opt_state,
                            pool=pool, rng=jax.random.split(state.rng)[0])
  return new_state, metrics


def step_modes(config: ml_collections.ConfigDict) -> dict[str, StepMode]:
  """The step modes a run needs: 'clip' always, plus 'match' for RoCLIP."""
  if not uses_pool(config):
    return {"clip": StepMode()}
  every_step = bool(config.roclip.update_pool_every_step)
  return {"clip": StepMode(match=False, enqueue=every_step), "match": StepMode(match=True, enqueue=True)}


def mode_for_epoch(config: ml_collections.ConfigDict, epoch: int) -> str:
  if uses_pool(config) and roclip.is_matching_epoch(epoch, config.roclip.k):
    return "match"
  return "clip"


def make_train_steps(config, mesh, spec, tx, schedule, shardings: TrainState) -> dict[str, Any]:
  """One jitted step per mode, with explicit shardings and the state donated."""
  batch_sh = sharding_lib.batch_sharding(mesh)
  replicated = NamedSharding(mesh, P())
  steps = {}
  for name, mode in step_modes(config).items():
    fn = functools.partial(train_step, spec=spec, tx=tx, schedule=schedule, mesh=mesh, config=config, mode=mode)
    steps[name] = jax.jit(fn, in_shardings=(shardings, batch_sh), out_shardings=(shardings, replicated),
                          donate_argnums=0)
  return steps
