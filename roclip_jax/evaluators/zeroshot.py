"""Zero-shot classification with a prompt ensemble (CLIP's protocol).

Class embedding = normalise(mean over templates of normalise(encode_texts(template.format(c)))).
Logits = cosine between the normalised image embedding and each class embedding (no scale).
The protocol as implemented: docs/attacks_and_metrics.md, section 4.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

from roclip_jax.evaluators import common
from roclip_jax.data import templates as templates_lib


def class_embeddings(
    encoder: common.Encoder, class_names: Sequence[str], templates: Sequence[str], *, name: str = "zeroshot"
) -> np.ndarray:
  """[C, d] unit-norm prompt-ensemble embedding of every class, in one encoder call."""
  if not class_names:
    raise ValueError(f"Evaluator {name!r}: the eval set has no class names.")
  prompts = [t.format(c) for c in class_names for t in templates]
  emb = common.check_encoded(name, encoder.encode_texts(prompts), len(prompts))
  emb = common.l2_normalize(emb).reshape(len(class_names), len(templates), -1)
  return common.l2_normalize(emb.mean(axis=1))


def zero_shot_logits(
    encoder: common.Encoder, images: np.ndarray, classifier: np.ndarray, *, name: str = "zeroshot"
) -> np.ndarray:
  """[N, C] cosine of each image embedding with each class embedding."""
  emb = common.check_encoded(name, encoder.encode_images(images), len(images))
  return common.l2_normalize(emb) @ classifier.T


class ZeroShotEvaluator(common.Evaluator):
  """Top-1 and top-5 (clipped to the number of classes) zero-shot accuracy on one split."""

  def __init__(self, name: str, *, every_steps: int, load_split: common.LoadSplit, templates: str = "imagenet80"):
    super().__init__(name, every_steps=every_steps)
    self._load_split = load_split
    self._templates_option = templates
    templates_lib.resolve_templates(templates, ["{}"])  # fail at construction on a bad option

  @functools.cached_property
  def _data(self) -> common.EvalSetLike:
    return self._load_split()

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    data = self._data
    templates = templates_lib.resolve_templates(self._templates_option, data.templates)
    classifier = class_embeddings(encoder, data.class_names, templates, name=self.name)
    logits = zero_shot_logits(encoder, data.images, classifier, name=self.name)
    labels = common.check_labels(self.name, data.labels, len(data.class_names))
    return self._metrics(
        {"top1": common.topk_hits(logits, labels, 1).mean(), "top5": common.topk_hits(logits, labels, 5).mean()}
    )
