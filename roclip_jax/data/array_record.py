"""ArrayRecord shards of image-caption pairs: the record format and a grain random-access source.

Shards are written by `python -m roclip_jax.data.convert` (see there) with `group_size:1`, so any
record is one seek away. Each record is one example, serialised without pickle:

  b"RCR1" | header length (uint32, little endian) | header (UTF-8 JSON) | image (JPEG bytes)

  header = {"id": int,        # the example's index in the converter's input (CSV row / wds order)
            "caption": str,
            "origin": str,    # where the image came from: its CSV path or "<tar name>/<key>"
            "label": int,     # -1 when the input has no label
            "poisoned": int}  # 0 unless the input CSV has a `poisoned` column

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
import errno
import glob
import json
import os
import struct
from typing import Any

import numpy as np

MAGIC = b"RCR1"
SHARD_SUFFIX = ".array_record"
_HEADER_LEN = struct.Struct("<I")


def encode_record(*, source_id: int, caption: str, image_bytes: bytes, origin: str = "",
                  label: int = -1, poisoned: int = 0) -> bytes:
  """Serialises one example in the format above."""
  header = json.dumps(
      {"id": int(source_id), "caption": caption, "origin": origin, "label": int(label),
       "poisoned": int(poisoned)}, ensure_ascii=False).encode("utf-8")
  return b"".join((MAGIC, _HEADER_LEN.pack(len(header)), header, image_bytes))


def decode_record(record: bytes) -> tuple[dict[str, Any], bytes]:
  """(header dict, image bytes) of one serialised example."""
  if record[:4] != MAGIC:
    raise ValueError(
        f"Not a roclip_jax image-caption record (starts with {bytes(record[:4])!r}, expected "
        f"{MAGIC!r}); write shards with `python -m roclip_jax.data.convert`.")
  (length,) = _HEADER_LEN.unpack_from(record, 4)
  start = 4 + _HEADER_LEN.size
  header = json.loads(bytes(record[start:start + length]).decode("utf-8"))
  return header, bytes(record[start + length:])


def shard_paths(pattern: str) -> list[str]:
  """The shard files of a glob pattern or a directory, sorted (shard order = record order)."""
  if not pattern:
    raise ValueError("No ArrayRecord shards given; set config.data.array_record_pattern to a glob "
                     "('/data/shards/*.array_record') or the converter's output directory.")
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "*" + SHARD_SUFFIX)
  paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(
        f"No file matches {pattern!r}; check config.data.array_record_pattern (convert data with "
        "`python -m roclip_jax.data.convert --input=... --output_dir=...`).")
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
      raise ValueError(f"The {len(paths)} shard(s) starting with {paths[0]} hold no records; "
                       "check the converter's summary.json for why every item failed.")

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
      raise OSError(errno.EIO, f"the ArrayRecord reader failed on record {index} of {self!r}: "
                    f"{type(e).__name__}: {e}") from e
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

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self.paths)} shards, records={len(self)})"
