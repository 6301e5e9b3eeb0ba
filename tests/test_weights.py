"""Weight import/export parity against PyTorch references (transformers' CLIPModel, OpenAI's RN).

Every reference runs in PyTorch: Hugging Face's `CLIPModel` (random tiny configs) and a ModifiedResNet
written below from OpenAI's published `clip/model.py`. The OpenAI-layout state dicts are built here
from the HF weights with the test's own name mapping, independent of `weights.py`.
"""

from collections import OrderedDict
import json
import math
import os
import shutil

import jax
import ml_collections
import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn
import torch.nn.functional as F
import transformers

from roclip_jax import config_lib
from roclip_jax import inspect as inspect_lib
from roclip_jax import models
from roclip_jax import train
from roclip_jax import weights
from roclip_jax.data import demo
from roclip_jax.data import tokenizer as tokenizer_lib
from roclip_jax.steps import ModelSpec

torch.set_num_threads(2)
CONTEXT = 16
CAPTIONS = [
    "a photo of a cat",
    "two dogs playing on the grass in the park at noon",
    "x",
    "an extremely long caption that runs far past the sixteen token context window of this tiny model",
]
REL_TOL = 1e-5  # max |ours - reference| / max |reference|, float32


def hf_config(act="quick_gelu", vision_overrides=None, **text_overrides):
  text = dict(
      vocab_size=49408,
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=CONTEXT,
      hidden_act=act,
  )
  text.update(text_overrides)
  vision = dict(
      hidden_size=64,
      intermediate_size=256,
      num_hidden_layers=2,
      num_attention_heads=2,
      image_size=32,
      patch_size=8,
      hidden_act=act,
  )
  vision.update(vision_overrides or {})
  return transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)


def randomize_(module: nn.Module, seed: int) -> nn.Module:
  """Every parameter random (norm scales around 1), so no mapping error hides behind an init value."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for owner in module.modules():
      is_norm = isinstance(owner, (nn.LayerNorm, nn.BatchNorm2d))
      for name, p in owner.named_parameters(recurse=False):
        noise = torch.randn(p.shape, generator=gen)
        if name == "logit_scale":
          p.copy_(torch.tensor(math.log(50.0)))
        elif is_norm and name == "weight":
          p.copy_(1.0 + 0.2 * noise)
        else:
          p.copy_(0.05 * noise)
  return module.eval()


@pytest.fixture(scope="module", params=["quick_gelu", "gelu"])
def hf_dir(request, tmp_path_factory):
  model = randomize_(transformers.CLIPModel(hf_config(request.param)), seed=1)
  path = tmp_path_factory.mktemp(f"hf_{request.param}")
  model.save_pretrained(path)
  return str(path), model


def inputs(seed=0, image_size=32):
  images = np.random.default_rng(seed).standard_normal((3, image_size, image_size, 3), np.float32)
  tokens = tokenizer_lib.get_tokenizer(CONTEXT)(CAPTIONS[:3] + CAPTIONS[3:])
  return images, tokens


def hf_outputs(model, images, tokens):
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    text = model.get_text_features(input_ids=ids).pooler_output.numpy()
    logits = model(input_ids=ids[:3], pixel_values=pixels).logits_per_image.numpy()
  return image, text, logits


def our_outputs(model_cfg, params, model_state, images, tokens):
  model = ModelSpec.create(model_cfg).merge(params, model_state)
  image = np.asarray(model.encode_image(images))
  text = np.asarray(model.encode_text(tokens))
  zi = image / np.linalg.norm(image, axis=1, keepdims=True)
  zt = text[:3] / np.linalg.norm(text[:3], axis=1, keepdims=True)
  logits = np.exp(np.asarray(params["logit_scale"])) * zi @ zt.T
  return image, text, logits


def rel_err(ours, ref):
  assert ours.shape == ref.shape
  return float(np.abs(ours - ref).max() / np.abs(ref).max())


def assert_close(ours, ref, what):
  err = rel_err(ours, ref)
  print(
      f"{what}: max |diff| = {np.abs(ours - ref).max():.2e}, max |ref| = {np.abs(ref).max():.2e}, " f"ratio {err:.2e}"
  )
  assert err <= REL_TOL, f"{what}: relative max error {err:.2e} > {REL_TOL}"


def assert_trees_bitwise_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ---------------------------------------------------------------- Hugging Face


def test_load_hf_matches_transformers(hf_dir):
  path, hf = hf_dir
  model_cfg, params, model_state = weights.load_hf(path)
  act = hf.config.text_config.hidden_act
  assert (
      model_cfg.act,
      model_cfg.embed_dim,
      model_cfg.image.width,
      model_cfg.image.patch_size,
      model_cfg.image.image_size,
      model_cfg.text.context_length,
  ) == (act, 32, 64, 8, 32, CONTEXT)
  images, tokens = inputs()
  ref = hf_outputs(hf, images, tokens)
  ours = our_outputs(model_cfg, params, model_state, images, tokens)
  for name, o, r in zip(("image embeddings", "text embeddings", "logits_per_image"), ours, ref):
    assert_close(o, r, f"HF [{act}] {name}")


def test_text_padding_after_eot_needs_no_attention_mask(hf_dir):
  """Causal attention: what follows EOT cannot change the feature pooled at EOT, in HF or ours."""
  path, hf = hf_dir
  _, tokens = inputs()
  eot_padded = np.where(tokens == 0, tokenizer_lib.EOT_ID, tokens)  # HF's tokenizer pads with EOT.
  junk_padded = np.where(tokens == 0, 1234, tokens)
  with torch.no_grad():
    feats = [
        hf.get_text_features(input_ids=torch.from_numpy(t.astype(np.int64))).pooler_output.numpy()
        for t in (tokens, eot_padded, junk_padded)
    ]
    hf.text_model.eos_token_id = 2  # Old HF configs: pool at argmax(id) instead of the first EOT.
    try:
      legacy = hf.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
    finally:
      hf.text_model.eos_token_id = tokenizer_lib.EOT_ID
  np.testing.assert_allclose(feats[1], feats[0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(feats[2], feats[0], rtol=0, atol=1e-6)
  np.testing.assert_allclose(legacy.pooler_output.numpy(), feats[0], rtol=0, atol=1e-6)
  model_cfg, params, model_state = weights.load_hf(path)
  model = ModelSpec.create(model_cfg).merge(params, model_state)
  ours_eot_padded = np.asarray(model.encode_text(eot_padded))
  assert_close(ours_eot_padded, feats[0], "ours on EOT-padded tokens")


def test_export_hf_round_trip_is_bitwise_and_loads_in_transformers(hf_dir, tmp_path):
  path, hf = hf_dir
  model_cfg, params, model_state = weights.load_hf(path)
  out = str(tmp_path / "export")
  weights.export_hf(model_cfg, params, out)
  cfg2, params2, state2 = weights.load_hf(out)
  assert cfg2.to_dict() == model_cfg.to_dict()
  assert_trees_bitwise_equal(params2, params)
  assert_trees_bitwise_equal(state2, model_state)
  # transformers itself reads the export and computes what the original model computes.
  reloaded = transformers.CLIPModel.from_pretrained(out).eval()
  images, tokens = inputs(seed=3)
  for o, r in zip(hf_outputs(reloaded, images, tokens), hf_outputs(hf, images, tokens)):
    np.testing.assert_array_equal(o, r)


def test_mlp_widths_other_than_4x_match_transformers_in_both_layouts(tmp_path):
  # Text MLP 1.5x and vision MLP 200 (not a multiple of the width 64): each tower its own width.
  hf = randomize_(
      transformers.CLIPModel(hf_config("gelu", vision_overrides=dict(intermediate_size=200), intermediate_size=96)),
      seed=5,
  )
  hf_path = str(tmp_path / "hf")
  hf.save_pretrained(hf_path)
  images, tokens = inputs(seed=2)
  ref = hf_outputs(hf, images, tokens)
  model_cfg, params, model_state = weights.load_hf(hf_path)
  assert (model_cfg.image.mlp_width, model_cfg.text.mlp_width) == (200, 96)
  assert params["vision_model"]["layers"][1]["mlp"]["fc1"]["kernel"].shape == (64, 200)
  assert params["text_model"]["layers"][0]["mlp"]["fc2"]["kernel"].shape == (96, 64)
  for name, o, r in zip(("image", "text", "logits"), our_outputs(model_cfg, params, model_state, images, tokens), ref):
    assert_close(o, r, f"HF non-4x MLP {name}")

  # Export: transformers reads the widths back from config.json and computes the same outputs.
  export = str(tmp_path / "export")
  weights.export_hf(model_cfg, params, export)
  with open(os.path.join(export, "config.json")) as f:
    exported = json.load(f)
  assert (exported["vision_config"]["intermediate_size"], exported["text_config"]["intermediate_size"]) == (200, 96)
  reloaded = transformers.CLIPModel.from_pretrained(export).eval()
  for o, r in zip(hf_outputs(reloaded, images, tokens), ref):
    np.testing.assert_array_equal(o, r)

  # OpenAI layout: the widths come from the first block's c_fc rows.
  openai_path = str(tmp_path / "clip.safetensors")
  safetensors.torch.save_file(hf_to_openai(hf.state_dict()), openai_path)
  oa_cfg, oa_params, oa_state = weights.load_openai(openai_path, vision_heads=2, text_heads=2, act="gelu")
  assert oa_cfg.to_dict() == model_cfg.to_dict()
  for name, o, r in zip(("image", "text", "logits"), our_outputs(oa_cfg, oa_params, oa_state, images, tokens), ref):
    assert_close(o, r, f"OpenAI layout non-4x MLP {name}")
  weights.export_openai(oa_cfg, oa_params, oa_state, str(tmp_path / "export.safetensors"))
  cfg2, params2, _ = weights.load_openai(str(tmp_path / "export.safetensors"))
  assert cfg2.to_dict() == oa_cfg.to_dict()
  assert_trees_bitwise_equal(params2, oa_params)

  # config.init_from compares the widths as built: 0, 4 * width spelled out, and no field at all
  # (a config saved before the field existed) are the same model; the checkpoint's widths are not.
  implicit = model_cfg.to_dict()
  implicit["image"]["mlp_width"] = implicit["text"]["mlp_width"] = 0
  spelled_out = json.loads(json.dumps(implicit))
  spelled_out["image"]["mlp_width"] = spelled_out["text"]["mlp_width"] = 4 * 64
  absent = json.loads(json.dumps(implicit))
  del absent["image"]["mlp_width"], absent["text"]["mlp_width"]
  implicit, spelled_out, absent = map(ml_collections.ConfigDict, (implicit, spelled_out, absent))
  assert weights.architecture_mismatches(implicit, spelled_out) == []
  assert weights.architecture_mismatches(absent, spelled_out) == []
  assert weights.architecture_mismatches(model_cfg, absent) == [
      "model.image.mlp_width: config has 256, the weights have 200",
      "model.text.mlp_width: config has 256, the weights have 96",
  ]


def test_load_hf_rejects_unsupported_configs(tmp_path):
  model = transformers.CLIPModel(hf_config())
  model.save_pretrained(tmp_path)
  with open(tmp_path / "config.json") as f:
    cfg = json.load(f)
  cfg["model_type"] = "siglip"
  with open(tmp_path / "config.json", "w") as f:
    json.dump(cfg, f)
  with pytest.raises(ValueError, match="not a CLIPModel"):
    weights.load_hf(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="nowhere' does not exist"):
    weights.load_hf(str(tmp_path / "nowhere"))
  os.remove(tmp_path / "config.json")
  with pytest.raises(FileNotFoundError, match="config.json does not exist"):
    weights.load_hf(str(tmp_path))


# -------------------------------------------------------------- OpenAI layout


def hf_to_openai(sd: dict) -> dict:
  """OpenAI/open_clip names for a HF CLIPModel state dict (written from OpenAI's model.py)."""
  sd = {k: v.detach().clone() for k, v in sd.items() if not k.endswith("position_ids")}
  out = {}

  def blocks(hf_prefix, oa_prefix):
    i = 0
    while f"{hf_prefix}.{i}.layer_norm1.weight" in sd:
      h, o = f"{hf_prefix}.{i}", f"{oa_prefix}.{i}"
      for kind in ("weight", "bias"):
        out[f"{o}.attn.in_proj_{kind}"] = torch.cat([sd[f"{h}.self_attn.{p}_proj.{kind}"] for p in "qkv"], 0)
        out[f"{o}.attn.out_proj.{kind}"] = sd[f"{h}.self_attn.out_proj.{kind}"]
        out[f"{o}.ln_1.{kind}"] = sd[f"{h}.layer_norm1.{kind}"]
        out[f"{o}.ln_2.{kind}"] = sd[f"{h}.layer_norm2.{kind}"]
        out[f"{o}.mlp.c_fc.{kind}"] = sd[f"{h}.mlp.fc1.{kind}"]
        out[f"{o}.mlp.c_proj.{kind}"] = sd[f"{h}.mlp.fc2.{kind}"]
      i += 1

  if "vision_model.embeddings.class_embedding" in sd:
    out["visual.class_embedding"] = sd["vision_model.embeddings.class_embedding"]
    out["visual.conv1.weight"] = sd["vision_model.embeddings.patch_embedding.weight"]
    out["visual.positional_embedding"] = sd["vision_model.embeddings.position_embedding.weight"]
    for kind in ("weight", "bias"):
      out[f"visual.ln_pre.{kind}"] = sd[f"vision_model.pre_layrnorm.{kind}"]
      out[f"visual.ln_post.{kind}"] = sd[f"vision_model.post_layernorm.{kind}"]
    blocks("vision_model.encoder.layers", "visual.transformer.resblocks")
    out["visual.proj"] = sd["visual_projection.weight"].T.contiguous()  # used as x @ proj
  out["token_embedding.weight"] = sd["text_model.embeddings.token_embedding.weight"]
  out["positional_embedding"] = sd["text_model.embeddings.position_embedding.weight"]
  blocks("text_model.encoder.layers", "transformer.resblocks")
  for kind in ("weight", "bias"):
    out[f"ln_final.{kind}"] = sd[f"text_model.final_layer_norm.{kind}"]
  out["text_projection"] = sd["text_projection.weight"].T.contiguous()
  out["logit_scale"] = sd["logit_scale"]
  return {k: v.contiguous() for k, v in out.items()}


def test_load_openai_matches_transformers(hf_dir, tmp_path):
  _, hf = hf_dir
  state_dict = hf_to_openai(hf.state_dict())
  images, tokens = inputs(seed=1)
  ref = hf_outputs(hf, images, tokens)
  act = hf.config.text_config.hidden_act
  st_path, pt_path = str(tmp_path / "clip.safetensors"), str(tmp_path / "clip.pt")
  safetensors.torch.save_file(state_dict, st_path)
  # A DDP-wrapped open_clip training checkpoint as a PyTorch pickle.
  torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}, pt_path)
  for path in (st_path, pt_path):
    model_cfg, params, model_state = weights.load_any(path, vision_heads=2, text_heads=2, act=act)
    for name, o, r in zip(
        ("image", "text", "logits"), our_outputs(model_cfg, params, model_state, images, tokens), ref
    ):
      assert_close(o, r, f"OpenAI layout {os.path.basename(path)} [{act}] {name}")


def test_load_openai_infers_the_architecture_like_build_model(hf_dir, tmp_path):
  _, hf = hf_dir
  path = str(tmp_path / "clip.safetensors")
  safetensors.torch.save_file(hf_to_openai(hf.state_dict()), path)
  model_cfg, _, _ = weights.load_openai(path)
  # Heads follow OpenAI's rule width // 64 when nothing says otherwise.
  assert model_cfg.to_dict() == dict(
      embed_dim=32,
      act="quick_gelu",
      dtype="float32",
      remat=False,
      remat_policy="full",
      logit_bias=False,
      attention_impl="auto",
      image=dict(type="vit", image_size=32, patch_size=8, width=64, layers=2, heads=1, mlp_width=0),
      text=dict(vocab_size=49408, context_length=CONTEXT, width=64, layers=2, heads=1, mlp_width=0),
  )
  with pytest.raises(ValueError, match="pass text_heads="):
    weights.load_openai(path, text_heads=3)


def test_bfloat16_safetensors_and_unknown_tensors(hf_dir, tmp_path):
  _, hf = hf_dir
  sd = hf_to_openai(hf.state_dict())
  path = str(tmp_path / "bf16.safetensors")
  safetensors.torch.save_file({k: v.bfloat16() for k, v in sd.items()}, path)
  _, params, _ = weights.load_openai(path, vision_heads=2, text_heads=2)
  expected = sd["token_embedding.weight"].bfloat16().float().numpy()
  np.testing.assert_array_equal(params["text_model"]["token_embedding"], expected)
  sd["logit_bias"] = torch.zeros(())  # A SigLIP-style extra.
  safetensors.torch.save_file(sd, path)
  with pytest.raises(ValueError, match="no place in a standard CLIP model.*logit_bias"):
    weights.load_openai(path, vision_heads=2, text_heads=2)


def test_torchscript_archives_are_refused_without_running_them(tmp_path):
  path = str(tmp_path / "ViT-B-32.pt")
  torch.jit.save(torch.jit.script(nn.Linear(2, 2)), path)
  with pytest.raises(ValueError, match="TorchScript.*open_clip"):
    weights.load_openai(path)


# ---------------------------------------------------- RN50: independent reference


class RefBottleneck(nn.Module):
  """OpenAI clip/model.py Bottleneck (anti-aliased: avgpool before the stride-free conv3)."""

  expansion = 4

  def __init__(self, inplanes, planes, stride=1):
    super().__init__()
    self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(planes)
    self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(planes)
    self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
    self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
    self.bn3 = nn.BatchNorm2d(planes * 4)
    self.downsample = None
    if stride > 1 or inplanes != planes * 4:
      self.downsample = nn.Sequential(
          OrderedDict(
              [
                  ("-1", nn.AvgPool2d(stride)),
                  ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
                  ("1", nn.BatchNorm2d(planes * 4)),
              ]
          )
      )

  def forward(self, x):
    out = F.relu(self.bn1(self.conv1(x)))
    out = F.relu(self.bn2(self.conv2(out)))
    out = self.bn3(self.conv3(self.avgpool(out)))
    identity = x if self.downsample is None else self.downsample(x)
    return F.relu(out + identity)


class RefAttentionPool2d(nn.Module):

  def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
    super().__init__()
    self.positional_embedding = nn.Parameter(torch.randn(spacial_dim**2 + 1, embed_dim))
    self.k_proj = nn.Linear(embed_dim, embed_dim)
    self.q_proj = nn.Linear(embed_dim, embed_dim)
    self.v_proj = nn.Linear(embed_dim, embed_dim)
    self.c_proj = nn.Linear(embed_dim, output_dim)
    self.num_heads = num_heads

  def forward(self, x):
    x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
    x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
    x = x + self.positional_embedding[:, None, :]
    x, _ = F.multi_head_attention_forward(
        query=x[:1],
        key=x,
        value=x,
        embed_dim_to_check=x.shape[-1],
        num_heads=self.num_heads,
        q_proj_weight=self.q_proj.weight,
        k_proj_weight=self.k_proj.weight,
        v_proj_weight=self.v_proj.weight,
        in_proj_weight=None,
        in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
        bias_k=None,
        bias_v=None,
        add_zero_attn=False,
        dropout_p=0.0,
        out_proj_weight=self.c_proj.weight,
        out_proj_bias=self.c_proj.bias,
        use_separate_proj_weight=True,
        training=self.training,
        need_weights=False,
    )
    return x.squeeze(0)


class RefModifiedResNet(nn.Module):

  def __init__(self, layers, output_dim, heads, input_resolution, width):
    super().__init__()
    self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(width // 2)
    self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(width // 2)
    self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
    self.bn3 = nn.BatchNorm2d(width)
    self.avgpool = nn.AvgPool2d(2)
    self._inplanes = width
    self.layer1 = self._make_layer(width, layers[0])
    self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
    self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
    self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
    self.attnpool = RefAttentionPool2d(input_resolution // 32, width * 32, heads, output_dim)

  def _make_layer(self, planes, blocks, stride=1):
    layers = [RefBottleneck(self._inplanes, planes, stride)]
    self._inplanes = planes * 4
    layers += [RefBottleneck(self._inplanes, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)

  def forward(self, x):
    x = F.relu(self.bn1(self.conv1(x)))
    x = F.relu(self.bn2(self.conv2(x)))
    x = F.relu(self.bn3(self.conv3(x)))
    x = self.avgpool(x)
    x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
    return self.attnpool(x)


@pytest.fixture(scope="module")
def rn_state_dict():
  """A tiny OpenAI RN CLIP: reference ResNet image tower + a HF text tower in OpenAI names."""
  resnet = randomize_(RefModifiedResNet((1, 1, 1, 1), output_dim=32, heads=2, input_resolution=64, width=16), seed=2)
  gen = torch.Generator().manual_seed(3)
  for module in resnet.modules():  # Non-trivial running statistics; eval mode uses them.
    if isinstance(module, nn.BatchNorm2d):
      module.running_mean.copy_(0.3 * torch.randn(module.num_features, generator=gen))
      module.running_var.copy_(0.5 + torch.rand(module.num_features, generator=gen))
  text = randomize_(transformers.CLIPModel(hf_config()), seed=4)
  state_dict = {k: v for k, v in hf_to_openai(text.state_dict()).items() if not k.startswith("visual.")}
  state_dict.update({f"visual.{k}": v for k, v in resnet.state_dict().items()})
  return resnet, text, state_dict


def test_load_openai_resnet_matches_reference(rn_state_dict, tmp_path):
  resnet, text, state_dict = rn_state_dict
  path = str(tmp_path / "rn.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  model_cfg, params, model_state = weights.load_any(path, vision_heads=2, text_heads=2)
  assert (
      model_cfg.image.type,
      tuple(model_cfg.image.layers),
      model_cfg.image.width,
      model_cfg.image.image_size,
      model_cfg.embed_dim,
  ) == ("resnet", (1, 1, 1, 1), 16, 64, 32)
  images, tokens = inputs(seed=5, image_size=64)
  with torch.no_grad():
    ref_image = resnet(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
  _, ref_text, _ = hf_outputs(text, images[:, :32, :32], tokens)
  ours_image, ours_text, _ = our_outputs(model_cfg, params, model_state, images, tokens)
  assert_close(ours_image, ref_image, "RN image embeddings")
  assert_close(ours_text, ref_text, "RN CLIP text embeddings")


def test_export_openai_round_trip_is_bitwise(rn_state_dict, tmp_path):
  _, _, state_dict = rn_state_dict
  path = str(tmp_path / "rn.safetensors")
  safetensors.torch.save_file({k: v.contiguous() for k, v in state_dict.items()}, path)
  model_cfg, params, model_state = weights.load_openai(path, vision_heads=2, text_heads=2)
  out = str(tmp_path / "export.safetensors")
  weights.export_openai(model_cfg, params, model_state, out)
  # No head overrides: the export records its config in the safetensors metadata.
  cfg2, params2, state2 = weights.load_openai(out)
  assert cfg2.to_dict() == model_cfg.to_dict()
  assert_trees_bitwise_equal(params2, params)
  assert_trees_bitwise_equal(state2, model_state)
  # The export has OpenAI's names and shapes, so the reference module loads it strictly.
  exported = safetensors.torch.load_file(out)
  expected = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
  assert set(exported) == set(expected)
  for key, value in expected.items():
    np.testing.assert_array_equal(exported[key].numpy(), value.numpy(), err_msg=key)
  with pytest.raises(ValueError, match="no Hugging Face CLIP equivalent.*export_openai"):
    weights.export_hf(model_cfg, params, str(tmp_path / "hf"))


# ------------------------------------------------------------ config.init_from


def test_train_init_from_loads_weights_and_checks_the_architecture(tmp_path):
  demo_cfg = dict(
      num_classes=4, train_per_class=4, test_per_class=2, image_size=16, seed=0, root=str(tmp_path / "demo")
  )
  demo.ensure_demo_dataset(demo_cfg)
  config = config_lib.base_config()
  config.model = models.preset("tiny")
  config.model.image.image_size, config.model.image.patch_size = 16, 8
  config.model.text.context_length = 16
  config.data.demo.update(demo_cfg)
  config.data.batch_size = 8
  config.num_epochs, config.max_steps = 1, 0  # Restore weights, train nothing, checkpoint.
  config.progress_bar = False
  config.evals = ml_collections.ConfigDict()
  source = models.build(config.model, rngs=__import__("flax").nnx.Rngs(123))
  params, _ = ModelSpec.split(source)
  params = jax.tree.map(np.asarray, params)
  weights.export_hf(config.model, params, str(tmp_path / "pretrained"))
  config.init_from = str(tmp_path / "pretrained")
  train.train_and_evaluate(config, str(tmp_path / "run"))
  run = inspect_lib.load(str(tmp_path / "run"))
  assert_trees_bitwise_equal(run.state.params, params)

  config.model.text.layers = 3
  with pytest.raises(ValueError, match="model.text.layers: config has 3, the weights have 2"):
    train.train_and_evaluate(config, str(tmp_path / "run_mismatch"))
  config.model.text.layers = 2
  config.init_from = str(tmp_path / "missing")
  with pytest.raises(config_lib.ConfigError, match="init_from"):
    train.train_and_evaluate(config, str(tmp_path / "run_missing"))


# ---------------------------------------------------------------- Hugging Face SigLIP

SIGLIP_VOCAB, SIGLIP_PAD = 1000, 1  # SigLIP's tokenizer pads (and ends captions) with id 1.
SIGLIP_WORDS = ["<pad>", "</s>", "<unk>", "a", "photo", "of", "cat", "dog", "bird", "red", "small", "."]


def siglip_config(**vision_overrides):
  """Text and vision towers of different widths, heads and non-4x MLPs (vision 200 = 3.125x, text 2x)."""
  text = dict(
      vocab_size=SIGLIP_VOCAB,
      hidden_size=48,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=2,
      max_position_embeddings=CONTEXT,
      projection_size=64,
      pad_token_id=SIGLIP_PAD,
      bos_token_id=2,
      eos_token_id=SIGLIP_PAD,
  )
  vision = dict(
      hidden_size=64, intermediate_size=200, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
  )
  vision.update(vision_overrides)
  return transformers.SiglipConfig(text_config=text, vision_config=vision)


def random_siglip(seed=6):
  model = randomize_(transformers.SiglipModel(siglip_config()), seed=seed)
  with torch.no_grad():
    model.logit_scale.fill_(math.log(10.0))
    model.logit_bias.fill_(-2.5)  # Not 0, so a dropped bias would show in the logits.
  return model


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
  model = random_siglip()
  path = tmp_path_factory.mktemp("hf_siglip")
  model.save_pretrained(path)
  return str(path), model


def siglip_tokens(seed=0):
  """Random ids, rows ending in SigLIP's pad id at different lengths (one row not padded at all)."""
  rng = np.random.default_rng(seed)
  tokens = rng.integers(2, SIGLIP_VOCAB, size=(3, CONTEXT)).astype(np.int32)
  tokens[0, 5:] = SIGLIP_PAD
  tokens[1, 11:] = SIGLIP_PAD
  return tokens


def siglip_hf_outputs(model, images, tokens):
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    ids = torch.from_numpy(tokens.astype(np.int64))
    image = model.get_image_features(pixel_values=pixels).pooler_output.numpy()
    text = model.get_text_features(input_ids=ids).pooler_output.numpy()
    logits = model(input_ids=ids, pixel_values=pixels).logits_per_image.numpy()
  return image, text, logits


def siglip_our_outputs(model_cfg, params, model_state, images, tokens):
  model = ModelSpec.create(model_cfg).merge(params, model_state)
  image = np.asarray(model.encode_image(images))
  text = np.asarray(model.encode_text(tokens))
  zi = image / np.linalg.norm(image, axis=1, keepdims=True)
  zt = text / np.linalg.norm(text, axis=1, keepdims=True)
  logits = np.exp(np.asarray(params["logit_scale"])) * zi @ zt.T + np.asarray(params["logit_bias"])
  return image, text, logits


def test_load_hf_siglip_matches_transformers(siglip_dir):
  path, hf = siglip_dir
  model_cfg, params, model_state = weights.load_hf_siglip(path)
  assert (model_cfg.embed_dim, model_cfg.act, model_cfg.layer_norm_eps, model_cfg.logit_bias) == (
      64,
      "gelu_tanh",
      1e-6,
      True,
  )
  assert (
      model_cfg.image.pool,
      model_cfg.image.patch_bias,
      model_cfg.image.pre_norm,
      model_cfg.image.heads,
      model_cfg.image.mlp_width,
  ) == ("map", True, False, 4, 200)
  assert (
      model_cfg.text.causal,
      model_cfg.text.pool,
      model_cfg.text.proj_bias,
      model_cfg.text.width,
      model_cfg.text.mlp_width,
      model_cfg.text.vocab_size,
  ) == (False, "last", True, 48, 96, SIGLIP_VOCAB)
  assert params["logit_bias"].shape == () and float(params["logit_bias"]) == -2.5
  images, tokens = inputs(seed=4)[0], siglip_tokens()
  ref = siglip_hf_outputs(hf, images, tokens)
  for source in (path, os.path.join(path, weights.HF_WEIGHTS)):  # load_any dispatches on model_type.
    loaded = weights.load_any(source)
    assert loaded[0].to_dict() == model_cfg.to_dict()
    for name, o, r in zip(
        ("image embeddings", "text embeddings", "logits_per_image (with bias)"),
        siglip_our_outputs(*loaded, images, tokens),
        ref,
    ):
      assert_close(o, r, f"HF SigLIP {name}")


def test_siglip_config_from_transformers_config_and_the_b16_preset():
  hf = siglip_config()
  from_object = weights.hf_siglip_model_config(hf)
  assert from_object.to_dict() == weights.hf_siglip_model_config(hf.to_dict()).to_dict()
  # transformers' defaults are google/siglip-base-patch16-224's architecture.
  assert weights.hf_siglip_model_config(transformers.SiglipConfig()).to_dict() == (
      models.preset("SigLIP-B/16").to_dict()
  )


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(vision_config=dict(vision_use_head=False)), "vision_use_head=False"),
        (dict(text_config=dict(projection_size=32)), "projection_size=32 differs from the vision width 64"),
        (dict(text_config=dict(hidden_act="relu")), "hidden_act='relu' is not supported"),
        (dict(vision_config=dict(layer_norm_eps=1e-5)), "layer_norm_eps"),
        (dict(model_type="clip"), "not a SiglipModel"),
    ],
)
def test_hf_siglip_config_refusals_name_the_field(change, message):
  hf = siglip_config().to_dict()
  for key, value in change.items():
    if isinstance(value, dict):
      hf[key].update(value)
    else:
      hf[key] = value
  with pytest.raises(ValueError, match=message):
    weights.hf_siglip_model_config(hf, "test config")


def test_siglip_dirs_are_refused_by_the_clip_loader_and_exports(siglip_dir, tmp_path):
  path, _ = siglip_dir
  with pytest.raises(ValueError, match="not a CLIPModel.*load_hf_siglip"):
    weights.load_hf(path)
  model_cfg, params, model_state = weights.load_hf_siglip(path)
  with pytest.raises(ValueError, match="export_hf: the model is not in CLIP's layout.*image.pool='map'"):
    weights.export_hf(model_cfg, params, str(tmp_path / "hf"))
  with pytest.raises(ValueError, match="export_openai: the model is not in CLIP's layout"):
    weights.export_openai(model_cfg, params, model_state, str(tmp_path / "x.safetensors"))


def test_load_for_training_accepts_siglip_and_names_architecture_differences(siglip_dir):
  path, _ = siglip_dir
  model_cfg, params, _ = weights.load_hf_siglip(path)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  shardings = jax.tree.map(lambda _: device, params)
  placed, state = weights.load_for_training(path, model_cfg, shardings, {})
  assert_trees_bitwise_equal(jax.tree.map(np.asarray, placed), params)
  assert state == {}
  clip_cfg = models.preset("tiny")
  with pytest.raises(
      ValueError,
      match="model.image.pool: config has 'cls', the weights have 'map'.*"
      "model.logit_bias: config has False, the weights have True",
  ):
    weights.load_for_training(path, clip_cfg, shardings, {})


# ------------------------------------------------------- inspect.load_pretrained


def word_tokenizer_files(directory):
  """A SigLIP-style tokenizer (pad = eos = 1) saved as HF files, built offline with `tokenizers`."""
  import tokenizers
  from tokenizers import models as tok_models, pre_tokenizers

  tok = tokenizers.Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(SIGLIP_WORDS)}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, pad_token="</s>", unk_token="<unk>", eos_token="</s>"
  ).save_pretrained(directory)
  return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)


def uint8_images(seed, size=32, n=4):
  return np.random.default_rng(seed).integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)


def softmax(x):
  e = np.exp(x - x.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


CLASSES = ["cat", "dog", "bird", "red cat", "small dog"]


def test_load_pretrained_siglip_encodes_and_classifies_like_transformers(tmp_path):
  hf = random_siglip(seed=7)
  path = str(tmp_path / "siglip")
  hf.save_pretrained(path)
  hf_tokenizer = word_tokenizer_files(path)
  run = inspect_lib.load_pretrained(path, batch_size=8)
  assert "padded to max_length=16" in run.tokenization
  images = uint8_images(seed=8)
  prompts = [f"a photo of a {c}." for c in CLASSES]
  ids = hf_tokenizer(prompts, padding="max_length", max_length=CONTEXT, return_tensors="np")["input_ids"]
  assert (ids[:, -1] == SIGLIP_PAD).all()
  # SigLIP's processor maps pixels to [-1, 1] (mean = std = 0.5), here written out independently.
  pixels = (images.astype(np.float32) / 255.0 - 0.5) / 0.5
  ref_image, ref_text, ref_logits = siglip_hf_outputs(hf, pixels, ids)
  assert_close(run.encode_images(images), unit(ref_image), "load_pretrained SigLIP image embeddings")
  assert_close(run.encode_texts(prompts), unit(ref_text), "load_pretrained SigLIP text embeddings")
  probs = run.zero_shot(images, CLASSES)
  assert_close(probs, softmax(ref_logits), "load_pretrained SigLIP zero-shot probabilities")
  np.testing.assert_array_equal(probs.argmax(axis=1), ref_logits.argmax(axis=1))
  assert run.config.model.image.pool == "map" and run.config.init_from == path


def test_load_pretrained_siglip_without_tokenizer_files_takes_token_ids(siglip_dir, tmp_path):
  path, hf = siglip_dir
  run = inspect_lib.load_pretrained(path, batch_size=8)
  assert run.tokenization == "none"
  with pytest.raises(ValueError, match="no tokenizer.*tokenizer_config.json.*encode_tokens"):
    run.encode_texts(["a photo of a cat."])
  with pytest.raises(ValueError, match="no tokenizer"):
    run.zero_shot(uint8_images(seed=1), CLASSES)
  tokens = siglip_tokens(seed=3)
  _, ref_text, _ = siglip_hf_outputs(hf, inputs()[0], tokens)
  assert_close(run.encode_tokens(tokens), unit(ref_text), "load_pretrained SigLIP encode_tokens")
  with pytest.raises(ValueError, match=r"integer ids \[N, 16\]"):
    run.encode_tokens(tokens[:, :8])
  # Tokenizer files that cannot be read (here: a corrupt spiece.model) give an error with the fixes.
  broken = tmp_path / "broken"
  shutil.copytree(path, broken)
  (broken / "spiece.model").write_bytes(b"not a sentencepiece model")
  with pytest.raises(ValueError, match="(?s)could not be read with transformers' AutoTokenizer.*sentencepiece"):
    inspect_lib.load_pretrained(str(broken), batch_size=8)
  # A caller-supplied tokenizer is used as given.
  run = inspect_lib.load_pretrained(path, batch_size=8, tokenizer=lambda texts: tokens[: len(texts)])
  assert_close(run.encode_texts(["x", "y", "z"]), unit(ref_text), "load_pretrained SigLIP tokenizer=")


def test_load_pretrained_clip_dir_and_openai_file_match_transformers(hf_dir, tmp_path):
  path, hf = hf_dir
  images = uint8_images(seed=9)
  prompts = [f"a photo of a {c}." for c in CLASSES]
  tokens = tokenizer_lib.get_tokenizer(CONTEXT)(prompts)
  mean, std = np.float32([0.48145466, 0.4578275, 0.40821073]), np.float32([0.26862954, 0.26130258, 0.27577711])
  pixels = ((images.astype(np.float32) / 255.0 - mean) / std).astype(np.float32)
  ref_image, ref_text, _ = hf_outputs(hf, pixels, tokens)
  ref_logits = np.exp(float(hf.logit_scale.detach())) * unit(ref_image) @ unit(ref_text).T
  openai_path = str(tmp_path / "clip.safetensors")
  safetensors.torch.save_file(hf_to_openai(hf.state_dict()), openai_path)
  act = hf.config.text_config.hidden_act
  for run in (
      inspect_lib.load_pretrained(path, batch_size=8),
      inspect_lib.load_pretrained(openai_path, batch_size=8, vision_heads=2, text_heads=2, act=act),
  ):
    assert "OpenAI BPE" in run.tokenization
    assert_close(run.encode_images(images), unit(ref_image), f"load_pretrained CLIP [{act}] image")
    assert_close(run.encode_texts(prompts), unit(ref_text), f"load_pretrained CLIP [{act}] text")
    probs = run.zero_shot(images, CLASSES)
    assert_close(probs, softmax(ref_logits), f"load_pretrained CLIP [{act}] zero-shot")
    np.testing.assert_array_equal(probs.argmax(axis=1), ref_logits.argmax(axis=1))
