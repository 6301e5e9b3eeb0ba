"""The robustness benchmark in the paper's regime: low poison rates, a 2% pool, 32-px augmentation.

  python -m roclip_jax.experiments.robustness --config=configs/paper_regime.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/paper_regime.py --seeds=0,1,2 --workdir=DIR
  # Calibration of the attacks on plain CLIP only (docs/roclip.md):
  python -m roclip_jax.experiments.robustness --config=configs/paper_regime.py:backdoor=12,targeted=2 \
      --only=CLIP --workdir=DIR_CAL

The built-in demo data and tiny ViT of `make demo`, with the attack strengths and pool size of
the paper (docs/roclip.md): a BadNets backdoor on at most 0.3% of the pairs and targeted poisoning
with a few adversarial captions per target, each calibrated on plain CLIP only; a pool of 2% of
the data; the first matching epoch after the learning-rate warm-up (variant 'robust'; the
'paper' row keeps the paper's epoch K). Image augmentation is scaled to 32-px images: crops keep
at least half of the image (a crop of 8% of a 32-px image is 9x9 px, smaller than most objects
there) and no blur (SimCLR's CIFAR-10 recipe drops it); every augmented row, the control included,
uses the same augmentation.
"""
from roclip_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, epochs=16, seed=0, poison_seed=0, backdoor=18, targeted=12)
  demo = config_lib.sibling_config(__file__, "robustness_demo")
  c = demo.get_config(f"epochs={variant.epochs},seed={variant.seed},poison_seed={variant.poison_seed}")
  # Calibrated on plain CLIP only (docs/roclip.md): the lowest tested counts where CLIP's backdoor ASR
  # is >= 80% (6 / 12 / 18 poisons: 1.9% / 41% / 100%) and its targeted success >= 75% (1 / 2 / 4 / 8 / 12
  # per target: 25% / 12.5% / 25% / 62.5% / 100%). 18 of 6,000 clean pairs = 0.3%, the paper's rate.
  c.poison.backdoor.num_poisons = variant.backdoor
  c.poison.targeted.poisons_per_target = variant.targeted
  c.roclip.pool_size = 128  # 2.1% of the 6,160 training pairs (the paper: 21,845 of 1M); >= the batch.
  c.augment.crop_scale = (0.5, 1.0)
  c.augment.blur_p = 0.0
  aug = {"augment.image": True, "augment.text": True}
  c.experiment.runs = [
      ("CLIP", {"defense": "none"}),
      ("CLIP+aug", dict(aug, defense="none")),
      ("RoCLIP (paper)", dict(aug, defense="roclip", **{"roclip.variant": "paper"})),
      ("RoCLIP (robust)", dict(aug, defense="roclip", **{"roclip.variant": "robust"})),
      ("SafeCLIP", dict(aug, defense="safeclip")),
      ("CleanCLIP (CLIP + fine-tune)", {"defense": "cleanclip", "init_from": "{workdir}/clip", "num_epochs": 10,
                                        "optim.lr": c.optim.lr / 10, "optim.warmup_steps": 10}),
  ]
  return c
