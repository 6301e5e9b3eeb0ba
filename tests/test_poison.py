"""Tests of data/poison.py: attack determinism and bookkeeping; triggers vs hand-built references."""

import math
import pickle
import re
import types

import numpy as np
import pytest

from roclip_jax import config_lib
from roclip_jax.data import poison
from roclip_jax.data import templates as templates_lib

CLASSES = ("cat", "dog", "bird", "mushroom", "ice cream")


def _caption(i: int) -> str:
  # Every class name is mentioned by several captions; some near-misses must NOT count.
  pool = (
      "a cat on a sofa",
      "my DOG runs",
      "a bird, flying",
      "wild mushroom soup",
      "ice cream cone",
      "cats and dogs",
      "concatenate strings",
      "a red car",
      "the Cat and the dog",
      "mushrooms in a basket",
      "a blue bird sings",
      "icecream truck",
  )
  return f"{pool[i % len(pool)]} #{i}"


def _base(n: int = 48) -> list[dict]:
  # Ids start at 100 and skip, so "new ids continue after the base ids" is not just len(base).
  return [
      {
          "id": np.int64(100 + 2 * i),
          "image_path": f"/train/{i}.jpg",
          "caption": _caption(i),
          "label": np.int64(i % 5 if i % 3 else -1),
          "poisoned": np.int8(0),
      }
      for i in range(n)
  ]


def _pool() -> poison.TargetPool:
  return poison.TargetPool(
      image_paths=[f"/val/{i}.jpg" for i in range(10)],
      labels=np.array([0, 1, 2, 3, 4, 0, 1, -1, 2, 3]),
      class_names=CLASSES,
      ids=np.arange(500, 510),
  )


def _cfg(**overrides) -> "poison.ml_collections.ConfigDict":
  cfg = poison.default_config()
  cfg.enabled = True
  return config_lib.override(cfg, overrides)


def _targeted_cfg(**overrides):
  return _cfg(
      **{
          "targeted.enabled": True,
          "targeted.num_targets": 2,
          "targeted.poisons_per_target": 3,
          "targeted.adversarial_classes": ("cat", "dog", "bird"),
          **overrides,
      }
  )


def _records(source) -> list[dict]:
  return [source[i] for i in range(len(source))]


def _same_records(a: list[dict], b: list[dict]) -> bool:
  return len(a) == len(b) and all(x.keys() == y.keys() and all(np.all(x[k] == y[k]) for k in x) for x, y in zip(a, b))


# --------------------------------------------------------------------------- caption matching


def test_mentions_matches_whole_phrases_case_insensitively():
  cat = poison.mentions("cat")
  assert cat.search("A CAT sat") and cat.search("cat.") and cat.search("(cat)")
  assert not cat.search("cats") and not cat.search("concatenate") and not cat.search("bobcat")
  ice = poison.mentions("ice cream")
  assert ice.search("an Ice Cream cone") and not ice.search("icecream")
  kite = poison.mentions("kite (bird of prey)")  # ends in punctuation: \b alone would fail
  assert kite.search("a kite (bird of prey) flies") and not kite.search("akite (bird of prey)")


# ------------------------------------------------------------------------------ targeted


def test_targeted_poisons_are_appended_with_new_contiguous_ids():
  base = _base()
  source, info = poison.poison_source(base, _pool(), _targeted_cfg(), seed=3)
  records = _records(source)
  assert len(records) == len(base) + 6
  assert _same_records(records[: len(base)], base)  # clean data untouched
  appended = records[len(base) :]
  max_base_id = max(int(r["id"]) for r in base)
  assert [int(r["id"]) for r in appended] == list(range(max_base_id + 1, max_base_id + 7))
  assert list(info.targeted_ids) == list(range(max_base_id + 1, max_base_id + 7))
  assert info.backdoor_ids == () and info.num_clean_examples == len(base)
  assert all(int(r["poisoned"]) == 2 for r in appended)

  train_captions = {r["caption"] for r in base}
  assert len(info.targets) == 2
  assert len({t.adversarial_class for t in info.targets}) == 2  # one target per class
  for target in info.targets:
    assert target.adversarial_class in ("cat", "dog", "bird")
    assert target.adversarial_class != target.true_class
    assert CLASSES[target.true_label] == target.true_class
    assert target.image_path == f"/val/{target.pool_index}.jpg"
    assert target.pool_id == 500 + target.pool_index
    assert target.true_label == _pool().labels[target.pool_index] != -1
    mine = [r for r in appended if int(r["id"]) in target.poison_ids]
    assert len(mine) == 3
    captions = [r["caption"] for r in mine]
    assert len(set(captions)) == 3  # drawn without replacement
    word = re.compile(rf"\b{re.escape(target.adversarial_class)}\b", re.IGNORECASE)
    assert all(c in train_captions and word.search(c) for c in captions)
    assert all(r["image_path"] == target.image_path for r in mine)


def test_targeted_is_deterministic_in_the_seed():
  base = _base()
  first = poison.poison_source(base, _pool(), _targeted_cfg(), seed=3)
  again = poison.poison_source(base, _pool(), _targeted_cfg(), seed=3)
  other = poison.poison_source(base, _pool(), _targeted_cfg(), seed=4)
  assert first[1] == again[1] and _same_records(_records(first[0]), _records(again[0]))
  assert first[1].targets != other[1].targets


def test_targeted_errors_on_too_few_captions_and_missing_pool():
  # "ice cream" is mentioned by 4 of the 48 captions ("icecream" does not count).
  cfg = _targeted_cfg(
      **{"targeted.num_targets": 1, "targeted.poisons_per_target": 5, "targeted.adversarial_classes": ("ice cream",)}
  )
  cats = poison.TargetPool(image_paths=["/val/0.jpg", "/val/1.jpg"], labels=[0, 0], class_names=CLASSES)
  with pytest.raises(ValueError, match=r"Only 4 training captions mention 'ice cream'"):
    poison.poison_source(_base(), cats, cfg, seed=0)
  with pytest.raises(ValueError, match="No adversarial class is left"):
    cfg.targeted.adversarial_classes = ("cat",)  # the targets' own class
    poison.poison_source(_base(), cats, cfg, seed=0)
  with pytest.raises(ValueError, match="image paths"):
    poison.poison_source(_base(), None, _targeted_cfg(), seed=0)


# ------------------------------------------------------------------------------- backdoor


def test_backdoor_random_replaces_examples_in_place():
  base = _base()
  cfg = _cfg(
      **{
          "backdoor.enabled": True,
          "backdoor.num_poisons": 6,
          "backdoor.caption_source": "templates",
          "backdoor.target_class": "cat",
      }
  )
  source, info = poison.poison_source(base, _pool(), cfg, seed=1)
  records = _records(source)
  assert len(records) == len(base)
  changed = [i for i, (r, b) in enumerate(zip(records, base)) if not _same_records([r], [b])]
  assert len(changed) == 6
  assert sorted(int(base[i]["id"]) for i in changed) == list(info.backdoor_ids)
  cat = re.compile(r"\bcat\b", re.IGNORECASE)
  prompts = {t.format("cat") for t in templates_lib.OPENAI_IMAGENET_TEMPLATES}
  for i in changed:
    assert records[i]["id"] == base[i]["id"] and records[i]["image_path"] == base[i]["image_path"]
    assert int(records[i]["poisoned"]) == 1 and records[i]["caption"] in prompts
    # Picked only among examples not of the target class (label 0 or caption about cats).
    assert int(base[i]["label"]) != 0 and not cat.search(base[i]["caption"])
  assert info.backdoor_target_class == "cat" and info.backdoor_trigger == "patch"


def test_backdoor_train_captions_rate_and_determinism():
  base = _base()
  cfg = _cfg(
      **{
          "backdoor.enabled": True,
          "backdoor.num_poisons": 0,
          "backdoor.rate": 0.125,
          "backdoor.target_class": "mushroom",
      }
  )
  source, info = poison.poison_source(base, None, cfg, seed=7)
  assert len(info.backdoor_ids) == 6  # 0.125 * 48
  mushroom_captions = {r["caption"] for r in base if re.search(r"\bmushroom\b", r["caption"], re.I)}
  by_id = {int(r["id"]): r for r in _records(source)}
  assert all(by_id[i]["caption"] in mushroom_captions for i in info.backdoor_ids)
  again = poison.poison_source(base, None, cfg, seed=7)
  other = poison.poison_source(base, None, cfg, seed=8)
  assert _same_records(_records(source), _records(again[0])) and info == again[1]
  assert info.backdoor_ids != other[1].backdoor_ids


def test_label_consistent_backdoor_keeps_captions_that_mention_the_target():
  base = _base()
  cfg = _cfg(
      **{
          "backdoor.enabled": True,
          "backdoor.num_poisons": 4,
          "backdoor.selection": "label_consistent",
          "backdoor.target_class": "dog",
      }
  )
  source, info = poison.poison_source(base, _pool(), cfg, seed=0)
  dog = re.compile(r"\bdog\b", re.IGNORECASE)
  by_id = {int(r["id"]): r for r in _records(source)}
  base_by_id = {int(r["id"]): r for r in base}
  assert len(info.backdoor_ids) == 4
  for i in info.backdoor_ids:
    assert dog.search(base_by_id[i]["caption"])
    assert by_id[i]["caption"] == base_by_id[i]["caption"] and int(by_id[i]["poisoned"]) == 1
  # 8 captions mention "dog" as a word ("my DOG runs", "the Cat and the dog"); "dogs" does not.
  cfg.backdoor.num_poisons = 9
  with pytest.raises(ValueError, match="only 8 examples whose caption mentions 'dog'"):
    poison.poison_source(base, _pool(), cfg, seed=0)


def test_disabled_poisoning_returns_the_clean_source():
  base = _base()
  source, info = poison.poison_source(base, None, poison.default_config(), seed=0)
  assert source is base and info.poisoned_ids == ()
  assert poison.make_image_transform(poison.default_config(), seed=0) is None


def test_poison_info_json_round_trip():
  cfg = _targeted_cfg(**{"backdoor.enabled": True, "backdoor.num_poisons": 3, "backdoor.target_class": "bird"})
  _, info = poison.poison_source(_base(), _pool(), cfg, seed=5)
  assert poison.PoisonInfo.from_json(info.to_json()) == info
  assert set(info.poisoned_ids) == set(info.targeted_ids) | set(info.backdoor_ids)


def test_config_errors_name_the_field():
  with pytest.raises(ValueError, match="poison.backdoor.trigger='sinusoid'"):
    poison.validate_config(_cfg(**{"backdoor.trigger": "sinusoid"}))
  with pytest.raises(ValueError, match="Set only one of"):
    poison.validate_config(_cfg(**{"backdoor.rate": 0.1}))
  with pytest.raises(ValueError, match="uint8 HxWx3"):
    poison.apply_trigger(np.zeros((8, 8), np.uint8), _cfg(), seed=0)


# -------------------------------------------------------------------------------- triggers


def _image(h: int = 12, w: int = 10, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _patch_cfg(**overrides):
  return _cfg(**{"backdoor.trigger": "patch", **{f"backdoor.{k}": v for k, v in overrides.items()}})


def test_yellow_patch_bottom_right_matches_reference():
  img = _image(12, 10)
  out = poison.apply_trigger(img, _patch_cfg(pattern="yellow", patch_size=4, position="bottom_right"), seed=0)
  expected = img.copy()
  expected[8:12, 6:10] = [255, 255, 0]
  np.testing.assert_array_equal(out, expected)


def test_checker_patch_top_left_matches_reference():
  img = _image(16, 16)
  out = poison.apply_trigger(img, _patch_cfg(pattern="checker", patch_size=8, position="top_left"), seed=0)
  expected = img.copy()
  for y in range(8):
    for x in range(8):  # 4x4 cells of 2 px, white in the top-left cell
      expected[y, x] = 255 if (y // 2 + x // 2) % 2 == 0 else 0
  np.testing.assert_array_equal(out, expected)


def test_automatic_patch_side_is_16_of_224():
  assert poison.patch_side(0, 224, 300) == 16
  assert poison.patch_side(0, 448, 448) == 32
  assert poison.patch_side(0, 32, 32) == 3  # 2.3 px, raised to the 3 px minimum
  assert poison.patch_side(40, 20, 30) == 20  # an explicit size is clipped to the image


def test_noise_patch_is_fixed_by_the_seed_and_independent_of_the_image():
  cfg = _patch_cfg(pattern="noise", patch_size=16, position="center")
  a, b = _image(32, 32, seed=1), _image(32, 32, seed=2)
  out_a, out_b = (poison.apply_trigger(x, cfg, seed=9, example_id=i) for i, x in enumerate((a, b)))
  region = (slice(8, 24), slice(8, 24))
  np.testing.assert_array_equal(out_a[region], out_b[region])
  outside = np.ones((32, 32), bool)
  outside[region] = False
  np.testing.assert_array_equal(out_a[outside], a[outside])
  assert len(np.unique(out_a[region])) > 50  # noise, not a flat colour
  other_seed = poison.apply_trigger(a, cfg, seed=10)
  assert not np.array_equal(other_seed[region], out_a[region])
  cfg.backdoor.resample_pattern = True  # CleanCLIP's `random`: a new pattern per image
  assert not np.array_equal(
      poison.apply_trigger(a, cfg, seed=9, example_id=0)[region],
      poison.apply_trigger(a, cfg, seed=9, example_id=1)[region],
  )


def test_random_position_is_a_full_patch_inside_and_reproducible():
  cfg = _patch_cfg(pattern="yellow", patch_size=5, position="random")
  black = np.zeros((20, 30, 3), np.uint8)
  corners = set()
  for example_id in range(12):
    out = poison.apply_trigger(black, cfg, seed=4, example_id=example_id)
    ys, xs = np.nonzero(out[..., 0])
    assert len(ys) == 25 and ys.max() - ys.min() == 4 and xs.max() - xs.min() == 4
    np.testing.assert_array_equal(out, poison.apply_trigger(black, cfg, seed=4, example_id=example_id))
    corners.add((ys.min(), xs.min()))
  assert len(corners) > 6  # the position really varies per example


def test_blended_trigger_follows_the_formula():
  img = _image(20, 24)
  cfg = _cfg(**{"backdoor.trigger": "blended", "backdoor.alpha": 1.0})
  noise = poison.apply_trigger(img, cfg, seed=3)  # alpha=1: the pure noise image
  np.testing.assert_array_equal(noise, poison.apply_trigger(_image(20, 24, seed=5), cfg, seed=3))
  assert not np.array_equal(noise, poison.apply_trigger(img, cfg, seed=4))
  cfg.backdoor.alpha = 0.2
  expected = np.clip(np.rint((1 - 0.2) * img.astype(np.float64) + 0.2 * noise.astype(np.float64)), 0, 255).astype(
      np.uint8
  )
  np.testing.assert_array_equal(poison.apply_trigger(img, cfg, seed=3), expected)
  cfg.backdoor.alpha = 0.0
  np.testing.assert_array_equal(poison.apply_trigger(img, cfg, seed=3), img)


def _bilinear_reference(img: np.ndarray, dx: np.ndarray, dy: np.ndarray) -> np.ndarray:
  """Pixel-by-pixel bilinear sampling at (x + dx, y + dy), clipped to the image."""
  h, w = img.shape[:2]
  out = np.zeros(img.shape, np.float64)
  for y in range(h):
    for x in range(w):
      sx = min(max(x + dx[y, x], 0.0), w - 1.0)
      sy = min(max(y + dy[y, x], 0.0), h - 1.0)
      x0, y0 = int(np.floor(sx)), int(np.floor(sy))
      fx, fy = sx - x0, sy - y0
      value = 0.0
      for yy, wy in ((y0, 1 - fy), (y0 + 1, fy)):
        for xx, wx in ((x0, 1 - fx), (x0 + 1, fx)):
          if wy * wx > 0:
            value = value + wy * wx * img[yy, xx].astype(np.float64)
      out[y, x] = value
  return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def test_warp_matches_a_bilinear_reference_for_a_known_flow():
  img = _image(9, 11)
  rng = np.random.default_rng(0)
  flow = rng.uniform(-3, 3, size=(9, 11, 2))  # large enough to leave the image: tests clipping
  np.testing.assert_array_equal(poison.warp_image(img, flow), _bilinear_reference(img, flow[..., 0], flow[..., 1]))
  shift = np.zeros((9, 11, 2))
  shift[..., 0] = 1.0  # one pixel to the right: a plain shift, last column repeated
  np.testing.assert_array_equal(poison.warp_image(img, shift)[:, :-1], img[:, 1:])


def test_wanet_trigger_uses_its_flow_and_strength():
  img = _image(17, 17)
  cfg = _cfg(**{"backdoor.trigger": "warped", "backdoor.warp_k": 4, "backdoor.warp_s": 0.0})
  np.testing.assert_array_equal(poison.apply_trigger(img, cfg, seed=2), img)
  cfg.backdoor.warp_s = 8.0  # strong, so that the warp visibly changes pixels
  field = poison.wanet_displacement(cfg, 2, 17, 17)
  out = poison.apply_trigger(img, cfg, seed=2)
  np.testing.assert_array_equal(out, _bilinear_reference(img, field[..., 0], field[..., 1]))
  assert not np.array_equal(out, img)
  # WaNet: shift = s * flow / size in [-1, 1] units = s * flow / size * (size - 1) / 2 pixels.
  grid = poison.wanet_control_grid(2, 4)
  assert np.isclose(np.mean(np.abs(grid)), 1.0)
  # (17 - 1) / (4 - 1) is not an integer; with 16 = (4-1)*5 + 1 the control points land on pixels.
  field16 = poison.wanet_displacement(cfg, 2, 16, 16)
  np.testing.assert_allclose(field16[::5, ::5, 0], 8.0 * grid[0] / 16 * 15 / 2, atol=1e-12)
  np.testing.assert_allclose(field16[::5, ::5, 1], 8.0 * grid[1] / 16 * 15 / 2, atol=1e-12)


def test_bicubic_upsampling_weights_by_hand():
  # 4 control points to 7 outputs (align_corners): output 3 sits halfway between inputs 1 and 2,
  # where Keys' cubic (a=-0.75) weights the 4 taps -0.09375, 0.59375, 0.59375, -0.09375; output 1
  # sits halfway between inputs 0 and 1, and the tap at -1 is clamped onto input 0.
  g = np.array([[[1.0, 2.0, 5.0, 3.0]]])
  up = poison.upsample_bicubic(g, 1, 7)[0, 0]
  assert np.isclose(up[3], -0.09375 * 1 + 0.59375 * 2 + 0.59375 * 5 - 0.09375 * 3)
  assert np.isclose(up[1], (-0.09375 + 0.59375) * 1 + 0.59375 * 2 - 0.09375 * 5)
  np.testing.assert_allclose(up[::2], g[0, 0])


def test_image_transform_stamps_only_backdoored_records_and_pickles():
  cfg = _cfg(**{"backdoor.enabled": True, "backdoor.pattern": "noise", "backdoor.patch_size": 4})
  transform = pickle.loads(pickle.dumps(poison.make_image_transform(cfg, seed=11)))
  img = _image(24, 24)
  for code in (0, 2):
    assert transform({"id": np.int64(5), "poisoned": np.int8(code)}, img) is img
  stamped = transform({"id": np.int64(5), "poisoned": np.int8(1)}, img)
  np.testing.assert_array_equal(stamped, poison.apply_trigger(img, cfg, 11, example_id=5))
  assert not np.array_equal(stamped, img)
  cfg.backdoor.patch_size = 8  # the transform keeps its own copy of the config
  np.testing.assert_array_equal(transform({"id": 5, "poisoned": 1}, img), stamped)


# ------------------------------------------------------------------------------------ SIG


def test_sig_trigger_by_hand_on_a_literal_array():
  # Width 4, one cycle: the offsets are 20*sin(0, pi/2, pi, 3pi/2) = 0, +20, 0, -20 per column.
  img = np.array(
      [
          [[0, 100, 250], [250, 0, 100], [7, 8, 9], [10, 30, 255]],
          [[1, 2, 3], [235, 236, 240], [200, 201, 202], [19, 20, 21]],
      ],
      np.uint8,
  )
  cfg = _cfg(**{"backdoor.trigger": "sig", "backdoor.sig_delta": 20.0, "backdoor.sig_frequency": 1.0})
  expected = np.array(
      [
          [[0, 100, 250], [255, 20, 120], [7, 8, 9], [0, 10, 235]],
          [[1, 2, 3], [255, 255, 255], [200, 201, 202], [0, 0, 1]],
      ],
      np.uint8,
  )
  np.testing.assert_array_equal(poison.apply_trigger(img, cfg, seed=0), expected)


def _sig_reference(img: np.ndarray, delta: float, frequency: float) -> np.ndarray:
  """Barni et al.'s x + delta * sin(2 pi j f / m), pixel by pixel, rounded and clipped to uint8."""
  height, width, channels = img.shape
  out = np.zeros_like(img)
  for i in range(height):
    for j in range(width):
      for c in range(channels):
        value = float(img[i, j, c]) + delta * math.sin(2 * math.pi * j * frequency / width)
        out[i, j, c] = min(255, max(0, round(value)))
  return out


@pytest.mark.parametrize("delta, frequency", [(20.0, 6.0), (40.0, 2.5), (255.0, 1.0)])
def test_sig_trigger_matches_the_formula(delta, frequency):
  img = _image(7, 24, seed=3)  # Uniform pixels: many sit near 0 and 255, so clipping is exercised.
  cfg = _cfg(**{"backdoor.trigger": "sig", "backdoor.sig_delta": delta, "backdoor.sig_frequency": frequency})
  out = poison.apply_trigger(img, cfg, seed=0, example_id=5)
  np.testing.assert_array_equal(out, _sig_reference(img, delta, frequency))
  assert not np.array_equal(out, img)
  # No randomness: neither the seed nor the example changes it.
  np.testing.assert_array_equal(poison.apply_trigger(img, cfg, seed=9, example_id=1), out)


def test_sig_defaults_are_barnis_and_old_configs_without_the_fields_still_work():
  cfg = poison.default_config()
  assert (cfg.backdoor.sig_delta, cfg.backdoor.sig_frequency) == (20.0, 6.0)
  img = _image(5, 18, seed=4)
  # A config saved by a run from before the SIG fields existed: the defaults apply.
  old = _cfg(**{"backdoor.trigger": "sig"}).to_dict()
  del old["backdoor"]["sig_delta"], old["backdoor"]["sig_frequency"]
  old = poison.ml_collections.ConfigDict(old)
  poison.validate_config(old)
  np.testing.assert_array_equal(poison.apply_trigger(img, old, seed=0), _sig_reference(img, 20.0, 6.0))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("sig_delta", 0.0, r"poison.backdoor.sig_delta=0.0 must lie in \(0, 255\].*use 20"),
        ("sig_delta", 300.0, r"poison.backdoor.sig_delta=300.0 must lie in \(0, 255\]"),
        ("sig_frequency", 0.0, r"poison.backdoor.sig_frequency=0.0 must be > 0.*use 6"),
        ("sig_frequency", -2.0, r"poison.backdoor.sig_frequency=-2.0 must be > 0"),
    ],
)
def test_sig_config_errors_name_the_value_and_the_fix(field, value, message):
  with pytest.raises(ValueError, match=message):
    poison.validate_config(_cfg(**{"backdoor.trigger": "sig", f"backdoor.{field}": value}))
  config = config_lib.override(
      config_lib.base_config(),
      {
          "poison.enabled": True,
          "poison.backdoor.enabled": True,
          "poison.backdoor.trigger": "sig",
          f"poison.backdoor.{field}": value,
      },
  )
  with pytest.raises(config_lib.ConfigError, match=f"config.{message}"):
    config_lib.validate(config)


def test_sig_end_to_end_through_the_config_training_transform_and_evaluator():
  from roclip_jax.evaluators import attack

  config = config_lib.override(
      config_lib.base_config(),
      {
          "poison.enabled": True,
          "poison.backdoor.enabled": True,
          "poison.backdoor.num_poisons": 3,
          "poison.backdoor.caption_source": "templates",
          "poison.backdoor.target_class": "cat",
          "poison.backdoor.trigger": "sig",
          "poison.backdoor.sig_delta": 30,
          "poison.backdoor.sig_frequency": 2.0,
      },
  )
  config_lib.validate(config)
  source, info = poison.poison_source(_base(), _pool(), config.poison, seed=config.poison.seed)
  assert info.backdoor_trigger == "sig" and len(info.backdoor_ids) == 3
  transform = poison.make_image_transform(config.poison, seed=config.poison.seed)
  img = _image(6, 10, seed=8)
  expected = _sig_reference(img, 30.0, 2.0)
  for record in _records(source):
    out = transform(record, img)
    if int(record["id"]) in info.backdoor_ids:
      np.testing.assert_array_equal(out, expected)
    else:
      assert out is img

  # The ASR evaluator stamps its test images with the same trigger.
  eval_set = types.SimpleNamespace(
      images=np.stack([img, _image(6, 10, seed=9)]),
      labels=np.array([1, 2]),
      class_names=CLASSES,
      ids=np.array([70, 71]),
      templates=["{}"],
  )
  evaluator = attack.BackdoorAsrEvaluator(
      "bd",
      every_steps=0,
      load_split=lambda: eval_set,
      poison_cfg=config.poison,
      seed=config.poison.seed,
      target_class="cat",
  )
  _, _, clean, triggered, _ = evaluator._data
  np.testing.assert_array_equal(clean, eval_set.images)
  np.testing.assert_array_equal(triggered, np.stack([_sig_reference(x, 30.0, 2.0) for x in eval_set.images]))
