"""RoCLIP's default (robust) variant, one piece at a time, on the `make demo` data and attacks.

  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/roclip_ablation.py --seeds=0,1,2 --workdir=DIR

Every row trains on the same poisoned data from the same seed with the same augmentations as the
fair control (CLIP+aug); each "without X" row turns one piece of the default variant back to the
paper's choice (docs/roclip.md, section 8 reads the results). Rows named as in `make demo`'s
benchmark are the same runs: with the benchmark's --workdir they are reused, not trained again.
"""

from roclip_jax import config_lib

robustness_demo = config_lib.sibling_config(__file__, "robustness_demo")
AUG = {"augment.image": True, "augment.text": True}


def get_config(arg=None):
  c = robustness_demo.get_config(arg)
  default = dict(AUG, defense="roclip")
  c.experiment.runs = [
      ("CLIP+aug", dict(AUG, defense="none")),
      ("RoCLIP (paper)", dict(AUG, defense="roclip", **{"roclip.variant": "paper"})),
      ("RoCLIP (default)", default),
      # The default before issue 22: duplicates masked by pool row only.
      ("default without content targets", dict(default, **{"roclip.content_targets": False})),
      # The default's start before issue 22: the first k-schedule epoch after the warm-up (epoch 4 here).
      ("default, matching from the first epoch after the warm-up", dict(default, **{"roclip.first_epoch": 4})),
      ("default without CSLS", dict(default, **{"roclip.csls_k": 0})),
  ]
  c.experiment.controls = tuple((name, "CLIP+aug") for name, _ in c.experiment.runs[1:])
  return c
