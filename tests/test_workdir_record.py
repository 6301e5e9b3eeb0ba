"""A workdir never loses its record (issue 23).

* A rerun with a config that shapes the checkpoint or the experiment is refused before anything is written
  (config.json byte for byte unchanged); an allowed change (num_epochs raised) resumes and is recorded.
* A truncated checkpoint file: one-paragraph errors from inspect.load and runs.restore; the trainer falls
  back to the newest checkpoint that restores after moving the bad one aside; several processes get the command.
* Disk full while saving (simulated in the Python write of the checkpoint's files): a clear error, the
  previous checkpoint restorable, and the rerun resumes from it.
"""

import errno
import glob
import json
import os

from etils import epath
import jax
import pytest

from roclip_jax import checkpoint as checkpoint_lib
from roclip_jax import config_lib
from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import runs
from roclip_jax import train
from tests.helpers import tiny_config


def _snapshot(workdir):
  """Every file of the workdir with its bytes."""
  out = {}
  for path in sorted(glob.glob(os.path.join(workdir, "**"), recursive=True)):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        out[os.path.relpath(path, workdir)] = f.read()
  return out


def test_check_rerun_refuses_what_shapes_the_run_and_allows_cadence(tmp_path):
  config = tiny_config("/data/demo")
  runs.write(str(tmp_path), config, {})
  assert runs.check_rerun(str(tmp_path / "new"), config) == {}
  assert runs.check_rerun(str(tmp_path), config) == {}
  allowed = config_lib.override(
      config, {"num_epochs": 12, "log_every_steps": 5, "checkpoint.every_steps": 7, "progress_bar": True}
  )
  assert runs.check_rerun(str(tmp_path), allowed) == {
      "num_epochs": (6, 12),
      "log_every_steps": (1, 5),
      "checkpoint.every_steps": (4, 7),
      "progress_bar": (False, True),
  }
  refused = config_lib.override(config, {"defense": "roclip", "model.text.width": 128, "num_epochs": 12})
  with pytest.raises(config_lib.ConfigError) as error:
    runs.check_rerun(str(tmp_path), refused)
  message = str(error.value)
  assert "defense: 'none' -> 'roclip'" in message and "model.text.width: 64 -> 128" in message
  assert "num_epochs" not in message.split("(old -> new):")[1].split(". They shape")[0]  # Allowed: not listed.
  assert "new --workdir" in message and f"--config.init_from={tmp_path}" in message
  for field, value in (("seed", 1), ("optim.lr", 1e-3), ("data.batch_size", 8), ("poison.enabled", True)):
    with pytest.raises(config_lib.ConfigError, match=f"{field}: "):
      runs.check_rerun(str(tmp_path), config_lib.override(config, {field: value}))
  # An evaluator's cadence may change; a new evaluator may not (the run had none, whatever the defaults say).
  evals = config_lib.override(config, {})
  evals.evals.zeroshot = dict(type="zeroshot", every_steps=0, dataset="demo", split="test")
  with pytest.raises(config_lib.ConfigError, match="evals.zeroshot.type: '<absent>' -> 'zeroshot'"):
    runs.check_rerun(str(tmp_path), evals)
  # A config.json written before a field existed had that field's default.
  with open(tmp_path / runs.CONFIG_FILE) as f:
    saved = json.load(f)
  del saved["data"]["io_retries"]
  with open(tmp_path / runs.CONFIG_FILE, "w") as f:
    json.dump(saved, f)
  assert runs.check_rerun(str(tmp_path), config) == {}


def test_a_changed_config_is_refused_and_an_extended_run_resumes(demo_root, tmp_path):
  workdir = str(tmp_path / "run")
  first = train.train_and_evaluate(tiny_config(demo_root, num_epochs=1), workdir)  # 3 steps.
  assert first["step"] == 3
  before = _snapshot(workdir)
  with pytest.raises(config_lib.ConfigError, match="model.text.width: 64 -> 128"):
    train.train_and_evaluate(tiny_config(demo_root, "roclip", num_epochs=1, **{"model.text.width": 128}), workdir)
  assert _snapshot(workdir) == before  # config.json byte for byte, and everything else.

  extended = train.train_and_evaluate(tiny_config(demo_root, num_epochs=2), workdir)
  assert extended["step"] == 6
  rows = metrics_lib.read_metrics(workdir)
  assert [r for r in rows if r["kind"] == "config"] == [
      {"step": 3, "kind": "config", "config_changes": {"num_epochs": [1, 2]}}
  ]
  assert [r["step"] for r in rows if r["kind"] == "train"] == list(range(1, 7))  # Resumed at 3, not restarted.
  assert runs.read_config(workdir).num_epochs == 2
  assert inspect_lib.load(workdir).step == 6


def _truncate_a_data_file(workdir, step):
  files = glob.glob(os.path.join(workdir, "checkpoints", str(step), "state", "ocdbt.process_0", "d", "*"))
  biggest = max(files, key=os.path.getsize)
  os.truncate(biggest, 1000)
  return os.path.relpath(biggest, os.path.join(workdir, "checkpoints", str(step)))


def test_a_truncated_checkpoint_is_named_then_moved_aside_and_the_run_falls_back(demo_root, tmp_path, caplog):
  workdir = str(tmp_path / "run")
  config = tiny_config(demo_root, max_steps=4, **{"checkpoint.every_steps": 2})
  train.train_and_evaluate(config, workdir)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  assert checkpoint_lib.steps_on_disk(ckpt_dir) == [2, 4]
  truncated = _truncate_a_data_file(workdir, 4)

  # The notebook API and runs.restore: the same one paragraph, naming the step, the directory and the cause.
  messages = []
  for load in (inspect_lib.load, runs.restore):
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
      load(workdir)
    messages.append(str(error.value).replace(error.value.cause, "<cause>"))  # Arrays are read in parallel:
    assert error.value.__cause__ is None and error.value.__suppress_context__  # whichever fails first is named.
    assert "OUT_OF_RANGE" in error.value.cause and "value of size 1000" in error.value.cause
  assert messages[0] == messages[1]
  message = messages[0]
  assert f"Checkpoint step 4 in {ckpt_dir} cannot be restored" in message
  assert f"cannot be restored: <cause>." in message
  assert "step=2" in message and "\n" not in message and len(message) < 1200
  assert inspect_lib.load(workdir, step=2).step == 2

  # Several processes: no fallback, the command that moves the step aside (nothing run, nothing moved).
  ckpt = checkpoint_lib.Checkpointer(ckpt_dir, every_steps=0, max_to_keep=10, async_save=False)
  run = inspect_lib.load(workdir, step=2)
  target = checkpoint_lib.abstract_with_shardings(run.state, jax.tree.map(lambda x: x.sharding, run.state))
  train_data, _ = train.build_train_data(config)
  with pytest.raises(checkpoint_lib.CheckpointError) as error:
    ckpt.restore_newest(target, train_data.iterator, fall_back=False)
  ckpt.close()
  command = f"mkdir -p {ckpt_dir}_unreadable && mv {ckpt_dir}/4 {ckpt_dir}_unreadable/4"
  assert str(error.value).endswith(command) and "every host" in str(error.value)
  assert checkpoint_lib.steps_on_disk(ckpt_dir) == [2, 4]

  # One process: the rerun moves step 4 aside (whole), resumes from 2 and finishes.
  result = train.train_and_evaluate(config, workdir)
  assert result["step"] == 4
  assert os.path.getsize(os.path.join(ckpt_dir + "_unreadable", "4", truncated)) == 1000
  assert checkpoint_lib.steps_on_disk(ckpt_dir) == [2, 4]
  assert f"moved it to {ckpt_dir}_unreadable/4 and resuming from step 2 instead" in caplog.text
  assert inspect_lib.load(workdir).step == 4
  train_steps = [r["step"] for r in metrics_lib.read_metrics(workdir) if r["kind"] == "train"]
  assert train_steps == [1, 2, 3, 4, 3, 4]  # Steps 3 and 4 trained again from step 2.


def fill_the_disk(monkeypatch, directory, allowed):
  """Every `epath.Path.write_text` under `directory` but not under `allowed` raises ENOSPC; returns the paths.

  orbax writes each checkpoint's metadata, and grain its iterator state, through it (tensorstore's C++
  writes cannot be reached from Python): the checkpoint cannot be completed, as on a full disk."""
  write_text, refused = epath.Path.write_text, []

  def full(path, *args, **kwargs):
    name = os.fspath(path)
    if name.startswith(directory) and not name.startswith(allowed):
      refused.append(name)
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), name)
    return write_text(path, *args, **kwargs)

  monkeypatch.setattr(epath.Path, "write_text", full)
  return refused


def test_disk_full_while_saving_stops_with_a_clear_error_and_the_rerun_resumes(demo_root, tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  ckpt_dir = os.path.join(workdir, "checkpoints")
  config = tiny_config(demo_root, max_steps=6, **{"checkpoint.every_steps": 2, "checkpoint.max_to_keep": 1})
  with monkeypatch.context() as patch:
    refused = fill_the_disk(patch, ckpt_dir, allowed=os.path.join(ckpt_dir, "2"))  # Full after the first save.
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
      train.train_and_evaluate(config, workdir)
  assert refused and all("/4.orbax-checkpoint-tmp" in p for p in refused)
  message = str(error.value)
  assert f"Saving the checkpoint of step 4 to {ckpt_dir} failed: OSError: [Errno 28] No space left on device" in message
  assert "free space" in message and "resumes from step 2" in message and "\n" not in message
  assert error.value.__cause__ is None and error.value.__suppress_context__
  assert checkpoint_lib.steps_on_disk(ckpt_dir) == [2]  # max_to_keep=1, and still the previous checkpoint ...
  assert inspect_lib.load(workdir).step == 2  # ... restorable.
  assert not any(r.get("final") for r in metrics_lib.read_metrics(workdir))
  result = train.train_and_evaluate(config, workdir)  # The disk has room again.
  assert result["step"] == 6 and inspect_lib.load(workdir).step == 6
