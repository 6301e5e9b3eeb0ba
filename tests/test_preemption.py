"""Preemption of a multi-host run: SIGTERM to one process of two; both save the same step, and the rerun is exact.

A cluster often signals only some hosts of a job, and not at once. orbax's save
is collective, so a process that saved and stopped on its own would leave its
peer waiting in the next step's collectives (or in the save) forever. Same
2 processes x 4 CPU devices on loopback as tests/test_multihost.py.

Run as a module (`python -m tests.test_preemption FLAGS`), this file is
`roclip_jax.main` with a pause before every step: the signalled run must not
reach its last step before the notice has gone round, which with jax's
preemption service (it polls for SIGTERM once a second) a tiny model on a fast
machine would.
"""

import json
import os
import re
import signal
import subprocess
import time

from roclip_jax import inspect as inspect_lib
from roclip_jax import metrics as metrics_lib
from tests import helpers

MAX_STEPS = 12  # 4 epochs of 3 steps; RoCLIP matches in epochs 2 and 4.
SIGNAL_AFTER_STEP = 2  # Process 1 is signalled once process 0 has logged this step.
PAUSE_S = 0.3  # Before each step of a signalled run: 10 steps left take 3 seconds at least.
TIMEOUT_S = 240
STOP_TIMEOUT_S = 90  # From the signal to both processes' exit: a save of a tiny model, or a hang.


def _start(workdir, demo_root, *, paused=False, env=None):
  """Both processes of one run; only their overrides differ from tests/test_multihost.py's.

  `paused`: through this module's main, which pauses before each step.
  """
  overrides = helpers.two_process_overrides(demo_root, num_epochs=MAX_STEPS // 3, max_steps=MAX_STEPS)
  module = "tests.test_preemption" if paused else "roclip_jax.main"
  return helpers.start_two_processes(workdir, overrides, module=module, env=env)


def _logged_steps(workdir) -> list[int]:
  """The train rows' steps so far (complete lines only: process 0 may be writing one)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.endswith("\n")]
  return [r["step"] for r in rows if r["kind"] == "train"]


def _kill(procs) -> None:
  for p in procs:
    if p.poll() is None:
      p.kill()
      p.communicate()


def _wait(procs, timeout_s=TIMEOUT_S) -> list[str]:
  """Both outputs; a run that does not end in time (a hang) fails with them."""
  deadline = time.time() + timeout_s
  outputs = []
  try:
    for p in procs:
      outputs.append(p.communicate(timeout=max(deadline - time.time(), 1))[0])
  except subprocess.TimeoutExpired:
    for p in procs:
      p.kill()
    tails = [p.communicate()[0][-2000:] for p in procs]  # Both were killed: a hang's outputs, to see where.
    raise AssertionError(f"the run hung for {timeout_s}s:\n" + "\n---\n".join(tails)) from None
  for i, (p, out) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
  return outputs


def _signal_process_1(workdir, procs):
  """SIGTERM to process 1 alone, once process 0 (the one that writes metrics) has logged SIGNAL_AFTER_STEP."""
  deadline = time.time() + TIMEOUT_S
  while time.time() < deadline and procs[1].poll() is None and SIGNAL_AFTER_STEP not in _logged_steps(workdir):
    time.sleep(0.05)
  assert procs[1].poll() is None and SIGNAL_AFTER_STEP in _logged_steps(workdir), "never reached the signal step"
  procs[1].send_signal(signal.SIGTERM)


def _assert_both_stopped_at_one_saved_step(workdir, outputs) -> int:
  stopped = [re.findall(r"Stopped at step (\d+) on request", out) for out in outputs]
  assert stopped[0] and stopped[0] == stopped[1], stopped
  step = int(stopped[0][0])
  # The signal can reach process 1 before its own stop check of SIGNAL_AFTER_STEP: stopping there is right too.
  assert SIGNAL_AFTER_STEP <= step < MAX_STEPS
  assert sorted(int(d) for d in os.listdir(workdir / "checkpoints") if d.isdigit()) == [step]
  grain_states = set(os.listdir(workdir / "checkpoints" / str(step) / "data"))
  assert {"process_0-of-2.json", "process_1-of-2.json"} <= grain_states  # Both processes saved that step.
  assert _logged_steps(workdir) == list(range(1, step + 1))
  return step


def test_sigterm_to_one_process_stops_both_at_one_saved_step_and_the_rerun_is_exact(demo_root, tmp_path):
  killed, straight = tmp_path / "killed", tmp_path / "straight"
  procs = _start(killed, demo_root, paused=True)
  reference = _start(straight, demo_root)  # Meanwhile: both runs mostly compile, and compiling is single-threaded.
  try:
    _signal_process_1(killed, procs)
    outputs = _wait(procs, STOP_TIMEOUT_S)
  finally:
    _kill(procs)  # Only if the signal step was never reached.
    _wait(reference)
  _assert_both_stopped_at_one_saved_step(killed, outputs)

  # The same command again resumes there and ends exactly where the uninterrupted run did.
  _wait(_start(killed, demo_root))
  a, b = inspect_lib.load(str(killed)), inspect_lib.load(str(straight))
  assert a.step == b.step == MAX_STEPS
  helpers.assert_trees_bitwise_equal(a.state.params, b.state.params)
  helpers.assert_trees_bitwise_equal(a.state.opt_state, b.state.opt_state)
  helpers.assert_trees_bitwise_equal(a.state.defense, b.state.defense)
  losses = [
      {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(w)) if r["kind"] == "train"}
      for w in (killed, straight)
  ]
  assert losses[0] == losses[1] and sorted(losses[0]) == list(range(1, MAX_STEPS + 1))


def test_without_the_preemption_service_a_collective_agrees_on_the_step(demo_root, tmp_path):
  """The fallback when jax's preemption service is off: the processes' flags are reduced every step."""
  procs = _start(tmp_path, demo_root, paused=True, env={"JAX_ENABLE_PREEMPTION_SERVICE": "false"})
  try:
    _signal_process_1(tmp_path, procs)
    outputs = _wait(procs, STOP_TIMEOUT_S)
  finally:
    _kill(procs)  # Only if the signal step was never reached.
  assert all("preemption service is disabled" in out for out in outputs)
  _assert_both_stopped_at_one_saved_step(tmp_path, outputs)


def _paused_main():
  """`roclip_jax.main`, pausing PAUSE_S before each train step (the state and data are unchanged)."""
  from roclip_jax import main as main_lib  # pylint: disable=g-import-not-at-top
  from roclip_jax import steps as steps_lib  # pylint: disable=g-import-not-at-top

  make_train_steps = steps_lib.make_train_steps

  def paused(step_fn):
    def step(state, batch):
      time.sleep(PAUSE_S)
      return step_fn(state, batch)

    return step

  steps_lib.make_train_steps = lambda *a, **k: {m: paused(f) for m, f in make_train_steps(*a, **k).items()}
  main_lib.run()


if __name__ == "__main__":
  _paused_main()
