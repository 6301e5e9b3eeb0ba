"""Test setup: 8 fake CPU devices, the persistent compile cache, parsed absl flags; the shared fixtures.

The environment must be set before jax is imported anywhere, so this runs first. Shared helpers that
are not fixtures are in tests/helpers.py.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
  _flags = (_flags + " --xla_force_host_platform_device_count=8").strip()
# XLA:CPU's concurrency-optimised scheduler lets one device start two collectives of a program
# at once; with 8 fake devices on 2 cores their rendezvous can then wait on each other forever
# (seen with SafeCLIP's two-view steps loaded from the compile cache). Real accelerators are
# unaffected; the flag only orders the CPU schedule.
if "xla_cpu_enable_concurrency_optimized_scheduler" not in _flags:
  _flags += " --xla_cpu_enable_concurrency_optimized_scheduler=false"
os.environ["XLA_FLAGS"] = _flags
_repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(_repo, ".cache", "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

from roclip_jax.data import demo  # noqa: E402
from tests import helpers  # noqa: E402

# grain worker processes read absl flags; they must count as parsed under pytest.
flags.FLAGS.mark_as_parsed()


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory):
  """The demo dataset of `helpers.DEMO`, generated once per test process; tests only read it."""
  return demo.ensure_demo_dataset(dict(helpers.DEMO, root=str(tmp_path_factory.mktemp("demo") / "d")))
