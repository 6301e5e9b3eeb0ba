"""Random-access image-caption sources for grain.

A source returns records `{'id', 'image_path', 'caption', 'label',
'poisoned'}`; images are read and decoded later, in the pipeline, so that a
corrupt or missing file is skipped there (and counted) instead of failing
here. A source whose `__getitem__` does I/O should raise OSError for a
storage fault: the pipeline retries it and then stops the run
(`image_ops.StorageError`) rather than skip the example.

Columns are held as one UTF-8 blob plus offsets rather than as Python lists:
grain pickles the source into every worker process, and a blob of a
million captions pickles in milliseconds where a list of strings does not.
"""

from __future__ import annotations

from collections.abc import Sequence
import csv
import os
import sys
from typing import Any, TYPE_CHECKING

from absl import logging
import numpy as np

from roclip_jax.data import demo
from roclip_jax.data import metadata as metadata_lib

if TYPE_CHECKING:  # array_record (the optional ArrayRecord dependency) is imported on use.
  from roclip_jax.data.array_record import ArrayRecordSource

VALID_SOURCES = ("demo", "csv", "array_record")
POISONED_KEY = "poisoned"  # Optional CSV column written by poisoning tools.


def _raise_for_column(path: str, key: str, config_name: str, header: Sequence[str]) -> None:
  raise ValueError(
      f"{path} has no column {key!r} (columns: {list(header)}). Set "
      f"config.data.{config_name} to the right column name, or "
      "config.data.delimiter if the file is not comma-separated."
  )


class CsvSource:
  """Image-caption pairs from a CSV/TSV file; grain random-access source.

  The file is parsed once. Rows with a blank caption or without an image
  path are dropped and counted in `num_bad_rows`. An example's `id` is its
  index in this source (after dropping bad rows), so `source[i]['id'] == i`.
  Relative image paths are resolved against `image_root`, or else against
  the CSV's directory. A `label` column is optional (-1 when missing or
  empty); so is an integer `poisoned` column (0 when missing).
  """

  def __init__(
      self,
      path: str,
      image_root: str = "",
      image_key: str = "image_path",
      caption_key: str = "caption",
      label_key: str = "label",
      delimiter: str = ",",
  ):
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"CSV file {path!r} does not exist; check config.data.csv_path / " "config.data.eval_csv."
      )
    self.path = os.path.abspath(path)
    self.image_root = os.path.abspath(image_root or os.path.dirname(self.path))
    paths, captions, labels, poisoned, bad_lines = self._parse(image_key, caption_key, label_key, delimiter)
    self._paths = metadata_lib.StringColumn(paths)
    self._captions = metadata_lib.StringColumn(captions)
    self._labels = np.asarray(labels, np.int64)
    self._poisoned = np.asarray(poisoned, np.int8)
    self.num_bad_rows = len(bad_lines)
    if bad_lines:
      logging.warning(
          "%s: dropped %d row(s) with a blank caption or no image path " "(first at lines %s).",
          self.path,
          len(bad_lines),
          bad_lines[:10],
      )
    if not self._labels.size:
      raise ValueError(f"{self.path} has no usable rows (header only, or " "every row lacks an image path or caption).")

  def _parse(
      self, image_key: str, caption_key: str, label_key: str, delimiter: str
  ) -> tuple[list[str], list[str], list[int], list[int], list[int]]:
    paths, captions, labels, poisoned, bad_lines = [], [], [], [], []
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # Long captions.
    with open(self.path, newline="", encoding="utf-8") as f:
      reader = csv.DictReader(f, delimiter=delimiter)
      header = reader.fieldnames or []
      if image_key not in header:
        _raise_for_column(self.path, image_key, "image_key", header)
      if caption_key not in header:
        _raise_for_column(self.path, caption_key, "caption_key", header)
      has_label = bool(label_key) and label_key in header
      has_poisoned = POISONED_KEY in header
      for row in reader:
        image, caption = row.get(image_key), row.get(caption_key)
        if not image or not image.strip() or not caption or not caption.strip():
          bad_lines.append(reader.line_num)
          continue
        paths.append(image.strip())
        captions.append(caption)
        labels.append(self._int_field(row, label_key, has_label, -1, reader.line_num, "label_key"))
        poisoned.append(self._int_field(row, POISONED_KEY, has_poisoned, 0, reader.line_num, None))
    return paths, captions, labels, poisoned, bad_lines

  def _int_field(
      self, row: dict[str, Any], key: str, present: bool, default: int, line: int, config_name: str | None
  ) -> int:
    value = (row.get(key) or "").strip() if present else ""
    if not value:
      return default
    try:
      return int(value)
    except ValueError:
      fix = (
          f"point config.data.{config_name} at an integer column or set it " "to ''"
          if config_name
          else "fix or remove that column"
      )
      raise ValueError(f"{self.path} line {line}: column {key!r} holds " f"{value!r}, not an integer; {fix}.") from None

  def __len__(self) -> int:
    return len(self._labels)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"index {index} out of range for {len(self)} rows")
    return {
        "id": np.int64(index),
        "image_path": os.path.join(self.image_root, self._paths[index]),
        "caption": self._captions[index],
        "label": self._labels[index],
        "poisoned": self._poisoned[index],
    }

  @property
  def labels(self) -> np.ndarray:
    """All labels (int64, -1 when unknown), without touching images."""
    return self._labels

  def caption(self, index: int) -> str:
    return self._captions[index]

  def metadata(self) -> metadata_lib.Metadata:
    """Ids, captions, labels and poisoned flags of every row, from the parsed columns (no image read)."""
    return metadata_lib.Metadata(
        ids=np.arange(len(self), dtype=np.int64), captions=self._captions, labels=self._labels, poisoned=self._poisoned
    )

  def __repr__(self) -> str:
    return f"CsvSource({self.path!r}, rows={len(self)})"


def csv_source_from_config(data_cfg: Any, path: str) -> CsvSource:
  """A CsvSource for `path` with the column settings of `config.data`."""
  return CsvSource(
      path,
      image_root=data_cfg.get("image_root", "") or "",
      image_key=data_cfg.get("image_key", "image_path") or "image_path",
      caption_key=data_cfg.get("caption_key", "caption") or "caption",
      label_key=data_cfg.get("label_key", "label") or "",
      delimiter=data_cfg.get("delimiter", ",") or ",",
  )


def make_source(data_cfg: Any, split: str = "train") -> CsvSource | ArrayRecordSource:
  """The source for `config.data` and a split ('train' or 'test').

  'demo' generates the built-in dataset on first use and reads its split
  CSV. 'csv' reads `data_cfg.csv_path` for 'train' and `data_cfg.eval_csv`
  for any other split. 'array_record' reads the shards matching
  `data_cfg.array_record_pattern` (written by `roclip_jax.data.convert`)
  for 'train' and, like 'csv', `data_cfg.eval_csv` for any other split.
  """
  kind = data_cfg.source
  if kind == "demo":
    root = demo.ensure_demo_dataset(data_cfg.demo)
    if split not in ("train", "test"):
      raise ValueError(f"The demo dataset has splits 'train' and 'test', " f"not {split!r}.")
    return CsvSource(os.path.join(root, f"{split}.csv"))
  if kind == "array_record" and split == "train":
    from roclip_jax.data import array_record  # pylint: disable=g-import-not-at-top (optional dependency)

    return array_record.ArrayRecordSource.from_pattern(data_cfg.get("array_record_pattern", ""))
  if kind in ("csv", "array_record"):
    key = "csv_path" if split == "train" else "eval_csv"
    path = data_cfg.get(key, "")
    if not path:
      raise ValueError(f"config.data.source={kind!r} needs config.data.{key} " f"for the {split!r} split.")
    return csv_source_from_config(data_cfg, path)
  raise ValueError(f"Unknown config.data.source={kind!r}; valid values are " f"{VALID_SOURCES}.")
