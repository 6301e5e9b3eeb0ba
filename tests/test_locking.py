"""LiT-style tower locking: the locked tower (and a locked ResNet's BatchNorm statistics) stays
bitwise unchanged through training with weight decay on, while the other tower trains."""

import jax
import numpy as np
import pytest

from roclip_jax import config_lib
from roclip_jax import models
from roclip_jax import optim
from roclip_jax import sharding
from roclip_jax import steps
from tests import helpers

B = 16
# The parameter subtrees of each tower, written out by hand from models/clip.py.
IMAGE_TOWER = {"vision_model", "visual_projection"}
TEXT_TOWER = {"text_model", "text_projection"}


def _config(preset, lock, accum=1):
  c = config_lib.base_config()
  c.model = models.preset(preset)
  if preset == "tiny":
    c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 8
  c.data.batch_size = B
  c.grad_accum_steps = accum
  c.optim.lock = lock
  c.optim.lr = 1e-2
  c.optim.weight_decay = 0.5  # Large, so an un-masked decay would show at once.
  c.optim.warmup_steps = 0
  return c


def _batch(rng, image_size):
  tokens = rng.integers(1, 1000, size=(B, 8)).astype(np.int32)
  tokens[:, 0], tokens[:, 5], tokens[:, 6:] = 49406, 49407, 0
  return {
      "image": rng.integers(0, 256, size=(B, image_size, image_size, 3), dtype=np.uint8),
      "text": tokens,
      "id": np.arange(B, dtype=np.int64),
      "label": np.zeros(B, np.int64),
      "poisoned": np.zeros(B, np.int8),
  }


def _changed(before, after):
  return any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))


@pytest.mark.parametrize("preset, lock, accum", [("tiny", "image", 1), ("tiny", "text", 2), ("tiny-rn", "image", 1)])
def test_locked_tower_is_bitwise_unchanged_and_the_other_trains(preset, lock, accum):
  config = _config(preset, lock, accum)
  config_lib.validate(config, num_batch_shards=8)
  mesh = sharding.make_mesh([("data", -1)])
  tx, schedule = optim.make_optimizer(config.optim, total_steps=10)
  spec = steps.ModelSpec.create(config.model)
  defense = helpers.defense_for(config)
  _, shardings = steps.abstract_train_state(config, mesh, tx, defense)
  state = steps.create_train_state(config, mesh, tx, shardings, defense)
  before = jax.device_get((state.params, state.model_state))
  step = steps.make_train_steps(config, mesh, spec, tx, schedule, shardings, defense)["clip"]
  rng = np.random.default_rng(0)
  for _ in range(3):
    with jax.set_mesh(mesh):
      state, metrics = step(state, sharding.global_batch(_batch(rng, config.model.image.image_size), mesh))
  params, model_state = jax.device_get((state.params, state.model_state))
  locked, trained = (IMAGE_TOWER, TEXT_TOWER) if lock == "image" else (TEXT_TOWER, IMAGE_TOWER)
  assert np.isfinite(metrics["loss"])
  for name in locked & set(params):
    assert not _changed(before[0][name], params[name]), f"locked {name} changed"
  for name in trained & set(params):
    assert _changed(before[0][name], params[name]), f"trainable {name} did not change"
  assert params["logit_scale"] != before[0]["logit_scale"]
  if preset == "tiny-rn":  # A locked ResNet runs in inference mode: its BatchNorm statistics stay put.
    assert jax.tree.leaves(model_state) and not _changed(before[1], model_state)


def test_lock_labels_follow_the_parameter_tree():
  params = {
      "vision_model": {"a": 0},
      "visual_projection": {"kernel": 0},
      "text_model": {"b": {"c": 0}},
      "text_projection": {"kernel": 0},
      "logit_scale": 0,
  }
  image = optim.lock_labels(params, "image")
  assert image == {
      "vision_model": {"a": "frozen"},
      "visual_projection": {"kernel": "frozen"},
      "text_model": {"b": {"c": "trained"}},
      "text_projection": {"kernel": "trained"},
      "logit_scale": "trained",
  }
  text = optim.lock_labels(params, "text")
  assert text["text_model"] == {"b": {"c": "frozen"}} and text["vision_model"] == {"a": "trained"}
  with pytest.raises(ValueError, match="optim.lock"):
    optim.lock_labels(params, "both")


def test_bad_lock_is_rejected_with_the_fix():
  config = _config("tiny", "towers")
  with pytest.raises(config_lib.ConfigError, match="optim.lock.*'image' or 'text'"):
    config_lib.validate(config)
  config = _config("tiny", "image")
  config.defense = "roclip"
  with pytest.raises(config_lib.ConfigError, match="optim.lock='text'"):
    config_lib.validate(config)
