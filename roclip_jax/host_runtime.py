"""Process-wide host settings that the entry points apply before the first JAX backend starts.

Why they exist (docs/performance.md, "The CPU step"): XLA:CPU gives every execution of a compiled
step one fresh buffer for all its temporaries (about 58 MiB for `bench.throughput`'s tiny CLIP at
batch 64; gigabytes for a real model). glibc's malloc serves a request that large with `mmap` (its
adaptive mmap threshold rises with freed blocks, but never above 32 MiB) and returns it with `munmap`
when the step ends, so the next step writes brand-new pages and the kernel
zero-fills each one on first touch: 14,800 minor page faults and about a third of that step's time.
Two settings make the freed buffer go back to malloc's heap, where the next step finds it:

* glibc's mmap threshold and trim threshold raised to their maximum (`mallopt`), so large blocks come
  from the heap and the heap's top is not returned to the system after every step;
* CPU computations run inline on the calling thread (`jax_cpu_enable_async_dispatch=False`): that
  thread allocates from glibc's main heap, which grows to any size, whereas a worker thread's heap
  is capped at 64 MiB and would still `mmap` the temporaries of a bigger step. It applies only to
  single-device CPU computations; multi-device programs and GPU/TPU steps dispatch as before.

Neither changes a single number (same programs, same arithmetic); the cost is that the process keeps
its peak heap instead of returning it between steps, as tcmalloc or jemalloc would. Opt out with
`ROCLIP_JAX_HOST_TUNING=0`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import jax
from jax._src import xla_bridge

OPT_OUT_ENV = "ROCLIP_JAX_HOST_TUNING"

# mallopt(3) parameters (malloc.h) and the largest value each takes (an int).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MAX_INT = 2**31 - 1

_applied: list[str] | None = None


def _glibc() -> ctypes.CDLL | None:
  """The process's C library when it is glibc (which has `mallopt`), else None (musl, macOS, Windows)."""
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
  except OSError:
    return None
  if not hasattr(libc, "gnu_get_libc_version") or not hasattr(libc, "mallopt"):
    return None
  libc.gnu_get_libc_version.restype = ctypes.c_char_p
  return libc


def keep_freed_memory() -> str | None:
  """Raises glibc's mmap and trim thresholds; returns what was set, or None where this is not glibc."""
  libc = _glibc()
  if libc is None:
    return None
  # Older glibc caps the mmap threshold at 32 MiB (it returns 0 above it): take the largest accepted value.
  for threshold in (_MAX_INT, 32 * 2**20):
    if libc.mallopt(_M_MMAP_THRESHOLD, threshold) == 1:
      break
  else:
    return None
  libc.mallopt(_M_TRIM_THRESHOLD, _MAX_INT)
  version = libc.gnu_get_libc_version().decode()
  return f"glibc {version} malloc: mmap threshold {threshold / 2**20:.0f} MiB, no trimming"


def run_cpu_inline() -> str | None:
  """Single-device CPU computations on the calling thread; None when a backend already started (too late)."""
  if xla_bridge.backends_are_initialized():
    return None
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  return "CPU computations inline"


def tune() -> list[str]:
  """Applies both settings once per process (idempotent) and returns what took effect, for the log.

  Call it first thing in an entry point: the dispatch setting is read when the CPU backend starts.
  """
  global _applied
  if _applied is not None:
    return _applied
  if os.environ.get(OPT_OUT_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
    _applied = [f"host tuning off ({OPT_OUT_ENV}=0)"]
    return _applied
  _applied = [done for done in (keep_freed_memory(), run_cpu_inline()) if done]
  return _applied
