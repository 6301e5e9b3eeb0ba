"""What several test modules share besides fixtures (those are in conftest.py): the demo data's size,
the tiny training config, tree comparison, batches and CSVs made up for a test, two-process runs.

Not a test module: pytest collects nothing here, and test modules import this instead of each other.
"""

import csv
import os
import socket
import subprocess
import sys

import jax
import ml_collections
import numpy as np
from PIL import Image

from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import models

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo dataset of the training tests (conftest.demo_root): 48 training and 16 test examples.
DEMO = dict(num_classes=4, train_per_class=12, test_per_class=4, image_size=16, seed=0)


def tiny_config(demo_root, defense="none", **overrides):
  c = config_lib.base_config()
  c.model = models.preset("tiny")
  c.model.image.image_size, c.model.image.patch_size = 16, 8
  c.model.text.context_length = 16
  c.data.demo.update(dict(DEMO, root=demo_root))
  c.data.batch_size = 16  # 48 examples -> 3 steps per epoch.
  c.num_epochs = 6
  c.defense = defense
  c.roclip.pool_size = 32
  c.roclip.k = 2
  # The pool and schedule expectations of these tests are the paper's (matching epochs 2, 4, 6; the
  # pool written only in them); tests of the robust or gated (default) variant ask for it.
  c.roclip.variant = "paper"
  c.optim.warmup_steps = 2
  c.log_every_steps = 1
  c.checkpoint.every_steps = 4
  c.checkpoint.async_save = True
  c.progress_bar = False
  c.evals = ml_collections.ConfigDict()
  return config_lib.override(c, overrides)


def defense_for(config, num_examples=64, steps_per_epoch=1):
  """The config's defense, built for a run of `num_examples` training examples (batches of made-up
  ids below it) and `steps_per_epoch` steps per epoch."""
  return defenses.from_config(config, defenses.RunFacts(num_examples=num_examples, steps_per_epoch=steps_per_epoch))


def leaves(tree) -> list[np.ndarray]:
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_bitwise_equal(a, b):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x, y)


def random_batch(seed=0, batch=16):
  """A training batch of random 16 x 16 images and 8-token rows (BOS, 4 tokens, EOT, padding); every
  4th pair marked poisoned."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, 1000, size=(batch, 8)).astype(np.int32)
  tokens[:, 0] = 49406
  tokens[:, 5] = 49407
  tokens[:, 6:] = 0
  return {
      "image": rng.integers(0, 256, size=(batch, 16, 16, 3), dtype=np.uint8),
      "text": tokens,
      "id": np.arange(batch, dtype=np.int64) + 1000 * seed,
      "label": np.zeros(batch, np.int64),
      "poisoned": (np.arange(batch) % 4 == 0).astype(np.int8),
  }


def write_corrupt_csv(tmp_path):
  """A CSV source of 30 random JPEGs (one truncated), plus a missing file and an empty caption."""
  rng = np.random.default_rng(0)
  rows = []
  words = ["red circle", "blue square", "green star", "yellow ring"]
  for i in range(30):
    path = tmp_path / f"img{i}.jpg"
    Image.fromarray(rng.integers(0, 256, (20, 24, 3)).astype(np.uint8)).save(path, quality=90)
    rows.append([path.name, f"a photo of a {words[i % 4]}", i % 4])
  truncated = tmp_path / "img3.jpg"
  truncated.write_bytes(truncated.read_bytes()[:200])  # A truncated JPEG.
  rows.append(["does_not_exist.jpg", "a photo of a red circle", 0])  # A missing file.
  rows.append(["img5.jpg", "   ", 1])  # An empty caption: a bad row.
  path = tmp_path / "train.csv"
  with open(path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(["image_path", "caption", "label"])
    w.writerows(rows)
  return path


# ----------------------------------------------------------------------------
# Two processes x 4 CPU devices on loopback (tests/test_multihost.py, tests/test_preemption.py).


def two_process_overrides(demo_root, *, num_epochs, max_steps):
  """Config overrides, applied as flags to the subprocesses and directly to a reference config."""
  return {
      "data.demo.root": demo_root,
      **{f"data.demo.{k}": v for k, v in DEMO.items() if k != "seed"},
      "model.image.image_size": 16,
      "model.image.patch_size": 8,
      "model.text.context_length": 16,
      "data.batch_size": 16,
      "num_epochs": num_epochs,
      "max_steps": max_steps,
      "log_every_steps": 1,
      "checkpoint.every_steps": 1000,
      "optim.warmup_steps": 2,
      "progress_bar": False,
      "mesh": (("data", 2), ("fsdp", 4)),
      "roclip.pool_size": 32,
      "roclip.shard_pool": True,
      "roclip.variant": "robust",  # Matching epochs, whose sharded lookup these tests cover.
      "evals.zeroshot.every_steps": 0,
  }


def _flag(key, value):
  return f"--config.{key}={value!r}" if isinstance(value, tuple) else f"--config.{key}={value}"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start_two_processes(workdir, overrides, *, module="roclip_jax.main", env=None) -> list[subprocess.Popen]:
  """Both processes of a RoCLIP run of configs/demo.py with `overrides`, through `module`'s main."""
  port = _free_port()
  env = dict(
      os.environ,
      PYTHONPATH=REPO,
      JAX_PLATFORMS="cpu",
      XLA_FLAGS="--xla_force_host_platform_device_count=4",
      **(env or {}),
  )
  cmd = [
      sys.executable,
      "-m",
      module,
      f"--config={REPO}/configs/demo.py:defense=roclip",
      f"--workdir={workdir}",
      f"--coordinator_address=127.0.0.1:{port}",
      "--num_processes=2",
      *[_flag(k, v) for k, v in overrides.items()],
  ]
  return [
      subprocess.Popen(
          cmd + [f"--process_id={i}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
      )
      for i in range(2)
  ]
