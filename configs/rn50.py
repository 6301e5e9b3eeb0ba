"""The paper's setting: RN50 CLIP (+ RoCLIP) on a CC3M-style CSV, global batch 512.

  python -m roclip_jax.main --config=configs/rn50.py:defense=roclip \
      --config.data.csv_path=/data/cc3m/train.csv --workdir=gs://bucket/rn50_roclip

Hyper-parameters follow the released RoCLIP code (docs/methods.md, section 2)
except the learning rate: 5e-4 (CyCLIP/CleanCLIP and the dev parser default)
instead of the release's 5e-5, which under-trains at this batch size. RoCLIP runs the published
method (`roclip.variant='paper'`); `:roclip_variant=robust` runs ours (docs/roclip.md).
"""

from roclip_jax import config_lib
from roclip_jax import models


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, defense="roclip", k=2, epochs=24, bf16=False, roclip_variant="paper")
  c = config_lib.base_config()
  c.model = models.preset("RN50")
  c.model.dtype = "bfloat16" if variant.bf16 else "float32"
  c.defense = variant.defense
  c.num_epochs = variant.epochs
  c.data.source = "csv"
  c.data.batch_size = 512
  c.data.num_workers = 16
  c.augment.image = variant.defense == "roclip"  # --cross_aug: every input augmented.
  c.augment.text = variant.defense == "roclip"
  c.roclip.pool_size = 21845
  c.roclip.variant = variant.roclip_variant  # The published method, as the released code runs it.
  c.roclip.k = variant.k
  c.optim.lr = 5e-4
  c.optim.b1, c.optim.b2, c.optim.eps = 0.9, 0.999, 1e-8
  c.optim.weight_decay = 0.1
  c.optim.warmup_steps = 10000
  c.log_every_steps = 100
  c.checkpoint.every_steps = 2000
  c.evals.zeroshot.every_steps = 5000
  return c
