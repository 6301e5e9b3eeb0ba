"""The RoCLIP defense (`config.defense = 'roclip'`): a pool of recent caption embeddings and top-1 matching.

Everything RoCLIP adds to CLIP training lives in this file (the method:
docs/roclip.md, section 1; the pool's mechanics: docs/methods.md, section 4),
ending with the `RoClip` defense class that plugs it into the generic step:

* `Pool`: a FIFO ring buffer of M x d L2-normalised, stop-gradient text
  embeddings, held on device inside the train state, so it is sharded, donated
  and checkpointed with the model (the original code loses it on resume).
  It starts as random unit vectors (the authors' code keeps lightly's raw
  random rows, of norm ~sqrt(d): docs/methods.md, section 4).
* `nearest_captions`: each image embedding finds its cosine top-1 row of the
  pool. With a sharded pool every device searches its own rows, then a
  cross-device reduction picks the global winner; the pool is never gathered.
* `enqueue`: writes the current batch's caption embeddings after the query, so
  an image never matches its own caption.
* `matching_loss`: the InfoNCE loss with the matched caption in place of the
  image's own caption, in both directions.
* `is_matching_epoch`: epoch e (from 1) is a matching epoch iff e % K == 0.

Sharded layout: with `shard_pool`, row block s of the pool lives on batch shard
s and is written only by that shard's slice of the batch, so enqueueing needs no
communication. The pool is then n independent rings of M/n rows; together they
hold the most recent M/n embeddings of every shard's stream, i.e. the same
steps' captions as one global ring of M rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

from absl import logging
import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import ml_collections

from roclip_jax import losses
from roclip_jax import sharding as sharding_lib
from roclip_jax.defenses import base
from roclip_jax.errors import config_error

FIFO_MODES = ("ring", "lightly")
# The input dtype of the lookup's [B, d] x [d, M] similarity matmul (`roclip.lookup_dtype`); it always
# accumulates in float32.
LOOKUP_DTYPES = ("float32", "bfloat16")


@flax.struct.dataclass
class Pool:
  embeddings: jax.Array  # f32[M, d], unit rows.
  source_ids: jax.Array  # i32[M], example id of the caption in each row; -1 = random init.
  source_poisoned: jax.Array  # i8[M], poison kind of that example; -1 = random init.
  ptr: jax.Array  # i32[], next row to write (inside each shard when sharded).
  # i32[M], class label of that example where the data has labels (-1 = unknown or random init);
  # for the diagnostics only, like the two fields above.
  source_labels: jax.Array | None = None
  # i8[N], per training example: the gate's passes minus its fails so far (`gate_memory`; None
  # without it). Kept with the pool since both are read by the gated step and written after it.
  gate_votes: jax.Array | None = None

  @property
  def size(self) -> int:
    return self.embeddings.shape[0]


@flax.struct.dataclass
class Match:
  embeddings: jax.Array  # f32[B, d], the matched pool rows (stop-gradient).
  index: jax.Array  # i32[B], global pool row of each match.
  similarity: jax.Array  # f32[B], cosine of image and matched caption.
  source_poisoned: jax.Array  # i8[B], poison kind of the matched caption's example.
  source_label: jax.Array | None = None  # i32[B], class label of the matched caption's example (-1 unknown).


# ----------------------------------------------------------------------------
# Variants and schedule.

VARIANTS = ("paper", "robust", "gated")
# `Settings.first_epoch` of a schedule without matching epochs (the gated variant's default).
NO_MATCHING = 0


@dataclasses.dataclass(frozen=True)
class Settings:
  """The matching rule, resolved from `config.roclip` (`settings`)."""

  variant: str
  k: int  # A matching epoch every k epochs ...
  first_epoch: int  # ... starting with this one (epochs count from 1; NO_MATCHING: none).
  pool_every_step: bool  # Write the pool in CLIP epochs too, so it is fresh when matching starts.
  csls_k: int  # 0: cosine top-1 (the paper); > 0: hubness-aware CSLS matching over this many neighbours.
  mask_duplicates: bool  # Images matched to one pool row are not each other's negatives.
  exclude_own: bool  # An image never matches a row written from its own example.
  # Images whose matched captions say the same thing share their positives (soft targets from the
  # captions' text-text similarity), not only images matched to the same row.
  content_targets: bool
  # CLIP epochs from `gate_first_epoch` on train a pair on its own caption only where the image's own
  # caption is at least as close to it as the pool caption matching would give it (`own_pair_gate`).
  own_pair_gate: bool = False
  gate_first_epoch: int = 0
  gate_quorum: float = 0.5  # The gate acts in a step only where at least this share of the batch passes.
  # A pair keeps its positive where most of its example's gate decisions so far passed (this one
  # included), rather than where this step's alone passed (`trusted_pairs`).
  gate_memory: bool = False
  # A pair the gate does not trust leaves the batch: neither a positive nor anyone's negative
  # (`gated_pair_loss`), rather than staying a negative for the others.
  drop_untrusted: bool = False
  # A failing pair is excused where most of its peers (the batch's other pairs whose captions say
  # the same) fail too (`excused_by_peers`).
  gate_peers: bool = False
  # What the image tower's own view adds to a failing pair (`image_sides_with_caption`): 'none';
  # 'excuse' (a failure it contradicts abstains, as a peers' excuse); 'pass' (it counts as a pass).
  image_evidence: str = "none"
  # What the comparison of the two contents' pool captions adds to a failing pair (`content_gate`: the
  # image on average at least as close to the pool's captions that say what its own caption says as to
  # those that say what its match says): 'none'; 'excuse' (it abstains); 'pass' (it counts as a pass).
  content_evidence: str = "none"
  # Which views the gate judges a pair by (`GATE_VIEWS`): 'augmented', the views it trains on;
  # 'plain', the example before augmentation (`image_plain`, `text_plain`); 'plain_text', the
  # augmented image with the caption before EDA. It trains on the augmented views either way.
  gate_views: str = "augmented"


# The uses of a piece of evidence against a gate failure (`image_evidence`, `content_evidence`).
EVIDENCE_USES = ("none", "excuse", "pass")
GATE_VIEWS = ("augmented", "plain", "plain_text")

# What each variant sets for the knobs left unset (None) in `config.roclip`; explicit values win,
# which is how the robust variant is ablated one piece at a time.
_ROBUST = dict(update_pool_every_step=True, csls_k=10, mask_duplicates=True, exclude_own=True, content_targets=True)
# The gate's knobs off: the paper and robust variants.
_UNGATED = dict(
    own_pair_gate=False,
    gate_memory=False,
    drop_untrusted=False,
    gate_peers=False,
    image_evidence="none",
    content_evidence="none",
    gate_views="augmented",
)
VARIANT_DEFAULTS = {
    "paper": dict(
        _UNGATED,
        update_pool_every_step=False,
        csls_k=0,
        mask_duplicates=False,
        exclude_own=False,
        content_targets=False,
    ),
    "robust": dict(_ROBUST, **_UNGATED),
    # The default since issue 22 (docs/roclip.md, section 8): the robust variant's pool and lookup,
    # used to decide which pairs train on their own captions (`own_pair_gate`) rather than as
    # positives; matching epochs only where `first_epoch` is set.
    "gated": dict(_ROBUST, **_UNGATED)
    | dict(own_pair_gate=True, gate_memory=True, drop_untrusted=True, gate_peers=True, image_evidence="excuse"),
}


def settings(cfg, *, steps_per_epoch: int = 1, warmup_steps: int = 0, num_epochs: int = 0) -> Settings:
  """`config.roclip` -> `Settings`.

  `first_epoch` unset: the paper's schedule (epoch k first) for 'paper'; for
  'robust', the first epoch of the k-schedule that starts after the learning-rate
  warm-up has ended and no earlier than the middle of the run (epoch
  ceil(num_epochs / 2); 0 epochs: no such bound). A matching step trains the image
  tower toward the model's own nearest captions, which are only as right as the
  model: on the digits benchmark 17% of the first matches after the warm-up had
  the image's class (CLIP+aug then classified 36% right); matching from there ended
  40 points below the control, from the middle 4 (docs/roclip.md, section 8).
  """
  variant = cfg.variant
  if variant not in VARIANTS:
    raise ValueError(f"roclip.variant={variant!r} is unknown; use one of {VARIANTS}.")
  knobs = dict(VARIANT_DEFAULTS[variant])
  for name in knobs:  # Unset (None or absent) knobs take the variant's value.
    if cfg.get(name) is not None:
      knobs[name] = cfg.get(name)
  k = int(cfg.k)
  warmup_epochs = -(-int(warmup_steps) // max(int(steps_per_epoch), 1))  # ceil
  first = cfg.get("first_epoch")
  if first is None and variant == "gated":
    first = NO_MATCHING
  if first is None:
    first = k
    if variant == "robust":
      middle = -(-int(num_epochs) // 2)  # ceil
      while first <= warmup_epochs or first < middle:
        first += k
  # Unset: the first epoch after the learning-rate warm-up, as the robust start; from there the gate
  # acts in each step where a quorum of the batch agrees (`GATE_QUORUM`), which a model that has not
  # yet learnt the data does not reach.
  gate_first = cfg.get("gate_first_epoch")
  if gate_first is None:
    gate_first = warmup_epochs + 1
  return Settings(
      variant=variant,
      k=k,
      first_epoch=int(first),
      pool_every_step=bool(knobs["update_pool_every_step"]),
      csls_k=int(knobs["csls_k"]),
      mask_duplicates=bool(knobs["mask_duplicates"]),
      exclude_own=bool(knobs["exclude_own"]),
      content_targets=bool(knobs["content_targets"]),
      own_pair_gate=bool(knobs["own_pair_gate"]),
      gate_first_epoch=gate_first,
      gate_quorum=float(cfg.get("gate_quorum", GATE_QUORUM)),
      gate_memory=bool(knobs["gate_memory"]) and bool(knobs["own_pair_gate"]),
      drop_untrusted=bool(knobs["drop_untrusted"]) and bool(knobs["own_pair_gate"]),
      gate_peers=bool(knobs["gate_peers"]) and bool(knobs["own_pair_gate"]),
      image_evidence=str(knobs["image_evidence"]) if knobs["own_pair_gate"] else "none",
      content_evidence=str(knobs["content_evidence"]) if knobs["own_pair_gate"] else "none",
      gate_views=str(knobs["gate_views"]) if knobs["own_pair_gate"] else "augmented",
  )


def is_matching_epoch(epoch: int, k: int, first_epoch: int | None = None) -> bool:
  """Epochs count from 1; with K=2 epochs 2, 4, 6, ... are matching epochs (the paper).

  With `first_epoch`, the matching epochs are first_epoch, first_epoch + k, ...
  """
  first = k if first_epoch is None else first_epoch
  if first == NO_MATCHING:
    return False
  return k > 0 and epoch >= first and (epoch - first) % k == 0


def init_pool(key: jax.Array, size: int, dim: int) -> Pool:
  """Random unit vectors: the first ~M/B matching steps match partly against
  noise, as in the original (whose lightly bank keeps the rows unnormalised,
  norm ~sqrt(d), a quirk not reproduced: docs/methods.md, section 4)."""
  emb = losses.l2_normalize(jax.random.normal(key, (size, dim), jnp.float32))
  return Pool(
      embeddings=emb,
      source_ids=jnp.full((size,), -1, jnp.int32),
      source_poisoned=jnp.full((size,), -1, jnp.int8),
      ptr=jnp.zeros((), jnp.int32),
      source_labels=jnp.full((size,), -1, jnp.int32),
  )


def pool_shardings(mesh: Mesh, shard_pool: bool) -> Pool:
  rows = NamedSharding(mesh, P(sharding_lib.batch_axes(mesh)) if shard_pool else P())
  return Pool(embeddings=rows, source_ids=rows, source_poisoned=rows, ptr=NamedSharding(mesh, P()), source_labels=rows)


def matching_loss(
    zimg: jax.Array, match: Match, log_scale: jax.Array, mask_duplicates: bool = False, content_targets: bool = False
):
  """L_RoCLIP (docs/roclip.md, section 1): InfoNCE of images against their matched captions.

  The own caption does not appear; the matched rows are constants, so only the
  image tower and the logit scale get gradients.

  `mask_duplicates` (the robust variant): when images i and j matched the same
  pool row, the paper's loss asks image i to prefer its caption over the very
  same vector in column j (and the caption over image j in the other
  direction): contradicting targets whose optimum is to give up, which is how
  hubs drag the batch into collapse. Masking removes such pairs from each
  other's negatives (`losses.clip_loss`'s `same_target`); with no duplicate
  matches the loss is the paper's.

  `content_targets` (the robust variant; docs/roclip.md, section 8): duplicates by content rather than
  by row. With templated or near-duplicate captions (web alt-text, "a handwritten seven" written by
  thousands), images matched to *different* rows holding the same text are still asked to tell
  identical vectors apart, which has no solution but shrinking every similarity. Here image i's
  target over the batch's matched captions is the text tower's own distribution
  softmax_j(s cos(m_i, m_j)), at the model's own logit scale s (a constant in the target): a caption
  the text tower cannot tell from m_i counts as a positive as much as m_i itself, a caption of other
  content counts as a negative. Both directions use it (the matrix is symmetric). With
  `content_targets`, `mask_duplicates` is implied (rows that are the same vector get equal target
  mass) and ignored.
  """
  captions = jax.lax.stop_gradient(match.embeddings)
  if content_targets:
    return soft_target_clip_loss(zimg, captions, log_scale)
  same = (match.index[:, None] == match.index[None, :]) if mask_duplicates else None
  return losses.clip_loss(zimg, captions, log_scale, same_target=same)


def soft_target_clip_loss(zimg: jax.Array, captions: jax.Array, log_scale: jax.Array):
  """Symmetric InfoNCE of images against captions with targets T = softmax(s C C^T) (rows sum to 1).

  `captions` [B, d] are constants (matched pool rows); s = exp(log_scale) is taken without gradient
  in the targets, so the loss trains the temperature only through the logits, as CLIP's does.
  """
  scale = jnp.exp(log_scale)
  targets = jax.nn.softmax(jax.lax.stop_gradient(scale) * captions @ captions.T, axis=1)  # [B, B]
  logits = scale * zimg @ captions.T  # rows: images
  loss_i2t = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits, axis=1), axis=1))
  loss_t2i = -jnp.mean(jnp.sum(targets * jax.nn.log_softmax(logits.T, axis=1), axis=1))
  # An image counts as right when its top caption is one of its targets' most likely (its own or a
  # caption the text tower holds identical to it).
  best = jnp.max(targets, axis=1)
  hit_i2t = jnp.take_along_axis(targets, jnp.argmax(logits, axis=1)[:, None], axis=1)[:, 0] >= best
  hit_t2i = jnp.take_along_axis(targets, jnp.argmax(logits, axis=0)[:, None], axis=1)[:, 0] >= best
  accuracy = 0.5 * (jnp.mean(hit_i2t) + jnp.mean(hit_t2i))
  return 0.5 * (loss_i2t + loss_t2i), {"loss_i2t": loss_i2t, "loss_t2i": loss_t2i, "batch_accuracy": accuracy}


# The share of a batch whose matches must agree with their own captions before the gate acts.
GATE_QUORUM = 0.5


def own_pair_gate(ztxt: jax.Array, match: Match, pool: Pool) -> jax.Array:
  """f32[B]: 1 where image i's own caption says what its matched pool caption says, else 0
  (docs/roclip.md, section 8). "Says the same": the text tower puts the matched caption m_i closer to
  the own caption t_i than halfway from the pool's mean caption to t_i itself,
  cos(t_i, m_i) >= (1 + cos(t_i, mean pool row)) / 2: a paraphrase or an identical caption passes, a
  caption about something else sits near the pool's mean and fails.

  Why it separates poisoned pairs: a poisoned caption does not describe its image, so until the model
  has learnt the attack the caption matching finds for a poisoned image describes what the image
  shows, not the attacker's caption.
  """
  ztxt = jax.lax.stop_gradient(ztxt)
  agreement = jnp.sum(ztxt * match.embeddings, axis=-1)
  return (agreement >= _says_the_same_bar(ztxt, pool)).astype(jnp.float32)


def content_gate(zimg: jax.Array, ztxt: jax.Array, match: Match, pool: Pool, ids: jax.Array | None = None) -> jax.Array:
  """f32[B]: 1 where image i's mean cosine to the pool captions that say what its own caption t_i
  says is at least its mean cosine to the pool captions that say what its match m_i says ("says the
  same" by the gate's halfway rule, relative to t_i and to m_i; `ids`: rows written from the image's
  own example are in neither group); 0 where no pool caption says what t_i says.

  Why: the row gate (`own_pair_gate`) reads the image's content off one pool row, the nearest, which
  with paraphrased captions is as much a choice between templates as between contents. The mean over
  each content's captions compares the two contents themselves (as zero-shot classification averages
  its templates), on the same image-text evidence: a poisoned image still sits closer to the captions
  of what it shows until the model has learnt the attack, so it still fails.
  """
  zimg, ztxt, zm = (jax.lax.stop_gradient(x) for x in (zimg, ztxt, match.embeddings))
  rows = pool.embeddings
  image_cos = zimg @ rows.T
  usable = True if ids is None else pool.source_ids[None, :] != ids[:, None]
  to_own, num_own = _mean_where(image_cos, _captions_saying(ztxt, rows, pool) & usable)
  to_match, _ = _mean_where(image_cos, _captions_saying(zm, rows, pool) & usable)
  return ((num_own > 0) & (to_own >= to_match)).astype(jnp.float32)


def _says_the_same_bar(ztxt: jax.Array, pool: Pool) -> jax.Array:
  """f32[B]: the cosine to t_i above which a caption says the same as t_i, halfway from the pool's
  mean caption to t_i itself: (1 + cos(t_i, mean pool row)) / 2. The gate and its peers share it."""
  return 0.5 * (1.0 + ztxt @ jnp.mean(pool.embeddings, axis=0))


def _captions_saying(queries: jax.Array, captions: jax.Array, pool: Pool) -> jax.Array:
  """bool[B, N]: [i, j] where caption `captions[j]` says the same as caption `queries[i]` by the
  gate's rule (`_says_the_same_bar` of the query)."""
  return queries @ captions.T >= _says_the_same_bar(queries, pool)[:, None]


def _batch_captions_saying(queries: jax.Array, ztxt: jax.Array, pool: Pool) -> jax.Array:
  """bool[B, B]: [i, j] where the batch's caption t_j (j != i) says the same as caption `queries[i]`.
  With `queries` the batch's own captions: each pair's peers."""
  return _captions_saying(queries, ztxt, pool) & ~jnp.eye(ztxt.shape[0], dtype=bool)


def _mean_where(cosines: jax.Array, group: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Each row's mean of `cosines` [B, N] over its `group` (bool [B, N]; 0 where empty), and the group's size."""
  n = jnp.sum(group, axis=1)
  return jnp.sum(jnp.where(group, cosines, 0.0), axis=1) / jnp.maximum(n, 1), n


def excused_by_peers(ztxt: jax.Array, keep: jax.Array, pool: Pool) -> jax.Array:
  """f32[B]: 1 where pair i has peers in the batch and most of them fail the gate (`keep` 0). Peers:
  the other pairs j whose captions say the same as t_i by the gate's own rule,
  cos(t_i, t_j) >= (1 + cos(t_i, mean pool row)) / 2.

  Why: a failing gate says the model reads the image differently from its caption. That is evidence
  against the pair only where the model reads images of that content well, which its peers show
  without labels: where most of them pass, a failing pair is the odd one out (a poisoned pair is, by
  construction, a minority among the pairs that truly show its caption's content); where most of
  them fail too, the model has not learnt the content yet, and withholding all of them would keep
  it so (on the digits set, the classes the model found hardest lost the most accuracy).
  A pair without peers is judged by its own decision alone.
  """
  ztxt = jax.lax.stop_gradient(ztxt)
  peers = _batch_captions_saying(ztxt, ztxt, pool)
  num_peers = jnp.sum(peers, axis=1)
  passing_peers = peers.astype(jnp.float32) @ keep
  return ((num_peers > 0) & (2.0 * passing_peers < num_peers)).astype(jnp.float32)


def image_sides_with_caption(zimg: jax.Array, ztxt: jax.Array, match: Match, pool: Pool) -> jax.Array:
  """f32[B]: 1 where image i is closer, on average, to the batch's other images whose captions say
  what its own caption t_i says than to those whose captions say what its match m_i says ("says the
  same" by the gate's rule, `_says_the_same_bar`, relative to t_i and to m_i); 0 where either group
  is empty.

  Why: a failing gate is the text lookup reading image i as m_i's content. The image tower alone can
  check that reading against the images the batch's captions describe: a clean image the lookup gets
  wrong still tends to look like the other images of its caption's content, while a poisoned image
  looks like the images of what it shows (its match), not like the images of the attacker's caption,
  whose clean pairs outnumber the poisons. It uses the image tower's in-modal geometry, which the
  attacker's caption does not write.
  """
  zimg, ztxt, zm = (jax.lax.stop_gradient(x) for x in (zimg, ztxt, match.embeddings))
  image_cos = zimg @ zimg.T
  to_own, num_own = _mean_where(image_cos, _batch_captions_saying(ztxt, ztxt, pool))
  to_match, num_match = _mean_where(image_cos, _batch_captions_saying(zm, ztxt, pool))
  return ((num_own > 0) & (num_match > 0) & (to_own > to_match)).astype(jnp.float32)


def trusted_pairs(keep: jax.Array, votes: jax.Array | None, abstain: jax.Array | None = None) -> jax.Array:
  """f32[B]: the pairs that keep their positives. Without a memory (`votes` None), this step's gate
  decision `keep`; with one, the majority of the example's decisions so far and this one: its
  vote margin (`Pool.gate_votes`, passes minus fails) plus this vote is >= 0.

  Why a majority: one decision rests on one lookup by a model that still gets many images wrong, so
  a clean pair fails it at random often (on the digits set 35-37% of pairs failed each step), and a
  poisoned pair passes it now and then (19-28% of the poisoned pairs passed where the gate acted)
  once the model starts to learn the attack, which is enough to implant it. Over an example's history those chance decisions are
  outvoted by its usual one; an example new to the gate has no history and its vote decides.
  """
  if votes is None:
    return keep if abstain is None else jnp.maximum(keep, abstain)
  margin = votes.astype(jnp.float32)
  trusted = margin + _vote(keep, abstain) >= 0.0
  if abstain is not None:
    # An excused failure is no evidence against the pair, and none for it: it trains where its
    # history holds more passes than fails. (An example new to the gate is not trusted on an
    # excuse: early on, the target's own pairs can fail as a group, which would excuse its poisons.)
    trusted = jnp.where(abstain > 0, margin >= 1.0, trusted)
  return trusted.astype(jnp.float32)


def _vote(keep: jax.Array, abstain: jax.Array | None) -> jax.Array:
  """f32[B]: +1 for a pass, -1 for a fail, 0 where the decision is no evidence (`abstain`)."""
  vote = 2.0 * keep - 1.0
  return vote if abstain is None else jnp.where(abstain > 0, 0.0, vote)


def gated_pair_loss(
    zimg: jax.Array,
    ztxt: jax.Array,
    match: Match,
    pool: Pool,
    scalars: dict[str, jax.Array],
    quorum: float = GATE_QUORUM,
    votes: jax.Array | None = None,
    drop_untrusted: bool = False,
    gate_peers: bool = False,
    image_evidence: str = "none",
    content_evidence: str = "none",
    ids: jax.Array | None = None,
    judged: tuple[jax.Array, jax.Array] | None = None,
):
  """CLIP's loss with only the trusted pairs as positives (`losses.clip_loss`'s `positive_weights`).
  `votes`: the batch's rows of `Pool.gate_votes` (None: no memory).

  `drop_untrusted` False: every pair stays a negative for the others. True: CLIP's loss over the
  trusted pairs alone; an untrusted image is no caption's negative and an untrusted caption no
  image's. Why: with paraphrased or identical captions, an untrusted clean image is a negative for
  the other captions of its own class in the batch and, with its own positive withheld, is pushed
  away from its class, which keeps the model wrong about the images it already gets wrong.

  `gate_peers`: a failing pair that `excused_by_peers` excuses is no evidence either way: without a
  memory it keeps its positive; with one it abstains (its vote margin does not move) and keeps its
  positive where its history holds more passes than fails (`trusted_pairs`), so a pair that failed
  where its peers passed stays distrusted.

  `image_evidence`: a failure that `image_sides_with_caption` contradicts abstains ('excuse', as a
  peers' excuse) or passes ('pass'); `content_evidence` the same for a failure that `content_gate`
  overrules (`ids`, the batch's example ids, keep rows written from a pair's own example out
  of that comparison; None: no exclusion).

  `judged`: the (image, caption) unit embeddings the decisions are read from, where they are not the
  trained ones (the un-augmented views, `gate_views='plain'`; `match` is then the lookup of those
  images). Every decision (gate, peers, evidence) reads them; the loss trains `zimg`, `ztxt`.
  """
  loss_img, loss_txt = zimg, ztxt
  if judged is not None:
    zimg, ztxt = judged
  keep = own_pair_gate(ztxt, match, pool)
  # Each piece of evidence in use, against a failure: 1 where it contradicts the failing decision.
  evidence = [
      (use, signal())
      for use, signal in (
          (image_evidence, lambda: image_sides_with_caption(zimg, ztxt, match, pool)),
          (content_evidence, lambda: content_gate(zimg, ztxt, match, pool, ids)),
      )
      if use != "none"
  ]
  for use, signal in evidence:
    if use == "pass":
      keep = jnp.maximum(keep, signal)
  excuses = ([excused_by_peers(ztxt, keep, pool)] if gate_peers else []) + [s for use, s in evidence if use == "excuse"]
  excused = functools.reduce(jnp.maximum, excuses) * (1.0 - keep) if excuses else None
  # The gate trusts the model's matches only where they agree with most of the batch's captions:
  # a model that still gets most pairs wrong would keep only what it already knows and train
  # toward that (on the digits set, a gate from epoch 4 kept ~50% and fell 15 points in an epoch).
  active = jnp.mean(keep) >= quorum
  weights = jnp.where(active, trusted_pairs(keep, votes, excused), jnp.ones_like(keep))
  left_out = None
  if drop_untrusted:
    untrusted = weights < 0.5
    left_out = untrusted[:, None] | untrusted[None, :]
  loss, aux = losses.clip_loss(
      loss_img, loss_txt, scalars["logit_scale"], same_target=left_out, positive_weights=weights
  )
  aux = dict(aux, gate=keep, gate_weights=weights, gate_active=active.astype(jnp.float32))
  if excused is not None:
    aux["gate_excused"] = excused
  return loss, aux


def record_votes(
    votes: jax.Array, ids: jax.Array, keep: jax.Array, active: jax.Array, abstain: jax.Array | None = None
) -> jax.Array:
  """`Pool.gate_votes` after a gated step: +1 for each passing example, -1 for each failing one, 0
  where `abstain` (a failure its peers excuse), in steps where the gate acted (a step under the
  quorum is a model not yet trusted to vote), saturating at the int8 range."""
  vote = jnp.where(active > 0, _vote(keep.astype(jnp.float32), abstain).astype(jnp.int32), 0)
  margin = jnp.clip(votes[ids].astype(jnp.int32) + vote, -127, 127)
  return votes.at[ids].set(margin.astype(votes.dtype))


# ----------------------------------------------------------------------------
# Matching.


def nearest_captions(
    pool: Pool,
    zimg: jax.Array,
    mesh: Mesh,
    shard_pool: bool,
    csls_k: int = 0,
    exclude_ids: jax.Array | None = None,
    lookup_dtype: str = "float32",
) -> Match:
  """The pool row each image is paired with (rows and queries are unit vectors).

  `csls_k=0` (the paper): the cosine top-1 row. `csls_k>0`: the row of highest
  cross-domain similarity local scaling (CSLS, Conneau et al. 2018),
  2 cos(i, m) - r(m), where r(m) is row m's mean cosine to its `csls_k`
  nearest images of the global batch; a "hub" row, close to many images at
  once, is discounted, so one row cannot absorb the whole batch. (CSLS's other
  term, the image's own neighbourhood, is constant in the argmax over rows.)
  `similarity` is always the plain cosine of the chosen row. Ties go to the
  lowest pool index, as `argmax` does.

  `exclude_ids` ([B] example ids; the robust variant): image i never matches a
  row written from its own example. The query-before-enqueue order keeps the
  current batch's captions out, but a pool written every step can still hold
  the image's own caption from the end of the previous epoch, and a poisoned
  image must never be paired with its own caption.

  `lookup_dtype='bfloat16'`: the similarity matmul takes bfloat16 inputs and
  accumulates in float32; those scores choose the row (and give the CSLS
  hubness). Rows whose cosines differ by less than bfloat16's rounding of the
  inputs (~1e-2 relative) may then be chosen differently from float32.
  `similarity` is the float32 cosine of the chosen row either way.
  """
  if lookup_dtype not in LOOKUP_DTYPES:
    raise ValueError(f"roclip.lookup_dtype={lookup_dtype!r}; expected one of {LOOKUP_DTYPES}.")
  zimg = jax.lax.stop_gradient(zimg)
  labels = pool.source_labels if pool.source_labels is not None else jnp.full_like(pool.source_ids, -1)
  exclude = exclude_ids is not None
  exclude_ids = jnp.zeros((zimg.shape[0],), jnp.int32) if exclude_ids is None else exclude_ids.astype(jnp.int32)
  if not shard_pool:
    sims = _similarities(zimg, pool.embeddings, lookup_dtype)  # [B, M]
    scores = _matching_scores(sims, csls_k)
    if exclude:
      scores = _exclude_own(scores, pool.source_ids, exclude_ids)
    index = jnp.argmax(scores, axis=1).astype(jnp.int32)
    embeddings = pool.embeddings[index]
    if lookup_dtype == "float32":
      similarity = jnp.take_along_axis(sims, index[:, None], axis=1)[:, 0]
    else:
      similarity = _row_cosines(zimg, embeddings)
    return Match(
        embeddings=embeddings,
        index=index,
        similarity=similarity,
        source_poisoned=pool.source_poisoned[index],
        source_label=labels[index],
    )
  axes = sharding_lib.batch_axes(mesh)
  rows = P(axes)
  fn = jax.shard_map(
      functools.partial(_sharded_nearest, axes=axes, csls_k=csls_k, exclude=exclude, lookup_dtype=lookup_dtype),
      mesh=mesh,
      in_specs=(rows, rows, rows, rows, rows, rows),
      out_specs=Match(embeddings=rows, index=rows, similarity=rows, source_poisoned=rows, source_label=rows),
  )
  return fn(pool.embeddings, pool.source_poisoned, labels, pool.source_ids, zimg, exclude_ids)


def _similarities(zimg: jax.Array, rows: jax.Array, lookup_dtype: str) -> jax.Array:
  """[B, d] queries x [R, d] rows -> [B, R] float32 scores; 'float32' is the original `zimg @ rows.T`."""
  if lookup_dtype == "float32":
    return zimg @ rows.T
  # Halves the bytes of the pool read and runs on the bf16 matmul units; float32 accumulation keeps
  # the error at the inputs' rounding instead of growing with d.
  dtype = jnp.dtype(lookup_dtype)
  return jnp.matmul(zimg.astype(dtype), rows.astype(dtype).T, preferred_element_type=jnp.float32)


def _row_cosines(zimg: jax.Array, rows: jax.Array) -> jax.Array:
  """[B] float32 cosine of each query with its own row (both unit vectors), for the diagnostics: the
  bfloat16 scores only choose the row."""
  return jnp.sum(zimg.astype(jnp.float32) * rows.astype(jnp.float32), axis=-1)


def _exclude_own(scores: jax.Array, row_ids: jax.Array, query_ids: jax.Array) -> jax.Array:
  """Scores of rows written from the query's own example set to -inf (never the argmax unless all are)."""
  return jnp.where(row_ids[None, :] == query_ids[:, None], -jnp.inf, scores)


def _matching_scores(sims: jax.Array, csls_k: int) -> jax.Array:
  """[B, M] cosines -> the scores whose row-wise argmax picks the match (CSLS when `csls_k` > 0).

  Every pool row's neighbourhood is measured over the whole batch of queries,
  so this is exact per row whether the pool is split over devices or not.
  """
  if csls_k <= 0:
    return sims
  k = min(csls_k, sims.shape[0])
  if sims.shape[0] <= _INSERTION_MAX_BATCH:  # Off CPU, and for larger batches, top_k itself.
    row_hubness = jax.lax.platform_dependent(
        sims, cpu=functools.partial(_row_hubness_by_insertion, k=k), default=functools.partial(_row_hubness, k=k)
    )  # [M]
  else:
    row_hubness = _row_hubness(sims, k)
  return 2 * sims - row_hubness[None, :]


def _row_hubness(sims: jax.Array, k: int) -> jax.Array:
  """[B, M] -> [M]: each row's mean cosine to its k nearest queries."""
  return jnp.mean(jax.lax.top_k(sims.T, k)[0], axis=1)


# Largest global batch for which CPU uses `_row_hubness_by_insertion` (median ms of the hubness alone on this
# 2-core CPU, top_k vs insertion: M=65536, B=64: 106 vs 42; B=128: 193 vs 123; B=256: 220 vs 199; M=262144,
# B=512: 1241 vs 1524). Its cost grows as B * k per row, top_k's more slowly.
_INSERTION_MAX_BATCH = 128
_INSERTION_BLOCK = 16384  # Rows per block: the [k, block] running maxima stay in cache across the B queries.


def _row_hubness_by_insertion(sims: jax.Array, k: int) -> jax.Array:
  """`_row_hubness`, bit for bit, without XLA's TopK, a slow custom call on CPU (~100 ms at M=65536, B=64,
  k=10: two thirds of a matching step).

  Per block of rows, a scan over the B queries keeps each row's k largest cosines in descending order,
  inserting each new cosine by max/min (a sorting network): max and min return one of their inputs, so
  these are exactly the values, in exactly the order, that top_k returns (equal values are equal bits;
  NaN cosines are not supported). The mean then reduces the same materialised row-major [M, k] array as
  `_row_hubness`.
  """
  batch, size = sims.shape
  block = min(_INSERTION_BLOCK, size)
  blocks = -(-size // block)
  if blocks * block != size:  # Rows are independent: padding rows are computed and dropped.
    sims = jnp.pad(sims, ((0, 0), (0, blocks * block - size)))

  def insert(top, x):  # top: [k, block], descending; x: [block], one query's cosines.
    out = []
    for j in range(k):
      out.append(jnp.maximum(top[j], x))
      x = jnp.minimum(top[j], x)
    return jnp.stack(out), None

  def one_block(i):
    cols = jax.lax.dynamic_slice_in_dim(sims, i * block, block, axis=1)
    # full_like of the data (not jnp.full) so that, inside shard_map, the carry varies over devices as it must.
    return jax.lax.scan(insert, jnp.full_like(cols[:k], -jnp.inf), cols)[0]

  top = jax.lax.map(one_block, jnp.arange(blocks))  # [blocks, k, block]
  top = top.transpose(0, 2, 1).reshape(blocks * block, k)[:size]
  # The barrier keeps XLA from fusing the transpose into the reduction, where it sums in another order.
  return jnp.mean(jax.lax.optimization_barrier(top), axis=1)


def _sharded_nearest(
    pool_rows, pool_poisoned, pool_labels, pool_ids, zimg_local, ids_local, *, axes, csls_k, exclude, lookup_dtype
):
  """Per device: local best over its pool rows, then a global winner.

  Only B-sized vectors cross devices (the queries, each shard's best score and
  its best row); the pool stays where it is.
  """
  shard = jax.lax.axis_index(axes)
  zimg = jax.lax.all_gather(zimg_local, axes, tiled=True)  # [B, d]: every shard scores every image.
  sims = _similarities(zimg, pool_rows, lookup_dtype)  # [B, M/n]
  scores = _matching_scores(sims, csls_k)
  if exclude:
    scores = _exclude_own(scores, pool_ids, jax.lax.all_gather(ids_local, axes, tiled=True))
  local_index = jnp.argmax(scores, axis=1)
  local_best = jnp.take_along_axis(scores, local_index[:, None], axis=1)[:, 0]
  local_sim = jnp.take_along_axis(sims, local_index[:, None], axis=1)[:, 0]
  all_best = jax.lax.all_gather(local_best, axes)  # [n, B]
  winner = jnp.argmax(all_best, axis=0)  # first (lowest) shard wins ties -> lowest global index.
  is_winner = winner == shard  # [B]
  pick = lambda x: jax.lax.psum(jnp.where(is_winner.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros_like(x)), axes)
  embeddings = pick(pool_rows[local_index])
  index = pick((local_index + shard * pool_rows.shape[0]).astype(jnp.int32))
  poisoned = pick(pool_poisoned[local_index].astype(jnp.int32)).astype(jnp.int8)
  label = pick(pool_labels[local_index].astype(jnp.int32))
  # Each shard keeps the results for its own slice of the batch.
  b = zimg_local.shape[0]
  start = shard * b
  take = lambda x: jax.lax.dynamic_slice_in_dim(x, start, b, axis=0)
  embeddings = take(embeddings)
  if lookup_dtype == "float32":
    similarity = take(jnp.max(all_best, axis=0) if csls_k <= 0 else pick(local_sim))
  else:  # Only this shard's B/n chosen rows, in float32.
    similarity = _row_cosines(zimg_local, embeddings)
  return Match(
      embeddings=embeddings,
      index=take(index),
      similarity=similarity,
      source_poisoned=take(poisoned),
      source_label=take(label),
  )


# ----------------------------------------------------------------------------
# Enqueueing.


def enqueue(
    pool: Pool,
    ztxt: jax.Array,
    ids: jax.Array,
    poisoned: jax.Array,
    mesh: Mesh,
    shard_pool: bool,
    fifo: str = "ring",
    labels: jax.Array | None = None,
) -> Pool:
  """Writes a batch of caption embeddings (detached) after the pointer.

  `fifo='ring'` wraps around; `fifo='lightly'` reproduces the original memory
  bank, which writes only the rows that fit before the end, drops the rest of
  the batch and resets the pointer to 0 (docs/methods.md, section 4). `labels`
  (the examples' class labels, -1 where unknown) are recorded for the
  diagnostics.
  """
  if fifo not in FIFO_MODES:
    raise ValueError(f"roclip.fifo={fifo!r}; expected one of {FIFO_MODES}.")
  ztxt = jax.lax.stop_gradient(ztxt).astype(pool.embeddings.dtype)
  ids = ids.astype(jnp.int32)
  poisoned = poisoned.astype(jnp.int8)
  labels = jnp.full_like(ids, -1) if labels is None else labels.astype(jnp.int32)
  pool_labels = pool.source_labels if pool.source_labels is not None else jnp.full_like(pool.source_ids, -1)
  write = functools.partial(_fifo_write, fifo=fifo)
  if not shard_pool:
    emb, sid, spois, slab, ptr = write(
        pool.embeddings, pool.source_ids, pool.source_poisoned, pool_labels, pool.ptr, ztxt, ids, poisoned, labels
    )
    return pool.replace(embeddings=emb, source_ids=sid, source_poisoned=spois, ptr=ptr, source_labels=slab)
  rows = P(sharding_lib.batch_axes(mesh))
  fn = jax.shard_map(
      write,
      mesh=mesh,
      in_specs=(rows, rows, rows, rows, P(), rows, rows, rows, rows),
      out_specs=(rows, rows, rows, rows, P()),
      check_vma=False,  # The pointer update is identical on every shard, so the replicated output is exact.
  )
  emb, sid, spois, slab, ptr = fn(
      pool.embeddings, pool.source_ids, pool.source_poisoned, pool_labels, pool.ptr, ztxt, ids, poisoned, labels
  )
  return pool.replace(embeddings=emb, source_ids=sid, source_poisoned=spois, ptr=ptr, source_labels=slab)


def _fifo_write(emb, sid, spois, slab, ptr, rows, row_ids, row_poisoned, row_labels, *, fifo):
  size, batch = emb.shape[0], rows.shape[0]
  slots = ptr + jnp.arange(batch, dtype=jnp.int32)
  if fifo == "ring":
    slots = slots % size
    new_ptr = (ptr + batch) % size
  else:  # lightly: rows past the end are dropped (index `size` is out of bounds -> mode='drop').
    slots = jnp.where(slots < size, slots, size)
    new_ptr = jnp.where(ptr + batch >= size, 0, ptr + batch)
  emb = emb.at[slots].set(rows, mode="drop")
  sid = sid.at[slots].set(row_ids, mode="drop")
  spois = spois.at[slots].set(row_poisoned, mode="drop")
  slab = slab.at[slots].set(row_labels, mode="drop")
  return emb, sid, spois, slab, new_ptr.astype(jnp.int32)


# ----------------------------------------------------------------------------
# Diagnostics: is the matching meaningful, or collapsing?

# Per-step sums of a matching step, averaged per matching epoch by `epoch_diagnostics`.
DIAGNOSTIC_SUMS = (
    "match_similarity",
    "own_similarity",
    "distinct_matches",
    "largest_hub",
    "matched_same_class",
    "labelled_matches",
    "poisoned_in_batch",
    "poisoned_matched_clean",
    "steps",
)


# Per-step sums of every step (CLIP and matching): how well images still find their own captions.
# A gated epoch's sums (only in runs with the own-pair gate): steps, steps where the gate acted, pairs
# it passed (of steps x the global batch), the pairs that kept their positives in steps where it acted
# (with `gate_memory`, by their examples' majority), and the poisoned pairs among each (known only on
# poisoned data).
GATE_SUMS = (
    "gate_steps",
    "gate_active_steps",
    "gate_kept",
    "gate_trusted",
    "gate_poisoned",
    "gate_kept_poisoned",
    "gate_trusted_poisoned",
)
ALIGNMENT_SUMS = ("epoch_own_similarity", "epoch_own_retrieval", "epoch_steps")
# The run's best completed epoch so far (a max over epoch means), the collapse detector's reference.
BEST_EPOCH = ("best_own_similarity", "best_own_retrieval", "best_match_similarity")


def alignment_sums(zimg: jax.Array, ztxt: jax.Array) -> dict[str, jax.Array]:
  """One step's image-to-own-caption alignment, label-free: the mean cosine of each image with its
  own caption, and the share of images whose own caption is (one of) the batch's closest to them
  (in-batch retrieval; ties, such as identical captions, count as found)."""
  zimg, ztxt = jax.lax.stop_gradient(zimg), jax.lax.stop_gradient(ztxt)
  sims = zimg @ ztxt.T  # [B, B]
  own = jnp.diagonal(sims)
  return {
      "epoch_own_similarity": jnp.mean(own),
      "epoch_own_retrieval": jnp.mean((own >= jnp.max(sims, axis=1)).astype(jnp.float32)),
      "epoch_steps": jnp.ones((), jnp.float32),
  }


def fold_best_epoch(stats: dict[str, jax.Array], first_of_epoch: jax.Array) -> dict[str, jax.Array]:
  """At an epoch's first step, the `BEST_EPOCH` maxima updated with the epoch that just ended."""
  get = lambda key: stats[f"roclip/{key}"]
  steps, match_steps = get("epoch_steps"), get("steps")
  ended = first_of_epoch & (steps > 0)
  matched = first_of_epoch & (match_steps > 0)
  mean = lambda key, n: get(key) / jnp.maximum(n, 1.0)
  best = lambda key, value, when: jnp.where(when, jnp.maximum(get(key), value), get(key))
  return {
      "roclip/best_own_similarity": best("best_own_similarity", mean("epoch_own_similarity", steps), ended),
      "roclip/best_own_retrieval": best("best_own_retrieval", mean("epoch_own_retrieval", steps), ended),
      "roclip/best_match_similarity": best("best_match_similarity", mean("match_similarity", match_steps), matched),
  }


def step_diagnostics(
    zimg: jax.Array, ztxt: jax.Array, match: Match, labels: jax.Array, poisoned: jax.Array
) -> dict[str, jax.Array]:
  """One matching step's contribution to `DIAGNOSTIC_SUMS` (global batch, on device).

  * distinct_matches: pool rows matched by the batch (B when every image has
    its own row; 1 when the whole batch matched one hub);
  * largest_hub: images that share the most-matched row;
  * match_similarity / own_similarity: mean cosine of each image with its
    matched caption and with its own caption (computed by the current model);
  * matched_same_class / labelled_matches: images whose matched caption comes
    from an example of their own class, among those where both labels are known.

  Counts use a sort of the B matched indices, not a B x B comparison.
  """
  index = jnp.sort(match.index)
  distinct = 1 + jnp.sum(index[1:] != index[:-1])
  run_length = jnp.searchsorted(index, index, side="right") - jnp.searchsorted(index, index, side="left")
  labels = labels.astype(jnp.int32)
  source_label = match.source_label if match.source_label is not None else jnp.full_like(labels, -1)
  labelled = (labels >= 0) & (source_label >= 0)
  is_poisoned = poisoned > 0
  f32 = lambda x: x.astype(jnp.float32)
  return {
      "match_similarity": jnp.mean(match.similarity),
      "own_similarity": jnp.mean(jnp.sum(zimg * ztxt, axis=-1)),
      "distinct_matches": f32(distinct),
      "largest_hub": f32(jnp.max(run_length)),
      "matched_same_class": f32(jnp.sum(labelled & (labels == source_label))),
      "labelled_matches": f32(jnp.sum(labelled)),
      "poisoned_in_batch": f32(jnp.sum(is_poisoned)),
      # Poisoned images matched to a caption from a clean example: the defense breaking the pair.
      "poisoned_matched_clean": f32(jnp.sum(is_poisoned & (match.source_poisoned == 0))),
      "steps": jnp.ones((), jnp.float32),
  }


def epoch_diagnostics(sums: dict[str, float], batch_size: int) -> dict[str, float]:
  """Per-epoch means (the `roclip/...` metrics) from the summed `step_diagnostics`, the epoch's
  alignment (`alignment_sums`) and the run's best earlier epoch (`BEST_EPOCH`), where present."""
  steps = max(float(sums["steps"]), 1.0)
  row = {}
  if sums.get("epoch_steps", 0) > 0:
    row["roclip/own_retrieval"] = sums["epoch_own_retrieval"] / sums["epoch_steps"]
  for key in BEST_EPOCH:
    if sums.get(key, 0) > 0:  # 0: no earlier epoch (or a run from before these sums existed).
      row[f"roclip/{key}"] = sums[key]
  row.update(
      {
          "roclip/match_similarity": sums["match_similarity"] / steps,
          "roclip/own_similarity": sums["own_similarity"] / steps,
          "roclip/distinct_matches": sums["distinct_matches"] / steps,
          "roclip/distinct_match_frac": sums["distinct_matches"] / steps / batch_size,
          "roclip/largest_hub": sums["largest_hub"] / steps,
          "roclip/matching_steps": int(sums["steps"]),
      }
  )
  if sums["labelled_matches"] > 0:
    row["roclip/matched_same_class_frac"] = sums["matched_same_class"] / sums["labelled_matches"]
  if sums["poisoned_in_batch"] > 0:
    row["roclip/poisoned_matched_clean_frac"] = sums["poisoned_matched_clean"] / sums["poisoned_in_batch"]
  return row


def gate_diagnostics(sums: dict[str, float], batch_size: int) -> dict[str, float]:
  """A gated epoch's row from its `GATE_SUMS`: the share of pairs the gate passed, the share of steps
  in which it acted (a quorum passed), the share of pairs that kept their positives in those steps,
  and, on poisoned data, the same two shares of the poisoned pairs."""
  pairs = max(sums["gate_steps"] * batch_size, 1.0)
  row = {
      "roclip/gate_kept_frac": sums["gate_kept"] / pairs,
      "roclip/gate_active_frac": sums["gate_active_steps"] / max(sums["gate_steps"], 1.0),
      "roclip/gate_trusted_frac": sums["gate_trusted"] / pairs,
  }
  if sums["gate_poisoned"] > 0:
    row["roclip/gate_kept_poisoned_frac"] = sums["gate_kept_poisoned"] / sums["gate_poisoned"]
    row["roclip/gate_trusted_poisoned_frac"] = sums["gate_trusted_poisoned"] / sums["gate_poisoned"]
  return row


@dataclasses.dataclass(frozen=True)
class CollapseThresholds:
  """When a matching epoch counts as collapsing (docs/roclip.md explains the numbers).

  * distinct_frac: fewer distinct pool rows per batch than this share of the
    batch means a few hub captions absorb the batch (the collapses we measured
    matched 2-14 rows for 128 images, 1.5-11%; healthy runs, 25-80%).
  * match_to_own: the matched caption far less similar than the image's own
    caption (ratio below this) means the image left the caption manifold: a
    top-1 over M >> B candidates is normally at least as close as the own one.
  * same_class_over_chance: where labels exist, matches of the image's own class
    below this multiple of chance (1 / number of classes) are close to random.

  * lost_alignment: a matching epoch whose own-caption retrieval, own-caption
    cosine or matched-caption cosine is below this share of the run's best
    earlier epoch has lost half of what the run had learnt (section 3 of
    docs/roclip.md: the signals are relative to the run's own state, so they
    need no labels and no scale of the data set's similarities).
  """

  distinct_frac: float = 0.15
  match_to_own: float = 0.5
  same_class_over_chance: float = 2.0
  lost_alignment: float = 0.5


def collapse_warnings(
    row: dict[str, float], num_classes: int | None = None, thresholds: CollapseThresholds = CollapseThresholds()
) -> list[str]:
  """What in one matching epoch's diagnostics (`epoch_diagnostics`) signals a collapse; [] if healthy."""
  found = []
  frac = row["roclip/distinct_match_frac"]
  if frac < thresholds.distinct_frac:
    found.append(
        f"hubness: only {100 * frac:.1f}% of each batch's images matched distinct pool rows "
        f"(threshold {100 * thresholds.distinct_frac:.0f}%; largest hub {row['roclip/largest_hub']:.0f} "
        "images)"
    )
  match, own = row["roclip/match_similarity"], row["roclip/own_similarity"]
  if match < thresholds.match_to_own * own:
    found.append(
        f"drift: mean matched-caption cosine {match:.3f} is below {thresholds.match_to_own:g} x the "
        f"own-caption cosine {own:.3f}"
    )
  # Relative to the run's best earlier epoch: present only once an earlier epoch has been seen.
  relative = (
      ("own_retrieval", "best_own_retrieval", "images find their own caption in the batch", "%"),
      ("own_similarity", "best_own_similarity", "mean own-caption cosine", ""),
      ("match_similarity", "best_match_similarity", "mean matched-caption cosine", ""),
  )
  for key, best_key, what, unit in relative:
    now, best = row.get(f"roclip/{key}"), row.get(f"roclip/{best_key}")
    if now is None or best is None or best <= 0:
      continue
    if now < thresholds.lost_alignment * best:
      show = (lambda v: f"{100 * v:.1f}%") if unit == "%" else (lambda v: f"{v:.3f}")
      found.append(
          f"lost alignment: {what}: {show(now)}, below {thresholds.lost_alignment:g} x the run's best earlier "
          f"epoch ({show(best)})"
      )
  same = row.get("roclip/matched_same_class_frac")
  if same is not None and num_classes:
    chance = 1.0 / num_classes
    if same < thresholds.same_class_over_chance * chance:
      found.append(
          f"random matches: {100 * same:.1f}% of images matched a caption of their own class "
          f"(chance {100 * chance:.1f}%, threshold {thresholds.same_class_over_chance:g}x chance)"
      )
  return found


# ----------------------------------------------------------------------------
# The defense.


class RoClip(base.Defense):
  """RoCLIP: CLIP epochs that also write the pool, and every k-th epoch a matching epoch.

  Step kinds: 'clip' (the pair loss; writes the pool too when the settings say
  so) and 'match' (each image's positive is its nearest pool caption; the text
  tower runs forward only, to write the pool).
  """

  name = "roclip"
  config_block = "roclip"
  # The matching-epoch diagnostics (docs/roclip.md, section 3), drawn for the rows that have them.
  curves = (
      ("roclip/matched_same_class_frac", "epoch", "RoCLIP: images matched to own class (%)"),
      ("roclip/distinct_match_frac", "epoch", "RoCLIP: distinct pool rows per batch (%)"),
      ("roclip/match_similarity", "epoch", "RoCLIP: matched-caption cosine (x100)"),
  )

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.pool_size = 21845  # The original code's default (docs/methods.md, section 4).
    c.k = 2  # A matching epoch every k epochs (the paper: epochs k, 2k, ...).
    c.shard_pool = False
    c.fifo = "ring"  # Or 'lightly' for the original's truncate-and-reset write.
    # 'gated' (the default, docs/roclip.md, section 8): each image's nearest pool caption decides
    # whether its pair trains on its own caption (`own_pair_gate`); no matching epochs unless
    # `first_epoch` is set. 'robust': matching epochs from the middle of the run with CSLS lookup,
    # content targets and a pool written every step (sections 4, 6 and 8). 'paper': the published
    # method, exactly. The knobs below, left unset (None), take the variant's value; set one to ablate it.
    c.variant = "gated"
    c.first_epoch = ml_collections.config_dict.placeholder(int)  # First matching epoch.
    c.update_pool_every_step = ml_collections.config_dict.placeholder(bool)  # Also write the pool in CLIP epochs.
    c.csls_k = ml_collections.config_dict.placeholder(int)  # 0: cosine top-1; > 0: CSLS over k neighbours.
    c.mask_duplicates = ml_collections.config_dict.placeholder(bool)
    c.exclude_own = ml_collections.config_dict.placeholder(bool)  # Never match a row of the image's own example.
    # Matched captions that say the same thing share their positives (docs/roclip.md, section 8).
    c.content_targets = ml_collections.config_dict.placeholder(bool)
    # CLIP epochs train a pair on its own caption only where its image's matched pool caption says
    # the same (docs/roclip.md, section 8), from `gate_first_epoch` (unset: the first epoch after the
    # warm-up) in every step where a quorum of the batch passes.
    c.own_pair_gate = ml_collections.config_dict.placeholder(bool)
    c.gate_first_epoch = ml_collections.config_dict.placeholder(int)
    c.gate_quorum = GATE_QUORUM  # Share of a batch that must pass before the gate acts in a step.
    # A pair keeps its positive where most of its example's gate decisions so far passed, not only
    # this step's (docs/roclip.md, section 8); one byte per training example on every device.
    c.gate_memory = ml_collections.config_dict.placeholder(bool)
    # A pair the gate does not trust leaves the batch (neither positive nor negative) instead of
    # staying a negative for the others' captions (docs/roclip.md, section 8).
    c.drop_untrusted = ml_collections.config_dict.placeholder(bool)
    # A failing pair is excused where most of the batch's other pairs whose captions say the same
    # fail too: the model has not learnt that content yet (docs/roclip.md, section 8).
    c.gate_peers = ml_collections.config_dict.placeholder(bool)
    # Where the gate fails a pair, whether its image looks more like the batch's images captioned as
    # its own caption than like those captioned as its match: 'none', 'excuse' or 'pass'
    # (docs/roclip.md, section 8).
    c.image_evidence = ml_collections.config_dict.placeholder(str)
    # Where the gate fails a pair, whether the image's mean cosine to the pool captions of its own
    # caption's content beats that of its match's: 'none', 'excuse' or 'pass' (docs/roclip.md, section 8).
    c.content_evidence = ml_collections.config_dict.placeholder(str)
    # The views the gate judges a pair by: 'augmented' (those it trains on), 'plain' (the example
    # before augmentation: CLIP's eval crop, the caption before EDA) or 'plain_text' (the augmented
    # image, the caption before EDA); docs/roclip.md, section 8.
    c.gate_views = ml_collections.config_dict.placeholder(str)
    # Input dtype of the lookup's similarity matmul (float32 accumulation either way): 'float32' or 'bfloat16'
    # (half the bytes of the pool read; rows may differ from float32's on near-ties: docs/roclip.md, section 5).
    c.lookup_dtype = "float32"
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
    r, b = config.roclip, config.data.batch_size
    if r.k < 2:
      raise config_error(
          "roclip.k",
          f"is {r.k}; with k=1 every epoch is a matching epoch and the text tower never " "trains.",
          "use k >= 2 (the original uses 2 or 3).",
      )
    if r.variant not in VARIANTS:
      raise config_error("roclip.variant", f"{r.variant!r} is unknown.", f"use one of {VARIANTS}.")
    if r.first_epoch is not None and r.first_epoch < 1:
      raise config_error(
          "roclip.first_epoch", f"is {r.first_epoch}; epochs count from 1.", "use 1 or more, or leave it unset."
      )
    if r.csls_k is not None and r.csls_k < 0:
      raise config_error(
          "roclip.csls_k", f"is {r.csls_k}.", "use 0 (cosine top-1) or a positive neighbourhood size such as 10."
      )
    if config.loss != "clip" and settings(r).own_pair_gate:
      raise config_error(
          "roclip.own_pair_gate",
          f"is on (variant {r.variant!r}) with loss={config.loss!r}; the gate weights the positives of "
          "CLIP's softmax loss.",
          "use loss='clip', or roclip.variant='robust' (or own_pair_gate=False) with this loss.",
      )
    if r.get("gate_first_epoch") is not None and r.gate_first_epoch < 1:
      raise config_error(
          "roclip.gate_first_epoch",
          f"is {r.gate_first_epoch}; epochs count from 1.",
          "use 1 or more, or leave it unset.",
      )
    if not 0.0 <= r.get("gate_quorum", GATE_QUORUM) <= 1.0:
      raise config_error(
          "roclip.gate_quorum",
          f"is {r.gate_quorum}; it is a share of the batch.",
          "use a value in [0, 1] (default 0.5).",
      )
    for knob in ("image_evidence", "content_evidence"):
      if r.get(knob) is not None and r[knob] not in EVIDENCE_USES:
        raise config_error(
            f"roclip.{knob}", f"{r[knob]!r} is unknown.", f"use one of {EVIDENCE_USES} (or leave it unset)."
        )
    if r.get("gate_views") is not None and r.gate_views not in GATE_VIEWS:
      raise config_error(
          "roclip.gate_views", f"{r.gate_views!r} is unknown.", f"use one of {GATE_VIEWS} (or leave it unset)."
      )
    if r.lookup_dtype not in LOOKUP_DTYPES:
      raise config_error(
          "roclip.lookup_dtype",
          f"{r.lookup_dtype!r} is unknown.",
          "use 'float32' (the exact lookup) or 'bfloat16' (bfloat16 similarity matmul, float32 accumulation).",
      )
    if r.fifo not in FIFO_MODES:
      raise config_error("roclip.fifo", f"{r.fifo!r} is unknown.", "use 'ring' or 'lightly'.")
    if r.pool_size < b:
      raise config_error(
          "roclip.pool_size",
          f"{r.pool_size} is smaller than the global batch {b}.",
          "use a pool at least as large as the batch (the original: 21845 for batch 512).",
      )
    if r.shard_pool and r.pool_size % num_batch_shards:
      lo = r.pool_size // num_batch_shards * num_batch_shards
      raise config_error(
          "roclip.pool_size",
          f"{r.pool_size} is not divisible by the {num_batch_shards} batch " "shards, which a sharded pool needs.",
          f"use {lo} or {lo + num_batch_shards}, or set roclip.shard_pool=False.",
      )
    if config.optim["lock"] == "image":
      # A matching step trains only the image tower (docs/roclip.md, section 1): locked, every
      # matching epoch would train nothing but the logit scale.
      raise config_error(
          "optim.lock",
          "is 'image' with defense='roclip', whose matching steps train only the image " "tower.",
          "lock the text tower instead (optim.lock='text'), or use defense='none' for a " "locked-image (LiT) model.",
      )

  def __init__(self, config: ml_collections.ConfigDict, facts: base.RunFacts):
    super().__init__(config, facts)
    if self.settings().gate_memory and facts.num_examples < 1:
      raise ValueError(
          "roclip.gate_memory keeps one vote margin per training example, but this run's example count is "
          f"unknown ({facts}): build the defense with the run's facts (defenses.RunFacts of its training "
          "data), or set roclip.gate_memory=False."
      )

  @classmethod
  def plain_views(cls, config: ml_collections.ConfigDict) -> bool:
    # Only where the gate judges by them and there is augmentation to leave out.
    s = settings(config.roclip)
    augments = bool(config.augment.get("image", False) or config.augment.get("text", False))
    return s.own_pair_gate and s.gate_views != "augmented" and augments

  def settings(self) -> Settings:
    return settings(
        self.config.roclip,
        steps_per_epoch=self.facts.steps_per_epoch,
        warmup_steps=self.config.optim.warmup_steps,
        num_epochs=self.config.num_epochs,
    )

  def describe(self) -> str:
    s = self.settings()
    # Named only when not the default, so the description of a float32 run reads as before.
    lookup = "" if self.config.roclip.lookup_dtype == "float32" else f", lookup {self.config.roclip.lookup_dtype}"
    schedule = f"k={s.k}" if s.first_epoch != NO_MATCHING else "no matching epochs"
    memory = (", majority over epochs" if s.gate_memory else "") + (", peers excuse" if s.gate_peers else "")
    for label, use in (("image evidence", s.image_evidence), ("contents", s.content_evidence)):
      memory += {"none": "", "excuse": f", {label} as an excuse", "pass": f", {label} as a pass"}[use]
    memory += ", untrusted pairs left out" if s.drop_untrusted else ""
    if self.plain_views(self.config):
      memory += {"plain": ", judged on the un-augmented views", "plain_text": ", judged on the captions before EDA"}[
          s.gate_views
      ]
    gate = f", own-pair gate (quorum {s.gate_quorum:g}{memory})" if s.own_pair_gate else ""
    return (
        f"roclip ({s.variant}: pool {self.config.roclip.pool_size}, {schedule}, csls_k={s.csls_k}, "
        f"pool every step={s.pool_every_step}{gate}{lookup})"
    )

  # State: the pool.
  def init_state(self, key: jax.Array) -> Pool:
    pool = init_pool(key, self.config.roclip.pool_size, self.config.model.embed_dim)
    if not self.settings().gate_memory:
      return pool
    return pool.replace(gate_votes=jnp.zeros((self.facts.num_examples,), jnp.int8))

  def state_shardings(self, mesh: Mesh) -> Pool:
    shardings = pool_shardings(mesh, self.config.roclip.shard_pool)
    if not self.settings().gate_memory:
      return shardings
    # Replicated: one byte per example (as SafeCLIP's safe mask), read and written at the batch's ids.
    return shardings.replace(gate_votes=NamedSharding(mesh, P()))

  def init_stats(self) -> dict[str, jax.Array]:
    keys = DIAGNOSTIC_SUMS + ALIGNMENT_SUMS + BEST_EPOCH + (GATE_SUMS if self.settings().own_pair_gate else ())
    return {f"roclip/{k}": jnp.zeros((), jnp.float32) for k in keys}

  # Steps. 'match' is listed even where the schedule has no matching epoch: the benchmarks and the
  # notebook time and run it on any RoCLIP config.
  def step_kinds(self) -> dict[str, base.StepKind]:
    s = self.settings()
    kinds = {
        "clip": base.StepKind("clip", options=(("enqueue", s.pool_every_step),)),
        "match": base.StepKind("match", text_grad=False, options=(("enqueue", True),)),
    }
    if s.own_pair_gate:  # A CLIP step whose positives pass the gate; it reads the pool, so it writes it too.
      # The un-augmented views it judges by, encoded forward only. The pool keeps the augmented
      # captions: a pool of the captions before EDA was tried and lost (docs/roclip.md, section 8).
      plain = self.plain_views(self.config)
      kinds["gated"] = base.StepKind(
          "gated",
          evidence_image_views=("image_plain",) if plain and s.gate_views == "plain" else (),
          evidence_text_views=("text_plain",) if plain else (),
          options=(("enqueue", True),),
      )
    return kinds

  def schedule(self, epoch: int) -> base.StepKind:
    s = self.settings()
    if is_matching_epoch(epoch, s.k, s.first_epoch):
      name = "match"
    else:
      name = "gated" if s.own_pair_gate and epoch >= s.gate_first_epoch else "clip"
    return self.step_kinds()[name]

  def loss(self, kind, z, scalars, state, batch, mesh, pair_loss):
    if kind.name == "gated":
      # The pair is judged by its plain views where the kind encodes them, and trained on its own.
      judged = (z.get("image_plain", z["image"]), z.get("text_plain", z["text"]))
      match = self.match(state, judged[0], batch["id"], mesh)
      votes = None if state.gate_votes is None else state.gate_votes[batch["id"]]
      rc = self.settings()
      return gated_pair_loss(
          z["image"],
          z["text"],
          match,
          state,
          scalars,
          rc.gate_quorum,
          votes,
          drop_untrusted=rc.drop_untrusted,
          gate_peers=rc.gate_peers,
          image_evidence=rc.image_evidence,
          content_evidence=rc.content_evidence,
          ids=batch["id"] if rc.exclude_own else None,
          judged=judged,
      )
    if kind.name != "match":
      return pair_loss(z["image"], z["text"], scalars)
    # Matching step: the matched pool rows replace the positives (docs/roclip.md, section 1). The
    # captions only feed the pool, so the text tower ran forward only; its gradient is exactly zero
    # (AdamW still applies momentum and weight decay to it, as the original does: docs/methods.md, section 4).
    rc = self.settings()
    zimg = z["image"]
    match = self.match(state, zimg, batch["id"], mesh)
    if self.config.loss == "clip":
      loss, aux = matching_loss(zimg, match, scalars["logit_scale"], rc.mask_duplicates, rc.content_targets)
    else:
      loss, aux = pair_loss(zimg, jax.lax.stop_gradient(match.embeddings), scalars)
    return loss, dict(aux, match=match)

  def match(self, pool: Pool, zimg: jax.Array, ids: jax.Array, mesh: Mesh) -> Match:
    """The lookup a matching step runs: each image's pool row under this config's rule.

    The variant's (or the explicit) `csls_k` and `exclude_own`, `shard_pool` and `lookup_dtype`, all
    from `config.roclip`; `ids` are the images' example ids ([B], used only with `exclude_own`).
    Traceable: call it inside `jax.jit` under `jax.set_mesh(mesh)`, with `pool` laid out by
    `state_shardings(mesh)` and `zimg` ([B, d] unit rows) sharded over the batch axes. The benchmarks
    time this call, so they pay for exactly what training runs.
    """
    rc, r = self.settings(), self.config.roclip
    return nearest_captions(
        pool, zimg, mesh, r.shard_pool, rc.csls_k, ids if rc.exclude_own else None, lookup_dtype=r.lookup_dtype
    )

  def update_state(self, kind, state, z, aux, batch, mesh):
    if not kind.option("enqueue"):
      return state
    if kind.name == "gated" and state.gate_votes is not None:
      state = state.replace(
          gate_votes=record_votes(
              state.gate_votes, batch["id"], aux["gate"], aux["gate_active"], aux.get("gate_excused")
          )
      )
    return enqueue(
        state,
        z["text"],
        batch["id"],
        batch["poisoned"],
        mesh,
        self.config.roclip.shard_pool,
        self.config.roclip.fifo,
        labels=batch.get("label"),
    )

  def update_stats(self, kind, stats, z, aux, batch, step):
    # The epoch's matching diagnostics: zeroed by the epoch's first step, so the sums in a checkpoint
    # taken mid-epoch cover exactly the steps before it.
    stats = dict(stats)
    first_of_epoch = step % self.facts.steps_per_epoch == 0
    # The epoch that just ended joins the run's best epochs before its sums are zeroed.
    stats.update(fold_best_epoch(stats, first_of_epoch))
    gate_sums = GATE_SUMS if self.settings().own_pair_gate else ()  # As `init_stats`.
    for key in DIAGNOSTIC_SUMS + ALIGNMENT_SUMS + gate_sums:
      stats[f"roclip/{key}"] = jnp.where(first_of_epoch, 0.0, stats[f"roclip/{key}"])
    for key, value in alignment_sums(z["image"], z["text"]).items():  # Every step, CLIP and matching.
      stats[f"roclip/{key}"] = stats[f"roclip/{key}"] + value
    metrics = {}
    if kind.name == "gated":
      keep, is_poisoned = aux["gate"], (batch["poisoned"] > 0).astype(jnp.float32)
      trusted = aux["gate_weights"] * aux["gate_active"]  # Positives the gate decided, where it acted.
      step_sums = {
          "gate_steps": jnp.ones((), jnp.float32),
          "gate_active_steps": aux["gate_active"],
          "gate_kept": jnp.sum(keep),
          "gate_trusted": jnp.sum(trusted),
          "gate_poisoned": jnp.sum(is_poisoned),
          "gate_kept_poisoned": jnp.sum(keep * is_poisoned),
          "gate_trusted_poisoned": jnp.sum(trusted * is_poisoned),
      }
      for key, value in step_sums.items():
        stats[f"roclip/{key}"] = stats[f"roclip/{key}"] + value
      metrics = {"roclip/gate_kept_frac": jnp.mean(keep), "roclip/gate_active": aux["gate_active"]}
    if kind.name == "match":
      labels = batch.get("label", jnp.full_like(batch["id"], -1))
      step_diag = step_diagnostics(z["image"], z["text"], aux["match"], labels, batch["poisoned"])
      for key, value in step_diag.items():
        stats[f"roclip/{key}"] = stats[f"roclip/{key}"] + value
      metrics = {
          "roclip/match_similarity": step_diag["match_similarity"],
          "roclip/distinct_matches": step_diag["distinct_matches"],
      }
    return stats, metrics

  def epoch_hooks(self, context: base.RunContext) -> base.EpochHooks:
    return MatchingMonitor(context.config)

  @classmethod
  def caption_pool(cls, state: Pool) -> Pool:
    return state

  @classmethod
  def run_warnings(cls, name: str, metrics_rows: list[dict[str, Any]]) -> list[str]:
    flagged = [r for r in metrics_rows if r.get("kind") == "epoch" and r.get("roclip/collapse_warning")]
    if not flagged:
      return []
    epochs = ", ".join(str(r["epoch"]) for r in flagged)
    return [
        f"WARNING {name}: the RoCLIP collapse detector fired in matching epoch(s) {epochs} "
        f"(last: {flagged[-1]['roclip/collapse_reasons']}); its low attack success comes with a model "
        "trained toward captions that do not describe its images."
    ]


class MatchingMonitor(base.EpochHooks):
  """RoCLIP's per-matching-epoch diagnostics and collapse detector (`epoch_diagnostics`).

  The sums live in the train state (`stats`), so they are global over hosts
  and survive a mid-epoch resume; this reads them once per matching epoch.
  """

  def __init__(self, config: ml_collections.ConfigDict):
    self._batch_size = config.data.batch_size
    self._num_classes = None
    if config.data.source == "demo":  # Labels and their count are known: judge same-class matches too.
      self._num_classes = int(config.data.demo.num_classes)
    self._warned_epochs: list[int] = []

  def end_epoch(self, state: Any, epoch: int, kind: base.StepKind) -> dict[str, Any] | None:
    # One read of a few scalars per epoch (not per step).
    sums = {k[len("roclip/") :]: float(v) for k, v in jax.device_get(state.stats).items() if k.startswith("roclip/")}
    if kind.name != "match":  # A CLIP epoch: its alignment, the reference the detector compares matching epochs with.
      if not sums.get("epoch_steps"):
        return None
      row = {
          "epoch": epoch,
          "roclip/clip_own_similarity": sums["epoch_own_similarity"] / sums["epoch_steps"],
          "roclip/clip_own_retrieval": sums["epoch_own_retrieval"] / sums["epoch_steps"],
      }
      if kind.name == "gated":
        row.update(gate_diagnostics(sums, self._batch_size))
        logging.info("Gated epoch %d: %s", epoch, row)
      return row
    row = dict(epoch_diagnostics(sums, self._batch_size), epoch=epoch)
    warnings = collapse_warnings(row, self._num_classes)
    row["roclip/collapse_warning"] = bool(warnings)
    if warnings:
      row["roclip/collapse_reasons"] = "; ".join(warnings)
      self._warned_epochs.append(epoch)
      logging.warning(
          "RoCLIP matching epoch %d looks like a COLLAPSE: %s. The model is being trained toward captions that do "
          "not describe its images; its accuracy will fall toward chance while the attack success rate looks "
          "good. Fixes (docs/roclip.md, sections 3 and 8): the default gated variant (config.roclip.variant="
          "'gated' with first_epoch unset: no matching epochs), the robust variant with its defaults, a later "
          "config.roclip.first_epoch so that a better-trained model makes the matches, or a smaller learning rate.",
          epoch,
          "; ".join(warnings),
      )
    else:
      logging.info("Matching epoch %d: %s", epoch, row)
    return row
