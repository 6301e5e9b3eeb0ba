"""The training pipeline's per-example output, bit for bit, against golden hashes.

The hashes in `GOLDEN` were computed by `element_hashes` below with the pipeline code before the input
pipeline was tuned (commit 5ac9bb9, the merge base of issue 25's branch), run on the same generated
records: the images, crops, augmentations, packed device parameters and tokens must stay what they
were. They depend on Pillow's JPEG codec (libjpeg-turbo) and PNG encoder, pinned in requirements.txt;
after a Pillow upgrade, recompute them from that commit
(`PYTHONPATH=<checkout of 5ac9bb9> python tests/test_pipeline_golden.py`) before comparing.

Every generated image has its shorter side below twice the model size, so JPEG draft mode (DCT-domain
downscaling, which would change the decoded pixels) could not apply; the pipeline does not use it
(docs/performance.md, "The input pipeline").
"""

from __future__ import annotations

import hashlib
import io

import ml_collections
import numpy as np
from PIL import Image

from roclip_jax.data import augment
from roclip_jax.data import pipeline

IMAGE_SIZE = 32
# (format, mode, width, height): sizes below 2 * IMAGE_SIZE on the shorter side (no draft), one exactly
# IMAGE_SIZE square (the resize is skipped), grey, CMYK, RGBA and palette images (colour conversions).
IMAGES = (
    ("JPEG", "RGB", 52, 40),
    ("JPEG", "RGB", 33, 63),
    ("JPEG", "RGB", 32, 32),
    ("JPEG", "L", 48, 40),
    ("JPEG", "CMYK", 40, 44),
    ("PNG", "RGBA", 36, 36),
    ("PNG", "P", 40, 30),
    ("PNG", "RGB", 60, 37),
)
CAPTIONS = ("a photo of a red Car", "two dogs &amp; a cat, on   grass", "Ünïcode café scene 42", "")
# (name, augment overrides, views)
MODES = (
    ("off", dict(image=False, text=False), 1),
    ("host", dict(image=True, text=True), 2),
    ("device", dict(image=True, text=False, placement="device"), 2),
)
# element_hashes(records()) from commit 5ac9bb9 (see the module docstring).
GOLDEN = {
    "off": "cfb296f5207edfe2ea7eb8a450d4bf0cd98e461e27df67c699c04a4e7b5ddcd6",
    "host": "1b86303d336c7d3be544a5e49aa47dc10f228a73de54b4c89dbd7985076957c1",
    "device": "89f48ac5fb1523be4b1632983a68da4526bef4f098c30d9edc6062e348fc187c",
}


def encode(fmt: str, mode: str, width: int, height: int, seed: int) -> bytes:
  """A smooth image with texture (compresses like a photo), in `mode`, encoded as `fmt`."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
  base = np.sin(2 * np.pi * (rng.uniform(0.5, 3) * xx + rng.uniform(0.5, 3) * yy))[..., None]
  pixels = 128 + base * rng.uniform(-90, 90, 3) + rng.normal(0, 8, (height, width, 3))
  image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
  if mode == "RGBA":
    image = image.convert("RGBA")
    image.putalpha(Image.fromarray(rng.integers(0, 256, (height, width)).astype(np.uint8)))
  elif mode == "P":
    image = image.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
  else:
    image = image.convert(mode)
  out = io.BytesIO()
  image.save(out, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
  return out.getvalue()


def records() -> list[dict]:
  rows = [
      dict(id=i, caption=CAPTIONS[i % len(CAPTIONS)], label=i % 3, poisoned=i % 2, image_bytes=encode(*spec, seed=i))
      for i, spec in enumerate(IMAGES)
  ]
  rows.append(dict(id=len(rows), caption="undecodable", label=0, poisoned=0, image_bytes=b"\xff\xd8 not a jpeg"))
  return rows


def element_hashes(source: list[dict], loader_class: type = pipeline._ExampleLoader) -> dict[str, str]:  # pylint: disable=protected-access
  """sha256 per mode of every element at positions 0..2N-1 (two epochs), keys in sorted order."""
  out = {}
  for name, overrides, views in MODES:
    cfg = augment.default_config()
    cfg.update(overrides)
    loader = loader_class(  # The exact per-example work.
        source,
        epoch_length=len(source),
        image_size=IMAGE_SIZE,
        context_length=16,
        seed=3,
        process_index=0,
        augment_cfg=ml_collections.ConfigDict(cfg),
        image_transform=None,
        views=views,
    )
    digest = hashlib.sha256()
    for position in range(2 * len(source)):
      element = loader(position, position % len(source))
      for key in sorted(element):
        value = np.asarray(element[key])
        digest.update(f"{key}:{value.dtype}:{value.shape}:".encode())
        digest.update(value.tobytes() if value.dtype != object else str(value).encode())
    out[name] = digest.hexdigest()
  return out


def test_per_example_output_matches_the_old_code():
  assert element_hashes(records()) == GOLDEN


def test_the_benchmarks_previous_host_augmentation_is_the_old_code():
  # `bench.data --compare` times this loader as "previous": it must give the old elements too.
  from roclip_jax.bench import data as bench_data  # pylint: disable=g-import-not-at-top

  hashes = element_hashes(records(), bench_data._PreviousHostAugmentLoader)  # pylint: disable=protected-access
  assert hashes["host"] == GOLDEN["host"]


if __name__ == "__main__":
  print(element_hashes(records()))
