"""Open a training run in a notebook.

  run = roclip_jax.inspect.load("workdirs/demo")        # latest checkpoint
  emb = run.encode_images(images_uint8)                  # [N, d], unit rows
  probs = run.zero_shot(images_uint8, ["red circle", "blue star"])
  run.config, run.step, run.params, run.pool             # the defense's state is in the checkpoint too

Images are uint8 [N, S, S, 3] at the model's resolution (see
`roclip_jax.data.image_ops.resize_center_crop` for the eval preprocessing).
"""
from __future__ import annotations

from collections.abc import Sequence
import dataclasses
from typing import Any

import jax
import ml_collections
import numpy as np

from roclip_jax import encoder as encoder_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import runs
from roclip_jax import steps as steps_lib


@dataclasses.dataclass
class Run:
  config: ml_collections.ConfigDict
  step: int
  state: steps_lib.TrainState
  encoder: encoder_lib.Encoder
  workdir: str

  @property
  def params(self) -> dict[str, Any]:
    return self.state.params

  @property
  def defense_state(self):
    """The defense's device state (`TrainState.defense`): RoCLIP's pool, SafeCLIP's banks and mask, or None."""
    return self.state.defense

  @property
  def pool(self):
    """RoCLIP's caption pool (a `defenses.roclip.Pool`), or None for runs of other defenses."""
    return self.state.defense if self.config.defense == "roclip" else None

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    return self.encoder.encode_images(images)

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self.encoder.encode_texts(texts)

  def zero_shot(self, images: np.ndarray, class_names: Sequence[str],
                templates: Sequence[str] = ("a photo of a {}.",)) -> np.ndarray:
    """Class probabilities [N, C] with the prompt-ensemble classifier and the
    model's own logit scale."""
    class_emb = np.stack([
        _normalize(self.encode_texts([t.format(c) for t in templates]).mean(axis=0)) for c in class_names])
    logits = float(np.exp(np.asarray(self.state.params["logit_scale"]))) * self.encode_images(images) @ class_emb.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)

  def metrics(self) -> list[dict[str, Any]]:
    return metrics_lib.read_metrics(self.workdir)


def _normalize(x: np.ndarray) -> np.ndarray:
  return x / np.linalg.norm(x)


def load(workdir: str, step: int | None = None) -> Run:
  """Restores the run in `workdir` at `step` (default: the latest checkpoint)."""
  config, state = runs.restore(workdir, step)
  spec = steps_lib.ModelSpec.create(config.model)
  encoder = encoder_lib.Encoder(spec, state.params, state.model_state, context_length=config.model.text.context_length)
  return Run(config=config, step=int(jax.device_get(state.step)), state=state, encoder=encoder, workdir=workdir)
