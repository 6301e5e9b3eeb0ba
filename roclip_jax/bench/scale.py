r"""Start-up cost at scale: metadata, poisoning and CleanCLIP's clean subset against the dataset size.

  python -m roclip_jax.bench.scale                          # N = 10k and 100k
  python -m roclip_jax.bench.scale --sizes=10000,100000,1000000 --shard_dir=/tmp/scale

Synthesises N small-JPEG records (distinct images drawn once, captions "a photo of a <colour>
<object> ..." in which class names recur as in web captions) into ArrayRecord shards through the
converter's own writer (`convert.ShardWriter`: shards plus their caption indexes), then runs each
start-up task in a fresh process and prints its wall time and peak host memory (ru_maxrss of that
process, and above a process that only imported the same modules):

* metadata: `ArrayRecordSource.metadata()` from the caption indexes (no image read);
* poisoning: metadata + `poison_source` (a backdoor at `--poison_rate`, and a targeted attack of 4
  targets x 10 captions) - deciding everything, reading no record;
* clean subset: poisoning + CleanCLIP's `clean_subset` (N / 10 clean examples) + SafeCLIP's
  per-example poisoned flags, from the poisoned source's metadata;
* full pass (the path before the index): reading every record once, as start-up did before, for
  N <= `--full_pass_max` (it reads every image).

Growth with N should be linear in the captions (tens of bytes per example) and independent of the
image bytes; the full pass grows with the image bytes.
"""

from __future__ import annotations

import concurrent.futures
import io
import multiprocessing
import os
import resource
import shutil
import tempfile
import time
from typing import Any

from absl import app
from absl import flags
import numpy as np
from PIL import Image

FLAGS = flags.FLAGS

COLOURS = ("red", "green", "blue", "yellow", "black", "white", "orange", "purple")
OBJECTS = ("cat", "dog", "bird", "car", "boat", "house", "tree", "flower", "mushroom", "chair")
SCENES = ("on a sunny day", "in the park", "at night", "near the sea", "in a small town", "indoors")


def _define_flags() -> None:
  flags.DEFINE_list("sizes", ["10000", "100000"], "Dataset sizes N to measure.")
  flags.DEFINE_string("shard_dir", "", "Where to write the shards ('' = a temp dir, removed after).")
  flags.DEFINE_integer("shard_size", 10000, "Records per shard.")
  flags.DEFINE_integer("image_side", 32, "Side of the synthetic JPEGs.")
  flags.DEFINE_integer("distinct_images", 256, "Distinct JPEGs drawn (records reuse them in turn).")
  flags.DEFINE_float("poison_rate", 0.001, "Backdoor poison rate.")
  flags.DEFINE_integer("full_pass_max", 100000, "Largest N for which the old full pass is timed.")


def caption(i: int) -> str:
  rng = np.random.default_rng(i)
  return (
      f"a photo of a {COLOURS[rng.integers(len(COLOURS))]} {OBJECTS[rng.integers(len(OBJECTS))]} "
      f"{SCENES[rng.integers(len(SCENES))]}, picture number {i}"
  )


def synthesise(directory: str, num: int, shard_size: int, image_side: int, distinct: int) -> float:
  """Writes `num` records into shards (and caption indexes) under `directory`; returns the seconds."""
  from roclip_jax.data import convert  # pylint: disable=g-import-not-at-top

  start = time.perf_counter()
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  jpegs = []
  for _ in range(distinct):
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)).save(
        out, format="JPEG", quality=95
    )
    jpegs.append(out.getvalue())
  num_shards = -(-num // shard_size)
  for shard in range(num_shards):
    writer = convert.ShardWriter(os.path.join(directory, f"shard-{shard:05d}-of-{num_shards:05d}.array_record"))
    for i in range(shard * shard_size, min(num, (shard + 1) * shard_size)):
      writer.write(
          source_id=i, caption=caption(i), image_bytes=jpegs[i % distinct], label=i % len(OBJECTS) if i % 3 else -1
      )
    writer.finish()
  return time.perf_counter() - start


def _poison_cfg(rate: float):
  from roclip_jax.data import poison  # pylint: disable=g-import-not-at-top

  cfg = poison.default_config()
  cfg.enabled = True
  cfg.backdoor.enabled = True
  cfg.backdoor.target_class = "mushroom"
  cfg.backdoor.rate = rate
  cfg.backdoor.num_poisons = 0
  cfg.targeted.enabled = True
  cfg.targeted.num_targets = 4
  cfg.targeted.poisons_per_target = 10
  return cfg


def _task(kind: str, directory: str, rate: float) -> dict[str, Any]:
  """One start-up task in this (fresh) process: its seconds and this process's peak RSS."""
  from roclip_jax.data import array_record  # pylint: disable=g-import-not-at-top
  from roclip_jax.data import metadata as metadata_lib  # pylint: disable=g-import-not-at-top
  from roclip_jax.data import poison  # pylint: disable=g-import-not-at-top
  import grain  # pylint: disable=g-import-not-at-top,unused-import  # In the baseline too: the source imports it.

  start = time.perf_counter()
  result: dict[str, Any] = {}
  if kind != "imports":
    source = array_record.ArrayRecordSource.from_pattern(directory)
    if kind == "metadata":
      result["records"] = len(source.metadata())
    elif kind == "full_pass":
      result["records"] = len(metadata_lib.read_metadata(source, progress=False))
    else:
      pool = poison.TargetPool(
          image_paths=[f"/held_out/{i}.jpg" for i in range(40)],
          labels=np.arange(40) % len(OBJECTS),
          class_names=OBJECTS,
      )
      poisoned, info = poison.poison_source(source, pool, _poison_cfg(rate), seed=0)
      result["poisons"] = len(info.poisoned_ids)
      if kind == "clean_subset":
        metadata = metadata_lib.metadata_of(poisoned)
        subset = metadata_lib.clean_subset(poisoned, len(source) // 10, 0, metadata=metadata)
        flags_ = metadata_lib.poisoned_flags(metadata)
        result["clean"], result["flagged"] = len(subset), int(flags_.sum())
  result["seconds"] = time.perf_counter() - start
  result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.
  return result


def _in_fresh_process(kind: str, directory: str, rate: float) -> dict[str, Any]:
  context = multiprocessing.get_context("spawn")  # A fresh process: its peak RSS is this task's alone.
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(_task, kind, directory, rate).result()


def _disk_mib(directory: str, suffix: str) -> float:
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(suffix)) / 2**20


def main(argv) -> None:
  del argv
  from roclip_jax.data import array_record  # pylint: disable=g-import-not-at-top

  sizes = [int(s) for s in FLAGS.sizes]
  root = FLAGS.shard_dir or tempfile.mkdtemp(prefix="roclip_scale_")
  baseline = _in_fresh_process("imports", root, FLAGS.poison_rate)["peak_mib"]
  print(f"Peak RSS of a process that only imports the modules: {baseline:.0f} MiB (subtracted below).")
  rows = []
  try:
    for num in sizes:
      directory = os.path.join(root, f"n{num}")
      shard_files = os.path.isdir(directory) and os.listdir(directory)
      if shard_files:
        print(f"N={num:,}: reusing the shards in {directory}")
      else:
        seconds = synthesise(directory, num, FLAGS.shard_size, FLAGS.image_side, FLAGS.distinct_images)
        print(f"N={num:,}: synthesised in {seconds:.1f}s ({num / seconds:,.0f} records/s) into {directory}")
      shards_mib = _disk_mib(directory, array_record.SHARD_SUFFIX)
      index_mib = _disk_mib(directory, array_record.INDEX_SUFFIX)
      kinds = ["metadata", "poisoning", "clean_subset"] + (["full_pass"] if num <= FLAGS.full_pass_max else [])
      for kind in kinds:
        result = _in_fresh_process(kind, directory, FLAGS.poison_rate)
        rows.append(
            (num, kind, result["seconds"], result["peak_mib"], result["peak_mib"] - baseline, shards_mib, index_mib)
        )
        print(f"  {kind:13s} {result['seconds']:8.2f}s  peak {result['peak_mib']:7.0f} MiB  {result}", flush=True)
  finally:
    if not FLAGS.shard_dir:
      shutil.rmtree(root, ignore_errors=True)
  print("\n| N | task | seconds | peak RSS (MiB) | above imports (MiB) | shards on disk (MiB) | indexes (MiB) |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for num, kind, seconds, peak, above, shards_mib, index_mib in rows:
    print(f"| {num:,} | {kind} | {seconds:.2f} | {peak:.0f} | {above:.0f} | {shards_mib:.0f} | {index_mib:.1f} |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
