"""A built-in, procedurally drawn image-caption dataset (no downloads).

Each class is a "<colour> <shape>" (e.g. "red circle"), drawn at a random
size, position, rotation and shade over a random muted texture, and
captioned with varied sentences that always contain the class name as a
whole phrase (the poisoning code finds class names with `\\b<name>\\b`).
The task is learnable in minutes on a CPU but not trivial: the shape has to
be told apart from the texture, and the random-resized-crop can cut it.

Layout of the root directory (written atomically: generated into a temporary
sibling directory, then `os.replace`d into place, so racing processes are
safe and a crash never leaves a half-written dataset behind):

  train.csv, test.csv   columns image_path,caption,label (paths relative)
  classes.json          {"classes": [...], "templates": [...]}
  params.json           the generation parameters (marks a complete dataset)
  train/*.png, test/*.png
"""

from __future__ import annotations

from collections.abc import Mapping
import csv
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageDraw

from roclip_jax.data import digits

DATASET_VERSION = "demo_v1"

COLOURS = ("red", "green", "blue", "yellow")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring")

# Per-channel uniform ranges of each object colour: saturated, so that the
# colour stands out from the muted backgrounds even after colour jitter.
_COLOUR_RANGES = {
    "red": ((175, 255), (0, 60), (0, 60)),
    "green": ((0, 60), (150, 235), (0, 70)),
    "blue": ((0, 60), (30, 110), (175, 255)),
    "yellow": ((195, 255), (180, 240), (0, 60)),
}


def _class_order() -> tuple[str, ...]:
  # Diagonal order through the colour x shape grid, so that any prefix (a
  # small `num_classes`) mixes colours and shapes instead of being all red.
  names = []
  for diagonal in range(len(SHAPES)):
    for c, colour in enumerate(COLOURS):
      names.append(f"{colour} {SHAPES[(c + diagonal) % len(SHAPES)]}")
  return tuple(names)


CLASS_NAMES: tuple[str, ...] = _class_order()

# Zero-shot prompt templates stored in classes.json.
TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a drawing of a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a rendering of a {}.",
    "a small {}.",
    "a large {}.",
    "a {} on a textured background.",
)

# Training caption templates. {name} is the class phrase; {size}, {pos} and
# {bg} describe this drawing (size may be empty).
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a {size} {name} on a {bg} background",
    "photo of a {name} {pos}",
    "there is a {size} {name} here.",
    "a {name} {pos}, on a {bg} background",
    "an image showing a {size} {name} {pos}.",
    "{size} {name} over a {bg} pattern",
    "the {name} is {pos}",
    "a picture of one {name} on a {bg} texture",
    "close-up of a {size} {name}",
    "a {bg} background with a {name} {pos}",
    "look, a {name}!",
    "a {size} {name} drawn {pos}",
    "a simple {name} shape {pos}",
    "an illustration of a {size} {name}",
    "my favourite {name}",
    "a {name} floating {pos} over a {bg} surface",
    "this is a {name} on a {bg} backdrop.",
    "somebody drew a {size} {name} {pos}",
    "clip art of a {name}",
    "one {size} {name}, {bg} background",
    "{name} icon on a {bg} background",
    "a quick sketch: a {name} {pos}",
    "a {size} {name} sitting {pos} of the picture",
    "the picture shows a {name} on a {bg} background",
)

_SMALL_WORDS = ("small", "tiny", "little")
_MEDIUM_WORDS = ("medium-sized", "mid-sized", "")
_LARGE_WORDS = ("large", "big", "huge")
# Indexed [row][col] by the object's centre in thirds of the image.
_POSITION_PHRASES = (
    ("in the top left", "at the top", "in the top right"),
    ("on the left", "in the center", "on the right"),
    ("in the bottom left", "at the bottom", "in the bottom right"),
)
BACKGROUNDS = ("noisy", "striped", "gradient", "checkered", "mottled")

_SUPERSAMPLE = 4  # Shapes are drawn at 4x and box-filtered: anti-aliasing.
_DEFAULTS = dict(num_classes=24, train_per_class=250, test_per_class=50, image_size=32, seed=0)
# What the set draws: 'shapes' ("<colour> <shape>", the default) or 'digits' (handwritten digits,
# `roclip_jax/data/digits.py`: the robustness benchmark's set).
KINDS = ("shapes", "digits")
_SPLIT_SEED_TAG = {"train": 0, "test": 1}


# ------------------------------------------------------------------ shapes


def _unit_polygon(shape: str) -> list[np.ndarray]:
  """Polygons of a shape around the origin with radius ~1; holes follow."""

  def circle(radius: float) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    return radius * np.stack([np.cos(t), np.sin(t)], -1)

  if shape == "circle":
    return [circle(1.0)]
  if shape == "ring":
    return [circle(1.0), circle(0.55)]
  if shape == "square":
    t = np.pi / 4 + np.arange(4) * np.pi / 2
    return [0.9 * np.stack([np.cos(t), np.sin(t)], -1)]
  if shape == "triangle":
    t = -np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    return [np.stack([np.cos(t), np.sin(t)], -1)]
  if shape == "star":
    t = -np.pi / 2 + np.arange(10) * np.pi / 5
    radius = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return [radius[:, None] * np.stack([np.cos(t), np.sin(t)], -1)]
  if shape == "cross":
    w = 0.32
    return [
        np.array(
            [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
        )
    ]
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _shape_alpha(shape: str, size: int, centre: tuple[float, float], radius: float, angle: float) -> np.ndarray:
  """Anti-aliased coverage mask in [0, 1] of one rotated, placed shape."""
  big = size * _SUPERSAMPLE
  mask = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(mask)
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  for k, poly in enumerate(_unit_polygon(shape)):
    points = (poly @ rotation.T * radius + np.asarray(centre)) * _SUPERSAMPLE
    # The first polygon is the body, later ones are holes.
    draw.polygon([tuple(p) for p in points], fill=255 if k == 0 else 0)
  mask = mask.resize((size, size), Image.Resampling.BOX)
  return np.asarray(mask, np.float32)[..., None] / 255.0


# ------------------------------------------------------------- backgrounds


def _muted_colour(rng: np.random.Generator, level: float) -> np.ndarray:
  return level + rng.uniform(-18, 18, size=3)


def _background(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
  """A float32 [size, size, 3] texture in low-saturation colours."""
  level = rng.uniform(60, 190)
  other = np.clip(level + rng.choice([-1, 1]) * rng.uniform(30, 65), 30, 225)
  colour_a, colour_b = _muted_colour(rng, level), _muted_colour(rng, other)
  y, x = np.mgrid[0:size, 0:size].astype(np.float32) * (32.0 / size)
  angle = rng.uniform(0, np.pi)
  along = x * np.cos(angle) + y * np.sin(angle)
  if kind == "noisy":
    noise = rng.normal(0, 14, (size, size, 1)) + rng.normal(0, 4, (size, size, 3))
    return colour_a + noise
  if kind == "striped":
    mix = ((along / rng.uniform(3, 8)) % 1.0 < 0.5).astype(np.float32)
  elif kind == "gradient":
    mix = (along - along.min()) / max(float(np.ptp(along)), 1e-6)
  elif kind == "checkered":
    cell = rng.uniform(3, 8)
    mix = ((np.floor(x / cell) + np.floor(y / cell)) % 2).astype(np.float32)
  elif kind == "mottled":
    coarse = rng.uniform(0, 1, (5, 5)).astype(np.float32)
    mix = np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))
    mix = np.clip(mix, 0, 1)
  else:
    raise ValueError(f"Unknown background {kind!r}; expected {BACKGROUNDS}.")
  return colour_a + mix[..., None] * (colour_b - colour_a)


# ---------------------------------------------------------------- examples


def draw_example(label: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, str]:
  """Draws one image of class `label` and writes a caption for it."""
  colour, shape = CLASS_NAMES[label].split(" ")
  background = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
  image = _background(background, size, rng)

  extent = rng.uniform(0.3, 0.8)  # Diameter as a fraction of the image.
  radius = extent * size / 2
  margin = 0.8 * radius  # Lets the shape touch the border, rarely leave it.
  centre = (rng.uniform(margin, size - margin), rng.uniform(margin, size - margin))
  alpha = _shape_alpha(shape, size, centre, radius, rng.uniform(0, 2 * np.pi))
  fill = np.array([rng.uniform(lo, hi) for lo, hi in _COLOUR_RANGES[colour]])
  image = image * (1 - alpha) + fill * alpha
  image += rng.normal(0, 3, image.shape)  # Sensor-like grain everywhere.
  pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)

  if extent < 0.45:
    size_word = _SMALL_WORDS[rng.integers(len(_SMALL_WORDS))]
  elif extent > 0.65:
    size_word = _LARGE_WORDS[rng.integers(len(_LARGE_WORDS))]
  else:
    size_word = _MEDIUM_WORDS[rng.integers(len(_MEDIUM_WORDS))]
  row, col = (min(int(3 * v / size), 2) for v in (centre[1], centre[0]))
  template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  caption = template.format(name=CLASS_NAMES[label], size=size_word, pos=_POSITION_PHRASES[row][col], bg=background)
  return pixels, " ".join(caption.split())


def possible_captions() -> list[str]:
  """Every caption `draw_example` can write, sorted (the tokenizer's test and benchmark corpus)."""
  size_words = _SMALL_WORDS + _MEDIUM_WORDS + _LARGE_WORDS
  positions = [phrase for row in _POSITION_PHRASES for phrase in row]
  captions = {
      " ".join(template.format(name=name, size=size, pos=pos, bg=background).split())
      for template in CAPTION_TEMPLATES
      for name in CLASS_NAMES
      for size in size_words
      for pos in positions
      for background in BACKGROUNDS
  }
  return sorted(captions)


# --------------------------------------------------------------- the files


def _param(demo_cfg: Any, name: str, default: Any) -> Any:
  """Reads a field from a ConfigDict, a mapping or an object; None -> default."""
  if isinstance(demo_cfg, Mapping) or hasattr(demo_cfg, "get"):
    value = demo_cfg.get(name, None)
  else:
    value = getattr(demo_cfg, name, None)
  return default if value is None else value


def generation_params(demo_cfg: Any) -> dict[str, int | str]:
  """The parameters that determine the dataset's bytes (validated)."""
  params: dict[str, int | str] = {"version": DATASET_VERSION}
  kind = str(_param(demo_cfg, "kind", "shapes"))
  if kind not in KINDS:
    raise ValueError(f"config.data.demo.kind={kind!r} is unknown; use one of {KINDS}.")
  if kind != "shapes":  # Absent for shapes: the shapes set's parameters (and directory hash) stay as they were.
    params["kind"] = kind
    params["version"] = digits.DATASET_VERSION
  for name in ("num_classes", "train_per_class", "test_per_class", "image_size", "seed"):
    params[name] = int(_param(demo_cfg, name, _DEFAULTS[name]))
  names = class_names(params)
  if not 1 <= params["num_classes"] <= len(names):
    raise ValueError(
        f"config.data.demo.num_classes={params['num_classes']} is out of "
        f"range; the {kind} demo dataset has 1..{len(names)} classes."
    )
  for name in ("train_per_class", "test_per_class"):
    if params[name] < 1:
      raise ValueError(f"config.data.demo.{name}={params[name]} must be >= 1.")
  if params["image_size"] < 8:
    raise ValueError(
        f"config.data.demo.image_size={params['image_size']} is too small to " "draw shapes; use >= 8 (default 32)."
    )
  return params


def class_names(params: Mapping[str, Any]) -> tuple[str, ...]:
  """Every class the set of these generation parameters can draw, in label order."""
  return _drawing(params)[0]


def _drawing(params: Mapping[str, Any]):
  """(class names, zero-shot templates, draw(label, size, rng) -> (pixels, caption)) of the set's kind."""
  if params.get("kind", "shapes") == "digits":
    return (
        digits.CLASS_NAMES,
        digits.TEMPLATES,
        lambda label, size, rng: digits.draw_example(label, size, rng, _background),
    )
  return CLASS_NAMES, TEMPLATES, draw_example


def default_root(params: dict[str, int | str]) -> str:
  """$ROCLIP_DATA_DIR (else ~/.cache/roclip_jax)/demo_v1-<params hash>."""
  digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
  base = os.environ.get("ROCLIP_DATA_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "roclip_jax")
  return os.path.join(base, f"{params.get('version', DATASET_VERSION)}-{digest}")


def _write_split(root: str, split: str, params: dict[str, Any]) -> None:
  size = params["image_size"]
  per_class = params[f"{split}_per_class"]
  draw = _drawing(params)[2]
  os.makedirs(os.path.join(root, split))
  rows = []
  # Index-major order: any prefix of the CSV is class balanced.
  for index in range(per_class):
    for label in range(params["num_classes"]):
      rng = np.random.default_rng([params["seed"], _SPLIT_SEED_TAG[split], label, index])
      pixels, caption = draw(label, size, rng)
      rel_path = f"{split}/{label:02d}_{index:05d}.png"
      Image.fromarray(pixels).save(os.path.join(root, rel_path), format="PNG")
      rows.append((rel_path, caption, label))
  with open(os.path.join(root, f"{split}.csv"), "w", newline="", encoding="utf-8") as f:
    writer = csv.writer(f, lineterminator="\n")
    writer.writerow(("image_path", "caption", "label"))
    writer.writerows(rows)


def _is_complete(root: str) -> bool:
  return os.path.isfile(os.path.join(root, "params.json"))


def _generate(root: str, params: dict[str, Any]) -> None:
  """Writes the dataset into a temporary sibling, then renames it to root."""
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  logging.info("Generating the demo dataset %s into %s", params, root)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    for split in ("train", "test"):
      _write_split(tmp, split, params)
    names, templates, _ = _drawing(params)
    classes = {"classes": list(names[: params["num_classes"]]), "templates": list(templates)}
    with open(os.path.join(tmp, "classes.json"), "w", encoding="utf-8") as f:
      json.dump(classes, f, indent=1)
    # Written last: its presence marks a complete dataset.
    with open(os.path.join(tmp, "params.json"), "w", encoding="utf-8") as f:
      json.dump(params, f, indent=1, sort_keys=True)
    os.chmod(tmp, 0o755)  # mkdtemp creates it private.
    try:
      os.replace(tmp, root)  # Atomic; also succeeds over an empty directory.
    except OSError:
      if not _is_complete(root):  # Not a lost race with another process.
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)


def ensure_demo_dataset(demo_cfg: Any) -> str:
  """Generates the demo dataset if it is not there yet; returns its root.

  `demo_cfg` is `config.data.demo` (fields root, num_classes,
  train_per_class, test_per_class, image_size, seed; missing ones take the
  defaults). An empty root means `default_root(params)`, whose name carries a
  hash of the parameters, so changed parameters generate a new dataset. An
  explicit root holding a dataset made with other parameters is an error.
  Idempotent and safe when several processes call it at once.
  """
  params = generation_params(demo_cfg)
  root = _param(demo_cfg, "root", "") or default_root(params)
  root = os.path.abspath(os.path.expanduser(str(root)))
  if not _is_complete(root):
    _generate(root, params)
  with open(os.path.join(root, "params.json"), encoding="utf-8") as f:
    existing = json.load(f)
  if existing != params:
    raise ValueError(
        f"The demo dataset at {root} was generated with {existing}, but the "
        f"config asks for {params}. Delete that directory or point "
        "config.data.demo.root elsewhere (an empty root picks a "
        "per-parameter directory automatically)."
    )
  return root
