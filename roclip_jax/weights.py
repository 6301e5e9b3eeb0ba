"""Pretrained CLIP weights in and out: Hugging Face `CLIPModel` and OpenAI / open_clip state dicts.

  model_cfg, params, model_state = weights.load_any("/ckpt/clip-vit-base-patch32")  # HF directory
  model_cfg, params, model_state = weights.load_openai("/ckpt/RN50.safetensors")     # OpenAI layout
  model_cfg, params, model_state = weights.load_hf_siglip("/ckpt/siglip-base-patch16-224")  # HF SiglipModel
  model = models.ModelSpec.create(model_cfg).merge(params, model_state)
  weights.export_hf(model_cfg, params, "/out/hf")                        # ViT models only
  weights.export_openai(model_cfg, params, model_state, "/out/clip.safetensors")  # ViT or ResNet

`params` / `model_state` are plain nested dicts of float32 numpy arrays with exactly the structure
of `models.ModelSpec.split(model)` (the train state's `params` / `model_state`; the ResNet's BatchNorm
running statistics are the model state). Nothing here imports torch unless a PyTorch pickle
(`.pt`/`.bin`) has to be read; safetensors files are read with `safetensors.numpy`.

Layouts and the mapping to our layer names (which follow HF for the transformers and OpenAI for
the ResNet, see `models/`):
* PyTorch `Linear.weight` is [out, in]; a flax kernel is [in, out]: transposed. OpenAI's
  `visual.proj` and `text_projection` are used as `x @ proj`, so they already are [in, out].
* `Conv2d.weight` OIHW -> flax HWIO.
* OpenAI's fused `attn.in_proj_weight` [3W, W] / `in_proj_bias` [3W] split into q, k, v (in order).
* LayerNorm / BatchNorm `weight` -> `scale`; BatchNorm `running_mean`/`running_var` -> model state
  `mean`/`var` (`num_batches_tracked` is dropped).
* `logit_scale` is the log of the inverse temperature in all layouts (HF SigLIP stores it, and its
  `logit_bias`, with shape [1]; ours are scalars).
* SigLIP (`load_hf_siglip`): `vision_model.head.*` is the attention-pooling head (`models/vit.py`),
  its `attention.in_proj_*` is torch's fused MultiheadAttention q, k, v (split like OpenAI's);
  `text_model.head` (a Linear with bias) is our `text_projection`; there is no visual projection.
* Text pooling. Our text tower pools at the argmax token id (EOT 49407 is the largest id and our
  tokenizer pads with 0). HF pools at argmax id when `eos_token_id == 2` (old configs) and at the
  first `eos_token_id` position otherwise; on [SOT] ... [EOT] 0-padded rows both are the EOT
  position, and so is ours on HF's EOT-padded rows (argmax returns the first maximum).
* The transformer MLP activation is not in the weights: HF's config has `hidden_act`; OpenAI's
  models use QuickGELU; open_clip models trained without `-quickgelu` use GELU (pass `act=`, or
  keep the hub's `open_clip_config.json` next to the weights).
* MLP widths are per tower: HF's `intermediate_size` of each tower config, or the rows of the
  first block's `mlp.c_fc.weight` in OpenAI layout (open_clip's ViT-bigG-14: 8192 for width 1664).
  A width of exactly 4 * hidden is stored as `mlp_width=0`, the presets' "4x", so a standard
  checkpoint loads to the same config as before the field existed.
* Head counts are not in OpenAI-layout weights either: OpenAI's rule is width // 64 for
  transformers and 32 * width // 64 for the ResNet attention pool (override with `*_heads=`).
  `export_openai` records the full config in the safetensors metadata, and `load_openai` uses it.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import zipfile
from typing import Any, Callable, Mapping

from absl import logging
from flax import nnx
import ml_collections
import numpy as np
from safetensors import safe_open
import safetensors.numpy as safetensors_np

from roclip_jax import models
from roclip_jax.models import layers as layers_lib
from roclip_jax.models import presets

Array = np.ndarray
Path = tuple[Any, ...]  # A key path into the pure-dict trees: ('params' | 'state', name, ..., leaf).

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
HF_TORCH_WEIGHTS = "pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
METADATA_KEY = "roclip_model_config"  # export_openai's config, in the safetensors header.
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Buffers some checkpoints carry that hold no weights.
_IGNORED_SUFFIXES = ("position_ids", "num_batches_tracked", "attn_mask")
_IGNORED_KEYS = ("input_resolution", "context_length", "vocab_size")
# Fields that define the architecture; `dtype`/`remat` are runtime choices.
ARCHITECTURE_FIELDS = (
    "embed_dim",
    "act",
    "image.type",
    "image.image_size",
    "image.patch_size",
    "image.width",
    "image.layers",
    "image.heads",
    "image.mlp_width",
    "text.vocab_size",
    "text.context_length",
    "text.width",
    "text.layers",
    "text.heads",
    "text.mlp_width",
    # Optional (models.OPTIONAL_DEFAULTS): compared with their defaults filled in.
    "image.pool",
    "image.patch_bias",
    "image.pre_norm",
    "text.causal",
    "text.pool",
    "text.proj_bias",
    "layer_norm_eps",
    "logit_bias",
)
HF_SIGLIP_TYPE = "siglip"
# Hugging Face `hidden_act` names -> ours (the tanh GELU has two HF names).
_HF_ACTIVATIONS = {
    "quick_gelu": "quick_gelu",
    "gelu": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
}

# transformers' CLIPTextConfig / CLIPVisionConfig defaults, for fields a config.json leaves out.
_HF_TEXT_DEFAULTS = dict(
    vocab_size=49408,
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=8,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
_HF_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
)
# transformers' SiglipTextConfig / SiglipVisionConfig defaults (google/siglip-base-patch16-224).
_HF_SIGLIP_TEXT_DEFAULTS = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=64,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    projection_size=None,
)
_HF_SIGLIP_VISION_DEFAULTS = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=16,
    hidden_act="gelu_pytorch_tanh",
    layer_norm_eps=1e-6,
    vision_use_head=True,
)


# ----------------------------------------------------------------- tensor rules


@dataclasses.dataclass(frozen=True)
class _Rule:
  """One checkpoint tensor <-> one leaf of our trees.

  kind: 'same' (copied), 'linear' ([out, in] <-> [in, out]), 'conv' (OIHW <-> HWIO) or 'scalar'
  (HF SigLIP's [1]-shaped logit scale and bias <-> our 0-d ones).
  """

  torch_name: str
  path: Path
  kind: str = "same"


_TO_FLAX: dict[str, Callable[[Array], Array]] = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(2, 3, 1, 0),
    "scalar": lambda a: a.reshape(()),
}
_TO_TORCH: dict[str, Callable[[Array], Array]] = {
    "same": lambda a: a,
    "linear": lambda a: a.T,
    "conv": lambda a: a.transpose(3, 2, 0, 1),
    "scalar": lambda a: a.reshape((1,)),
}


def _linear(torch_prefix: str, path: Path, bias: bool = True) -> list[_Rule]:
  rules = [_Rule(f"{torch_prefix}.weight", ("params", *path, "kernel"), "linear")]
  return rules + ([_Rule(f"{torch_prefix}.bias", ("params", *path, "bias"))] if bias else [])


def _layer_norm(torch_prefix: str, path: Path) -> list[_Rule]:
  return [
      _Rule(f"{torch_prefix}.weight", ("params", *path, "scale")),
      _Rule(f"{torch_prefix}.bias", ("params", *path, "bias")),
  ]


def _batch_norm(torch_prefix: str, path: Path) -> list[_Rule]:
  return _layer_norm(torch_prefix, path) + [
      _Rule(f"{torch_prefix}.running_mean", ("state", *path, "mean")),
      _Rule(f"{torch_prefix}.running_var", ("state", *path, "var")),
  ]


def _conv(torch_prefix: str, path: Path) -> list[_Rule]:
  return [_Rule(f"{torch_prefix}.weight", ("params", *path, "kernel"), "conv")]


# Sub-layer names of one transformer block: ours (= HF) -> OpenAI's. OpenAI's q/k/v are split out
# of the fused `attn.in_proj_*` before the rules run (`_split_fused_qkv`).
_OPENAI_BLOCK_NAMES = {
    "self_attn.q_proj": "attn.q_proj",
    "self_attn.k_proj": "attn.k_proj",
    "self_attn.v_proj": "attn.v_proj",
    "self_attn.out_proj": "attn.out_proj",
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}


def _blocks(torch_prefix: str, tower: str, layers: int, openai: bool) -> list[_Rule]:
  rules = []
  for i in range(layers):
    for ours, theirs in _OPENAI_BLOCK_NAMES.items():
      name = f"{torch_prefix}.{i}.{theirs if openai else ours}"
      path = (tower, "layers", i, *ours.split("."))
      rules += (_layer_norm if ours.startswith("layer_norm") else _linear)(name, path)
  return rules


def _hf_rules(cfg: ml_collections.ConfigDict) -> list[_Rule]:
  v, t = "vision_model", "text_model"
  return [
      _Rule(f"{v}.embeddings.class_embedding", ("params", v, "class_embedding")),
      *_conv(f"{v}.embeddings.patch_embedding", (v, "patch_embedding")),
      _Rule(f"{v}.embeddings.position_embedding.weight", ("params", v, "position_embedding")),
      *_layer_norm(f"{v}.pre_layrnorm", (v, "pre_layrnorm")),
      *_blocks(f"{v}.encoder.layers", v, cfg.image.layers, openai=False),
      *_layer_norm(f"{v}.post_layernorm", (v, "post_layernorm")),
      *_linear("visual_projection", ("visual_projection",), bias=False),
      _Rule(f"{t}.embeddings.token_embedding.weight", ("params", t, "token_embedding")),
      _Rule(f"{t}.embeddings.position_embedding.weight", ("params", t, "position_embedding")),
      *_blocks(f"{t}.encoder.layers", t, cfg.text.layers, openai=False),
      *_layer_norm(f"{t}.final_layer_norm", (t, "final_layer_norm")),
      *_linear("text_projection", ("text_projection",), bias=False),
      _Rule("logit_scale", ("params", "logit_scale")),
  ]


def _hf_siglip_rules(cfg: ml_collections.ConfigDict) -> list[_Rule]:
  """HF `SiglipModel` names; the head's fused q, k, v are split first (`_split_siglip_head`)."""
  v, t, head = "vision_model", "text_model", "vision_model.head"
  return [
      *_conv(f"{v}.embeddings.patch_embedding", (v, "patch_embedding")),
      _Rule(f"{v}.embeddings.patch_embedding.bias", ("params", v, "patch_embedding", "bias")),
      _Rule(f"{v}.embeddings.position_embedding.weight", ("params", v, "position_embedding")),
      *_blocks(f"{v}.encoder.layers", v, cfg.image.layers, openai=False),
      *_layer_norm(f"{v}.post_layernorm", (v, "post_layernorm")),
      _Rule(f"{head}.probe", ("params", v, "head", "probe")),
      *[
          rule
          for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
          for rule in _linear(f"{head}.attention.{proj}", (v, "head", "attention", proj))
      ],
      *_layer_norm(f"{head}.layernorm", (v, "head", "layernorm")),
      *_linear(f"{head}.mlp.fc1", (v, "head", "mlp", "fc1")),
      *_linear(f"{head}.mlp.fc2", (v, "head", "mlp", "fc2")),
      _Rule(f"{t}.embeddings.token_embedding.weight", ("params", t, "token_embedding")),
      _Rule(f"{t}.embeddings.position_embedding.weight", ("params", t, "position_embedding")),
      *_blocks(f"{t}.encoder.layers", t, cfg.text.layers, openai=False),
      *_layer_norm(f"{t}.final_layer_norm", (t, "final_layer_norm")),
      *_linear(f"{t}.head", ("text_projection",)),
      _Rule("logit_scale", ("params", "logit_scale"), "scalar"),
      _Rule("logit_bias", ("params", "logit_bias"), "scalar"),
  ]


def _openai_resnet_rules(cfg: ml_collections.ConfigDict) -> list[_Rule]:
  v = "vision_model"
  rules = []
  for i in (1, 2, 3):
    rules += _conv(f"visual.conv{i}", (v, f"conv{i}")) + _batch_norm(f"visual.bn{i}", (v, f"bn{i}"))
  for stage, depth in enumerate(cfg.image.layers, start=1):
    for b in range(depth):
      prefix, path = f"visual.layer{stage}.{b}", (v, f"layer{stage}", b)
      for i in (1, 2, 3):
        rules += _conv(f"{prefix}.conv{i}", (*path, f"conv{i}"))
        rules += _batch_norm(f"{prefix}.bn{i}", (*path, f"bn{i}"))
      # The first block of every stage has a downsample branch (stride 2, or 4x channel growth).
      if b == 0:
        rules += _conv(f"{prefix}.downsample.0", (*path, "downsample", 0))
        rules += _batch_norm(f"{prefix}.downsample.1", (*path, "downsample", 1))
  rules.append(_Rule("visual.attnpool.positional_embedding", ("params", v, "attnpool", "positional_embedding")))
  for proj in ("q_proj", "k_proj", "v_proj", "c_proj"):
    rules += _linear(f"visual.attnpool.{proj}", (v, "attnpool", proj))
  return rules


def _openai_rules(cfg: ml_collections.ConfigDict) -> list[_Rule]:
  v, t = "vision_model", "text_model"
  if cfg.image.type == "vit":
    image = [
        _Rule("visual.class_embedding", ("params", v, "class_embedding")),
        *_conv("visual.conv1", (v, "patch_embedding")),
        _Rule("visual.positional_embedding", ("params", v, "position_embedding")),
        *_layer_norm("visual.ln_pre", (v, "pre_layrnorm")),
        *_blocks("visual.transformer.resblocks", v, cfg.image.layers, openai=True),
        *_layer_norm("visual.ln_post", (v, "post_layernorm")),
        _Rule("visual.proj", ("params", "visual_projection", "kernel")),  # Already [in, out].
    ]
  else:
    image = _openai_resnet_rules(cfg)
  return image + [
      _Rule("token_embedding.weight", ("params", t, "token_embedding")),
      _Rule("positional_embedding", ("params", t, "position_embedding")),
      *_blocks("transformer.resblocks", t, cfg.text.layers, openai=True),
      *_layer_norm("ln_final", (t, "final_layer_norm")),
      _Rule("text_projection", ("params", "text_projection", "kernel")),  # Already [in, out].
      _Rule("logit_scale", ("params", "logit_scale")),
  ]


# ------------------------------------------------------------ trees and files


def _templates(model_cfg: ml_collections.ConfigDict) -> tuple[dict, dict]:
  """Pure-dict trees of ShapeDtypeStructs (params, model_state) of the model `model_cfg` builds."""
  spec = models.ModelSpec.create(model_cfg)
  return nnx.to_pure_dict(spec.params_template), nnx.to_pure_dict(spec.rest_template)


def _leaf_paths(tree: Mapping, prefix: Path = ()) -> dict[Path, Any]:
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(_leaf_paths(value, (*prefix, key)))
    else:
      out[(*prefix, key)] = value
  return out


def _fill(template: Mapping, values: Mapping[Path, Array], prefix: Path) -> dict:
  """A copy of `template` (empty sub-dicts included) with every leaf taken from `values`."""
  return {
      key: (_fill(sub, values, (*prefix, key)) if isinstance(sub, Mapping) else values[(*prefix, key)])
      for key, sub in template.items()
  }


def _path_name(path: Path) -> str:
  return "/".join(str(p) for p in path)


def _ignored(name: str) -> bool:
  return name in _IGNORED_KEYS or name.endswith(_IGNORED_SUFFIXES)


def _assemble(
    model_cfg: ml_collections.ConfigDict, tensors: Mapping[str, Array], rules: list[_Rule], source: str
) -> tuple[dict, dict]:
  """Maps checkpoint tensors through `rules` into (params, model_state), checking every shape.

  Every leaf of the model must be filled and every checkpoint tensor used (bar buffers such as
  `position_ids`), so a checkpoint of another architecture fails here instead of loading silently.
  """
  params_t, state_t = _templates(model_cfg)
  expected = {("params", *p): s for p, s in _leaf_paths(params_t).items()}
  expected.update({("state", *p): s for p, s in _leaf_paths(state_t).items()})
  values: dict[Path, Array] = {}
  missing = []
  for rule in rules:
    if rule.torch_name not in tensors:
      missing.append(rule.torch_name)
      continue
    if rule.path not in expected:
      raise AssertionError(
          f"weights.py maps {rule.torch_name} to {_path_name(rule.path)}, "
          "which the model does not have: the layer names in models/ changed."
      )
    value = np.asarray(_TO_FLAX[rule.kind](np.asarray(tensors[rule.torch_name])), np.float32)
    want = tuple(expected[rule.path].shape)
    if value.shape != want:
      raise ValueError(
          f"{source}: tensor {rule.torch_name} has shape {tuple(tensors[rule.torch_name].shape)}, "
          f"which maps to {value.shape} but the model config read from the checkpoint needs {want} "
          f"at {_path_name(rule.path)}. The checkpoint is not a standard CLIP of that config "
          "(wrong heads/act overrides, or a modified architecture)."
      )
    values[rule.path] = value
  if missing:
    raise ValueError(
        f"{source}: {len(missing)} tensor(s) the model needs are missing, e.g. "
        f"{missing[:5]}; the file is incomplete or not a CLIP checkpoint of this layout."
    )
  used = {rule.torch_name for rule in rules}
  unused = sorted(k for k in tensors if k not in used and not _ignored(k))
  if unused:
    raise ValueError(
        f"{source}: {len(unused)} tensor(s) have no place in a standard CLIP model, e.g. "
        f"{unused[:5]}. This architecture variant (CoCa, a HF text tower, ...) is not supported by "
        "roclip_jax (SigLIP is: a Hugging Face SiglipModel directory loads with load_hf_siglip)."
    )
  unfilled = [p for p in expected if p not in values]
  if unfilled:  # Only reachable if the rules and models/ disagree.
    raise AssertionError(f"weights.py leaves {[_path_name(p) for p in unfilled[:5]]} unset.")
  return _fill(params_t, values, ("params",)), _fill(state_t, values, ("state",))


def _export_tensors(
    model_cfg: ml_collections.ConfigDict, params: Mapping, model_state: Mapping, rules: list[_Rule]
) -> dict[str, Array]:
  """The inverse of `_assemble`: checkpoint name -> contiguous float32 numpy array."""
  leaves = {("params", *p): v for p, v in _leaf_paths(params).items()}
  leaves.update({("state", *p): v for p, v in _leaf_paths(model_state).items()})
  params_t, state_t = _templates(model_cfg)
  expected = {("params", *p): s for p, s in _leaf_paths(params_t).items()}
  expected.update({("state", *p): s for p, s in _leaf_paths(state_t).items()})
  if set(leaves) != set(expected):
    extra = sorted(_path_name(p) for p in set(leaves) - set(expected))
    lacking = sorted(_path_name(p) for p in set(expected) - set(leaves))
    raise ValueError(
        f"params/model_state do not match model_cfg: missing {lacking[:5]}, "
        f"unexpected {extra[:5]}; pass the config the weights were trained with."
    )
  out = {}
  for rule in rules:
    value = np.asarray(leaves[rule.path], np.float32)
    if value.shape != tuple(expected[rule.path].shape):
      raise ValueError(
          f"{_path_name(rule.path)} has shape {value.shape} but model_cfg needs "
          f"{tuple(expected[rule.path].shape)}; pass the matching model config."
      )
    # .copy(order="C"), not np.ascontiguousarray: that turns the 0-d logit_scale into shape (1,).
    out[rule.torch_name] = _TO_TORCH[rule.kind](value).copy(order="C")
  return out


def _read_safetensors_raw(path: str) -> dict[str, Array]:
  """Reads a safetensors file with numpy + ml_dtypes (bfloat16, which numpy lacks)."""
  import ml_dtypes  # pylint: disable=g-import-not-at-top

  dtypes = {
      "F64": np.float64,
      "F32": np.float32,
      "F16": np.float16,
      "BF16": ml_dtypes.bfloat16,
      "I64": np.int64,
      "I32": np.int32,
      "I16": np.int16,
      "I8": np.int8,
      "U8": np.uint8,
      "BOOL": np.bool_,
  }
  with open(path, "rb") as f:
    header_len = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_len))
    data = f.read()
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    if info["dtype"] not in dtypes:
      raise ValueError(
          f"{path}: tensor {name} has dtype {info['dtype']}, which CLIP weights never "
          "use; re-save the checkpoint in float32/float16/bfloat16."
      )
    start, stop = info["data_offsets"]
    dtype = np.dtype(dtypes[info["dtype"]])
    out[name] = np.frombuffer(data, dtype, (stop - start) // dtype.itemsize, start).reshape(info["shape"])
  return out


def _read_safetensors(path: str) -> tuple[dict[str, Array], dict[str, str]]:
  """(tensors as float32 where floating, header metadata) of a safetensors file."""
  try:
    with safe_open(path, framework="np") as f:
      metadata = dict(f.metadata() or {})
  except Exception as e:  # safetensors raises its own error types for a malformed header.
    raise ValueError(f"{path} is not a readable safetensors file ({e}).") from e
  try:
    tensors = safetensors_np.load_file(path)
  except TypeError:  # "data type 'bfloat16' not understood": numpy has no bfloat16.
    tensors = _read_safetensors_raw(path)
  return {
      k: (v.astype(np.float32) if np.issubdtype(v.dtype, np.floating) or v.dtype.name == "bfloat16" else v)
      for k, v in tensors.items()
  }, metadata


def _is_torchscript(path: str) -> bool:
  """TorchScript archives (OpenAI's original release) carry `code/` and `constants.pkl`."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
  return any("/code/" in n or n.endswith("/constants.pkl") for n in names)


def _read_torch(path: str) -> dict[str, Array]:
  """A state dict from a PyTorch pickle, read with `weights_only=True` (never arbitrary code)."""
  if _is_torchscript(path):
    raise ValueError(
        f"{path} is a TorchScript archive (OpenAI's original CLIP release); it is not read here "
        "because loading it runs TorchScript code. Convert it once to a plain state dict with "
        "open_clip: `m, _, _ = open_clip.create_model_and_transforms('ViT-B-32', "
        f"pretrained='{path}'); safetensors.torch.save_file(m.state_dict(), 'clip.safetensors')`, "
        "then load that file."
    )
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        f"{path} is a PyTorch pickle and reading it needs torch, which roclip_jax does not "
        "require. Install the CPU build (`pip install torch==2.13.0`) or convert the file to "
        "safetensors (`safetensors.torch.save_file(state_dict, 'clip.safetensors')`)."
    ) from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # torch raises UnpicklingError, RuntimeError, ... for odd files.
    raise ValueError(
        f"{path} could not be read as a PyTorch state dict with weights_only=True " f"({type(e).__name__}: {e})."
    ) from e
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
    obj = obj["state_dict"]  # open_clip training checkpoints: {'epoch', 'state_dict', ...}.
  if not isinstance(obj, Mapping):
    raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors.")
  out = {}
  for name, value in obj.items():
    if isinstance(value, torch.Tensor):
      value = value.detach().cpu()
      out[name] = value.float().numpy() if value.is_floating_point() else value.numpy()
  return out


def _read_weights(path: str) -> tuple[dict[str, Array], dict[str, str]]:
  """(tensors, metadata) of a .safetensors / .pt / .pth / .bin file; strips DDP's `module.`."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Weights file {path!r} does not exist.")
  if path.endswith(".safetensors"):
    tensors, metadata = _read_safetensors(path)
  else:
    tensors, metadata = _read_torch(path), {}
  if tensors and all(k.startswith("module.") for k in tensors):
    tensors = {k[len("module.") :]: v for k, v in tensors.items()}
  return tensors, metadata


# ------------------------------------------------------------------ configs


def _mlp_width_field(mlp_width: int, width: int) -> int:
  """The config value of a tower's MLP width: 0 (the presets' "4 * width") when it is 4x."""
  return 0 if int(mlp_width) == 4 * int(width) else int(mlp_width)


def _model_config(
    *,
    embed_dim: int,
    image: dict,
    text_width: int,
    text_layers: int,
    text_heads: int,
    text_mlp_width: int,
    vocab_size: int,
    context_length: int,
    act: str,
) -> ml_collections.ConfigDict:
  cfg = presets.clip_config(
      embed_dim=int(embed_dim),
      image=image,
      act=act,
      text=presets.text_config(
          width=int(text_width),
          layers=int(text_layers),
          heads=int(text_heads),
          context_length=int(context_length),
          mlp_width=_mlp_width_field(text_mlp_width, text_width),
      ),
  )
  cfg.text.vocab_size = int(vocab_size)
  models.validate_config(cfg)
  return cfg


def _check_act(act: str, source: str) -> str:
  if act not in layers_lib.ACTIVATIONS:
    raise ValueError(
        f"{source}: activation {act!r} is not supported; roclip_jax models use one "
        f"of {sorted(layers_lib.ACTIVATIONS)}."
    )
  return act


def _hf_model_config(hf: Mapping[str, Any], source: str) -> ml_collections.ConfigDict:
  """Our model config from a HF `CLIPModel` config.json (defaults as in transformers)."""
  if hf.get("model_type") != "clip":
    raise ValueError(
        f"{source} is a {hf.get('model_type')!r} config, not a CLIPModel (model_type 'clip'); "
        "only two-tower CLIP checkpoints (both towers + projections) can be loaded here "
        "(a SiglipModel, model_type 'siglip', loads with load_hf_siglip or load_any)."
    )
  # Old configs carry `*_config_dict`, which transformers merges over `*_config`.
  text = {**_HF_TEXT_DEFAULTS, **(hf.get("text_config") or {}), **(hf.get("text_config_dict") or {})}
  vision = {**_HF_VISION_DEFAULTS, **(hf.get("vision_config") or {}), **(hf.get("vision_config_dict") or {})}
  if text["hidden_act"] != vision["hidden_act"]:
    raise ValueError(
        f"{source}: the text tower uses {text['hidden_act']!r} and the vision tower "
        f"{vision['hidden_act']!r}; roclip_jax models use one activation for both."
    )
  for name, tower in (("text_config", text), ("vision_config", vision)):
    if abs(float(tower["layer_norm_eps"]) - layers_lib.LAYER_NORM_EPS) > 1e-12:
      raise ValueError(
          f"{source}: {name}.layer_norm_eps={tower['layer_norm_eps']} but roclip_jax "
          f"uses {layers_lib.LAYER_NORM_EPS}."
      )
  if vision["num_channels"] != 3:
    raise ValueError(f"{source}: vision_config.num_channels={vision['num_channels']}; only RGB " "(3) is supported.")
  image_size, patch_size = vision["image_size"], vision["patch_size"]
  if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
    if len(set(image_size)) != 1 or len(set(patch_size)) != 1:
      raise ValueError(f"{source}: non-square image_size/patch_size are not supported.")
    image_size, patch_size = image_size[0], patch_size[0]
  return _model_config(
      embed_dim=hf.get("projection_dim", 512),
      image=presets.vit_image(
          image_size=int(image_size),
          patch_size=int(patch_size),
          width=int(vision["hidden_size"]),
          layers=int(vision["num_hidden_layers"]),
          heads=int(vision["num_attention_heads"]),
          mlp_width=_mlp_width_field(vision["intermediate_size"], vision["hidden_size"]),
      ),
      text_width=text["hidden_size"],
      text_layers=text["num_hidden_layers"],
      text_heads=text["num_attention_heads"],
      text_mlp_width=text["intermediate_size"],
      vocab_size=text["vocab_size"],
      context_length=text["max_position_embeddings"],
      act=_check_act(text["hidden_act"], source),
  )


def hf_siglip_model_config(hf: Any, source: str = "SiglipConfig") -> ml_collections.ConfigDict:
  """Our model config (`presets.siglip_config`) from a HF `SiglipModel` config.

  Args:
    hf: a `transformers.SiglipConfig`, or its dict (a `config.json`); fields it leaves out take
      transformers' defaults (google/siglip-base-patch16-224's).
    source: what to name in errors.
  """
  if hasattr(hf, "to_dict"):
    hf = hf.to_dict()
  if hf.get("model_type") != HF_SIGLIP_TYPE:
    raise ValueError(
        f"{source} is a {hf.get('model_type')!r} config, not a SiglipModel (model_type 'siglip'); "
        "load CLIP checkpoints with load_hf (or load_any). SigLIP 2 / NaFlex models are not supported."
    )
  text = {**_HF_SIGLIP_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  vision = {**_HF_SIGLIP_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  acts = {
      name: _HF_ACTIVATIONS.get(tower["hidden_act"])
      for name, tower in (("text_config", text), ("vision_config", vision))
  }
  for name, act in acts.items():
    if act is None:
      tower = text if name == "text_config" else vision
      raise ValueError(
          f"{source}: {name}.hidden_act={tower['hidden_act']!r} is not supported; roclip_jax "
          f"maps {sorted(_HF_ACTIVATIONS)}."
      )
  if acts["text_config"] != acts["vision_config"]:
    raise ValueError(
        f"{source}: the text tower uses {text['hidden_act']!r} and the vision tower "
        f"{vision['hidden_act']!r}; roclip_jax models use one activation for both."
    )
  if float(text["layer_norm_eps"]) != float(vision["layer_norm_eps"]):
    raise ValueError(
        f"{source}: text_config.layer_norm_eps={text['layer_norm_eps']} differs from "
        f"vision_config.layer_norm_eps={vision['layer_norm_eps']}; roclip_jax models use one epsilon."
    )
  if not vision["vision_use_head"]:
    raise ValueError(
        f"{source}: vision_config.vision_use_head=False leaves the image tower without a pooled "
        "embedding (no attention-pooling head); only two-tower SigLIP models can be loaded."
    )
  if vision["num_channels"] != 3:
    raise ValueError(f"{source}: vision_config.num_channels={vision['num_channels']}; only RGB (3) is supported.")
  image_size, patch_size = vision["image_size"], vision["patch_size"]
  if isinstance(image_size, (list, tuple)) or isinstance(patch_size, (list, tuple)):
    if len(set(image_size)) != 1 or len(set(patch_size)) != 1:
      raise ValueError(f"{source}: non-square image_size/patch_size are not supported.")
    image_size, patch_size = image_size[0], patch_size[0]
  width = int(vision["hidden_size"])
  projection = text["projection_size"] if text["projection_size"] is not None else text["hidden_size"]
  if int(projection) != width:
    raise ValueError(
        f"{source}: text_config.projection_size={projection} differs from the vision width "
        f"{width}; SigLIP compares the text head's output with the pooled image feature, so "
        "they must be equal."
    )
  cfg = presets.siglip_config(
      image_size=int(image_size),
      patch_size=int(patch_size),
      width=width,
      layers=int(vision["num_hidden_layers"]),
      heads=int(vision["num_attention_heads"]),
      mlp_width=_mlp_width_field(vision["intermediate_size"], width),
      text_width=int(text["hidden_size"]),
      text_layers=int(text["num_hidden_layers"]),
      text_heads=int(text["num_attention_heads"]),
      text_mlp_width=_mlp_width_field(text["intermediate_size"], text["hidden_size"]),
      vocab_size=int(text["vocab_size"]),
      context_length=int(text["max_position_embeddings"]),
      act=acts["text_config"],
      layer_norm_eps=float(text["layer_norm_eps"]),
  )
  models.validate_config(cfg)
  return cfg


def _count_indices(tensors: Mapping[str, Array], prefix: str) -> int:
  """Number of distinct `<prefix><i>.` indices, e.g. transformer blocks."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  return len({m.group(1) for k in tensors if (m := pattern.match(k))})


def _heads(width: int, override: int | None, rule: int, what: str, arg: str) -> int:
  heads = rule if override is None else int(override)
  if heads <= 0 or width % heads:
    raise ValueError(
        f"Cannot use {heads} heads for the {what} of width {width} (OpenAI's rule gives "
        f"{rule}); pass {arg}= with the number of heads the model was trained with."
    )
  return heads


def _openai_model_config(
    tensors: Mapping[str, Array], source: str, *, vision_heads: int | None, text_heads: int | None, act: str
) -> ml_collections.ConfigDict:
  """Architecture from tensor shapes, as OpenAI's `clip.model.build_model` infers it."""
  if any(k.startswith(("text_model.", "vision_model.")) for k in tensors):
    raise ValueError(
        f"{source} is in Hugging Face CLIPModel layout; load its directory (with "
        "config.json) with load_hf or load_any."
    )
  required = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "text_projection", "logit_scale")
  lacking = [k for k in required if k not in tensors]
  if lacking:
    raise ValueError(
        f"{source} is not an OpenAI/open_clip CLIP state dict: it lacks {lacking} "
        f"(it has e.g. {sorted(tensors)[:5]})."
    )

  def need(name: str) -> Array:
    if name not in tensors:
      raise ValueError(
          f"{source} lacks {name}, which an OpenAI CLIP model has; the file is " "incomplete or another architecture."
      )
    return tensors[name]

  if "visual.proj" in tensors:
    conv = need("visual.conv1.weight")
    width, patch = int(conv.shape[0]), int(conv.shape[-1])
    grid = round((need("visual.positional_embedding").shape[0] - 1) ** 0.5)
    image = presets.vit_image(
        image_size=patch * grid,
        patch_size=patch,
        width=width,
        layers=_count_indices(tensors, "visual.transformer.resblocks."),
        heads=_heads(width, vision_heads, width // 64, "vision transformer", "vision_heads"),
        mlp_width=_mlp_width_field(need("visual.transformer.resblocks.0.mlp.c_fc.weight").shape[0], width),
    )
  elif "visual.attnpool.positional_embedding" in tensors:
    width = int(need("visual.layer1.0.conv1.weight").shape[0])
    grid = round((tensors["visual.attnpool.positional_embedding"].shape[0] - 1) ** 0.5)
    image = presets.resnet_image(
        image_size=32 * grid,
        width=width,
        layers=tuple(_count_indices(tensors, f"visual.layer{s}.") for s in (1, 2, 3, 4)),
        heads=_heads(32 * width, vision_heads, 32 * width // 64, "ResNet attention pool", "vision_heads"),
    )
  else:
    raise ValueError(
        f"{source}: the image tower is neither OpenAI's VisionTransformer "
        "(`visual.proj`) nor its ModifiedResNet (`visual.attnpool.*`); timm or other "
        "towers are not supported."
    )
  text_width = int(tensors["ln_final.weight"].shape[0])
  return _model_config(
      embed_dim=tensors["text_projection"].shape[1],
      image=image,
      text_width=text_width,
      text_layers=_count_indices(tensors, "transformer.resblocks."),
      text_heads=_heads(text_width, text_heads, text_width // 64, "text transformer", "text_heads"),
      text_mlp_width=need("transformer.resblocks.0.mlp.c_fc.weight").shape[0],
      vocab_size=tensors["token_embedding.weight"].shape[0],
      context_length=tensors["positional_embedding"].shape[0],
      act=_check_act(act, source),
  )


def _open_clip_sidecar(path: str) -> dict[str, Any]:
  """act / heads from an open_clip hub `open_clip_config.json` next to the weights, if any."""
  sidecar = os.path.join(os.path.dirname(os.path.abspath(path)), OPEN_CLIP_CONFIG)
  if not os.path.isfile(sidecar):
    return {}
  with open(sidecar, encoding="utf-8") as f:
    model_cfg = json.load(f).get("model_cfg", {})
  out = {"act": "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"}
  if "heads" in model_cfg.get("text_cfg", {}):
    out["text_heads"] = int(model_cfg["text_cfg"]["heads"])
  vision = model_cfg.get("vision_cfg", {})
  if "head_width" in vision and "width" in vision and not isinstance(vision.get("layers"), list):
    out["vision_heads"] = int(vision["width"]) // int(vision["head_width"])
  return out


# ------------------------------------------------------------------ public API


def _split_fused_qkv(tensors: dict[str, Array]) -> dict[str, Array]:
  """OpenAI `attn.in_proj_{weight,bias}` -> `attn.{q,k,v}_proj.{weight,bias}` (rows in q,k,v order)."""
  out = {}
  for name, value in tensors.items():
    match = re.fullmatch(r"(.*\.attn)\.in_proj_(weight|bias)", name)
    if match is None:
      out[name] = value
      continue
    if value.shape[0] % 3:
      raise ValueError(f"{name} has {value.shape[0]} rows, not a multiple of 3 (q, k, v).")
    for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
      out[f"{match.group(1)}.{part}.{match.group(2)}"] = chunk
  return out


def _split_siglip_head(tensors: dict[str, Array]) -> dict[str, Array]:
  """HF SigLIP's `head.attention.in_proj_{weight,bias}` (torch MultiheadAttention) -> q, k, v."""
  out = {}
  for name, value in tensors.items():
    match = re.fullmatch(r"(vision_model\.head\.attention)\.in_proj_(weight|bias)", name)
    if match is None:
      out[name] = value
      continue
    if value.shape[0] % 3:
      raise ValueError(f"{name} has {value.shape[0]} rows, not a multiple of 3 (q, k, v).")
    for part, chunk in zip(("q_proj", "k_proj", "v_proj"), np.split(value, 3, axis=0)):
      out[f"{match.group(1)}.{part}.{match.group(2)}"] = chunk
  return out


def _fuse_qkv(tensors: dict[str, Array]) -> dict[str, Array]:
  """The inverse of `_split_fused_qkv`."""
  out = {}
  for name, value in tensors.items():
    match = re.fullmatch(r"(.*\.attn)\.(q|k|v)_proj\.(weight|bias)", name)
    if match is None:
      out[name] = value
    elif match.group(2) == "q":
      base, kind = match.group(1), match.group(3)
      out[f"{base}.in_proj_{kind}"] = np.concatenate([tensors[f"{base}.{p}_proj.{kind}"] for p in "qkv"], axis=0)
  return out


def load_hf(path_or_dir: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """Loads a Hugging Face `CLIPModel` directory (config.json + model.safetensors).

  Args:
    path_or_dir: the directory (as written by `save_pretrained`), or a weights file inside it.
      Weights are read from `model.safetensors`, a sharded `model.safetensors.index.json`, or
      `pytorch_model.bin` (the last one only if torch is installed).

  Returns:
    (model_cfg, params, model_state): our model config (float32, no remat) and float32 numpy trees.
  """
  directory, config_path, hf_config = _read_hf_config(path_or_dir, "load_hf", "CLIPModel")
  model_cfg = _hf_model_config(hf_config, config_path)
  tensors = _read_hf_tensors(path_or_dir, directory)
  params, model_state = _assemble(model_cfg, tensors, _hf_rules(model_cfg), directory)
  return model_cfg, params, model_state


def load_hf_siglip(path_or_dir: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """Loads a Hugging Face `SiglipModel` directory (config.json + model.safetensors), as `load_hf`.

  The model config comes from `hf_siglip_model_config` (layout: `presets.siglip_config`), with
  `logit_bias=True` and the checkpoint's learned logit scale and bias. Text must be tokenized with
  the checkpoint's own SentencePiece tokenizer, padded to `text.context_length` (see
  `inspect.load_pretrained`); images normalised with its processor's mean/std (0.5, 0.5 for SigLIP).
  """
  directory, config_path, hf_config = _read_hf_config(path_or_dir, "load_hf_siglip", "SiglipModel")
  model_cfg = hf_siglip_model_config(hf_config, config_path)
  tensors = _split_siglip_head(_read_hf_tensors(path_or_dir, directory))
  params, model_state = _assemble(model_cfg, tensors, _hf_siglip_rules(model_cfg), directory)
  return model_cfg, params, model_state


def _read_hf_config(path_or_dir: str, caller: str, architecture: str) -> tuple[str, str, dict]:
  """(directory, config.json path, its contents) of a HF model directory or a weights file in one."""
  if not os.path.exists(path_or_dir):
    raise FileNotFoundError(
        f"{path_or_dir!r} does not exist; pass a Hugging Face {architecture} directory "
        "(config.json + model.safetensors)."
    )
  directory = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    raise FileNotFoundError(
        f"{config_path} does not exist; {caller} needs a Hugging Face model "
        f"directory as written by {architecture}.save_pretrained."
    )
  with open(config_path, encoding="utf-8") as f:
    return directory, config_path, json.load(f)


def _read_hf_tensors(path_or_dir: str, directory: str) -> dict[str, Array]:
  """Every tensor of a HF model directory (single, sharded or PyTorch weights), or of one file in it."""
  if os.path.isfile(path_or_dir):
    weight_files = [path_or_dir]
  elif os.path.isfile(os.path.join(directory, HF_WEIGHTS)):
    weight_files = [os.path.join(directory, HF_WEIGHTS)]
  elif os.path.isfile(os.path.join(directory, HF_WEIGHTS_INDEX)):
    with open(os.path.join(directory, HF_WEIGHTS_INDEX), encoding="utf-8") as f:
      shards = sorted(set(json.load(f)["weight_map"].values()))
    weight_files = [os.path.join(directory, s) for s in shards]
  elif os.path.isfile(os.path.join(directory, HF_TORCH_WEIGHTS)):
    weight_files = [os.path.join(directory, HF_TORCH_WEIGHTS)]
  else:
    raise FileNotFoundError(f"{directory} has no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or " f"{HF_TORCH_WEIGHTS}.")
  tensors: dict[str, Array] = {}
  for weight_file in weight_files:
    tensors.update(_read_weights(weight_file)[0])
  return tensors


def hf_model_type(directory: str) -> str | None:
  """`model_type` of the HF `config.json` in `directory` ('clip', 'siglip', ...), None without one."""
  config_path = os.path.join(directory, "config.json")
  if not os.path.isfile(config_path):
    return None
  with open(config_path, encoding="utf-8") as f:
    return json.load(f).get("model_type")


def _load_hf_any(path_or_dir: str) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """`load_hf_siglip` for a SiglipModel directory, `load_hf` (which names other types) otherwise."""
  directory = path_or_dir if os.path.isdir(path_or_dir) else os.path.dirname(path_or_dir)
  if hf_model_type(directory) == HF_SIGLIP_TYPE:
    return load_hf_siglip(path_or_dir)
  return load_hf(path_or_dir)


def load_openai(
    path: str, *, vision_heads: int | None = None, text_heads: int | None = None, act: str | None = None
) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """Loads an OpenAI / open_clip CLIP state dict (ViT of any size, or ModifiedResNet).

  Args:
    path: a `.safetensors` file, or a `.pt`/`.pth`/`.bin` PyTorch pickle (needs torch; read with
      `weights_only=True`). OpenAI's original TorchScript archives are refused with a conversion
      recipe. A `{'state_dict': ...}` training checkpoint and DDP `module.` prefixes are accepted.
    vision_heads: heads of the ViT (or of the ResNet's attention pool); default from the file's
      `export_openai` metadata, an `open_clip_config.json` next to it, else OpenAI's rule.
    text_heads: heads of the text transformer; same defaults (OpenAI: width // 64).
    act: 'quick_gelu' (OpenAI) or 'gelu' (most open_clip-trained models); same defaults, else
      'quick_gelu' with a logged warning.

  Returns:
    (model_cfg, params, model_state) as in `load_hf`.
  """
  return _load_openai(path, *_read_weights(path), vision_heads=vision_heads, text_heads=text_heads, act=act)


def _load_openai(
    path: str,
    tensors: dict[str, Array],
    metadata: Mapping[str, str],
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    act: str | None = None,
) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """`load_openai` on tensors already read from `path`."""
  known: dict[str, Any] = {}
  if METADATA_KEY in metadata:
    saved = ml_collections.ConfigDict(json.loads(metadata[METADATA_KEY]))
    known = dict(act=saved.act, vision_heads=saved.image.heads, text_heads=saved.text.heads)
  else:
    known = _open_clip_sidecar(path)
  if act is None and "act" not in known:
    logging.warning(
        "%s: the activation is not recorded; assuming OpenAI's quick_gelu (pass "
        "act='gelu' for open_clip models trained without QuickGELU).",
        path,
    )
  model_cfg = _openai_model_config(
      tensors,
      path,
      vision_heads=vision_heads if vision_heads is not None else known.get("vision_heads"),
      text_heads=text_heads if text_heads is not None else known.get("text_heads"),
      act=act or known.get("act", "quick_gelu"),
  )
  params, model_state = _assemble(model_cfg, _split_fused_qkv(tensors), _openai_rules(model_cfg), path)
  return model_cfg, params, model_state


def _weight_files(directory: str) -> list[str]:
  return sorted(p for p in glob.glob(os.path.join(directory, "*")) if p.endswith(WEIGHT_SUFFIXES))


def load_any(path: str, **openai_kwargs: Any) -> tuple[ml_collections.ConfigDict, dict, dict]:
  """Loads CLIP weights from whatever `path` holds.

  * A directory with a `config.json` of model_type 'clip' -> `load_hf`; 'siglip' -> `load_hf_siglip`.
  * A directory with one weights file (e.g. an open_clip hub snapshot with
    `open_clip_config.json` + `open_clip_model.safetensors`) -> that file, as below.
  * A weights file whose tensors are in HF layout (`text_model.*`) -> `load_hf` on its directory;
    otherwise -> `load_openai(path, **openai_kwargs)`.
  """
  if os.path.isdir(path):
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
      return _load_hf_any(path)
    files = _weight_files(path)
    if len(files) > 1:  # E.g. an open_clip hub snapshot with both formats: prefer safetensors.
      files = [f for f in files if f.endswith(".safetensors")] or files
    if len(files) != 1:
      raise ValueError(
          f"{path} is a directory without a Hugging Face config.json and with "
          f"{len(files)} weight files ({[os.path.basename(f) for f in files]}); "
          "point at the weights file itself."
      )
    path = files[0]
  if not os.path.isfile(path):
    raise FileNotFoundError(
        f"{path!r} does not exist; pass a Hugging Face CLIP or SigLIP directory or "
        "an OpenAI/open_clip weights file (.safetensors/.pt/.bin)."
    )
  if not path.endswith(WEIGHT_SUFFIXES):
    raise ValueError(f"{path} is not a weights file; expected one of {WEIGHT_SUFFIXES} or a " "Hugging Face directory.")
  if path.endswith(".safetensors"):
    with safe_open(path, framework="np") as f:
      names = list(f.keys())
  else:
    tensors, metadata = _read_weights(path)  # A pickle cannot list names without reading it.
    names = list(tensors)
  if any(n.startswith(("text_model.", "vision_model.")) for n in names):
    return _load_hf_any(path)
  if path.endswith(".safetensors"):
    return load_openai(path, **openai_kwargs)
  return _load_openai(path, tensors, metadata, **openai_kwargs)


def export_hf(model_cfg: ml_collections.ConfigDict, params: Mapping, out_dir: str) -> None:
  """Writes `config.json` + `model.safetensors` that `transformers.CLIPModel.from_pretrained` reads.

  ViT image towers only: Hugging Face has no CLIP ResNet; use `export_openai` for those. No
  tokenizer files are written (our tokenizer is OpenAI's BPE; copy an HF CLIP tokenizer's files).
  """
  _refuse_non_clip_layout(model_cfg, "export_hf")
  if model_cfg.image.type != "vit":
    raise ValueError(
        f"export_hf: image.type={model_cfg.image.type!r} has no Hugging Face CLIP "
        "equivalent (HF CLIP has ViT image towers only); use export_openai to write "
        "OpenAI/open_clip layout instead."
    )
  tensors = _export_tensors(model_cfg, params, {}, _hf_rules(model_cfg))
  image, text = model_cfg.image, model_cfg.text
  common = dict(
      hidden_act=model_cfg.act, layer_norm_eps=layers_lib.LAYER_NORM_EPS, projection_dim=int(model_cfg.embed_dim)
  )
  hf_config = dict(
      architectures=["CLIPModel"],
      model_type="clip",
      projection_dim=int(model_cfg.embed_dim),
      logit_scale_init_value=2.6592,
      initializer_factor=1.0,
      torch_dtype="float32",
      text_config=dict(
          common,
          model_type="clip_text_model",
          vocab_size=int(text.vocab_size),
          hidden_size=int(text.width),
          intermediate_size=models.mlp_width(text),
          num_hidden_layers=int(text.layers),
          num_attention_heads=int(text.heads),
          max_position_embeddings=int(text.context_length),
          bos_token_id=49406,
          eos_token_id=49407,
      ),
      vision_config=dict(
          common,
          model_type="clip_vision_model",
          hidden_size=int(image.width),
          intermediate_size=models.mlp_width(image),
          num_hidden_layers=int(image.layers),
          num_attention_heads=int(image.heads),
          image_size=int(image.image_size),
          patch_size=int(image.patch_size),
          num_channels=3,
      ),
  )
  os.makedirs(out_dir, exist_ok=True)
  safetensors_np.save_file(tensors, os.path.join(out_dir, HF_WEIGHTS), metadata={"format": "pt"})
  with open(os.path.join(out_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(hf_config, f, indent=2)


def export_openai(model_cfg: ml_collections.ConfigDict, params: Mapping, model_state: Mapping, out_path: str) -> None:
  """Writes an OpenAI/open_clip-layout state dict as `.safetensors` (ViT or ModifiedResNet).

  The file loads into open_clip (`model.load_state_dict(safetensors.torch.load_file(path))`) and
  back with `load_openai`; the header metadata records our model config (heads, act).
  """
  if not out_path.endswith(".safetensors"):
    raise ValueError(f"export_openai writes safetensors; name the file *.safetensors, not {out_path}.")
  _refuse_non_clip_layout(model_cfg, "export_openai")
  tensors = _fuse_qkv(_export_tensors(model_cfg, params, model_state, _openai_rules(model_cfg)))
  os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
  safetensors_np.save_file(tensors, out_path, metadata={"format": "pt", METADATA_KEY: model_cfg.to_json()})


def _refuse_non_clip_layout(model_cfg: ml_collections.ConfigDict, caller: str) -> None:
  """CLIP layouts only: the exports have no names for SigLIP's head, biases or pooling."""
  differ = [
      f"{path}={models.option(model_cfg, path)!r}"
      for path, default in models.OPTIONAL_DEFAULTS.items()
      if path not in ("layer_norm_eps", "logit_bias") and models.option(model_cfg, path) != default
  ]
  eps = models.option(model_cfg, "layer_norm_eps")
  if eps != layers_lib.LAYER_NORM_EPS:
    differ.append(f"layer_norm_eps={eps!r}")
  if differ:
    raise ValueError(
        f"{caller}: the model is not in CLIP's layout ({', '.join(differ)}); only CLIP "
        "models can be exported (SigLIP models have no export here; keep the original "
        "Hugging Face directory)."
    )


def architecture_mismatches(loaded: ml_collections.ConfigDict, expected: ml_collections.ConfigDict) -> list[str]:
  """`'field: expected X, weights have Y'` for every architecture field that differs.

  MLP widths are compared as built (0 or absent = 4 * width), so a config that spells out the 4x
  width matches a checkpoint whose config leaves it implicit.
  """
  out = []
  for field in ARCHITECTURE_FIELDS:
    values = []
    for cfg in (expected, loaded):
      tower, _, name = field.partition(".")
      if field in models.OPTIONAL_DEFAULTS:
        values.append(models.option(cfg, field))
        continue
      if name == "mlp_width":
        transformer = tower == "text" or cfg.image.get("type") == "vit"
        values.append(models.mlp_width(cfg[tower]) if transformer else None)
        continue
      value = cfg
      for part in field.split("."):
        value = value.get(part) if hasattr(value, "get") else None
      values.append(tuple(value) if isinstance(value, (list, tuple)) else value)
    if values[0] != values[1]:
      out.append(f"model.{field}: config has {values[0]!r}, the weights have {values[1]!r}")
  return out


def check_compatible(loaded: ml_collections.ConfigDict, expected: ml_collections.ConfigDict, source: str) -> None:
  """Raises ValueError listing every architecture field where `expected` (config.model) differs."""
  mismatches = architecture_mismatches(loaded, expected)
  if mismatches:
    raise ValueError(
        f"config.init_from={source!r} holds a different architecture than config.model: "
        + "; ".join(mismatches)
        + ". Fix: set config.model to the checkpoint's architecture (e.g. the matching preset), "
        "or point config.init_from at matching weights."
    )


def load_for_training(
    path: str, model_cfg: ml_collections.ConfigDict, param_shardings: Any, model_state_shardings: Any
) -> tuple[dict, dict]:
  """`config.init_from`: `load_any(path)`, checked against `model_cfg`, placed in the given shardings.

  Built with `jax.make_array_from_callback`, so it also works when the shardings span devices of
  other processes (every process reads the same file).
  """
  import jax  # pylint: disable=g-import-not-at-top

  loaded_cfg, params, model_state = load_any(path)
  check_compatible(loaded_cfg, model_cfg, source=path)

  def place(value: Array, sharding: Any) -> Any:
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

  return (jax.tree.map(place, params, param_shardings), jax.tree.map(place, model_state, model_state_shardings))
