"""Built-in demo dataset: deterministic, atomic, learnable captions/images."""

import csv
import json
import os
import re
import threading

import numpy as np
from PIL import Image
import pytest

from roclip_jax.data import demo

TINY = dict(num_classes=4, train_per_class=6, test_per_class=2, image_size=16, seed=0)


def _read_rows(root, split):
  with open(os.path.join(root, f"{split}.csv"), newline="") as f:
    return list(csv.DictReader(f))


def _tree_bytes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for name in files:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        out[os.path.relpath(path, root)] = f.read()
  return out


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
  return demo.ensure_demo_dataset(dict(TINY, root=str(tmp_path_factory.mktemp("d") / "demo")))


def test_generation_is_deterministic(tmp_path, tiny_root):
  again = demo.ensure_demo_dataset(dict(TINY, root=str(tmp_path / "again")))
  first, second = _tree_bytes(tiny_root), _tree_bytes(again)
  assert first.keys() == second.keys()
  assert all(first[k] == second[k] for k in first)
  assert len([k for k in first if k.endswith(".png")]) == 4 * (6 + 2)


def test_idempotent_and_rejects_other_params_at_same_root(tiny_root):
  params = os.path.join(tiny_root, "params.json")
  stamp = os.stat(params).st_mtime_ns
  assert demo.ensure_demo_dataset(dict(TINY, root=tiny_root)) == tiny_root
  assert os.stat(params).st_mtime_ns == stamp
  with pytest.raises(ValueError, match="config.data.demo.root"):
    demo.ensure_demo_dataset(dict(TINY, root=tiny_root, seed=1))


def test_default_root_depends_on_params(tmp_path, monkeypatch):
  monkeypatch.setenv("ROCLIP_DATA_DIR", str(tmp_path))
  a = demo.ensure_demo_dataset(dict(TINY, root=""))
  b = demo.ensure_demo_dataset(dict(TINY, root="", seed=3))
  assert a != b
  for root in (a, b):
    assert os.path.dirname(root) == str(tmp_path)
    assert os.path.basename(root).startswith("demo_v1")
  # No temporary directories are left behind.
  assert sorted(os.listdir(tmp_path)) == sorted([os.path.basename(a), os.path.basename(b)])


def test_concurrent_generation_is_safe(tmp_path):
  root = str(tmp_path / "raced")
  results, errors = [], []

  def generate():
    try:
      results.append(demo.ensure_demo_dataset(dict(TINY, root=root)))
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=generate) for _ in range(3)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results == [root] * 3
  assert os.listdir(tmp_path) == ["raced"]
  reference = demo.ensure_demo_dataset(dict(TINY, root=str(tmp_path / "r2")))
  assert _tree_bytes(root) == _tree_bytes(reference)


def test_splits_and_classes_file(tiny_root):
  with open(os.path.join(tiny_root, "classes.json")) as f:
    spec = json.load(f)
  names = spec["classes"]
  assert names == ["red circle", "green square", "blue triangle", "yellow star"]
  assert len(spec["templates"]) >= 8
  assert all("{}" in t for t in spec["templates"])
  train, test = _read_rows(tiny_root, "train"), _read_rows(tiny_root, "test")
  assert len(train) == 4 * 6 and len(test) == 4 * 2
  for rows, per_class in ((train, 6), (test, 2)):
    labels = [int(r["label"]) for r in rows]
    assert np.bincount(labels).tolist() == [per_class] * 4
  train_pixels = {Image.open(os.path.join(tiny_root, r["image_path"])).tobytes() for r in train}
  assert not any(
      Image.open(os.path.join(tiny_root, r["image_path"])).tobytes() in train_pixels for r in test
  ), "test split must be held out"


def test_captions_name_their_class_and_only_it(tmp_path):
  root = demo.ensure_demo_dataset(
      dict(num_classes=24, train_per_class=3, test_per_class=1, image_size=8, seed=5, root=str(tmp_path / "all"))
  )
  rows = _read_rows(root, "train")
  for row in rows:
    mentioned = [name for name in demo.CLASS_NAMES if re.search(rf"\b{name}\b", row["caption"])]
    assert mentioned == [demo.CLASS_NAMES[int(row["label"])]], row
  assert len({r["caption"] for r in rows}) > len(rows) // 2, "varied captions"
  assert len(demo.CAPTION_TEMPLATES) >= 20
  assert len(set(demo.CLASS_NAMES)) == 24


def _colour_votes(pixels):
  """Counts clearly red/green/blue/yellow pixels (a hand-written rule)."""
  r, g, b = (pixels[..., i].astype(int) for i in range(3))
  return {
      "red": int(((r > 150) & (g < 90) & (b < 90)).sum()),
      "green": int(((g > 130) & (r < 90) & (b < 100)).sum()),
      "blue": int(((b > 150) & (r < 90) & (g < 130)).sum()),
      "yellow": int(((r > 170) & (g > 160) & (b < 90)).sum()),
  }


def test_object_colour_matches_class_name(tmp_path):
  root = demo.ensure_demo_dataset(
      dict(num_classes=8, train_per_class=8, test_per_class=1, image_size=32, seed=2, root=str(tmp_path / "colours"))
  )
  rows = _read_rows(root, "train")
  for row in rows:
    pixels = np.asarray(Image.open(os.path.join(root, row["image_path"])))
    assert pixels.shape == (32, 32, 3) and pixels.dtype == np.uint8
    votes = _colour_votes(pixels)
    colour = demo.CLASS_NAMES[int(row["label"])].split()[0]
    assert max(votes, key=votes.get) == colour, (row, votes)
    assert votes[colour] >= 10, "object too small or too dull"


def test_rejects_bad_params(tmp_path):
  with pytest.raises(ValueError, match="num_classes"):
    demo.ensure_demo_dataset(dict(TINY, num_classes=25, root=str(tmp_path)))
  with pytest.raises(ValueError, match="image_size"):
    demo.ensure_demo_dataset(dict(TINY, image_size=4, root=str(tmp_path)))


def test_default_size_is_the_documented_one():
  # Generation speed is not a test's business (no timed tests); the default set's size is: 24 classes,
  # 250 training and 50 test images each. The row counts of a generated set are checked above on TINY.
  params = demo.generation_params({})
  assert (params["num_classes"], params["train_per_class"], params["test_per_class"]) == (24, 250, 50)


def test_possible_captions_hold_every_drawn_caption():
  # The tokenizer's test corpus claims to be every caption the generator can write.
  possible = set(demo.possible_captions())
  rng = np.random.default_rng(0)
  for i in range(1500):
    _, caption = demo.draw_example(i % len(demo.CLASS_NAMES), 8, rng)
    assert caption in possible, caption


# The handwritten-digits kind (`data.demo.kind='digits'`, the robustness benchmark's set).

DIGITS = dict(kind="digits", num_classes=10, train_per_class=30, test_per_class=10, image_size=32, seed=0)


def test_the_shapes_set_keeps_its_parameters_and_directory():
  """Adding `kind` changed nothing for the shapes set: same parameters, so the same cached directory."""
  assert demo.generation_params(dict(TINY, kind="shapes")) == demo.generation_params(TINY)
  assert "kind" not in demo.generation_params(TINY) and demo.generation_params(TINY)["version"] == "demo_v1"
  with pytest.raises(ValueError, match="kind"):
    demo.generation_params(dict(TINY, kind="letters"))
  with pytest.raises(ValueError, match="1..10"):
    demo.generation_params(dict(DIGITS, num_classes=11))


def _ink_masks(root, split):
  """Each image's pixels that stand out from its background (far from the image's median grey)."""
  rows = _read_rows(root, split)
  masks, labels = [], []
  for row in rows:
    grey = np.asarray(Image.open(os.path.join(root, row["image_path"])).convert("L"), np.float32)
    masks.append((np.abs(grey - np.median(grey)) > 40).astype(np.float32).ravel())
    labels.append(int(row["label"]))
  return np.stack(masks), np.asarray(labels), rows


def test_digits_captions_classes_and_shapes(tmp_path, monkeypatch):
  from roclip_jax.data import digits

  monkeypatch.setenv("ROCLIP_DATA_DIR", str(tmp_path))
  root = demo.ensure_demo_dataset(dict(DIGITS, root=""))
  assert os.path.basename(root).startswith("digits_v1")
  with open(os.path.join(root, "classes.json")) as f:
    spec = json.load(f)
  assert spec == {"classes": list(digits.CLASS_NAMES), "templates": list(digits.TEMPLATES)}
  train, train_labels, rows = _ink_masks(root, "train")
  possible = set(digits.possible_captions())
  for row in rows:  # Each caption names its digit and no other, and is one the generator can write.
    mentioned = [name for name in digits.CLASS_NAMES if re.search(rf"\b{name}\b", row["caption"])]
    assert mentioned == [digits.CLASS_NAMES[int(row["label"])]], row
    assert row["caption"] in possible
  # Paraphrased and often identical, as templated web captions are.
  assert len({r["caption"] for r in rows}) < len(rows)
  # Ink covers a digit-sized part of every image, and the digits are told apart by shape alone: a
  # nearest-centroid rule on the binarised ink (no learning beyond a mean) is far above chance (10%).
  coverage = train.mean(axis=1)
  assert coverage.min() > 0.03 and coverage.max() < 0.5
  test, test_labels, _ = _ink_masks(root, "test")
  centroids = np.stack([train[train_labels == c].mean(axis=0) for c in range(10)])
  predicted = np.argmin(((test[:, None, :] - centroids[None]) ** 2).sum(-1), axis=1)
  assert np.mean(predicted == test_labels) > 0.4
  # No two drawings are the same (the per-image jitter).
  assert len({m.tobytes() for m in train}) == len(train)
