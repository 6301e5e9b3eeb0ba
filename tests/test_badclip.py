"""The BadCLIP-style optimised patch: its objective, determinism, the `optimized` trigger, patch files."""

import hashlib
import json
import types

import jax
import numpy as np
from flax import nnx
import pytest

from roclip_jax import config_lib
from roclip_jax import models
from roclip_jax import steps as steps_lib
from roclip_jax import train
from roclip_jax import weights
from roclip_jax.attacks import badclip
from roclip_jax.data import demo
from roclip_jax.data import poison

SIZE = 16  # Image side of the tiny surrogate.
SIDE = 8  # Patch side: one ViT patch of the tiny model.


def _tiny_model_config():
  c = models.preset("tiny")
  c.image.image_size, c.image.patch_size = SIZE, 8
  c.text.context_length = 16
  return c


@pytest.fixture(scope="module")
def surrogate():
  model_config = _tiny_model_config()
  params, model_state = steps_lib.ModelSpec.split(models.build(model_config, rngs=nnx.Rngs(0)))
  params, model_state = jax.device_get((params, model_state))
  return badclip.Surrogate(model_config, params, model_state, description="random tiny model")


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).integers(0, 256, (48, SIZE, SIZE, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def targets(surrogate):
  target_images = np.random.default_rng(1).integers(0, 256, (6, SIZE, SIZE, 3), dtype=np.uint8)
  return badclip.target_embeddings(
      surrogate.encoder(), "blue star", ["a photo of a {}.", "a drawing of a {}."], target_images
  )


def _cfg(**overrides):
  cfg = badclip.default_config()
  cfg.update(dict(steps=30, lr=0.05, batch_size=16, seed=0, image_weight=0.5))
  cfg.update(overrides)
  return cfg


def _stamped_by_hand(images, patch, top, left):
  out = images.copy()
  out[:, top : top + patch.shape[0], left : left + patch.shape[1]] = patch
  return out


def _numpy_objective(encoder, images, patch, top, left, targets, image_weight):
  """-mean cos(z, t) - lambda mean cos(z, v), from the Encoder's embeddings of hand-stamped images."""
  z = encoder.encode_images(_stamped_by_hand(images, patch, top, left)).astype(np.float64)
  z /= np.linalg.norm(z, axis=1, keepdims=True)
  text_cos, image_cos = z @ targets.text.astype(np.float64), z @ targets.image.astype(np.float64)
  return -text_cos.mean() - image_weight * image_cos.mean(), text_cos.mean(), image_cos.mean()


def test_target_embeddings_are_the_normalised_means(surrogate, targets):
  encoder = surrogate.encoder()
  text = encoder.encode_texts(["a photo of a blue star.", "a drawing of a blue star."]).mean(0)
  np.testing.assert_allclose(targets.text, text / np.linalg.norm(text), atol=1e-6)
  assert np.isclose(np.linalg.norm(targets.image), 1.0, atol=1e-6)


def test_jitted_objective_matches_numpy_cosines(surrogate, images, targets):
  patch = np.random.default_rng(2).integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8)
  top, left = poison.patch_corner("bottom_right", SIDE, SIZE, SIZE, rng=None)
  corners = badclip.draw_corners(jax.random.PRNGKey(0), "bottom_right", SIDE, SIZE, len(images))
  loss, text_cos, image_cos = jax.jit(
      lambda p: badclip.per_image_objective(
          surrogate.spec, surrogate.params, surrogate.model_state, p, images, corners, targets.text, targets.image, 0.5
      )
  )(patch / 255.0)
  expected = _numpy_objective(surrogate.encoder(), images, patch, top, left, targets, 0.5)
  np.testing.assert_allclose([loss.mean(), text_cos.mean(), image_cos.mean()], expected, atol=2e-5)


# A fixed corner covers one 8-px token of the tiny ViT exactly; random corners mostly straddle four
# tokens at changing offsets, so one patch moves the embedding less (margins ~3x below what is seen).
@pytest.mark.parametrize("position,margin", [("bottom_right", 0.05), ("random", 0.005)])
def test_optimisation_lowers_its_objective(surrogate, images, targets, position, margin):
  result = badclip.optimize_patch(surrogate, images, targets, side=SIDE, position=position, cfg=_cfg())
  assert result.patch.dtype == np.uint8 and result.patch.shape == (SIDE, SIDE, 3)
  assert result.objective_final < result.objective_initial - margin, result
  assert result.text_cos_final > result.text_cos_initial
  if position == "bottom_right":
    # The reported objective is that of the saved uint8 patch, recomputed here from the embeddings.
    top, left = poison.patch_corner(position, SIDE, SIZE, SIZE, rng=None)
    expected = _numpy_objective(surrogate.encoder(), images, result.patch, top, left, targets, 0.5)
    np.testing.assert_allclose(
        [result.objective_final, result.text_cos_final, result.image_cos_final], expected, atol=2e-5
    )


def test_deterministic_given_the_seed(surrogate, images, targets):
  run = lambda seed: badclip.optimize_patch(
      surrogate, images, targets, side=SIDE, position="random", cfg=_cfg(steps=5, seed=seed)
  )
  first, again, other = run(3), run(3), run(4)
  np.testing.assert_array_equal(first.patch, again.patch)
  assert first.objective_final == again.objective_final
  assert not np.array_equal(first.patch, other.patch)


def test_optimiser_rejects_bad_settings(surrogate, images, targets):
  with pytest.raises(ValueError, match="batch_size=64 exceeds the 48 images"):
    badclip.optimize_patch(surrogate, images, targets, side=SIDE, position="center", cfg=_cfg(batch_size=64))
  with pytest.raises(ValueError, match="surrogate reads 16x16"):
    badclip.optimize_patch(surrogate, images[:, :8, :8], targets, side=4, position="center", cfg=_cfg())
  with pytest.raises(ValueError, match="lr=0"):
    badclip.optimize_patch(surrogate, images, targets, side=SIDE, position="center", cfg=_cfg(lr=0.0))
  with pytest.raises(ValueError, match="No clean image of the target class"):
    badclip.target_embeddings(surrogate.encoder(), "blue star", ["{}"], np.zeros((0, SIZE, SIZE, 3), np.uint8))


# ------------------------------------------------------------------------ the `optimized` trigger


def _trigger_cfg(patch_file, **backdoor):
  cfg = poison.default_config()
  cfg.enabled = cfg.backdoor.enabled = True
  cfg.backdoor.trigger = "optimized"
  cfg.backdoor.patch_file = str(patch_file)
  cfg.backdoor.update(backdoor)
  return cfg


def test_optimized_trigger_stamps_the_saved_pixels(tmp_path):
  patch = np.arange(5 * 5 * 3, dtype=np.uint8).reshape(5, 5, 3) * 3
  path = tmp_path / "patch.npz"
  poison.save_patch_file(str(path), patch, {"target_class": "cat", "steps": 7})
  image = np.full((12, 20, 3), 200, np.uint8)
  # Bottom-right on a 12x20 image: rows 7..11, columns 15..19, by hand.
  expected = image.copy()
  expected[7:12, 15:20] = patch
  out = poison.apply_trigger(image, _trigger_cfg(path, position="bottom_right"), seed=0)
  np.testing.assert_array_equal(out, expected)
  # `patch_size` equal to the file's side changes nothing; a random corner keeps the pixels.
  np.testing.assert_array_equal(
      poison.apply_trigger(image, _trigger_cfg(path, position="bottom_right", patch_size=5), seed=0), expected
  )
  out = poison.apply_trigger(image, _trigger_cfg(path, position="random"), seed=3, example_id=11)
  rows, cols = np.nonzero((out != image).any(-1))
  top, left = rows.min(), cols.min()
  np.testing.assert_array_equal(out[top : top + 5, left : left + 5], patch)
  np.testing.assert_array_equal(
      np.delete(np.delete(out, range(top, top + 5), 0), range(left, left + 5), 1), np.full((7, 15, 3), 200, np.uint8)
  )


def test_poison_info_records_the_patch(tmp_path):
  patch = np.full((3, 3, 3), 9, np.uint8)
  path = tmp_path / "patch.npz"
  poison.save_patch_file(str(path), patch, {"surrogate": "run x", "seed": 5})
  records = [
      {
          "id": np.int64(i),
          "image_path": f"{i}.png",
          "caption": f"a photo {i}",
          "label": np.int64(0),
          "poisoned": np.int8(0),
      }
      for i in range(10)
  ]
  cfg = _trigger_cfg(path, num_poisons=2, caption_source="templates", target_class="dog")
  _, info = poison.poison_source(records, None, cfg, seed=0)
  assert info.backdoor_trigger == "optimized"
  assert info.backdoor_patch["metadata"] == {"surrogate": "run x", "seed": 5}
  assert info.backdoor_patch["shape"] == [3, 3, 3]
  assert info.backdoor_patch["sha256"] == hashlib.sha256(patch.tobytes()).hexdigest()
  assert poison.PoisonInfo.from_json(info.to_json()) == info
  # An info written before the field existed still reads.
  old = json.loads(info.to_json())
  del old["backdoor_patch"]
  assert poison.PoisonInfo.from_json(json.dumps(old)).backdoor_patch is None


def test_bad_patch_files_are_named(tmp_path):
  with pytest.raises(ValueError, match="needs poison.backdoor.patch_file"):
    poison.validate_config(_trigger_cfg(""))
  with pytest.raises(ValueError, match="does not exist"):
    poison.validate_config(_trigger_cfg(tmp_path / "missing.npz"))
  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file at all")
  with pytest.raises(ValueError, match="is not a readable .npz"):
    poison.validate_config(_trigger_cfg(garbage))
  no_metadata = tmp_path / "no_metadata.npz"
  np.savez(no_metadata, patch=np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match=r"lacks \['metadata'\]"):
    poison.validate_config(_trigger_cfg(no_metadata))
  for name, bad in [
      ("float", np.zeros((4, 4, 3), np.float32)),
      ("gray", np.zeros((4, 4), np.uint8)),
      ("oblong", np.zeros((4, 6, 3), np.uint8)),
  ]:
    path = tmp_path / f"{name}.npz"
    np.savez(path, patch=bad, metadata=np.array("{}"))
    with pytest.raises(ValueError, match="must be a square uint8"):
      poison.validate_config(_trigger_cfg(path))
  good = tmp_path / "good.npz"
  poison.save_patch_file(str(good), np.zeros((4, 4, 3), np.uint8), {})
  with pytest.raises(ValueError, match="patch_size=6 but the optimized patch .* is 4 px wide"):
    poison.validate_config(_trigger_cfg(good, patch_size=6))
  with pytest.raises(ValueError, match="4 px wide but the image is 3x8"):
    poison.apply_trigger(np.zeros((3, 8, 3), np.uint8), _trigger_cfg(good), seed=0)
  with pytest.raises(ValueError, match="must be a square uint8"):
    poison.save_patch_file(str(tmp_path / "x.npz"), np.zeros((4, 4, 3), np.int64), {})


def test_a_rewritten_patch_file_is_read_again(tmp_path):
  path = tmp_path / "patch.npz"
  poison.save_patch_file(str(path), np.zeros((2, 2, 3), np.uint8), {})
  image = np.full((4, 4, 3), 100, np.uint8)
  cfg = _trigger_cfg(path, position="top_left")
  assert poison.apply_trigger(image, cfg, seed=0)[0, 0, 0] == 0
  poison.save_patch_file(str(path), np.full((3, 3, 3), 255, np.uint8), {})
  out = poison.apply_trigger(image, cfg, seed=0)
  np.testing.assert_array_equal(out[:3, :3], 255)


# ------------------------------------------------------------------------ the CLI, end to end


def test_cli_writes_a_patch_that_a_poisoned_source_records(surrogate, tmp_path):
  """Imported weights as the surrogate, a tiny demo config: the file, its metadata, the poison info."""
  demo_params = dict(num_classes=4, train_per_class=12, test_per_class=4, image_size=SIZE, seed=0)
  root = demo.ensure_demo_dataset(dict(demo_params, root=str(tmp_path / "demo")))
  weights.export_hf(surrogate.model_config, surrogate.params, str(tmp_path / "hf"))
  config = config_lib.base_config()
  config.model = _tiny_model_config()
  config.data.demo.update(dict(demo_params, root=root))
  config.data.batch_size = 16
  config.poison.backdoor.update(dict(target_class="blue triangle", patch_size=SIDE, position="top_left"))
  out = tmp_path / "patch.npz"
  flag_values = types.SimpleNamespace(
      config=config,
      surrogate=str(tmp_path / "hf"),
      out=str(out),
      target_class=None,
      position=None,
      patch_size=None,
      steps=4,
      lr=None,
      batch_size=8,
      seed=2,
      image_weight=None,
      num_images=20,
      templates=None,
  )
  badclip.main(["badclip"], flag_values)

  patch, meta = poison.load_patch_file(str(out))
  assert patch.shape == (SIDE, SIDE, 3)
  assert meta["target_class"] == "blue triangle" and meta["position"] == "top_left"
  assert (meta["steps"], meta["batch_size"], meta["seed"], meta["num_images"]) == (4, 8, 2, 20)
  assert meta["num_target_images"] == 4  # The held-out split's images of the target class.
  assert meta["surrogate"].startswith("weights ")
  config.poison.enabled = config.poison.backdoor.enabled = True
  config.poison.backdoor.update(dict(trigger="optimized", patch_file=str(out), num_poisons=3))
  config_lib.validate(config)
  _, info = train.build_train_data(config, str(tmp_path))
  with open(tmp_path / "poison_info.json") as f:
    recorded = json.load(f)["backdoor_patch"]
  assert recorded == info.backdoor_patch and recorded["metadata"] == meta
