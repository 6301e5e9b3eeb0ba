"""Per-example metadata of a training source without its images: ids, captions, labels, poison flags.

Poisoning, CleanCLIP's clean subset and SafeCLIP's bookkeeping need every example's caption, label
or poisoned flag, never its pixels. Reading those through `source[i]` would read every image too
(an ArrayRecord record carries its JPEG: ~100 GB for CC3M, on every host, before step 1). So a
source exposes `metadata() -> Metadata` computed without touching image bytes:

* `sources.CsvSource` (and the demo set): from the CSV columns it has already parsed.
* `array_record.ArrayRecordSource`: from the caption index `convert` writes beside each shard
  (`shard-*.index.npz`, a few bytes per example). Shards written before the index existed fall
  back to reading their records once, with a loud warning naming the fix
  (`python -m roclip_jax.data.convert --index_only --output_dir=DIR`).
* `poison.PoisonedSource` and `SubsetSource`: from their base's metadata.

`metadata_of(source)` calls that method, or reads every record once (with a progress bar) for a
source without one. docs/data.md describes the index and the lazy poisoning built on this.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import dataclasses
import sys
from typing import Any

from absl import logging
import numpy as np
import tqdm

_CLEAN_SUBSET_STREAM = 0xC1EA  # The seed-sequence tag of CleanCLIP's clean-subset sample.


class StringColumn:
  """An immutable list of strings stored compactly (UTF-8 blob + offsets).

  Cheap to pickle into grain workers and ~3x smaller than a list of str: a million captions are
  one bytes object and one int64 array, not a million Python objects.
  """

  def __init__(self, values: Sequence[str] = ()):
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.zeros(len(encoded) + 1, np.int64)
    np.cumsum([len(e) for e in encoded], out=offsets[1:])
    self._offsets = offsets
    self._blob = b"".join(encoded)

  @classmethod
  def from_blob(cls, blob: bytes, offsets: np.ndarray) -> StringColumn:
    """The column whose string i is `blob[offsets[i]:offsets[i + 1]]` (UTF-8)."""
    offsets = np.asarray(offsets, np.int64)
    if (
        offsets.ndim != 1
        or offsets.size < 1
        or offsets[0] != 0
        or offsets[-1] != len(blob)
        or np.any(np.diff(offsets) < 0)
    ):
      raise ValueError(
          f"Caption offsets must rise from 0 to the blob's length {len(blob)}; got "
          f"{offsets.size} offsets ending at {offsets[-1] if offsets.size else None}."
      )
    column = cls()
    column._blob, column._offsets = bytes(blob), offsets
    return column

  @classmethod
  def concatenate(cls, columns: Sequence[StringColumn]) -> StringColumn:
    if not columns:
      return cls()
    starts = np.cumsum([0] + [len(c._blob) for c in columns[:-1]])
    offsets = np.concatenate([[0]] + [c._offsets[1:] + s for c, s in zip(columns, starts)])
    return cls.from_blob(b"".join(c._blob for c in columns), offsets)

  @property
  def blob(self) -> bytes:
    return self._blob

  @property
  def offsets(self) -> np.ndarray:
    return self._offsets

  def __len__(self) -> int:
    return len(self._offsets) - 1

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"caption index {index} out of range for {len(self)} captions")
    start, stop = self._offsets[index], self._offsets[index + 1]
    return self._blob[start:stop].decode("utf-8")

  def __iter__(self) -> Iterator[str]:
    blob, offsets = self._blob, self._offsets.tolist()
    for start, stop in zip(offsets[:-1], offsets[1:]):
      yield blob[start:stop].decode("utf-8")


class CaptionOverlay:
  """A caption column with some entries replaced and some appended, without copying the base."""

  def __init__(self, base: Sequence[str], replaced: dict[int, str], appended: Sequence[str]):
    self._base, self._replaced, self._appended = base, dict(replaced), list(appended)

  def __len__(self) -> int:
    return len(self._base) + len(self._appended)

  def __getitem__(self, index: int) -> str:
    index = int(index)
    if index < 0:
      index += len(self)
    if not 0 <= index < len(self):
      raise IndexError(f"caption index {index} out of range for {len(self)} captions")
    if index >= len(self._base):
      return self._appended[index - len(self._base)]
    return self._replaced.get(index, self._base[index]) if self._replaced else self._base[index]

  def __iter__(self) -> Iterator[str]:
    for index, caption in enumerate(self._base):
      yield self._replaced.get(index, caption)
    yield from self._appended


@dataclasses.dataclass(frozen=True)
class Metadata:
  """Everything but the image of each record of a source, in source order (position i = `source[i]`).

  ids: int64 [N], `source[i]['id']`. captions: [N] str. labels: int64 [N], -1 when unknown.
  poisoned: int8 [N], the records' `poisoned` codes (0 clean, 1 backdoor, 2 targeted).
  """

  ids: np.ndarray
  captions: Sequence[str]
  labels: np.ndarray
  poisoned: np.ndarray

  def __post_init__(self):
    ids = np.asarray(self.ids, np.int64)
    labels = np.asarray(self.labels, np.int64)
    poisoned = np.asarray(self.poisoned, np.int8)
    shapes = {"ids": ids.shape, "labels": labels.shape, "poisoned": poisoned.shape, "captions": (len(self.captions),)}
    if len(set(shapes.values())) != 1 or ids.ndim != 1:
      raise ValueError(f"Metadata columns must be 1-D and of one length; got shapes {shapes}.")
    object.__setattr__(self, "ids", ids)
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "poisoned", poisoned)

  def __len__(self) -> int:
    return len(self.ids)

  def take(self, indices: np.ndarray) -> Metadata:
    """The metadata of the records at `indices` (captions are copied: only the taken ones)."""
    indices = np.asarray(indices, np.int64)
    return Metadata(
        ids=self.ids[indices],
        captions=StringColumn([self.captions[i] for i in indices]),
        labels=self.labels[indices],
        poisoned=self.poisoned[indices],
    )


def progress_bar(total: int, desc: str, *, enabled: bool = True) -> tqdm.tqdm:
  """The bar every full pass over a source shows: examples done, examples/s, time left."""
  return tqdm.tqdm(
      total=total,
      desc=desc,
      unit="ex",
      unit_scale=True,
      mininterval=1.0,
      file=sys.stderr,
      dynamic_ncols=True,
      disable=not enabled,
  )


def read_metadata(source: Any, *, desc: str = "metadata (full pass)", progress: bool = True) -> Metadata:
  """Metadata by reading every record once: a full pass (images included), with a progress bar."""
  n = len(source)
  ids = np.empty(n, np.int64)
  labels = np.empty(n, np.int64)
  poisoned = np.empty(n, np.int8)
  captions = []
  with progress_bar(n, desc, enabled=progress) as bar:
    for i in range(n):
      record = source[i]
      ids[i] = int(record["id"])
      captions.append(str(record["caption"]))
      labels[i] = int(record.get("label", -1))
      poisoned[i] = int(record.get("poisoned", 0))
      bar.update(1)
  return Metadata(ids=ids, captions=StringColumn(captions), labels=labels, poisoned=poisoned)


def metadata_of(source: Any, *, progress: bool = True) -> Metadata:
  """`source.metadata()`, or, for a source without that method, a full pass over its records."""
  method = getattr(source, "metadata", None)
  if callable(method):
    metadata = method()
  else:
    if len(source) > 10_000:  # A small in-memory list is not worth a warning; a dataset is.
      logging.warning(
          "%s has no metadata() method, so its ids, captions and labels are read by a full pass "
          "over its %d records (images included). Give the source a metadata() returning "
          "roclip_jax.data.metadata.Metadata to skip this.",
          type(source).__name__,
          len(source),
      )
    metadata = read_metadata(source, progress=progress)
  if len(metadata) != len(source):
    raise ValueError(
        f"{source!r}.metadata() describes {len(metadata)} records but the source has "
        f"{len(source)}; its metadata is stale (for ArrayRecord shards: rerun "
        "`python -m roclip_jax.data.convert --index_only --overwrite_index --output_dir=<shard dir>`)."
    )
  return metadata


def poisoned_flags(source_or_metadata: Any) -> np.ndarray:
  """bool [N]: which records carry a poison (`poisoned != 0`), e.g. for SafeCLIP's split report."""
  metadata = source_or_metadata if isinstance(source_or_metadata, Metadata) else metadata_of(source_or_metadata)
  return metadata.poisoned != 0


def clean_indices(source_or_metadata: Any, num_examples: int, seed: int) -> np.ndarray:
  """Positions of the records with `poisoned == 0`; with `num_examples` > 0, a seeded sample of that
  many, in source order. The same draw as `cleanclip.clean_subset` has always made."""
  clean = np.flatnonzero(~poisoned_flags(source_or_metadata)).astype(np.int64)
  if num_examples:
    if num_examples > clean.size:
      raise ValueError(
          f"cleanclip.num_clean_examples={num_examples} but the training source has only "
          f"{clean.size} clean records; lower it, or use 0 for all of them."
      )
    rng = np.random.default_rng([seed, _CLEAN_SUBSET_STREAM])
    clean = np.sort(rng.choice(clean, size=num_examples, replace=False))
  return clean


class SubsetSource:
  """Some records of a source, by position; random access and picklable like the source."""

  def __init__(self, base: Any, indices: np.ndarray):
    self._base = base
    self._indices = np.asarray(indices, np.int64)

  @property
  def indices(self) -> np.ndarray:
    return self._indices

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._base[int(self._indices[int(index)])]

  def metadata(self) -> Metadata:
    return metadata_of(self._base).take(self._indices)

  def __repr__(self) -> str:
    return f"SubsetSource({self._base!r}, records={len(self)})"


def clean_subset(source: Any, num_examples: int, seed: int, *, metadata: Metadata | None = None) -> SubsetSource:
  """CleanCLIP's clean training data: `clean_indices` of `source`, as a source. Records keep their ids.

  `metadata`: the source's, when the caller already has it; otherwise `metadata_of(source)`.
  """
  return SubsetSource(source, clean_indices(source if metadata is None else metadata, num_examples, seed))
