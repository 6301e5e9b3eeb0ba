"""Checks that RoCLIP's `paper` variant trains bitwise as it did at an earlier git revision.

  python tools/compare_paper_variant.py --revision=c29582e [--steps=100]

Trains the "RoCLIP (paper)" row of `--revision`'s configs/robustness_demo.py, in both trees
(defense=roclip, variant='paper', image augmentation; text augmentation off so that the revisions'
WordNet sources cannot differ), with the attacks, pool and augmentation also pinned to the values
`make demo` had at c29582e (so that both revisions train the same experiment however the
benchmark's config has changed since, issue 22's move to the digits set included), for
`--steps` steps — matching epoch 2 starts at step 49 — once with the working tree and once with
`git worktree` at `--revision`, each in its own process, and compares every array of the final
params, optimizer state and pool. Prints how many are bitwise equal; exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_TRAIN = r"""
import os, sys
repo, out, steps, config_path = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
sys.path.insert(0, repo)
import jax, ml_collections, numpy as np
from absl import flags
flags.FLAGS.mark_as_parsed()
from roclip_jax import config_lib, inspect as inspect_lib, train
import importlib.util
spec = importlib.util.spec_from_file_location("rd", config_path)
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
config = module.get_config()
del config.experiment
config = config_lib.override(config, {
    "defense": "roclip", "augment.image": True, "max_steps": steps, "progress_bar": False,
    "data.demo.root": out + ".data",
    # make demo's experiment at c29582e, whatever the revision's benchmark config says now.
    "poison.backdoor.num_poisons": 150, "poison.targeted.poisons_per_target": 20,
    "roclip.pool_size": 1024, "augment.crop_scale": (0.08, 1.0), "augment.blur_p": 1.0,
    "augment.hue": 0.1, "augment.grayscale_p": 0.2})
if "variant" in config.roclip:  # Revisions before the robust variant have no such field.
  config.roclip.variant = "paper"
config.evals = ml_collections.ConfigDict()
train.train_and_evaluate(config, out + ".run")
state = inspect_lib.load(out + ".run").state
pool = state.defense if hasattr(state, "defense") else state.pool  # The field's name before the Defense interface.
leaves = jax.tree.leaves((state.params, state.opt_state, pool.embeddings, pool.source_ids))
np.savez(out, *[np.asarray(x) for x in leaves])
"""


def _train(repo: str, out: str, steps: int, config_path: str) -> None:
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
  subprocess.run(
      [sys.executable, "-c", _TRAIN, repo, out, str(steps), config_path], check=True, env=env, stdout=subprocess.DEVNULL
  )


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--revision", required=True)
  parser.add_argument("--steps", type=int, default=100)
  args = parser.parse_args()
  import numpy as np  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    old_tree = os.path.join(tmp, "old")
    subprocess.run(
        ["git", "-C", REPO, "worktree", "add", "--detach", old_tree, args.revision],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
      # Both trees train the old revision's benchmark config (the working tree's may since have moved
      # to other data, attacks or augmentation: issue 22's digits benchmark did), so that the only
      # difference is the code.
      config_path = os.path.join(old_tree, "configs", "robustness_demo.py")
      _train(old_tree, os.path.join(tmp, "old.npz"), args.steps, config_path)
      _train(REPO, os.path.join(tmp, "new.npz"), args.steps, config_path)
    finally:
      subprocess.run(["git", "-C", REPO, "worktree", "remove", "--force", old_tree], check=False)
    old, new = np.load(os.path.join(tmp, "old.npz")), np.load(os.path.join(tmp, "new.npz"))
    if len(old.files) != len(new.files):
      print(f"different state structure: {len(old.files)} vs {len(new.files)} arrays")
      return 1
    equal = sum(np.array_equal(old[k], new[k]) and old[k].dtype == new[k].dtype for k in old.files)
    print(
        f"{equal} of {len(old.files)} arrays bitwise equal after {args.steps} steps "
        f"(revision {args.revision} vs the working tree)"
    )
    return 0 if equal == len(old.files) else 1


if __name__ == "__main__":
  sys.exit(main())
