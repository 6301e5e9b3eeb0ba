"""Evaluators, built by name from `config.evals` (big_vision style).

`config.evals` maps an evaluator name to a ConfigDict with `type`, `every_steps` (0: only at the
end of training) and type-specific fields. Metric keys are `<name>/<metric>`.

Fields every type accepts (where its data comes from; see `datasets.py`):
  dataset='demo' | 'tfds:<name>' | 'folder:<path>', data_dir='', image_size=0 (0: the model's),
  image_key='image', label_key='label', max_examples=0 (0: all; else a seeded subset).
Per type:
  zeroshot         split='test', templates='imagenet80'|'dataset'           -> top1, top5
  retrieval        split='test', ks=(1, 5, 10)                              -> i2t_r1 ... t2i_r10
  linear_probe     train_split='train', test_split='test', max_train_per_class=0,
                   l2_grid, val_fraction=0.2, select_by='loss', seed=0, max_iter=1000 -> top1
  targeted_poison  split='test', templates (targets from `poison_info`)    -> success_rate
  backdoor_asr     split='test', templates (trigger from `config.poison`)  -> asr, clean_top1

Eval data is loaded on an evaluator's first run and shared by all evaluators built by the same
`from_config` call.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import ml_collections

from roclip_jax.evaluators import datasets
from roclip_jax.evaluators.common import Evaluator

# type -> "module:Class" under roclip_jax.evaluators, imported on use.
_TYPES = {
    "zeroshot": "zeroshot:ZeroShotEvaluator",
    "retrieval": "retrieval:RetrievalEvaluator",
    "linear_probe": "linear_probe:LinearProbeEvaluator",
    "targeted_poison": "attack:TargetedPoisonEvaluator",
    "backdoor_asr": "attack:BackdoorAsrEvaluator",
}
_DATA_FIELDS = dict(dataset="demo", data_dir="", image_size=0, image_key="image", label_key="label", max_examples=0)


def _evaluator_class(kind: str, name: str) -> type[Evaluator]:
  if kind not in _TYPES:
    raise ValueError(f"config.evals.{name}.type={kind!r} is not one of {sorted(_TYPES)}.")
  module, cls = _TYPES[kind].split(":")
  return getattr(importlib.import_module(f"roclip_jax.evaluators.{module}"), cls)


def _check_fields(cls: type[Evaluator], name: str, kind: str, fields: dict[str, Any], supplied: dict[str, Any]) -> None:
  """Rejects config fields the evaluator does not take (typos, or fields from_config supplies)."""
  params = set(inspect.signature(cls.__init__).parameters) - {"self", "name", "every_steps"}
  allowed = params - set(supplied) - {"load_image"}
  unknown = sorted(set(fields) - allowed)
  if unknown:
    splits = ["train_split", "test_split"] if kind == "linear_probe" else ["split"]
    valid = sorted(allowed | set(_DATA_FIELDS) | set(splits) | {"type", "every_steps"})
    raise ValueError(f"config.evals.{name} ({kind}) has unknown field(s) {unknown}; valid fields: " f"{valid}.")


def from_config(config: ml_collections.ConfigDict, *, poison_info: Any | None = None) -> list[Evaluator]:
  """Builds every evaluator of `config.evals` (data is loaded lazily, on first run).

  Args:
    config: the full training config (for `evals`, `poison`, the model image size and the
      demo/CSV eval data).
    poison_info: the `PoisonInfo` of this run's training data; `targeted_poison` needs it and
      `backdoor_asr` takes the attack seed and target class from it when given.
  """

  @functools.cache
  def load(split: str, **data_fields) -> Any:
    return datasets.load_eval_set(config, data_fields.pop("dataset"), split, **data_fields)

  evaluators = []
  for name, ev_cfg in config.get("evals", {}).items():
    fields = ev_cfg.to_dict() if isinstance(ev_cfg, ml_collections.ConfigDict) else dict(ev_cfg)
    kind = fields.pop("type", None)
    every_steps = int(fields.pop("every_steps", 0))
    data = {k: fields.pop(k, default) for k, default in _DATA_FIELDS.items()}
    loader = functools.partial(load, **data)
    cls = _evaluator_class(kind, name)

    supplied: dict[str, Any] = {}
    if kind == "linear_probe":
      supplied["load_train"] = functools.partial(loader, fields.pop("train_split", "train"))
      supplied["load_test"] = functools.partial(loader, fields.pop("test_split", "test"))
    else:
      supplied["load_split"] = functools.partial(loader, fields.pop("split", "test"))
    if kind == "targeted_poison":
      if poison_info is None or not poison_info.targets:
        raise ValueError(
            f"config.evals.{name} (targeted_poison) needs the targets of a targeted "
            "attack: enable config.poison.targeted, or remove this evaluator."
        )
      supplied["targets"] = poison_info.targets
    if kind == "backdoor_asr":
      poison_cfg = config.poison
      supplied["poison_cfg"] = poison_cfg
      supplied["seed"] = poison_info.seed if poison_info is not None else poison_cfg.seed
      supplied["target_class"] = (
          poison_info.backdoor_target_class if poison_info else None
      ) or poison_cfg.backdoor.target_class
    _check_fields(cls, name, kind, fields, supplied)
    evaluators.append(cls(name, every_steps=every_steps, **supplied, **fields))
  return evaluators
