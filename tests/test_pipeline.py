"""Sources, image ops and the grain train/eval pipelines."""

import csv
import io
import json
import os

import jax
import ml_collections
import numpy as np
from PIL import Image
import pytest

from roclip_jax.data import augment
from roclip_jax.data import demo
from roclip_jax.data import image_ops
from roclip_jax.data import pipeline
from roclip_jax.data import sources
from roclip_jax.data import tokenizer as tokenizer_lib

# Smaller than conftest's `demo_root` (helpers.DEMO): these tests count its 32 training and 12 test rows.
DEMO = dict(num_classes=4, train_per_class=8, test_per_class=3, image_size=16, seed=0)


@pytest.fixture(scope="module")
def small_demo_root(tmp_path_factory):
  """The demo dataset of this module's DEMO; named apart from conftest's `demo_root`, which it would
  otherwise shadow here with other data."""
  return demo.ensure_demo_dataset(dict(DEMO, root=str(tmp_path_factory.mktemp("demo") / "d")))


def make_config(small_demo_root, **data_overrides):
  num_epochs = data_overrides.pop("num_epochs", 2)
  augment = data_overrides.pop("augment", dict(image=False, text=False, text_resample_per_epoch=False))
  data = dict(
      source="demo",
      demo=dict(DEMO, root=small_demo_root),
      csv_path="",
      image_root="",
      image_key="image_path",
      caption_key="caption",
      label_key="label",
      delimiter=",",
      eval_csv="",
      classes_json="",
      batch_size=8,
      num_workers=0,
      prefetch_buffer=2,
  )
  data.update(data_overrides)
  return ml_collections.ConfigDict(
      dict(
          seed=0,
          num_epochs=num_epochs,
          data=data,
          model=dict(image=dict(image_size=16), text=dict(context_length=16)),
          augment=augment,
      )
  )


def collect(iterator, n=None):
  out = []
  for batch in iterator:
    out.append(batch)
    if n is not None and len(out) == n:
      break
  return out


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def assert_resumes_exactly(config, full, after, views=1):
  """A fresh iterator restored from another's state after `after` batches continues `full` exactly."""
  first = pipeline.make_train_data(config, views=views).iterator
  head = collect(first, after)
  resumed = pipeline.make_train_data(config, views=views).iterator
  resumed.set_state(first.get_state())
  assert_batches_equal(head + collect(resumed), full)


def write_png(path, seed, size=12):
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3))
  Image.fromarray(pixels.astype(np.uint8)).save(path)


def write_csv(path, rows, header=("image_path", "caption", "label"), delimiter=","):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f, delimiter=delimiter)
    writer.writerow(header)
    writer.writerows(rows)


# ------------------------------------------------------------- image ops


def test_decode_image_handles_modes_and_bad_files(tmp_path):
  grey = tmp_path / "grey.png"
  Image.fromarray(np.full((5, 7), 200, np.uint8), "L").save(grey)
  out = image_ops.decode_image(str(grey))
  assert out.shape == (5, 7, 3) and out.dtype == np.uint8 and (out == 200).all()

  rgba = np.zeros((4, 4, 4), np.uint8)
  rgba[..., 0], rgba[..., 3] = 255, 255
  buf = io.BytesIO()
  Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
  np.testing.assert_array_equal(image_ops.decode_image(buf.getvalue())[0, 0], [255, 0, 0])

  palette = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4), "L")
  palette = palette.convert("P")
  palette.info["transparency"] = 0
  palette.save(tmp_path / "p.png")
  assert image_ops.decode_image(str(tmp_path / "p.png")).shape == (4, 4, 3)

  jpeg = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3)).astype(np.uint8)).save(jpeg, format="JPEG")
  assert image_ops.decode_image(jpeg.getvalue()) is not None
  assert image_ops.decode_image(jpeg.getvalue()[: len(jpeg.getvalue()) // 2]) is None
  assert image_ops.decode_image(b"not an image") is None
  assert image_ops.decode_image(str(tmp_path / "missing.png")) is None


def test_decode_image_refuses_decompression_bombs(monkeypatch, tmp_path):
  path = tmp_path / "big.png"
  Image.new("RGB", (40, 30)).save(path)
  monkeypatch.setattr(image_ops, "MAX_IMAGE_PIXELS", 40 * 30 - 1)
  assert image_ops.decode_image(str(path)) is None


@pytest.mark.parametrize("transpose", [False, True])
def test_resize_center_crop_geometry(transpose):
  # 20 x 40: black quarter | white half | black quarter (along the width).
  image = np.zeros((20, 40, 3), np.uint8)
  image[:, 10:30] = 255
  if transpose:
    image = image.transpose(1, 0, 2)
  out = image_ops.resize_center_crop(image, 10)
  assert out.shape == (10, 10, 3) and out.dtype == np.uint8
  # Shorter side 20 -> 10 halves the long side to 20; the centre crop keeps
  # resized columns 5..14 = original 10..29, i.e. the white band (away from
  # the edges, which bicubic blurs).
  interior = out[:, 2:8] if not transpose else out[2:8, :]
  assert (interior > 250).all()
  same = np.full((10, 10, 3), 7, np.uint8)
  np.testing.assert_array_equal(image_ops.resize_center_crop(same, 10), same)
  with pytest.raises(ValueError, match="uint8"):
    image_ops.resize_center_crop(image.astype(np.float32), 10)


def test_normalize_numpy_and_jit():
  images = np.array([[[[0, 128, 255]]]], np.uint8)
  mean = np.array([0.48145466, 0.4578275, 0.40821073])
  std = np.array([0.26862954, 0.26130258, 0.27577711])
  expected = (np.array([0, 128, 255]) / 255 - mean) / std
  out = image_ops.normalize(images)
  assert out.dtype == np.float32 and out.shape == (1, 1, 1, 3)
  np.testing.assert_allclose(out[0, 0, 0], expected, rtol=1e-6)
  jitted = jax.jit(image_ops.normalize)(images)
  assert jitted.dtype == np.float32
  np.testing.assert_allclose(np.asarray(jitted)[0, 0, 0], expected, rtol=1e-6)


# --------------------------------------------------------------- sources


def test_csv_source_parses_quotes_tsv_and_optional_columns(tmp_path):
  (tmp_path / "imgs").mkdir()
  rows = [
      ("a.png", 'a "quoted", comma caption', "3"),
      ("b.png", "multi\nline caption", ""),
      ("/abs/c.png", "absolute path", "1"),
  ]
  write_csv(tmp_path / "data.tsv", rows, delimiter="\t")
  src = sources.CsvSource(str(tmp_path / "data.tsv"), image_root=str(tmp_path / "imgs"), delimiter="\t")
  assert len(src) == 3 and src.num_bad_rows == 0
  assert src[0] == {
      "id": 0,
      "image_path": str(tmp_path / "imgs" / "a.png"),
      "caption": 'a "quoted", comma caption',
      "label": 3,
      "poisoned": 0,
  }
  assert src[1]["caption"] == "multi\nline caption" and src[1]["label"] == -1
  assert src[2]["image_path"] == "/abs/c.png"
  assert isinstance(src[0]["id"], np.int64)
  assert isinstance(src[0]["poisoned"], np.int8)

  # Relative paths default to the CSV's directory; no label column -> -1.
  write_csv(tmp_path / "nolabel.csv", [("x.png", "cap", "1")], header=("path", "text", "poisoned"))
  src = sources.CsvSource(str(tmp_path / "nolabel.csv"), image_key="path", caption_key="text")
  assert src[0]["image_path"] == str(tmp_path / "x.png")
  assert src[0]["label"] == -1 and src[0]["poisoned"] == 1


def test_csv_source_drops_and_counts_bad_rows(tmp_path):
  write_csv(
      tmp_path / "d.csv", [("a.png", "ok", "0"), ("b.png", "   ", "0"), ("", "no image", "0"), ("c.png", "fine", "1")]
  )
  src = sources.CsvSource(str(tmp_path / "d.csv"))
  assert len(src) == 2 and src.num_bad_rows == 2
  assert [src[i]["caption"] for i in range(2)] == ["ok", "fine"]
  assert [src[i]["id"] for i in range(2)] == [0, 1]


def test_csv_source_errors_name_the_fix(tmp_path):
  write_csv(tmp_path / "d.csv", [("a.png", "cap", "x")])
  with pytest.raises(ValueError, match="image_key"):
    sources.CsvSource(str(tmp_path / "d.csv"), image_key="filepath")
  with pytest.raises(ValueError, match="caption_key"):
    sources.CsvSource(str(tmp_path / "d.csv"), caption_key="title")
  with pytest.raises(ValueError, match="not an integer"):
    sources.CsvSource(str(tmp_path / "d.csv"))
  with pytest.raises(FileNotFoundError, match="csv_path"):
    sources.CsvSource(str(tmp_path / "nope.csv"))


def test_make_source(small_demo_root):
  config = make_config(small_demo_root)
  assert len(sources.make_source(config.data, "train")) == 4 * 8
  assert len(sources.make_source(config.data, "test")) == 4 * 3
  config.data.source = "webdataset"
  with pytest.raises(ValueError, match=r"config\.data\.source.*'demo', 'csv'"):
    sources.make_source(config.data)
  config.data.source = "csv"
  with pytest.raises(ValueError, match=r"config\.data\.csv_path"):
    sources.make_source(config.data)


# ------------------------------------------------------------- training


def test_batch_shapes_dtypes_and_contents(small_demo_root):
  data = pipeline.make_train_data(make_config(small_demo_root))
  assert (data.steps_per_epoch, data.num_examples, data.local_batch_size) == (4, 32, 8)
  batches = collect(data.iterator)
  assert len(batches) == 2 * 4
  expected = {
      "image": (np.uint8, (8, 16, 16, 3)),
      "text": (np.int32, (8, 16)),
      "id": (np.int64, (8,)),
      "label": (np.int64, (8,)),
      "poisoned": (np.int8, (8,)),
      "skipped": (np.int32, (8,)),
  }
  for batch in batches:
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == expected
  # Contents follow the CSV row of each id: the raw PNG (16 px = model size,
  # so no resize), the label and the tokenized caption.
  with open(os.path.join(small_demo_root, "train.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  tok = tokenizer_lib.get_tokenizer(16)
  batch = batches[0]
  for i, example_id in enumerate(batch["id"]):
    row = rows[example_id]
    pixels = np.asarray(Image.open(os.path.join(small_demo_root, row["image_path"])))
    np.testing.assert_array_equal(batch["image"][i], pixels)
    assert batch["label"][i] == int(row["label"])
    np.testing.assert_array_equal(batch["text"][i], tok(row["caption"])[0])
  assert not any(b["skipped"].any() or b["poisoned"].any() for b in batches)


def test_every_epoch_is_a_fresh_permutation(small_demo_root):
  data = pipeline.make_train_data(make_config(small_demo_root, num_epochs=3))
  batches = collect(data.iterator)
  steps = data.steps_per_epoch
  epochs = [np.concatenate([b["id"] for b in batches[e * steps : (e + 1) * steps]]) for e in range(3)]
  for ids in epochs:
    assert sorted(ids.tolist()) == list(range(32))
  assert len({tuple(ids) for ids in epochs}) == 3
  assert not np.array_equal(epochs[0], np.arange(32)), "must be shuffled"
  # Same config -> same order (seeded).
  again = collect(pipeline.make_train_data(make_config(small_demo_root)).iterator)
  assert_batches_equal(again, batches[: len(again)])


def test_remainder_is_dropped_per_epoch(small_demo_root):
  data = pipeline.make_train_data(make_config(small_demo_root, batch_size=12, num_epochs=3))
  assert data.steps_per_epoch == 2  # 32 // 12
  batches = collect(data.iterator)
  assert len(batches) == 6
  for e in range(3):
    ids = np.concatenate([b["id"] for b in batches[2 * e : 2 * e + 2]])
    assert len(set(ids.tolist())) == 24  # No duplicates inside an epoch.


def test_host_slices_are_disjoint_and_covering(small_demo_root):
  for count in (1, 2, 3, 7):
    slices = [set(pipeline.host_example_indices(10, i, count).tolist()) for i in range(count)]
    assert set().union(*slices) == set(range(10))
    assert sum(len(s) for s in slices) == 10
  config = make_config(small_demo_root, num_epochs=1)
  seen = []
  for host in range(2):
    data = pipeline.make_train_data(config, process_index=host, process_count=2)
    assert data.local_batch_size == 4 and data.steps_per_epoch == 4
    batches = collect(data.iterator)
    assert all(b["id"].shape == (4,) for b in batches)
    seen.append(set(np.concatenate([b["id"] for b in batches]).tolist()))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(32))
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_data(make_config(small_demo_root, batch_size=9), process_count=2)


def test_uneven_host_slices_run_the_same_number_of_steps(tmp_path):
  for i in range(11):
    write_png(tmp_path / f"{i}.png", i)
  write_csv(tmp_path / "d.csv", [(f"{i}.png", f"caption {i}", i % 3) for i in range(11)])
  config = make_config("", source="csv", csv_path=str(tmp_path / "d.csv"), batch_size=4, num_epochs=2)
  counts = []
  for host in range(2):
    data = pipeline.make_train_data(config, process_index=host, process_count=2)
    counts.append((data.steps_per_epoch, len(collect(data.iterator))))
  assert counts == [(2, 4), (2, 4)]  # (11 // 2) // 2 = 2 steps per epoch.


def test_resume_from_state_equals_uninterrupted(small_demo_root):
  config = make_config(small_demo_root, batch_size=8, num_epochs=3)
  full = collect(pipeline.make_train_data(config).iterator)
  first = pipeline.make_train_data(config).iterator
  head = collect(first, 5)  # Stops inside the second epoch.
  state = json.loads(json.dumps(first.get_state()))  # As orbax stores it.
  resumed = pipeline.make_train_data(config).iterator
  resumed.set_state(state)
  assert_batches_equal(head + collect(resumed), full)


def test_workers_resume_and_match_in_process_output(small_demo_root):
  config = make_config(small_demo_root, num_epochs=2, num_workers=2)
  in_process = collect(pipeline.make_train_data(make_config(small_demo_root, num_epochs=2)).iterator)
  first = pipeline.make_train_data(config).iterator
  head = collect(first, 3)
  state = first.get_state()
  first.close()
  resumed = pipeline.make_train_data(config).iterator
  resumed.set_state(state)
  tail = collect(resumed)
  resumed.close()
  # Batching happens after the workers, so their number changes nothing.
  assert_batches_equal(head + tail, in_process)


def _corrupt_dataset(tmp_path, num_valid, num_missing, truncated=True, empty_caption=True):
  rows = []
  for i in range(num_valid):
    write_png(tmp_path / f"ok{i}.png", i)
    rows.append((f"ok{i}.png", f"a valid caption, number {i}", i % 2))
  if truncated:
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(9).integers(0, 256, (48, 48, 3)).astype(np.uint8)).save(jpeg, format="JPEG")
    (tmp_path / "cut.jpg").write_bytes(jpeg.getvalue()[:300])
    rows.append(("cut.jpg", "a truncated jpeg", 0))
  for i in range(num_missing):
    rows.append((f"missing{i}.png", "a file that is not there", 1))
  if empty_caption:
    write_png(tmp_path / "nocap.png", 99)
    rows.insert(3, ("nocap.png", "", 0))
  write_csv(tmp_path / "d.csv", rows)
  # Ids are positions after dropping the empty-caption row.
  kept = [r for r in rows if r[1]]
  bad_ids = {i for i, r in enumerate(kept) if not r[0].startswith("ok")}
  return str(tmp_path / "d.csv"), bad_ids, len(kept)


def test_corrupt_and_missing_images_are_skipped_and_counted(tmp_path):
  csv_path, bad_ids, num_rows = _corrupt_dataset(tmp_path, num_valid=12, num_missing=1)
  config = make_config("", source="csv", csv_path=csv_path, batch_size=4, num_epochs=2)
  data = pipeline.make_train_data(config)
  assert data.source.num_bad_rows == 1 and num_rows == 14
  assert data.steps_per_epoch == 3  # 14 // 4; the 2 spare slots absorb 2 skips.
  batches = collect(data.iterator)
  assert len(batches) == 2 * 3
  for e in range(2):
    epoch = batches[3 * e : 3 * e + 3]
    ids = np.concatenate([b["id"] for b in epoch]).tolist()
    assert sorted(ids) == sorted(set(range(num_rows)) - bad_ids)
    assert sum(int(b["skipped"].sum()) for b in epoch) == 2


def test_more_corrupt_images_than_spare_slots_keeps_epochs_exact(tmp_path):
  csv_path, bad_ids, num_rows = _corrupt_dataset(
      tmp_path, num_valid=6, num_missing=4, truncated=False, empty_caption=False
  )
  config = make_config("", source="csv", csv_path=csv_path, batch_size=4, num_epochs=3)
  data = pipeline.make_train_data(config)
  assert data.steps_per_epoch == 2  # 10 // 4, but only 6 images decode.
  full = collect(data.iterator)
  assert len(full) == 3 * 2
  valid = set(range(num_rows)) - bad_ids
  for e in range(3):
    epoch = full[2 * e : 2 * e + 2]
    ids = np.concatenate([b["id"] for b in epoch]).tolist()
    assert set(ids) == valid  # All 6 valid, plus 2 re-read ones.
    assert sum(int(b["skipped"].sum()) for b in epoch) == 4
  # Resuming right before a topped-up batch reproduces it.
  assert_resumes_exactly(config, full, after=3)


def test_image_transform_sees_record_and_raw_image(small_demo_root):
  calls = []

  def paint_label_zero_white(record, image):
    calls.append((set(record), image.shape))
    return np.full_like(image, 255) if record["label"] == 0 else image

  data = pipeline.make_train_data(make_config(small_demo_root, num_epochs=1), image_transform=paint_label_zero_white)
  batches = collect(data.iterator)
  assert calls and all(
      keys == {"id", "image_path", "caption", "label", "poisoned"} and shape == (16, 16, 3) for keys, shape in calls
  )
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert (images[labels == 0] == 255).all()
  assert not (images[labels != 0] == 255).all(axis=(1, 2, 3)).any()


def test_custom_source_is_used(small_demo_root):
  base = sources.make_source(make_config(small_demo_root).data)

  class Flagged:

    def __len__(self):
      return len(base)

    def __getitem__(self, i):
      return dict(base[i], poisoned=np.int8(i % 2))

  data = pipeline.make_train_data(make_config(small_demo_root, num_epochs=1), source=Flagged())
  for batch in collect(data.iterator):
    np.testing.assert_array_equal(batch["poisoned"], batch["id"] % 2)


# ------------------------------------------------------------------ eval


def test_eval_arrays_for_demo_split(small_demo_root):
  config = make_config(small_demo_root)
  config.model.image.image_size = 8  # Forces resize + centre crop.
  ev = pipeline.make_eval_arrays(config)
  assert ev.images.shape == (12, 8, 8, 3) and ev.images.dtype == np.uint8
  with open(os.path.join(small_demo_root, "test.csv"), newline="") as f:
    rows = list(csv.DictReader(f))
  np.testing.assert_array_equal(ev.labels, [int(r["label"]) for r in rows])
  assert ev.captions == [r["caption"] for r in rows]
  np.testing.assert_array_equal(ev.ids, np.arange(12))
  assert ev.class_names == list(demo.CLASS_NAMES[:4])
  assert ev.templates == list(demo.TEMPLATES) and ev.num_skipped == 0
  raw = np.asarray(Image.open(os.path.join(small_demo_root, rows[0]["image_path"])))
  np.testing.assert_array_equal(ev.images[0], np.asarray(Image.fromarray(raw).resize((8, 8), Image.Resampling.BICUBIC)))


def test_eval_arrays_from_csv_skip_corrupt(tmp_path, small_demo_root):
  csv_path, bad_ids, num_rows = _corrupt_dataset(tmp_path, num_valid=5, num_missing=1)
  with open(tmp_path / "classes.json", "w") as f:
    json.dump({"classes": ["zero", "one"]}, f)
  config = make_config(small_demo_root, source="csv", eval_csv=csv_path, classes_json=str(tmp_path / "classes.json"))
  ev = pipeline.make_eval_arrays(config)
  assert ev.num_skipped == 2 and len(ev.labels) == num_rows - 2 == 5
  assert not set(ev.ids.tolist()) & bad_ids
  assert ev.class_names == ["zero", "one"] and ev.templates
  with open(tmp_path / "classes.json", "w") as f:
    json.dump({"classes": ["zero"]}, f)
  with pytest.raises(ValueError, match="label"):
    pipeline.make_eval_arrays(config)
  config.data.eval_csv = ""
  with pytest.raises(ValueError, match=r"config\.data\.eval_csv"):
    pipeline.make_eval_arrays(config)


# ---------------------------------------------------------- augmentation


def _augment_config(**overrides):
  from roclip_jax.data import augment  # pylint: disable=g-import-not-at-top

  cfg = augment.default_config()
  cfg.update(dict(image=True, text=True), **overrides)
  return cfg


def _per_epoch_by_id(batches, steps, key):
  epochs = []
  for e in range(len(batches) // steps):
    chunk = batches[e * steps : (e + 1) * steps]
    ids = np.concatenate([b["id"] for b in chunk])
    values = np.concatenate([b[key] for b in chunk])
    epochs.append({int(i): v for i, v in zip(ids, values)})
  return epochs


def test_augmentation_varies_per_epoch_and_resumes_exactly(small_demo_root):
  config = make_config(small_demo_root, num_epochs=2, augment=_augment_config())
  config.model.image.image_size = 12
  data = pipeline.make_train_data(config)
  full = collect(data.iterator)
  assert full[0]["image"].shape == (8, 12, 12, 3)
  images = _per_epoch_by_id(full, data.steps_per_epoch, "image")
  texts = _per_epoch_by_id(full, data.steps_per_epoch, "text")
  # New random crops/jitter every epoch; one fixed EDA caption per example.
  assert all(not np.array_equal(images[0][i], images[1][i]) for i in range(32))
  assert all(np.array_equal(texts[0][i], texts[1][i]) for i in range(32))
  tok = tokenizer_lib.get_tokenizer(16)
  clean = sources.make_source(config.data)
  assert (
      sum(not np.array_equal(texts[0][i], tok(clean[i]["caption"])[0]) for i in range(32)) > 16
  ), "EDA should change most captions"

  assert_resumes_exactly(config, full, after=3)


def test_text_augmentation_can_resample_each_epoch(small_demo_root):
  config = make_config(
      small_demo_root, num_epochs=2, augment=_augment_config(image=False, text_resample_per_epoch=True)
  )
  data = pipeline.make_train_data(config)
  texts = _per_epoch_by_id(collect(data.iterator), data.steps_per_epoch, "text")
  changed = sum(not np.array_equal(texts[0][i], texts[1][i]) for i in range(32))
  assert changed > 8


# ------------------------------------------------------------- two views


def _demo_rows(small_demo_root):
  with open(os.path.join(small_demo_root, "train.csv"), newline="") as f:
    return list(csv.DictReader(f))


def test_views_must_be_one_or_two(small_demo_root):
  with pytest.raises(ValueError, match=r"views=3.*1.*2"):
    pipeline.make_train_data(make_config(small_demo_root), views=3)
  assert pipeline.batch_keys(1) == pipeline.BATCH_KEYS
  assert pipeline.batch_keys(2) == pipeline.BATCH_KEYS + ("image2", "text2")


def test_one_view_batches_have_no_second_view(small_demo_root):
  # An explicit views=1 is the same as the default.
  old = collect(pipeline.make_train_data(make_config(small_demo_root)).iterator, 2)
  new = collect(pipeline.make_train_data(make_config(small_demo_root), views=1).iterator, 2)
  assert_batches_equal(old, new)
  assert set(new[0]) == set(pipeline.BATCH_KEYS)


def test_two_views_plain_first_view_augmented_second(small_demo_root):
  from roclip_jax.data import eda  # pylint: disable=g-import-not-at-top

  aug = _augment_config(image=False, text=False)
  config = make_config(small_demo_root, num_epochs=2, augment=aug)
  one_view = collect(pipeline.make_train_data(make_config(small_demo_root, num_epochs=2, augment=aug)).iterator)
  data = pipeline.make_train_data(config, views=2)
  full = collect(data.iterator)
  assert len(full) == 2 * data.steps_per_epoch
  for batch in full:
    assert batch["image2"].dtype == np.uint8
    assert batch["image2"].shape == (8, 16, 16, 3)
    assert batch["text2"].dtype == np.int32 and batch["text2"].shape == (8, 16)
  # View 1 is exactly what views=1 gives.
  for a, b in zip(full, one_view):
    for key in pipeline.BATCH_KEYS:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)

  rows = _demo_rows(small_demo_root)
  tok = tokenizer_lib.get_tokenizer(16)
  batch = full[0]
  for i, example_id in enumerate(batch["id"]):
    row = rows[example_id]
    pixels = np.asarray(Image.open(os.path.join(small_demo_root, row["image_path"])))
    plain = image_ops.resize_center_crop(pixels, 16)
    np.testing.assert_array_equal(batch["image"][i], plain)
    assert not np.array_equal(batch["image2"][i], plain)
    np.testing.assert_array_equal(batch["text"][i], tok(row["caption"])[0])
  # text2 is EDA under the view-2 stream [seed, 5, id], recomputed here.
  eda_changed = 0
  for batch in full[:2]:
    for i, example_id in enumerate(batch["id"][:4]):
      caption = rows[example_id]["caption"]
      expected = eda.eda(caption, np.random.default_rng([0, 5, int(example_id)]), aug)
      np.testing.assert_array_equal(batch["text2"][i], tok(expected)[0])
      eda_changed += expected != caption
  assert eda_changed > 0
  # image2 changes across epochs (keyed by stream position), text2 does not.
  images2 = _per_epoch_by_id(full, data.steps_per_epoch, "image2")
  texts2 = _per_epoch_by_id(full, data.steps_per_epoch, "text2")
  assert all(not np.array_equal(images2[0][i], images2[1][i]) for i in range(32))
  assert all(np.array_equal(texts2[0][i], texts2[1][i]) for i in range(32))

  # Deterministic across fresh iterators, and resumes exactly.
  assert_batches_equal(collect(pipeline.make_train_data(config, views=2).iterator), full)
  first = pipeline.make_train_data(config, views=2).iterator
  head = collect(first, 5)
  state = json.loads(json.dumps(first.get_state()))
  resumed = pipeline.make_train_data(config, views=2).iterator
  resumed.set_state(state)
  assert_batches_equal(head + collect(resumed), full)


@pytest.mark.parametrize("placement", ["host", "device"])
def test_plain_views_are_the_examples_before_augmentation(small_demo_root, placement):
  """`plain_views`: `image_plain` is CLIP's eval crop of the same trigger-stamped image and `text_plain`
  the caption before EDA, recomputed from the files; every other key is what the batch holds without
  them, and the stream resumes exactly."""
  aug = _augment_config(placement=placement)

  def paint_label_zero_white(record, image):
    return np.full_like(image, 255) if record["label"] == 0 else image

  config = make_config(small_demo_root, num_epochs=2, augment=aug)
  make = lambda plain: pipeline.make_train_data(config, image_transform=paint_label_zero_white, plain_views=plain)
  without, data = collect(make(False).iterator), make(True)
  full = collect(data.iterator)
  assert set(full[0]) == set(pipeline.batch_keys(1, augment.device_views(aug, 1), plain_views=True))
  assert set(full[0]) - set(without[0]) == set(pipeline.PLAIN_KEYS)
  for a, b in zip(full, without):
    for key in b:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  rows = _demo_rows(small_demo_root)
  tok = tokenizer_lib.get_tokenizer(16)
  augmented_text = 0
  for batch in full[:2]:
    for i, example_id in enumerate(batch["id"]):
      row = rows[example_id]
      pixels = np.asarray(Image.open(os.path.join(small_demo_root, row["image_path"])).convert("RGB"))
      pixels = paint_label_zero_white(dict(row, label=int(row["label"])), pixels)
      np.testing.assert_array_equal(batch["image_plain"][i], image_ops.resize_center_crop(pixels, 16))
      np.testing.assert_array_equal(batch["text_plain"][i], tok(row["caption"])[0])
      augmented_text += not np.array_equal(batch["text"][i], batch["text_plain"][i])
  assert augmented_text > 0  # The trained caption is EDA'd, the plain one is not.
  head_iterator = make(True).iterator
  head = collect(head_iterator, 3)
  resumed = make(True).iterator
  resumed.set_state(json.loads(json.dumps(head_iterator.get_state())))
  assert_batches_equal(head + collect(resumed), full)


def test_two_augmented_views_differ_and_share_the_transform(small_demo_root):
  aug = _augment_config(text_resample_per_epoch=True)

  def paint_label_zero_white(record, image):
    return np.full_like(image, 255) if record["label"] == 0 else image

  config = make_config(small_demo_root, num_epochs=2, augment=aug)
  data = pipeline.make_train_data(config, views=2, image_transform=paint_label_zero_white)
  full = collect(data.iterator)
  images = np.concatenate([b["image"] for b in full])
  images2 = np.concatenate([b["image2"] for b in full])
  labels = np.concatenate([b["label"] for b in full])
  # (Two augmentations of an all-white image may coincide; others differ.)
  assert all(not np.array_equal(a, b) for a, b in zip(images[labels != 0], images2[labels != 0]))
  # The poisoning hook runs before both views are augmented (a white image
  # stays one grey level: jitter, crop and blur keep it uniform).
  for view in (images, images2):
    white = view[labels == 0]
    assert (white == white[:, :1, :1, :1]).all()
    assert not (view[labels != 0] == view[labels != 0][:, :1, :1, :1]).all(axis=(1, 2, 3)).any()
  texts = _per_epoch_by_id(full, data.steps_per_epoch, "text")
  texts2 = _per_epoch_by_id(full, data.steps_per_epoch, "text2")
  assert sum(not np.array_equal(texts[0][i], texts2[0][i]) for i in range(32)) > 8
  assert sum(not np.array_equal(texts2[0][i], texts2[1][i]) for i in range(32)) > 8


def test_two_views_survive_top_up(tmp_path):
  csv_path, bad_ids, num_rows = _corrupt_dataset(
      tmp_path, num_valid=6, num_missing=4, truncated=False, empty_caption=False
  )
  config = make_config(
      "", source="csv", csv_path=csv_path, batch_size=4, num_epochs=2, augment=_augment_config(image=False, text=False)
  )
  full = collect(pipeline.make_train_data(config, views=2).iterator)
  assert len(full) == 2 * 2
  for batch in full:
    assert batch["image2"].shape == (4, 16, 16, 3)
    assert batch["text2"].shape == (4, 16)
    assert not set(batch["id"].tolist()) & bad_ids
  assert_resumes_exactly(config, full, after=1, views=2)


# --------------------------------------------------------------- scoring


def test_scoring_batches_cover_host_slices_in_order(small_demo_root):
  config = make_config(small_demo_root)
  config.model.image.image_size = 8
  source = sources.make_source(config.data)
  rows = _demo_rows(small_demo_root)
  tok = tokenizer_lib.get_tokenizer(16)
  seen = []
  for host in range(3):  # 32 ids over 3 hosts: 11, 11, 10.
    it = pipeline.scoring_batches(config, source, batch_size=4, process_index=host, process_count=3)
    batches = list(it)
    assert len(batches) == it.num_batches == 3  # ceil(ceil(32 / 3) / 4).
    assert it.num_skipped == 0
    for batch in batches:
      assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
          "image": (np.uint8, (4, 8, 8, 3)),
          "text": (np.int32, (4, 16)),
          "id": (np.int64, (4,)),
          "poisoned": (np.int8, (4,)),
          "valid": (np.bool_, (4,)),
          "caption": (np.object_, (4,)),
      }
      assert (batch["caption"][~batch["valid"]] == "").all()
    valid = np.concatenate([b["valid"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    expected = list(range(host, 32, 3))
    assert ids[valid].tolist() == expected
    assert valid[: len(expected)].all() and not valid[len(expected) :].any()
    assert (ids[~valid] == -1).all()
    last = batches[-1]
    assert (last["image"][~last["valid"]] == 0).all()
    assert (last["text"][~last["valid"]] == 0).all()
    for batch in batches:
      for i in np.flatnonzero(batch["valid"]):
        row = rows[batch["id"][i]]
        pixels = np.asarray(Image.open(os.path.join(small_demo_root, row["image_path"])))
        np.testing.assert_array_equal(
            batch["image"][i], np.asarray(Image.fromarray(pixels).resize((8, 8), Image.Resampling.BICUBIC))
        )
        np.testing.assert_array_equal(batch["text"][i], tok(row["caption"])[0])
        assert batch["caption"][i] == row["caption"]
    seen.append(set(ids[valid].tolist()))
  assert sum(len(s) for s in seen) == 32 and set().union(*seen) == set(range(32))


def test_scoring_batches_transform_and_corrupt_images(tmp_path):
  csv_path, bad_ids, num_rows = _corrupt_dataset(tmp_path, num_valid=8, num_missing=2)
  config = make_config("", source="csv", csv_path=csv_path)
  source = sources.make_source(config.data)
  assert num_rows == 11 and len(bad_ids) == 3

  def white_if_odd(record, image):
    return np.full_like(image, 255) if record["id"] % 2 else image

  counts, seen = [], set()
  for host in range(2):  # 6 and 5 ids: 2 batches of 4 on both hosts.
    it = pipeline.scoring_batches(
        config, source, batch_size=4, image_transform=white_if_odd, process_index=host, process_count=2
    )
    batches = list(it)
    counts.append(len(batches))
    valid = np.concatenate([b["valid"] for b in batches])
    ids = np.concatenate([b["id"] for b in batches])
    images = np.concatenate([b["image"] for b in batches])
    poisoned = np.concatenate([b["poisoned"] for b in batches])
    host_ids = set(range(host, num_rows, 2))
    assert set(ids[valid].tolist()) == host_ids - bad_ids
    assert it.num_skipped == len(host_ids & bad_ids)
    assert (images[valid & (ids % 2 == 1)] == 255).all()
    assert not (images[valid & (ids % 2 == 0)] == 255).all(axis=(1, 2, 3)).any()
    assert (poisoned[~valid] == 0).all() and (ids[~valid] == -1).all()
    seen |= set(ids[valid].tolist())
  assert counts == [2, 2]
  assert seen == set(range(num_rows)) - bad_ids


# ------------------------------------------------- augmentation placement


def test_host_placement_is_unchanged(small_demo_root):
  # placement='host' (the default) is the host augmentation bit for bit, and a config from before the
  # field existed reads the same batches.
  from roclip_jax.data import augment  # pylint: disable=g-import-not-at-top

  legacy = _augment_config()
  del legacy["placement"], legacy["device_source_size"]
  explicit = _augment_config(placement="host")
  batches = collect(pipeline.make_train_data(make_config(small_demo_root, augment=explicit), views=2).iterator, 2)
  assert_batches_equal(
      batches, collect(pipeline.make_train_data(make_config(small_demo_root, augment=legacy), views=2).iterator, 2)
  )
  assert set(batches[0]) == set(pipeline.batch_keys(2))
  loader = pipeline._ExampleLoader(  # pylint: disable=protected-access
      sources.make_source(make_config(small_demo_root).data),
      epoch_length=32,
      image_size=16,
      context_length=16,
      seed=0,
      process_index=0,
      augment_cfg=explicit,
      image_transform=None,
  )
  raw = np.asarray(
      Image.open(os.path.join(small_demo_root, _demo_rows(small_demo_root)[3]["image_path"])).convert("RGB")
  )
  key = pipeline._derived_seed(0, 2, 0, bits=64)  # pylint: disable=protected-access  # (seed, image tag, host)
  expected = augment.augment_image(raw, np.random.Generator(np.random.Philox(key=(key << 64) | 7)), explicit, 16)
  np.testing.assert_array_equal(loader(7, 3)["image"], expected)


def test_device_placement_delivers_the_host_draws(small_demo_root):
  from roclip_jax.data import augment  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  # The demo images are 16 px: a delivered size of 16 makes the resize the identity, so the device's
  # pixels must be the host's up to rounding if, and only if, both used the same draws.
  device_cfg = _augment_config(placement="device", device_source_size=16)
  host_batches = collect(
      pipeline.make_train_data(make_config(small_demo_root, augment=_augment_config()), views=2).iterator
  )
  data = pipeline.make_train_data(make_config(small_demo_root, augment=device_cfg), views=2)
  device_batches = collect(data.iterator)
  assert set(device_batches[0]) == set(pipeline.batch_keys(2, ("image", "image2")))
  for host, device in zip(host_batches, device_batches):
    for view in ("image", "image2"):
      params = device[augment.params_key(view)]
      assert params.shape == (8, augment.NUM_PACKED) and params.dtype == np.float32
      out = np.asarray(augment.apply_packed_batch_jax(jnp.asarray(device[view]), jnp.asarray(params), 16))
      diff = np.abs(out - host[view])
      # Rounding amplified by the colour ops, as in test_augment's same-draws test.
      assert diff.max() <= 6.0 and diff.mean() < 0.6, view
    for key in ("text", "text2", "id", "label", "poisoned", "skipped"):
      np.testing.assert_array_equal(host[key], device[key])
  # Deterministic (stream position, as on the host) and resumable.
  assert_batches_equal(
      collect(pipeline.make_train_data(make_config(small_demo_root, augment=device_cfg), views=2).iterator),
      device_batches,
  )
  assert_resumes_exactly(make_config(small_demo_root, augment=device_cfg), device_batches, after=3, views=2)

  # Default size round(16 * 8 / 7) = 18: the whole image resized; a plain first view stays the eval crop.
  plain_first = _augment_config(image=False, text=False, placement="device")
  batch = collect(pipeline.make_train_data(make_config(small_demo_root, augment=plain_first), views=2).iterator, 1)[0]
  assert set(batch) == set(pipeline.batch_keys(2, ("image2",)))
  assert batch["image"].shape == (8, 16, 16, 3) and batch["image2"].shape == (8, 18, 18, 3)
  rows = _demo_rows(small_demo_root)
  for i, example_id in enumerate(batch["id"][:3]):
    raw = np.asarray(Image.open(os.path.join(small_demo_root, rows[example_id]["image_path"])).convert("RGB"))
    np.testing.assert_array_equal(batch["image2"][i], np.asarray(Image.fromarray(raw).resize((18, 18), Image.BICUBIC)))
    np.testing.assert_array_equal(batch["image"][i], image_ops.resize_center_crop(raw, 16))
  with pytest.raises(ValueError, match=r"placement='tpu'"):
    pipeline.make_train_data(make_config(small_demo_root, augment=_augment_config(placement="tpu")))
