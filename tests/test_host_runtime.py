"""Host settings (roclip_jax/host_runtime.py) and the step profiler behind `bench.throughput --breakdown`."""

import ctypes.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from roclip_jax import host_runtime
from roclip_jax.bench import step_profile

# A fresh process (the settings must precede the backend) runs one jitted function whose temporaries
# take 128 MiB, above the 32 MiB up to which glibc's own dynamic mmap threshold adapts (below it, freed
# blocks are reused without any setting), and reports the fewest minor page faults (first touches) of
# 10 calls.
_FAULTS_SCRIPT = r"""
import json, os, resource, sys
from roclip_jax import host_runtime
applied = host_runtime.tune()
import jax, jax.numpy as jnp
x = jnp.ones((4096, 4096), jnp.float32)  # 64 MiB
f = jax.jit(lambda x: jnp.sum(jnp.exp(-x) * jnp.cos(x) + jnp.tanh(x)[::-1]))
for _ in range(30):  # malloc's heap grows over the first calls, then serves every later one.
  f(x).block_until_ready()
per_call = []  # Each call's own faults: the fewest is the steady state, whatever the heap did once.
for _ in range(10):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  f(x).block_until_ready()
  per_call.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
faults = min(per_call)
temp = f.lower(x).compile().memory_analysis().temp_size_in_bytes
print(json.dumps({"applied": applied, "faults": faults, "temp_bytes": temp}))
"""


def _faults_per_call(tuning: str) -> dict:
  env = dict(os.environ, ROCLIP_JAX_HOST_TUNING=tuning, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  out = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], env=env, capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or "libc" not in (ctypes.util.find_library("c") or ""),
    reason="the malloc settings are glibc's",
)
def test_tuning_stops_the_per_step_page_faults():
  off, on = _faults_per_call("0"), _faults_per_call("1")
  pages = off["temp_bytes"] / 4096
  assert off["temp_bytes"] > 32 * 2**20  # The premise: larger than glibc's adaptive threshold ever gets.
  assert off["applied"] == ["host tuning off (ROCLIP_JAX_HOST_TUNING=0)"]
  assert any("mmap threshold" in s for s in on["applied"]) and "CPU computations inline" in on["applied"]
  # Without the settings every call touches its temporaries' pages afresh; with them they are reused.
  assert off["faults"] >= 0.5 * pages, (off, pages)
  assert on["faults"] <= 0.05 * off["faults"], (on, off)


def test_tune_applies_once():
  first = host_runtime.tune()
  assert host_runtime.tune() is first


def test_instructions_parse_names_shapes_and_op_names():
  hlo = "\n".join(
      [
          "ENTRY %main (p: f32[4]) -> f32[] {",
          '  %fusion.3 = f32[4,8]{1,0} fusion(%p), kind=kLoop, metadata={op_name="jit(f)/jvp()/mul"}',
          '  %custom-call = (f32[65536,10]{1,0}, s32[65536,10]{1,0}) custom-call(%x), metadata={op_name="jit(f)/top_k"}',
          '  ROOT %dot.2 = f32[] dot(%a, %b), metadata={op_name="jit(f)/transpose(jvp())/dot_general"}',
          "  %add.1 = f32[] add(%a, %b)",
          "}",
      ]
  )
  assert step_profile.instructions(hlo) == {
      "fusion.3": ("f32[4,8]{1,0}", "jit(f)/jvp()/mul"),
      "custom-call": ("(f32[65536,10]{1,0}, s32[65536,10]{1,0})", "jit(f)/top_k"),
      "dot.2": ("f32[]", "jit(f)/transpose(jvp())/dot_general"),
      "add.1": ("f32[]", ""),
  }
  assert [step_profile.phase_of(op) for _, op in step_profile.instructions(hlo).values()] == [
      "forward",
      "update and rest",
      "backward",
      "update and rest",
  ]


def test_profile_of_a_gradient_step_has_each_phase():
  def step(w, x):
    loss, grad = jax.value_and_grad(lambda w: jnp.sum(jnp.tanh(x @ w) ** 2))(w)
    return w - 0.1 * grad, loss

  w, x = jnp.ones((256, 256)) / 256, jnp.ones((512, 256))
  compiled = jax.jit(step).lower(w, x).compile()
  breakdown = step_profile.profile_calls(compiled, lambda: compiled(w, x), calls=2)
  assert breakdown.phase_seconds.get("forward", 0) > 0 and breakdown.phase_seconds.get("backward", 0) > 0
  assert breakdown.op_seconds == pytest.approx(sum(seconds for *_, seconds in breakdown.top_ops))
  names = step_profile.instructions(compiled.as_text())
  assert all(name in names for name, *_ in breakdown.top_ops)
  assert "parallelism" in breakdown.format(step_seconds=breakdown.op_seconds)
