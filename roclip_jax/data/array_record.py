"""ArrayRecord shards of image-caption pairs: the record format and a grain random-access source.

Shards are written by `python -m roclip_jax.data.convert` (see there) with `group_size:1`, so any
record is one seek away. Each record is one example, serialised without pickle:

  b"RCR1" | header length (uint32, little endian) | header (UTF-8 JSON) | image (JPEG bytes)

  header = {"id": int,        # the example's index in the converter's input (CSV row / wds order)
            "caption": str,
            "origin": str,    # where the image came from: its CSV path or "<tar name>/<key>"
            "label": int,     # -1 when the input has no label
            "poisoned": int}  # 0 unless the input CSV has a `poisoned` column

Beside each shard, `shard-*.index.npz` (written by the converter with the shard; `write_indexes` for
shards from before the index existed) holds every record's header fields but no image: `source_id`
(int64), `label` (int64), `poisoned` (int8), and the captions as one UTF-8 blob `caption_blob`
(uint8) with `caption_offsets` (int64, N + 1). `ArrayRecordSource.metadata()` reads only these, so
poisoning and the defenses' bookkeeping never read an image (`data/metadata.py`, docs/data.md).

`ArrayRecordSource` returns the same record dict as `sources.CsvSource` — `id` (the index in this
source, so `source[i]['id'] == i`), `caption`, `label`, `poisoned` — but with the encoded image
under `image_bytes` instead of an `image_path`; the pipeline decodes either. The converter's id is
kept as `source_id` and the origin as `origin`, to trace an example back to the raw data. A record
the reader cannot read raises OSError (EIO): a storage fault, which the pipeline retries and then
stops the run on (`image_ops.StorageError`), never a skipped example.
"""

from __future__ import annotations

from collections.abc import Sequence
import copy
import dataclasses
import errno
import glob
import json
import os
import struct
from typing import Any

from absl import logging
import numpy as np

from roclip_jax.data import metadata as metadata_lib

MAGIC = b"RCR1"
SHARD_SUFFIX = ".array_record"
INDEX_SUFFIX = ".index.npz"
INDEX_VERSION = 1
_HEADER_LEN = struct.Struct("<I")
_INDEX_READ_BATCH = 1024  # Records per read when a shard is read to build its index.


def encode_record(
    *, source_id: int, caption: str, image_bytes: bytes, origin: str = "", label: int = -1, poisoned: int = 0
) -> bytes:
  """Serialises one example in the format above."""
  header = json.dumps(
      {"id": int(source_id), "caption": caption, "origin": origin, "label": int(label), "poisoned": int(poisoned)},
      ensure_ascii=False,
  ).encode("utf-8")
  return b"".join((MAGIC, _HEADER_LEN.pack(len(header)), header, image_bytes))


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes]:
  """(header dict, image bytes) of one serialised example."""
  if record[:4] != MAGIC:
    raise ValueError(
        f"Not a roclip_jax image-caption record (starts with {bytes(record[:4])!r}, expected "
        f"{MAGIC!r}); write shards with `python -m roclip_jax.data.convert`."
    )
  (length,) = _HEADER_LEN.unpack_from(record, 4)
  start = 4 + _HEADER_LEN.size
  header = json.loads(bytes(record[start : start + length]).decode("utf-8"))
  return header, bytes(record[start + length :])


def decode_header(record: bytes) -> dict[str, Any]:
  """The header dict of one serialised example (the image bytes are not copied)."""
  if record[:4] != MAGIC:
    decode_record(record)  # Raises the error naming the fix.
  (length,) = _HEADER_LEN.unpack_from(record, 4)
  start = 4 + _HEADER_LEN.size
  return json.loads(bytes(record[start : start + length]).decode("utf-8"))


# ------------------------------------------------------------------ caption index


def index_path(shard_path: str) -> str:
  """The caption index beside a shard: `shard-00000-of-00042.index.npz`."""
  stem = shard_path[: -len(SHARD_SUFFIX)] if shard_path.endswith(SHARD_SUFFIX) else shard_path
  return stem + INDEX_SUFFIX


@dataclasses.dataclass
class ShardIndex:
  """The header fields of one shard's records, in record order (no image bytes)."""

  source_ids: np.ndarray  # int64, the converter's id
  captions: metadata_lib.StringColumn
  labels: np.ndarray  # int64, -1 when unknown
  poisoned: np.ndarray  # int8

  def __len__(self) -> int:
    return len(self.source_ids)

  @classmethod
  def from_headers(cls, headers: Sequence[dict[str, Any]]) -> ShardIndex:
    return cls(
        source_ids=np.array([int(h["id"]) for h in headers], np.int64),
        captions=metadata_lib.StringColumn([h["caption"] for h in headers]),
        labels=np.array([int(h.get("label", -1)) for h in headers], np.int64),
        poisoned=np.array([int(h.get("poisoned", 0)) for h in headers], np.int8),
    )

  def save(self, path: str) -> None:
    """Writes the index under a temporary name, then renames it: a reader never sees half of one."""
    tmp = f"{path}.tmp-{os.getpid()}.npz"  # np.savez appends .npz to names without it.
    np.savez(
        tmp,
        version=np.int64(INDEX_VERSION),
        source_id=self.source_ids,
        label=self.labels,
        poisoned=self.poisoned,
        caption_blob=np.frombuffer(self.captions.blob, np.uint8),
        caption_offsets=self.captions.offsets,
    )
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> ShardIndex:
    with np.load(path, allow_pickle=False) as f:
      if int(f["version"]) != INDEX_VERSION:
        raise ValueError(
            f"{path} is a version-{int(f['version'])} caption index; this code reads "
            f"version {INDEX_VERSION}. Rewrite it: `python -m roclip_jax.data.convert "
            f"--index_only --overwrite_index --output_dir={os.path.dirname(path)}`."
        )
      return cls(
          source_ids=f["source_id"],
          labels=f["label"],
          poisoned=f["poisoned"],
          captions=metadata_lib.StringColumn.from_blob(f["caption_blob"].tobytes(), f["caption_offsets"]),
      )


def num_shard_records(shard_path: str) -> int:
  """Records in one shard (reads its footer only)."""
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top

  reader = ArrayRecordReader(shard_path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def read_shard_index(shard_path: str, bar: Any = None) -> ShardIndex:
  """A shard's index built by reading every record of it once (images included): the slow path.

  `bar`: a progress bar (`metadata.progress_bar`) to advance by each record read.
  """
  from array_record.python.array_record_module import ArrayRecordReader  # pylint: disable=g-import-not-at-top

  reader = ArrayRecordReader(shard_path)
  try:
    num = reader.num_records()
    headers = []
    for start in range(0, num, _INDEX_READ_BATCH):
      batch = reader.read(start, min(num, start + _INDEX_READ_BATCH))
      headers.extend(decode_header(r) for r in batch)
      if bar is not None:
        bar.update(len(batch))
  finally:
    reader.close()
  return ShardIndex.from_headers(headers)


def write_indexes(shard_paths_: Sequence[str], *, overwrite: bool = False, progress: bool = True) -> int:
  """Writes the index of each shard that lacks one (every shard with `overwrite`) by reading it once.

  One progress bar over all the records read. Returns how many indexes were written.
  """
  todo = [p for p in shard_paths_ if overwrite or not os.path.isfile(index_path(p))]
  if not todo:
    return 0
  total = sum(num_shard_records(p) for p in todo)
  with metadata_lib.progress_bar(total, "write caption indexes (full pass)", enabled=progress) as bar:
    for path in todo:
      read_shard_index(path, bar).save(index_path(path))
  return len(todo)


def shard_paths(pattern: str) -> list[str]:
  """The shard files of a glob pattern or a directory, sorted (shard order = record order)."""
  if not pattern:
    raise ValueError(
        "No ArrayRecord shards given; set config.data.array_record_pattern to a glob "
        "('/data/shards/*.array_record') or the converter's output directory."
    )
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*" + SHARD_SUFFIX)
  # The converter's stats (.json) and index (.index.npz) files sit beside the shards and may match
  # a loose pattern such as 'shard-*'; they are not shards.
  paths = sorted(
      p
      for p in glob.glob(pattern)
      if os.path.isfile(p) and not p.endswith((".json", INDEX_SUFFIX)) and ".tmp-" not in p
  )
  if not paths:
    raise FileNotFoundError(
        f"No file matches {pattern!r}; check config.data.array_record_pattern (convert data with "
        "`python -m roclip_jax.data.convert --input=... --output_dir=...`)."
    )
  return paths


class ArrayRecordSource:
  """Image-caption records from ArrayRecord shards; a picklable grain random-access source."""

  def __init__(self, paths: Sequence[str]):
    paths = [os.fspath(p) for p in paths]
    if not paths:
      raise ValueError("ArrayRecordSource needs at least one shard file.")
    self.paths = paths
    import grain  # pylint: disable=g-import-not-at-top  # Deferred: the converter needs no grain.

    self._records = grain.sources.ArrayRecordDataSource(paths)
    if len(self._records) == 0:
      raise ValueError(
          f"The {len(paths)} shard(s) starting with {paths[0]} hold no records; "
          "check the converter's summary.json for why every item failed."
      )

  @classmethod
  def from_pattern(cls, pattern: str) -> "ArrayRecordSource":
    return cls(shard_paths(pattern))

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} records")
    try:
      record = self._records[index]
    except Exception as e:  # pylint: disable=broad-except
      # The C++ reader reports I/O failures (a shard gone missing, EIO, a
      # dropped mount, a bad chunk) as assorted exception types. Whatever the
      # type, a record that cannot be read is a storage fault, not a bad
      # example: an OSError lets the pipeline retry it and then stop the run.
      # A failed reader stays failed, so for the retry to reopen the shard,
      # swap in a copy of the data source: copies open their readers lazily.
      self._records = copy.copy(self._records)
      raise OSError(
          errno.EIO, f"the ArrayRecord reader failed on record {index} of {self!r}: " f"{type(e).__name__}: {e}"
      ) from e
    header, image_bytes = decode_record(record)
    return {
        "id": np.int64(index),
        "image_bytes": image_bytes,
        "caption": header["caption"],
        "label": np.int64(header.get("label", -1)),
        "poisoned": np.int8(header.get("poisoned", 0)),
        "source_id": np.int64(header["id"]),
        "origin": header.get("origin", ""),
    }

  def __getstate__(self) -> dict[str, Any]:
    # The cached metadata stays in this process: grain pickles the source into every worker, and
    # the workers read records, not captions.
    state = dict(self.__dict__)
    state.pop("_metadata", None)
    return state

  def metadata(self) -> metadata_lib.Metadata:
    """Ids, captions, labels and poisoned flags of every record, from the shards' caption indexes.

    Reads no image. A shard without an index (converted before the index existed) is read once,
    images included, after a warning naming the command that writes the missing indexes. Cached.
    """
    cached = getattr(self, "_metadata", None)
    if cached is not None:
      return cached
    missing = [p for p in self.paths if not os.path.isfile(index_path(p))]
    missing_set = set(missing)
    if missing:
      logging.warning(
          "%d of %d ArrayRecord shards (first: %s) have no caption index (%s), so their captions "
          "and labels are read by a FULL PASS over their records, images included (hours on CC3M, on "
          "every host). Fix, once: `python -m roclip_jax.data.convert --index_only --output_dir=%s` "
          "(reads each shard once and writes the indexes), or rerun the original convert command.",
          len(missing),
          len(self.paths),
          missing[0],
          INDEX_SUFFIX,
          os.path.dirname(missing[0]),
      )
    with metadata_lib.progress_bar(
        sum(num_shard_records(p) for p in missing), "metadata (full pass: no caption index)", enabled=bool(missing)
    ) as bar:
      shards = [
          ShardIndex.load(index_path(p)) if p not in missing_set else read_shard_index(p, bar) for p in self.paths
      ]
    total = sum(len(s) for s in shards)
    if total != len(self):
      raise ValueError(
          f"The caption indexes of {self!r} list {total} records but the shards hold {len(self)}: an "
          "index is stale (a shard was rewritten without it). Fix: `python -m roclip_jax.data.convert "
          f"--index_only --overwrite_index --output_dir={os.path.dirname(self.paths[0])}`."
      )
    metadata = metadata_lib.Metadata(
        ids=np.arange(total, dtype=np.int64),
        captions=metadata_lib.StringColumn.concatenate([s.captions for s in shards]),
        labels=np.concatenate([s.labels for s in shards]) if shards else np.zeros(0, np.int64),
        poisoned=np.concatenate([s.poisoned for s in shards]) if shards else np.zeros(0, np.int8),
    )
    self._metadata = metadata
    return metadata

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, records={len(self)})"
