"""End to end: exact resume, SIGTERM save-and-resume, no NaN checkpoint, corrupt data, RoCLIP pool in checkpoints."""

import itertools
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import steps as steps_lib
from roclip_jax import train
from tests.helpers import DEMO, REPO, assert_trees_bitwise_equal, leaves, tiny_config, write_corrupt_csv


@pytest.mark.parametrize("defense", ["none", "roclip"])
def test_resume_is_exact(demo_root, tmp_path, defense):
  """N steps straight == 10 steps, a restart, N - 10 more (params, optimizer, pool: bitwise).

  RoCLIP runs its gated variant (the default) with a matching epoch 4 and the gate acting in every
  step (quorum 0): gated epochs 2, 3 and 5 (its 2-step warm-up ends in epoch 1) and the robust
  variant's matching step (fresh pool, CSLS, content targets, own-example exclusion), end to end. The
  restart falls inside matching epoch 4 (steps 10..12): that epoch's diagnostics must equal the
  straight run's, since their sums are checkpointed with the state.
  """
  n, cut = 14, 10
  gated = {"roclip.variant": "gated", "roclip.first_epoch": 4, "roclip.gate_quorum": 0.0}
  extra = gated if defense == "roclip" else {}
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_config(demo_root, defense, max_steps=n, **extra), str(straight))
  split = tmp_path / "split"
  first = train.train_and_evaluate(
      tiny_config(demo_root, defense, max_steps=cut, **{"checkpoint.every_steps": 100, **extra}), str(split)
  )
  assert first["step"] == cut
  second = train.train_and_evaluate(tiny_config(demo_root, defense, max_steps=n, **extra), str(split))
  assert second["step"] == n
  a, b = inspect_lib.load(str(straight)), inspect_lib.load(str(split))
  assert a.step == b.step == n
  assert_trees_bitwise_equal(a.state.params, b.state.params)
  assert_trees_bitwise_equal(a.state.opt_state, b.state.opt_state)
  if defense == "roclip":
    assert_trees_bitwise_equal(a.state.defense, b.state.defense)
    assert int(a.state.defense.ptr) != 0 or (np.asarray(a.state.defense.source_ids) >= 0).any()
    epochs_a = {r["epoch"]: r for r in metrics_lib.read_metrics(str(straight)) if r["kind"] == "epoch"}
    epochs_b = {r["epoch"]: r for r in metrics_lib.read_metrics(str(split)) if r["kind"] == "epoch"}
    rows_a = [r for r in metrics_lib.read_metrics(str(straight)) if r["kind"] == "epoch"]
    matching = sorted(r["epoch"] for r in rows_a if "roclip/matching_steps" in r)
    assert matching == [4] and epochs_a[4]["roclip/matching_steps"] == 3
    # CLIP epochs write their alignment (the collapse detector's reference) too; gated epochs also
    # the gate's shares (with quorum 0 it acts in every step).
    assert all("roclip/clip_own_similarity" in r for r in rows_a if r["epoch"] != 4)
    assert [r["epoch"] for r in rows_a if "roclip/gate_kept_frac" in r] == [2, 3, 5]
    assert all(
        r["roclip/gate_active_frac"] == 1.0 and 0 <= r["roclip/gate_kept_frac"] <= 1
        for r in rows_a
        if r["epoch"] in (2, 3)
    )
    assert epochs_b[4] == epochs_a[4]
    # The gate's memory voted in the gated steps (one margin per example, compared bitwise above).
    votes = np.asarray(a.state.defense.gate_votes)
    assert votes.dtype == np.int8 and (votes != 0).any()
  # The restarted run logged the same losses as the straight run after the restart.
  la = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(straight)) if r["kind"] == "train"}
  lb = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(split)) if r["kind"] == "train"}
  assert la == lb


def test_roclip_pool_survives_checkpoint_bitwise(demo_root, tmp_path):
  config = tiny_config(demo_root, "roclip", max_steps=6)
  train.train_and_evaluate(config, str(tmp_path))
  run = inspect_lib.load(str(tmp_path))
  pool = run.state.defense
  # Epoch 2 (steps 4..6) is a matching epoch: its 3 batches of 16 went into the
  # 32-row ring, which now holds the last 32 of them (48 distinct examples per epoch).
  assert int(pool.ptr) == (3 * 16) % 32
  ids = np.asarray(pool.source_ids)
  assert (ids >= 0).all() and len(set(ids.tolist())) == 32
  # Restoring the same step again gives the identical pool.
  again = inspect_lib.load(str(tmp_path), step=run.step)
  assert_trees_bitwise_equal(pool, again.state.defense)


def _main_cmd(workdir, demo_root, max_steps):
  flags = [
      f"--config={REPO}/configs/demo.py",
      f"--workdir={workdir}",
      f"--config.data.demo.root={demo_root}",
      f"--config.data.demo.num_classes={DEMO['num_classes']}",
      f"--config.data.demo.train_per_class={DEMO['train_per_class']}",
      f"--config.data.demo.test_per_class={DEMO['test_per_class']}",
      f"--config.data.demo.image_size={DEMO['image_size']}",
      "--config.model.image.image_size=16",
      "--config.model.image.patch_size=8",
      "--config.model.text.context_length=16",
      "--config.data.batch_size=16",
      "--config.num_epochs=40",
      f"--config.max_steps={max_steps}",
      "--config.log_every_steps=1",
      "--config.checkpoint.every_steps=1000",
      "--config.optim.warmup_steps=2",
      "--config.progress_bar=False",
  ]
  return [sys.executable, "-m", "roclip_jax.main", *flags]


def test_sigterm_saves_and_the_restart_finishes_identically(demo_root, tmp_path):
  n = 60
  env = dict(os.environ, PYTHONPATH=REPO)
  killed = tmp_path / "killed"
  proc = subprocess.Popen(
      _main_cmd(killed, demo_root, n), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
  metrics_file = killed / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if metrics_file.exists() and sum(1 for _ in open(metrics_file)) >= 3:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the run ended before it could be signalled:\n" + proc.stdout.read()[-3000:]
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=240)
  assert proc.returncode == 0, out[-3000:]
  saved = sorted(int(d) for d in os.listdir(killed / "checkpoints") if d.isdigit())
  assert saved and 3 <= saved[-1] < n, (saved, out[-2000:])
  # Restart to the end, and compare with a run that was never interrupted.
  done = subprocess.run(_main_cmd(killed, demo_root, n), env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  straight = tmp_path / "straight"
  ok = subprocess.run(_main_cmd(straight, demo_root, n), env=env, capture_output=True, text=True, timeout=300)
  assert ok.returncode == 0, ok.stderr[-3000:]
  a, b = inspect_lib.load(str(killed)), inspect_lib.load(str(straight))
  assert a.step == b.step == n
  assert_trees_bitwise_equal(a.state.params, b.state.params)


def test_a_state_that_went_nan_is_never_checkpointed(demo_root, tmp_path, monkeypatch):
  """Step 4 is a checkpoint step but not a log step, and its update turns every parameter NaN (its loss, computed
  before the update, stays finite). The run must stop there naming the step and the fix, and keep step 2's
  checkpoint as the latest, rather than save the NaN state and fail later at a log step."""
  make_train_steps = steps_lib.make_train_steps

  def diverging_at_step_4(*args, **kwargs):
    calls = itertools.count(1)

    def wrap(step_fn):
      def diverging(state, batch):
        state, metrics = step_fn(state, batch)
        if next(calls) == 4:
          state = state.replace(params=jax.tree.map(lambda x: x * jnp.nan, state.params))
          metrics = dict(metrics, param_norm=optax.global_norm(state.params))
        return state, metrics

      return diverging

    return {mode: wrap(fn) for mode, fn in make_train_steps(*args, **kwargs).items()}

  monkeypatch.setattr(steps_lib, "make_train_steps", diverging_at_step_4)
  config = tiny_config(demo_root, max_steps=8, log_every_steps=5, **{"checkpoint.every_steps": 2})
  with pytest.raises(FloatingPointError, match=r"param_norm=nan at step 4\b.*config\.optim\.lr.*step 2\b"):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit()) == [2]
  run = inspect_lib.load(str(tmp_path))
  assert run.step == 2 and all(np.isfinite(x).all() for x in leaves(run.state.params))


def test_corrupt_images_and_bad_rows_are_skipped_and_counted(demo_root, tmp_path):
  csv_path = write_corrupt_csv(tmp_path)
  # 31 usable rows (30 + the missing file; the empty caption is dropped), 2 undecodable.
  config = tiny_config(
      demo_root, **{"data.source": "csv", "data.csv_path": str(csv_path), "data.batch_size": 8, "num_epochs": 3}
  )
  workdir = tmp_path / "run"
  result = train.train_and_evaluate(config, str(workdir))
  rows = [r for r in metrics_lib.read_metrics(str(workdir)) if r["kind"] == "train"]
  assert result["step"] == 3 * (31 // 8)
  assert all(np.isfinite(r["loss"]) for r in rows)
  # Each epoch reads the truncated JPEG and the missing file once.
  skipped = rows[-1]["skipped_examples"]
  assert 4 <= skipped <= 6, skipped
