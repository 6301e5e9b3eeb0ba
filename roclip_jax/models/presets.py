"""Named model configs (OpenAI CLIP's hyper-parameters plus tiny test models) and their registry.

Add a family with the `register` decorator:

  @presets.register("ViT-H/14")
  def _vit_h14() -> ml_collections.ConfigDict:
    return vit_clip(...)
"""

from __future__ import annotations

from typing import Callable, Sequence

import ml_collections

VOCAB_SIZE = 49408  # OpenAI BPE: 2*256 byte tokens + 48,894 merges + SOT (49406) + EOT (49407)

PresetFn = Callable[[], ml_collections.ConfigDict]
_PRESETS: dict[str, PresetFn] = {}


def register(name: str) -> Callable[[PresetFn], PresetFn]:
  """Decorator adding a zero-argument config factory under `name` (names must be unique)."""

  def add(fn: PresetFn) -> PresetFn:
    if name in _PRESETS:
      raise ValueError(f"model preset {name!r} is already registered; choose another name.")
    _PRESETS[name] = fn
    return fn

  return add


def preset_names() -> tuple[str, ...]:
  """All registered preset names, in registration order."""
  return tuple(_PRESETS)


def preset(name: str) -> ml_collections.ConfigDict:
  """A fresh (mutable) copy of the named model config."""
  if name not in _PRESETS:
    raise ValueError(f"model preset {name!r} is unknown; use one of {list(_PRESETS)}.")
  return _PRESETS[name]()


def text_config(
    *, width: int, layers: int, heads: int, context_length: int = 77, mlp_width: int = 0
) -> ml_collections.ConfigDict:
  """`mlp_width` 0: 4 * width, which follows `width` when a config changes it."""
  return ml_collections.ConfigDict(
      dict(
          vocab_size=VOCAB_SIZE,
          context_length=context_length,
          width=width,
          layers=layers,
          heads=heads,
          mlp_width=mlp_width,
      )
  )


def clip_config(
    *, embed_dim: int, image: dict, text: ml_collections.ConfigDict, act: str = "quick_gelu", logit_bias: bool = False
) -> ml_collections.ConfigDict:
  """Assembles the full schema with the defaults: float32 compute, no remat, no logit bias
  (set `logit_bias=True` for the SigLIP loss), attention kernel chosen per platform ('auto')."""
  return ml_collections.ConfigDict(
      dict(
          embed_dim=embed_dim,
          image=image,
          text=text,
          act=act,
          dtype="float32",
          remat=False,
          remat_policy="full",
          logit_bias=logit_bias,
          attention_impl="auto",
      )
  )


def vit_image(*, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_width: int = 0) -> dict:
  """`mlp_width` 0: 4 * width, as in `text_config`."""
  return dict(
      type="vit",
      image_size=image_size,
      patch_size=patch_size,
      width=width,
      layers=layers,
      heads=heads,
      mlp_width=mlp_width,
  )


def resnet_image(*, image_size: int, layers: Sequence[int], width: int, heads: int) -> dict:
  return dict(type="resnet", image_size=image_size, patch_size=0, width=width, layers=tuple(layers), heads=heads)


def siglip_config(
    *,
    image_size: int,
    patch_size: int,
    width: int,
    layers: int,
    heads: int,
    text_width: int,
    text_layers: int,
    text_heads: int,
    vocab_size: int,
    context_length: int,
    mlp_width: int = 0,
    text_mlp_width: int = 0,
    act: str = "gelu_tanh",
    layer_norm_eps: float = 1e-6,
) -> ml_collections.ConfigDict:
  """SigLIP's two towers (Zhai et al. 2023; HF `SiglipModel`) in this schema.

  ViT without class token or pre-LN, patch bias, attention-pooling head and no image projection (so
  `embed_dim` = `width`); bidirectional text tower pooled at the last position, with a biased head
  into the image width; learnable logit bias. `mlp_width` 0: 4 * width.
  """
  image = vit_image(
      image_size=image_size, patch_size=patch_size, width=width, layers=layers, heads=heads, mlp_width=mlp_width
  )
  image.update(pool="map", patch_bias=True, pre_norm=False)
  text = text_config(
      width=text_width, layers=text_layers, heads=text_heads, context_length=context_length, mlp_width=text_mlp_width
  )
  text.vocab_size = vocab_size
  text.update(dict(causal=False, pool="last", proj_bias=True))
  cfg = clip_config(embed_dim=width, image=image, text=text, act=act, logit_bias=True)
  cfg.layer_norm_eps = float(layer_norm_eps)
  return cfg


def _tiny_text() -> ml_collections.ConfigDict:
  return text_config(width=64, layers=2, heads=2, context_length=32)


@register("tiny")
def _tiny() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=64, image=vit_image(image_size=32, patch_size=8, width=64, layers=2, heads=2), text=_tiny_text()
  )


@register("tiny-rn")
def _tiny_rn() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=64, image=resnet_image(image_size=32, layers=(1, 1, 1, 1), width=16, heads=2), text=_tiny_text()
  )


# OpenAI CLIP's released architectures (clip/model.py:build_model, open_clip model_configs).
@register("RN50")
def _rn50() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=1024,
      image=resnet_image(image_size=224, layers=(3, 4, 6, 3), width=64, heads=64 * 32 // 64),
      text=text_config(width=512, layers=12, heads=8),
  )


@register("ViT-B/32")
def _vit_b32() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=512,
      image=vit_image(image_size=224, patch_size=32, width=768, layers=12, heads=12),
      text=text_config(width=512, layers=12, heads=8),
  )


@register("ViT-B/16")
def _vit_b16() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=512,
      image=vit_image(image_size=224, patch_size=16, width=768, layers=12, heads=12),
      text=text_config(width=512, layers=12, heads=8),
  )


@register("ViT-L/14")
def _vit_l14() -> ml_collections.ConfigDict:
  return clip_config(
      embed_dim=768,
      image=vit_image(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
      text=text_config(width=768, layers=12, heads=12),
  )


@register("tiny-siglip")
def _tiny_siglip() -> ml_collections.ConfigDict:
  return siglip_config(
      image_size=32,
      patch_size=8,
      width=64,
      layers=2,
      heads=2,
      text_width=64,
      text_layers=2,
      text_heads=2,
      vocab_size=VOCAB_SIZE,
      context_length=32,
  )


# google/siglip-base-patch16-224 (transformers' SiglipConfig defaults): 32,000 SentencePiece tokens.
@register("SigLIP-B/16")
def _siglip_b16() -> ml_collections.ConfigDict:
  return siglip_config(
      image_size=224,
      patch_size=16,
      width=768,
      layers=12,
      heads=12,
      text_width=768,
      text_layers=12,
      text_heads=12,
      vocab_size=32000,
      context_length=64,
  )
