"""Reproducible poisoning and backdoor attacks on the training data (docs/attacks_and_metrics.md).

Two attacks, both a pure function of (clean data, config, seed), so that a run can be repeated and
every poisoned example is known by id:

* **Targeted poisoning** (Carlini & Terzis 2021, RoCLIP `create_poison.ipynb`): pick target images
  from a held-out labelled split, give each an adversarial class, and APPEND (target image, caption)
  pairs whose captions are training captions that mention the adversarial class. `poisoned=2`.
* **Backdoor** (BadNets / Blended / WaNet, as in CleanCLIP and the RoCLIP author's repo; SIG,
  Barni et al. 2019; an optimised patch, BadCLIP-style, from `roclip_jax.attacks.badclip`): pick
  training examples, give them a caption that mentions the target class (or keep it, for the
  label-consistent variant), and stamp a trigger on their image. They REPLACE
  the clean examples (same id), `poisoned=1`. The trigger is stamped after decoding by
  `make_image_transform`, and the evaluator stamps the same trigger (same seed) on test images.

The attacks decide which examples to poison and their new captions from the training source's
metadata (ids, captions, labels: `data/metadata.py`), never its images; `PoisonedSource` then applies
the decision lazily, as each record is read.

Everything random is drawn from `np.random.default_rng([seed, <stream>, ...])`, one stream per
purpose, so that turning one attack on or off never changes what the other one draws.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import re
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import ml_collections
import numpy as np

from roclip_jax.data import metadata as metadata_lib
from roclip_jax.data import templates as templates_lib

# Independent random streams (the second entry of the seed sequence).
_STREAM_TARGETED = 1
_STREAM_BACKDOOR = 2
_STREAM_PATCH_PATTERN = 3
_STREAM_BLEND_PATTERN = 4
_STREAM_WARP_FIELD = 5
_STREAM_PER_IMAGE = 6

# Codes of the `poisoned` field of a training record (0: clean).
BACKDOOR = 1
TARGETED = 2

TRIGGERS = ("patch", "blended", "warped", "sig", "optimized")
PATCH_POSITIONS = ("random", "top_left", "top_right", "bottom_left", "bottom_right", "center")
PATCH_PATTERNS = ("noise", "checker", "yellow")
SELECTIONS = ("random", "label_consistent")
CAPTION_SOURCES = ("train", "templates")

# BadNets/CleanCLIP use a 16-px patch on 224-px images; an automatic patch keeps that ratio.
_PATCH_FRACTION = 16 / 224
_MIN_PATCH = 3
# Fixed patterns are drawn once at these sizes and resized (nearest) to the image, so the trigger
# looks the same on a raw training image and on the resized evaluation image.
_NOISE_PATCH_BASE = 16
_CHECKER_CELLS = 4
_BLEND_BASE = 224
# SIG (Barni et al. 2019): the paper's amplitude (0-255 scale) and cycles across the image width.
SIG_DEFAULT_DELTA = 20.0
SIG_DEFAULT_FREQUENCY = 6.0


def default_config() -> ml_collections.ConfigDict:
  """The `config.poison` block: both attacks off by default.

  backdoor.num_poisons / backdoor.rate: set one of them (rate > 0 wins over num_poisons = 0).
  backdoor.patch_size: 0 picks 16/224 of the shorter image side (at least 3 px).
  backdoor.sig_delta / sig_frequency: amplitude (0-255 scale) and cycles per image width of the
    `sig` trigger.
  backdoor.patch_file: the `optimized` trigger's patch (`save_patch_file`, written by
    `python -m roclip_jax.attacks.badclip`).
  targeted.adversarial_classes: names allowed as adversarial classes; empty = every class name.
  """
  return ml_collections.ConfigDict(
      dict(
          enabled=False,
          seed=0,
          targeted=dict(enabled=False, num_targets=16, poisons_per_target=100, adversarial_classes=()),
          backdoor=dict(
              enabled=False,
              target_class="mushroom",
              num_poisons=300,
              rate=0.0,
              selection="random",
              caption_source="train",
              trigger="patch",
              patch_size=0,
              position="random",
              pattern="noise",
              resample_pattern=False,
              alpha=0.2,
              warp_k=4,
              warp_s=0.5,
              sig_delta=SIG_DEFAULT_DELTA,
              sig_frequency=SIG_DEFAULT_FREQUENCY,
              patch_file="",
          ),
      )
  )


def validate_config(cfg: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field of a `config.poison` block."""
  bd = cfg.backdoor
  _check_choice("poison.backdoor.trigger", bd.trigger, TRIGGERS)
  _check_choice("poison.backdoor.position", bd.position, PATCH_POSITIONS)
  _check_choice("poison.backdoor.pattern", bd.pattern, PATCH_PATTERNS)
  _check_choice("poison.backdoor.selection", bd.selection, SELECTIONS)
  _check_choice("poison.backdoor.caption_source", bd.caption_source, CAPTION_SOURCES)
  if not 0.0 <= bd.alpha <= 1.0:
    raise ValueError(f"poison.backdoor.alpha={bd.alpha} must lie in [0, 1] (0.2 is the original).")
  if bd.warp_k < 2:
    raise ValueError(f"poison.backdoor.warp_k={bd.warp_k} must be >= 2 (WaNet uses 4).")
  # .get: configs saved by runs from before the SIG trigger lack these fields.
  sig_delta = bd.get("sig_delta", SIG_DEFAULT_DELTA)
  if not 0.0 < sig_delta <= 255.0:
    raise ValueError(
        f"poison.backdoor.sig_delta={sig_delta} must lie in (0, 255], the amplitude "
        f"on the 0-255 pixel scale (Barni et al. use {SIG_DEFAULT_DELTA:g})."
    )
  sig_frequency = bd.get("sig_frequency", SIG_DEFAULT_FREQUENCY)
  if not sig_frequency > 0.0:
    raise ValueError(
        f"poison.backdoor.sig_frequency={sig_frequency} must be > 0 cycles per image "
        f"width (Barni et al. use {SIG_DEFAULT_FREQUENCY:g})."
    )
  if bd.patch_size < 0:
    raise ValueError(f"poison.backdoor.patch_size={bd.patch_size} must be >= 0 (0 = automatic).")
  if bd.trigger == "optimized":
    patch = load_patch_file(bd.patch_file)[0]  # Fails early on a missing or bad file.
    if bd.patch_size not in (0, patch.shape[0]):
      raise ValueError(
          f"poison.backdoor.patch_size={bd.patch_size} but the optimized patch in "
          f"{bd.patch_file!r} is {patch.shape[0]} px wide, and its pixels are stamped as saved; set "
          f"patch_size to 0 (or {patch.shape[0]}), or optimise a patch of the size you want."
      )
  if bd.num_poisons < 0 or not 0.0 <= bd.rate < 1.0:
    raise ValueError("poison.backdoor.num_poisons must be >= 0 and poison.backdoor.rate in [0, 1).")
  if bd.num_poisons > 0 and bd.rate > 0:
    raise ValueError("Set only one of poison.backdoor.num_poisons and poison.backdoor.rate " "(set the other to 0).")
  if cfg.targeted.num_targets < 0 or cfg.targeted.poisons_per_target < 1:
    raise ValueError("poison.targeted.num_targets must be >= 0 and poisons_per_target >= 1.")
  if not isinstance(cfg.seed, int) or cfg.seed < 0:
    raise ValueError(f"poison.seed={cfg.seed!r} must be a non-negative int.")


def _check_choice(field: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{field}={value!r} is not one of {list(choices)}.")


def mentions(name: str) -> re.Pattern[str]:
  """Case-insensitive whole-phrase pattern for a class name: `\\b<name>\\b`.

  Lookarounds replace `\\b` so that names that start or end in punctuation ("kite (bird of prey)")
  still need a non-word character (or the string edge) on each side.
  """
  return re.compile(rf"(?<!\w){re.escape(name.strip())}(?!\w)", re.IGNORECASE)


# ------------------------------------------------------------------------------------------------
# Triggers (pure numpy, uint8 HWC in and out).
# ------------------------------------------------------------------------------------------------


def apply_trigger(image: np.ndarray, cfg: ml_collections.ConfigDict, seed: int, *, example_id: int = 0) -> np.ndarray:
  """Stamps the backdoor trigger of `cfg.backdoor` on one uint8 HWC RGB image.

  The pattern, the blend image and the warp field are fixed by the attack `seed`, so training and
  evaluation stamp the same trigger. What may change per image (a `random` patch position, a
  resampled noise pattern) is drawn from (`seed`, `example_id`), so it is reproducible too.

  * `patch` (BadNets): a square patch of side `patch_size` (0: 16/224 of the shorter side, >= 3 px;
    clipped to the image) at `position`, filled with `pattern`: `noise` (uniform uint8 noise drawn
    once from the seed at 16x16 and resized nearest; `resample_pattern` redraws it per image as
    CleanCLIP's `random` does), `checker` (4x4 black/white cells, white top-left) or `yellow`
    (255, 255, 0).
  * `blended` (Chen et al. 2017): round((1 - alpha) * image + alpha * noise), with a fixed uniform
    uint8 noise image drawn from the seed at 224x224 and resized nearest to the image.
  * `warped` (WaNet, Nguyen & Tran 2021): see `wanet_displacement`; bilinear resampling of the
    image at the displaced pixel positions, clipped to the image.
  * `sig` (Barni et al. 2019): see `sig_signal`; the same horizontal sinusoid is added to every
    row and channel, then rounded and clipped to [0, 255]. It needs no seed. SIG is a clean-label
    attack in the original: pair it with `selection='label_consistent'` to reproduce that.
  * `optimized` (BadCLIP-style, `roclip_jax.attacks.badclip`): the uint8 patch saved in
    `patch_file`, stamped pixel for pixel at its saved size (`patch_size` must be 0 or that size)
    at `position`, like `patch`; `pattern` and `resample_pattern` do not apply.
  """
  image = _check_image(image)
  bd = cfg.backdoor
  if bd.trigger in ("patch", "optimized"):
    return _stamp_patch(image, bd, seed, example_id)
  if bd.trigger == "blended":
    noise = _resize_nearest(_blend_noise(seed), *image.shape[:2])
    mixed = (1.0 - bd.alpha) * image.astype(np.float64) + bd.alpha * noise.astype(np.float64)
    return _to_uint8(mixed)
  if bd.trigger == "warped":
    return warp_image(image, wanet_displacement(cfg, seed, *image.shape[:2]))
  if bd.trigger == "sig":
    # Configs written before SIG existed lack the fields: the module constants are their defaults.
    signal = sig_signal(
        image.shape[1], bd.get("sig_delta", SIG_DEFAULT_DELTA), bd.get("sig_frequency", SIG_DEFAULT_FREQUENCY)
    )
    return _to_uint8(image.astype(np.float64) + signal[None, :, None])
  raise ValueError(f"poison.backdoor.trigger={bd.trigger!r} is not one of {list(TRIGGERS)}.")


def _check_image(image: np.ndarray) -> np.ndarray:
  image = np.asarray(image)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"A trigger needs a uint8 HxWx3 RGB image, got {image.dtype} {image.shape}; "
        "decode with roclip_jax.data.image_ops.decode_image first."
    )
  return image


def _to_uint8(values: np.ndarray) -> np.ndarray:
  return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _per_image_rng(seed: int, example_id: int) -> np.random.Generator:
  return np.random.default_rng([seed, _STREAM_PER_IMAGE, int(example_id) % 2**63])


def _resize_nearest(pattern: np.ndarray, height: int, width: int) -> np.ndarray:
  """Nearest-neighbour resize of an HWC pattern: output pixel i reads input pixel i*in//out."""
  rows = np.arange(height) * pattern.shape[0] // height
  cols = np.arange(width) * pattern.shape[1] // width
  return pattern[rows[:, None], cols[None, :]]


def patch_side(patch_size: int, height: int, width: int) -> int:
  """Side of the square patch on an image of this size (see `apply_trigger`)."""
  side = min(height, width)
  if patch_size > 0:
    return min(patch_size, side)
  return min(side, max(_MIN_PATCH, round(side * _PATCH_FRACTION)))


def patch_corner(position: str, side: int, height: int, width: int, rng: np.random.Generator) -> tuple[int, int]:
  """(top, left) of a `side`-px patch at `position`; `random` draws it from `rng`."""
  if position == "random":
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))
  corners = {
      "top_left": (0, 0),
      "top_right": (0, width - side),
      "bottom_left": (height - side, 0),
      "bottom_right": (height - side, width - side),
      "center": ((height - side) // 2, (width - side) // 2),
  }
  if position not in corners:
    raise ValueError(f"poison.backdoor.position={position!r} is not one of {list(PATCH_POSITIONS)}.")
  return corners[position]


def _patch_pattern(bd: ml_collections.ConfigDict, seed: int, side: int, rng: np.random.Generator) -> np.ndarray:
  if bd.pattern == "noise":
    source = rng if bd.resample_pattern else np.random.default_rng([seed, _STREAM_PATCH_PATTERN])
    base = source.integers(0, 256, (_NOISE_PATCH_BASE, _NOISE_PATCH_BASE, 3), dtype=np.uint8)
  elif bd.pattern == "checker":
    cells = np.indices((_CHECKER_CELLS, _CHECKER_CELLS)).sum(0) % 2 == 0
    base = np.repeat(np.where(cells, 255, 0).astype(np.uint8)[..., None], 3, axis=-1)
  elif bd.pattern == "yellow":
    base = np.array([[[255, 255, 0]]], np.uint8)
  else:
    raise ValueError(f"poison.backdoor.pattern={bd.pattern!r} is not one of {list(PATCH_PATTERNS)}.")
  return _resize_nearest(base, side, side)


def _stamp_patch(image: np.ndarray, bd: ml_collections.ConfigDict, seed: int, example_id: int) -> np.ndarray:
  """The `patch` and `optimized` triggers: a square of pixels at `bd.position`."""
  height, width = image.shape[:2]
  optimized = None
  if bd.trigger == "optimized":
    optimized = load_patch_file(bd.patch_file)[0]
    side = optimized.shape[0]
    if side > min(height, width):
      raise ValueError(
          f"The optimized patch in {bd.patch_file!r} is {side} px wide but the image is "
          f"{height}x{width}; optimise the patch for images of this size."
      )
  else:
    side = patch_side(bd.patch_size, height, width)
  rng = _per_image_rng(seed, example_id)
  top, left = patch_corner(bd.position, side, height, width, rng)
  out = image.copy()
  # The corner is drawn before the pattern: a resampled noise pattern draws from the same rng.
  out[top : top + side, left : left + side] = (
      optimized if optimized is not None else _patch_pattern(bd, seed, side, rng)
  )
  return out


# ------------------------------------------------------------------------------------------------
# Optimised patch files (written by roclip_jax.attacks.badclip; stamped by the `optimized` trigger).
# ------------------------------------------------------------------------------------------------


def save_patch_file(path: str, patch: np.ndarray, metadata: Mapping[str, Any]) -> None:
  """Writes an `optimized` trigger's patch: a .npz with `patch` (uint8 [S, S, 3]) and `metadata`
  (a JSON string: surrogate, target, steps, seed, objective, ...). Written atomically, so a run
  that reads it never sees half a file."""
  patch = _check_patch(np.asarray(patch), path)
  text = json.dumps(dict(metadata), sort_keys=True)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  buffer = io.BytesIO()
  np.savez(buffer, patch=patch, metadata=np.array(text))
  with tempfile.NamedTemporaryFile(dir=directory, suffix=".npz.tmp", delete=False) as f:
    f.write(buffer.getvalue())
  os.replace(f.name, path)


def load_patch_file(path: str) -> tuple[np.ndarray, dict[str, Any]]:
  """(patch uint8 [S, S, 3], read-only; metadata dict) of a file written by `save_patch_file`.

  Cached per (path, modification time, size): the trigger is stamped image by image, and a file
  rewritten in place is read again.
  """
  if not path:
    raise ValueError(
        "poison.backdoor.trigger='optimized' needs poison.backdoor.patch_file: the .npz "
        "written by `python -m roclip_jax.attacks.badclip --out=...`."
    )
  try:
    stat = os.stat(path)
  except FileNotFoundError:
    raise ValueError(
        f"poison.backdoor.patch_file={path!r} does not exist; write it with "
        "`python -m roclip_jax.attacks.badclip --out=...` or fix the path."
    ) from None
  return _load_patch_file(os.path.abspath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=8)
def _load_patch_file(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, dict[str, Any]]:
  del mtime_ns, size  # Only the cache key.
  try:
    data = np.load(path, allow_pickle=False)
    arrays = {}
    if isinstance(data, np.lib.npyio.NpzFile):  # A bare .npy holds one array and no metadata.
      with data:
        arrays = {name: data[name] for name in data.files}
  except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # Not an .npz, truncated, pickled, ...
    raise ValueError(
        f"poison.backdoor.patch_file={path!r} is not a readable .npz ({e}); write it with "
        "`python -m roclip_jax.attacks.badclip --out=...`."
    ) from None
  missing = {"patch", "metadata"} - set(arrays)
  if missing:
    raise ValueError(
        f"poison.backdoor.patch_file={path!r} lacks {sorted(missing)}; it is not a patch "
        "written by roclip_jax.attacks.badclip (poison.save_patch_file)."
    )
  patch, text = arrays["patch"], str(arrays["metadata"])
  patch = _check_patch(patch, path)
  patch.setflags(write=False)  # Shared by every stamped image.
  return patch, json.loads(text)


def _check_patch(patch: np.ndarray, path: str) -> np.ndarray:
  if (
      patch.dtype != np.uint8
      or patch.ndim != 3
      or patch.shape[-1] != 3
      or patch.shape[0] != patch.shape[1]
      or patch.shape[0] < 1
  ):
    raise ValueError(
        f"The optimized patch in {path!r} must be a square uint8 [S, S, 3] RGB array, got "
        f"{patch.dtype} {patch.shape}; write it with roclip_jax.data.poison.save_patch_file."
    )
  return patch


def patch_file_info(path: str) -> dict[str, Any]:
  """What a run records about the patch it stamped: the file, its pixels' SHA-256 and its metadata."""
  patch, metadata = load_patch_file(path)
  return {
      "file": os.path.abspath(path),
      "sha256": hashlib.sha256(patch.tobytes()).hexdigest(),
      "shape": list(patch.shape),
      "metadata": metadata,
  }


def _blend_noise(seed: int) -> np.ndarray:
  rng = np.random.default_rng([seed, _STREAM_BLEND_PATTERN])
  return rng.integers(0, 256, (_BLEND_BASE, _BLEND_BASE, 3), dtype=np.uint8)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
  """Keys cubic-convolution weights of the taps at offsets -1, 0, 1, 2 (PyTorch: a=-0.75)."""

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def _bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] bicubic interpolation matrix, align_corners=True, edge taps clamped."""
  scale = (size_in - 1) / (size_out - 1) if size_out > 1 else 0.0
  src = np.arange(size_out) * scale
  base = np.floor(src).astype(int)
  weights = _cubic_weights(src - base)
  matrix = np.zeros((size_out, size_in))
  for tap in range(4):
    np.add.at(matrix, (np.arange(size_out), np.clip(base - 1 + tap, 0, size_in - 1)), weights[:, tap])
  return matrix


def upsample_bicubic(grid: np.ndarray, height: int, width: int) -> np.ndarray:
  """Bicubic upsampling of a [C, h, w] field to [C, height, width], as
  `F.interpolate(mode='bicubic', align_corners=True)` (which WaNet uses)."""
  rows = _bicubic_matrix(grid.shape[1], height)
  cols = _bicubic_matrix(grid.shape[2], width)
  return np.einsum("yh,chw,xw->cyx", rows, grid, cols)


def wanet_control_grid(seed: int, k: int) -> np.ndarray:
  """WaNet's random [2, k, k] flow (x then y), uniform in [-1, 1], divided by its mean |value|."""
  rng = np.random.default_rng([seed, _STREAM_WARP_FIELD])
  grid = rng.uniform(-1.0, 1.0, size=(2, k, k))
  return grid / np.mean(np.abs(grid))


def wanet_displacement(cfg: ml_collections.ConfigDict, seed: int, height: int, width: int) -> np.ndarray:
  """Per-pixel displacement [height, width, 2] (dx, dy), in pixels, of the WaNet trigger.

  WaNet shifts the normalised sampling grid (range [-1, 1]) by `s * flow / size`, with `flow` the
  bicubic upsampling of the control grid; in pixels that is `s * flow / size * (size - 1) / 2`.
  WaNet uses square images; here each axis uses its own size. The displacement is therefore about
  `s / 2` pixels whatever the image size, as in the original.
  """
  flow = upsample_bicubic(wanet_control_grid(seed, cfg.backdoor.warp_k), height, width)
  s = cfg.backdoor.warp_s
  dx = s * flow[0] / width * (width - 1) / 2
  dy = s * flow[1] / height * (height - 1) / 2
  return np.stack([dx, dy], axis=-1)


def sig_signal(width: int, delta: float, frequency: float) -> np.ndarray:
  """The SIG trigger's per-column offset [width]: delta * sin(2 pi j frequency / width).

  Barni et al. 2019 ("A new backdoor attack in CNNs by training set corruption without label
  poisoning"), with j the 0-based column index (so column 0 is unchanged). The frequency counts
  cycles across the image width, so a raw training image and its resized evaluation copy carry
  the same pattern relative to their size.
  """
  columns = np.arange(width, dtype=np.float64)
  return delta * np.sin(2.0 * np.pi * columns * frequency / width)


def warp_image(image: np.ndarray, displacement: np.ndarray) -> np.ndarray:
  """Bilinear resampling: out[y, x] = image at (x + dx, y + dy), positions clipped to the image."""
  image = _check_image(image)
  height, width = image.shape[:2]
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
  sx = np.clip(xs + displacement[..., 0], 0, width - 1)
  sy = np.clip(ys + displacement[..., 1], 0, height - 1)
  x0 = np.floor(sx).astype(int)
  y0 = np.floor(sy).astype(int)
  # At the far edge the second tap has weight 0; clipping only keeps its index valid.
  x1 = np.minimum(x0 + 1, width - 1)
  y1 = np.minimum(y0 + 1, height - 1)
  wx = (sx - x0)[..., None]
  wy = (sy - y0)[..., None]
  img = image.astype(np.float64)
  top = img[y0, x0] * (1 - wx) + img[y0, x1] * wx
  bottom = img[y1, x0] * (1 - wx) + img[y1, x1] * wx
  return _to_uint8(top * (1 - wy) + bottom * wy)


class BackdoorImageTransform:
  """Picklable `image_transform(record, image)` for the input pipeline (grain workers).

  Stamps the trigger on records with `poisoned == 1` and returns every other image unchanged.
  """

  def __init__(self, cfg: ml_collections.ConfigDict, seed: int):
    validate_config(cfg)
    self._cfg = ml_collections.ConfigDict(cfg.to_dict())  # a private copy: later edits don't leak
    self._seed = int(seed)

  def __call__(self, record: Mapping[str, Any], image: np.ndarray) -> np.ndarray:
    if int(record["poisoned"]) != BACKDOOR:
      return image
    return apply_trigger(image, self._cfg, self._seed, example_id=int(record["id"]))

  def __repr__(self) -> str:
    return f"BackdoorImageTransform(trigger={self._cfg.backdoor.trigger!r}, seed={self._seed})"


def make_image_transform(cfg: ml_collections.ConfigDict, seed: int) -> BackdoorImageTransform | None:
  """The pipeline's `image_transform`, or None when no backdoor is configured (nothing to stamp)."""
  if not (cfg.enabled and cfg.backdoor.enabled):
    return None
  return BackdoorImageTransform(cfg, seed)


# ------------------------------------------------------------------------------------------------
# Poisoned training source.
# ------------------------------------------------------------------------------------------------


class RecordSource(Protocol):
  """A random-access source of training records (grain's protocol)."""

  def __len__(self) -> int:
    ...

  def __getitem__(self, index: int) -> Mapping[str, Any]:
    ...


@dataclasses.dataclass(frozen=True)
class TargetPool:
  """Held-out labelled images the targeted attack picks its targets from (e.g. the eval split).

  `ids` are the examples' ids in that split (defaults to their positions). Examples with label -1
  are never picked.
  """

  image_paths: Sequence[str]
  labels: np.ndarray
  class_names: Sequence[str]
  ids: np.ndarray | None = None

  def __post_init__(self):
    labels = np.asarray(self.labels, np.int64)
    if labels.shape != (len(self.image_paths),):
      raise ValueError(
          f"TargetPool has {len(self.image_paths)} image paths but labels of shape "
          f"{labels.shape}; give one label per image."
      )
    if labels.size and (labels.min() < -1 or labels.max() >= len(self.class_names)):
      raise ValueError(f"TargetPool labels must lie in [-1, {len(self.class_names)}) to index " "class_names.")
    ids = np.arange(len(labels)) if self.ids is None else np.asarray(self.ids, np.int64)
    if ids.shape != labels.shape:
      raise ValueError("TargetPool.ids must have one id per image.")
    object.__setattr__(self, "labels", labels)
    object.__setattr__(self, "ids", ids)
    object.__setattr__(self, "image_paths", tuple(self.image_paths))
    object.__setattr__(self, "class_names", tuple(self.class_names))

  @classmethod
  def from_records(cls, records: RecordSource, class_names: Sequence[str]) -> TargetPool:
    """Reads `image_path`, `label` and `id` of every record of a labelled source."""
    rows = [records[i] for i in range(len(records))]
    return cls(
        image_paths=[str(r["image_path"]) for r in rows],
        labels=np.array([int(r["label"]) for r in rows], np.int64),
        class_names=class_names,
        ids=np.array([int(r["id"]) for r in rows], np.int64),
    )


@dataclasses.dataclass(frozen=True)
class PoisonTarget:
  """One target of the targeted attack."""

  image_path: str
  pool_index: int  # position in the TargetPool
  pool_id: int  # id in the held-out split
  true_label: int
  true_class: str
  adversarial_label: int  # index into the TargetPool's class_names
  adversarial_class: str
  poison_ids: tuple[int, ...]  # ids of the appended (target image, caption) pairs


@dataclasses.dataclass(frozen=True)
class PoisonInfo:
  """Which training examples were poisoned, and how; written by the trainer to the workdir."""

  seed: int
  num_clean_examples: int
  targeted_ids: tuple[int, ...] = ()
  backdoor_ids: tuple[int, ...] = ()
  targets: tuple[PoisonTarget, ...] = ()
  backdoor_target_class: str | None = None
  backdoor_trigger: str | None = None
  # The `optimized` trigger's `patch_file_info` (file, pixels' SHA-256, the optimiser's metadata).
  backdoor_patch: dict[str, Any] | None = None

  @property
  def poisoned_ids(self) -> tuple[int, ...]:
    return tuple(sorted(self.targeted_ids + self.backdoor_ids))

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), indent=1)

  @classmethod
  def from_json(cls, text: str) -> PoisonInfo:
    fields = json.loads(text)
    fields["targets"] = tuple(PoisonTarget(**{**t, "poison_ids": tuple(t["poison_ids"])}) for t in fields["targets"])
    fields["targeted_ids"] = tuple(fields["targeted_ids"])
    fields["backdoor_ids"] = tuple(fields["backdoor_ids"])
    return cls(**fields)


class PoisonedSource:
  """The clean source with some records replaced (backdoor) and some appended (targeted).

  Lazy: the base's records are read only when asked for, and a backdoored record gets its new
  caption and `poisoned=1` as it is read, looked up by its id. What it holds is proportional to the
  number of poisons, not to the source. Random access and picklable, like the source it wraps, so
  grain can shuffle and shard it; `metadata()` describes it without reading an image.
  """

  def __init__(self, base: RecordSource, replaced: Mapping[int, str | None], appended: Sequence[Mapping[str, Any]]):
    """`replaced`: example id -> new caption (None keeps the caption); `appended`: new records."""
    self._base = base
    self._num_base = len(base)
    self._replaced = {int(k): v for k, v in replaced.items()}
    self._appended = [dict(r) for r in appended]

  def __len__(self) -> int:
    return self._num_base + len(self._appended)

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"PoisonedSource index {index} out of range [0, {len(self)}).")
    if index >= self._num_base:
      return dict(self._appended[index - self._num_base])
    record = dict(self._base[index])
    example_id = int(record["id"])
    if example_id in self._replaced:
      caption = self._replaced[example_id]
      if caption is not None:
        record["caption"] = caption
      record["poisoned"] = np.int8(BACKDOOR)
    return record

  def metadata(self) -> metadata_lib.Metadata:
    """The poisoned source's ids, captions, labels and poisoned flags, from the base's metadata."""
    base = metadata_lib.metadata_of(self._base)
    positions = np.flatnonzero(np.isin(base.ids, np.fromiter(self._replaced, np.int64)))
    poisoned = base.poisoned.copy()
    poisoned[positions] = BACKDOOR
    new_captions = {int(i): self._replaced[int(base.ids[i])] for i in positions}
    captions = metadata_lib.CaptionOverlay(
        base.captions,
        {i: c for i, c in new_captions.items() if c is not None},
        [str(r["caption"]) for r in self._appended],
    )
    appended = lambda key, dtype: np.array([int(r[key]) for r in self._appended], dtype)
    return metadata_lib.Metadata(
        ids=np.concatenate([base.ids, appended("id", np.int64)]),
        captions=captions,
        labels=np.concatenate([base.labels, appended("label", np.int64)]),
        poisoned=np.concatenate([poisoned, appended("poisoned", np.int8)]),
    )

  def __repr__(self) -> str:
    return f"PoisonedSource(base={self._num_base}, replaced={len(self._replaced)}, " f"appended={len(self._appended)})"


def _matching(captions: Sequence[str], name: str) -> np.ndarray:
  pattern = mentions(name)
  return np.array([i for i, c in enumerate(captions) if pattern.search(c)], np.int64)


class CaptionSearch:
  """Which captions mention a class name: `_matching`'s answer from one regex scan over all captions.

  The captions are joined once, separated by NUL (not a word character, never in a class name), so
  that a whole-phrase match can neither span two captions nor see a neighbour's letters in its
  lookarounds: the captions with a match are exactly those `mentions(name).search` matches. On
  millions of captions one scan takes seconds where a Python loop over the captions takes minutes,
  and the attacks scan once per target plus once for the backdoor.
  """

  _SEPARATOR = "\x00"
  _CHUNK = 65536

  def __init__(self, captions: Sequence[str]):
    self._captions = captions
    self._text: str | None = None
    self._starts: np.ndarray | None = None

  def _join(self) -> None:
    n = len(self._captions)
    lengths = np.empty(n, np.int64)
    chunks, captions = [], iter(self._captions)
    for start in range(0, n, self._CHUNK):
      part = [next(captions) for _ in range(min(self._CHUNK, n - start))]
      lengths[start : start + len(part)] = [len(c) for c in part]
      chunks.append(self._SEPARATOR.join(part))
    self._text = self._SEPARATOR.join(chunks)
    self._starts = np.concatenate([[0], np.cumsum(lengths + 1)[:-1]]).astype(np.int64)

  def matching(self, name: str) -> np.ndarray:
    """Positions (ascending, int64) of the captions that `mentions(name)` matches."""
    if not name.strip() or self._SEPARATOR in name:
      return _matching(self._captions, name)  # The join's guarantee needs a non-empty NUL-free name.
    if self._text is None:
      self._join()
    found = np.fromiter((m.start() for m in mentions(name).finditer(self._text)), np.int64)
    return np.unique(np.searchsorted(self._starts, found, side="right") - 1).astype(np.int64)


def _targeted(
    table: metadata_lib.Metadata,
    search: CaptionSearch,
    pool: TargetPool,
    cfg: ml_collections.ConfigDict,
    seed: int,
    first_new_id: int,
) -> tuple[list[PoisonTarget], list[dict[str, Any]]]:
  """Targets, adversarial classes and the appended poison records.

  The attack: docs/attacks_and_metrics.md, section 2.
  """
  tc = cfg.targeted
  rng = np.random.default_rng([seed, _STREAM_TARGETED])
  labelled = np.flatnonzero(pool.labels >= 0)
  if tc.num_targets > labelled.size:
    raise ValueError(
        f"poison.targeted.num_targets={tc.num_targets} but the target pool has only "
        f"{labelled.size} labelled images; lower num_targets or use a larger split."
    )
  allowed = list(tc.adversarial_classes) or list(pool.class_names)
  unknown = [c for c in allowed if c not in pool.class_names]
  if unknown:
    raise ValueError(f"poison.targeted.adversarial_classes {unknown} are not class names of the " "target pool.")
  picked = rng.choice(labelled, size=tc.num_targets, replace=False)
  targets, records, used = [], [], set()
  next_id = first_new_id
  for index in picked:
    true_label = int(pool.labels[index])
    true_class = pool.class_names[true_label]
    # One target per adversarial class, as in RoCLIP's lists; never the target's own class.
    candidates = [c for c in allowed if c != true_class and c not in used]
    if not candidates:
      raise ValueError(
          f"No adversarial class is left for target {len(targets)} (true class {true_class!r}): "
          "each target needs an allowed class that is neither its own nor another target's; "
          "allow more classes in poison.targeted.adversarial_classes or lower num_targets."
      )
    adversarial = candidates[int(rng.integers(len(candidates)))]
    used.add(adversarial)
    matches = search.matching(adversarial)
    if matches.size < tc.poisons_per_target:
      raise ValueError(
          f"Only {matches.size} training captions mention {adversarial!r} but "
          f"poison.targeted.poisons_per_target={tc.poisons_per_target}; lower it, or restrict "
          "poison.targeted.adversarial_classes to classes the captions mention often enough."
      )
    chosen = rng.choice(matches, size=tc.poisons_per_target, replace=False)
    ids = tuple(range(next_id, next_id + tc.poisons_per_target))
    next_id += tc.poisons_per_target
    for new_id, caption_index in zip(ids, chosen):
      records.append(
          {
              "id": np.int64(new_id),
              "image_path": pool.image_paths[index],
              "caption": table.captions[caption_index],
              # A web pair carries no label; no label-based consumer should train on it.
              "label": np.int64(-1),
              "poisoned": np.int8(TARGETED),
          }
      )
    targets.append(
        PoisonTarget(
            image_path=pool.image_paths[index],
            pool_index=int(index),
            pool_id=int(pool.ids[index]),
            true_label=true_label,
            true_class=true_class,
            adversarial_label=pool.class_names.index(adversarial),
            adversarial_class=adversarial,
            poison_ids=ids,
        )
    )
  return targets, records


def _backdoor(
    table: metadata_lib.Metadata,
    search: CaptionSearch,
    class_names: Sequence[str] | None,
    cfg: ml_collections.ConfigDict,
    seed: int,
) -> dict[int, str | None]:
  """Base position -> new caption (None: kept) of the backdoored examples.

  The attack: docs/attacks_and_metrics.md, section 3.
  """
  bd = cfg.backdoor
  rng = np.random.default_rng([seed, _STREAM_BACKDOOR])
  num = round(bd.rate * len(table.ids)) if bd.rate > 0 else bd.num_poisons
  mentioning = np.zeros(len(table.ids), bool)
  mentioning[search.matching(bd.target_class)] = True
  if bd.selection == "label_consistent":
    candidates = np.flatnonzero(mentioning)
    what = f"examples whose caption mentions {bd.target_class!r}"
  else:
    # "Not of the target class": neither labelled as it nor already captioned with it.
    of_target = mentioning.copy()
    if class_names is not None and bd.target_class in class_names:
      of_target |= table.labels == list(class_names).index(bd.target_class)
    candidates = np.flatnonzero(~of_target)
    what = f"examples not of the class {bd.target_class!r}"
  if num > candidates.size:
    raise ValueError(
        f"The backdoor needs {num} poisons but there are only {candidates.size} "
        f"{what}; lower poison.backdoor.num_poisons/rate."
    )
  chosen = np.sort(rng.choice(candidates, size=num, replace=False))
  if bd.selection == "label_consistent":
    return {int(i): None for i in chosen}
  if bd.caption_source == "templates":
    pool = [t.format(bd.target_class) for t in templates_lib.OPENAI_IMAGENET_TEMPLATES]
  else:
    # Positions, not strings: only the `num` drawn captions are ever decoded.
    mentioning_positions = np.flatnonzero(mentioning)
    if not mentioning_positions.size:
      raise ValueError(
          f"No training caption mentions {bd.target_class!r}, so "
          "poison.backdoor.caption_source='train' has nothing to draw from; use "
          "'templates' or another target_class."
      )
    pool = _PositionedCaptions(table.captions, mentioning_positions)
  picks = rng.integers(len(pool), size=num)
  return {int(i): pool[p] for i, p in zip(chosen, picks)}


class _PositionedCaptions:
  """The captions at some positions of a caption column, as a sequence (decoded when indexed)."""

  def __init__(self, captions: Sequence[str], positions: np.ndarray):
    self._captions, self._positions = captions, positions

  def __len__(self) -> int:
    return len(self._positions)

  def __getitem__(self, index: int) -> str:
    return self._captions[int(self._positions[int(index)])]


def _class_names_of(held_out: Any) -> tuple[str, ...] | None:
  return None if held_out is None else tuple(held_out.class_names)


def _as_target_pool(held_out: Any) -> TargetPool:
  """A TargetPool, or one built from an eval set that carries `image_paths`."""
  if isinstance(held_out, TargetPool):
    return held_out
  if held_out is None or getattr(held_out, "image_paths", None) is None:
    raise ValueError(
        "poison.targeted is enabled but the held-out split given has no image paths, and the "
        "poisons are (target image path, caption) records; pass "
        "TargetPool.from_records(<eval split source>, class_names) instead."
    )
  return TargetPool(
      image_paths=held_out.image_paths,
      labels=held_out.labels,
      class_names=held_out.class_names,
      ids=getattr(held_out, "ids", None),
  )


def poison_source(
    base_source: RecordSource, held_out: TargetPool | Any | None, cfg: ml_collections.ConfigDict, seed: int
) -> tuple[RecordSource, PoisonInfo]:
  """Applies the configured attacks to a clean training source.

  Args:
    base_source: clean training records (`id`, `image_path`, `caption`, `label`, `poisoned`).
    held_out: the held-out labelled split: a TargetPool, or an eval set with `image_paths`,
      `labels`, `class_names` (and `ids`). The targeted attack draws its targets from it
      (required then); its class names also let the backdoor's `random` selection skip examples
      labelled with the target class. An eval set without image paths is enough for a backdoor.
    cfg: the `config.poison` block (`default_config()`).
    seed: the attack seed; the same seed gives the same poisons, captions and trigger.

  Returns:
    The poisoned source (the base source itself when nothing is enabled) and its PoisonInfo.
  """
  validate_config(cfg)
  seed = int(seed)
  clean = PoisonInfo(seed=seed, num_clean_examples=len(base_source))
  use_targeted = cfg.enabled and cfg.targeted.enabled and cfg.targeted.num_targets > 0
  use_backdoor = cfg.enabled and cfg.backdoor.enabled
  if not (use_targeted or use_backdoor):
    return base_source, clean
  target_pool = _as_target_pool(held_out) if use_targeted else None
  # Captions, labels and ids only: no image is read (data/metadata.py).
  table = metadata_lib.metadata_of(base_source)
  if len(np.unique(table.ids)) != len(table.ids):
    raise ValueError("The clean source has duplicate ids; poisoned examples are tracked by id.")

  search = CaptionSearch(table.captions)
  targets, appended = [], []
  if use_targeted:
    first_new_id = int(table.ids.max()) + 1 if len(table.ids) else 0
    targets, appended = _targeted(table, search, target_pool, cfg, seed, first_new_id)
  replaced = {}
  if use_backdoor:
    replaced = {
        int(table.ids[i]): caption
        for i, caption in _backdoor(table, search, _class_names_of(held_out), cfg, seed).items()
    }

  info = dataclasses.replace(
      clean,
      targeted_ids=tuple(int(r["id"]) for r in appended),
      backdoor_ids=tuple(sorted(replaced)),
      targets=tuple(targets),
      backdoor_target_class=cfg.backdoor.target_class if use_backdoor else None,
      backdoor_trigger=cfg.backdoor.trigger if use_backdoor else None,
      backdoor_patch=(
          patch_file_info(cfg.backdoor.patch_file) if use_backdoor and cfg.backdoor.trigger == "optimized" else None
      ),
  )
  return PoisonedSource(base_source, replaced, appended), info
