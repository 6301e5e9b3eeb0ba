"""Metric output: `workdir/metrics.jsonl`, TensorBoard event files, a progress line.

Only process 0 writes. Values arrive as host floats: the trainer fetches device
metrics at log steps only, so writing never adds a host sync.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Mapping

import jax
import numpy as np
import tqdm


def _to_python(value: Any) -> Any:
  if isinstance(value, (np.generic, np.ndarray)) or hasattr(value, "dtype"):
    value = np.asarray(value)
    return value.item() if value.ndim == 0 else value.tolist()
  return value


class MetricWriter:

  def __init__(self, workdir: str, *, enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._jsonl = None
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter  # Imported lazily: optional at notebook time.

      self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, Any], kind: str = "train") -> None:
    if not self.enabled:
      return
    row = {"step": int(step), "kind": kind}
    row.update({k: _to_python(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(row) + "\n")
    if self._tb is not None:
      for key, value in row.items():
        if key in ("step", "kind"):
          continue
        if isinstance(value, (int, float)) and math.isfinite(value):
          self._tb.add_scalar(key if "/" in key else f"{kind}/{key}", value, step)
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  path = os.path.join(workdir, "metrics.jsonl")
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class Progress:
  """A tqdm bar over steps showing pairs/s, loss and epoch; rate from wall time."""

  def __init__(self, total_steps: int, start_step: int, global_batch: int, *, enabled: bool):
    self.global_batch = global_batch
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        unit="step",
        mininterval=1.0,
    )
    self._last_time = time.perf_counter()
    self._last_step = start_step

  def update(self, step: int, **postfix: Any) -> float:
    """Advances to `step`; returns pairs/s since the previous call."""
    now = time.perf_counter()
    steps = step - self._last_step
    rate = steps * self.global_batch / max(now - self._last_time, 1e-9)
    self._bar.update(steps)
    self._bar.set_postfix({"pairs/s": f"{rate:,.0f}", **postfix}, refresh=False)
    self._last_time, self._last_step = now, step
    return rate

  def close(self) -> None:
    self._bar.close()


class _DropLibraryInfo:
  """Drops INFO lines from chatty libraries (orbax logs every save step by step)."""

  PREFIXES = ("orbax", "etils", "grain")

  def filter(self, record) -> bool:
    return record.levelno > 20 or not any(f"/{p}/" in record.pathname for p in self.PREFIXES)


def quiet_library_logs() -> None:
  from absl import logging

  handler = logging.get_absl_handler()
  if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
    handler.addFilter(_DropLibraryInfo())
