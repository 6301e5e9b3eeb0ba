"""Where a compiled step's time goes: per-op device time from a profiler trace, grouped by phase.

`bench.throughput --breakdown` uses it on the CLIP step. It traces a few calls with `jax.profiler`
(a Perfetto trace, no TensorBoard needed), keeps the events that name an instruction of the
compiled program (XLA:CPU names its thunks after HLO instructions; GPU kernels carry theirs as
`hlo_op`), and sums their durations per phase, read from each instruction's `op_name`:

* forward: `jvp(...)` without `transpose` (the value-and-grad's forward pass);
* backward: `transpose(jvp(...))`;
* update and rest: everything else (the optimizer, the norms logged as metrics, the loss's
  global-batch plumbing, the defense's state update).

Times are summed over threads (on a CPU several ops run at once), so they add up to more than
the step's time when it runs in parallel; their ratio to the untraced step time is printed as the
step's parallelism. (Tracing slows the calls down, so the traced wall time is not used.)
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import gzip
import json
import os
import re
import tempfile
from typing import Any, Callable

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\((?:[^()]|\([^()]*\))*\)|\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
PHASES = ("forward", "backward", "update and rest")


def phase_of(op_name: str) -> str:
  if "transpose(jvp(" in op_name:
    return "backward"
  if "jvp(" in op_name:
    return "forward"
  return PHASES[2]


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (result shape, op_name) for every instruction of an HLO module's text."""
  found = {}
  for line in hlo_text.splitlines():
    m = _INSTRUCTION.match(line)
    if m:
      op = _OP_NAME.search(line)
      found[m.group(1)] = (m.group(2), op.group(1) if op else "")
  return found


@dataclasses.dataclass
class Breakdown:
  phase_seconds: dict[str, float]  # Per call, summed over threads.
  top_ops: list[tuple[str, str, str, float]]  # (instruction, shape, phase, seconds per call), largest first.

  @property
  def op_seconds(self) -> float:
    return sum(self.phase_seconds.values())

  def format(self, step_seconds: float, top: int = 10) -> str:
    """A table: phases, then the `top` largest ops; `step_seconds` is the untraced step time."""
    total = self.op_seconds
    lines = [
        f"op time per step, summed over threads: {total * 1e3:.1f} ms for a {step_seconds * 1e3:.1f} ms step "
        f"(parallelism {total / step_seconds:.2f})"
    ]
    for phase in PHASES:
      seconds = self.phase_seconds.get(phase, 0.0)
      lines.append(f"  {phase:16s} {seconds * 1e3:7.2f} ms  {100 * seconds / total:5.1f}%")
    lines.append("  largest ops:")
    for name, shape, phase, seconds in self.top_ops[:top]:
      lines.append(f"    {seconds * 1e3:6.2f} ms  {name:28s} {shape[:36]:36s} {phase}")
    return "\n".join(lines)


def profile_calls(compiled: Any, call: Callable[[], Any], calls: int = 5) -> Breakdown:
  """Traces `calls` calls of `call` (which runs `compiled`, a `jax.stages.Compiled`) and sums its ops."""
  known = instructions(compiled.as_text())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
      for _ in range(calls):
        jax.block_until_ready(call())
    paths = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    if not paths:
      raise RuntimeError(f"jax.profiler wrote no Perfetto trace under {trace_dir}.")
    with gzip.open(paths[0]) as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  per_op = collections.Counter()
  for event in events:
    if event.get("ph") != "X":
      continue
    name = (event.get("args") or {}).get("hlo_op") or event["name"]
    if name in known:
      per_op[name] += event.get("dur", 0) * 1e-6 / calls  # Trace durations are microseconds.
  phases = collections.Counter()
  top = []
  for name, seconds in per_op.most_common():
    shape, op_name = known[name]
    phases[phase_of(op_name)] += seconds
    top.append((name, shape, phase_of(op_name), seconds))
  if not per_op:
    raise RuntimeError("The trace has no event named after an instruction of the step; cannot break it down.")
  return Breakdown(dict(phases), top)
