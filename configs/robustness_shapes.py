"""The headline benchmark before issue 22 (colour x shape classes, a corner patch): kept to reproduce
docs/roclip.md, sections 2-6. `make demo` now runs configs/robustness_demo.py (section 8), because on
this one augmentation alone removes the backdoor and plain CLIP tops out at ~45% zero-shot.

  python -m roclip_jax.experiments.robustness --config=configs/robustness_shapes.py --seeds=0,1,2 --workdir=DIR
  # Calibration of the attacks on plain CLIP only (docs/roclip.md):
  python -m roclip_jax.experiments.robustness --config=configs/robustness_shapes.py:backdoor=12,targeted=2 \
      --only=CLIP --workdir=DIR_CAL

Every run trains the tiny ViT CLIP from the same seed on the same poisoned copy of the built-in
demo set (24 "<colour> <shape>" classes), with a backdoor and a targeted-poisoning attack at once,
and is evaluated on the clean held-out split. The paper's regime (docs/roclip.md): each attack at
the lowest tested strength where plain CLIP's success is high (calibrated on CLIP only), a pool of
2% of the data, and SimCLR-style augmentation made label-preserving for this data: crops keep at
least half of the 32-px image (a crop of 8% is 9x9 px, smaller than most objects), no blur
(SimCLR's CIFAR-10 recipe drops it), and no hue jitter or grayscale (the classes are colours; a
grey "red circle" is no longer one). Every augmented row, the fair control included, uses the same
augmentation.
"""

from roclip_jax import config_lib
from roclip_jax import models


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, epochs=16, seed=0, poison_seed=0, backdoor=18, targeted=12)
  c = config_lib.base_config()
  c.seed = variant.seed
  c.model = models.preset("tiny")
  c.num_epochs = variant.epochs
  c.data.source = "demo"
  c.augment.crop_scale = (0.5, 1.0)
  c.augment.blur_p = 0.0
  c.augment.hue = 0.0
  c.augment.grayscale_p = 0.0
  c.data.batch_size = 128
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.log_every_steps = 23
  c.checkpoint.every_steps = 200
  c.progress_bar = True

  # The attacks (docs/roclip.md), both on the same training set. BadNets: a fixed 8x8 noise patch
  # (one ViT patch) in the bottom-right corner on `backdoor` pairs whose captions mention the target.
  # Calibrated on plain CLIP only: the lowest tested counts where CLIP's backdoor ASR is >= 80%
  # (6 / 12 / 18 poisons: 1.9% / 41% / 100%) and its targeted success >= 75% (1 / 2 / 4 / 8 / 12 per
  # target: 25% / 12.5% / 25% / 62.5% / 100%). 18 of 6,000 clean pairs = 0.3%, the paper's rate.
  c.poison.enabled = True
  c.poison.seed = variant.poison_seed
  c.poison.backdoor.enabled = True
  c.poison.backdoor.target_class = "blue star"
  c.poison.backdoor.num_poisons = variant.backdoor
  c.poison.backdoor.trigger = "patch"
  c.poison.backdoor.patch_size = 8
  c.poison.backdoor.pattern = "noise"
  c.poison.backdoor.position = "bottom_right"
  c.poison.backdoor.caption_source = "train"
  c.poison.targeted.enabled = True
  c.poison.targeted.num_targets = 8
  c.poison.targeted.poisons_per_target = variant.targeted

  # RoCLIP (used by the rows that turn it on).
  c.roclip.pool_size = 128  # 2.1% of the ~6,000 training pairs (the paper: 21,845 of 1M); >= the batch.
  c.roclip.k = 2
  # SafeCLIP: its published 5 + 1 warm-up epochs of 32, scaled to 16 epochs; its learning rates
  # relative to the demo's lr as the published ones are to the paper's (in_lr = lr, filter_lr = lr / 100).
  c.safeclip.inmodal_warmup = 2
  c.safeclip.multimodal_warmup = 1
  c.safeclip.in_lr = c.optim.lr
  c.safeclip.filter_lr = c.optim.lr / 100
  # CleanCLIP fine-tunes the CLIP row's final model on a quarter of the data, known clean.
  c.cleanclip.num_clean_examples = 1500

  every = 2 * 46  # About every second epoch, for the curves.
  c.evals = config_lib.ml_collections.ConfigDict()
  c.evals.zeroshot = dict(type="zeroshot", every_steps=every, templates="dataset")
  c.evals.backdoor_asr = dict(type="backdoor_asr", every_steps=every, templates="dataset")
  c.evals.targeted_poison = dict(type="targeted_poison", every_steps=0, templates="dataset")
  c.evals.linear_probe = dict(type="linear_probe", every_steps=0, max_train_per_class=100)

  # Rows of the table: a name and the overrides that make the defense. "{workdir}" in a value
  # is the benchmark's --workdir (rows run in this order, so a row can start from an earlier one).
  c.experiment = config_lib.ml_collections.ConfigDict()
  c.experiment.runs = [
      ("CLIP", {"defense": "none"}),
      ("CLIP+aug", {"defense": "none", "augment.image": True, "augment.text": True}),
      ("RoCLIP (paper)", {"defense": "roclip", "roclip.variant": "paper", "augment.image": True, "augment.text": True}),
      # Our variant beyond the paper (docs/roclip.md): later start, fresh pool, CSLS, masked duplicates,
      # content targets (its settings since issue 22 differ from the ones that made the table in section 6).
      (
          "RoCLIP (robust)",
          {"defense": "roclip", "roclip.variant": "robust", "augment.image": True, "augment.text": True},
      ),
      ("SafeCLIP", {"defense": "safeclip", "augment.image": True, "augment.text": True}),
      # Post-hoc: 10 epochs of CleanCLIP fine-tuning (CleanCLIP's README count) of the CLIP row,
      # at a tenth of the pre-training lr.
      (
          "CleanCLIP (CLIP + fine-tune)",
          {
              "defense": "cleanclip",
              "init_from": "{workdir}/clip",
              "num_epochs": 10,
              "optim.lr": c.optim.lr / 10,
              "optim.warmup_steps": 10,
          },
      ),
  ]
  return c
