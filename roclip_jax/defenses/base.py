"""The interface every defense implements (docs/architecture.md, "Adding a defense").

A defense is one training objective, in the spirit of open_clip's training
tasks: plain CLIP, RoCLIP, SafeCLIP and CleanCLIP are each one `Defense`
subclass in one module of this package, registered by name
(`defenses.register`). The generic step (`steps.py`) and loop (`train.py`)
only call the methods below; they never name a defense.

What a defense decides:

* its config block (`config_block`, `default_config`) and `validate`;
* the training records it sees (`train_records`: CleanCLIP's clean subset) and
  how many views of each example its steps read (`views`, and `plain_views`:
  the un-augmented ones), all decided from the config alone, before the data is built;
* its device state (`init_state`, `state_shardings`), held in
  `TrainState.defense`, donated and checkpointed with the model, and its
  running counters (`init_stats`);
* which step kind runs in an epoch (`schedule`) and every kind a run may need,
  which the trainer compiles ahead of time (`step_kinds`);
* the loss of a step kind from the batch's unit embeddings (`loss`), the state
  update after the optimizer step (`update_state`: RoCLIP's pool, SafeCLIP's
  banks) and its step metrics (`update_stats`);
* host-side epoch hooks (`epoch_hooks`: SafeCLIP's split, RoCLIP's matching
  monitor) and an optional learning-rate schedule;
* what the tools around the trainer need to know of it without naming it: a
  caption pool in its state (`caption_pool`, for the notebook and the suspicion
  report), whether it fine-tunes a trained model (`fine_tunes`), the notes under
  the benchmark's table (`table_notes`).

A defense is built once per run, from the config and the run's facts
(`RunFacts`: examples and steps per epoch, known once the data is built), so no
method takes them per call.

The generic step encodes the views a step kind names, so gradient
accumulation (`steps._accumulated_loss_and_grads`) works for every defense:
the loss only ever sees embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
from jax.sharding import Mesh
import ml_collections
import optax


@dataclasses.dataclass(frozen=True)
class StepKind:
  """What one compiled step of a defense computes; static (it is baked into the jitted step).

  The generic step encodes `image_views` with the image tower and `text_views`
  with the text tower (batch keys, e.g. 'image' and 'image2'), then calls the
  defense's `loss` with the unit embeddings under the same keys.
  """

  name: str
  image_views: tuple[str, ...] = ("image",)
  text_views: tuple[str, ...] = ("text",)
  # False: the text tower runs forward only and gets an exactly zero gradient (RoCLIP's matching
  # step, whose positives are pool rows; the captions only feed the pool).
  text_grad: bool = True
  # Views encoded forward only, in inference mode and without a gradient: what the loss judges the
  # pairs by but does not train on (RoCLIP's gate reads the un-augmented `image_plain`/`text_plain`).
  evidence_image_views: tuple[str, ...] = ()
  evidence_text_views: tuple[str, ...] = ()
  # Gather the embeddings to every device before the loss (one all-gather of all views at once):
  # for losses that look up per-example state or compare every example with the whole batch.
  gather: bool = False
  # Free-form static options of the defense for this kind (e.g. RoCLIP's pool write), as
  # (key, value) pairs so the kind stays hashable.
  options: tuple[tuple[str, Any], ...] = ()

  def option(self, key: str, default: Any = None) -> Any:
    return dict(self.options).get(key, default)

  @property
  def views(self) -> tuple[str, ...]:
    """The views encoded in training mode (the loss may differentiate them; not the evidence views)."""
    return self.image_views + self.text_views

  @property
  def evidence_views(self) -> tuple[str, ...]:
    return self.evidence_image_views + self.evidence_text_views


@dataclasses.dataclass(frozen=True)
class RunFacts:
  """What a run's data says that a defense is built from (`pipeline.TrainData` gives both)."""

  # Training examples (0: unknown, as in a dry run, which reads no data); sizes per-example state such
  # as SafeCLIP's safe mask.
  num_examples: int
  steps_per_epoch: int

  def __post_init__(self):
    if self.num_examples < 0 or self.steps_per_epoch < 1:
      raise ValueError(f"{self}: a run has num_examples >= 0 and steps_per_epoch >= 1.")


@dataclasses.dataclass(frozen=True)
class RunContext:
  """What host-side epoch hooks may use: built once by the trainer after the data and state."""

  config: ml_collections.ConfigDict
  spec: Any  # steps.ModelSpec
  mesh: Mesh
  train_data: Any  # pipeline.TrainData
  state_shardings: Any  # steps.TrainState of shardings


class EpochHooks:
  """Host-side work at epoch boundaries. Both return a row for metrics.jsonl (kind 'epoch') or None.

  `start_epoch` runs before the first step of an epoch (not when a run resumes
  mid-epoch) and may replace the train state; `end_epoch` runs after an epoch's
  last step (or the run's last step).
  """

  def start_epoch(self, state: Any, epoch: int, kind: StepKind) -> tuple[Any, dict[str, Any] | None]:
    del epoch, kind
    return state, None

  def end_epoch(self, state: Any, epoch: int, kind: StepKind) -> dict[str, Any] | None:
    del state, epoch, kind
    return None


class Defense:
  """Plain CLIP training; subclasses override what their method changes.

  Args:
    config: the whole experiment config (a defense reads its own block and the shared fields).
    facts: the run's facts, known once its data is built; a subclass that cannot run with them
      raises here, where they are given.
  """

  name: ClassVar[str] = ""
  config_block: ClassVar[str | None] = None  # The config field holding `default_config()`, if any.
  views: ClassVar[int] = 1  # Views of each example the pipeline delivers (2: 'image2', 'text2' too).
  # Whether `grad_accum_steps` > 1 is exact for this defense's losses; the generic embedding-cache
  # accumulation is exact for any loss of the batch's embeddings, so only a loss that is not a
  # function of them (or has per-micro-batch side effects) sets this False.
  supports_grad_accum: ClassVar[bool] = True
  # A post-hoc defense: it fine-tunes the trained model `config.init_from` names instead of training one.
  fine_tunes: ClassVar[bool] = False
  # Panels the benchmark's curves.png draws for this defense's rows: (metric key, metrics.jsonl row
  # kind, title); values are shares, drawn x100.
  curves: ClassVar[tuple[tuple[str, str, str], ...]] = ()

  def __init__(self, config: ml_collections.ConfigDict, facts: RunFacts):
    self.config = config
    self.facts = facts

  # ------------------------------------------------------------------ config
  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict | None:
    """The defaults of `config.<config_block>`; the one place they are written."""
    return None

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
    """Raises `errors.ConfigError` for settings this defense cannot run with."""
    del config, num_batch_shards

  # -------------------------------------------------------------------- data
  @classmethod
  def plain_views(cls, config: ml_collections.ConfigDict) -> bool:
    """Whether the batches also carry each example's un-augmented views (`image_plain`: CLIP's eval
    preprocessing of the same trigger-stamped image; `text_plain`: the caption before EDA), decided
    from the config alone, like `views`."""
    del config
    return False

  @classmethod
  def train_records(cls, config: ml_collections.ConfigDict, source: Any, image_transform: Any) -> tuple[Any, Any]:
    """The records this defense trains on and the image transform still needed (the trigger stamp).

    A class method: the records decide the run's facts, so they are chosen before the defense is built.
    """
    del config
    return source, image_transform

  # ------------------------------------------------------------------- state
  def init_state(self, key: jax.Array) -> Any:
    """Device state in `TrainState.defense` (a pytree, or None); `key` is the defense's own."""
    del key
    return None

  def state_shardings(self, mesh: Mesh) -> Any:
    """Shardings with the structure of `init_state`'s result."""
    del mesh
    return None

  def init_stats(self) -> dict[str, jax.Array]:
    """Running counters of the defense in `TrainState.stats` (summed on device, checkpointed)."""
    return {}

  def learning_rate_schedule(self, total_steps: int) -> optax.Schedule | None:
    """A schedule over the run's `total_steps` replacing `config.optim`'s, or None to keep it."""
    del total_steps
    return None

  # ------------------------------------------------------------------- steps
  def schedule(self, epoch: int) -> StepKind:
    """The step kind of 1-based `epoch` (its name is logged as the train row's `mode`)."""
    del epoch
    return StepKind("clip")

  def step_kinds(self) -> dict[str, StepKind]:
    """Every step kind a run may need, by name, for the trainer to compile ahead of time: by default
    those `schedule` gives the run's epochs; a defense lists more where tools run the others."""
    kinds = (self.schedule(epoch) for epoch in range(1, max(int(self.config.num_epochs), 1) + 1))
    return {kind.name: kind for kind in kinds}

  def loss(
      self,
      kind: StepKind,
      z: dict[str, jax.Array],
      scalars: dict[str, jax.Array],
      state: Any,
      batch: dict[str, jax.Array],
      mesh: Mesh,
      pair_loss,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The loss of a `kind` step and its auxiliary outputs.

    Args:
      kind: the step kind.
      z: unit embeddings [B, d] of every view `kind` names, by batch key.
      scalars: the loss's own parameters ('logit_scale', and 'logit_bias' with SigLIP).
      state: `TrainState.defense` before the step.
      batch: the global batch ('id', 'poisoned', 'label', ...).
      mesh: the device mesh.
      pair_loss: the configured cross-modal loss, `fn(zimg, ztxt, scalars) -> (loss, aux)`.
    Returns: the scalar loss and aux; aux has 'batch_accuracy', and each scalar entry named
      'loss_*' (a term of the loss) becomes a step metric of that name.
    """
    del kind, state, batch, mesh
    return pair_loss(z["image"], z["text"], scalars)

  def update_state(
      self,
      kind: StepKind,
      state: Any,
      z: dict[str, jax.Array],
      aux: dict[str, jax.Array],
      batch: dict[str, jax.Array],
      mesh: Mesh,
  ) -> Any:
    """`TrainState.defense` after the step; `z` are the step's embeddings (stop-gradient)."""
    del kind, z, aux, batch, mesh
    return state

  def update_stats(
      self,
      kind: StepKind,
      stats: dict[str, jax.Array],
      z: dict[str, jax.Array],
      aux: dict[str, jax.Array],
      batch: dict[str, jax.Array],
      step: jax.Array,
  ) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """The defense's counters after the step and its extra step metrics."""
    del kind, z, aux, batch, step
    return stats, {}

  # -------------------------------------------------------------------- host
  def epoch_hooks(self, context: RunContext) -> EpochHooks:
    del context
    return EpochHooks()

  def describe(self) -> str:
    """One line for the log."""
    return self.name

  # ------------------------------------------------- what the tools around the trainer read
  @classmethod
  def caption_pool(cls, state: Any) -> Any:
    """The pool of caption embeddings in `state` (`TrainState.defense`), an object with `embeddings`
    [M, d] and `source_ids` [M], or None if this defense keeps none to inspect."""
    del state
    return None

  @classmethod
  def table_notes(cls, config: ml_collections.ConfigDict, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    """Lines under the benchmark's table about this defense's `rows` (name, config overrides), in order."""
    del config, rows
    return []

  @classmethod
  def run_warnings(cls, name: str, metrics_rows: list[dict[str, Any]]) -> list[str]:
    """Warnings under the benchmark's table about one trained row `name`, read from its metrics.jsonl rows."""
    del name, metrics_rows
    return []
