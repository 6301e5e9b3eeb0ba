"""Zero-shot top-1 per class of trained runs, on their labelled test split.

  python tools/per_class_zero_shot.py DIR [DIR ...]

Loads each run's final checkpoint (`roclip_jax.inspect.load`), classifies the test split of the
first run's config with the prompt-ensemble classifier (`Run.zero_shot`, the split's class names and
templates) and prints, per run, the overall accuracy, each class's and how many test images each
class was predicted for. Runs of the same benchmark share a test split, so their rows compare class
by class: docs/roclip.md, section 8 reads which classes the gate cost.
"""

from __future__ import annotations

import sys

import numpy as np

from roclip_jax import inspect as inspect_lib
from roclip_jax.data import pipeline


def main(workdirs: list[str]) -> None:
  if not workdirs:
    sys.exit(__doc__)
  split = None
  for workdir in workdirs:
    run = inspect_lib.load(workdir)
    if split is None:
      split = pipeline.make_eval_arrays(run.config, "test")
    predicted = run.zero_shot(split.images, split.class_names, split.templates).argmax(axis=1)
    per_class = [np.mean(predicted[split.labels == c] == c) for c in range(len(split.class_names))]
    print(f"{workdir}: {np.mean(predicted == split.labels):.1%} of {len(split.labels)} test images")
    print("  per class: " + " ".join(f"{name}={acc:.2f}" for name, acc in zip(split.class_names, per_class)))
    counts = np.bincount(predicted, minlength=len(split.class_names))
    print("  predicted: " + " ".join(f"{name}={n}" for name, n in zip(split.class_names, counts)))


if __name__ == "__main__":
  main(sys.argv[1:])
