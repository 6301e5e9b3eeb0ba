"""Attack success: targeted-poisoning success rate and backdoor attack success rate (ASR).

Both classify with the zero-shot prompt ensemble over the eval set's class names
(docs/attacks_and_metrics.md, sections 7-8; RoCLIP's `verify_with_template_full.py`: 80
templates, top-1 success, top-k also recorded).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import ml_collections
import numpy as np

from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.evaluators import common
from roclip_jax.data import templates as templates_lib
from roclip_jax.evaluators import zeroshot

# (image path, side) -> uint8 [side, side, 3] eval-preprocessed image.
LoadImage = Callable[[str, int], np.ndarray]


def load_eval_image(path: str, size: int) -> np.ndarray:
  """Decodes a file and applies CLIP's eval preprocessing (shorter side to `size`, centre crop)."""
  image = pipeline.ImageReader(size).eval_image({"image_path": path})
  if image is None:
    raise ValueError(
        f"Cannot decode target image {path!r}; the targeted-poisoning evaluator needs "
        "the held-out images the poisons were made from."
    )
  return image


def _class_index(name: str, class_names: Sequence[str], evaluator: str, what: str) -> int:
  try:
    return list(class_names).index(name)
  except ValueError:
    raise ValueError(
        f"Evaluator {evaluator!r}: the {what} {name!r} is not a class of the eval "
        f"set ({len(class_names)} classes); evaluate on the dataset the attack "
        "targeted."
    ) from None


class TargetedPoisonEvaluator(common.Evaluator):
  """Fraction of targets whose clean image is classified as their adversarial class."""

  def __init__(
      self,
      name: str,
      *,
      every_steps: int,
      load_split: common.LoadSplit,
      targets: Sequence[poison_lib.PoisonTarget],
      templates: str = "imagenet80",
      load_image: LoadImage = load_eval_image,
  ):
    super().__init__(name, every_steps=every_steps)
    if not targets:
      raise ValueError(
          f"Evaluator {name!r} (targeted_poison) has no targets: enable "
          "config.poison.targeted, or drop this evaluator."
      )
    self._load_split = load_split
    self._targets = tuple(targets)
    self._templates_option = templates
    self._load_image = load_image
    templates_lib.resolve_templates(templates, ["{}"])

  @functools.cached_property
  def _data(self) -> tuple[common.EvalSetLike, np.ndarray, np.ndarray]:
    data = self._load_split()
    side = data.images.shape[1]
    images = np.stack([self._load_image(t.image_path, side) for t in self._targets])
    adversarial = np.array(
        [_class_index(t.adversarial_class, data.class_names, self.name, "adversarial class") for t in self._targets]
    )
    return data, images, adversarial

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    data, images, adversarial = self._data
    templates = templates_lib.resolve_templates(self._templates_option, data.templates)
    classifier = zeroshot.class_embeddings(encoder, data.class_names, templates, name=self.name)
    logits = zeroshot.zero_shot_logits(encoder, images, classifier, name=self.name)
    return self._metrics(
        {
            "success_rate": common.topk_hits(logits, adversarial, 1).mean(),
            "success_rate_top5": common.topk_hits(logits, adversarial, 5).mean(),
            "num_targets": len(self._targets),
        }
    )


class BackdoorAsrEvaluator(common.Evaluator):
  """ASR: the fraction of triggered non-target-class eval images classified as the target class.

  Also reports, on the same images without the trigger, the clean top-1 accuracy and the rate at
  which they are already classified as the target class (the ASR a clean model would get).
  """

  def __init__(
      self,
      name: str,
      *,
      every_steps: int,
      load_split: common.LoadSplit,
      poison_cfg: ml_collections.ConfigDict,
      seed: int,
      target_class: str,
      templates: str = "imagenet80",
  ):
    super().__init__(name, every_steps=every_steps)
    poison_lib.validate_config(poison_cfg)
    self._load_split = load_split
    self._poison_cfg = poison_cfg
    self._seed = int(seed)
    self._target_class = target_class
    self._templates_option = templates
    templates_lib.resolve_templates(templates, ["{}"])

  @functools.cached_property
  def _data(self) -> tuple[common.EvalSetLike, int, np.ndarray, np.ndarray, np.ndarray]:
    """The eval set, the target label, and the clean / triggered non-target images and labels."""
    data = self._load_split()
    target = _class_index(self._target_class, data.class_names, self.name, "backdoor target class")
    labels = common.check_labels(self.name, data.labels, len(data.class_names))
    keep = np.flatnonzero(labels != target)
    if not keep.size:
      raise ValueError(
          f"Evaluator {self.name!r}: every eval image is of the target class "
          f"{self._target_class!r}; there is nothing to attack."
      )
    clean = data.images[keep]
    # The trigger depends on the attack seed and the image's id only, as at training time.
    triggered = np.stack(
        [
            poison_lib.apply_trigger(image, self._poison_cfg, self._seed, example_id=int(i))
            for image, i in zip(clean, np.asarray(data.ids)[keep])
        ]
    )
    return data, target, clean, triggered, labels[keep]

  def run(self, encoder: common.Encoder) -> dict[str, float]:
    data, target, clean, triggered, labels = self._data
    templates = templates_lib.resolve_templates(self._templates_option, data.templates)
    classifier = zeroshot.class_embeddings(encoder, data.class_names, templates, name=self.name)
    targets = np.full(len(labels), target)
    triggered_logits = zeroshot.zero_shot_logits(encoder, triggered, classifier, name=self.name)
    clean_logits = zeroshot.zero_shot_logits(encoder, clean, classifier, name=self.name)
    return self._metrics(
        {
            "asr": common.topk_hits(triggered_logits, targets, 1).mean(),
            "asr_top5": common.topk_hits(triggered_logits, targets, 5).mean(),
            "clean_top1": common.topk_hits(clean_logits, labels, 1).mean(),
            "clean_target_rate": common.topk_hits(clean_logits, targets, 1).mean(),
            "num_images": len(labels),
        }
    )
