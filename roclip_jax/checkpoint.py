"""Orbax checkpoints holding the train state and the input iterator together.

All orbax-version-specific code lives here. One checkpoint step stores
`state` (the whole `TrainState`: params, optimizer, RoCLIP pool and pointer,
RNG, step) and `data` (the grain iterator position), so a resumed run sees
exactly the batches an uninterrupted one would have seen.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import logging
import grain
import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """A thin wrapper over `ocp.CheckpointManager` with items `state` and `data`."""

  def __init__(self, directory: str, *, every_steps: int, max_to_keep: int, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    self.every_steps = every_steps
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        save_interval_steps=max(every_steps, 1),
        enable_async_checkpointing=async_save,
        create=True,
    )
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def maybe_save(self, step: int, state: Any, data_iterator: grain.DatasetIterator, *, force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns whether it saved."""
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
        ),
        force=True,
    )

  def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
    """Restores into `abstract_state` (which carries the target shardings) and
    sets `data_iterator` to the saved position in place."""
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
        ),
    )
    return restored.state

  def restore_state(self, step: int | None, abstract_state: Any) -> Any:
    """Restores only the train state (for evaluation and notebooks)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {self.directory}.")
    restored = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
    return restored.state

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class StopSignal:
  """Turns SIGTERM/SIGINT into a flag the train loop checks once per step.

  The loop then saves a checkpoint and exits cleanly; the next launch with the
  same workdir resumes from it. A second signal falls through to the default
  handler, so a stuck process can still be killed.
  """

  def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
    self._event = threading.Event()
    self._previous = {}
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    logging.warning("Received signal %d: saving a checkpoint and stopping after this step.", signum)
    self._event.set()

  @property
  def requested(self) -> bool:
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
