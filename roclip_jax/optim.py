"""Optimizer from config: AdamW, linear warm-up + cosine decay, masked weight decay."""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine to 0 at `total_steps`.

  The original code's schedule is shifted by one epoch (ROCLIP.md §3 quirks);
  this one starts at step 0, on purpose.
  """
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup, decay_steps=max(total_steps, warmup + 1),
      end_value=0.0,
  )


def weight_decay_mask(params: Any) -> Any:
  """Decay matrices and kernels only: biases, norm scales, class/positional
  vectors and the logit scale (all of rank < 2) are left alone, as open_clip
  does. (The original RoCLIP code also exempts by name: bn/ln/bias/logit_scale.)
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay,
          mask=weight_decay_mask,
      )
  )
  return optax.chain(*parts), schedule
