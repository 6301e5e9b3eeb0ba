"""launch/accelerator_check.sh: syntax, the refusal on a CPU-only host, and a CPU smoke run of the whole check."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "accelerator_check.sh")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "ACCEL_CHECK_ALLOW_CPU")}
  # One CPU device, this interpreter, and this checkout's roclip_jax first on the path.
  env.update(JAX_PLATFORMS="cpu", PYTHON=sys.executable, PYTHONPATH=ROOT, **extra)
  return env


def test_script_parses():
  subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_refuses_a_cpu_only_host_with_a_clear_error():
  result = subprocess.run(["bash", SCRIPT], env=_env(), capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "needs a GPU or TPU host" in result.stderr and "ACCEL_CHECK_ALLOW_CPU=1" in result.stderr
  assert "== accelerator check" not in result.stdout


# The whole check on CPU takes ~4 minutes of two dry runs and a benchmark, more than the suite's time
# budget allows (docs/performance.md); run it with RUN_ACCELERATOR_SMOKE=1 when the script changes.
@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("RUN_ACCELERATOR_SMOKE") != "1", reason="set RUN_ACCELERATOR_SMOKE=1 (~4 min)")
def test_cpu_smoke_run_prints_a_parseable_summary():
  env = _env(ACCEL_CHECK_ALLOW_CPU="1", CONFIG="configs/demo.py", PROBE_BATCH="4", MAX_BATCH="8", STEPS="2")
  result = subprocess.run(["bash", SCRIPT], env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  summary = lines[next(i for i, line in enumerate(lines) if line.startswith("== accelerator check")) :]
  figures = {}
  for name, pattern in (
      ("batch", r"batch per device: (\d+) \(dry-run peak ([0-9.]+) GiB\)"),
      ("pairs", r"pairs/s per device: ([0-9.]+)$"),
      ("mfu", r"MFU: ([0-9.]+)% \("),
      ("memory", r"peak memory per device: ([0-9.]+) GiB$"),
      ("share", r"pool lookup share of a matching step: ([0-9.]+)%$"),
      ("elapsed", r"elapsed: (\d+) s$"),
  ):
    match = next((m for m in map(re.compile(pattern).match, summary) if m), None)
    assert match, f"no {name!r} line in the summary:\n" + "\n".join(summary)
    figures[name] = float(match.group(1))
  # Probe 4 and 8 per device both fit in the host's memory and MAX_BATCH=8 caps the search.
  assert figures["batch"] == 8
  assert figures["pairs"] > 0 and 0 < figures["mfu"] < 100 and figures["memory"] > 0
  assert 0 < figures["share"] < 100
  # The summary repeats the benchmark's own figures.
  assert f"{figures['share']:.1f}% of the matching step" in result.stdout
