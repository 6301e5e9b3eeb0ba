"""A BadCLIP-style optimised backdoor patch (Liang et al., CVPR 2024; docs/attacks_and_metrics.md, section 3.1).

  python -m roclip_jax.attacks.badclip --surrogate=RUN_DIR_OR_WEIGHTS --config=configs/robustness_demo.py \\
      --out=/tmp/patch.npz [--steps=500 --lr=0.01 --batch_size=64 --seed=0 --image_weight=1.0]
  python -m roclip_jax.main --config=configs/robustness_demo.py --workdir=DIR \\
      --config.poison.backdoor.trigger=optimized --config.poison.backdoor.patch_file=/tmp/patch.npz

A square patch P (values in [0, 1], stamped as 255 * P) is optimised against a surrogate CLIP so that
images x carrying it move toward the target class in both of the surrogate's embedding spaces:

  loss(P) = -mean_x cos(z(x + P), t) - image_weight * mean_x cos(z(x + P), v)

with z the surrogate's image embedding, t the normalised mean of the target's caption-template text
embeddings and v the normalised mean of the image embeddings of clean target-class images of the
held-out split. x are training images not of the target class, the attack's own candidates. One
`jax.jit`'d step draws a batch (and, for `position='random'`, a corner per image) from the seed and
takes an Adam step on P, clipped back to [0, 1]; the result is quantised to uint8 and saved with
`poison.save_patch_file`, for the `optimized` trigger of `roclip_jax.data.poison`.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from roclip_jax import config_lib
from roclip_jax import encoder as encoder_lib
from roclip_jax import runs
from roclip_jax import scoring
from roclip_jax import steps as steps_lib
from roclip_jax import weights as weights_lib
from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.data import sources
from roclip_jax.data import templates as templates_lib

# Random streams of the optimisation (the second entry of the seed sequence).
_STREAM_INIT = 0
_STREAM_STEPS = 1
_STREAM_EVAL_CORNERS = 2
_STREAM_IMAGES = 3
# The authors' initialisation: N(0.5, 0.25) per value, clipped to [0, 1].
_INIT_MEAN, _INIT_STD = 0.5, 0.25


def default_config() -> ml_collections.ConfigDict:
  """The optimiser's settings (every one is also a flag of the CLI).

  image_weight: lambda, the weight of the image-embedding term relative to the text term.
  num_images: training images (not of the target class) the patch is optimised on.
  templates: 'dataset' (the held-out split's zero-shot templates) or 'imagenet80'.
  """
  return ml_collections.ConfigDict(
      dict(steps=500, lr=0.01, batch_size=64, seed=0, image_weight=1.0, num_images=1024, templates="dataset")
  )


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad optimiser setting."""
  if cfg.steps < 1:
    raise ValueError(f"badclip steps={cfg.steps} must be >= 1.")
  if not cfg.lr > 0:
    raise ValueError(f"badclip lr={cfg.lr} must be > 0 (the patch lives in [0, 1]; 0.01 moves it visibly).")
  if cfg.batch_size < 1:
    raise ValueError(f"badclip batch_size={cfg.batch_size} must be >= 1.")
  if cfg.image_weight < 0:
    raise ValueError(f"badclip image_weight={cfg.image_weight} must be >= 0 (0 keeps the text term only).")
  if not isinstance(cfg.seed, int) or cfg.seed < 0:
    raise ValueError(f"badclip seed={cfg.seed!r} must be a non-negative int.")


# ------------------------------------------------------------------------------------------------
# The surrogate and the target embeddings.
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Surrogate:
  """A CLIP to optimise against: its model config, host (numpy) parameters and where it came from."""

  model_config: ml_collections.ConfigDict
  params: dict
  model_state: dict
  description: str  # Recorded in the patch's metadata.

  @functools.cached_property
  def spec(self) -> steps_lib.ModelSpec:
    return steps_lib.ModelSpec.create(self.model_config)

  @property
  def image_size(self) -> int:
    return int(self.model_config.image.image_size)

  def encoder(self) -> encoder_lib.Encoder:
    return encoder_lib.Encoder(
        self.spec, self.params, self.model_state, context_length=self.model_config.text.context_length
    )


def load_surrogate(path: str) -> Surrogate:
  """A roclip_jax run's latest checkpoint (a --workdir), or imported weights (`weights.load_any`)."""
  if config_lib.is_run_dir(path):
    run_config, state = runs.restore(path)
    # On the host: the run's arrays are placed on its training mesh; the optimiser places its own.
    params, model_state = jax.device_get((state.params, state.model_state))
    return Surrogate(
        run_config.model,
        params,
        model_state,
        description=f"run {os.path.abspath(path)} step {int(jax.device_get(state.step))}",
    )
  if not os.path.exists(path):
    raise FileNotFoundError(
        f"--surrogate={path!r} does not exist; pass a training run's --workdir or "
        "CLIP weights (a Hugging Face directory or an OpenAI/open_clip file)."
    )
  model_config, params, model_state = weights_lib.load_any(path)
  return Surrogate(model_config, params, model_state, description=f"weights {os.path.abspath(path)}")


@dataclasses.dataclass(frozen=True)
class TargetEmbeddings:
  """The two anchors of the objective, unit vectors [embed_dim]."""

  text: np.ndarray
  image: np.ndarray


def _unit(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return (x / np.linalg.norm(x)).astype(np.float32)


def target_embeddings(
    encoder: Any, target_class: str, templates: Sequence[str], target_images: np.ndarray
) -> TargetEmbeddings:
  """t: the normalised mean of the templates' text embeddings with the target class (the zero-shot
  classifier's row); v: the normalised mean of the clean target-class images' embeddings."""
  if not len(target_images):
    raise ValueError(
        f"No clean image of the target class {target_class!r} to anchor the image term; "
        "give held-out images of that class (or set image_weight=0)."
    )
  text = encoder.encode_texts([t.format(target_class) for t in templates]).mean(axis=0)
  image = encoder.encode_images(np.asarray(target_images, np.uint8)).mean(axis=0)
  return TargetEmbeddings(text=_unit(text), image=_unit(image))


# ------------------------------------------------------------------------------------------------
# The objective and its jitted optimisation.
# ------------------------------------------------------------------------------------------------


def stamp(images: jax.Array, patch: jax.Array, corners: jax.Array) -> jax.Array:
  """float [B, S, S, 3] on the 0-255 scale with 255 * patch pasted at each image's (top, left)."""
  pixels = 255.0 * patch.astype(jnp.float32)
  paste = lambda image, corner: jax.lax.dynamic_update_slice(image, pixels, (corner[0], corner[1], 0))
  return jax.vmap(paste)(images.astype(jnp.float32), corners)


def per_image_objective(
    spec: steps_lib.ModelSpec,
    params: dict,
    model_state: dict,
    patch: jax.Array,
    images: jax.Array,
    corners: jax.Array,
    text_target: jax.Array,
    image_target: jax.Array,
    image_weight: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(loss, cos to t, cos to v), each [B], of the images (uint8 [B, S, S, 3]) carrying the patch.

  The images go through the eval-mode pass of `scoring.unit_image_embeddings`, so the surrogate sees
  what it sees at evaluation.
  """
  model = spec.merge(params, model_state)
  z = scoring.unit_image_embeddings(model, stamp(images, patch, corners))
  text_cos = z @ text_target
  image_cos = z @ image_target
  return -text_cos - image_weight * image_cos, text_cos, image_cos


def draw_corners(key: jax.Array, position: str, side: int, image_size: int, count: int) -> jax.Array:
  """int32 [count, 2] (top, left): the configured corner, or uniform ones for `random` (as
  `poison.patch_corner`, whose per-image draws follow the example id, not this key)."""
  if position == "random":
    return jax.random.randint(key, (count, 2), 0, image_size - side + 1, dtype=jnp.int32)
  corner = poison_lib.patch_corner(position, side, image_size, image_size, rng=None)
  return jnp.broadcast_to(jnp.asarray(corner, jnp.int32), (count, 2))


@dataclasses.dataclass(frozen=True)
class PatchResult:
  patch: np.ndarray  # uint8 [side, side, 3]: what the `optimized` trigger stamps.
  objective_initial: float  # Mean loss over the images, with the initial patch quantised to uint8.
  objective_final: float  # The same, with the saved patch.
  text_cos_initial: float
  text_cos_final: float
  image_cos_initial: float
  image_cos_final: float
  history: tuple[tuple[int, float], ...]  # (step, batch loss before that step's update).


def optimize_patch(
    surrogate: Surrogate,
    images: np.ndarray,
    targets: TargetEmbeddings,
    *,
    side: int,
    position: str,
    cfg: ml_collections.ConfigDict,
    log_every: int = 0,
) -> PatchResult:
  """Optimises a `side`-px patch on `images` (uint8 [N, S, S, 3] at the surrogate's resolution).

  Deterministic given `cfg.seed` (initial patch, batches and random corners all derive from it).
  """
  validate_config(cfg)
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"optimize_patch needs uint8 [N, S, S, 3] images, got {images.dtype} {images.shape}.")
  n, size = images.shape[0], images.shape[1]
  if images.shape[1:3] != (surrogate.image_size, surrogate.image_size):
    raise ValueError(
        f"The images are {images.shape[1]}x{images.shape[2]} but the surrogate reads "
        f"{surrogate.image_size}x{surrogate.image_size}; resize them (image_ops.resize_center_crop)."
    )
  if position not in poison_lib.PATCH_POSITIONS:
    raise ValueError(f"position={position!r} is not one of {list(poison_lib.PATCH_POSITIONS)}.")
  if not 1 <= side <= size:
    raise ValueError(f"The patch side {side} must lie in [1, {size}] (the image side).")
  if cfg.batch_size > n:
    raise ValueError(f"badclip batch_size={cfg.batch_size} exceeds the {n} images; lower it or give more.")

  spec = surrogate.spec
  tx = optax.adam(cfg.lr)
  weight = float(cfg.image_weight)
  batch = int(cfg.batch_size)
  root = jax.random.PRNGKey(cfg.seed)
  step_key = jax.random.fold_in(root, _STREAM_STEPS)

  def batch_objective(patch, params, model_state, batch_images, corners, text_t, image_t):
    loss, text_cos, image_cos = per_image_objective(
        spec, params, model_state, patch, batch_images, corners, text_t, image_t, weight
    )
    return loss.mean(), (text_cos.mean(), image_cos.mean())

  @functools.partial(jax.jit, donate_argnums=(0, 1))
  def update(patch, opt_state, step, params, model_state, all_images, text_t, image_t):
    batch_key, corner_key = jax.random.split(jax.random.fold_in(step_key, step))
    chosen = jax.random.choice(batch_key, all_images.shape[0], (batch,), replace=False)
    corners = draw_corners(corner_key, position, side, size, batch)
    (loss, _), grad = jax.value_and_grad(batch_objective, has_aux=True)(
        patch, params, model_state, all_images[chosen], corners, text_t, image_t
    )
    updates, opt_state = tx.update(grad, opt_state, patch)
    # Projected: the patch stays a valid image.
    return jnp.clip(optax.apply_updates(patch, updates), 0.0, 1.0), opt_state, loss

  @jax.jit
  def chunk_sums(patch, params, model_state, chunk, corners, valid, text_t, image_t):
    parts = per_image_objective(spec, params, model_state, patch, chunk, corners, text_t, image_t, weight)
    return jnp.stack([jnp.sum(jnp.where(valid, p, 0.0)) for p in parts])

  params, model_state = surrogate.params, surrogate.model_state
  text_t, image_t = jnp.asarray(targets.text), jnp.asarray(targets.image)
  eval_corners = np.asarray(draw_corners(jax.random.fold_in(root, _STREAM_EVAL_CORNERS), position, side, size, n))

  def mean_objective(patch_uint8: np.ndarray) -> np.ndarray:
    """(loss, text cos, image cos) averaged over all images, for the uint8 patch as stamped."""
    patch01 = jnp.asarray(patch_uint8, jnp.float32) / 255.0
    sums = np.zeros(3)
    for start in range(0, n, batch):  # Fixed-size chunks (the last one padded): one compilation.
      stop = min(start + batch, n)
      pad = batch - (stop - start)
      chunk = np.concatenate([images[start:stop], np.zeros((pad,) + images.shape[1:], np.uint8)])
      corners = np.concatenate([eval_corners[start:stop], np.zeros((pad, 2), np.int32)])
      valid = np.arange(batch) < stop - start
      sums += np.asarray(chunk_sums(patch01, params, model_state, chunk, corners, valid, text_t, image_t), np.float64)
    return sums / n

  init = jax.random.normal(jax.random.fold_in(root, _STREAM_INIT), (side, side, 3)) * _INIT_STD + _INIT_MEAN
  patch = jnp.clip(init, 0.0, 1.0)
  initial = mean_objective(quantize(patch))
  opt_state = tx.init(patch)
  device_images = jnp.asarray(images)
  history = []
  for step in range(cfg.steps):
    patch, opt_state, loss = update(patch, opt_state, step, params, model_state, device_images, text_t, image_t)
    if log_every and (step % log_every == 0 or step == cfg.steps - 1):
      history.append((step, float(loss)))  # The only host sync, every log_every steps.
      print(f"badclip step {step}: batch objective {float(loss):.4f}", flush=True)
  final_patch = quantize(patch)
  final = mean_objective(final_patch)
  return PatchResult(
      patch=final_patch,
      objective_initial=float(initial[0]),
      objective_final=float(final[0]),
      text_cos_initial=float(initial[1]),
      text_cos_final=float(final[1]),
      image_cos_initial=float(initial[2]),
      image_cos_final=float(final[2]),
      history=tuple(history),
  )


def quantize(patch: jax.Array) -> np.ndarray:
  """[0, 1] floats -> the uint8 pixels the trigger stamps."""
  return np.clip(np.rint(np.asarray(patch, np.float64) * 255.0), 0, 255).astype(np.uint8)


def metadata(
    result: PatchResult,
    surrogate: Surrogate,
    *,
    target_class: str,
    position: str,
    cfg: ml_collections.ConfigDict,
    **extra: Any,
) -> dict[str, Any]:
  """What the patch file records (and, through it, every run's poison_info.json)."""
  return dict(
      attack="badclip",
      surrogate=surrogate.description,
      target_class=target_class,
      image_size=surrogate.image_size,
      patch_side=int(result.patch.shape[0]),
      position=position,
      steps=int(cfg.steps),
      lr=float(cfg.lr),
      batch_size=int(cfg.batch_size),
      seed=int(cfg.seed),
      image_weight=float(cfg.image_weight),
      objective_initial=result.objective_initial,
      objective_final=result.objective_final,
      text_cos_final=result.text_cos_final,
      image_cos_final=result.image_cos_final,
      **extra,
  )


# ------------------------------------------------------------------------------------------------
# Data of a training config, and the CLI.
# ------------------------------------------------------------------------------------------------


def attack_data(
    config: ml_collections.ConfigDict, image_size: int, *, target_class: str, num_images: int, seed: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
  """(training images not of the target class, clean held-out target-class images, the split's
  templates), eval-preprocessed to `image_size`, from the data of a training config."""
  config = config_lib.override(config, {"model.image.image_size": int(image_size)})
  held_out = pipeline.make_eval_arrays(config, split="test")
  if target_class not in held_out.class_names:
    raise ValueError(
        f"The target class {target_class!r} is not a class of the held-out split "
        f"({held_out.class_names[:8]}...); fix config.poison.backdoor.target_class."
    )
  target = held_out.class_names.index(target_class)
  target_images = held_out.images[held_out.labels == target]

  source = sources.make_source(config.data, split="train")
  records = [source[i] for i in range(len(source))]
  mention = poison_lib.mentions(target_class)
  # As the backdoor's `random` selection: neither labelled as the target nor captioned with it.
  candidates = [i for i, r in enumerate(records) if int(r["label"]) != target and not mention.search(str(r["caption"]))]
  if not candidates:
    raise ValueError(f"Every training example is of the target class {target_class!r}; nothing to optimise on.")
  rng = np.random.default_rng([seed, _STREAM_IMAGES])
  chosen = np.sort(rng.choice(len(candidates), size=min(num_images, len(candidates)), replace=False))
  picked = [records[candidates[i]] for i in chosen]
  images = []
  for b in pipeline.scoring_batches(config, picked, batch_size=256):
    images.append(b["image"][b["valid"]])
  images = np.concatenate(images)
  if not len(images):
    raise ValueError("None of the chosen training images could be decoded; check config.data.")
  return images, target_images, list(held_out.templates)


def main(argv: Sequence[str], flags_: Any) -> None:
  """The CLI (module docstring); `flags_` holds the flags of `define_flags`."""
  from absl import logging  # pylint: disable=g-import-not-at-top

  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  config = flags_.config
  cfg = default_config()
  for name in cfg:
    value = getattr(flags_, name)
    if value is not None:
      cfg[name] = value
  validate_config(cfg)
  bd = config.poison.backdoor
  target_class = flags_.target_class or bd.target_class
  position = flags_.position or bd.position
  surrogate = load_surrogate(flags_.surrogate)
  size = surrogate.image_size
  if size != config.model.image.image_size:
    logging.warning(
        "The surrogate reads %dpx images but the config's model %dpx: the patch is optimised "
        "at %dpx and stamped at that size on the training images.",
        size,
        config.model.image.image_size,
        size,
    )
  patch_size = bd.patch_size if flags_.patch_size is None else flags_.patch_size
  side = poison_lib.patch_side(patch_size, size, size)
  images, target_images, split_templates = attack_data(
      config, size, target_class=target_class, num_images=cfg.num_images, seed=cfg.seed
  )
  templates = templates_lib.resolve_templates(cfg.templates, split_templates)
  targets = target_embeddings(surrogate.encoder(), target_class, templates, target_images)
  print(
      f"badclip: {side}px patch at {position!r} for {target_class!r} against {surrogate.description}, "
      f"{len(images)} images, {len(target_images)} target images, {len(templates)} templates",
      flush=True,
  )
  result = optimize_patch(
      surrogate, images, targets, side=side, position=position, cfg=cfg, log_every=max(1, cfg.steps // 10)
  )
  meta = metadata(
      result,
      surrogate,
      target_class=target_class,
      position=position,
      cfg=cfg,
      templates=cfg.templates,
      num_images=len(images),
      num_target_images=len(target_images),
  )
  poison_lib.save_patch_file(flags_.out, result.patch, meta)
  print(
      f"badclip: objective {result.objective_initial:.4f} -> {result.objective_final:.4f} "
      f"(cos to text {result.text_cos_initial:.3f} -> {result.text_cos_final:.3f}, to target images "
      f"{result.image_cos_initial:.3f} -> {result.image_cos_final:.3f}); wrote {flags_.out}",
      flush=True,
  )


def define_flags():
  """The CLI's absl flags; defined only when run as a program, so importing this module defines none."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  config_flags.DEFINE_config_file("config", None, "A training config (data, poison.backdoor target/size/position).")
  flags.DEFINE_string("surrogate", None, "A training run's --workdir, or CLIP weights (weights.load_any).")
  flags.DEFINE_string("out", None, "Where to write the patch (.npz, for poison.backdoor.patch_file).")
  flags.DEFINE_string("target_class", None, "Default: config.poison.backdoor.target_class.")
  flags.DEFINE_string("position", None, "Default: config.poison.backdoor.position.")
  flags.DEFINE_integer("patch_size", None, "Default: config.poison.backdoor.patch_size (0: 16/224 of the side).")
  defaults = default_config()
  flags.DEFINE_integer("steps", None, f"Optimisation steps (default {defaults.steps}).")
  flags.DEFINE_float("lr", None, f"Adam learning rate on the [0, 1] patch (default {defaults.lr}).")
  flags.DEFINE_integer("batch_size", None, f"Images per step (default {defaults.batch_size}).")
  flags.DEFINE_integer("seed", None, f"Seed of the initial patch, batches and corners (default {defaults.seed}).")
  flags.DEFINE_float("image_weight", None, f"lambda, weight of the image term (default {defaults.image_weight}).")
  flags.DEFINE_integer("num_images", None, f"Training images to optimise on (default {defaults.num_images}).")
  flags.DEFINE_string("templates", None, f"'dataset' or 'imagenet80' (default {defaults.templates!r}).")
  flags.mark_flags_as_required(["config", "surrogate", "out"])
  return flags.FLAGS


if __name__ == "__main__":
  from absl import app  # pylint: disable=g-import-not-at-top

  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/roclip_jax/jax_cache"))
  flag_values = define_flags()
  app.run(lambda argv: main(argv, flag_values))
