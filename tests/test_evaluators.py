"""Tests of roclip_jax/evaluators: metrics of a fake encoder with hand-designed embeddings.

The fake encoder reads an image's index from two pixels (index = p[0,0,0] + 256 * p[0,1,0]) and
looks its embedding up in a table; texts are looked up by the class name they contain. Expected
metrics are worked out by hand in the comments.
"""

import dataclasses
import os
import re

import jax
import ml_collections
import numpy as np
import pytest
import scipy.optimize
from PIL import Image

from roclip_jax import evaluators
from roclip_jax.data import pipeline
from roclip_jax.data import poison
from roclip_jax.evaluators import attack
from roclip_jax.evaluators import common
from roclip_jax.evaluators import datasets
from roclip_jax.evaluators import linear_probe
from roclip_jax.evaluators import retrieval
from roclip_jax.data import templates as templates_lib
from roclip_jax.evaluators import zeroshot

SIDE = 8
EIGHT = ["ant", "bee", "cat", "dog", "eel", "fox", "gnu", "hen"]  # class c at c * 45 degrees


def unit(degrees: float) -> np.ndarray:
  return np.array([np.cos(np.radians(degrees)), np.sin(np.radians(degrees))])


def image_of(index: int) -> np.ndarray:
  img = np.zeros((SIDE, SIDE, 3), np.uint8)
  img[0, 0, 0], img[0, 1, 0] = index % 256, index // 256
  return img


def index_of(img: np.ndarray) -> int:
  return int(img[0, 0, 0]) + 256 * int(img[0, 1, 0])


class FakeEncoder:
  """Image i -> image_fn(img); text -> text_fn(text); features -> feature_table[i]."""

  def __init__(self, image_fn=None, text_fn=None, feature_table=None):
    self._image_fn, self._text_fn, self._features = image_fn, text_fn, feature_table
    self.texts, self.image_batches = [], []

  def encode_images(self, images):
    self.image_batches.append(np.array(images))
    return common.l2_normalize(np.stack([self._image_fn(img) for img in images]))

  def image_features(self, images):
    return self._features[[index_of(img) for img in images]]

  def encode_texts(self, texts):
    self.texts.extend(texts)
    return common.l2_normalize(np.stack([self._text_fn(t) for t in texts]))


def prompt_angles(class_angles: dict[str, float], template_offsets=None):
  """text_fn: a prompt points at its class's angle plus its template's offset (by prefix)."""
  offsets = template_offsets or {}

  def text_fn(text):
    name = next(c for c in class_angles if re.search(rf"\b{c}\b", text))
    offset = next((d for prefix, d in offsets.items() if text.startswith(prefix)), 0.0)
    return unit(class_angles[name] + offset)

  return text_fn


def angle_encoder(image_angles, class_angles: dict[str, float], template_offsets=None):
  """Image i at image_angles[i] degrees; prompts as in `prompt_angles`."""
  return FakeEncoder(
      image_fn=lambda img: unit(image_angles[index_of(img)]), text_fn=prompt_angles(class_angles, template_offsets)
  )


def eval_set(labels, class_names, templates=("a photo of a {}.",), captions=None, first=0):
  n = len(labels)
  return pipeline.EvalSet(
      images=np.stack([image_of(first + i) for i in range(n)]),
      labels=np.asarray(labels, np.int64),
      captions=list(captions or [f"caption {i}" for i in range(n)]),
      ids=np.arange(first, first + n, dtype=np.int64),
      class_names=list(class_names),
      templates=list(templates),
  )


# ----------------------------------------------------------------------------- ranking


def test_ties_count_against_the_target():
  scores = np.array([[1.0, 1.0, 0.0], [0.2, 0.5, 0.1]])
  np.testing.assert_array_equal(common.rank_of_target(scores, np.array([0, 1])), [1, 0])
  np.testing.assert_array_equal(common.topk_hits(scores, np.array([0, 0]), 1), [False, False])
  np.testing.assert_array_equal(common.topk_hits(scores, np.array([0, 0]), 2), [True, True])


# ---------------------------------------------------------------------------- zero-shot


def test_zeroshot_top1_top5_by_hand():
  # Classes at 0, 45, ..., 315 degrees. The two templates put a prompt 30 degrees either side of
  # its class, so only the normalised template average points at the class itself.
  #   image 0 at   5, label 0 (  0): top-1.
  #   image 1 at  50, label 1 ( 45): top-1.
  #   image 2 at 100, label 1 ( 45): 90 and 135 are closer -> rank 2: top-5 only.
  #   image 3 at 200, label 0 (  0): all 7 other classes are closer -> rank 7: neither.
  #   image 4 at 181, label 4 (180): top-1.
  # top1 = 3/5, top5 = 4/5.
  encoder = angle_encoder(
      [5, 50, 100, 200, 181], {c: 45 * i for i, c in enumerate(EIGHT)}, {"a photo": 30.0, "art of": -30.0}
  )
  data = eval_set([0, 1, 1, 0, 4], EIGHT, templates=("a photo of a {}.", "art of the {}."))
  ev = zeroshot.ZeroShotEvaluator("zs", every_steps=0, load_split=lambda: data, templates="dataset")
  assert ev.run(encoder) == pytest.approx({"zs/top1": 0.6, "zs/top5": 0.8})
  assert len(encoder.texts) == 16


def test_zeroshot_imagenet80_prompts_and_top5_clipped_to_the_classes():
  # 3 classes: top-5 is top-3, which every image reaches.
  classes = ["ant", "bee", "cat"]
  encoder = angle_encoder([0, 200, 130], {"ant": 0, "bee": 120, "cat": 240})
  data = eval_set([0, 1, 2], classes)  # 200 is nearest to cat (240): image 1 misses top-1
  ev = zeroshot.ZeroShotEvaluator("zeroshot", every_steps=0, load_split=lambda: data)
  assert ev.run(encoder) == pytest.approx({"zeroshot/top1": 1 / 3, "zeroshot/top5": 1.0})
  expected = {t.format(c) for c in classes for t in templates_lib.OPENAI_IMAGENET_TEMPLATES}
  assert len(encoder.texts) == 240 and set(encoder.texts) == expected
  assert len(templates_lib.OPENAI_IMAGENET_TEMPLATES) == 80
  assert templates_lib.OPENAI_IMAGENET_TEMPLATES[0] == "a bad photo of a {}."
  assert templates_lib.OPENAI_IMAGENET_TEMPLATES[-1] == "a tattoo of the {}."


# ---------------------------------------------------------------------------- retrieval


def _table_encoder(image_table, text_table):
  return FakeEncoder(image_fn=lambda img: image_table[index_of(img)], text_fn=lambda t: text_table[int(t.split()[-1])])


def test_retrieval_recall_by_hand():
  # Images are one-hot, so similarity[i, j] = text_j[i]:
  #   i0: [1, .8, 0, 0]    i1: [0, .6, 0, 0]    i2: [0, 0, .6, .8]    i3: [0, 0, .8, .6]
  # image->text: i0, i1 rank first; i2, i3 second      -> R@1 = 2/4
  # text->image: t0 first; t1 (.6 < .8), t2, t3 second  -> R@1 = 1/4
  texts = np.array([[1, 0, 0, 0], [0.8, 0.6, 0, 0], [0, 0, 0.6, 0.8], [0, 0, 0.8, 0.6]])
  data = eval_set([0] * 4, ["x"], captions=[f"text {i}" for i in range(4)])
  ev = retrieval.RetrievalEvaluator("ret", every_steps=0, load_split=lambda: data)
  assert ev.run(_table_encoder(np.eye(4), texts)) == pytest.approx(
      {
          "ret/i2t_r1": 0.5,
          "ret/t2i_r1": 0.25,
          "ret/i2t_r5": 1.0,
          "ret/t2i_r5": 1.0,
          "ret/i2t_r10": 1.0,
          "ret/t2i_r10": 1.0,
      }
  )


def test_retrieval_matches_brute_force_ranks():
  rng = np.random.default_rng(0)
  n = 14
  images, texts = rng.normal(size=(n, 3)), rng.normal(size=(n, 3))
  images /= np.linalg.norm(images, axis=1, keepdims=True)
  texts /= np.linalg.norm(texts, axis=1, keepdims=True)
  sim = images @ texts.T
  expected = {}
  for k in (1, 5, 10):
    i2t = [sum(sim[i, j] >= sim[i, i] for j in range(n) if j != i) < k for i in range(n)]
    t2i = [sum(sim[j, i] >= sim[i, i] for j in range(n) if j != i) < k for i in range(n)]
    expected[f"r/i2t_r{k}"], expected[f"r/t2i_r{k}"] = np.mean(i2t), np.mean(t2i)
  data = eval_set([0] * n, ["x"], captions=[f"text {i}" for i in range(n)])
  ev = retrieval.RetrievalEvaluator("r", every_steps=0, load_split=lambda: data)
  got = ev.run(_table_encoder(images, texts))
  assert got == pytest.approx(expected)
  assert 0 < got["r/i2t_r1"] < got["r/i2t_r10"] < 1  # the example exercises every k


def test_retrieval_of_a_collapsed_model_is_zero():
  data = eval_set([0] * 6, ["x"], captions=[f"text {i}" for i in range(6)])
  ev = retrieval.RetrievalEvaluator("r", every_steps=0, load_split=lambda: data, ks=(1, 5))
  same = FakeEncoder(image_fn=lambda img: unit(0), text_fn=lambda t: unit(0))
  assert ev.run(same) == {"r/i2t_r1": 0.0, "r/t2i_r1": 0.0, "r/i2t_r5": 0.0, "r/t2i_r5": 0.0}


# ------------------------------------------------------------------------------ attacks

COMPASS = ["north", "east", "south", "west"]  # at 0, 90, 180, 270 degrees


def _backdoor_cfg(**backdoor):
  cfg = poison.default_config()
  cfg.enabled = True
  cfg.backdoor.update(dict(enabled=True, target_class="south", **backdoor))
  return cfg


def test_backdoor_asr_by_hand():
  # A yellow 2x2 patch in the bottom-right corner sends an image to "south" (180), unless the
  # image is marked resistant (pixel [1, 0, 0] = 1).
  #   image  label  clean angle  resistant | clean pred  triggered pred
  #     0    north      10          no     |   north        south
  #     1    east       80          no     |   east         south
  #     2    south     180          -      |   (target class: left out)
  #     3    west      260          yes    |   west         west
  #     4    north     170          no     |   south        south
  #     5    south     185          -      |   (left out)
  # ASR = 3/4, clean top-1 = 3/4, clean images already called "south" = 1/4.
  angles = [10, 80, 180, 260, 170, 185]

  def image_fn(img):
    stamped = np.all(img[SIDE - 2 :, SIDE - 2 :] == [255, 255, 0])
    return unit(180) if stamped and img[1, 0, 0] == 0 else unit(angles[index_of(img)])

  data = eval_set([0, 1, 2, 3, 0, 2], COMPASS)
  data.images[3, 1, 0, 0] = 1
  classes = {c: 90 * i for i, c in enumerate(COMPASS)}
  encoder = FakeEncoder(image_fn=image_fn, text_fn=prompt_angles(classes))
  cfg = _backdoor_cfg(trigger="patch", pattern="yellow", position="bottom_right", patch_size=2)
  ev = attack.BackdoorAsrEvaluator(
      "bd", every_steps=0, load_split=lambda: data, poison_cfg=cfg, seed=0, target_class="south"
  )
  assert ev.run(encoder) == pytest.approx(
      {"bd/asr": 0.75, "bd/asr_top5": 1.0, "bd/clean_top1": 0.75, "bd/clean_target_rate": 0.25, "bd/num_images": 4}
  )


def test_backdoor_eval_stamps_the_training_trigger():
  # Same seed and example id -> the evaluator's image equals the training transform's image.
  cfg = _backdoor_cfg(trigger="patch", pattern="noise", position="random", patch_size=3)
  data = eval_set([0, 1, 3], COMPASS, first=40)
  encoder = angle_encoder([0] * 64, {c: 90 * i for i, c in enumerate(COMPASS)})
  attack.BackdoorAsrEvaluator(
      "bd", every_steps=0, load_split=lambda: data, poison_cfg=cfg, seed=21, target_class="south"
  ).run(encoder)
  transform = poison.make_image_transform(cfg, seed=21)
  expected = np.stack([transform({"id": 40 + i, "poisoned": 1}, data.images[i]) for i in range(3)])
  assert any(np.array_equal(batch, expected) for batch in encoder.image_batches)
  assert any(np.array_equal(batch, data.images) for batch in encoder.image_batches)


def _write_constant_png(path: str, index: int, side: int = 16) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.full((side, side, 3), index, np.uint8)).save(path)


def _target(path: str, adversarial: str) -> poison.PoisonTarget:
  return poison.PoisonTarget(
      image_path=path,
      pool_index=0,
      pool_id=0,
      true_label=0,
      true_class="?",
      adversarial_label=EIGHT.index(adversarial),
      adversarial_class=adversarial,
      poison_ids=(1, 2),
  )


def test_targeted_success_rate_by_hand(tmp_path):
  # Target images (files decoded and centre-cropped by the real loader) at these angles:
  #   A at 10,  adversarial ant (0):    top-1.
  #   B at 95,  adversarial cat (90):   top-1.
  #   C at 0,   adversarial eel (180):  rank 7, missed.
  #   D at 60,  adversarial cat (90):   bee (45) is closer -> rank 1: top-5 only.
  # success_rate = 2/4, top-5 = 3/4.
  angles = {1: 10, 2: 95, 3: 0, 4: 60}
  targets = []
  for index, adversarial in zip(angles, ["ant", "cat", "eel", "cat"]):
    path = str(tmp_path / f"target{index}.png")
    _write_constant_png(path, index)
    targets.append(_target(path, adversarial))
  encoder = FakeEncoder(
      image_fn=lambda img: unit(angles[int(img[0, 0, 0])]),
      text_fn=prompt_angles({c: 45 * i for i, c in enumerate(EIGHT)}),
  )
  data = eval_set([0, 1], EIGHT)
  ev = attack.TargetedPoisonEvaluator(
      "tp", every_steps=0, load_split=lambda: data, targets=targets, templates="dataset"
  )
  assert ev.run(encoder) == pytest.approx({"tp/success_rate": 0.5, "tp/success_rate_top5": 0.75, "tp/num_targets": 4})
  assert all(batch.shape == (4, SIDE, SIDE, 3) for batch in encoder.image_batches)

  foreign = [dataclasses.replace(targets[0], adversarial_class="yak")]
  ev = attack.TargetedPoisonEvaluator("tp", every_steps=0, load_split=lambda: data, targets=foreign)
  with pytest.raises(ValueError, match="adversarial class 'yak' is not a class"):
    ev.run(encoder)


# ------------------------------------------------------------------------- linear probe


def _objective(weights, bias, x, y, l2):
  logits = x @ weights + bias
  logits = logits - logits.max(axis=1, keepdims=True)
  log_probs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -log_probs[np.arange(len(y)), y].mean() + 0.5 * l2 * np.sum(weights**2)


def test_linear_probe_separates_blobs_and_matches_a_numpy_prediction():
  rng = np.random.default_rng(0)
  num_classes, dim = 3, 6
  centres = rng.normal(size=(num_classes, dim)) * 3
  train_y = np.repeat(np.arange(num_classes), 30)
  test_y = np.repeat(np.arange(num_classes), 20)
  features = np.concatenate([centres[train_y], centres[test_y]]) + rng.normal(size=(150, dim))
  # Un-normalised and far from zero, so standardisation matters; float32 as an encoder returns.
  features = (features * 5.0 + 40.0).astype(np.float32)
  train = eval_set(train_y, EIGHT[:3])
  test = eval_set(test_y, EIGHT[:3], first=90)
  encoder = FakeEncoder(feature_table=features)
  ev = linear_probe.LinearProbeEvaluator("lp", every_steps=0, load_train=lambda: train, load_test=lambda: test)
  with jax.transfer_guard("disallow"):  # the trainer's setting
    metrics = ev.run(encoder)
  assert metrics["lp/top1"] >= 0.95

  fit = linear_probe.fit_linear_probe(features[:90], train_y, num_classes=3)
  standardised = (features[90:] - features[:90].mean(0)) / features[:90].std(0)
  np.testing.assert_allclose(fit.mean, features[:90].mean(0), rtol=1e-5)
  predictions = np.argmax(standardised @ fit.weights + fit.bias, axis=1)
  assert metrics["lp/top1"] == pytest.approx(np.mean(predictions == test_y))
  assert metrics["lp/l2"] == fit.l2


def test_linear_probe_reaches_the_optimum_of_its_objective():
  # Compare with scipy's L-BFGS-B on the same convex objective, written in numpy here.
  rng = np.random.default_rng(1)
  x = rng.normal(size=(60, 4))
  y = (x[:, 0] + 0.5 * rng.normal(size=60) > 0).astype(int) + (x[:, 1] > 1)
  l2 = 1e-2
  fit = linear_probe.fit_linear_probe(x, y, num_classes=3, l2_grid=(l2,))
  xs = (x - x.mean(0)) / x.std(0)

  def flat_objective(theta):
    return _objective(theta[:12].reshape(4, 3), theta[12:], xs, y, l2)

  reference = scipy.optimize.minimize(
      flat_objective, np.zeros(15), method="L-BFGS-B", options=dict(gtol=1e-10, ftol=1e-14, maxiter=5000)
  )
  ours = _objective(fit.weights, fit.bias, xs, y, l2)
  assert ours == pytest.approx(reference.fun, abs=1e-5)
  np.testing.assert_allclose(fit.weights, reference.x[:12].reshape(4, 3), atol=2e-2)


def test_linear_probe_sweep_picks_strong_l2_on_noise():
  rng = np.random.default_rng(2)
  fit = linear_probe.fit_linear_probe(rng.normal(size=(120, 20)), rng.integers(0, 3, 120), num_classes=3)
  assert fit.l2 == max(linear_probe.DEFAULT_L2_GRID)
  assert fit.val_loss[fit.l2] < fit.val_loss[min(linear_probe.DEFAULT_L2_GRID)]


def test_cap_per_class():
  labels = np.array([0, 1, 0, 2, 0, 0, 1, 2, 2, 2, 0])
  kept = linear_probe.cap_per_class(labels, 3, seed=0)
  assert list(kept) == sorted(kept)
  assert np.bincount(labels[kept]).tolist() == [3, 2, 3]
  assert len(linear_probe.cap_per_class(labels, 0, seed=0)) == len(labels)


# ----------------------------------------------------------------------------- datasets


def test_tfds_source_through_mock_data():
  import tensorflow_datasets as tfds

  with tfds.testing.mock_data(num_examples=8):
    raw = tfds.data_source("cifar10", split="test")
    expected_images = np.stack([raw[i]["image"] for i in range(8)])
    expected_labels = np.array([raw[i]["label"] for i in range(8)])
    data = datasets.load_eval_set(None, "tfds:cifar10", "test", image_size=32)
    subset = datasets.load_eval_set(None, "tfds:cifar10", "test", image_size=16, max_examples=5)
  np.testing.assert_array_equal(data.images, expected_images)  # already 32 px: untouched
  np.testing.assert_array_equal(data.labels, expected_labels)
  assert data.class_names == [str(i) for i in range(10)]  # the mock's ClassLabel names
  assert data.captions == [data.class_names[y] for y in expected_labels]
  assert len(data.templates) == 80 and data.ids.tolist() == list(range(8))
  assert subset.images.shape == (5, 16, 16, 3) and subset.images.dtype == np.uint8
  assert len(set(subset.ids.tolist())) == 5 and subset.ids.tolist() == sorted(subset.ids.tolist())
  np.testing.assert_array_equal(subset.labels, expected_labels[subset.ids])


def _write_folder(root: str, angle_indices: dict[str, list[int]]) -> None:
  for folder, indices in angle_indices.items():
    for k, index in enumerate(indices):
      _write_constant_png(os.path.join(root, folder, f"{k}.png"), index)


def test_image_folder_source(tmp_path):
  _write_folder(str(tmp_path / "test"), {"tabby_cat": [3, 4], "golden_retriever": [1, 2, 5]})
  (tmp_path / "test" / "tabby_cat" / "broken.png").write_bytes(b"not a png")
  (tmp_path / "test" / "tabby_cat" / "notes.txt").write_text("ignored")
  data = datasets.load_eval_set(None, f"folder:{tmp_path}/{{split}}", "test", image_size=SIDE)
  assert data.class_names == ["golden retriever", "tabby cat"]
  assert data.labels.tolist() == [0, 0, 0, 1, 1] and data.num_skipped == 1
  assert data.images.shape == (5, SIDE, SIDE, 3)
  assert data.images[:, 0, 0, 0].tolist() == [1, 2, 5, 3, 4]  # sorted classes, sorted files
  with pytest.raises(ValueError, match="does not exist"):
    datasets.load_eval_set(None, f"folder:{tmp_path}/missing", "test", image_size=SIDE)
  with pytest.raises(ValueError, match="Unknown eval dataset 'imagenet'"):
    datasets.load_eval_set(None, "imagenet", "test", image_size=SIDE)


# -------------------------------------------------------------------------- from_config


def _config(root: str, **evals) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.model = ml_collections.ConfigDict(dict(image=dict(image_size=SIDE)))
  config.poison = poison.default_config()
  config.evals = ml_collections.ConfigDict(
      {name: dict(dataset=f"folder:{root}/{{split}}", **fields) for name, fields in evals.items()}
  )
  return config


def test_from_config_builds_runs_and_shares_data(tmp_path, monkeypatch):
  # Folder classes: golden retriever at 0 degrees, tabby cat at 180. Images at
  # golden: 10, 20, 170 (two right); tabby: 190 (right), 350 (wrong) -> top1 = 3/5.
  root = str(tmp_path)
  _write_folder(os.path.join(root, "test"), {"golden_retriever": [1, 2, 3], "tabby_cat": [4, 5]})
  angles = {1: 10, 2: 20, 3: 170, 4: 190, 5: 350}
  loads = []
  real_load = datasets.load_eval_set
  monkeypatch.setattr(datasets, "load_eval_set", lambda *a, **k: loads.append(a[1:3]) or real_load(*a, **k))
  config = _config(
      root,
      zs=dict(type="zeroshot", every_steps=5),
      ret=dict(type="retrieval", ks=(1,)),
      bd=dict(type="backdoor_asr"),
      lp=dict(type="linear_probe", train_split="test", max_train_per_class=2),
  )
  config.poison.backdoor.target_class = "tabby cat"
  config.poison.backdoor.position = "bottom_right"  # keeps the index pixel [0, 0] intact
  built = evaluators.from_config(config)
  built = {e.name: e for e in built}
  assert {name: type(e).__name__ for name, e in built.items()} == {
      "zs": "ZeroShotEvaluator",
      "ret": "RetrievalEvaluator",
      "bd": "BackdoorAsrEvaluator",
      "lp": "LinearProbeEvaluator",
  }
  assert loads == []  # data loads lazily

  encoder = FakeEncoder(
      image_fn=lambda img: unit(angles[int(img[0, 0, 0])]),
      text_fn=prompt_angles({"golden retriever": 0, "tabby cat": 180}),
  )
  assert built["zs"].run(encoder) == pytest.approx({"zs/top1": 0.6, "zs/top5": 1.0})
  assert "a bad photo of a golden retriever." in encoder.texts  # underscores -> spaces
  built["bd"].run(encoder)
  assert loads == [(f"folder:{root}/{{split}}", "test")]  # one load shared by both evaluators

  assert [s for s in range(1, 13) if built["zs"].is_due(s, 12)] == [5, 10, 12]
  assert [s for s in range(1, 13) if built["ret"].is_due(s, 12)] == [12]


def test_from_config_rejects_bad_entries(tmp_path):
  root = str(tmp_path)
  with pytest.raises(ValueError, match=r"unknown field\(s\) \['templatez'\]"):
    evaluators.from_config(_config(root, zs=dict(type="zeroshot", templatez="dataset")))
  with pytest.raises(ValueError, match="type='knn' is not one of"):
    evaluators.from_config(_config(root, k=dict(type="knn")))
  with pytest.raises(ValueError, match="needs the targets of a targeted attack"):
    evaluators.from_config(_config(root, tp=dict(type="targeted_poison")))
  with pytest.raises(ValueError, match="templates='clip' is not one of"):
    evaluators.from_config(_config(root, zs=dict(type="zeroshot", templates="clip")))
  info = poison.PoisonInfo(seed=3, num_clean_examples=10, targeted_ids=(10, 11), targets=(_target("/x.png", "ant"),))
  built = evaluators.from_config(_config(root, tp=dict(type="targeted_poison")), poison_info=info)
  assert isinstance(built[0], attack.TargetedPoisonEvaluator)
