"""CSV / webdataset -> ArrayRecord conversion, the ArrayRecord source, and training from shards."""

import csv
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import ml_collections
import numpy as np
from PIL import Image
import pytest

from roclip_jax import config_lib
from roclip_jax import models
from roclip_jax import train
from roclip_jax.data import array_record
from roclip_jax.data import convert
from roclip_jax.data import pipeline
from roclip_jax.data import sources

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
CORRUPT_ROW, MISSING_ROW = 5, 9


def smooth_image(seed: int, height: int, width: int) -> np.ndarray:
  """Low-frequency colour waves: compress well, so JPEG error stays small and testable."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:height, 0:width] / max(height, width)
  c = rng.uniform(0.2, 1.0, (3, 3))
  channels = [128 + 100 * np.sin(2 * np.pi * (c[k, 0] * xx + c[k, 1] * yy) + 6 * c[k, 2]) for k in range(3)]
  return np.stack(channels, -1).clip(0, 255).astype(np.uint8)


def encode(image: np.ndarray, fmt: str) -> bytes:
  out = io.BytesIO()
  Image.fromarray(image).save(out, format=fmt, **({"quality": 98} if fmt == "JPEG" else {}))
  return out.getvalue()


def expected_stored(image: np.ndarray) -> np.ndarray:
  """Hand-written reference: shorter side down to IMAGE_SIZE (never up), bicubic, no crop."""
  h, w = image.shape[:2]
  if min(h, w) <= IMAGE_SIZE:
    return image
  size = (IMAGE_SIZE, int(IMAGE_SIZE * h / w)) if w <= h else (int(IMAGE_SIZE * w / h), IMAGE_SIZE)
  return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


# Sizes (h, w): larger and smaller than IMAGE_SIZE, portrait and landscape.
SHAPES = [
    (48, 40),
    (20, 24),
    (40, 64),
    (32, 32),
    (64, 48),
    (36, 36),
    (24, 50),
    (50, 24),
    (33, 40),
    (40, 33),
    (64, 64),
    (28, 44),
    (44, 28),
]


@pytest.fixture()
def csv_dataset(tmp_path):
  """13 rows: row 5 a corrupt JPEG, row 9 a missing file, the rest PNGs; labels in a column."""
  root = tmp_path / "raw"
  root.mkdir()
  images, rows = {}, []
  for i, (h, w) in enumerate(SHAPES):
    name = f"img_{i:02d}.png"
    if i == CORRUPT_ROW:
      name = "broken.jpg"
      (root / name).write_bytes(encode(smooth_image(i, h, w), "JPEG")[:200])  # Truncated.
    elif i != MISSING_ROW:
      images[i] = smooth_image(i, h, w)
      (root / name).write_bytes(encode(images[i], "PNG"))
    rows.append((name, f"caption number {i}, a photo", str(i % 3)))
  path = root / "train.csv"  # Relative image paths resolve against the CSV's directory.
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("image_path", "caption", "label"))
    writer.writerows(rows)
  return str(path), images, rows


def read_all(directory):
  src = array_record.ArrayRecordSource.from_pattern(str(directory))
  return [src[i] for i in range(len(src))]


def decode(record):
  return np.asarray(Image.open(io.BytesIO(record["image_bytes"])).convert("RGB"))


def test_csv_round_trip(csv_dataset, tmp_path):
  path, images, rows = csv_dataset
  out = tmp_path / "shards"
  summary = convert.convert(path, str(out), image_size=IMAGE_SIZE, shard_size=4, progress=False)
  assert (summary.items, summary.num_shards, summary.records, summary.records_written) == (13, 4, 11, 11)
  assert summary.failures_by_reason == {"corrupt": 1, "missing": 1}
  assert [(f["id"], f["reason"]) for f in summary.failures] == [(CORRUPT_ROW, "corrupt"), (MISSING_ROW, "missing")]
  assert json.loads((out / "summary.json").read_text())["records"] == 11
  assert sorted(p for p in os.listdir(out) if p.endswith(".array_record")) == [
      f"shard-{i:05d}-of-00004.array_record" for i in range(4)
  ]

  records = read_all(out)
  kept = [i for i in range(13) if i not in (CORRUPT_ROW, MISSING_ROW)]
  assert [int(r["source_id"]) for r in records] == kept
  assert [int(r["id"]) for r in records] == list(range(11))  # Dense, like CsvSource.
  for record, i in zip(records, kept):
    assert record["caption"] == rows[i][1]
    assert int(record["label"]) == i % 3 and int(record["poisoned"]) == 0
    assert record["origin"].endswith(rows[i][0])
    stored, reference = decode(record), expected_stored(images[i])
    assert stored.shape == reference.shape
    assert min(stored.shape[:2]) == min(IMAGE_SIZE, *images[i].shape[:2])
    # JPEG q95 with 4:2:0 chroma on tiny images: a few levels; a geometry or channel bug: tens.
    assert np.abs(stored.astype(float) - reference).mean() < 4.0


def write_tar(path, members):
  with tarfile.open(path, "w") as tar:
    for name, data in members:
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def test_webdataset_round_trip(tmp_path):
  wds = tmp_path / "wds"
  wds.mkdir()
  big = smooth_image(0, 200, 160)  # JPEG larger than 2x: decoded at reduced scale (draft).
  a = [
      ("000000000.jpg", encode(big, "JPEG")),
      ("000000000.txt", b"a big image"),
      ("000000001.jpg", encode(smooth_image(1, 30, 30), "JPEG")),
      ("000000001.json", json.dumps({"caption": "caption from json", "url": "x"}).encode()),
      ("000000002.png", encode(smooth_image(2, 40, 50), "PNG")),
      ("000000002.txt", b"a png"),
      ("000000003.jpg", encode(smooth_image(3, 64, 40), "JPEG")),
      ("000000003.txt", "caf\u00e9 \u00fcber".encode()),
      ("000000004.jpg", encode(smooth_image(4, 36, 36), "JPEG")),
      ("000000004.txt", b"four"),
  ]
  b = [
      ("000000005.jpg", b"\xff\xd8 not really a jpeg"),
      ("000000005.txt", b"corrupt"),
      ("000000006.txt", b"an image never downloaded"),
      ("000000007.jpg", encode(smooth_image(7, 40, 40), "JPEG")),
      ("000000008.jpg", encode(smooth_image(8, 40, 40), "JPEG")),
      ("000000008.txt", b"eight"),
  ]
  write_tar(wds / "00001.tar", b)  # Written first: order must come from the sorted names.
  write_tar(wds / "00000.tar", a)
  summary = convert.convert(str(wds), str(tmp_path / "out"), image_size=IMAGE_SIZE, shard_size=3, progress=False)
  # Shards end at tar boundaries: 5 keys -> 3 + 2, 4 keys -> 3 + 1.
  assert (summary.items, summary.num_shards, summary.records) == (9, 4, 6)
  assert summary.failures_by_reason == {"corrupt": 1, "missing": 1, "no_caption": 1}
  assert [(f["id"], f["reason"]) for f in summary.failures] == [(5, "corrupt"), (6, "missing"), (7, "no_caption")]
  records = read_all(tmp_path / "out")
  assert [int(r["source_id"]) for r in records] == [0, 1, 2, 3, 4, 8]
  assert [r["caption"] for r in records] == [
      "a big image",
      "caption from json",
      "a png",
      "caf\u00e9 \u00fcber",
      "four",
      "eight",
  ]
  assert records[0]["origin"] == "00000.tar/000000000"
  assert [int(r["label"]) for r in records] == [-1] * 6
  stored = decode(records[0])
  assert stored.shape == (40, IMAGE_SIZE, 3)  # 200x160 -> short side 32.
  assert np.abs(stored.astype(float) - expected_stored(big)).mean() < 4.0

  (wds / "bad.tar.gz").write_bytes(b"\x1f\x8b" + b"\0" * 600)
  with pytest.raises(ValueError, match="uncompressed tar"):
    convert.convert(str(wds / "bad.tar.gz"), str(tmp_path / "bad"), fmt="wds", progress=False)


def test_resume_skips_finished_shards(csv_dataset, tmp_path):
  path, _, _ = csv_dataset
  out = tmp_path / "shards"
  convert.convert(path, str(out), image_size=IMAGE_SIZE, shard_size=4, progress=False)
  names = sorted(p for p in os.listdir(out) if p.endswith(".array_record"))
  before = {n: ((out / n).stat().st_mtime_ns, (out / n).read_bytes()) for n in names}
  os.remove(out / names[1])  # As if the run had been killed while writing shard 1 ...
  (out / f"{names[1]}.tmp-123").write_bytes(b"partial")  # ... leaving its temporary file.

  cmd = [
      sys.executable,
      "-m",
      "roclip_jax.data.convert",
      f"--input={path}",
      f"--output_dir={out}",
      f"--image_size={IMAGE_SIZE}",
      "--shard_size=4",
      "--workers=1",
      "--noprogress",
  ]
  result = subprocess.run(cmd, capture_output=True, text=True, check=True, env=dict(os.environ, PYTHONPATH=REPO))
  assert "11 records in 4 shards (1 written, 3 already done)" in result.stdout
  assert "1 corrupt, 1 missing" in result.stdout
  summary = json.loads((out / "summary.json").read_text())
  assert (summary["shards_written"], summary["shards_skipped"], summary["records"], summary["records_written"]) == (
      1,
      3,
      11,
      3,
  )
  assert summary["failures_by_reason"] == {"corrupt": 1, "missing": 1}
  for name in names:
    if name != names[1]:
      assert (out / name).stat().st_mtime_ns == before[name][0], f"{name} was rewritten"
    assert (out / name).read_bytes() == before[name][1]
  assert not [p for p in os.listdir(out) if ".tmp-" in p]

  with pytest.raises(ValueError, match="different conversion.*shard_size: 4 -> 5"):
    convert.convert(path, str(out), image_size=IMAGE_SIZE, shard_size=5, progress=False)


def test_parallel_workers_write_identical_shards(csv_dataset, tmp_path):
  path, _, _ = csv_dataset
  serial = convert.convert(
      path, str(tmp_path / "serial"), image_size=IMAGE_SIZE, shard_size=3, workers=1, progress=False
  )
  parallel = convert.convert(
      path, str(tmp_path / "parallel"), image_size=IMAGE_SIZE, shard_size=3, workers=2, progress=False
  )
  assert (parallel.records, parallel.failures) == (serial.records, serial.failures)
  names = sorted(p for p in os.listdir(tmp_path / "serial") if p.endswith(".array_record"))
  assert len(names) == 5
  for name in names:
    assert (tmp_path / "parallel" / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()


def test_source_is_picklable_and_bad_input_is_named(csv_dataset, tmp_path):
  path, _, _ = csv_dataset
  convert.convert(path, str(tmp_path / "s"), image_size=IMAGE_SIZE, shard_size=4, progress=False)
  source = array_record.ArrayRecordSource.from_pattern(str(tmp_path / "s" / "*.array_record"))
  clone = pickle.loads(pickle.dumps(source))
  assert clone[7]["caption"] == source[7]["caption"] and clone[7]["image_bytes"] == source[7]["image_bytes"]
  with pytest.raises(IndexError):
    source[len(source)]
  with pytest.raises(FileNotFoundError, match="array_record_pattern"):
    array_record.ArrayRecordSource.from_pattern(str(tmp_path / "nothing" / "*.array_record"))
  with pytest.raises(ValueError, match="Not a roclip_jax image-caption record"):
    array_record.decode_record(b"PK\x03\x04 something else")
  with pytest.raises(ValueError, match="--format=csv"):
    convert.convert(str(tmp_path / "data.parquet"), str(tmp_path / "o"), progress=False)
  config = config_lib.base_config()
  config.data.source = "array_record"
  with pytest.raises(config_lib.ConfigError, match="array_record_pattern.*is empty"):
    config_lib.validate(config)


# ---------------------------------------------------------------- training


@pytest.fixture()
def clean_dataset(tmp_path):
  """16 decodable 20x24 PNGs (no failures), so CSV index == ArrayRecord index."""
  root = tmp_path / "clean"
  root.mkdir()
  with open(root / "train.csv", "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(("image_path", "caption"))
    for i in range(16):
      (root / f"{i}.png").write_bytes(encode(smooth_image(100 + i, 20, 24), "PNG"))
      writer.writerow((f"{i}.png", f"a smooth picture number {i}"))
  out = tmp_path / "clean_shards"
  convert.convert(str(root / "train.csv"), str(out), image_size=16, shard_size=5, progress=False)
  return str(root / "train.csv"), str(out)


def tiny_config(**data):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 16
  c.data.update(data)
  c.data.batch_size = 8
  c.num_epochs, c.max_steps = 2, 3
  c.optim.warmup_steps = 1
  c.log_every_steps = 1
  c.progress_bar = False
  c.evals = ml_collections.ConfigDict()
  return c


def test_pipeline_from_shards_matches_the_csv_pipeline(clean_dataset):
  csv_path, shards = clean_dataset
  from_csv = pipeline.make_train_data(tiny_config(source="csv", csv_path=csv_path))
  from_shards = pipeline.make_train_data(tiny_config(source="array_record", array_record_pattern=shards))
  assert isinstance(from_shards.source, array_record.ArrayRecordSource)
  for a, b in zip(list(from_csv.iterator)[:4], list(from_shards.iterator)[:4]):
    np.testing.assert_array_equal(a["id"], b["id"])  # Same shuffle over the same indices.
    np.testing.assert_array_equal(a["text"], b["text"])
    assert a["image"].shape == b["image"].shape == (8, 16, 16, 3)
    # The shards hold a JPEG (q95, 4:2:0) of the 16-px-short-side resize; the CSV path resizes the
    # PNG. Compression costs a few levels; a one-pixel shift of these waves costs ~20.
    assert np.abs(a["image"].astype(float) - b["image"]).mean() < 6.0


def test_training_runs_from_shards(clean_dataset, tmp_path):
  _, shards = clean_dataset
  config = tiny_config(source="array_record", array_record_pattern=os.path.join(shards, "*.array_record"))
  result = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert result["step"] == 3
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    losses = [json.loads(line)["loss"] for line in f if '"train"' in line]
  assert len(losses) == 3 and all(np.isfinite(losses))
  assert isinstance(sources.make_source(config.data), array_record.ArrayRecordSource)
