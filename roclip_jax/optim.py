"""Optimizer from config: AdamW, linear warm-up + cosine decay, masked weight decay, tower locking."""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import optax


def learning_rate_schedule(optim_cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr` over `warmup_steps`, then cosine to 0 at `total_steps`.

  The original code's schedule is shifted by one epoch (docs/methods.md,
  section 2); this one starts at step 0, on purpose.
  """
  warmup = min(int(optim_cfg.warmup_steps), max(total_steps - 1, 0))
  if optim_cfg.schedule == "constant":
    return optax.join_schedules(
        [optax.linear_schedule(0.0, optim_cfg.lr, warmup), optax.constant_schedule(optim_cfg.lr)], [warmup]
    )
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=optim_cfg.lr,
      warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1),
      end_value=0.0,
  )


def weight_decay_mask(params: Any) -> Any:
  """Decay matrices and kernels only: biases, norm scales, class/positional
  vectors and the logit scale (all of rank < 2) are left alone, as open_clip
  does. (The original RoCLIP code also exempts by name: bn/ln/bias/logit_scale.)
  """
  return jax.tree.map(lambda p: p.ndim >= 2, params)


# Top-level parameter subtrees of each tower (roclip_jax/models/clip.py). The
# ResNet has no `visual_projection`: its attention pool projects.
TOWER_PARAMS = {"image": ("vision_model", "visual_projection"), "text": ("text_model", "text_projection")}


def lock_labels(params: dict[str, Any], lock: str) -> dict[str, Any]:
  """'frozen' for every leaf of the locked tower, 'trained' for the rest (optax.multi_transform labels)."""
  if lock not in ("", *TOWER_PARAMS):
    raise ValueError(f"optim.lock={lock!r} is not a tower; use '', 'image' or 'text'.")
  frozen = TOWER_PARAMS.get(lock, ())
  return {
      name: jax.tree.map(lambda _, n=name: "frozen" if n in frozen else "trained", subtree)
      for name, subtree in params.items()
  }


def make_optimizer(
    optim_cfg: ml_collections.ConfigDict, total_steps: int, schedule: optax.Schedule | None = None
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """The train step's optimizer and its learning-rate schedule (by default `learning_rate_schedule`;
  a defense with phases, SafeCLIP, passes its own).

  With `optim_cfg.lock` = 'image' or 'text' (LiT), that tower's updates are
  exactly zero: it is routed to `set_to_zero`, so neither Adam nor weight decay
  touches it and it keeps no moments.
  """
  if schedule is None:
    schedule = learning_rate_schedule(optim_cfg, total_steps)
  parts = []
  if optim_cfg.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim_cfg.grad_clip_norm))
  parts.append(
      optax.adamw(
          schedule,
          b1=optim_cfg.b1,
          b2=optim_cfg.b2,
          eps=optim_cfg.eps,
          weight_decay=optim_cfg.weight_decay,
          mask=weight_decay_mask,
      )
  )
  tx = optax.chain(*parts)
  lock = optim_cfg["lock"]
  if lock:
    tx = optax.multi_transform({"trained": tx, "frozen": optax.set_to_zero()}, lambda params: lock_labels(params, lock))
  return tx, schedule
