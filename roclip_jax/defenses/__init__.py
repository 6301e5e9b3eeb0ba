"""Defenses against data poisoning, one module each, registered by name.

`config.defense` names one: 'none' (plain CLIP, `clip.py`), 'roclip'
(`roclip.py`), 'safeclip' (`safeclip.py`) or 'cleanclip' (`cleanclip.py`).
Each is a `base.Defense` subclass; adding one is a module plus one `register`
line (docs/architecture.md, "Adding a defense"). The methods:
docs/methods.md and docs/roclip.md.
"""

from __future__ import annotations

import ml_collections

from roclip_jax.defenses import base
from roclip_jax.defenses import cleanclip
from roclip_jax.defenses import clip
from roclip_jax.defenses import roclip
from roclip_jax.defenses import safeclip
from roclip_jax.errors import config_error

Defense = base.Defense
StepKind = base.StepKind
EpochHooks = base.EpochHooks
RunContext = base.RunContext
RunFacts = base.RunFacts
# `config.defense` unless a config says otherwise: plain CLIP, the control every defense is compared with.
DEFAULT = clip.PlainClip.name

_REGISTRY: dict[str, type[base.Defense]] = {}


def register(cls: type[base.Defense]) -> type[base.Defense]:
  """Registers a defense class under `cls.name` (usable as a decorator); a name is taken once."""
  if not cls.name:
    raise ValueError(f"{cls.__name__}.name is empty; give the defense a name for config.defense.")
  if _REGISTRY.get(cls.name, cls) is not cls:
    raise ValueError(f"A defense named {cls.name!r} is already registered ({_REGISTRY[cls.name].__name__}).")
  _REGISTRY[cls.name] = cls
  return cls


def names() -> tuple[str, ...]:
  return tuple(_REGISTRY)


def get(name: str) -> type[base.Defense]:
  if name not in _REGISTRY:
    raise config_error("defense", f"{name!r} is not a known defense.", f"use one of {names()}.")
  return _REGISTRY[name]


def from_config(config: ml_collections.ConfigDict, facts: base.RunFacts) -> base.Defense:
  """The defense `config.defense` names, built for a run with these facts."""
  return get(config.defense)(config, facts)


def recorded_num_examples(config: ml_collections.ConfigDict) -> int:
  """The training examples of a run written before `run_info.json`, as its config recorded them (0: none)."""
  return safeclip.recorded_num_examples(config)


register(clip.PlainClip)
register(roclip.RoClip)
register(safeclip.SafeClip)
register(cleanclip.CleanClip)
