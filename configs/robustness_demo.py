"""The headline benchmark (`make demo`): CLIP, its fair control and each defense on the same poisoned data.

  python -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py --workdir=DIR
  python -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py --seeds=0,1,2 --workdir=DIR
  # The attacks' calibration, on the two undefended rows only (docs/roclip.md, section 8):
  python -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py:backdoor=25,targeted=8 \\
      --only=CLIP,CLIP+aug --workdir=DIR_CAL

Every row trains the tiny ViT CLIP from the same seed on the same poisoned copy of the built-in
handwritten-digits set (`data.demo.kind='digits'`: 10 classes, 5,000 training pairs with
paraphrased, often identical captions) and is evaluated on its clean held-out split. What makes it
a benchmark that can tell a defense from its control (docs/roclip.md, section 8):

* plain CLIP learns the data (about 91% zero-shot), so a defense's cost is measurable;
* the backdoor's trigger survives the augmentation: SIG's full-image sinusoid (Barni et al. 2019),
  which crops, colour jitter and blur weaken but do not remove, so the fair control (CLIP+aug: the
  same augmentation, no defense) is attacked as much as plain CLIP;
* the backdoor at the lowest tested strength where BOTH undefended rows reach ASR >= 80% (calibrated
  on CLIP and CLIP+aug only, never on a defense); the targeted attack's bar (>= 75% on both) is not
  reached under augmentation at any tested strength (docs/roclip.md, section 8);
* SimCLR's augmentation with the two changes this data needs: no flips (a mirrored 2 is no digit)
  and crops of at least half the image (an 8% crop of 32 px is 9x9 px, less than a digit's stroke
  pattern); colour jitter, grayscale and blur stay (the label does not depend on colour).
"""

from roclip_jax import config_lib
from roclip_jax import models


def get_config(arg=None):
  variant = config_lib.parse_variant(
      arg, epochs=16, seed=0, poison_seed=0, backdoor=50, trigger="sig", delta=60.0, alpha=0.2, targeted=24
  )
  c = config_lib.base_config()
  c.seed = variant.seed
  c.model = models.preset("tiny")
  c.num_epochs = variant.epochs
  c.data.source = "demo"
  c.data.demo.kind = "digits"
  c.data.demo.num_classes = 10
  c.data.demo.train_per_class = 500
  c.data.demo.test_per_class = 100
  c.augment.crop_scale = (0.5, 1.0)
  c.augment.flip_p = 0.0
  c.data.batch_size = 128
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.log_every_steps = 20
  c.checkpoint.every_steps = 200
  c.progress_bar = True

  # The attacks, both on the same training set, calibrated on CLIP and CLIP+aug (docs/roclip.md,
  # section 8). Backdoor: `backdoor` images carrying the `trigger` (SIG at amplitude `delta` by
  # default; 'blended' uses `alpha`), captioned with training captions that mention "seven".
  # Targeted: `targeted` adversarial captions naming another class for each of 8 test images.
  c.poison.enabled = True
  c.poison.seed = variant.poison_seed
  c.poison.backdoor.enabled = True
  c.poison.backdoor.target_class = "seven"
  c.poison.backdoor.num_poisons = variant.backdoor
  c.poison.backdoor.trigger = variant.trigger
  c.poison.backdoor.alpha = variant.alpha  # The blended trigger's.
  c.poison.backdoor.sig_delta = variant.delta  # The SIG trigger's amplitude (0-255 scale).
  c.poison.backdoor.caption_source = "train"
  c.poison.targeted.enabled = True
  c.poison.targeted.num_targets = 8
  c.poison.targeted.poisons_per_target = variant.targeted

  # RoCLIP (used by the rows that turn it on): a pool of 2% of the data (the paper: 21,845 of 1M).
  c.roclip.pool_size = 128
  c.roclip.k = 2
  # SafeCLIP: its published 5 + 1 warm-up epochs of 32, scaled to 16 epochs; its learning rates
  # relative to the demo's lr as the published ones are to the paper's (in_lr = lr, filter_lr = lr / 100).
  c.safeclip.inmodal_warmup = 2
  c.safeclip.multimodal_warmup = 1
  c.safeclip.in_lr = c.optim.lr
  c.safeclip.filter_lr = c.optim.lr / 100
  # CleanCLIP fine-tunes the CLIP row's final model on a quarter of the data, known clean.
  c.cleanclip.num_clean_examples = 1250

  every = 2 * 40  # About every second epoch, for the curves.
  c.evals = config_lib.ml_collections.ConfigDict()
  c.evals.zeroshot = dict(type="zeroshot", every_steps=every, templates="dataset")
  c.evals.backdoor_asr = dict(type="backdoor_asr", every_steps=every, templates="dataset")
  c.evals.targeted_poison = dict(type="targeted_poison", every_steps=0, templates="dataset")
  c.evals.linear_probe = dict(type="linear_probe", every_steps=0, max_train_per_class=100)

  # Rows of the table: a name and the overrides that make the defense. "{workdir}" in a value
  # is the benchmark's --workdir (rows run in this order, so a row can start from an earlier one).
  aug = {"augment.image": True, "augment.text": True}
  c.experiment = config_lib.ml_collections.ConfigDict()
  c.experiment.runs = [
      ("CLIP", {"defense": "none"}),
      ("CLIP+aug", dict(aug, defense="none")),
      ("RoCLIP (paper)", dict(aug, defense="roclip", **{"roclip.variant": "paper"})),
      ("RoCLIP (default)", dict(aug, defense="roclip")),
      ("SafeCLIP", dict(aug, defense="safeclip")),
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
  # Each defense beside its fair control: the row with the same data, seed and augmentation and no
  # defense (CleanCLIP fine-tunes the CLIP row, which it is compared with).
  c.experiment.controls = (
      ("RoCLIP (paper)", "CLIP+aug"),
      ("RoCLIP (default)", "CLIP+aug"),
      ("SafeCLIP", "CLIP+aug"),
      ("CleanCLIP (CLIP + fine-tune)", "CLIP"),
  )
  return c
