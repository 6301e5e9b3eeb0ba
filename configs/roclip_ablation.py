"""RoCLIP's robust variant, one piece at a time, on the `make demo` data and attacks.

  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py:seed=1 --workdir=DIR_1

Every row trains on the same poisoned data from the same seed with the same augmentations as the
fair control (CLIP+aug); each "robust without X" row turns one piece of the robust variant back to
the paper's choice (docs/roclip.md reads the results).
"""
import importlib.util
import os


def _load_sibling(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                                   f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


robustness_demo = _load_sibling("robustness_demo")

AUG = {"augment.image": True, "augment.text": True}


def get_config(arg=None):
  c = robustness_demo.get_config(arg)
  robust = dict(AUG, defense="roclip", **{"roclip.variant": "robust"})
  c.experiment.runs = [
      ("CLIP+aug", dict(AUG, defense="none")),
      ("RoCLIP (paper)", dict(AUG, defense="roclip", **{"roclip.variant": "paper"})),
      ("RoCLIP (robust)", robust),
      ("robust without CSLS", dict(robust, **{"roclip.csls_k": 0})),
      ("robust without duplicate masking", dict(robust, **{"roclip.mask_duplicates": False})),
      ("robust, pool written in matching epochs only", dict(robust, **{"roclip.update_pool_every_step": False})),
      ("robust, first matching epoch k (paper)", dict(robust, **{"roclip.first_epoch": c.roclip.k})),
  ]
  return c
