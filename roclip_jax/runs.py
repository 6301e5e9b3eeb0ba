"""A training run on disk: its config, what the trainer derived from its data, and its checkpointed state.

The trainer writes `config.json` (the experiment exactly as given; nothing
derived is written into it) and `run_info.json` (what it derived from the
data: example count, steps per epoch). `restore` rebuilds the train state of
any checkpoint from those two files; the notebook API (`inspect.load`) and
`config.init_from=<a run's workdir>` both go through it.

A rerun into a workdir must keep its record: `check_rerun` compares the new
config with `config.json` before anything is written or compiled, and refuses
a change to anything outside `RESUMABLE_FIELDS` (docs/architecture.md,
"Rerunning into a workdir").
"""

from __future__ import annotations

import fnmatch
import json
import os
from typing import Any

import jax
import ml_collections

from roclip_jax import checkpoint as checkpoint_lib
from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import optim
from roclip_jax import sharding as sharding_lib
from roclip_jax import steps as steps_lib
from roclip_jax.errors import ConfigError

CONFIG_FILE = "config.json"
INFO_FILE = "run_info.json"

# The config fields a rerun into an existing workdir may change (dotted paths, fnmatch patterns): how long it
# runs, how it is logged, evaluated and checkpointed, how its step is laid out over devices and memory, and
# how storage faults are retried. None of them shapes a checkpoint or what a step computes (gradient
# accumulation is exact). num_epochs extends (or shortens) the run: the learning-rate schedule then spans
# the new total, from the step the run resumes at. Every other field (model, loss, defense and its block,
# data, augment, poison, optim, seed, init_from, evaluators other than their cadence, and any field added
# later) is refused.
RESUMABLE_FIELDS = (
    "num_epochs",
    "max_steps",
    "log_every_steps",
    "progress_bar",
    "checkpoint.*",
    "evals.*.every_steps",
    "mesh",
    "sharding_rules",
    "fsdp_min_size",
    "grad_accum_steps",
    "dry_run",
    "dry_run_devices",
    "data.io_retries",
    "data.io_retry_base_seconds",
)
_ABSENT = "<absent>"
_MAX_LISTED = 12  # Differing fields named in the error; a model swap changes dozens.


def write(workdir: str, config: ml_collections.ConfigDict, info: dict[str, Any]) -> None:
  """Writes the run's config and derived facts (call on one process)."""
  with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, INFO_FILE), "w") as f:
    json.dump(info, f, indent=2)


def read_config(workdir: str) -> ml_collections.ConfigDict:
  """The run's config over today's defaults (`config_lib.base_config`), so a run written before a field
  existed still has every field."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: is {workdir!r} the --workdir of a training run?")
  with open(path) as f:
    saved = json.load(f)
  config = config_lib.base_config()
  _merge(config, saved)
  return config


def _merge(config: ml_collections.ConfigDict, saved: dict[str, Any]) -> None:
  for key, value in saved.items():
    if isinstance(value, dict) and isinstance(config.get(key), ml_collections.ConfigDict):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        config[key] = value


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return json.loads(config.to_json_best_effort())


def config_changes(saved: dict[str, Any], config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (value in `saved`, value in `config`)} for every field that differs.

  `saved` is a config.json's content. A field it lacks (written before that field existed) had today's
  default, except under `evals`, where a missing evaluator is one the run did not have.
  """
  old, new = _flat(saved), _flat(_as_json(config))
  defaults = _flat(_as_json(config_lib.base_config()))
  changes = {}
  for key in sorted(old.keys() | new.keys()):
    before = old.get(key, _ABSENT if key.startswith("evals.") else defaults.get(key, _ABSENT))
    after = new.get(key, _ABSENT)
    if before != after:
      changes[key] = (before, after)
  return changes


def is_resumable(field: str) -> bool:
  return any(fnmatch.fnmatchcase(field, pattern) for pattern in RESUMABLE_FIELDS)


def check_rerun(workdir: str, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """The changes of `config` from the workdir's config.json, if all of them may change on a rerun.

  Returns {} for a new workdir or an unchanged config. Raises ConfigError, listing the fields (old -> new)
  and the fixes, if any other field differs; nothing has been written then.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    saved = json.load(f)
  changes = config_changes(saved, config)
  refused = {k: v for k, v in changes.items() if not is_resumable(k)}
  if not refused:
    return changes
  listed = [f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(refused.items())[:_MAX_LISTED]]
  if len(refused) > _MAX_LISTED:
    listed.append(f"... and {len(refused) - _MAX_LISTED} more")
  raise ConfigError(
      f"--workdir={workdir} holds a run of another config; these fields differ from its {CONFIG_FILE} (old -> "
      f"new): {'; '.join(listed)}. They shape its checkpoints or the experiment, so this run cannot continue "
      f"under them; nothing in the workdir was changed. Fix: train this config with a new --workdir (add "
      f"--config.init_from={workdir} to start from this run's weights, if the model is the same), or drop those "
      f"overrides to resume this run. Fields that may change on a rerun: {', '.join(RESUMABLE_FIELDS)}."
  )


def read_info(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """`run_info.json`; for runs older than that file, what their config recorded."""
  path = os.path.join(workdir, INFO_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = read_config(workdir) if config is None else config
  return {"num_examples": defenses.recorded_num_examples(config)}


def run_facts(info: dict[str, Any]) -> defenses.RunFacts:
  """The facts a run's defense was built from, out of its `read_info`."""
  # Runs older than run_info.json recorded no steps per epoch; no defense's state is shaped by it.
  return defenses.RunFacts(num_examples=info.get("num_examples", 0), steps_per_epoch=info.get("steps_per_epoch", 1))


def restore(workdir: str, step: int | None = None, mesh=None) -> tuple[ml_collections.ConfigDict, Any]:
  """The run's config and its train state at `step` (default: the latest checkpoint), replicated on `mesh`
  (default: every local device on one data axis)."""
  config = read_config(workdir)
  info = read_info(workdir, config)
  mesh = sharding_lib.make_mesh([("data", -1)]) if mesh is None else mesh
  tx, _ = optim.make_optimizer(config.optim, total_steps=1)  # The schedule does not shape the state.
  defense = defenses.from_config(config, run_facts(info))
  abstract, shardings = steps_lib.abstract_train_state(config, mesh, tx, defense)
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"), every_steps=0, max_to_keep=1000, async_save=False
  )
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {ckpt.directory}.")
    state = ckpt.restore_state(step, checkpoint_lib.abstract_with_shardings(abstract, shardings))
  finally:
    ckpt.close()
  return config, state


def place(tree: Any, shardings: Any) -> Any:
  return jax.tree.map(jax.device_put, tree, shardings)
