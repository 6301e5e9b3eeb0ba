"""Storage faults are not bad data: retried, then a StorageError that stops training after a checkpoint.

Faults are injected where the operating system would raise them: `builtins.open` raising OSError(EIO)
for chosen paths (PIL opens files through it too, so the old read-inside-PIL code sees the same fault),
a source whose `__getitem__` raises EIO, and an ArrayRecord shard that goes missing. Backoff never
sleeps for real: `image_ops._sleep` is replaced, or the config's base delay is 0.
"""

import builtins
import collections
import csv
import errno
import io
import os
import shutil
import threading

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from roclip_jax import config_lib
from roclip_jax import inspect as inspect_lib
from roclip_jax import train
from roclip_jax.data import array_record
from roclip_jax.data import convert
from roclip_jax.data import image_ops
from roclip_jax.data import pipeline
from roclip_jax.data import sources
from tests import helpers

FOREVER = float("inf")


class FaultyOpen:
  """Stands in for `builtins.open`: reading a listed path raises OSError(EIO) its given number of times."""

  def __init__(self, faults):
    self.faults = {os.path.abspath(p): n for p, n in faults.items()}
    self.raised = collections.Counter()
    self._open = builtins.open
    self._lock = threading.Lock()  # grain reads in several threads.

  def __call__(self, file, mode="r", *args, **kwargs):
    if isinstance(file, (str, os.PathLike)) and "r" in mode:
      path = os.path.abspath(os.fspath(file))
      with self._lock:
        if self.faults.get(path, 0) > 0:
          self.faults[path] -= 1
          self.raised[path] += 1
          raise OSError(errno.EIO, os.strerror(errno.EIO), path)
    return self._open(file, mode, *args, **kwargs)


class FlakySource:
  """Wraps a source; `__getitem__` raises OSError(EIO) for the listed indices, each its number of times.

  Module-level and picklable, for grain's worker processes (each worker counts on its own copy).
  """

  def __init__(self, source, faults):
    self.source, self.faults = source, dict(faults)

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    if self.faults.get(int(index), 0) > 0:
      self.faults[int(index)] -= 1
      raise OSError(errno.EIO, os.strerror(errno.EIO), f"record {index}")
    return self.source[index]

  def __repr__(self):
    return "FlakySource"


def write_png(path, seed, size=12):
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3)).astype(np.uint8)).save(path)


def dataset(tmp_path, num_good=10, bad=True):
  """A CSV of `num_good` PNGs, plus (with `bad`) one row each of corrupt bytes, an empty file, a text
  file, a missing file and a directory. Returns (csv path, good paths by id, bad ids)."""
  rows = []
  for i in range(num_good):
    write_png(tmp_path / f"ok{i}.png", i)
    rows.append((f"ok{i}.png", f"a valid caption, number {i}", i % 2))
  if bad:
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3)).astype(np.uint8)).save(jpeg, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:300])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.png").write_text("not an image")
    (tmp_path / "adir.png").mkdir()
    rows += [(name, f"bad row {name}", 0) for name in ("cut.jpg", "empty.png", "text.png", "gone.png", "adir.png")]
  with open(tmp_path / "d.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("image_path", "caption", "label"))
    writer.writerows(rows)
  good = {i: str(tmp_path / f"ok{i}.png") for i in range(num_good)}
  return str(tmp_path / "d.csv"), good, set(range(num_good, len(rows)))


def data_config(csv_path, **data):
  data = dict(
      dict(
          source="csv",
          csv_path=csv_path,
          image_root="",
          image_key="image_path",
          caption_key="caption",
          label_key="label",
          delimiter=",",
          eval_csv="",
          classes_json="",
          batch_size=4,
          num_workers=0,
          prefetch_buffer=2,
      ),
      **data,
  )
  return ml_collections.ConfigDict(
      dict(
          seed=0,
          num_epochs=2,
          data=data,
          model=dict(image=dict(image_size=16), text=dict(context_length=16)),
          augment=dict(image=False, text=False, text_resample_per_epoch=False),
      )
  )


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------ image_ops


def test_decode_image_tells_bad_data_from_storage_faults(tmp_path, monkeypatch):
  csv_path, good, _ = dataset(tmp_path, num_good=2)
  sleeps = []
  monkeypatch.setattr(image_ops, "_sleep", sleeps.append, raising=False)
  clean = image_ops.decode_image(good[0])
  assert clean.shape == (12, 12, 3)
  # Bad data: None at once, never retried.
  for name in ("cut.jpg", "empty.png", "text.png", "gone.png", "adir.png"):
    assert image_ops.decode_image(str(tmp_path / name)) is None, name
  assert sleeps == []
  # A transient fault: retried with exponential backoff, then the same image.
  faulty = FaultyOpen({good[0]: 2})
  monkeypatch.setattr(builtins, "open", faulty)
  np.testing.assert_array_equal(image_ops.decode_image(good[0]), clean)
  assert faulty.raised[good[0]] == 2 and sleeps == [0.5, 1.0]
  # A persistent fault: the default 5 retries (0.5 s doubling), then a StorageError that names the file,
  # the error and the fix.
  sleeps.clear()
  monkeypatch.setattr(builtins, "open", FaultyOpen({good[1]: FOREVER}))
  with pytest.raises(image_ops.StorageError) as error:
    image_ops.decode_image(good[1])
  assert sleeps == [0.5, 1.0, 2.0, 4.0, 8.0]
  message = str(error.value)
  assert good[1] in message and os.strerror(errno.EIO) in message
  assert "mount" in message and "checkpoint" in message
  assert isinstance(error.value.__cause__, OSError)
  # Permissions and host memory are faults too, not bad images.
  for fault in (PermissionError(errno.EACCES, "Permission denied"), MemoryError()):

    def read_fails(*args, fault=fault, **kwargs):
      raise fault

    monkeypatch.setattr(builtins, "open", read_fails)
    with pytest.raises(image_ops.StorageError, match=type(fault).__name__):
      image_ops.decode_image(good[0], retries=0)


def test_retry_settings_are_validated():
  config = config_lib.base_config()
  assert (config.data.io_retries, config.data.io_retry_base_seconds) == (5, 0.5)
  for field, value in (("io_retries", -1), ("io_retry_base_seconds", -0.5)):
    with pytest.raises(config_lib.ConfigError, match=f"config.data.{field}"):
      config_lib.validate(config_lib.override(config, {f"data.{field}": value}))


# ------------------------------------------------------------------ pipeline


def test_transient_faults_are_retried_and_batches_are_unchanged(tmp_path, monkeypatch):
  csv_path, good, _ = dataset(tmp_path, bad=False)
  config = data_config(csv_path)
  clean = list(pipeline.make_train_data(config).iterator)
  sleeps = []
  monkeypatch.setattr(image_ops, "_sleep", sleeps.append, raising=False)
  faulty = FaultyOpen({good[0]: 2, good[5]: 1})
  monkeypatch.setattr(builtins, "open", faulty)
  source = FlakySource(sources.CsvSource(csv_path), {3: 2})
  batches = list(pipeline.make_train_data(config, source=source).iterator)
  assert_batches_equal(batches, clean)
  assert sum(int(b["skipped"].sum()) for b in batches) == 0
  assert faulty.raised == {good[0]: 2, good[5]: 1} and source.faults[3] == 0
  assert sorted(sleeps) == [0.5, 0.5, 0.5, 1.0, 1.0]


def test_bad_data_is_still_skipped_and_counted_but_a_flaky_read_is_not(tmp_path, monkeypatch):
  csv_path, good, bad_ids = dataset(tmp_path)
  config = data_config(csv_path, io_retry_base_seconds=0.0)
  faulty = FaultyOpen({good[2]: 1})  # A good image whose first read fails: retried, not skipped.
  monkeypatch.setattr(builtins, "open", faulty)
  data = pipeline.make_train_data(config)
  assert data.steps_per_epoch == 3  # 15 rows // 4: corrupt, empty, text, missing and directory rows count.
  batches = list(data.iterator)
  assert faulty.raised[good[2]] == 1
  for e in range(2):
    epoch = batches[3 * e : 3 * e + 3]
    ids = set(np.concatenate([b["id"] for b in epoch]).tolist())
    assert ids == set(good), ids  # Every good image (2 re-read to top up), none of the bad ones.
    assert sum(int(b["skipped"].sum()) for b in epoch) == len(bad_ids) == 5


def test_a_failed_next_keeps_the_state_from_before_the_batch(tmp_path):
  csv_path, _, _ = dataset(tmp_path, num_good=12, bad=False)
  config = data_config(csv_path, io_retries=1, io_retry_base_seconds=0.0)
  clean = list(pipeline.make_train_data(config).iterator)
  bad_id = int(clean[1]["id"][2])
  source = FlakySource(sources.CsvSource(csv_path), {bad_id: 2})  # Fails both tries of its first read.
  it = pipeline.make_train_data(config, source=source).iterator
  head = [next(it)]
  before = it.get_state()
  with pytest.raises(pipeline.StorageError, match=f"record {bad_id} of FlakySource"):
    next(it)
  assert it.get_state() == before  # What a checkpoint saves now reads the failed batch again.
  # Resuming a fresh iterator from that state, or calling next() again once storage is back, reads it.
  resumed = pipeline.make_train_data(config).iterator
  resumed.set_state(it.get_state())
  assert_batches_equal(head + list(resumed), clean)
  assert_batches_equal(head + list(it), clean)


def test_storage_error_surfaces_from_worker_processes(tmp_path):
  csv_path, _, _ = dataset(tmp_path, num_good=12, bad=False)
  config = data_config(csv_path, num_workers=2, io_retries=1, io_retry_base_seconds=0.0)
  clean = list(pipeline.make_train_data(data_config(csv_path)).iterator)
  bad_id = int(clean[1]["id"][1])
  it = pipeline.make_train_data(config, source=FlakySource(sources.CsvSource(csv_path), {bad_id: FOREVER})).iterator
  try:
    first = next(it)
    before = it.get_state()
    with pytest.raises(pipeline.StorageError, match=f"record {bad_id} of FlakySource"):
      next(it)
    assert it.get_state() == before
  finally:
    it.close()
  # Resuming from a worker iterator's state is exact (test_pipeline.py), so the failed batch is read again.
  assert_batches_equal([first], clean[:1])


def test_array_record_reader_faults_are_retried_then_raised(tmp_path, monkeypatch):
  csv_path, _, _ = dataset(tmp_path, num_good=8, bad=False)
  convert.convert(csv_path, str(tmp_path / "shards"), image_size=12, shard_size=4, progress=False)
  # No real waits: grain's prefetch threads may still be retrying after the test ends.
  config = data_config(
      "", source="array_record", array_record_pattern=str(tmp_path / "shards"), io_retries=2, io_retry_base_seconds=0.0
  )
  clean = list(pipeline.make_train_data(config).iterator)
  shard = array_record.shard_paths(str(tmp_path / "shards"))[1]
  lock = threading.Lock()

  def shard_comes_back(seconds):
    del seconds
    with lock:  # Several prefetch threads may be backing off at once.
      if not os.path.exists(shard):
        shutil.move(tmp_path / "away", shard)

  # The shard goes missing after the source listed the shards (as when a mount drops mid-run) and is
  # back after the first backoff: the reopened reader reads the same batches.
  monkeypatch.setattr(image_ops, "_sleep", shard_comes_back, raising=False)
  data = pipeline.make_train_data(config)
  shutil.move(shard, tmp_path / "away")
  assert_batches_equal(list(data.iterator), clean)
  # A shard that stays missing is a StorageError naming it, not a skipped example.
  monkeypatch.setattr(image_ops, "_sleep", lambda seconds: None)
  data = pipeline.make_train_data(config)
  shutil.move(shard, tmp_path / "away")
  with pytest.raises(pipeline.StorageError, match=os.path.basename(shard)):
    list(data.iterator)


# ------------------------------------------------------------------ training


def tiny_config(demo_root, **overrides):
  """The shared tiny run (`helpers.tiny_config`), with instant retries; only the fault and the end of a run save."""
  base = {
      "data.io_retries": 1,
      "data.io_retry_base_seconds": 0.0,
      "num_epochs": 2,
      "max_steps": 5,
      "checkpoint.every_steps": 100,
  }
  return helpers.tiny_config(demo_root, **dict(base, **overrides))


def test_persistent_fault_checkpoints_stops_and_the_rerun_matches(demo_root, tmp_path, monkeypatch, caplog):
  config = tiny_config(demo_root)
  train_data, _ = train.build_train_data(config)
  batches = [next(train_data.iterator) for _ in range(3)]
  bad_path = train_data.source[int(batches[2]["id"][5])]["image_path"]  # First read for step 3.
  straight = tmp_path / "straight"
  train.train_and_evaluate(config, str(straight))

  faulty = tmp_path / "faulty"
  with monkeypatch.context() as patch:
    patch.setattr(builtins, "open", FaultyOpen({bad_path: FOREVER}))
    with pytest.raises(pipeline.StorageError, match=bad_path):
      train.train_and_evaluate(config, str(faulty))
  saved = sorted(int(d) for d in os.listdir(faulty / "checkpoints") if d.isdigit())
  assert saved == [2]  # The last completed step, with the data position of the failed batch.
  assert "Storage fault reading the batch of step 3" in caplog.text
  result = train.train_and_evaluate(config, str(faulty))  # Storage is back: resume.
  assert result["step"] == 5
  a, b = inspect_lib.load(str(straight)), inspect_lib.load(str(faulty))
  assert a.step == b.step == 5
  for x, y in zip(jax.tree.leaves(a.state.params), jax.tree.leaves(b.state.params)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
