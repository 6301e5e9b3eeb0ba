r"""Converts image-caption data to ArrayRecord shards of pre-resized JPEGs, for training at scale.

  python -m roclip_jax.data.convert --input=train.csv --output_dir=/data/cc3m_ar
  python -m roclip_jax.data.convert --input='/data/cc3m_wds/*.tar' --output_dir=/data/cc3m_ar \
      --workers=16
  # then train with --config.data.source=array_record \
  #   --config.data.array_record_pattern='/data/cc3m_ar/*.array_record'

Inputs (`--format`, inferred from `--input` when left out):
* csv: a CSV/TSV file with `image_path,caption` columns (plus optional `label`, `poisoned`), read
  exactly as `sources.CsvSource` reads it (same column flags, same dropped blank rows, relative paths
  against `--image_root` or the CSV's directory). An example's id is its CsvSource id.
* wds: img2dataset webdataset shards: uncompressed `.tar` files (a glob, a directory, or a comma
  list) holding `<key>.jpg` (or .jpeg/.png/.webp) with `<key>.txt`, or `<key>.json` with a
  `caption` field. Ids number the keys in order: sorted tar paths, then member order in each tar.

Output in `--output_dir`: `shard-00000-of-00042.array_record` (`group_size:1`; record format in
`array_record.py`: JSON header + JPEG with the shorter side resized down to `--image_size`,
quality 95), its caption index `shard-00000-of-00042.index.npz` (ids, captions, labels, poisoned
flags: what poisoning and the defenses read instead of the images), one `.json` of stats per shard,
`plan.json` (the arguments that define the shards) and `summary.json` (written / skipped / failed
items, with the failed ids and reasons).

Failed items (a missing file, a corrupt image, no caption) are left out and listed in the summary;
the rest of the shard is kept. A shard is written under a temporary name and renamed when complete,
so a killed run leaves only whole shards: rerunning the same command skips them. Shards are
converted in parallel by `--workers` processes.

Shards converted before the caption index existed get it from

  python -m roclip_jax.data.convert --index_only --output_dir=/data/cc3m_ar

(reads each shard once; a resumed conversion also writes the missing indexes of finished shards).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import posixpath
import tarfile
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from PIL import Image

from roclip_jax.data import array_record
from roclip_jax.data import image_ops
from roclip_jax.data import sources

FORMATS = ("csv", "wds")
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
PLAN_FILE = "plan.json"
SUMMARY_FILE = "summary.json"
MAX_LISTED_FAILURES = 1000  # In summary.json; every failure stays in its shard's stats file.
# Failure reasons, as counted in the summary.
MISSING, CORRUPT, NO_CAPTION = "missing", "corrupt", "no_caption"
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError, Image.DecompressionBombError)


# ------------------------------------------------------------------ images


def resize_to_jpeg(data: bytes, image_size: int, quality: int = 95) -> bytes | None:
  """Encoded image -> JPEG bytes with the shorter side scaled down to `image_size`.

  Smaller images keep their size (upscaling adds bytes, not information; the training pipeline
  resizes anyway). Returns None for anything PIL cannot decode, as `image_ops.decode_image` does.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if width * height > image_ops.MAX_IMAGE_PIXELS or width == 0 or height == 0:
        return None
      short = min(width, height)
      target = None
      if short > image_size:
        # Same geometry as image_ops.resize_center_crop: the short side becomes exactly image_size.
        target = (
            (image_size, int(image_size * height / width))
            if width <= height
            else (int(image_size * width / height), image_size)
        )
        img.draft("RGB", target)  # JPEG: decode at 1/2..1/8 scale while still >= target.
      if img.mode in ("P", "PA"):
        img = img.convert("RGBA")  # Palette transparency must go through RGBA.
      rgb = img.convert("RGB")  # Forces the full decode: truncated files raise here.
      if target is not None and rgb.size != target:
        rgb = rgb.resize(target, Image.Resampling.BICUBIC)
      out = io.BytesIO()
      rgb.save(out, format="JPEG", quality=quality)
      return out.getvalue()
  except _DECODE_ERRORS:
    return None


# -------------------------------------------------------------- webdataset


def _split_member_name(name: str) -> tuple[str, str]:
  """webdataset convention: `dir/key.ext.more` -> ('dir/key', 'ext.more')."""
  directory, base = posixpath.split(name)
  key, _, ext = base.partition(".")
  return posixpath.join(directory, key), ext.lower()


def index_tar(path: str) -> list[tuple[str, dict[str, tuple[int, int]]]]:
  """[(key, {ext: (data offset, size)})] of a tar's regular files, in member order."""
  try:
    with tarfile.open(path, "r:") as tar:  # Uncompressed only: members are read by offset.
      groups: dict[str, dict[str, tuple[int, int]]] = {}
      for member in tar:
        if member.isfile():
          key, ext = _split_member_name(member.name)
          groups.setdefault(key, {})[ext] = (member.offset_data, member.size)
  except tarfile.TarError as e:
    raise ValueError(
        f"{path} cannot be read as an uncompressed tar ({e}); webdataset input must "
        "be plain .tar shards (img2dataset's default) - decompress .tar.gz first."
    ) from e
  return list(groups.items())


def count_tar_keys(path: str) -> int:
  return len(index_tar(path))


def _read_at(f: Any, location: tuple[int, int]) -> bytes:
  f.seek(location[0])
  return f.read(location[1])


def _wds_caption(f: Any, members: dict[str, tuple[int, int]]) -> str:
  if "txt" in members:
    return _read_at(f, members["txt"]).decode("utf-8", errors="replace").strip()
  if "json" in members:
    try:
      meta = json.loads(_read_at(f, members["json"]))
    except ValueError:
      return ""
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption.strip() if isinstance(caption, str) else ""
  return ""


# ------------------------------------------------------------------ shards


@dataclasses.dataclass(frozen=True)
class ShardTask:
  """One output shard: CSV rows [key_start, key_stop), or that key range of one tar."""

  index: int
  path: str  # Final shard file.
  image_size: int
  quality: int
  key_start: int
  key_stop: int
  tar_path: str = ""
  first_id: int = 0  # wds: id of key `key_start`.
  # csv: (id, image path, caption, label, poisoned) per row, filled in just before dispatch.
  rows: tuple[tuple[int, str, str, int, int], ...] = ()

  @property
  def num_items(self) -> int:
    return self.key_stop - self.key_start

  @property
  def stats_path(self) -> str:
    return self.path[: -len(array_record.SHARD_SUFFIX)] + ".json"


def _items(task: ShardTask) -> Iterator[tuple[int, str, bytes | None, str, int, int, str | None]]:
  """(id, origin, encoded image or None, caption, label, poisoned, failure reason or None)."""
  if not task.tar_path:
    for source_id, path, caption, label, poisoned in task.rows:
      try:
        with open(path, "rb") as f:
          data = f.read()
      except OSError:
        yield source_id, path, None, caption, label, poisoned, MISSING
        continue
      yield source_id, path, data, caption, label, poisoned, None
    return
  keys = index_tar(task.tar_path)[task.key_start : task.key_stop]
  tar_name = os.path.basename(task.tar_path)
  with open(task.tar_path, "rb") as f:
    for offset, (key, members) in enumerate(keys):
      source_id, origin = task.first_id + offset, f"{tar_name}/{key}"
      image_ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
      if image_ext is None:
        yield source_id, origin, None, "", -1, 0, MISSING
        continue
      caption = _wds_caption(f, members)
      if not caption:
        yield source_id, origin, None, "", -1, 0, NO_CAPTION
        continue
      yield source_id, origin, _read_at(f, members[image_ext]), caption, -1, 0, None


def _atomic_write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


class ShardWriter:
  """Writes one shard and its caption index under temporary names; `finish` renames them.

  Order on `finish`: index, stats, shard, so a shard file that exists always has both.
  """

  def __init__(self, path: str):
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=g-import-not-at-top

    self.path = path
    self._tmp = f"{path}.tmp-{os.getpid()}"
    self._writer = ArrayRecordWriter(self._tmp, "group_size:1")
    self._headers: list[dict[str, Any]] = []  # Captions etc. only: a few bytes per record.

  def write(
      self, *, source_id: int, caption: str, image_bytes: bytes, origin: str = "", label: int = -1, poisoned: int = 0
  ) -> None:
    self._writer.write(
        array_record.encode_record(
            source_id=source_id, caption=caption, image_bytes=image_bytes, origin=origin, label=label, poisoned=poisoned
        )
    )
    self._headers.append({"id": source_id, "caption": caption, "label": label, "poisoned": poisoned})

  @property
  def num_written(self) -> int:
    return len(self._headers)

  def close(self) -> None:
    self._writer.close()

  def finish(self, stats_path: str | None = None, stats: dict[str, Any] | None = None) -> None:
    self._writer.close()
    array_record.ShardIndex.from_headers(self._headers).save(array_record.index_path(self.path))
    if stats_path is not None:
      _atomic_write_text(stats_path, json.dumps(stats))
    os.replace(self._tmp, self.path)


def convert_shard(task: ShardTask) -> dict[str, Any]:
  """Writes one shard, its caption index and its stats file (tmp names + rename); returns the stats."""
  start = time.perf_counter()
  writer = ShardWriter(task.path)
  failures = []
  try:
    for source_id, origin, data, caption, label, poisoned, reason in _items(task):
      jpeg = resize_to_jpeg(data, task.image_size, task.quality) if reason is None else None
      if reason is None and jpeg is None:
        reason = CORRUPT
      if reason is not None:
        failures.append({"id": source_id, "origin": origin, "reason": reason})
        continue
      writer.write(
          source_id=source_id, caption=caption, image_bytes=jpeg, origin=origin, label=label, poisoned=poisoned
      )
  finally:
    writer.close()
  stats = {
      "shard": os.path.basename(task.path),
      "written": writer.num_written,
      "failures": failures,
      "seconds": round(time.perf_counter() - start, 3),
  }
  writer.finish(task.stats_path, stats)
  return stats


def _finished_stats(task: ShardTask) -> dict[str, Any] | None:
  if not (os.path.isfile(task.path) and os.path.isfile(task.stats_path)):
    return None
  with open(task.stats_path, encoding="utf-8") as f:
    return json.load(f)


# -------------------------------------------------------------------- plan


@dataclasses.dataclass
class _Plan:
  """What defines the shards; a rerun must match it to resume."""

  format: str
  inputs: list[str]
  image_size: int
  quality: int
  shard_size: int
  num_items: int
  num_shards: int
  bad_rows: int = 0  # CSV rows CsvSource dropped (blank path or caption).


def _shard_path(output_dir: str, index: int, num_shards: int) -> str:
  return os.path.join(output_dir, f"shard-{index:05d}-of-{num_shards:05d}{array_record.SHARD_SUFFIX}")


def _csv_tasks(plan: _Plan, output_dir: str) -> Iterator[ShardTask]:
  for index in range(plan.num_shards):
    lo, hi = index * plan.shard_size, min(plan.num_items, (index + 1) * plan.shard_size)
    yield ShardTask(
        index, _shard_path(output_dir, index, plan.num_shards), plan.image_size, plan.quality, key_start=lo, key_stop=hi
    )


def _with_rows(tasks: Sequence[ShardTask], source: sources.CsvSource) -> Iterator[ShardTask]:
  """Attaches the CSV rows lazily, so only shards in flight hold their rows in memory."""
  for task in tasks:
    rows = []
    for i in range(task.key_start, task.key_stop):
      r = source[i]
      rows.append((int(r["id"]), r["image_path"], r["caption"], int(r["label"]), int(r["poisoned"])))
    yield dataclasses.replace(task, rows=tuple(rows))


def _wds_tasks(tars: Sequence[str], counts: Sequence[int], plan: _Plan, output_dir: str) -> Iterator[ShardTask]:
  """Shards never span tars, so a worker reads one tar per shard."""
  index, first_id = 0, 0
  for tar, count in zip(tars, counts):
    for lo in range(0, count, plan.shard_size):
      yield ShardTask(
          index,
          _shard_path(output_dir, index, plan.num_shards),
          plan.image_size,
          plan.quality,
          key_start=lo,
          key_stop=min(count, lo + plan.shard_size),
          tar_path=tar,
          first_id=first_id + lo,
      )
      index += 1
    first_id += count


def infer_format(input_pattern: str) -> str:
  lowered = input_pattern.lower()
  if lowered.endswith((".csv", ".tsv")):
    return "csv"
  if lowered.endswith(".tar") or os.path.isdir(input_pattern):
    return "wds"
  raise ValueError(
      f"Cannot tell the format of --input={input_pattern!r}; pass --format=csv for a "
      "CSV/TSV file or --format=wds for webdataset .tar shards."
  )


def _tar_paths(input_pattern: str) -> list[str]:
  patterns = [p for p in input_pattern.split(",") if p]
  paths = set()
  for pattern in patterns:
    if os.path.isdir(pattern):
      pattern = os.path.join(pattern, "*.tar")
    paths.update(p for p in glob.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
        f"No .tar file matches --input={input_pattern!r}; pass a glob like "
        "'/data/wds/*.tar', a directory of tars, or a comma list."
    )
  return sorted(os.path.abspath(p) for p in paths)


def _check_plan(output_dir: str, plan: _Plan) -> None:
  """Refuses to mix shards of different conversions in one directory."""
  path = os.path.join(output_dir, PLAN_FILE)
  new = dataclasses.asdict(plan)
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      old = json.load(f)
    changed = [f"{k}: {old.get(k)!r} -> {v!r}" for k, v in new.items() if old.get(k) != v]
    if changed:
      raise ValueError(
          f"{output_dir} holds shards of a different conversion ({'; '.join(changed)}). Fix: rerun "
          "with the original arguments to resume, or choose a new --output_dir."
      )
  _atomic_write_text(path, json.dumps(new, indent=2))


# ----------------------------------------------------------------- summary


@dataclasses.dataclass
class ConversionSummary:
  """What a run did; `summary.json` holds the same fields."""

  output_dir: str
  num_shards: int
  shards_written: int  # By this run.
  shards_skipped: int  # Already complete from an earlier run.
  items: int  # Planned (CSV rows kept by CsvSource, or tar keys).
  records: int  # In all shards, old and new.
  records_written: int  # By this run.
  failures_by_reason: dict[str, int]
  bad_rows: int  # CSV rows dropped before planning (blank image path or caption).
  failures: list[dict[str, Any]]  # The first MAX_LISTED_FAILURES, sorted by id.
  seconds: float

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=2)


def convert(
    input_pattern: str,
    output_dir: str,
    *,
    fmt: str = "",
    image_size: int = 256,
    shard_size: int = 1000,
    workers: int = 1,
    quality: int = 95,
    image_root: str = "",
    image_key: str = "image_path",
    caption_key: str = "caption",
    label_key: str = "label",
    delimiter: str = "",
    progress: bool = True,
) -> ConversionSummary:
  """Converts a CSV or webdataset tars to ArrayRecord shards (see the module docstring).

  Args:
    input_pattern: the CSV/TSV file, or the tar glob / directory / comma list.
    output_dir: where shards, stats, plan.json and summary.json go (created if needed).
    fmt: 'csv' or 'wds'; '' infers it from `input_pattern`.
    image_size: shorter image side after resizing (larger images only).
    shard_size: items per shard (wds shards also end at each tar's end).
    workers: processes converting shards in parallel; 1 converts in this process.
    quality: JPEG quality of the re-encoded images.
    image_root, image_key, caption_key, label_key, delimiter: CSV reading, as in `CsvSource`
      (`delimiter` '' means ',' or a tab for .tsv files).
    progress: show a tqdm bar.

  Returns:
    The run's `ConversionSummary` (also written to `output_dir/summary.json`).
  """
  start = time.perf_counter()
  fmt = fmt or infer_format(input_pattern)
  if fmt not in FORMATS:
    raise ValueError(f"--format={fmt!r} is unknown; use one of {FORMATS}.")
  if image_size < 1 or shard_size < 1 or workers < 1 or not 1 <= quality <= 100:
    raise ValueError(
        f"image_size={image_size}, shard_size={shard_size} and workers={workers} must "
        f"be positive and quality={quality} in [1, 100]."
    )
  output_dir = os.path.abspath(output_dir)
  os.makedirs(output_dir, exist_ok=True)
  for stale in glob.glob(os.path.join(output_dir, "shard-*.tmp-*")):
    os.remove(stale)  # Partial shards of a killed run.

  context = multiprocessing.get_context("spawn")  # No fork of a (possibly threaded) parent.
  pool = context.Pool(workers) if workers > 1 else None
  try:
    if fmt == "csv":
      if not os.path.isfile(input_pattern):
        raise FileNotFoundError(f"--input={input_pattern!r} is not a file; pass the CSV/TSV path.")
      delimiter = delimiter or ("\t" if input_pattern.lower().endswith(".tsv") else ",")
      source = sources.CsvSource(
          input_pattern,
          image_root=image_root,
          image_key=image_key,
          caption_key=caption_key,
          label_key=label_key,
          delimiter=delimiter,
      )
      num_items = len(source)
      plan = _Plan(
          fmt,
          [source.path],
          image_size,
          quality,
          shard_size,
          num_items,
          -(-num_items // shard_size),
          bad_rows=source.num_bad_rows,
      )
      tasks = list(_csv_tasks(plan, output_dir))
    else:
      tars = _tar_paths(input_pattern)
      counts = pool.map(count_tar_keys, tars) if pool else [count_tar_keys(t) for t in tars]
      num_shards = sum(-(-c // shard_size) for c in counts)
      plan = _Plan(fmt, tars, image_size, quality, shard_size, sum(counts), num_shards)
      tasks = list(_wds_tasks(tars, counts, plan, output_dir))
    _check_plan(output_dir, plan)

    all_stats, todo = [], []
    for task in tasks:
      done = _finished_stats(task)
      if done is None:
        todo.append(task)
      else:
        all_stats.append(done)
    # Finished shards of a conversion from before the caption index existed: index them now.
    todo_paths = {t.path for t in todo}
    written = array_record.write_indexes([t.path for t in tasks if t.path not in todo_paths], progress=progress)
    if written:
      logging.info("Wrote the missing caption indexes of %d finished shards.", written)
    shards_skipped = len(all_stats)
    todo_items = sum(t.num_items for t in todo)
    if fmt == "csv":
      todo = _with_rows(todo, source)
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    with tqdm(total=todo_items, unit="img", disable=not progress, desc="convert") as bar:
      results = pool.imap_unordered(convert_shard, todo) if pool else map(convert_shard, todo)
      new_stats = []
      for stats in results:
        new_stats.append(stats)
        bar.update(stats["written"] + len(stats["failures"]))
  finally:
    if pool is not None:
      pool.close()
      pool.join()

  failures = sorted((f for s in all_stats + new_stats for f in s["failures"]), key=lambda f: f["id"])
  by_reason: dict[str, int] = {}
  for failure in failures:
    by_reason[failure["reason"]] = by_reason.get(failure["reason"], 0) + 1
  summary = ConversionSummary(
      output_dir=output_dir,
      num_shards=plan.num_shards,
      shards_written=len(new_stats),
      shards_skipped=shards_skipped,
      items=plan.num_items,
      records=sum(s["written"] for s in all_stats + new_stats),
      records_written=sum(s["written"] for s in new_stats),
      failures_by_reason=by_reason,
      bad_rows=plan.bad_rows,
      failures=failures[:MAX_LISTED_FAILURES],
      seconds=round(time.perf_counter() - start, 2),
  )
  _atomic_write_text(os.path.join(output_dir, SUMMARY_FILE), summary.to_json())
  return summary


def index_shards(shards: str, *, overwrite: bool = False, progress: bool = True) -> tuple[int, int]:
  """Writes the caption index of every shard of `shards` (a directory or glob) that lacks one.

  For shard sets converted before the index existed: reads each such shard once. `overwrite`
  rewrites every index. Returns (indexes written, shards).
  """
  paths = array_record.shard_paths(shards)
  return array_record.write_indexes(paths, overwrite=overwrite, progress=progress), len(paths)


# --------------------------------------------------------------------- CLI


def _define_flags() -> None:
  """CLI flags, defined only when run as a program (importing this module defines none)."""
  flags.DEFINE_string("input", None, "CSV/TSV file, or webdataset .tar glob/dir/comma list.")
  flags.DEFINE_string("output_dir", None, "Directory for the ArrayRecord shards.")
  flags.DEFINE_enum("format", "", ["", *FORMATS], "Input format ('' infers it).")
  flags.DEFINE_integer("image_size", 256, "Shorter side of the stored images.")
  flags.DEFINE_integer("shard_size", 1000, "Examples per shard.")
  flags.DEFINE_integer("workers", os.cpu_count() or 1, "Parallel processes.")
  flags.DEFINE_integer("quality", 95, "JPEG quality.")
  flags.DEFINE_string("image_root", "", "CSV: base of relative image paths.")
  flags.DEFINE_string("image_key", "image_path", "CSV: image path column.")
  flags.DEFINE_string("caption_key", "caption", "CSV: caption column.")
  flags.DEFINE_string("delimiter", "", "CSV: delimiter ('' = ',' or tab for .tsv).")
  flags.DEFINE_bool("progress", True, "Show a progress bar.")
  flags.DEFINE_bool(
      "index_only",
      False,
      "Convert nothing: write the caption index (*.index.npz) of "
      "every shard in --output_dir that lacks one, reading each such shard once.",
  )
  flags.DEFINE_bool("overwrite_index", False, "With --index_only: rewrite every index.")


def main(argv: Sequence[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  if f.index_only:
    if not f.output_dir:
      raise app.UsageError("--index_only needs --output_dir (the shards' directory or a glob).")
    start = time.perf_counter()
    written, total = index_shards(f.output_dir, overwrite=f.overwrite_index, progress=f.progress)
    print(
        f"Wrote {written} caption index(es) for {total} shards in {f.output_dir} "
        f"({total - written} already had one); {time.perf_counter() - start:.1f}s."
    )
    return
  if not f.input or not f.output_dir:
    raise app.UsageError("--input and --output_dir are required.")
  summary = convert(
      f.input,
      f.output_dir,
      fmt=f.format,
      image_size=f.image_size,
      shard_size=f.shard_size,
      workers=f.workers,
      quality=f.quality,
      image_root=f.image_root,
      image_key=f.image_key,
      caption_key=f.caption_key,
      delimiter=f.delimiter,
      progress=f.progress,
  )
  failed = ", ".join(f"{n} {r}" for r, n in sorted(summary.failures_by_reason.items())) or "none"
  print(
      f"{summary.records} records in {summary.num_shards} shards ({summary.shards_written} "
      f"written, {summary.shards_skipped} already done) from {summary.items} items; failed: "
      f"{failed}; {summary.bad_rows} blank CSV rows; {summary.seconds:.1f}s. Details: "
      f"{os.path.join(summary.output_dir, SUMMARY_FILE)}"
  )


if __name__ == "__main__":
  _define_flags()
  app.run(main)
