"""Multi-host: 2 processes x 4 CPU devices on loopback == 1 process x 8 devices; the AOT dry run via main.

The two processes read disjoint halves of the data (per-host slices), so the
single-process reference reads both halves itself and concatenates them in
process order, the layout `make_array_from_process_local_data` gives the
2-process global batch. Everything else is the same `train_and_evaluate`.
"""

import dataclasses
import json
import os
import subprocess
import sys
from unittest import mock

import jax
import numpy as np
import optax

from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import train
from roclip_jax.data import pipeline
from tests import helpers

MAX_STEPS = 6  # 48 examples, batch 16: 3 steps per epoch; epoch 2 (steps 4-6) is a RoCLIP matching epoch.
TIMEOUT_S = 240


def _overrides(demo_root):
  return helpers.two_process_overrides(demo_root, num_epochs=4, max_steps=MAX_STEPS)


def _wait(procs) -> list[str]:
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=TIMEOUT_S)[0])
  finally:
    for p in procs:  # A process whose peer died waits on the coordinator forever: end it.
      if p.poll() is None:
        p.kill()
        p.communicate()
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


class _ConcatenatedHosts:
  """One iterator over several hosts' iterators: their local batches, concatenated in process order."""

  def __init__(self, iterators):
    self._iterators = iterators

  def __iter__(self):
    return self

  def __next__(self):
    batches = [next(it) for it in self._iterators]
    return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:  # The non-grain branch of grain's checkpoint handler.
    return json.dumps([it.get_state() for it in self._iterators]).encode()


def _single_process_reference(workdir, demo_root):
  from configs import demo as demo_config

  config = demo_config.get_config("defense=roclip")
  for key, value in _overrides(demo_root).items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  make_train_data = pipeline.make_train_data

  def as_two_hosts(config, *, process_index, process_count, **kwargs):
    assert (process_index, process_count) == (0, 1)
    hosts = [make_train_data(config, process_index=i, process_count=2, **kwargs) for i in range(2)]
    return dataclasses.replace(
        hosts[0],
        iterator=_ConcatenatedHosts([h.iterator for h in hosts]),
        local_batch_size=2 * hosts[0].local_batch_size,
    )

  assert jax.process_count() == 1 and jax.device_count() == 8
  with mock.patch.object(pipeline, "make_train_data", as_two_hosts):
    return train.train_and_evaluate(config, str(workdir))


def _train_rows(workdir):
  return [r for r in metrics_lib.read_metrics(str(workdir)) if r["kind"] == "train"]


def test_two_processes_train_like_one_and_their_checkpoint_restores_in_one(demo_root, tmp_path):
  multi, single = tmp_path / "two_processes", tmp_path / "one_process"
  procs = helpers.start_two_processes(multi, _overrides(demo_root))
  try:  # The reference trains meanwhile: both mostly compile, and compiling is single-threaded.
    _single_process_reference(single, demo_root)
  finally:
    outputs = _wait(procs)
  assert '"step": 6' in outputs[0] and '"step": 6' not in outputs[1]  # Only process 0 prints results.

  rows_multi, rows_single = _train_rows(multi), _train_rows(single)
  assert [r["step"] for r in rows_multi] == list(range(1, MAX_STEPS + 1))  # Written once, by process 0.
  assert [r["mode"] for r in rows_multi] == ["clip"] * 3 + ["match"] * 3
  for key in ("loss", "grad_norm", "param_norm", "roclip/match_similarity"):
    np.testing.assert_allclose(
        [r.get(key, 0.0) for r in rows_multi], [r.get(key, 0.0) for r in rows_single], rtol=2e-5, err_msg=key
    )

  # Both processes' halves of the sharded state went into one checkpoint; one process restores it.
  restored = inspect_lib.load(str(multi))
  reference = inspect_lib.load(str(single))
  assert restored.step == reference.step == MAX_STEPS
  # The live 2-process run logged the norm of its final params: the checkpoint holds exactly those.
  np.testing.assert_allclose(float(optax.global_norm(restored.params)), rows_multi[-1]["param_norm"], rtol=1e-6)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=2e-5)
  np.testing.assert_array_equal(np.asarray(restored.pool.source_ids), np.asarray(reference.pool.source_ids))
  grain_states = set(os.listdir(multi / "checkpoints" / str(MAX_STEPS) / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= grain_states  # Each host's input position.


def test_dry_run_through_main_fakes_the_requested_devices(tmp_path):
  env = dict(os.environ, PYTHONPATH=helpers.REPO)  # Inherits the 8-device XLA_FLAGS; the dry run must override it.
  cmd = [
      sys.executable,
      "-m",
      "roclip_jax.main",
      f"--config={helpers.REPO}/configs/demo.py",
      f"--workdir={tmp_path}",
      "--config.dry_run=True",
      "--config.dry_run_devices=16",
      "--config.mesh=(('data', -1), ('fsdp', 4))",
      "--config.data.batch_size=32",
      "--config.model.image.image_size=16",
      "--config.model.image.patch_size=8",
      "--config.model.text.context_length=16",
      "--config.data.demo.root=/nonexistent/never/read",
  ]
  done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
  assert done.returncode == 0, done.stderr[-4000:]
  assert "step 'clip' on 16 devices" in done.stdout and "peak memory" in done.stdout
  results = json.loads(done.stdout[done.stdout.index("{") :])
  assert results["num_devices"] == 16 and results["mesh"] == str({"data": 4, "fsdp": 4})
  assert results["clip/flops"] > 0 and results["clip/peak_bytes"] > 0
  assert list(tmp_path.iterdir()) == []
