"""ViT-B/32 CLIP (+ RoCLIP) on a CC3M/CC12M-style CSV at 224 px.

  python -m roclip_jax.main --config=configs/vitb32.py:defense=roclip,bf16 \
      --config.data.csv_path=/data/cc3m/train.csv --workdir=/ckpt/vitb32

Scale variants: `fsdp=8` shards parameters and optimizer state over groups of 8
devices (the batch still spans all of them), `accum=4` runs each step as 4
micro-batches with the exact full-batch gradient, `remat` recomputes blocks.
Check memory before launching: add `--config.dry_run=True --config.dry_run_devices=256`.
"""

from roclip_jax import config_lib
from roclip_jax import models


def get_config(arg=None):
  variant = config_lib.parse_variant(
      arg, defense="none", k=2, epochs=32, batch=4096, bf16=False, remat=False, fsdp=1, accum=1
  )
  c = config_lib.base_config()
  c.model = models.preset("ViT-B/32")
  c.model.dtype = "bfloat16" if variant.bf16 else "float32"
  c.model.remat = variant.remat
  c.mesh = (("data", -1), ("fsdp", variant.fsdp))
  c.grad_accum_steps = variant.accum
  c.defense = variant.defense
  c.num_epochs = variant.epochs
  c.data.source = "csv"
  c.data.batch_size = variant.batch
  c.data.num_workers = 16
  c.augment.image = variant.defense == "roclip"
  c.augment.text = variant.defense == "roclip"
  c.roclip.pool_size = 65536
  c.roclip.k = variant.k
  c.roclip.shard_pool = True
  c.optim.lr = 5e-4
  c.optim.weight_decay = 0.2
  c.optim.warmup_steps = 2000
  c.log_every_steps = 100
  c.checkpoint.every_steps = 2000
  c.evals.zeroshot.every_steps = 5000
  return c
