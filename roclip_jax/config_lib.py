"""Config defaults, variant parsing and validation.

A config file in `configs/` starts from `base_config()` and changes what its
experiment needs, so one file is a whole experiment. `validate()` runs before
anything is compiled and names the offending field and the fix.
"""

from __future__ import annotations

import copy
import importlib.util
import os
from typing import Any

import ml_collections

from roclip_jax import defenses
from roclip_jax import losses
from roclip_jax import models
from roclip_jax import sharding
from roclip_jax.data import augment
from roclip_jax.data import image_ops
from roclip_jax.data import poison
from roclip_jax.data import sources
from roclip_jax.errors import ConfigError  # pylint: disable=unused-import (re-exported: config_lib.ConfigError)
from roclip_jax.errors import config_error

LOCKS = ("", "image", "text")  # Which tower (if any) the optimizer leaves untouched (LiT).


def parse_variant(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses `--config=file.py:key=value,flag` variant strings (big_vision style).

  Values are cast to the type of their default; a bare key means True.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    if key not in defaults:
      raise ConfigError(f"Unknown config variant {key!r}; known: {sorted(defaults)}.")
    default = defaults[key]
    if not _:
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes", "y")
    else:
      out[key] = type(default)(value)
  return ml_collections.ConfigDict(out)


def sibling_config(config_file: str, name: str):
  """The config module `name`.py beside `config_file`, so one experiment file can extend another
  (ml_collections loads config files by path, not as a package)."""
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def override(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  """A copy of `config` with dotted-key overrides, e.g. {'augment.image': True}."""
  config = copy.deepcopy(config)
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise ConfigError(f"Cannot override {key!r}: config has no such field.")
    node[leaf] = value
  return config


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 10
  c.max_steps = -1  # Stop early (for smoke tests); the schedule still spans num_epochs.
  # Scale: the batch is split over data x fsdp; parameters and optimizer state
  # are sharded over fsdp by rules (roclip_jax/sharding.py).
  # Tuples, not lists: ml_collections can override tuples from the command line,
  # e.g. --config.mesh="(('data', -1), ('fsdp', 4))".
  c.mesh = (("data", -1), ("fsdp", 1))
  c.sharding_rules = ()  # ((regex on the param path, 'fsdp' | 'replicate' | spec tuple), ...); unmatched: 'fsdp'.
  c.fsdp_min_size = 2**14  # Elements; smaller tensors stay replicated under the 'fsdp' rule.
  c.grad_accum_steps = 1  # Micro-batches per step (exact for the contrastive loss); 1 = off.
  c.dry_run = False  # Compile the train step(s) for the mesh, print memory and FLOPs, exit.
  c.dry_run_devices = 0  # With dry_run: fake this many CPU devices (0 = the devices present).

  c.model = models.preset("tiny")
  # 'clip' (InfoNCE) or 'siglip' (sigmoid pairwise, Zhai et al. 2023; set model.logit_bias=True).
  c.loss = "clip"
  # Pretrained weights to start from (HF CLIP dir or OpenAI/open_clip file; see weights.load_any).
  # Used only when the workdir holds no checkpoint; the architecture must match c.model.
  c.init_from = ""

  c.data = ml_collections.ConfigDict()
  c.data.source = "demo"
  c.data.demo = ml_collections.ConfigDict(
      dict(root="", kind="shapes", num_classes=24, train_per_class=250, test_per_class=50, image_size=32, seed=0)
  )
  c.data.csv_path = ""
  # ArrayRecord shards written by `python -m roclip_jax.data.convert` (glob or directory).
  c.data.array_record_pattern = ""
  c.data.image_root = ""
  c.data.image_key = "image_path"
  c.data.caption_key = "caption"
  c.data.label_key = "label"
  c.data.delimiter = ","
  c.data.eval_csv = ""
  c.data.classes_json = ""
  c.data.batch_size = 128  # Global, over all devices and hosts.
  c.data.num_workers = 0
  c.data.prefetch_buffer = 2
  # Storage faults (an I/O error reading data that exists, unlike a corrupt or missing image, which is
  # skipped) are retried this many times, waiting io_retry_base_seconds * 2**k before retry k; then the
  # run checkpoints and stops (image_ops.StorageError).
  c.data.io_retries = image_ops.IO_RETRIES  # 5
  c.data.io_retry_base_seconds = image_ops.IO_RETRY_BASE_SECONDS  # 0.5

  c.augment = augment.default_config()

  # The defense (roclip_jax/defenses/): each registered defense with a config block adds it here, with
  # the defaults written once, in its module (roclip, safeclip, cleanclip).
  c.defense = defenses.DEFAULT
  for name in defenses.names():
    defense = defenses.get(name)
    if defense.config_block is not None:
      c[defense.config_block] = defense.default_config()

  c.poison = poison.default_config()

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 5e-4
  c.optim.warmup_steps = 10000
  c.optim.schedule = "cosine"
  c.optim.b1 = 0.9
  c.optim.b2 = 0.98
  c.optim.eps = 1e-6
  c.optim.weight_decay = 0.1
  c.optim.grad_clip_norm = 0.0
  # LiT-style tower locking: '' (train both), 'image' or 'text'. The locked tower gets no update
  # (not even weight decay) and a locked ResNet's BatchNorm statistics stay fixed.
  c.optim.lock = ""

  c.log_every_steps = 50
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, max_to_keep=3, async_save=True))
  c.evals = ml_collections.ConfigDict()
  c.evals.zeroshot = ml_collections.ConfigDict(dict(type="zeroshot", every_steps=0, dataset="demo", split="test"))
  c.progress_bar = True
  return c


def is_run_dir(path: str) -> bool:
  """Whether `path` is the --workdir of a roclip_jax training run (its config and checkpoints)."""
  return os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(os.path.join(path, "checkpoints"))


def _fail(field: str, problem: str, fix: str) -> None:
  raise config_error(field, problem, fix)


def validate(config: ml_collections.ConfigDict, num_batch_shards: int = 1) -> None:
  """Rejects configs that cannot work, before anything is built or compiled."""
  if config.defense not in defenses.names():
    _fail("defense", f"{config.defense!r} is not a known defense.", f"use one of {defenses.names()}.")
  if config.num_epochs < 1:
    _fail("num_epochs", f"is {config.num_epochs}.", "set a positive number of epochs.")
  if config.data.source not in sources.VALID_SOURCES:
    _fail("data.source", f"{config.data.source!r} is not a known source.", f"use one of {sources.VALID_SOURCES}.")
  if config.data.source == "csv" and not config.data.csv_path:
    _fail("data.csv_path", "is empty but data.source='csv'.", "pass --config.data.csv_path=/path/to/train.csv.")
  if config.data.source == "array_record" and not config.data.array_record_pattern:
    _fail(
        "data.array_record_pattern",
        "is empty but data.source='array_record'.",
        "pass --config.data.array_record_pattern='/data/shards/*.array_record' (written by "
        "python -m roclip_jax.data.convert).",
    )
  if config.init_from and not os.path.exists(config.init_from):
    _fail(
        "init_from",
        f"{config.init_from!r} does not exist.",
        "point it at a training run's workdir, a Hugging Face CLIP directory or an OpenAI/open_clip weights "
        "file, or set it to ''.",
    )
  io_retries = config.data.io_retries
  if not isinstance(io_retries, int) or io_retries < 0:
    _fail("data.io_retries", f"is {io_retries!r}.", "use 0 (stop at the first storage fault) or more retries, e.g. 5.")
  if config.data.io_retry_base_seconds < 0:
    _fail("data.io_retry_base_seconds", f"is {config.data.io_retry_base_seconds}.", "use 0 or more seconds, e.g. 0.5.")
  b = config.data.batch_size
  if b < 2:
    _fail("data.batch_size", f"is {b}; a contrastive batch needs negatives.", "use a batch of at least 2.")
  if b % num_batch_shards:
    _fail(
        "data.batch_size",
        f"{b} is not divisible by the {num_batch_shards} batch shards of the mesh.",
        f"use a multiple of {num_batch_shards}, e.g. {max(num_batch_shards, b // num_batch_shards * num_batch_shards)}.",
    )
  if config.optim.lr <= 0:
    _fail("optim.lr", f"is {config.optim.lr}.", "use a positive learning rate.")
  if config.optim.warmup_steps < 0:
    _fail("optim.warmup_steps", f"is {config.optim.warmup_steps}.", "use 0 or more.")
  if config.optim.schedule not in ("cosine", "constant"):
    _fail("optim.schedule", f"{config.optim.schedule!r} is unknown.", "use 'cosine' or 'constant'.")
  if not 0 <= config.optim.b1 < 1 or not 0 <= config.optim.b2 < 1:
    _fail("optim.b1/b2", "must lie in [0, 1).", "use e.g. b1=0.9, b2=0.98.")
  if config.log_every_steps < 1:
    _fail("log_every_steps", f"is {config.log_every_steps}.", "use 1 or more.")
  image = config.model.image
  if image.type == "vit" and image.patch_size > 0 and image.image_size % image.patch_size:
    _fail(
        "model.image.patch_size",
        f"{image.patch_size} does not divide image_size {image.image_size}.",
        "pick a patch size that divides the image size.",
    )
  try:
    models.validate_config(config.model)
  except ValueError as e:  # "model config `image.width`=..." -> "config.model.image.width=..."
    raise ConfigError(str(e).replace("model config `", "config.model.").replace("`", "")) from None
  if config.poison.enabled:
    try:
      poison.validate_config(config.poison)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  try:  # Where images are augmented (host workers or the train step), and the device path's source size.
    if augment.placement(config.augment) == "device":
      augment.device_source_size(config.augment, config.model.image.image_size)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  _validate_loss_and_lock(config, losses.LOSSES)
  _validate_scale(config, num_batch_shards)
  defense = defenses.get(config.defense)
  if config.grad_accum_steps > 1 and not defense.supports_grad_accum:
    _fail(
        "grad_accum_steps",
        f"is {config.grad_accum_steps} with defense={config.defense!r}, whose loss has no " "accumulated form.",
        "use grad_accum_steps=1 (a smaller model or a larger mesh instead).",
    )
  defense.validate(config, num_batch_shards)
  for name, ev in config.evals.items():
    if "type" not in ev:
      _fail(f"evals.{name}.type", "is missing.", "give every evaluator a type, e.g. type='zeroshot'.")


def _validate_scale(config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
  """Sharding rules, gradient accumulation and dry-run fields."""
  try:
    sharding.normalize_rules(config.sharding_rules)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.fsdp_min_size < 0:
    _fail("fsdp_min_size", f"is {config.fsdp_min_size}.", "use 0 (shard everything divisible) or more.")
  accum = config.grad_accum_steps
  if not isinstance(accum, int) or accum < 1:
    _fail("grad_accum_steps", f"is {accum!r}.", "use 1 (off) or more micro-batches per step.")
  b = config.data.batch_size
  if accum > 1 and (b % accum or (b // accum) % num_batch_shards or b // accum < 2):
    unit = accum * num_batch_shards
    _fail(
        "grad_accum_steps",
        f"{accum} micro-batches of the batch {b} must each hold a multiple of the "
        f"{num_batch_shards} batch shards (and at least 2 pairs).",
        f"use a batch that is a multiple of {unit}, e.g. {max(unit, b // unit * unit)}, or fewer micro-batches.",
    )
  if config.dry_run_devices < 0:
    _fail("dry_run_devices", f"is {config.dry_run_devices}.", "use 0 (the devices present) or a device count.")


def _validate_loss_and_lock(config: ml_collections.ConfigDict, known_losses: tuple[str, ...]) -> None:
  """The loss and tower locking."""
  if config.loss not in known_losses:
    _fail("loss", f"{config.loss!r} is not a known loss.", f"use one of {known_losses}.")
  if config.loss == "siglip" and not config.model.logit_bias:
    _fail(
        "model.logit_bias",
        "is False but config.loss='siglip' needs the learnable logit bias.",
        "set --config.model.logit_bias=True (or use config.loss='clip').",
    )
  if config.model.logit_bias and config.init_from and not is_run_dir(config.init_from):
    # OpenAI/HF CLIP checkpoints carry no bias. Imported SigLIP weights do, but the training pipeline
    # tokenizes with CLIP's BPE and normalises with CLIP's constants, not what SigLIP was trained on.
    _fail(
        "init_from",
        "is set but model.logit_bias=True: pretrained CLIP weights have no logit bias to load, "
        "and fine-tuning imported SigLIP weights is not supported (the training pipeline feeds CLIP's "
        "tokens and image normalisation).",
        "train the SigLIP model from scratch (init_from=''), use config.loss='clip' with logit_bias=False, "
        "or open SigLIP weights for evaluation with roclip_jax.inspect.load_pretrained.",
    )
  if config.optim["lock"] not in LOCKS:
    _fail("optim.lock", f"{config.optim['lock']!r} is not a tower.", "use '' (train both towers), 'image' or 'text'.")
