r"""Input throughput from ArrayRecord shards: examples/s per CPU core and with N grain workers.

  python -m roclip_jax.bench.data                                  # 224 px, workers 0 1 2
  python -m roclip_jax.bench.data --target_pairs_per_sec 8000 --workers 4 --workers 8

Writes `--num_images` synthetic JPEGs (shorter side `--source_size`, quality 95, as the converter
stores them) into ArrayRecord shards, then measures, with augmentation off (CLIP's eval resize +
centre crop) and on (RoCLIP's image augmentation; `--text_augment` adds EDA, which needs WordNet):
* per core: the pipeline's per-example work (read record, decode JPEG, resize/augment, tokenize)
  in one thread of this process;
* the real training pipeline (`pipeline.make_train_data`, data.source='array_record') with each
  `--workers` count (0 = grain's threads in this process), after the first batch (worker start).
Augmentation is measured with both placements: 'host' (grain workers augment) and 'device' (workers
decode, resize to `augment.device_source_size` and draw the parameters; the train step augments).
The JPEG library's limit comes first: the bare decode + resize + centre crop of the same files by PIL
(libjpeg-turbo; JPEG draft mode, one thread, bytes already in memory, no pipeline), and each per-core
line prints its ratio to it (pipeline / bare decode; 1 = the pipeline costs nothing beyond the codec).
The last lines estimate the CPU cores needed to feed `--target_pairs_per_sec` (8000 pairs/s is
roughly one H100 training ViT-B/32 at 224 px) for each.

`--compare` also times the previous host augmentation (`augment_reference`, the code before issue 25)
per core, in rounds alternating with the current one on the same files, so that a shared machine's
load falls on both alike; it prints both rates, their ratio, and how many output pixels differ.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import ml_collections
import numpy as np
from PIL import Image

from roclip_jax import config_lib
from roclip_jax import host_runtime
from roclip_jax.data import array_record
from roclip_jax.data import augment_reference
from roclip_jax.data import pipeline

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """CLI flags, defined only when run as a program (other bench modules reuse these names)."""
  flags.DEFINE_integer("num_images", 512, "Synthetic images written to the shards.")
  flags.DEFINE_integer("source_size", 256, "Shorter side of the stored JPEGs.")
  flags.DEFINE_integer("image_size", 224, "Model input side.")
  flags.DEFINE_multi_integer("workers", [0, 1, 2], "grain worker counts to measure.")
  flags.DEFINE_integer("batch", 64, "Batch size of the pipeline runs.")
  flags.DEFINE_integer("batches", 12, "Timed batches per pipeline run (after one warm-up).")
  flags.DEFINE_integer("per_core_examples", 300, "Examples timed per core.")
  flags.DEFINE_float("target_pairs_per_sec", 8000.0, "Trainer rate to feed (pairs/s).")
  flags.DEFINE_bool("text_augment", False, "Also time EDA (needs WordNet).")
  flags.DEFINE_string("shard_dir", "", "Where to write the shards ('' = a temp dir).")
  flags.DEFINE_bool("compare", False, "Also time the previous host augmentation, alternating with the current.")
  flags.DEFINE_integer("compare_rounds", 6, "Alternating rounds of --compare (per_core_examples in all, each).")


def synthetic_jpeg(rng: np.random.Generator, short: int) -> bytes:
  """A photo-like JPEG: smooth colour fields plus fine texture (compresses like real images)."""
  height, width = short, int(short * rng.uniform(1.0, 1.5))
  yy, xx = np.mgrid[0:height, 0:width] / short
  image = np.zeros((height, width, 3))
  for _ in range(4):
    freq, phase, colour = rng.uniform(0.5, 4, 2), rng.uniform(0, 6.3), rng.uniform(-60, 60, 3)
    image += np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy) + phase)[..., None] * colour
  image += 128 + rng.normal(0, 6, image.shape)
  out = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(out, format="JPEG", quality=95)
  return out.getvalue()


def write_shards(directory: str, num_images: int, short: int, per_shard: int = 128) -> float:
  """Writes the shards; returns the mean JPEG size in KiB."""
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  sizes = []
  for shard, start in enumerate(range(0, num_images, per_shard)):
    writer = ArrayRecordWriter(os.path.join(directory, f"shard-{shard:05d}.array_record"), "group_size:1")
    for i in range(start, min(num_images, start + per_shard)):
      jpeg = synthetic_jpeg(rng, short)
      sizes.append(len(jpeg))
      writer.write(
          array_record.encode_record(
              source_id=i, caption=f"a photo of a synthetic scene number {i} with soft colours", image_bytes=jpeg
          )
      )
    writer.close()
  return float(np.mean(sizes)) / 1024


# (label, augment images, augment.placement): with 'device' the host decodes, resizes the whole image to
# augment.device_source_size and draws the parameters; the train step applies them.
MODES = (("augment off", False, "host"), ("augment host", True, "host"), ("augment device", True, "device"))


def bench_config(shard_dir: str, augment: bool, workers: int, placement: str = "host") -> ml_collections.ConfigDict:
  config = config_lib.base_config()
  config.model.image.image_size = FLAGS.image_size
  config.model.text.context_length = 77
  config.data.source = "array_record"
  config.data.array_record_pattern = shard_dir
  config.data.batch_size = FLAGS.batch
  config.data.num_workers = workers
  config.num_epochs = 1000  # Never the limit here.
  config.augment.image = augment
  config.augment.placement = placement
  config.augment.text = augment and FLAGS.text_augment
  return config


def bare_decode_rate(shard_dir: str, size: int, count: int) -> float:
  """Examples/s of PIL alone on the shards' JPEGs: decode (draft mode) + bicubic resize + centre crop."""
  source = array_record.ArrayRecordSource.from_pattern(shard_dir)
  jpegs = [source[i]["image_bytes"] for i in range(min(len(source), count))]

  def decode_resize(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
      image.draft("RGB", (size, size))
      width, height = image.size
      new_w, new_h = (int(size * width / height), size) if height <= width else (size, int(size * height / width))
      image = image.resize((new_w, new_h), Image.Resampling.BICUBIC)
      top, left = int(round((new_h - size) / 2.0)), int(round((new_w - size) / 2.0))
      return np.asarray(image.crop((left, top, left + size, top + size)))

  decode_resize(jpegs[0])
  start = time.perf_counter()
  for position in range(count):
    decode_resize(jpegs[position % len(jpegs)])
  return count / (time.perf_counter() - start)


class _PreviousHostAugmentLoader(pipeline._ExampleLoader):  # pylint: disable=protected-access
  """The per-example work with the previous host augmentation (`augment_reference`): the same draws
  from the same stream, the previous arithmetic, and `config.augment` read per example as before."""

  def _augmented_image(self, raw: np.ndarray, key: int, position: int) -> np.ndarray:
    rng = np.random.Generator(np.random.Philox(key=(key << 64) | position))
    return augment_reference.augment_image(raw, rng, self._augment_cfg, self._image_size)


def _loader(config: ml_collections.ConfigDict, loader_class: type = pipeline._ExampleLoader) -> tuple[Any, int]:  # pylint: disable=protected-access
  """The exact per-example work of the training pipeline, first-call costs (tokenizer) paid, and the
  number of records it reads."""
  source = array_record.ArrayRecordSource.from_pattern(config.data.array_record_pattern)
  loader = loader_class(
      source,
      epoch_length=len(source),
      image_size=config.model.image.image_size,
      context_length=config.model.text.context_length,
      seed=0,
      process_index=0,
      augment_cfg=config.augment,
      image_transform=None,
  )
  loader(0, 0)
  return loader, len(source)


def _seconds(loader: Any, num_records: int, positions: range) -> tuple[float, float]:
  """(wall-clock, this thread's CPU) seconds of the loader over `positions`."""
  wall, cpu = time.perf_counter(), time.thread_time()
  for position in positions:
    loader(position, position % num_records)
  return time.perf_counter() - wall, time.thread_time() - cpu


def per_core_rate(config: ml_collections.ConfigDict) -> float:
  """Examples/s of the pipeline's per-example function in one thread (one core)."""
  count = FLAGS.per_core_examples
  return count / _seconds(*_loader(config), range(count))[0]


def compare_with_previous(config: ml_collections.ConfigDict) -> dict[str, float]:
  """The host-augmenting per-example work, current and previous, timed in `--compare_rounds` rounds
  that alternate over the same positions: examples/s per core of each (wall clock), the ratio of
  their thread CPU times, and how many image values of their outputs differ."""
  (current, num_records), (previous, _) = _loader(config), _loader(config, _PreviousHostAugmentLoader)
  count, rounds = FLAGS.per_core_examples, max(1, FLAGS.compare_rounds)
  wall, cpu = np.zeros(2), np.zeros(2)
  for r in range(rounds):
    positions = range(r * count // rounds, (r + 1) * count // rounds)
    for i, loader in enumerate((current, previous)):
      seconds = _seconds(loader, num_records, positions)
      wall[i] += seconds[0]
      cpu[i] += seconds[1]
  differing = total = 0
  for position in range(count):
    new, old = (loader(position, position % num_records)["image"] for loader in (current, previous))
    differing += int(np.count_nonzero(new != old))
    total += new.size
  return dict(
      current=count / wall[0], previous=count / wall[1], cpu_ratio=cpu[1] / cpu[0], differing=differing, total=total
  )


def pipeline_rate(config: ml_collections.ConfigDict) -> float:
  """Examples/s of `make_train_data` after its first batch."""
  data = pipeline.make_train_data(config)
  iterator = data.iterator
  try:
    next(iterator)  # Starts the workers.
    start = time.perf_counter()
    for _ in range(FLAGS.batches):
      next(iterator)
    return FLAGS.batches * data.local_batch_size / (time.perf_counter() - start)
  finally:
    close = getattr(iterator, "close", None)
    if close is not None:
      close()


def main(argv):
  del argv
  host_settings = host_runtime.tune()  # What the trainer's process runs with (roclip_jax/host_runtime.py).
  with tempfile.TemporaryDirectory() as tmp:
    shard_dir = FLAGS.shard_dir or tmp
    os.makedirs(shard_dir, exist_ok=True)
    kib = write_shards(shard_dir, FLAGS.num_images, FLAGS.source_size)
    print(
        f"{FLAGS.num_images} JPEGs, shorter side {FLAGS.source_size} px, mean {kib:.1f} KiB, "
        f"-> {FLAGS.image_size} px; {os.cpu_count()} CPU cores; batch {FLAGS.batch}; "
        f"host settings: {'; '.join(host_settings) or 'none'}"
    )
    bare = bare_decode_rate(shard_dir, FLAGS.image_size, FLAGS.per_core_examples)
    print(f"{'bare decode':14s}: {'PIL decode + resize + crop (1 thread)':40s} {bare:8.1f} examples/s")
    per_core = {}
    for label, augment, placement in MODES:
      config = bench_config(shard_dir, augment, 0, placement)
      compared = compare_with_previous(config) if FLAGS.compare and augment and placement == "host" else None
      per_core[label] = compared["current"] if compared else per_core_rate(config)
      print(
          f"{label:14s}: {'per core (1 thread)':40s} {per_core[label]:8.1f} examples/s, "
          f"ratio to bare decode {per_core[label] / bare:.2f}"
      )
      if compared:
        previous = compared["previous"]
        print(
            f"{label:14s}: {'previous code, per core (same rounds)':40s} {previous:8.1f} examples/s, "
            f"ratio to bare decode {previous / bare:.2f}\n"
            f"{label:14s}: current / previous {per_core[label] / previous:.2f}x by wall clock, "
            f"{compared['cpu_ratio']:.2f}x by thread CPU time; "
            f"{compared['differing']} of {compared['total']} output image values differ"
        )
      for workers in FLAGS.workers:
        rate = pipeline_rate(bench_config(shard_dir, augment, workers, placement))
        what = f"{workers} grain workers" if workers else "0 workers (main process threads)"
        print(f"{label:14s}: {'pipeline, ' + what:40s} {rate:8.1f} examples/s")
    target = FLAGS.target_pairs_per_sec
    for label, _, placement in MODES:
      cores = math.ceil(target / per_core[label])
      where = " (host: decode + resize + draws; the step augments)" if placement == "device" else ""
      print(
          f"to feed {target:.0f} pairs/s per accelerator with {label}{where}: about {cores} worker cores at "
          f"{per_core[label]:.0f} examples/s per core (plus headroom for the trainer's own host thread "
          "and imperfect scaling)."
      )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
