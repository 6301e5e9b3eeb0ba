"""`ModelSpec`: the static half of an NNX model, to rebuild it from the train state's plain dicts."""

from __future__ import annotations

import dataclasses
from typing import Any

from flax import nnx
import jax
import ml_collections

from roclip_jax.models import clip


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  """The static half of an NNX model, to rebuild it from plain-dict state.

  The train state holds parameters and other model variables (BatchNorm
  statistics) as plain nested dicts (`split`), which orbax and notebooks read
  directly; `merge` turns them back into a module inside a jitted function.
  """

  graphdef: Any
  params_template: nnx.State
  rest_template: nnx.State

  @classmethod
  def create(cls, model_cfg: ml_collections.ConfigDict) -> "ModelSpec":
    abstract = nnx.eval_shape(lambda: clip.build(model_cfg, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    return cls(graphdef, params, rest)

  def merge(self, params: dict, model_state: dict) -> nnx.Module:
    p = jax.tree.map(lambda x: x, self.params_template)
    nnx.replace_by_pure_dict(p, params)
    r = jax.tree.map(lambda x: x, self.rest_template)
    nnx.replace_by_pure_dict(r, model_state)
    return nnx.merge(self.graphdef, p, r)

  @staticmethod
  def split(model: nnx.Module) -> tuple[dict, dict]:
    _, params, rest = nnx.split(model, nnx.Param, ...)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(rest)
