"""CleanCLIP (Bansal, Singhi et al., ICCV 2023; docs/methods.md, section 6): fine-tune away a backdoor.

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
(`config.data.views=2` with `augment.image/text` off). Our image augmentation
is RoCLIP's SimCLR-style one (`data/augment.py`), not CleanCLIP's AutoAugment.

The clean data: `clean_subset` keeps the training source's records that are
not poisoned, optionally a seeded sample of them, standing in for the
defender's separately curated clean set (CleanCLIP fine-tunes on 100K clean
CC3M pairs).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import ml_collections
import numpy as np

from roclip_jax import losses


def step_loss(z: dict[str, jax.Array], scalars: dict[str, jax.Array], cfg: ml_collections.ConfigDict,
              cross_modal_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
              ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The CleanCLIP loss on unit embeddings 'image', 'text' (originals) and 'image2', 'text2' (augmented)."""
  cross, aux = cross_modal_loss(z["image"], z["text"], scalars)
  # loss_i2t of clip_loss(a, b) is exactly InfoNCE with rows a, columns b.
  _, image_aux = losses.clip_loss(z["image"], z["image2"], scalars["logit_scale"])
  _, text_aux = losses.clip_loss(z["text"], z["text2"], scalars["logit_scale"])
  inmodal = 0.5 * (image_aux["loss_i2t"] + text_aux["loss_i2t"])
  loss = cfg.clip_weight * cross + cfg.inmodal_weight * inmodal
  return loss, dict(aux, loss_cross=cross, loss_inmodal=inmodal)


class SubsetSource:
  """Some records of a source, by index; random access and picklable like the source."""

  def __init__(self, base: Any, indices: np.ndarray):
    self._base = base
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._base[int(self._indices[int(index)])]


def clean_subset(source: Any, num_examples: int, seed: int) -> SubsetSource:
  """The records of `source` with `poisoned == 0`; with `num_examples` > 0, a seeded sample of
  that many (in source order). Records keep their ids."""
  clean = np.asarray([i for i in range(len(source)) if int(source[i].get("poisoned", 0)) == 0], np.int64)
  if num_examples:
    if num_examples > clean.size:
      raise ValueError(f"cleanclip.num_clean_examples={num_examples} but the training source has only "
                       f"{clean.size} clean records; lower it, or use 0 for all of them.")
    clean = np.sort(np.random.default_rng([seed, 0xC1EA]).choice(clean, size=num_examples, replace=False))
  return SubsetSource(source, clean)
