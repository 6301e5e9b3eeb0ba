"""Config defaults, variant parsing and validation.

A config file in `configs/` starts from `base_config()` and changes what its
experiment needs, so one file is a whole experiment. `validate()` runs before
anything is compiled and names the offending field and the fix.
"""
from __future__ import annotations

import os
import copy
from typing import Any

import ml_collections

DEFENSES = ("none", "roclip", "safeclip", "cleanclip")
TWO_VIEW_DEFENSES = ("safeclip", "cleanclip")  # Their steps read a second, augmented view of each example.
DATA_SOURCES = ("demo", "csv", "array_record")
LOSSES = ("clip", "siglip")  # Symmetric InfoNCE, or SigLIP's pairwise sigmoid (needs model.logit_bias).
LOCKS = ("", "image", "text")  # Which tower (if any) the optimizer leaves untouched (LiT).


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field and a fix."""


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
  import importlib.util  # pylint: disable=import-outside-toplevel
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
  from roclip_jax import models  # Deferred: configs must load fast for `--help`.
  from roclip_jax.data import augment, poison

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
      dict(root="", num_classes=24, train_per_class=250, test_per_class=50, image_size=32, seed=0))
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
  c.data.views = 1  # Views per example; the trainer sets 2 for the two-view defenses (TWO_VIEW_DEFENSES).
  # Storage faults (an I/O error reading data that exists, unlike a corrupt or missing image, which is
  # skipped) are retried this many times, waiting io_retry_base_seconds * 2**k before retry k; then the
  # run checkpoints and stops (image_ops.StorageError).
  c.data.io_retries = 5
  c.data.io_retry_base_seconds = 0.5

  c.augment = augment.default_config()

  c.defense = "none"
  c.roclip = ml_collections.ConfigDict()
  c.roclip.pool_size = 21845  # The original code's default (docs/methods.md, section 4).
  c.roclip.k = 2  # A matching epoch every k epochs (the paper: epochs k, 2k, ...).
  c.roclip.shard_pool = False
  c.roclip.fifo = "ring"  # Or 'lightly' for the original's truncate-and-reset write.
  # 'robust' (the default): our variant that does not collapse on small data (docs/roclip.md,
  # sections 4 and 6): matching starts after the lr warm-up on a pool written every step,
  # hubness-aware (CSLS) matching, images matched to the same caption are not each other's
  # negatives, and never a row of the image's own example. 'paper': the published method, exactly.
  # The knobs below, left unset (None), take the variant's value; set one to ablate it.
  c.roclip.variant = "robust"
  c.roclip.first_epoch = ml_collections.config_dict.placeholder(int)  # First matching epoch.
  c.roclip.update_pool_every_step = ml_collections.config_dict.placeholder(bool)  # Also write the pool in CLIP epochs.
  c.roclip.csls_k = ml_collections.config_dict.placeholder(int)  # 0: cosine top-1; > 0: CSLS over k neighbours.
  c.roclip.mask_duplicates = ml_collections.config_dict.placeholder(bool)
  c.roclip.exclude_own = ml_collections.config_dict.placeholder(bool)  # Never match a row of the image's own example.

  # SafeCLIP (docs/methods.md, section 5; roclip_jax/safeclip.py). Defaults: SafeCLIP's published ones.
  c.safeclip = ml_collections.ConfigDict()
  c.safeclip.inmodal_warmup = 5  # Epochs of unimodal nearest-neighbour contrastive learning.
  c.safeclip.multimodal_warmup = 1  # Then epochs of cross-augmented CLIP loss at `filter_lr`.
  c.safeclip.in_lr = 5e-4  # Peak lr of the unimodal warm-up (warm-up + cosine over those epochs).
  c.safeclip.filter_lr = 5e-6  # Constant lr of the CLIP warm-up.
  c.safeclip.bank_size = 256  # Rows of each modality's nearest-neighbour bank.
  c.safeclip.threshold = 0.9  # First split: safe = GMM posterior of the high-mean component >= this.
  c.safeclip.ratio_step = 0.01  # Later splits: the safe fraction grows by this per epoch ...
  c.safeclip.max_ratio = 0.85  # ... up to this.
  c.safeclip.num_examples = 0  # Set by the trainer: the size of the per-example safe mask.

  # CleanCLIP fine-tuning (docs/methods.md, section 6; roclip_jax/cleanclip.py), from config.init_from.
  c.cleanclip = ml_collections.ConfigDict()
  c.cleanclip.clip_weight = 1.0  # lambda_1, on the cross-modal (CLIP or SigLIP) loss.
  c.cleanclip.inmodal_weight = 1.0  # lambda_2, on the in-modal InfoNCE of (x, aug(x)).
  # The defender's clean set: this many examples known to be clean, drawn from the training
  # source with the poisoned records removed (0 = all clean ones).
  c.cleanclip.num_clean_examples = 0
  c.cleanclip.subset_seed = 0

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
  raise ConfigError(f"config.{field}: {problem} Fix: {fix}")


def validate(config: ml_collections.ConfigDict, num_batch_shards: int = 1) -> None:
  """Rejects configs that cannot work, before anything is built or compiled."""
  if config.defense not in DEFENSES:
    _fail("defense", f"{config.defense!r} is not a known defense.", f"use one of {DEFENSES}.")
  if config.num_epochs < 1:
    _fail("num_epochs", f"is {config.num_epochs}.", "set a positive number of epochs.")
  if config.data.source not in DATA_SOURCES:
    _fail("data.source", f"{config.data.source!r} is not a known source.", f"use one of {DATA_SOURCES}.")
  if config.data.source == "csv" and not config.data.csv_path:
    _fail("data.csv_path", "is empty but data.source='csv'.", "pass --config.data.csv_path=/path/to/train.csv.")
  if config.data.source == "array_record" and not config.data.get("array_record_pattern"):
    _fail("data.array_record_pattern", "is empty but data.source='array_record'.",
          "pass --config.data.array_record_pattern='/data/shards/*.array_record' (written by "
          "python -m roclip_jax.data.convert).")
  init_from = config.get("init_from", "")
  if init_from and not os.path.exists(init_from):
    _fail("init_from", f"{init_from!r} does not exist.",
          "point it at a training run's workdir, a Hugging Face CLIP directory or an OpenAI/open_clip weights "
          "file, or set it to ''.")
  io_retries = config.data.get("io_retries", 0)
  if not isinstance(io_retries, int) or io_retries < 0:
    _fail("data.io_retries", f"is {io_retries!r}.", "use 0 (stop at the first storage fault) or more retries, e.g. 5.")
  if config.data.get("io_retry_base_seconds", 0) < 0:
    _fail("data.io_retry_base_seconds", f"is {config.data.io_retry_base_seconds}.", "use 0 or more seconds, e.g. 0.5.")
  b = config.data.batch_size
  if b < 2:
    _fail("data.batch_size", f"is {b}; a contrastive batch needs negatives.", "use a batch of at least 2.")
  if b % num_batch_shards:
    _fail("data.batch_size", f"{b} is not divisible by the {num_batch_shards} batch shards of the mesh.",
          f"use a multiple of {num_batch_shards}, e.g. {max(num_batch_shards, b // num_batch_shards * num_batch_shards)}.")
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
    _fail("model.image.patch_size", f"{image.patch_size} does not divide image_size {image.image_size}.",
          "pick a patch size that divides the image size.")
  from roclip_jax import models  # Deferred like in base_config.
  from roclip_jax.data import poison
  from roclip_jax import roclip
  try:
    models.validate_config(config.model)
  except ValueError as e:  # "model config `image.width`=..." -> "config.model.image.width=..."
    raise ConfigError(str(e).replace("model config `", "config.model.").replace("`", "")) from None
  if config.poison.enabled:
    try:
      poison.validate_config(config.poison)
    except ValueError as e:
      raise ConfigError(f"config.{e}") from None
  if config.defense == "roclip":
    r = config.roclip
    if r.k < 2:
      _fail("roclip.k", f"is {r.k}; with k=1 every epoch is a matching epoch and the text tower never trains.",
            "use k >= 2 (the original uses 2 or 3).")
    if r.variant not in roclip.VARIANTS:
      _fail("roclip.variant", f"{r.variant!r} is unknown.", f"use one of {roclip.VARIANTS}.")
    if r.first_epoch is not None and r.first_epoch < 1:
      _fail("roclip.first_epoch", f"is {r.first_epoch}; epochs count from 1.", "use 1 or more, or leave it unset.")
    if r.csls_k is not None and r.csls_k < 0:
      _fail("roclip.csls_k", f"is {r.csls_k}.", "use 0 (cosine top-1) or a positive neighbourhood size such as 10.")
    if r.fifo not in ("ring", "lightly"):
      _fail("roclip.fifo", f"{r.fifo!r} is unknown.", "use 'ring' or 'lightly'.")
    if r.pool_size < b:
      _fail("roclip.pool_size", f"{r.pool_size} is smaller than the global batch {b}.",
            "use a pool at least as large as the batch (the original: 21845 for batch 512).")
    if r.shard_pool and r.pool_size % num_batch_shards:
      lo = r.pool_size // num_batch_shards * num_batch_shards
      _fail("roclip.pool_size", f"{r.pool_size} is not divisible by the {num_batch_shards} batch shards, "
            "which a sharded pool needs.", f"use {lo} or {lo + num_batch_shards}, or set roclip.shard_pool=False.")
  _validate_two_view_defenses(config)
  _validate_loss_and_lock(config)
  _validate_scale(config, num_batch_shards)
  for name, ev in config.evals.items():
    if "type" not in ev:
      _fail(f"evals.{name}.type", "is missing.", "give every evaluator a type, e.g. type='zeroshot'.")


def _validate_scale(config: ml_collections.ConfigDict, num_batch_shards: int) -> None:
  """Sharding rules, gradient accumulation and dry-run fields."""
  from roclip_jax import sharding  # Deferred like in base_config.
  try:
    sharding.normalize_rules(config.get("sharding_rules", None))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.get("fsdp_min_size", 0) < 0:
    _fail("fsdp_min_size", f"is {config.fsdp_min_size}.", "use 0 (shard everything divisible) or more.")
  accum = config.get("grad_accum_steps", 1)
  if not isinstance(accum, int) or accum < 1:
    _fail("grad_accum_steps", f"is {accum!r}.", "use 1 (off) or more micro-batches per step.")
  b = config.data.batch_size
  if accum > 1 and (b % accum or (b // accum) % num_batch_shards or b // accum < 2):
    unit = accum * num_batch_shards
    _fail("grad_accum_steps", f"{accum} micro-batches of the batch {b} must each hold a multiple of the "
          f"{num_batch_shards} batch shards (and at least 2 pairs).",
          f"use a batch that is a multiple of {unit}, e.g. {max(unit, b // unit * unit)}, or fewer micro-batches.")
  if config.get("dry_run_devices", 0) < 0:
    _fail("dry_run_devices", f"is {config.dry_run_devices}.", "use 0 (the devices present) or a device count.")


def _validate_loss_and_lock(config: ml_collections.ConfigDict) -> None:
  """The loss and tower locking (both optional fields: older configs lack them)."""
  loss = config.get("loss", "clip")
  if loss not in LOSSES:
    _fail("loss", f"{loss!r} is not a known loss.", f"use one of {LOSSES}.")
  if loss == "siglip" and not config.model.get("logit_bias", False):
    _fail("model.logit_bias", "is False but config.loss='siglip' needs the learnable logit bias.",
          "set --config.model.logit_bias=True (or use config.loss='clip').")
  init_from = config.get("init_from", "")
  if config.model.get("logit_bias", False) and init_from and not is_run_dir(init_from):
    # OpenAI/HF checkpoints carry no bias, and weights.load_for_training expects the exact tree.
    _fail("init_from", "is set but model.logit_bias=True: pretrained CLIP weights have no logit bias to load.",
          "train the SigLIP model from scratch (init_from=''), or use config.loss='clip' with logit_bias=False.")
  lock = config.optim.get("lock", "")
  if lock not in LOCKS:
    _fail("optim.lock", f"{lock!r} is not a tower.", "use '' (train both towers), 'image' or 'text'.")
  if lock == "image" and config.defense == "roclip":
    # A matching step trains only the image tower (docs/roclip.md, section 1): locked, every
    # matching epoch would train nothing but the logit scale.
    _fail("optim.lock", "is 'image' with defense='roclip', whose matching steps train only the image tower.",
          "lock the text tower instead (optim.lock='text'), or use defense='none' for a locked-image (LiT) model.")


def _validate_two_view_defenses(config: ml_collections.ConfigDict) -> None:
  """SafeCLIP's and CleanCLIP's fields, and what they cannot be combined with."""
  if config.defense not in TWO_VIEW_DEFENSES:
    return
  if config.get("grad_accum_steps", 1) > 1:
    _fail("grad_accum_steps", f"is {config.grad_accum_steps} with defense={config.defense!r}, whose two-view "
          "steps have no accumulated form.", "use grad_accum_steps=1 (a smaller model or a larger mesh instead).")
  if config.defense == "safeclip":
    s = config.safeclip
    if config.get("loss", "clip") != "clip":
      _fail("loss", f"is {config.loss!r} with defense='safeclip', whose safe/risky split masks an InfoNCE loss.",
            "use config.loss='clip' with SafeCLIP.")
    if s.inmodal_warmup < 0 or s.multimodal_warmup < 0:
      _fail("safeclip.inmodal_warmup", "and safeclip.multimodal_warmup must be >= 0.", "use e.g. 5 and 1.")
    if s.inmodal_warmup + s.multimodal_warmup >= config.num_epochs:
      _fail("safeclip.inmodal_warmup", f"+ multimodal_warmup = {s.inmodal_warmup + s.multimodal_warmup} leaves no "
            f"epoch of the {config.num_epochs} for the safe/risky split.",
            "train for more epochs or shorten the warm-ups.")
    if s.bank_size < config.data.batch_size:
      _fail("safeclip.bank_size", f"{s.bank_size} is smaller than the global batch {config.data.batch_size}.",
            "use a bank at least as large as the batch.")
    if not 0 < s.threshold < 1 or not 0 < s.max_ratio <= 1 or s.ratio_step < 0:
      _fail("safeclip.threshold", "must lie in (0, 1), max_ratio in (0, 1] and ratio_step >= 0.",
            "use SafeCLIP's published 0.9, 0.85 and 0.01.")
    if min(s.in_lr, s.filter_lr) <= 0:
      _fail("safeclip.in_lr", "and safeclip.filter_lr must be positive.", "use e.g. 5e-4 and 5e-6.")
  else:
    c = config.cleanclip
    if not config.get("init_from", ""):
      _fail("init_from", "is empty but defense='cleanclip' fine-tunes an already trained model.",
            "point config.init_from at a run's workdir, a Hugging Face CLIP directory or an OpenAI weights file.")
    if c.clip_weight < 0 or c.inmodal_weight < 0 or c.clip_weight + c.inmodal_weight == 0:
      _fail("cleanclip.clip_weight", "and cleanclip.inmodal_weight must be >= 0 and not both 0.",
            "use CleanCLIP's 1.0 and 1.0.")
    if c.num_clean_examples < 0:
      _fail("cleanclip.num_clean_examples", f"is {c.num_clean_examples}.", "use 0 (every clean example) or more.")
