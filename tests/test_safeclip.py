"""SafeCLIP and CleanCLIP: losses against NumPy formulas, the mixture split against known
mixtures and brute force, and end-to-end runs (phases, split, resume, fine-tuning)."""

import json
import os
import re
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import scipy.stats

from roclip_jax.defenses import cleanclip
from roclip_jax import config_lib
from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax.defenses import roclip
from roclip_jax.defenses import safeclip
from roclip_jax import sharding as sharding_lib
from roclip_jax import train
from tests import helpers
from tests.helpers import assert_trees_bitwise_equal, tiny_config

LOG_SCALE = np.log(10.0)


def unit(rng, n, d=8):
  x = rng.normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_info_nce(q, k, scale=np.exp(LOG_SCALE)):
  """Mean over rows of cross-entropy of softmax(scale * q k^T) against the diagonal."""
  logits = scale * q @ k.T
  logits = logits - logits.max(axis=1, keepdims=True)
  log_softmax = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
  return -np.mean(np.diag(log_softmax))


def np_clip(a, b):
  return 0.5 * (np_info_nce(a, b) + np_info_nce(b, a))


# ----------------------------------------------------------------------------
# Losses.


@pytest.mark.parametrize("num_devices", [1, 8])
def test_masked_losses_equal_the_unmasked_loss_of_the_subset(num_devices):
  """Masking a batch == computing the plain loss on the masked rows only, sharded or not."""
  rng = np.random.default_rng(0)
  a, b = unit(rng, 16), unit(rng, 16)
  mask = rng.random(16) < 0.5
  mesh = sharding_lib.make_mesh([("data", num_devices)], devices=jax.devices()[:num_devices])
  shard = lambda x: jax.device_put(jnp.asarray(x, jnp.float32), sharding_lib.batch_sharding(mesh))
  with jax.set_mesh(mesh):
    got = jax.jit(safeclip.masked_clip_loss)(shard(a), shard(b), jnp.float32(LOG_SCALE), shard(mask))
    full = jax.jit(safeclip.masked_info_nce)(shard(a), shard(b), jnp.float32(LOG_SCALE))
  np.testing.assert_allclose(float(got), np_clip(a[mask], b[mask]), rtol=1e-5)
  np.testing.assert_allclose(float(full), np_info_nce(a, b), rtol=1e-5)
  # Unmasked rows get exactly zero gradient; an empty mask gives loss 0 and no NaN.
  grad = jax.grad(lambda x: safeclip.masked_clip_loss(x, jnp.asarray(b), LOG_SCALE, jnp.asarray(mask)))(
      jnp.asarray(a, jnp.float32)
  )
  assert np.all(np.asarray(grad)[~mask] == 0) and np.all(np.abs(np.asarray(grad)[mask]).sum(1) > 0)
  empty = jnp.zeros(16, bool)
  value, g = jax.value_and_grad(lambda x: safeclip.masked_clip_loss(x, jnp.asarray(b), LOG_SCALE, empty))(
      jnp.asarray(a, jnp.float32)
  )
  assert float(value) == 0.0 and np.all(np.asarray(g) == 0)


def test_nn_contrastive_loss_matches_brute_force():
  rng = np.random.default_rng(1)
  view1, view2, bank_rows = unit(rng, 8), unit(rng, 8), unit(rng, 20)
  bank = roclip.Pool(
      embeddings=jnp.asarray(bank_rows, jnp.float32),
      source_ids=jnp.arange(20),
      source_poisoned=jnp.zeros(20, jnp.int8),
      ptr=jnp.int32(0),
  )
  # Brute force nearest neighbour of each view-1 row.
  nn = np.stack([bank_rows[max(range(20), key=lambda j: float(v @ bank_rows[j]))] for v in view1])
  mask = np.array([1, 0, 1, 1, 0, 1, 1, 1], bool)
  loss, nn_sim = safeclip.nn_contrastive_loss(
      jnp.asarray(view1), jnp.asarray(view2), bank, LOG_SCALE, jnp.asarray(mask)
  )
  np.testing.assert_allclose(float(loss), np_info_nce(view2[mask], nn[mask]), rtol=1e-5)
  np.testing.assert_allclose(np.asarray(nn_sim), np.sum(view1 * nn, axis=1), rtol=1e-5)


def _views(rng, n=12):
  return {k: unit(rng, n) for k in ("image", "text", "image2", "text2")}


def test_safe_split_step_loss_is_clip_on_safe_plus_unimodal_on_risky():
  rng = np.random.default_rng(2)
  z = _views(rng)
  ids = np.arange(12)[::-1]  # The safe mask is read by example id, not by batch row.
  safe_by_id = (np.arange(12) % 3 != 0).astype(np.int8)
  banks = {m: unit(rng, 16) for m in ("image", "text")}
  pool = lambda rows: roclip.Pool(jnp.asarray(rows, jnp.float32), jnp.arange(16), jnp.zeros(16, jnp.int8), jnp.int32(0))
  state = safeclip.SafeState(
      image_bank=pool(banks["image"]),
      text_bank=pool(banks["text"]),
      safe=jnp.asarray(safe_by_id),
      ratio=jnp.float32(0.5),
  )
  zj = {k: jnp.asarray(v, jnp.float32) for k, v in z.items()}
  nn = lambda v, rows: rows[np.argmax(v @ rows.T, axis=1)]
  safe, risky = safe_by_id[ids] > 0, safe_by_id[ids] == 0

  loss, aux = safeclip.step_loss("safe_split", zj, state, jnp.asarray(ids), LOG_SCALE)
  want_clip = 0.5 * (np_clip(z["image"][safe], z["text2"][safe]) + np_clip(z["image2"][safe], z["text"][safe]))
  want_uni = 0.5 * (
      np_info_nce(z["image2"][risky], nn(z["image"], banks["image"])[risky])
      + np_info_nce(z["text2"][risky], nn(z["text"], banks["text"])[risky])
  )
  np.testing.assert_allclose(float(aux["loss_clip"]), want_clip, rtol=1e-5)
  np.testing.assert_allclose(float(aux["loss_unimodal"]), want_uni, rtol=1e-5)
  np.testing.assert_allclose(float(loss), want_clip + want_uni, rtol=1e-5)
  assert float(aux["safe_in_batch"]) == safe.sum()

  loss, _ = safeclip.step_loss("unimodal", zj, state, jnp.asarray(ids), LOG_SCALE)
  want = 0.5 * (
      np_info_nce(z["image2"], nn(z["image"], banks["image"])) + np_info_nce(z["text2"], nn(z["text"], banks["text"]))
  )
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  loss, _ = safeclip.step_loss("cross_clip", zj, state, jnp.asarray(ids), LOG_SCALE)
  np.testing.assert_allclose(
      float(loss), 0.5 * (np_clip(z["image"], z["text2"]) + np_clip(z["image2"], z["text"])), rtol=1e-5
  )


def test_cleanclip_loss_matches_its_formula():
  rng = np.random.default_rng(3)
  z = _views(rng)
  zj = {k: jnp.asarray(v, jnp.float32) for k, v in z.items()}
  cfg = ml_collections.ConfigDict(dict(clip_weight=0.7, inmodal_weight=1.3))
  from roclip_jax import losses

  cross = lambda a, b, s: losses.clip_loss(a, b, s["logit_scale"])
  loss, aux = cleanclip.step_loss(zj, {"logit_scale": jnp.float32(LOG_SCALE)}, cfg, cross)
  inmodal = 0.5 * (np_info_nce(z["image"], z["image2"]) + np_info_nce(z["text"], z["text2"]))
  np.testing.assert_allclose(float(aux["loss_inmodal"]), inmodal, rtol=1e-5)
  np.testing.assert_allclose(float(loss), 0.7 * np_clip(z["image"], z["text"]) + 1.3 * inmodal, rtol=1e-5)


# ----------------------------------------------------------------------------
# The split.


def test_gmm_recovers_a_known_mixture_and_its_posterior():
  rng = np.random.default_rng(4)
  n = 20000
  low = rng.random(n) < 0.3
  x = np.where(low, rng.normal(0.1, 0.05, n), rng.normal(0.6, 0.1, n))
  gmm = safeclip.fit_gmm(x)
  np.testing.assert_allclose(gmm.weights, [0.3, 0.7], atol=0.02)
  np.testing.assert_allclose(gmm.means, [0.1, 0.6], atol=0.01)
  np.testing.assert_allclose(np.sqrt(gmm.variances), [0.05, 0.1], atol=0.01)
  # Posterior against Bayes' rule with scipy's normal density at the fitted parameters.
  pts = np.linspace(-0.1, 0.9, 11)
  dens = [w * scipy.stats.norm.pdf(pts, m, np.sqrt(v)) for w, m, v in zip(gmm.weights, gmm.means, gmm.variances)]
  np.testing.assert_allclose(gmm.posterior_high(pts), dens[1] / (dens[0] + dens[1]), rtol=1e-9, atol=1e-12)

  # The fit is a likelihood maximum: nudging any parameter lowers the likelihood.
  def loglik(w, m, v):
    return np.log(sum(wi * scipy.stats.norm.pdf(x, mi, np.sqrt(vi)) for wi, mi, vi in zip(w, m, v))).sum()

  best = loglik(gmm.weights, gmm.means, gmm.variances)
  for k in range(2):
    for delta in (-0.005, 0.005):
      m = gmm.means.copy()
      m[k] += delta
      assert loglik(gmm.weights, m, gmm.variances) < best


def test_select_safe_threshold_then_growing_top_ratio():
  cfg = ml_collections.ConfigDict(dict(threshold=0.9, ratio_step=0.05, max_ratio=0.6))
  posterior = np.array([0.95, 0.1, 0.91, 0.5, 0.99, 0.2, 0.89, 0.7, 0.3, 0.92])
  safe, ratio = safeclip.select_safe(posterior, first_split=True, previous_ratio=0.0, cfg=cfg)
  assert safe.tolist() == [p >= 0.9 for p in posterior] and ratio == pytest.approx(0.4)
  safe, ratio = safeclip.select_safe(posterior, first_split=False, previous_ratio=ratio, cfg=cfg)
  assert ratio == pytest.approx(0.45)
  brute = sorted(range(10), key=lambda i: -posterior[i])[: round(0.45 * 10)]
  assert set(np.flatnonzero(safe).tolist()) == set(brute)
  _, ratio = safeclip.select_safe(posterior, first_split=False, previous_ratio=0.58, cfg=cfg)
  assert ratio == pytest.approx(0.6)  # Capped.


def test_split_dataset_never_marks_unscored_examples_safe():
  rng = np.random.default_rng(5)
  sims = np.concatenate([rng.normal(0.1, 0.03, 40), rng.normal(0.5, 0.03, 60)])
  sims[[3, 70]] = np.nan
  cfg = ml_collections.ConfigDict(dict(threshold=0.9, ratio_step=0.01, max_ratio=0.85))
  split = safeclip.split_dataset(sims, first_split=True, previous_ratio=0.0, cfg=cfg)
  assert not split.safe[3] and not split.safe[70]
  assert split.safe[40:].sum() == 59 and split.safe[:40].sum() == 0


def test_phases_and_learning_rate_schedule():
  c = config_lib.base_config()
  c.defense = "safeclip"
  c.safeclip.update(dict(inmodal_warmup=2, multimodal_warmup=1, in_lr=0.5, filter_lr=0.01))
  c.optim.update(dict(lr=0.2, warmup_steps=2))
  assert [safeclip.phase_for_epoch(c.safeclip, e) for e in range(1, 6)] == [
      "unimodal",
      "unimodal",
      "cross_clip",
      "safe_split",
      "safe_split",
  ]
  sched = safeclip.learning_rate_schedule(c, steps_per_epoch=10, total_steps=50)
  assert float(sched(2)) == pytest.approx(0.5)  # Peak of the unimodal warm-up.
  assert float(sched(19)) < 0.05  # Cosine towards 0 at the end of the unimodal epochs.
  assert float(sched(20)) == float(sched(29)) == pytest.approx(0.01)  # Constant filter lr.
  assert float(sched(32)) == pytest.approx(0.2)  # Warm-up to optim.lr after the CLIP warm-up.


def test_two_view_configs_are_checked():
  c = config_lib.base_config()
  c.defense = "cleanclip"
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    config_lib.validate(c)
  c = config_lib.base_config()
  c.defense = "safeclip"
  c.num_epochs = 6
  with pytest.raises(config_lib.ConfigError, match="no epoch"):
    config_lib.validate(c)
  c.num_epochs, c.loss, c.model.logit_bias = 10, "siglip", True
  with pytest.raises(config_lib.ConfigError, match="loss"):
    config_lib.validate(c)


# ----------------------------------------------------------------------------
# End to end.


def safeclip_config(demo_root, **overrides):
  return tiny_config(
      demo_root,
      "safeclip",
      **{
          "safeclip.inmodal_warmup": 1,
          "safeclip.multimodal_warmup": 1,
          "safeclip.bank_size": 32,
          "augment.image": True,
          "augment.text": True,
          **overrides,
      },
  )


def test_safeclip_runs_its_phases_and_resumes_exactly(demo_root, tmp_path, capsys):
  """3 steps per epoch: unimodal (steps 1-3), cross CLIP (4-6), splits before steps 7, 10, 13.
  14 steps straight == 7, a restart mid-epoch (the mask comes from the checkpoint), 7 more.
  The straight run shows its progress bars (which change no number) and each split reports its time."""
  n = 14
  straight = tmp_path / "straight"
  capsys.readouterr()
  t0 = time.perf_counter()
  train.train_and_evaluate(safeclip_config(demo_root, max_steps=n, progress_bar=True), str(straight))
  straight_seconds = time.perf_counter() - t0
  # One bar per split pass over the 48 examples, with its rate.
  err = capsys.readouterr().err
  for epoch in (3, 4, 5):
    assert re.search(rf"SafeCLIP split, epoch {epoch}: 100%.* 48\.0/48\.0 .*ex/s", err), err[-2000:]
  split = tmp_path / "split"
  train.train_and_evaluate(safeclip_config(demo_root, max_steps=n // 2, **{"checkpoint.every_steps": 100}), str(split))
  train.train_and_evaluate(safeclip_config(demo_root, max_steps=n), str(split))
  a, b = inspect_lib.load(str(straight)), inspect_lib.load(str(split))
  assert a.step == b.step == n
  assert_trees_bitwise_equal(a.state.params, b.state.params)
  assert_trees_bitwise_equal(a.state.defense, b.state.defense)

  rows = metrics_lib.read_metrics(str(straight))
  modes = {r["step"]: r["mode"] for r in rows if r["kind"] == "train"}
  assert [modes[s] for s in (1, 3, 4, 6, 7, 14)] == [
      "unimodal",
      "unimodal",
      "cross_clip",
      "cross_clip",
      "safe_split",
      "safe_split",
  ]
  splits = [r for r in rows if "safeclip/safe_ratio" in r]
  assert [r["epoch"] for r in splits] == [3, 4, 5]
  for r in splits:  # Each pass took part of the run's time; per 100k = its seconds scaled from the 48 examples.
    assert 0 < r["safeclip/split_seconds"] < straight_seconds
    assert r["safeclip/split_seconds_per_100k"] == pytest.approx(r["safeclip/split_seconds"] * 100_000 / 48)
  # Later splits grow the safe fraction by ratio_step from the first one.
  assert splits[1]["safeclip/safe_ratio"] == pytest.approx(min(0.85, splits[0]["safeclip/safe_ratio"] + 0.01))
  # The stored mask holds round(ratio * N) safe examples of the 48.
  assert int(np.sum(np.asarray(a.state.defense.safe))) == round(splits[-1]["safeclip/safe_ratio"] * 48)
  la = {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}
  lb = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(split)) if r["kind"] == "train"}
  assert la == lb


def test_cleanclip_fine_tunes_a_run_on_clean_data_only(demo_root, tmp_path):
  base_dir = tmp_path / "clip"
  poison = {
      "poison.enabled": True,
      "poison.backdoor.enabled": True,
      "poison.backdoor.num_poisons": 6,
      "poison.backdoor.target_class": "blue circle",
  }
  with open(os.path.join(demo_root, "classes.json")) as f:
    poison["poison.backdoor.target_class"] = json.load(f)["classes"][0]
  train.train_and_evaluate(tiny_config(demo_root, max_steps=3, **poison), str(base_dir))
  base = inspect_lib.load(str(base_dir))

  config = tiny_config(
      demo_root, "cleanclip", init_from=str(base_dir), **poison, **{"cleanclip.num_clean_examples": 32, "max_steps": 2}
  )
  # The weights it starts from are the run's, bitwise.
  from roclip_jax import optim, steps

  mesh = sharding_lib.make_mesh(config.mesh)
  tx, _ = optim.make_optimizer(config.optim, 10)
  _, shardings = steps.abstract_train_state(config, mesh, tx, helpers.defense_for(config))
  params, _ = train.load_init_weights(config, shardings)
  assert_trees_bitwise_equal(params, base.state.params)

  # Its data: 32 records, none of them poisoned (brute force over the whole source).
  data, info = train.build_train_data(config)
  assert len(data.source) == 32 and len(info.poisoned_ids) == 6
  assert not {int(data.source[i]["id"]) for i in range(32)} & set(info.poisoned_ids)
  assert all(int(data.source[i]["poisoned"]) == 0 for i in range(32))
  batch = next(iter(data.iterator))
  assert batch["image2"].shape == batch["image"].shape and batch["text2"].shape == batch["text"].shape

  # The suspicion report screens the poisoned set the starting model saw, not the clean subset.
  from roclip_jax.suspicion import embedding

  screened, _ = embedding.training_source(config)
  screened_ids = {int(screened[i]["id"]) for i in range(len(screened))}
  assert len(screened) == 48 and set(info.poisoned_ids) <= screened_ids

  out = train.train_and_evaluate(config, str(tmp_path / "cleanclip"))
  assert out["step"] == 2
  rows = [r for r in metrics_lib.read_metrics(str(tmp_path / "cleanclip")) if r["kind"] == "train"]
  assert all(np.isfinite(r["loss_inmodal"]) and r["mode"] == "cleanclip" for r in rows)
