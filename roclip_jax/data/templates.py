"""Zero-shot prompt templates.

`OPENAI_IMAGENET_TEMPLATES` is the 80-prompt ImageNet ensemble of OpenAI's CLIP notebook
(`Prompt_Engineering_for_ImageNet.ipynb`), copied in order from open_clip's
`OPENAI_IMAGENET_TEMPLATES` (`src/open_clip/zero_shot_metadata.py`) with `{c}` written as `{}`.
CyCLIP, CleanCLIP and RoCLIP use these 80 templates for every zero-shot and attack evaluation,
CIFAR included.
"""

from __future__ import annotations

from collections.abc import Sequence

OPENAI_IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)

TEMPLATE_SETS = ("imagenet80", "dataset")


def resolve_templates(option: str, dataset_templates: Sequence[str] | None) -> list[str]:
  """Templates for a zero-shot classifier: the 80 ImageNet ones, or the eval set's own.

  Every template must hold exactly one `{}`, the slot for the class name.
  """
  if option == "imagenet80":
    chosen = list(OPENAI_IMAGENET_TEMPLATES)
  elif option == "dataset":
    chosen = list(dataset_templates or [])
    if not chosen:
      raise ValueError("templates='dataset' but the eval set has no templates; use " "templates='imagenet80'.")
  else:
    raise ValueError(f"templates={option!r} is not one of {list(TEMPLATE_SETS)}.")
  bad = [t for t in chosen if t.count("{}") != 1]
  if bad:
    raise ValueError(f"Templates need exactly one '{{}}' slot for the class name: {bad[:3]}.")
  return chosen
