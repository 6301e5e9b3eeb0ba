"""CleanCLIP (Bansal, Singhi et al., ICCV 2023; docs/methods.md, section 6): fine-tune away a backdoor
(`config.defense = 'cleanclip'`).

A post-hoc defense: start from a trained, possibly poisoned model
(`config.init_from`: a run's workdir or imported weights) and fine-tune it on
clean data with

    L = clip_weight * L_cross(x, t) + inmodal_weight * L_inmodal

where L_cross is the configured cross-modal loss (CLIP or SigLIP) on the
original pairs and L_inmodal = (InfoNCE(image -> aug(image)) + InfoNCE(caption
-> EDA(caption))) / 2, each example's augmented view being its only positive
among the global batch (CleanCLIP's `--inmodal`). Self-supervision within each
modality pulls the trigger's features apart from the target class's.

The pipeline's view 1 is the plain example and view 2 its augmentation
(`CleanClip.views = 2`, with `augment.image/text` off). Our image augmentation
is RoCLIP's SimCLR-style one (`data/augment.py`), not CleanCLIP's AutoAugment.

The clean data: `clean_subset` keeps the training source's records that are
not poisoned, optionally a seeded sample of them, standing in for the
defender's separately curated clean set (CleanCLIP fine-tunes on 100K clean
CC3M pairs).
"""

from __future__ import annotations

from typing import Any, Callable

from absl import logging
import jax
import ml_collections

from roclip_jax import losses
from roclip_jax.data import metadata as metadata_lib
from roclip_jax.defenses import base
from roclip_jax.errors import config_error


def step_loss(
    z: dict[str, jax.Array],
    scalars: dict[str, jax.Array],
    cfg: ml_collections.ConfigDict,
    cross_modal_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]],
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The CleanCLIP loss on unit embeddings 'image', 'text' (originals) and 'image2', 'text2' (augmented)."""
  cross, aux = cross_modal_loss(z["image"], z["text"], scalars)
  # loss_i2t of clip_loss(a, b) is exactly InfoNCE with rows a, columns b.
  _, image_aux = losses.clip_loss(z["image"], z["image2"], scalars["logit_scale"])
  _, text_aux = losses.clip_loss(z["text"], z["text2"], scalars["logit_scale"])
  inmodal = 0.5 * (image_aux["loss_i2t"] + text_aux["loss_i2t"])
  loss = cfg.clip_weight * cross + cfg.inmodal_weight * inmodal
  return loss, dict(aux, loss_cross=cross, loss_inmodal=inmodal)


def clean_subset(source: Any, num_examples: int, seed: int) -> metadata_lib.SubsetSource:
  """The records of `source` with `poisoned == 0`; with `num_examples` > 0, a seeded sample of
  that many (in source order). Records keep their ids. Decided from the source's metadata
  (`data/metadata.py`), so no image is read."""
  return metadata_lib.clean_subset(source, num_examples, seed)


STEP = base.StepKind("cleanclip", image_views=("image", "image2"), text_views=("text", "text2"), gather=True)


class CleanClip(base.Defense):
  """CleanCLIP fine-tuning: one two-view step kind on the clean subset, starting from `config.init_from`."""

  name = "cleanclip"
  config_block = "cleanclip"
  views = 2
  fine_tunes = True

  @classmethod
  def default_config(cls) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.clip_weight = 1.0  # lambda_1, on the cross-modal (CLIP or SigLIP) loss.
    c.inmodal_weight = 1.0  # lambda_2, on the in-modal InfoNCE of (x, aug(x)).
    # The defender's clean set: this many examples known to be clean, drawn from the training
    # source with the poisoned records removed (0 = all clean ones).
    c.num_clean_examples = 0
    c.subset_seed = 0
    return c

  @classmethod
  def validate(cls, config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
    del num_batch_shards
    c = config.cleanclip
    if not config.init_from:
      raise config_error(
          "init_from",
          "is empty but defense='cleanclip' fine-tunes an already trained model.",
          "point config.init_from at a run's workdir, a Hugging Face CLIP directory or an OpenAI " "weights file.",
      )
    if c.clip_weight < 0 or c.inmodal_weight < 0 or c.clip_weight + c.inmodal_weight == 0:
      raise config_error(
          "cleanclip.clip_weight",
          "and cleanclip.inmodal_weight must be >= 0 and not both 0.",
          "use CleanCLIP's 1.0 and 1.0.",
      )
    if c.num_clean_examples < 0:
      raise config_error(
          "cleanclip.num_clean_examples", f"is {c.num_clean_examples}.", "use 0 (every clean example) or more."
      )

  @classmethod
  def train_records(cls, config: ml_collections.ConfigDict, source: Any, image_transform: Any) -> tuple[Any, Any]:
    del image_transform  # No poisoned record is left to stamp a trigger on.
    source = clean_subset(source, config.cleanclip.num_clean_examples, config.cleanclip.subset_seed)
    logging.info("CleanCLIP: fine-tuning on %d clean examples", len(source))
    return source, None

  def schedule(self, epoch: int) -> base.StepKind:
    del epoch
    return STEP

  @classmethod
  def table_notes(cls, config: ml_collections.ConfigDict, rows: list[tuple[str, dict[str, Any]]]) -> list[str]:
    notes = []
    for name, overrides in rows:
      clean = overrides.get("cleanclip.num_clean_examples", config.cleanclip.num_clean_examples) or "all"
      notes.append(
          f"{name}: starts from the final model of {overrides['init_from'].replace('{workdir}/', '')!r} "
          f"and fine-tunes it for {overrides.get('num_epochs', config.num_epochs)} epochs on {clean} clean "
          f"training pairs (lr {overrides.get('optim.lr', config.optim.lr):g}, CLIP + in-modal losses "
          f"weighted {config.cleanclip.clip_weight:g} / {config.cleanclip.inmodal_weight:g})."
      )
    return notes

  def loss(self, kind, z, scalars, state, batch, mesh, pair_loss):
    del kind, state, batch, mesh
    return step_loss(z, scalars, self.config.cleanclip, pair_loss)
