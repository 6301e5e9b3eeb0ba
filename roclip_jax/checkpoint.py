"""Orbax checkpoints holding the train state and the input iterator together.

All orbax-version-specific code lives here. One checkpoint step stores
`state` (the whole `TrainState`: params, optimizer, RoCLIP pool and pointer,
RNG, step) and `data` (the grain iterator position), so a resumed run sees
exactly the batches an uninterrupted one would have seen.

Two guards keep a checkpoint trustworthy: a non-finite state is never saved
(`Checkpointer.maybe_save` with the step's metrics), and on a multi-process run
every process agrees on the step at which a signal saves and stops
(`StopSignal.should_stop`), since orbax's save is collective.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from absl import logging
import grain
import jax
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

# The step metrics that must be finite for a state to be saved: the loss, and the norm of the
# parameters after the update (NaN or inf if any parameter is).
FINITE_KEYS = ("loss", "param_norm")


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

  def maybe_save(
      self,
      step: int,
      state: Any,
      data_iterator: grain.DatasetIterator,
      *,
      force: bool = False,
      metrics: dict[str, Any] | None = None,
  ) -> bool:
    """Saves if `step` is on the interval (or `force`) and not saved yet; returns whether it saved.

    `metrics` are the device metrics of the step that produced `state`. They are
    read to host only here, when a save is due (no sync on other steps), and a
    non-finite loss or parameter norm raises instead of saving, so the last good
    checkpoint stays the latest. On a multi-process run every process reads the
    same global scalars, so all raise at the same step and none saves alone.
    """
    if not force and (self.every_steps <= 0 or step % self.every_steps):
      return False
    if step in self._manager.all_steps():
      return False
    if metrics is not None:
      self.assert_finite(step, metrics)
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

  def assert_finite(self, step: int, metrics: dict[str, Any]) -> None:
    """Raises FloatingPointError if step `step`'s loss or parameter norm is NaN or infinite.

    Reads those scalars to host (a sync with the device), so callers do it at
    log and save steps only.
    """
    values = jax.device_get({k: metrics[k] for k in FINITE_KEYS if k in metrics})
    bad = ", ".join(f"{k}={float(v)}" for k, v in values.items() if not np.isfinite(v))
    if not bad:
      return
    latest = self.latest_step()
    resume = "from scratch" if latest is None else f"from the checkpoint of step {latest}"
    raise FloatingPointError(
        f"Non-finite {bad} at step {step}: training diverged, and this state is not checkpointed. Fix: lower "
        f"config.optim.lr or set config.optim.grad_clip_norm; rerunning with this workdir resumes {resume}."
    )

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def abstract_with_shardings(state: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class StopSignal:
  """Turns SIGTERM/SIGINT into a save-and-stop that every process agrees on.

  The loop asks `should_stop(step)` after every step; once it says yes, the loop
  saves a checkpoint of that step and exits cleanly, and the next launch with
  the same workdir resumes from it. A second signal falls through to the
  previous handler, so a stuck process can still be interrupted.

  One process: the signal sets a flag; no collective, no host sync.

  Several processes: orbax's save is collective, so a process that stopped a
  step earlier than its peers would wait for them forever. The processes must
  agree, and (a cluster often signals only some hosts, and not at once) a
  process must stop even if only a peer was signalled. jax's preemption service
  (`multihost_utils.reached_preemption_sync_point`, on by default after
  `jax.distributed.initialize`) does this off the critical path: its own
  SIGTERM handler posts a notice to the coordination service, a background
  thread on every process agrees on the step after the furthest one reached,
  and each per-step call is a local, lock-guarded comparison: no collective and
  no host sync. So SIGTERM is left to that service's handler, and SIGINT is
  forwarded to it as SIGTERM. That handler swallows every SIGTERM: a stuck
  process then needs a second SIGINT or SIGKILL. A notice that arrives before
  this object registers `first_step` (during restore) may be agreed on a step
  the run never reaches; the run then ends at the scheduler's kill and resumes
  from its last periodic checkpoint.

  If the preemption service is disabled (`jax_enable_preemption_service`), the
  processes instead take the maximum of their flags every step with
  `multihost_utils.process_allgather`: a tiny collective whose result the host
  waits for, i.e. a host-device sync per step that costs throughput.
  """

  def __init__(self, first_step: int = 0, signals=(signal.SIGTERM, signal.SIGINT)):
    """`first_step`: the step the loop starts from (the same on every process)."""
    self._event = threading.Event()
    self._previous = {}
    self.mode = "local"
    if jax.process_count() > 1:
      try:  # Also registers `first_step` with the service, for a notice that arrives before the first step.
        multihost_utils.reached_preemption_sync_point(first_step)
        self.mode = "preemption_service"
      except RuntimeError:
        logging.warning(
            "jax's preemption service is disabled: processes agree on stopping with a collective "
            "(and a host sync) every step."
        )
        self.mode = "allgather"
    if threading.current_thread() is threading.main_thread():
      for sig in signals:
        if sig == signal.SIGTERM and self.mode == "preemption_service":
          continue  # The service's own (C++) handler catches it; replacing that handler would blind the service.
        self._previous[sig] = signal.signal(sig, self._handle)

  def _handle(self, signum, frame):
    del frame
    if self._event.is_set():
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      os.kill(os.getpid(), signum)
      return
    self._event.set()
    if self.mode == "preemption_service":
      logging.warning(
          "Received signal %d: passing it to jax's preemption service, which picks the step at which "
          "all processes save and stop.",
          signum,
      )
      os.kill(os.getpid(), signal.SIGTERM)
    else:
      logging.warning("Received signal %d: saving a checkpoint and stopping after this step.", signum)

  def should_stop(self, step: int) -> bool:
    """Whether to save and stop after `step`: the same answer on every process.

    Call it after every step, with consecutive steps (the preemption service
    agrees on the step after the furthest one any process has passed here).
    """
    if self.mode == "preemption_service":
      return multihost_utils.reached_preemption_sync_point(step)
    if self.mode == "allgather":
      return bool(np.max(multihost_utils.process_allgather(np.int32(self._event.is_set()))))
    return self._event.is_set()

  def restore_handlers(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}
