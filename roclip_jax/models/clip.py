"""The two-tower CLIP model, its config validation, builder, parameter and FLOP counts.

Model config schema (every field is required by `build`):

  embed_dim: int                      joint embedding size
  image.type: 'vit' | 'resnet'
  image.image_size: int               square input side, pixels
  image.width: int                    ViT width, or ResNet base width (stem/stage-1 planes)
  image.layers: int (vit) | 4 ints (resnet)
  image.heads: int                    ViT heads, or attention-pool heads (OpenAI: width*32//64)
  image.patch_size: int               ViT patch side; 0 for resnet
  image.mlp_width: int (optional)     ViT MLP hidden width; 0 or absent = 4 * width (OpenAI).
                                      ResNet towers have no transformer MLP: 0 or absent.
  text.vocab_size, text.context_length, text.width, text.layers, text.heads: int
  text.mlp_width: int (optional)      text MLP hidden width; 0 or absent = 4 * width (OpenAI)
  act: 'quick_gelu' | 'gelu'          transformer MLP activation
  dtype: 'float32' | 'bfloat16'       compute dtype; parameters are always float32
  remat: bool                         recompute each transformer block in the backward pass
  remat_policy: str (optional)        what a rematted block keeps: 'full' (nothing, default),
                                      'dots_saveable', 'dots_no_batch_saveable'
  logit_bias: bool (optional)         add SigLIP's learnable logit bias b (init -10) and start the
                                      logit scale at ln 10; default False (OpenAI/HF layout)
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from roclip_jax.models import layers as layers_lib
from roclip_jax.models import resnet as resnet_lib
from roclip_jax.models import text as text_lib
from roclip_jax.models import vit as vit_lib

IMAGE_TYPES = ("vit", "resnet")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
INIT_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP: temperature 0.07
SIGLIP_INIT_LOGIT_SCALE = math.log(10.0)  # SigLIP (Zhai et al. 2023): t' = ln 10 ...
SIGLIP_INIT_LOGIT_BIAS = -10.0  # ... and b = -10, so training starts from "every pair is negative".


def mlp_width(tower_cfg: ml_collections.ConfigDict) -> int:
  """The MLP hidden width of a transformer tower (`model.image` of a ViT, or `model.text`).

  0 or a missing field (configs saved before the field existed) mean OpenAI's 4 * width.
  """
  explicit = tower_cfg.get("mlp_width", 0)
  return int(explicit) if explicit else 4 * int(tower_cfg.width)


def _remat(model_cfg: ml_collections.ConfigDict) -> bool | str:
  """False, or the remat policy name for `layers.apply_blocks`."""
  return model_cfg.get("remat_policy", "full") if model_cfg.remat else False


class CLIP(nnx.Module):
  """Image tower + text tower + linear projections into a joint space + learnable logit scale.

  Features come out UN-normalised and in float32; the loss normalises them and applies
  exp(logit_scale).
  """

  def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs):
    """Builds the towers from a config already checked by `validate_config` (see `build`)."""
    dtype = COMPUTE_DTYPES[model_cfg.dtype]
    image, text = model_cfg.image, model_cfg.text
    self.image_type = image.type
    if image.type == "vit":
      self.vision_model = vit_lib.VisionTransformer(
          image_size=image.image_size, patch_size=image.patch_size, width=image.width,
          layers=image.layers, heads=image.heads, mlp_width=mlp_width(image), act=model_cfg.act,
          dtype=dtype, remat=_remat(model_cfg), rngs=rngs)
      self.visual_projection = nnx.Linear(
          image.width, model_cfg.embed_dim, use_bias=False, param_dtype=jnp.float32,
          kernel_init=jax.nn.initializers.normal(image.width ** -0.5), rngs=rngs)
    else:
      # OpenAI: the attention pool's c_proj already maps to embed_dim; no separate projection.
      self.vision_model = resnet_lib.ModifiedResNet(
          image_size=image.image_size, layers=tuple(image.layers), width=image.width,
          heads=image.heads, output_dim=model_cfg.embed_dim, dtype=dtype, rngs=rngs)
      self.visual_projection = None
    self.text_model = text_lib.TextTransformer(
        vocab_size=text.vocab_size, context_length=text.context_length, width=text.width,
        layers=text.layers, heads=text.heads, mlp_width=mlp_width(text), act=model_cfg.act,
        dtype=dtype, remat=_remat(model_cfg), rngs=rngs)
    self.text_projection = nnx.Linear(
        text.width, model_cfg.embed_dim, use_bias=False, param_dtype=jnp.float32,
        kernel_init=jax.nn.initializers.normal(text.width ** -0.5), rngs=rngs)
    # The bias exists only for the sigmoid loss; without it the parameter tree is
    # OpenAI's, so weight import and parameter counts are unchanged.
    with_bias = bool(model_cfg.get("logit_bias", False))
    init_scale = SIGLIP_INIT_LOGIT_SCALE if with_bias else INIT_LOGIT_SCALE
    self.logit_scale = nnx.Param(jnp.asarray(init_scale, jnp.float32))
    if with_bias:
      self.logit_bias = nnx.Param(jnp.asarray(SIGLIP_INIT_LOGIT_BIAS, jnp.float32))

  def encode_image(self, images: jax.Array, *, train: bool = False) -> jax.Array:
    """Normalised float NHWC images [B, S, S, 3] -> float32 [B, embed_dim] (not L2-normalised).

    `train` only matters for the ResNet: it uses batch BN statistics and updates the running ones.
    """
    if self.visual_projection is None:
      return self.vision_model(images, train=train).astype(jnp.float32)
    return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Integer tokens [B, L] (0-padded, EOT = max id) -> f32 [B, embed_dim], un-normalised."""
    return self.text_projection(self.text_model(tokens)).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, *,
               train: bool = False) -> tuple[jax.Array, jax.Array]:
    """Returns (image_features, text_features), both float32 [B, embed_dim], un-normalised."""
    return self.encode_image(images, train=train), self.encode_text(tokens)


def _field(cfg: Any, path: str) -> Any:
  """Reads `a.b` from a ConfigDict, raising a ValueError that names a missing field."""
  value = cfg
  for part in path.split("."):
    if part not in value:
      raise ValueError(f"model config is missing `{path}`; add it (see roclip_jax/models/clip.py).")
    value = value[part]
  return value


def _positive_int(cfg: Any, path: str) -> int:
  value = _field(cfg, path)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
    raise ValueError(f"model config `{path}`={value!r} must be a positive int.")
  return int(value)


def _optional_mlp_width(cfg: Any, tower: str) -> None:
  value = cfg[tower].get("mlp_width", 0)
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
    raise ValueError(f"model config `{tower}.mlp_width`={value!r} must be a non-negative int "
                     "(0 = 4 * width, as in OpenAI's CLIP).")


def _divisible(cfg: Any, width_path: str, heads_path: str) -> None:
  width, heads = _positive_int(cfg, width_path), _positive_int(cfg, heads_path)
  if width % heads:
    raise ValueError(
        f"model config `{width_path}`={width} is not divisible by `{heads_path}`={heads}; "
        "pick a head count that divides the width.")


def validate_config(model_cfg: ml_collections.ConfigDict) -> None:
  """Checks every field of the model config schema; raises ValueError naming the bad field."""
  _positive_int(model_cfg, "embed_dim")
  image_type = _field(model_cfg, "image.type")
  if image_type not in IMAGE_TYPES:
    raise ValueError(
        f"model config `image.type`={image_type!r} is unknown; use one of {IMAGE_TYPES}.")
  image_size = _positive_int(model_cfg, "image.image_size")
  patch_size = _field(model_cfg, "image.patch_size")
  if image_type == "vit":
    patch_size = _positive_int(model_cfg, "image.patch_size")
    if image_size % patch_size:
      raise ValueError(
          f"model config `image.image_size`={image_size} is not divisible by "
          f"`image.patch_size`={patch_size}; choose sizes where the patches tile the image.")
    _positive_int(model_cfg, "image.layers")
    _divisible(model_cfg, "image.width", "image.heads")
    _optional_mlp_width(model_cfg, "image")
  else:
    if patch_size != 0:
      raise ValueError(
          f"model config `image.patch_size`={patch_size!r} must be 0 for image.type='resnet'.")
    if image_size % 32:
      raise ValueError(
          f"model config `image.image_size`={image_size} must be a multiple of 32 for a resnet.")
    depths = _field(model_cfg, "image.layers")
    if (not isinstance(depths, (tuple, list)) or len(depths) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths)):
      raise ValueError(
          f"model config `image.layers`={depths!r} must be 4 positive ints for a resnet, "
          "e.g. (3, 4, 6, 3).")
    width = _positive_int(model_cfg, "image.width")
    heads = _positive_int(model_cfg, "image.heads")
    if width % 2 or (32 * width) % heads:
      raise ValueError(
          f"model config `image.width`={width} must be even and 32*width divisible by "
          f"`image.heads`={heads} (OpenAI uses heads = width*32//64).")
    if model_cfg.image.get("mlp_width", 0):
      raise ValueError(
          f"model config `image.mlp_width`={model_cfg.image.mlp_width!r} must be 0 (or absent) for "
          "image.type='resnet', which has no transformer MLP; set text.mlp_width for the text tower.")
  for name in ("vocab_size", "context_length", "layers"):
    _positive_int(model_cfg, f"text.{name}")
  _divisible(model_cfg, "text.width", "text.heads")
  _optional_mlp_width(model_cfg, "text")
  act = _field(model_cfg, "act")
  if act not in layers_lib.ACTIVATIONS:
    raise ValueError(
        f"model config `act`={act!r} is unknown; use one of {sorted(layers_lib.ACTIVATIONS)}.")
  dtype = _field(model_cfg, "dtype")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(
        f"model config `dtype`={dtype!r} is unknown; use one of {sorted(COMPUTE_DTYPES)}.")
  remat = _field(model_cfg, "remat")
  if not isinstance(remat, bool):
    raise ValueError(f"model config `remat`={remat!r} must be a bool.")
  logit_bias = model_cfg.get("logit_bias", False)
  if not isinstance(logit_bias, bool):
    raise ValueError(f"model config `logit_bias`={logit_bias!r} must be a bool (True adds SigLIP's bias).")
  policy = model_cfg.get("remat_policy", "full")
  if policy not in layers_lib.REMAT_POLICIES:
    raise ValueError(f"model config `remat_policy`={policy!r} must be one of {sorted(layers_lib.REMAT_POLICIES)}.")


def build(model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs) -> CLIP:
  """Validates `model_cfg` and builds a CLIP. Wrap in `nnx.eval_shape` for an abstract model."""
  validate_config(model_cfg)
  return CLIP(model_cfg, rngs=rngs)


def count_params(model: nnx.Module) -> int:
  """Number of trainable parameters (`nnx.Param`; BatchNorm statistics excluded).

  Works on concrete models and on abstract ones from `nnx.eval_shape`.
  """
  leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
  return int(sum(math.prod(leaf.shape) for leaf in leaves))


def flops_per_pair(model_cfg: ml_collections.ConfigDict) -> float:
  """Analytic forward FLOPs for one image-text pair, counting a multiply-add as 2 FLOPs.

  image tower (`vit_flops` / `resnet_flops`) + visual projection 2*width*embed (ViT)
  + text tower (`text_flops`, full context) + text projection 2*text_width*embed, with each
  tower's MLP width (`mlp_width`).
  Only matmuls and convolutions are counted, as in open_clip's model profile: ViT-B/32 at 224 with a
  77-token, 512-wide text tower gives 8.82e9 + 5.96e9 = 14.78e9. A training step costs about 3x.
  """
  validate_config(model_cfg)
  image, text = model_cfg.image, model_cfg.text
  if image.type == "vit":
    image_flops = vit_lib.vit_flops(
        image_size=image.image_size, patch_size=image.patch_size, width=image.width,
        layers=image.layers, mlp_width=mlp_width(image)) + 2 * image.width * model_cfg.embed_dim
  else:
    image_flops = resnet_lib.resnet_flops(
        image_size=image.image_size, layers=tuple(image.layers), width=image.width,
        output_dim=model_cfg.embed_dim)
  text_flops = text_lib.text_flops(
      context_length=text.context_length, width=text.width, layers=text.layers,
      mlp_width=mlp_width(text))
  return float(image_flops + text_flops + 2 * text.width * model_cfg.embed_dim)
