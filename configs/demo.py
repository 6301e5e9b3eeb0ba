"""Tiny CLIP on the built-in demo dataset: trains on a laptop CPU in minutes.

python -m roclip_jax.main --config=configs/demo.py --workdir=/tmp/demo
python -m roclip_jax.main --config=configs/demo.py:defense=roclip --workdir=/tmp/demo_roclip
"""

from roclip_jax import config_lib


def get_config(arg=None):
  variant = config_lib.parse_variant(arg, defense="none", model="tiny", epochs=12)
  c = config_lib.base_config()
  from roclip_jax import models

  c.model = models.preset(variant.model)
  c.defense = variant.defense
  c.num_epochs = variant.epochs
  c.data.source = "demo"
  c.data.batch_size = 128
  c.optim.lr = 1e-3
  c.optim.warmup_steps = 100
  c.optim.weight_decay = 0.1
  c.roclip.pool_size = 1024
  c.roclip.k = 2
  c.log_every_steps = 20
  c.checkpoint.every_steps = 200
  c.evals.zeroshot.every_steps = 100  # Also during training, for the curve in metrics.jsonl.
  return c
