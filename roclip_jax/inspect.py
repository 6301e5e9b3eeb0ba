"""Open a training run in a notebook.

  run = roclip_jax.inspect.load("workdirs/demo")        # latest checkpoint
  emb = run.encode_images(images_uint8)                  # [N, d], unit rows
  probs = run.zero_shot(images_uint8, ["red circle", "blue star"])
  run.config, run.step, run.params, run.pool             # the defense's state is in the checkpoint too

Pretrained checkpoints open the same way, without a training run:

  run = roclip_jax.inspect.load_pretrained("/models/siglip-base-patch16-224")  # HF CLIP/SigLIP dir,
  probs = run.zero_shot(images_uint8, ["cat", "dog"])                          # or an OpenAI file

Images are uint8 [N, S, S, 3] at the model's resolution (see
`roclip_jax.data.image_ops.resize_center_crop` for the eval preprocessing).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from roclip_jax import defenses
from roclip_jax import encoder as encoder_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import runs
from roclip_jax import steps as steps_lib
from roclip_jax import weights
from roclip_jax.data import image_ops
from roclip_jax.models import presets


class _Encoding:
  """encode_* and zero_shot over `self.encoder` and `self.params` (shared by runs and imported weights)."""

  encoder: encoder_lib.Encoder
  params: dict[str, Any]

  def encode_images(self, images: np.ndarray) -> np.ndarray:
    return self.encoder.encode_images(images)

  def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
    return self.encoder.encode_texts(texts)

  def encode_tokens(self, tokens: np.ndarray) -> np.ndarray:
    """Token ids [N, context_length], for models whose tokenizer is not available here."""
    return self.encoder.encode_tokens(tokens)

  def zero_shot(
      self, images: np.ndarray, class_names: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)
  ) -> np.ndarray:
    """Class probabilities [N, C] with the prompt-ensemble classifier and the
    model's own logit scale (a softmax over the classes, also for SigLIP models, whose
    logit bias shifts every class alike)."""
    class_emb = np.stack(
        [_normalize(self.encode_texts([t.format(c) for t in templates]).mean(axis=0)) for c in class_names]
    )
    logits = float(np.exp(np.asarray(self.params["logit_scale"]))) * self.encode_images(images) @ class_emb.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return probs / probs.sum(axis=1, keepdims=True)


@dataclasses.dataclass
class Run(_Encoding):
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
    return defenses.get(self.config.defense).caption_pool(self.state.defense)

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


@dataclasses.dataclass
class Pretrained(_Encoding):
  """Imported weights with a run's encode_images / encode_texts / encode_tokens / zero_shot.

  `config.model` is the model config (`config.init_from` the source, for fine-tuning from it);
  `tokenization` says how text is tokenized.
  """

  config: ml_collections.ConfigDict
  params: dict[str, Any]
  model_state: dict[str, Any]
  encoder: encoder_lib.Encoder
  source: str
  tokenization: str


SIGLIP_IMAGE_MEAN = SIGLIP_IMAGE_STD = (0.5, 0.5, 0.5)  # SiglipImageProcessor: pixels to [-1, 1].
_HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model")
_PREPROCESSOR_CONFIG = "preprocessor_config.json"


def load_pretrained(
    path: str, *, tokenizer: encoder_lib.Tokenizer | None = None, batch_size: int = 256, **openai_kwargs: Any
) -> Pretrained:
  """Opens pretrained weights (`weights.load_any`) like a run: HF CLIP or SigLIP directory, OpenAI file.

  Args:
    path: a Hugging Face `CLIPModel` or `SiglipModel` directory, or an OpenAI/open_clip weights file.
    tokenizer: captions -> int token ids [N, text.context_length]. Default: for CLIP vocabularies
      (49,408 tokens) our OpenAI BPE tokenizer, which HF CLIP and open_clip share; for a SigLIP
      directory its own tokenizer files (`tokenizer.json` / `spiece.model`, read with
      transformers' AutoTokenizer from local files only; SentencePiece files need the
      `sentencepiece` package), padded to the context length as SigLIP was trained. Without one,
      texts cannot be encoded (`encode_tokens` still works) and encode_texts says so.
    batch_size: the encoder's fixed batch.
    **openai_kwargs: heads / act overrides for OpenAI-layout files (`weights.load_openai`).

  Images are normalised with the directory's `preprocessor_config.json` mean/std if present, else
  CLIP's (SigLIP's 0.5, 0.5 for SigLIP directories).
  """
  model_cfg, params, model_state = weights.load_any(path, **openai_kwargs)
  directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
  siglip = weights.hf_model_type(directory) == weights.HF_SIGLIP_TYPE
  context = int(model_cfg.text.context_length)
  hint = "pass tokenizer= to load_pretrained"
  if tokenizer is not None:
    description = "the tokenizer passed to load_pretrained"
  elif siglip:
    tokenizer, description = _hf_tokenizer(directory, context)
    hint = (
        f"{directory} has none of {list(_HF_TOKENIZER_FILES)}; copy the checkpoint's tokenizer files there "
        "(SigLIP's SentencePiece model, padded to max_length), or pass tokenizer= to load_pretrained"
    )
  elif int(model_cfg.text.vocab_size) == presets.VOCAB_SIZE:
    tokenizer, description = None, "roclip_jax's OpenAI BPE (the vocabulary of OpenAI, open_clip and HF CLIP)"
  else:
    tokenizer, description = False, "none"
    hint = (
        f"the vocabulary has {model_cfg.text.vocab_size} tokens, not OpenAI BPE's {presets.VOCAB_SIZE}; "
        "pass the model's tokenizer as tokenizer= to load_pretrained"
    )
  mean, std = _image_normalization(directory, siglip)
  spec = steps_lib.ModelSpec.create(model_cfg)
  encoder = encoder_lib.Encoder(
      spec,
      params,
      model_state,
      context_length=context,
      batch_size=batch_size,
      tokenizer=tokenizer,
      image_mean=mean,
      image_std=std,
      missing_tokenizer_hint=hint,
  )
  config = ml_collections.ConfigDict(dict(model=model_cfg, init_from=path))
  return Pretrained(
      config=config, params=params, model_state=model_state, encoder=encoder, source=path, tokenization=description
  )


def _hf_tokenizer(directory: str, context_length: int) -> tuple[encoder_lib.Tokenizer | bool, str]:
  """The directory's own HF tokenizer, padding to the context as SigLIP does; (False, 'none') if absent."""
  if not any(os.path.isfile(os.path.join(directory, name)) for name in _HF_TOKENIZER_FILES):
    return False, "none"
  try:
    import transformers  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"{directory} has Hugging Face tokenizer files, and reading them needs transformers "
        "(pip install transformers sentencepiece), or pass tokenizer= to load_pretrained."
    ) from None
  try:
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
  except Exception as e:  # transformers raises ImportError, ValueError, OSError... by file and package.
    raise ValueError(
        f"The tokenizer files in {directory} could not be read with transformers' AutoTokenizer "
        f"({type(e).__name__}: {str(e)[:300]}). SigLIP's spiece.model needs the sentencepiece package "
        "(pip install sentencepiece); or pass tokenizer= to load_pretrained."
    ) from e

  def tokenize(texts: list[str]) -> np.ndarray:
    # SigLIP was trained on captions padded to the full context with no attention mask.
    ids = hf_tokenizer(
        list(texts), padding="max_length", max_length=context_length, truncation=True, return_tensors="np"
    )["input_ids"]
    return np.asarray(ids, np.int32)

  return tokenize, f"{type(hf_tokenizer).__name__} from {directory}, padded to max_length={context_length}"


def _image_normalization(directory: str, siglip: bool) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
  """(mean, std) for the Encoder: None, None means CLIP's constants (the exact training arithmetic)."""
  mean, std = (SIGLIP_IMAGE_MEAN, SIGLIP_IMAGE_STD) if siglip else (image_ops.CLIP_MEAN, image_ops.CLIP_STD)
  preprocessor = os.path.join(directory, _PREPROCESSOR_CONFIG)
  if os.path.isfile(preprocessor):
    with open(preprocessor, encoding="utf-8") as f:
      processor = json.load(f)
    mean = tuple(float(x) for x in processor.get("image_mean", mean))
    std = tuple(float(x) for x in processor.get("image_std", std))
  if np.allclose(mean, image_ops.CLIP_MEAN, rtol=0, atol=1e-7) and np.allclose(
      std, image_ops.CLIP_STD, rtol=0, atol=1e-7
  ):
    return None, None
  return mean, std
