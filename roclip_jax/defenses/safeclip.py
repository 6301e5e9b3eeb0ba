"""SafeCLIP ("Better Safe than Sorry", Yang, Gao, Mirzasoleiman, ICML 2024), in one file
(`config.defense = 'safeclip'`).

The method as implemented and its deviations from SafeCLIP's code: docs/methods.md, section 5.

A run goes through three phases, by epoch (1-based):

  1 .. W_in                'unimodal'    nearest-neighbour contrastive loss within each
                                         modality (NNCLR), no image-caption pairing at all
  W_in+1 .. W_in+W_mm      'cross_clip'  CLIP loss, cross-augmented, at a constant tiny lr
  later                    'safe_split'  at the start of every epoch, the cosine of every
                                         training image with its own caption goes through a
                                         2-component Gaussian mixture; the examples the
                                         high-mean component claims are 'safe' and get the
                                         CLIP loss, the rest ('risky') only unimodal losses

A poisoned pair is a mismatch, so after the warm-ups its cosine sits in the
low component and it never teaches the model its image-caption association.

Every step needs two augmented views of each example (`SafeClip.views = 2`).
Pieces:

* `SafeState`: each modality's bank (a `roclip.Pool` ring buffer of view-1
  embeddings, queried before it is written) and the per-example safe mask,
  indexed by example id, kept in the TrainState so a resumed run continues
  with the same split.
* `step_loss`: the loss of each phase, on global-batch embeddings.
* `fit_gmm` / `select_safe`: the split, in NumPy on the host.
* `dataset_similarities`: what feeds it, each example's own-caption cosine from the
  eval-mode pass over the training data (`roclip_jax.scoring`).
* `SafeClip`: the defense class; `SafeSplitter`: its per-epoch split hook.

Differences from the original code, on purpose: the risky examples' unimodal
loss and the safe examples' CLIP loss share one step over the same batch
(masked losses whose negatives are only examples of the same set, as in the
original's separate safe and risky loaders) instead of two passes per epoch
with two learning-rate schedules; and the banks receive every example's
view-1 embeddings, safe or risky.
"""

from __future__ import annotations

from collections.abc import Iterable
import dataclasses
import time
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections
import numpy as np
import optax

from roclip_jax import optim
from roclip_jax import scoring
from roclip_jax.data import metadata as metadata_lib
from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.defenses import base
from roclip_jax.defenses import roclip
from roclip_jax.errors import config_error

PHASES = ("unimodal", "cross_clip", "safe_split")
# Masked logits: finite, so an all-masked row gives a finite (and unused) value and no NaN gradient.
_MASKED_LOGIT = -1e9


@flax.struct.dataclass
class SafeState:
  image_bank: roclip.Pool  # View-1 image embeddings of recent examples.
  text_bank: roclip.Pool  # View-1 caption embeddings of recent examples.
  safe: jax.Array  # i8[N]: 1 = example id is in the current safe set.
  ratio: jax.Array  # f32[]: the safe fraction of the last split (the next one grows from it).


def phase_for_epoch(cfg: ml_collections.ConfigDict, epoch: int) -> str:
  """The phase of 1-based `epoch` (`cfg` is config.safeclip)."""
  if epoch <= cfg.inmodal_warmup:
    return "unimodal"
  if epoch <= cfg.inmodal_warmup + cfg.multimodal_warmup:
    return "cross_clip"
  return "safe_split"


def init_state(key: jax.Array, cfg: ml_collections.ConfigDict, dim: int, num_examples: int) -> SafeState:
  image_key, text_key = jax.random.split(key)
  return SafeState(
      image_bank=roclip.init_pool(image_key, cfg.bank_size, dim),
      text_bank=roclip.init_pool(text_key, cfg.bank_size, dim),
      safe=jnp.zeros((max(int(num_examples), 1),), jnp.int8),
      ratio=jnp.zeros((), jnp.float32),
  )


def state_shardings(mesh: Mesh) -> SafeState:
  """Everything replicated: the banks are small, and the mask is one byte per example."""
  bank = roclip.pool_shardings(mesh, shard_pool=False)
  replicated = NamedSharding(mesh, P())
  return SafeState(image_bank=bank, text_bank=bank, safe=replicated, ratio=replicated)


def learning_rate_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Per phase: warm-up + cosine at `in_lr` over the unimodal epochs, constant `filter_lr`
  over the CLIP warm-up, then warm-up + cosine at `optim.lr` over the rest."""
  s = config.safeclip
  unimodal_steps = s.inmodal_warmup * steps_per_epoch
  cross_steps = s.multimodal_warmup * steps_per_epoch
  rest = max(total_steps - unimodal_steps - cross_steps, 1)
  unimodal_cfg = ml_collections.ConfigDict(dict(config.optim.to_dict(), lr=s.in_lr, schedule="cosine"))
  parts = [
      optim.learning_rate_schedule(unimodal_cfg, unimodal_steps),
      optax.constant_schedule(s.filter_lr),
      optim.learning_rate_schedule(config.optim, rest),
  ]
  return optax.join_schedules(parts, [unimodal_steps, unimodal_steps + cross_steps])


# ----------------------------------------------------------------------------
# Losses (global batch; every embedding a unit row).


def masked_info_nce(
    queries: jax.Array, keys: jax.Array, log_scale: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Mean over the masked rows of -log softmax(exp(t) * q_i . k_j)_i, over the masked columns j.

  Row i's positive is key i; the negatives are the other masked keys. With no
  masked row the loss is 0.
  """
  logits = jnp.exp(log_scale) * queries @ keys.T
  if mask is None:
    mask = jnp.ones((queries.shape[0],), bool)
  mask = mask.astype(bool)
  logits = jnp.where(mask[None, :], logits, _MASKED_LOGIT)
  per_row = jax.nn.logsumexp(logits, axis=1) - jnp.diagonal(logits)
  return jnp.sum(jnp.where(mask, per_row, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def masked_clip_loss(
    zimg: jax.Array, ztxt: jax.Array, log_scale: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """Symmetric InfoNCE restricted to the masked pairs (both as anchors and as negatives)."""
  return 0.5 * (masked_info_nce(zimg, ztxt, log_scale, mask) + masked_info_nce(ztxt, zimg, log_scale, mask))


def nn_contrastive_loss(
    view1: jax.Array, view2: jax.Array, bank: roclip.Pool, log_scale: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
  """NNCLR-style loss of one modality: view 2 of example i must pick NN(view 1 of i) among the
  batch's NN(view 1 of j), NN being the most similar bank row (a constant: the bank is read
  before this batch is written). Returns the loss and the cosine of each view 1 with its NN."""
  view1 = jax.lax.stop_gradient(view1)
  sims = view1 @ bank.embeddings.T
  index = jnp.argmax(sims, axis=1)
  neighbours = jax.lax.stop_gradient(bank.embeddings[index])
  return masked_info_nce(view2, neighbours, log_scale, mask), jnp.max(sims, axis=1)


def step_loss(
    phase: str, z: dict[str, jax.Array], state: SafeState, ids: jax.Array, log_scale: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of a `phase` step.

  Args:
    phase: one of PHASES.
    z: unit embeddings [B, d] of 'image', 'text' (view 1) and 'image2', 'text2' (view 2).
    state: the banks and the safe mask.
    ids: [B] example ids (index the safe mask).
    log_scale: the model's logit scale t.
  """
  if phase not in PHASES:
    raise ValueError(f"SafeCLIP phase {phase!r} is not one of {PHASES}.")
  aux: dict[str, jax.Array] = {}
  if phase == "cross_clip":
    safe = None
    risky = jnp.zeros(ids.shape, bool)
  elif phase == "unimodal":
    safe = jnp.zeros(ids.shape, bool)
    risky = None
  else:
    safe = state.safe[ids] > 0
    risky = ~safe
    aux.update(safe=safe, safe_in_batch=jnp.sum(safe).astype(jnp.float32))

  loss = jnp.zeros((), jnp.float32)
  if phase != "unimodal":
    # Cross-augmented CLIP loss: image view 1 with caption view 2, and image view 2 with caption view 1.
    clip_part = 0.5 * (
        masked_clip_loss(z["image"], z["text2"], log_scale, safe)
        + masked_clip_loss(z["image2"], z["text"], log_scale, safe)
    )
    aux["loss_clip"] = clip_part
    loss = loss + clip_part
  if phase != "cross_clip":
    image_part, image_nn = nn_contrastive_loss(z["image"], z["image2"], state.image_bank, log_scale, risky)
    text_part, text_nn = nn_contrastive_loss(z["text"], z["text2"], state.text_bank, log_scale, risky)
    unimodal = 0.5 * (image_part + text_part)
    aux.update(loss_unimodal=unimodal, image_nn_similarity=jnp.mean(image_nn), text_nn_similarity=jnp.mean(text_nn))
    loss = loss + unimodal
  logits = z["image"] @ z["text"].T
  labels = jnp.arange(logits.shape[0])
  aux["batch_accuracy"] = jnp.mean(jnp.argmax(logits, axis=1) == labels)
  return loss, aux


def write_banks(
    state: SafeState, z: dict[str, jax.Array], ids: jax.Array, poisoned: jax.Array, mesh: Mesh
) -> SafeState:
  """Appends this batch's view-1 embeddings to the banks (after they were read)."""
  return state.replace(
      image_bank=roclip.enqueue(state.image_bank, z["image"], ids, poisoned, mesh, shard_pool=False),
      text_bank=roclip.enqueue(state.text_bank, z["text"], ids, poisoned, mesh, shard_pool=False),
  )


# ----------------------------------------------------------------------------
# The safe/risky split (host side).


@dataclasses.dataclass(frozen=True)
class GaussianMixture1D:
  weights: np.ndarray  # [2], sum to 1
  means: np.ndarray  # [2], ascending: component 1 is the high-mean one
  variances: np.ndarray  # [2]

  def log_densities(self, x: np.ndarray) -> np.ndarray:
    """[N, 2]: log(weight_k * N(x; mean_k, var_k))."""
    x = np.asarray(x, np.float64)[:, None]
    return (
        np.log(self.weights) - 0.5 * np.log(2 * np.pi * self.variances) - 0.5 * (x - self.means) ** 2 / self.variances
    )

  def posterior_high(self, x: np.ndarray) -> np.ndarray:
    """P(high-mean component | x) for every x."""
    log_p = self.log_densities(x)
    log_p -= log_p.max(axis=1, keepdims=True)
    p = np.exp(log_p)
    return p[:, 1] / p.sum(axis=1)


def fit_gmm(x: np.ndarray, max_iters: int = 200, tol: float = 1e-8, var_floor: float = 1e-6) -> GaussianMixture1D:
  """Maximum-likelihood 2-component Gaussian mixture on 1-D data, by EM.

  Deterministic: starts from the lower and upper halves' moments (sklearn
  starts from k-means, which lands in the same place on bimodal data).
  """
  x = np.asarray(x, np.float64).ravel()
  if x.size < 2 or not np.all(np.isfinite(x)):
    raise ValueError(f"fit_gmm needs at least 2 finite values; got {x.size} (finite: {np.isfinite(x).sum()}).")
  floor = var_floor * max(float(np.var(x)), 1e-12)
  order = np.sort(x)
  low, high = order[: x.size // 2], order[x.size // 2 :]
  gmm = GaussianMixture1D(
      weights=np.array([0.5, 0.5]),
      means=np.array([low.mean(), high.mean()]),
      variances=np.maximum(np.array([low.var(), high.var()]), floor),
  )
  previous = -np.inf
  for _ in range(max_iters):
    log_p = gmm.log_densities(x)
    norm = np.logaddexp(log_p[:, 0], log_p[:, 1])
    resp = np.exp(log_p - norm[:, None])  # [N, 2]
    counts = np.maximum(resp.sum(axis=0), 1e-12)
    means = (resp * x[:, None]).sum(axis=0) / counts
    variances = np.maximum((resp * (x[:, None] - means) ** 2).sum(axis=0) / counts, floor)
    gmm = GaussianMixture1D(weights=counts / x.size, means=means, variances=variances)
    likelihood = float(norm.mean())
    if likelihood - previous < tol:
      break
    previous = likelihood
  if gmm.means[0] > gmm.means[1]:
    gmm = GaussianMixture1D(
        weights=gmm.weights[::-1].copy(), means=gmm.means[::-1].copy(), variances=gmm.variances[::-1].copy()
    )
  return gmm


def select_safe(
    posterior: np.ndarray, *, first_split: bool, previous_ratio: float, cfg: ml_collections.ConfigDict
) -> tuple[np.ndarray, float]:
  """The safe set of one epoch as a boolean mask over `posterior`'s examples, and its ratio.

  First split after the warm-ups: posterior >= `threshold`. Later: the
  `ratio` examples with the highest posterior, ratio = previous + `ratio_step`
  (capped at `max_ratio`). Ties at the cut go to the lower index.
  """
  n = posterior.size
  if first_split:
    safe = posterior >= cfg.threshold
    return safe, float(safe.mean()) if n else 0.0
  ratio = min(float(cfg.max_ratio), previous_ratio + float(cfg.ratio_step))
  count = int(round(ratio * n))
  safe = np.zeros(n, bool)
  safe[np.argsort(-posterior, kind="stable")[:count]] = True
  return safe, ratio


# ----------------------------------------------------------------------------
# The per-epoch similarity pass.


def own_caption_similarity(image_emb: jax.Array, caption_emb: jax.Array) -> dict[str, jax.Array]:
  """The head of the split's pass (`scoring.make_encode_fn`): each example's image-caption cosine [B],
  summed on device, so only [B] floats per batch come back to the host."""
  return {"similarity": jnp.sum(image_emb * caption_emb, axis=1)}


def dataset_similarities(
    encode_fn,
    params,
    model_state,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    num_examples: int,
    progress: Any = None,
) -> np.ndarray:
  """The own-caption cosine of every example id in [0, num_examples); NaN for ids not seen
  (undecodable images). `encode_fn` is `scoring.make_encode_fn` with `own_caption_similarity`;
  `batches` is this host's `pipeline.scoring_batches`; `progress`, if given (a
  `metadata.progress_bar`), advances by the examples of each global batch."""
  out = np.full((num_examples,), np.nan, np.float64)
  for batch in scoring.encoded_batches(encode_fn, params, model_state, batches, mesh):
    out[batch["id"]] = batch["similarity"]
    if progress is not None:  # Every host has the whole global batch: this counts all hosts' examples.
      progress.update(len(batch["id"]))
  return out


@dataclasses.dataclass(frozen=True)
class Split:
  safe: np.ndarray  # bool [N]
  ratio: float
  posterior: np.ndarray  # [N], NaN where the similarity was unknown
  gmm: GaussianMixture1D


def split_dataset(
    similarities: np.ndarray, *, first_split: bool, previous_ratio: float, cfg: ml_collections.ConfigDict
) -> Split:
  """GMM on the known similarities, then `select_safe`; unknown ids are never safe."""
  known = np.isfinite(similarities)
  gmm = fit_gmm(similarities[known])
  posterior = np.full(similarities.shape, np.nan)
  posterior[known] = gmm.posterior_high(similarities[known])
  safe_known, ratio = select_safe(posterior[known], first_split=first_split, previous_ratio=previous_ratio, cfg=cfg)
  safe = np.zeros(similarities.shape, bool)
  safe[np.flatnonzero(known)[safe_known]] = True
  return Split(safe=safe, ratio=ratio, posterior=posterior, gmm=gmm)


def place_split(state: SafeState, split: Split, shardings: SafeState) -> SafeState:
  """The new mask and ratio on device, in the state's (replicated) layout, on every host."""
  mask = split.safe.astype(np.int8)
  ratio = np.asarray(split.ratio, np.float32)
  put = lambda value, sharding: jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return state.replace(safe=put(mask, shardings.safe), ratio=put(ratio, shardings.ratio))


# ----------------------------------------------------------------------------
# The defense.

TWO_VIEWS = dict(image_views=("image", "image2"), text_views=("text", "text2"), gather=True)
STEPS = {phase: base.StepKind(phase, **TWO_VIEWS) for phase in PHASES}


def recorded_num_examples(config: ml_collections.ConfigDict) -> int:
  """The example count that versions before `run_info.json` wrote into `config.safeclip`, whichever
  defense the run trained (0: none)."""
  return int(config.get("safeclip", {}).get("num_examples", 0) or 0)


class SafeClip(base.Defense):
  """SafeCLIP: one two-view step kind per phase; the split runs on the host before each 'safe_split' epoch."""

  name = "safeclip"
  config_block = "safeclip"
  views = 2

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    # docs/methods.md, section 5. Defaults: SafeCLIP's published ones.
    c = ml_collections.ConfigDict()
    c.inmodal_warmup = 5  # Epochs of unimodal nearest-neighbour contrastive learning.
    c.multimodal_warmup = 1  # Then epochs of cross-augmented CLIP loss at `filter_lr`.
    c.in_lr = 5e-4  # Peak lr of the unimodal warm-up (warm-up + cosine over those epochs).
    c.filter_lr = 5e-6  # Constant lr of the CLIP warm-up.
    c.bank_size = 256  # Rows of each modality's nearest-neighbour bank.
    c.threshold = 0.9  # First split: safe = GMM posterior of the high-mean component >= this.
    c.ratio_step = 0.01  # Later splits: the safe fraction grows by this per epoch ...
    c.max_ratio = 0.85  # ... up to this.
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
    del num_batch_shards
    s = config.safeclip
    if config.loss != "clip":
      raise config_error(
          "loss",
          f"is {config.loss!r} with defense='safeclip', whose safe/risky split masks an " "InfoNCE loss.",
          "use config.loss='clip' with SafeCLIP.",
      )
    if s.inmodal_warmup < 0 or s.multimodal_warmup < 0:
      raise config_error("safeclip.inmodal_warmup", "and safeclip.multimodal_warmup must be >= 0.", "use e.g. 5 and 1.")
    if s.inmodal_warmup + s.multimodal_warmup >= config.num_epochs:
      raise config_error(
          "safeclip.inmodal_warmup",
          f"+ multimodal_warmup = {s.inmodal_warmup + s.multimodal_warmup} "
          f"leaves no epoch of the {config.num_epochs} for the safe/risky split.",
          "train for more epochs or shorten the warm-ups.",
      )
    if s.bank_size < config.data.batch_size:
      raise config_error(
          "safeclip.bank_size",
          f"{s.bank_size} is smaller than the global batch " f"{config.data.batch_size}.",
          "use a bank at least as large as the batch.",
      )
    if not 0 < s.threshold < 1 or not 0 < s.max_ratio <= 1 or s.ratio_step < 0:
      raise config_error(
          "safeclip.threshold",
          "must lie in (0, 1), max_ratio in (0, 1] and ratio_step >= 0.",
          "use SafeCLIP's published 0.9, 0.85 and 0.01.",
      )
    if min(s.in_lr, s.filter_lr) <= 0:
      raise config_error("safeclip.in_lr", "and safeclip.filter_lr must be positive.", "use e.g. 5e-4 and 5e-6.")

  def init_state(self, key: jax.Array) -> SafeState:
    return init_state(
        jax.random.fold_in(key, 1), self.config.safeclip, self.config.model.embed_dim, self.facts.num_examples
    )

  def state_shardings(self, mesh: Mesh) -> SafeState:
    return state_shardings(mesh)

  def learning_rate_schedule(self, total_steps: int) -> optax.Schedule:
    return learning_rate_schedule(self.config, self.facts.steps_per_epoch, total_steps)

  def schedule(self, epoch: int) -> base.StepKind:
    return STEPS[phase_for_epoch(self.config.safeclip, epoch)]

  def loss(self, kind, z, scalars, state, batch, mesh, pair_loss):
    del pair_loss  # SafeCLIP's losses are InfoNCE by construction (validate checks config.loss).
    ids = jax.lax.with_sharding_constraint(batch["id"], NamedSharding(mesh, P()))
    return step_loss(kind.name, z, state, ids, scalars["logit_scale"])

  def update_state(self, kind, state, z, aux, batch, mesh):
    del kind, aux
    return write_banks(state, {"image": z["image"], "text": z["text"]}, batch["id"], batch["poisoned"], mesh)

  def update_stats(self, kind, stats, z, aux, batch, step):
    del kind, z, step
    metrics = {
        f"safeclip/{k}": aux[k] for k in ("image_nn_similarity", "text_nn_similarity", "safe_in_batch") if k in aux
    }
    if "safe" in aux:  # A safe_split step: the batch's poisons that got the CLIP loss.
      metrics["safeclip/poisoned_in_safe"] = jnp.sum(aux["safe"] & (batch["poisoned"] > 0)).astype(jnp.float32)
    return stats, metrics

  def epoch_hooks(self, context: base.RunContext) -> base.EpochHooks:
    return SafeSplitter(context)

  @classmethod
  def table_notes(cls, config: ml_collections.ConfigDict, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    del rows  # One note for all of them: they share the experiment's `safeclip` block.
    sc = config.safeclip
    return [
        f"SafeCLIP: {sc.inmodal_warmup} unimodal warm-up epochs (lr {sc.in_lr:g}), {sc.multimodal_warmup} "
        f"CLIP epoch(s) at lr {sc.filter_lr:g}, then a Gaussian-mixture safe/risky split every epoch "
        f"(first: posterior >= {sc.threshold:g}; then +{sc.ratio_step:g} per epoch, at most {sc.max_ratio:g})."
    ]


class SafeSplitter(base.EpochHooks):
  """SafeCLIP's per-epoch split (docs/methods.md, section 5): every training example's own-caption cosine,
  a Gaussian mixture, the new safe mask into the state. One explicit host round trip per epoch."""

  def __init__(self, context: base.RunContext):
    config = context.config
    self._config, self._mesh, self._data = config, context.mesh, context.train_data
    self._shardings = context.state_shardings.defense
    self._encode = scoring.make_encode_fn(context.spec, context.mesh, own_caption_similarity)
    self._transform = None
    if config.poison.enabled:
      self._transform = poison_lib.make_image_transform(config.poison, seed=config.poison.seed)
    self._first_split_epoch = config.safeclip.inmodal_warmup + config.safeclip.multimodal_warmup + 1
    self._poisoned = None  # Which ids carry a poison, to report how many the split lets through.
    if config.poison.enabled:  # From the metadata: no image is read.
      self._poisoned = metadata_lib.poisoned_flags(self._data.source)

  def start_epoch(self, state: Any, epoch: int, kind: base.StepKind) -> tuple[Any, dict[str, Any] | None]:
    if kind.name != "safe_split":
      return state, None
    t0 = time.perf_counter()
    batches = pipeline.scoring_batches(
        self._config,
        self._data.source,
        batch_size=self._data.local_batch_size,
        image_transform=self._transform,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    num_examples = self._data.num_examples
    show = jax.process_index() == 0 and self._config.progress_bar
    with metadata_lib.progress_bar(num_examples, f"SafeCLIP split, epoch {epoch}", enabled=show) as bar:
      sims = dataset_similarities(
          self._encode, state.params, state.model_state, batches, self._mesh, num_examples, progress=bar
      )
    first = epoch == self._first_split_epoch
    previous = float(jax.device_get(state.defense.ratio))
    split = split_dataset(sims, first_split=first, previous_ratio=previous, cfg=self._config.safeclip)
    state = state.replace(defense=place_split(state.defense, split, self._shardings))
    seconds = time.perf_counter() - t0
    row = {
        "epoch": epoch,
        "safeclip/safe_ratio": split.ratio,
        "safeclip/gmm_low_mean": float(split.gmm.means[0]),
        "safeclip/gmm_high_mean": float(split.gmm.means[1]),
        "safeclip/split_seconds": seconds,
        # The pass is linear in the examples: this figure carries over to another dataset size.
        "safeclip/split_seconds_per_100k": seconds * 100_000 / max(num_examples, 1),
        "safeclip/unscored": int(np.sum(~np.isfinite(sims))),
    }
    if self._poisoned is not None and self._poisoned.any():  # Poisons let into the safe set (ideally none).
      row["safeclip/poisons_in_safe_frac"] = float(np.mean(split.safe[self._poisoned]))
    logging.info(
        "SafeCLIP split for epoch %d: %d examples in %.1f s (%.1f s per 100k examples, %.0f examples/s): %s",
        epoch,
        num_examples,
        seconds,
        row["safeclip/split_seconds_per_100k"],
        num_examples / max(seconds, 1e-9),
        row,
    )
    return state, row
