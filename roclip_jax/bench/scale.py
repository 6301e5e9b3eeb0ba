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

With `--training` (the default), also, each in a fresh process, with the `tiny` model at 16 px
(so that the model does not dominate), poisoning as above, a global batch of `--batch_size`, no
evaluators and no data workers:

* time to the first train step of `train.train_and_evaluate` (`max_steps=1`) for each defense:
  'none' (its run, finished, is the checkpoint the next two start from), 'roclip', 'safeclip'
  (published warm-ups: no split before step 1), 'safeclip (split first)' (warm-ups 0: SafeCLIP's
  full split pass over every image runs before step 1; N <= `--full_pass_max`; its
  `safeclip/split_seconds_per_100k` is printed) and 'cleanclip' (`init_from` the 'none' run); from
  the launch of the process (interpreter, imports, compilation included) to the first completed
  step, and the process's peak RSS at that moment;
* the suspicion report (`suspicion.build_report`) on the 'none' run: its embedding
  pass over every image and its nearest-neighbour searches (N <= `--full_pass_max`), total time
  and peak RSS.

Growth with N should be linear in the captions (tens of bytes per example) and independent of the
image bytes; the full pass, SafeCLIP's split and the suspicion report grow with the image bytes.
"""

from __future__ import annotations

import concurrent.futures
import io
import json
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
  flags.DEFINE_integer(
      "full_pass_max",
      100000,
      "Largest N for which the tasks that read every image run: the old full pass, SafeCLIP with its split "
      "before step 1, and the suspicion report.",
  )
  flags.DEFINE_bool("training", True, "Also time each defense to its first train step, and the suspicion report.")
  flags.DEFINE_integer("batch_size", 256, "Global batch of the training runs and of the suspicion report's pass.")


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


# ----------------------------------------------------------------------------
# Time to the first train step, and the suspicion report.

SPLIT_FIRST = "safeclip (split first)"


def training_runs() -> list[tuple[str, str, dict[str, Any]]]:
  """(row name, defense, config overrides): every registered defense, in the registry's order, which
  starts with 'none', the run a defense that fine-tunes (`Defense.fine_tunes`) starts from; SafeCLIP
  also without its warm-ups (`SPLIT_FIRST`), right after it."""
  from roclip_jax import defenses  # pylint: disable=g-import-not-at-top
  from roclip_jax.defenses import safeclip  # pylint: disable=g-import-not-at-top

  runs = []
  for name in defenses.names():
    runs.append((name, name, {}))
    if name == safeclip.SafeClip.name:
      runs.append((SPLIT_FIRST, name, {"safeclip.inmodal_warmup": 0, "safeclip.multimodal_warmup": 0}))
  return runs


def write_held_out(directory: str, image_side: int) -> tuple[str, str]:
  """The labelled held-out split poisoning draws its targets from: 40 JPEGs (4 per class), a CSV and
  the classes JSON. Returns (csv path, classes path)."""
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(1)
  rows = ["image_path,caption,label"]
  for i in range(40):
    path = os.path.join(directory, f"{i}.jpg")
    Image.fromarray(rng.integers(0, 256, (image_side, image_side, 3), dtype=np.uint8)).save(path, quality=95)
    rows.append(f"{path},a photo of a {OBJECTS[i % len(OBJECTS)]},{i % len(OBJECTS)}")
  csv_path, classes_path = os.path.join(directory, "test.csv"), os.path.join(directory, "classes.json")
  with open(csv_path, "w") as f:
    f.write("\n".join(rows) + "\n")
  with open(classes_path, "w") as f:
    json.dump({"classes": list(OBJECTS), "templates": ["a photo of a {}."]}, f)
  return csv_path, classes_path


def training_config(
    defense: str, shard_dir: str, held_out: tuple[str, str], rate: float, batch_size: int, overrides: dict[str, Any]
):
  """A one-step run of `defense` on the synthetic shards with the tiny model (16 px, 16 tokens)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from roclip_jax import config_lib  # pylint: disable=g-import-not-at-top
  from roclip_jax import models  # pylint: disable=g-import-not-at-top

  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 16
  c.data.source = "array_record"
  c.data.array_record_pattern = shard_dir
  c.data.eval_csv, c.data.classes_json = held_out
  c.data.batch_size = batch_size
  c.data.num_workers = 0  # Workers are other processes: this process's RSS would miss their memory.
  c.poison = _poison_cfg(rate)
  c.defense = defense
  c.num_epochs = 10  # Room for SafeCLIP's published warm-ups (5 + 1 epochs) before its split.
  c.max_steps = 1
  c.log_every_steps = 1
  c.progress_bar = False
  c.checkpoint.async_save = False
  c.evals = ml_collections.ConfigDict()
  return config_lib.override(c, overrides)


def _peak_mib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux.


def _training_task(
    name: str,
    defense: str,
    shard_dir: str,
    held_out: tuple[str, str],
    rate: float,
    batch_size: int,
    overrides: dict[str, Any],
    workdir: str,
    launched: float,
) -> dict[str, Any]:
  """One run to its first step in this (fresh) process; `launched` is the parent's time.time() at the launch."""
  from roclip_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from roclip_jax import train  # pylint: disable=g-import-not-at-top

  del name
  first: dict[str, float] = {}
  write = metrics_lib.MetricWriter.write

  def write_and_time(self, step, scalars, kind="train"):
    # The loop writes step 1's row after reading its metrics back, i.e. once the step has completed.
    if kind == "train" and not first:
      first.update(at=time.time(), peak_mib=_peak_mib())
    return write(self, step, scalars, kind)

  metrics_lib.MetricWriter.write = write_and_time
  start = time.time()
  config = training_config(defense, shard_dir, held_out, rate, batch_size, overrides)
  train.train_and_evaluate(config, workdir)
  result = {"seconds": first["at"] - launched, "in_trainer": first["at"] - start, "peak_mib": first["peak_mib"]}
  for row in metrics_lib.read_metrics(workdir):
    if "safeclip/split_seconds_per_100k" in row:
      result["split_seconds_per_100k"] = row["safeclip/split_seconds_per_100k"]
  return result


def _suspicion_task(workdir: str, batch_size: int, launched: float) -> dict[str, Any]:
  from roclip_jax import suspicion  # pylint: disable=g-import-not-at-top

  start = time.time()
  report = suspicion.build_report(workdir, os.path.join(workdir, "suspicion.csv"), batch_size=batch_size)
  end = time.time()
  return {
      "seconds": end - launched,
      "in_report": end - start,
      "peak_mib": _peak_mib(),
      "scored": report.num_examples,
      "metrics": {k: round(v["auroc"], 3) for k, v in report.metrics.items()},
  }


def _launch(fn, *args) -> dict[str, Any]:
  """`fn(*args, launched)` in a fresh process; `launched` is the time just before its start."""
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
    return pool.submit(fn, *args, time.time()).result()  # The pool starts its process on this submit.


def training_rows(num: int, directory: str, work_root: str, held_out: tuple[str, str]) -> list[tuple]:
  """(task, seconds to step 1, peak MiB, detail) for each defense and the suspicion report at this N."""
  from roclip_jax import defenses  # pylint: disable=g-import-not-at-top

  rows = []
  none_dir = os.path.join(work_root, f"n{num}_none")
  for name, defense, overrides in training_runs():
    if name == SPLIT_FIRST and num > FLAGS.full_pass_max:
      continue
    workdir = os.path.join(work_root, f"n{num}_{name.replace(' ', '_').replace('(', '').replace(')', '')}")
    shutil.rmtree(workdir, ignore_errors=True)  # A fresh run, not a resumed one.
    if defenses.get(defense).fine_tunes:
      overrides = dict(overrides, init_from=none_dir)
    result = _launch(
        _training_task, name, defense, directory, held_out, FLAGS.poison_rate, FLAGS.batch_size, overrides, workdir
    )
    detail = f"{result['in_trainer']:.1f} s in train_and_evaluate"
    if "split_seconds_per_100k" in result:
      detail += f"; split pass {result['split_seconds_per_100k']:.1f} s per 100k examples"
    rows.append((num, name, result["seconds"], result["peak_mib"], detail))
    print(f"  {name:24s} {result['seconds']:8.1f}s to step 1  peak {result['peak_mib']:7.0f} MiB  {detail}", flush=True)
  if num <= FLAGS.full_pass_max:
    result = _launch(_suspicion_task, none_dir, FLAGS.batch_size)
    detail = f"{result['in_report']:.1f} s in build_report; {result['scored']:,} scored; AUROC {result['metrics']}"
    rows.append((num, "suspicion report", result["seconds"], result["peak_mib"], detail))
    print(
        f"  {'suspicion report':24s} {result['seconds']:8.1f}s in all    peak {result['peak_mib']:7.0f} MiB  {detail}"
    )
  return rows


def _disk_mib(directory: str, suffix: str) -> float:
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory) if f.endswith(suffix)) / 2**20


def main(argv) -> None:
  del argv
  from roclip_jax.data import array_record  # pylint: disable=g-import-not-at-top

  sizes = [int(s) for s in FLAGS.sizes]
  root = FLAGS.shard_dir or tempfile.mkdtemp(prefix="roclip_scale_")
  baseline = _in_fresh_process("imports", root, FLAGS.poison_rate)["peak_mib"]
  print(f"Peak RSS of a process that only imports the modules: {baseline:.0f} MiB (subtracted below).")
  rows, train_rows = [], []
  held_out = write_held_out(os.path.join(root, "held_out"), FLAGS.image_side) if FLAGS.training else None
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
      if FLAGS.training:
        train_rows += training_rows(num, directory, os.path.join(root, "runs"), held_out)
  finally:
    if not FLAGS.shard_dir:
      shutil.rmtree(root, ignore_errors=True)
  print("\n| N | task | seconds | peak RSS (MiB) | above imports (MiB) | shards on disk (MiB) | indexes (MiB) |")
  print("|---:|---|---:|---:|---:|---:|---:|")
  for num, kind, seconds, peak, above, shards_mib, index_mib in rows:
    print(f"| {num:,} | {kind} | {seconds:.2f} | {peak:.0f} | {above:.0f} | {shards_mib:.0f} | {index_mib:.1f} |")
  if train_rows:
    print("\n| N | run | seconds to step 1 (report: in all) | peak RSS (MiB) | |")
    print("|---:|---|---:|---:|---|")
    for num, name, seconds, peak, detail in train_rows:
      print(f"| {num:,} | {name} | {seconds:.1f} | {peak:.0f} | {detail} |")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
