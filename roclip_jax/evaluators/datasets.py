"""Eval data for the evaluators: the demo/CSV split, any TFDS dataset, or an image folder.

All three return a `roclip_jax.data.pipeline.EvalSet` (images read and eval-preprocessed to the
model's image size by `pipeline.ImageReader`, the path training and scoring use too). An evaluator config chooses with `dataset=`:

* `'demo'`: the pipeline's `make_eval_arrays(config, split)` (the demo dataset, or
  `config.data.eval_csv` + `config.data.classes_json`).
* `'tfds:<name>'`: `tfds.data_source(name, split=split, data_dir=data_dir)`. No TensorFlow needed;
  the dataset must already be prepared under `data_dir`. Class names come from the label feature,
  with underscores turned into spaces; captions are the class names.
* `'folder:<path>'`: `<path>/<class_name>/*.{jpg,jpeg,png}`, classes in sorted order, underscores
  in folder names turned into spaces. A `{split}` in the path is replaced by the split name
  (`folder:/data/pets/{split}`).

TFDS and folder sets use the 80 OpenAI ImageNet templates as their `templates`.
"""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import numpy as np

from roclip_jax.data import pipeline
from roclip_jax.data import templates as templates_lib

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
DATASET_KINDS = ("demo", "tfds:<name>", "folder:<path>")


def model_image_size(config: Any, image_size: int = 0) -> int:
  """The evaluator's `image_size` if set, else `config.model.image.image_size`."""
  if image_size:
    return int(image_size)
  try:
    return int(config.model.image.image_size)
  except AttributeError:
    raise ValueError(
        "Cannot tell the eval image size: set the evaluator's image_size or " "config.model.image.image_size."
    ) from None


def _class_name(raw: str) -> str:
  return raw.replace("_", " ")


def _subset(num: int, max_examples: int) -> np.ndarray:
  """All indices, or a seeded random subset (sorted) of `max_examples` of them."""
  if max_examples <= 0 or max_examples >= num:
    return np.arange(num)
  return np.sort(np.random.default_rng(0).choice(num, size=max_examples, replace=False))


def from_tfds(
    name: str,
    split: str,
    *,
    image_size: int,
    data_dir: str = "",
    image_key: str = "image",
    label_key: str = "label",
    max_examples: int = 0,
) -> pipeline.EvalSet:
  """A prepared TFDS dataset read through `tfds.data_source` (no TensorFlow)."""
  import tensorflow_datasets as tfds  # deferred: slow import, only for tfds evals

  source = tfds.data_source(name, split=split, data_dir=data_dir or None)
  features = source.dataset_info.features
  for key in (image_key, label_key):
    if key not in features:
      raise ValueError(
          f"TFDS dataset {name!r} has no feature {key!r} (features: "
          f"{list(features.keys())}); set the evaluator's image_key/label_key."
      )
  if not hasattr(features[label_key], "names"):
    raise ValueError(f"TFDS feature {name}/{label_key} is not a ClassLabel; zero-shot needs " "class names.")
  class_names = [_class_name(n) for n in features[label_key].names]
  indices = _subset(len(source), max_examples)
  reader = pipeline.ImageReader(image_size)
  images, labels = [], []
  for i in indices:
    example = source[int(i)]
    images.append(reader.eval_image({"image": example[image_key]}))
    labels.append(int(example[label_key]))
  labels = np.asarray(labels, np.int64)
  return pipeline.EvalSet(
      images=np.stack(images),
      labels=labels,
      captions=[class_names[y] for y in labels],
      ids=indices.astype(np.int64),
      class_names=class_names,
      templates=list(templates_lib.OPENAI_IMAGENET_TEMPLATES),
  )


def from_folder(root: str, *, image_size: int, max_examples: int = 0) -> pipeline.EvalSet:
  """Images in `root/<class_name>/`, labelled by their folder; undecodable files are skipped."""
  if not os.path.isdir(root):
    raise ValueError(
        f"Image folder {root!r} does not exist; give dataset='folder:<dir>' with one " "sub-folder of images per class."
    )
  folders = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
  paths, labels = [], []
  for label, folder in enumerate(folders):
    for file in sorted(os.listdir(os.path.join(root, folder))):
      if file.lower().endswith(IMAGE_EXTENSIONS):
        paths.append(os.path.join(root, folder, file))
        labels.append(label)
  if not paths:
    raise ValueError(
        f"No {'/'.join(IMAGE_EXTENSIONS)} image in the class folders of {root!r}; "
        "expected <root>/<class_name>/<image>."
    )
  indices = _subset(len(paths), max_examples)
  reader = pipeline.ImageReader(image_size)
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as threads:
    images = list(threads.map(lambda i: reader.eval_image({"image_path": paths[i]}), indices))
  keep = [k for k, image in enumerate(images) if image is not None]
  if not keep:
    raise ValueError(f"No image under {root!r} could be decoded.")
  class_names = [_class_name(f) for f in folders]
  kept_labels = np.asarray([labels[indices[k]] for k in keep], np.int64)
  return pipeline.EvalSet(
      images=np.stack([images[k] for k in keep]),
      labels=kept_labels,
      captions=[class_names[y] for y in kept_labels],
      ids=indices[keep].astype(np.int64),
      class_names=class_names,
      templates=list(templates_lib.OPENAI_IMAGENET_TEMPLATES),
      num_skipped=len(indices) - len(keep),
  )


def load_eval_set(
    config: Any,
    dataset: str,
    split: str,
    *,
    data_dir: str = "",
    image_size: int = 0,
    image_key: str = "image",
    label_key: str = "label",
    max_examples: int = 0,
) -> pipeline.EvalSet:
  """Loads one eval split; `dataset` is 'demo', 'tfds:<name>' or 'folder:<path>'."""
  if dataset == "demo":
    data = pipeline.make_eval_arrays(config, split)
    keep = _subset(len(data.labels), max_examples)
    if len(keep) == len(data.labels):
      return data
    return pipeline.EvalSet(
        images=data.images[keep],
        labels=data.labels[keep],
        captions=[data.captions[i] for i in keep],
        ids=data.ids[keep],
        class_names=data.class_names,
        templates=data.templates,
        num_skipped=data.num_skipped,
    )
  size = model_image_size(config, image_size)
  kind, _, arg = dataset.partition(":")
  if kind == "tfds" and arg:
    return from_tfds(
        arg,
        split,
        image_size=size,
        data_dir=data_dir,
        image_key=image_key,
        label_key=label_key,
        max_examples=max_examples,
    )
  if kind == "folder" and arg:
    return from_folder(arg.replace("{split}", split), image_size=size, max_examples=max_examples)
  raise ValueError(f"Unknown eval dataset {dataset!r}; use one of {list(DATASET_KINDS)}.")
