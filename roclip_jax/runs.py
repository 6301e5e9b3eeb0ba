"""A training run on disk: its config, what the trainer derived from its data, and its checkpointed state.

The trainer writes `config.json` (the experiment exactly as given; nothing
derived is written into it) and `run_info.json` (what it derived from the
data: example count, steps per epoch). `restore` rebuilds the train state of
any checkpoint from those two files; the notebook API (`inspect.load`) and
`config.init_from=<a run's workdir>` both go through it.
"""

from __future__ import annotations

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

CONFIG_FILE = "config.json"
INFO_FILE = "run_info.json"


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


def read_info(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """`run_info.json`; for runs older than that file, what their config recorded."""
  path = os.path.join(workdir, INFO_FILE)
  if os.path.exists(path):
    with open(path) as f:
      return json.load(f)
  config = read_config(workdir) if config is None else config
  # Earlier versions wrote SafeCLIP's example count into the config.
  return {"num_examples": int(config.get("safeclip", {}).get("num_examples", 0) or 0)}


def restore(workdir: str, step: int | None = None, mesh=None) -> tuple[ml_collections.ConfigDict, Any]:
  """The run's config and its train state at `step` (default: the latest checkpoint), replicated on `mesh`
  (default: every local device on one data axis)."""
  config = read_config(workdir)
  info = read_info(workdir, config)
  mesh = sharding_lib.make_mesh([("data", -1)]) if mesh is None else mesh
  tx, _ = optim.make_optimizer(config.optim, total_steps=1)  # The schedule does not shape the state.
  defense = defenses.from_config(config, num_examples=info.get("num_examples", 0))
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
