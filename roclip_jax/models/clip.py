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
  image.pool: str (optional, ViT)     'cls' (default): class token, post-LN, linear projection (CLIP);
                                      'map': no class token, post-LN on every token, then SigLIP's
                                      attention-pooling head; no projection, so embed_dim = width.
  image.patch_bias: bool (optional)   ViT patch embedding with a bias (SigLIP); default False
  image.pre_norm: bool (optional)     ViT layer norm before the blocks (CLIP's ln_pre); default True
  text.vocab_size, text.context_length, text.width, text.layers, text.heads: int
  text.mlp_width: int (optional)      text MLP hidden width; 0 or absent = 4 * width (OpenAI)
  text.causal: bool (optional)        causal attention mask (CLIP, default True); False = SigLIP's
                                      bidirectional attention
  text.pool: str (optional)           'eot' (default): feature at the argmax token id (CLIP's EOT);
                                      'last': the last position (SigLIP, captions padded to the context)
  text.proj_bias: bool (optional)     text projection with a bias (SigLIP's text head); default False
  act: 'quick_gelu' | 'gelu' | 'gelu_tanh'  transformer MLP activation ('gelu_tanh': SigLIP's
                                      gelu_pytorch_tanh)
  layer_norm_eps: float (optional)    epsilon of every layer norm; default 1e-5 (CLIP), SigLIP 1e-6
  dtype: 'float32' | 'bfloat16'       compute dtype; parameters are always float32
  remat: bool                         recompute each transformer block in the backward pass
  remat_policy: str (optional)        what a rematted block keeps: 'full' (nothing, default),
                                      'dots_saveable', 'dots_no_batch_saveable'
  logit_bias: bool (optional)         add SigLIP's learnable logit bias b (init -10) and start the
                                      logit scale at ln 10; default False (OpenAI/HF layout)
  attention_impl: str (optional)      the transformer attention kernel, a runtime choice that changes no
                                      parameter: 'auto' (default: cuDNN's fused attention on an sm80+
                                      NVIDIA GPU in bfloat16, the hand-written einsum attention
                                      elsewhere), 'xla' or 'cudnn' (layers.attention_kernel)

The optional fields' defaults (`OPTIONAL_DEFAULTS`) are the CLIP layout, so configs written before a
field existed build the same model with the same initial weights.
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
# Optional architecture fields and the value a config without them means (CLIP's layout).
OPTIONAL_DEFAULTS = {
    "image.pool": "cls",
    "image.patch_bias": False,
    "image.pre_norm": True,
    "text.causal": True,
    "text.pool": "eot",
    "text.proj_bias": False,
    "layer_norm_eps": layers_lib.LAYER_NORM_EPS,
    "logit_bias": False,
}


def option(model_cfg: ml_collections.ConfigDict, path: str) -> Any:
  """The value of an optional field of `OPTIONAL_DEFAULTS` ('image.pool', ...), or its default."""
  value = model_cfg
  for part in path.split("."):
    if not hasattr(value, "get") or part not in value:
      return OPTIONAL_DEFAULTS[path]
    value = value[part]
  return value


def mlp_width(tower_cfg: ml_collections.ConfigDict) -> int:
  """The MLP hidden width of a transformer tower (`model.image` of a ViT, or `model.text`).

  0 or a missing field (configs saved before the field existed) mean OpenAI's 4 * width.
  """
  explicit = tower_cfg.get("mlp_width", 0)
  return int(explicit) if explicit else 4 * int(tower_cfg.width)


def attention_impl(model_cfg: ml_collections.ConfigDict) -> str:
  """`model.attention_impl`; configs saved before the field existed mean 'auto'."""
  return model_cfg.get("attention_impl", "auto")


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
    eps = float(option(model_cfg, "layer_norm_eps"))
    self.image_type = image.type
    if image.type == "vit":
      pool = option(model_cfg, "image.pool")
      self.vision_model = vit_lib.VisionTransformer(
          image_size=image.image_size,
          patch_size=image.patch_size,
          width=image.width,
          layers=image.layers,
          heads=image.heads,
          mlp_width=mlp_width(image),
          act=model_cfg.act,
          dtype=dtype,
          remat=_remat(model_cfg),
          pool=pool,
          patch_bias=option(model_cfg, "image.patch_bias"),
          pre_norm=option(model_cfg, "image.pre_norm"),
          layer_norm_eps=eps,
          attention_impl=attention_impl(model_cfg),
          rngs=rngs,
      )
      if pool == "map":
        self.visual_projection = None  # SigLIP: the pooling head's output is the image embedding.
      else:
        self.visual_projection = nnx.Linear(
            image.width,
            model_cfg.embed_dim,
            use_bias=False,
            param_dtype=jnp.float32,
            kernel_init=jax.nn.initializers.normal(image.width**-0.5),
            rngs=rngs,
        )
    else:
      # OpenAI: the attention pool's c_proj already maps to embed_dim; no separate projection.
      self.vision_model = resnet_lib.ModifiedResNet(
          image_size=image.image_size,
          layers=tuple(image.layers),
          width=image.width,
          heads=image.heads,
          output_dim=model_cfg.embed_dim,
          dtype=dtype,
          rngs=rngs,
      )
      self.visual_projection = None
    self.text_model = text_lib.TextTransformer(
        vocab_size=text.vocab_size,
        context_length=text.context_length,
        width=text.width,
        layers=text.layers,
        heads=text.heads,
        mlp_width=mlp_width(text),
        act=model_cfg.act,
        dtype=dtype,
        remat=_remat(model_cfg),
        causal=option(model_cfg, "text.causal"),
        pool=option(model_cfg, "text.pool"),
        layer_norm_eps=eps,
        attention_impl=attention_impl(model_cfg),
        rngs=rngs,
    )
    self.text_projection = nnx.Linear(
        text.width,
        model_cfg.embed_dim,
        use_bias=option(model_cfg, "text.proj_bias"),
        param_dtype=jnp.float32,
        kernel_init=jax.nn.initializers.normal(text.width**-0.5),
        bias_init=jax.nn.initializers.zeros,
        rngs=rngs,
    )
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
    if self.image_type == "resnet":
      return self.vision_model(images, train=train).astype(jnp.float32)
    if self.visual_projection is None:  # SigLIP's attention-pooled tower.
      return self.vision_model(images).astype(jnp.float32)
    return self.visual_projection(self.vision_model(images)).astype(jnp.float32)

  def encode_text(self, tokens: jax.Array) -> jax.Array:
    """Integer tokens [B, L] (0-padded, EOT = max id; SigLIP: padded to the context with its pad
    token) -> f32 [B, embed_dim], un-normalised."""
    return self.text_projection(self.text_model(tokens)).astype(jnp.float32)

  def __call__(self, images: jax.Array, tokens: jax.Array, *, train: bool = False) -> tuple[jax.Array, jax.Array]:
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
    raise ValueError(
        f"model config `{tower}.mlp_width`={value!r} must be a non-negative int "
        "(0 = 4 * width, as in OpenAI's CLIP)."
    )


def _optional_choice(cfg: Any, path: str, choices: tuple[Any, ...], hint: str) -> Any:
  """An optional field (`OPTIONAL_DEFAULTS`) that must be one of `choices`, of the same type (1 is no bool)."""
  value = option(cfg, path)
  if not any(type(value) is type(choice) and value == choice for choice in choices):
    raise ValueError(f"model config `{path}`={value!r} must be one of {choices} ({hint}).")
  return value


def _divisible(cfg: Any, width_path: str, heads_path: str) -> None:
  width, heads = _positive_int(cfg, width_path), _positive_int(cfg, heads_path)
  if width % heads:
    raise ValueError(
        f"model config `{width_path}`={width} is not divisible by `{heads_path}`={heads}; "
        "pick a head count that divides the width."
    )


def validate_config(model_cfg: ml_collections.ConfigDict) -> None:
  """Checks every field of the model config schema; raises ValueError naming the bad field."""
  _positive_int(model_cfg, "embed_dim")
  image_type = _field(model_cfg, "image.type")
  if image_type not in IMAGE_TYPES:
    raise ValueError(f"model config `image.type`={image_type!r} is unknown; use one of {IMAGE_TYPES}.")
  image_size = _positive_int(model_cfg, "image.image_size")
  patch_size = _field(model_cfg, "image.patch_size")
  if image_type == "vit":
    patch_size = _positive_int(model_cfg, "image.patch_size")
    if image_size % patch_size:
      raise ValueError(
          f"model config `image.image_size`={image_size} is not divisible by "
          f"`image.patch_size`={patch_size}; choose sizes where the patches tile the image."
      )
    _positive_int(model_cfg, "image.layers")
    _divisible(model_cfg, "image.width", "image.heads")
    _optional_mlp_width(model_cfg, "image")
    pool = _optional_choice(
        model_cfg, "image.pool", vit_lib.POOLS, "'cls': CLIP's class token; 'map': SigLIP's attention-pooling head"
    )
    _optional_choice(model_cfg, "image.patch_bias", (False, True), "True: SigLIP's patch embedding bias")
    _optional_choice(model_cfg, "image.pre_norm", (True, False), "False: no layer norm before the blocks, as SigLIP")
    if pool == "map" and model_cfg.embed_dim != model_cfg.image.width:
      raise ValueError(
          f"model config `embed_dim`={model_cfg.embed_dim} must equal `image.width`={model_cfg.image.width} "
          "with image.pool='map': SigLIP's pooling head has no projection, its output is the embedding. "
          "Set embed_dim to the image width (the text projection maps to it)."
      )
  else:
    if patch_size != 0:
      raise ValueError(f"model config `image.patch_size`={patch_size!r} must be 0 for image.type='resnet'.")
    if image_size % 32:
      raise ValueError(f"model config `image.image_size`={image_size} must be a multiple of 32 for a resnet.")
    depths = _field(model_cfg, "image.layers")
    if (
        not isinstance(depths, (tuple, list))
        or len(depths) != 4
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in depths)
    ):
      raise ValueError(
          f"model config `image.layers`={depths!r} must be 4 positive ints for a resnet, " "e.g. (3, 4, 6, 3)."
      )
    width = _positive_int(model_cfg, "image.width")
    heads = _positive_int(model_cfg, "image.heads")
    if width % 2 or (32 * width) % heads:
      raise ValueError(
          f"model config `image.width`={width} must be even and 32*width divisible by "
          f"`image.heads`={heads} (OpenAI uses heads = width*32//64)."
      )
    if model_cfg.image.get("mlp_width", 0):
      raise ValueError(
          f"model config `image.mlp_width`={model_cfg.image.mlp_width!r} must be 0 (or absent) for "
          "image.type='resnet', which has no transformer MLP; set text.mlp_width for the text tower."
      )
    for path in ("image.pool", "image.patch_bias", "image.pre_norm"):
      if option(model_cfg, path) != OPTIONAL_DEFAULTS[path]:
        raise ValueError(
            f"model config `{path}`={option(model_cfg, path)!r} applies to ViT towers only; "
            f"remove it (or set {OPTIONAL_DEFAULTS[path]!r}) for image.type='resnet'."
        )
  for name in ("vocab_size", "context_length", "layers"):
    _positive_int(model_cfg, f"text.{name}")
  _divisible(model_cfg, "text.width", "text.heads")
  _optional_mlp_width(model_cfg, "text")
  _optional_choice(model_cfg, "text.causal", (True, False), "False: SigLIP's bidirectional text attention")
  _optional_choice(
      model_cfg, "text.pool", text_lib.POOLS, "'eot': the argmax token id, CLIP; 'last': the last position, SigLIP"
  )
  _optional_choice(model_cfg, "text.proj_bias", (False, True), "True: SigLIP's text head bias")
  eps = option(model_cfg, "layer_norm_eps")
  if isinstance(eps, bool) or not isinstance(eps, (float, int)) or not 0 < eps < 1:
    raise ValueError(
        f"model config `layer_norm_eps`={eps!r} must be a float in (0, 1), e.g. 1e-5 (CLIP) " "or 1e-6 (SigLIP)."
    )
  act = _field(model_cfg, "act")
  if act not in layers_lib.ACTIVATIONS:
    raise ValueError(f"model config `act`={act!r} is unknown; use one of {sorted(layers_lib.ACTIVATIONS)}.")
  dtype = _field(model_cfg, "dtype")
  if dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model config `dtype`={dtype!r} is unknown; use one of {sorted(COMPUTE_DTYPES)}.")
  remat = _field(model_cfg, "remat")
  if not isinstance(remat, bool):
    raise ValueError(f"model config `remat`={remat!r} must be a bool.")
  logit_bias = model_cfg.get("logit_bias", False)
  if not isinstance(logit_bias, bool):
    raise ValueError(f"model config `logit_bias`={logit_bias!r} must be a bool (True adds SigLIP's bias).")
  impl = attention_impl(model_cfg)
  if impl not in layers_lib.ATTENTION_IMPLS:
    raise ValueError(
        f"model config `attention_impl`={impl!r} must be one of {layers_lib.ATTENTION_IMPLS} ('auto': cuDNN's "
        "fused attention where it applies, the einsum attention elsewhere)."
    )
  if impl == "cudnn" and dtype != "bfloat16":
    raise ValueError(
        f"model config `attention_impl`='cudnn' needs `dtype`='bfloat16' (cuDNN's fused attention has no "
        f"{dtype} kernel), got {dtype!r}; set dtype='bfloat16', or attention_impl='auto' or 'xla'."
    )
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

  image tower (`vit_flops` / `resnet_flops`) + visual projection 2*width*embed (ViT, pool 'cls')
  + text tower (`text_flops`, full context) + text projection 2*text_width*embed, with each
  tower's MLP width (`mlp_width`).
  Only matmuls and convolutions are counted, as in open_clip's model profile: ViT-B/32 at 224 with a
  77-token, 512-wide text tower gives 8.82e9 + 5.96e9 = 14.78e9. A training step costs about 3x.
  """
  validate_config(model_cfg)
  image, text = model_cfg.image, model_cfg.text
  if image.type == "vit":
    pool = option(model_cfg, "image.pool")
    image_flops = vit_lib.vit_flops(
        image_size=image.image_size,
        patch_size=image.patch_size,
        width=image.width,
        layers=image.layers,
        mlp_width=mlp_width(image),
        pool=pool,
    )
    if pool == "cls":
      image_flops += 2 * image.width * model_cfg.embed_dim
  else:
    image_flops = resnet_lib.resnet_flops(
        image_size=image.image_size, layers=tuple(image.layers), width=image.width, output_dim=model_cfg.embed_dim
    )
  text_flops = text_lib.text_flops(
      context_length=text.context_length, width=text.width, layers=text.layers, mlp_width=mlp_width(text)
  )
  return float(image_flops + text_flops + 2 * text.width * model_cfg.embed_dim)
