"""Orbax checkpoints holding the train state and the input iterator together.

All orbax-version-specific code lives here. One checkpoint step stores
`state` (the whole `TrainState`: params, optimizer, RoCLIP pool and pointer,
RNG, step) and `data` (the grain iterator position), so a resumed run sees
exactly the batches an uninterrupted one would have seen.

Two guards keep a checkpoint trustworthy: a non-finite state is never saved
(`Checkpointer.maybe_save` with the step's metrics), and on a multi-process run
every process agrees on the step at which a signal saves and stops
(`StopSignal.should_stop`), since orbax's save is collective.

A checkpoint that cannot be written (disk full, a read-only mount) or read (a
truncated file) is a `CheckpointError` of one paragraph: the step, the
directory, the cause and the fix. A failed save never touches the previous
checkpoints (orbax writes into a temporary directory and deletes old steps only
after a save is complete). `Checkpointer.restore_newest` falls back past
checkpoints that fail to restore, moving them aside (docs/architecture.md,
"Rerunning into a workdir").
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

UNREADABLE_SUFFIX = "_unreadable"  # checkpoints/ -> checkpoints_unreadable/: where unrestorable steps are moved.
_CAUSE_CHARS = 400  # Of the innermost error's first line (tensorstore appends its whole spec).


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be saved or restored; the message names the step, the directory, the cause and
  the fix."""

  def __init__(self, message: str, *, step: int | None = None, cause: str = ""):
    super().__init__(message)
    self.step, self.cause = step, cause


def error_cause(error: BaseException) -> str:
  """The innermost error behind `error`, as 'Type: first line' (orbax wraps tensorstore's error, which names
  the file and the byte range, in one that dumps the array's spec)."""
  seen = set()
  while id(error) not in seen and (error.__cause__ or error.__context__) is not None:
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  text = lines[0] if lines else ""
  if len(text) > _CAUSE_CHARS:
    text = text[:_CAUSE_CHARS] + " ..."
  return f"{type(error).__name__}: {text}" if text else type(error).__name__


def steps_on_disk(directory: str) -> list[int]:
  """The complete checkpoint steps under `directory` (a save in progress or one that failed is a temporary
  directory, not listed)."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


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
    self._pending_step: int | None = None  # The step of the last save started (async: maybe still writing).
    self._save_failed = False  # A save error was raised: close() does not raise it again.

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
    self.wait()  # orbax waits for the previous save here anyway; this names that save's step if it failed.
    try:
      saved = self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(data_iterator)
          ),
          force=True,
      )
    except Exception as e:  # OSError (ENOSPC, EROFS, EIO), or tensorstore's errors, raised here or in the background.
      raise self._save_error(step, e) from None
    self._pending_step = step
    return saved

  def restore(self, step: int, abstract_state: Any, data_iterator: grain.DatasetIterator) -> Any:
    """Restores into `abstract_state` (which carries the target shardings) and
    sets `data_iterator` to the saved position in place. Raises CheckpointError."""
    args = ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=grain.checkpoint.CheckpointRestore(data_iterator)
    )
    return self._restore(step, args)

  def restore_state(self, step: int | None, abstract_state: Any) -> Any:
    """Restores only the train state (for evaluation and notebooks). Raises CheckpointError."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"No checkpoint under {self.directory}.")
    if step not in self._manager.all_steps():
      raise FileNotFoundError(f"No checkpoint of step {step} under {self.directory}; its steps: {self._steps_text()}.")
    return self._restore(step, ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))

  def _restore(self, step: int, args: ocp.args.Composite) -> Any:
    try:
      return self._manager.restore(step, args=args).state
    except Exception as e:  # orbax and tensorstore raise ValueError, OSError, bare Exception... by file and fault.
      raise self._restore_error(step, e) from None

  def _restore_error(self, step: int, error: BaseException) -> CheckpointError:
    cause = error_cause(error)
    hint = ""
    if "tree structures do not match" in cause:
      hint = (
          " The run's config.json does not describe this checkpoint (a different model, defense or optimiser: "
          "was config.json overwritten?)."
      )
    others = [s for s in self._manager.all_steps() if s != step]
    fix = (
        f"restore another step (inspect.load(workdir, step={max(others)}) or runs.restore(workdir, "
        f"step={max(others)}); steps on disk: {self._steps_text()}), or"
        if others
        else "check the storage, or"
    )
    return CheckpointError(
        f"Checkpoint step {step} in {self.directory} cannot be restored: {cause}.{hint} Fix: {fix} rerun "
        f"training with this workdir: a single-process run moves unrestorable steps aside to "
        f"{self.unreadable_directory} (nothing is deleted) and resumes from the newest step that restores.",
        step=step,
        cause=cause,
    )

  def _steps_text(self) -> str:
    return ", ".join(str(s) for s in sorted(self._manager.all_steps())) or "none"

  @property
  def unreadable_directory(self) -> str:
    return self.directory + UNREADABLE_SUFFIX

  def restore_newest(
      self, abstract_state: Any, data_iterator: grain.DatasetIterator, *, fall_back: bool
  ) -> tuple[int | None, Any]:
    """(step, state) of the newest checkpoint that restores; (None, None) if there is none.

    `fall_back`: a checkpoint that fails to restore is moved aside to
    `unreadable_directory` (renamed, nothing deleted; logged) once an older one
    has restored. If none restores, nothing is moved and a CheckpointError names
    each step's cause. Without `fall_back` (several processes, which would each
    decide on their own what they can read), the first failure stops the run
    with the command that moves that step aside.
    """
    failures: list[CheckpointError] = []
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except CheckpointError as e:
        if not fall_back:
          raise CheckpointError(
              f"Checkpoint step {step} in {self.directory} cannot be restored: {e.cause}. Several processes "
              "restore together and each reads only its own shards, so one cannot fall back to an older step on "
              f"its own. Fix: move it aside (nothing is deleted) and rerun the same command on every host; the "
              f"run resumes from the newest step that restores:\n  {self.move_aside_command(step)}",
              step=step,
              cause=e.cause,
          ) from None
        logging.error("%s", e)
        failures.append(e)
        continue
      for failure in failures:
        moved = self._move_aside(failure.step)
        logging.warning(
            "Checkpoint step %d could not be restored (%s); moved it to %s and resuming from step %d instead. "
            "To use it again, move it back: mv %s %s",
            failure.step,
            failure.cause,
            moved,
            step,
            moved,
            os.path.join(self.directory, str(failure.step)),
        )
      if failures:
        self._manager.reload()
      return step, state
    if failures:
      causes = "; ".join(f"step {e.step}: {e.cause}" for e in failures)
      raise CheckpointError(
          f"No checkpoint in {self.directory} can be restored ({causes}); nothing was moved. Fix: if the "
          "storage is back, rerun; if the checkpoints are lost, train afresh with a new --workdir.",
          step=failures[0].step,
          cause=failures[0].cause,
      )
    return None, None

  def _destination(self, step: int) -> str:
    base = os.path.join(self.unreadable_directory, str(step))
    suffix = 0
    while os.path.exists(base if not suffix else f"{base}.{suffix}"):
      suffix += 1
    return base if not suffix else f"{base}.{suffix}"

  def move_aside_command(self, step: int) -> str:
    return (
        f"mkdir -p {self.unreadable_directory} && mv {os.path.join(self.directory, str(step))} "
        f"{self._destination(step)}"
    )

  def _move_aside(self, step: int) -> str:
    destination = self._destination(step)
    os.makedirs(self.unreadable_directory, exist_ok=True)
    os.rename(os.path.join(self.directory, str(step)), destination)
    return destination

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
    """Waits for the last save to be written; raises CheckpointError if it failed."""
    try:
      self._manager.wait_until_finished()
    except Exception as e:
      if not self._save_failed:  # orbax may raise one failure again from another of its futures.
        raise self._save_error(self._pending_step, e) from None

  def close(self) -> None:
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception as e:
        if not self._save_failed:
          raise self._save_error(self._pending_step, e) from None

  def _save_error(self, step: int | None, error: BaseException) -> CheckpointError:
    """The run stops: `step`'s checkpoint was not written, and the older ones are as they were."""
    self._save_failed = True
    complete = steps_on_disk(self.directory)
    resume = f"resumes from step {complete[-1]}" if complete else "starts from scratch (no checkpoint is complete)"
    what = f"the checkpoint of step {step}" if step is not None else "a checkpoint"
    return CheckpointError(
        f"Saving {what} to {self.directory} failed: {error_cause(error)}. The run stopped; the checkpoints "
        f"already there are untouched (complete steps: {', '.join(map(str, complete)) or 'none'}). Fix: free "
        f"space on that disk or remount it read-write (df -h {self.directory}), then rerun with this workdir: "
        f"it {resume}.",
        step=step,
        cause=error_cause(error),
    )


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
