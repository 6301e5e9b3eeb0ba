"""RoCLIP's robust variant, one piece at a time, on the `make demo` data and attacks.

  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py:seed=1 --workdir=DIR_1

Every row trains on the same poisoned data from the same seed with the same augmentations as the
fair control (CLIP+aug); each "robust without X" row turns one piece of the robust variant back to
the paper's choice (docs/roclip.md reads the results).
"""

from roclip_jax import config_lib

robustness_demo = config_lib.sibling_config(__file__, "robustness_demo")
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
