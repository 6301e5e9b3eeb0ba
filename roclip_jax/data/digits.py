"""Procedurally handwritten digits: the built-in demo set's `kind='digits'` (no downloads).

Each class is a digit, "zero" ... "nine", drawn as pen strokes through a few
control points that are jittered per image (so no two "seven"s are the same),
smoothed into curves, then slanted, rotated, scaled and placed at random, in a
random ink over a random muted texture (the same textures as the shapes set).
Captions are paraphrases from templated sentences, as web alt-text and the
digit sets of issue 22 are: many captions are identical strings or differ by a
word, which is what RoCLIP's matching has to cope with (docs/roclip.md,
section 8).

What makes it the benchmark's data (docs/roclip.md, section 8): the tiny ViT
learns it to ~95% zero-shot in the benchmark's budget, and the label does not
depend on colour, so the full SimCLR colour augmentation (hue, grayscale) is
label-preserving; flips are not (a mirrored 2 is no digit), so the benchmark
turns them off.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from PIL import ImageDraw

DATASET_VERSION = "digits_v1"  # Part of the set's parameters: a changed drawing gets a new directory.

CLASS_NAMES: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Zero-shot prompt templates stored in classes.json.
TEMPLATES: tuple[str, ...] = (
    "a photo of the number {}.",
    "a handwritten {}.",
    "the digit {}.",
    "an image of the number {}.",
)

# Training caption templates: {name} is the digit's word, {ink} the ink's shade, {bg} the texture.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a handwritten {name}",
    "a handwritten {name}.",
    "the number {name}, written by hand",
    "a photo of a handwritten {name}",
    "the digit {name}",
    "someone wrote a {name}",
    "a {name} scribbled on paper",
    "a scan of the number {name}",
    "a {ink} {name} on a {bg} background",
    "the handwritten digit {name} in {ink} ink",
    "a quick sketch of the number {name}",
    "digit: {name}",
    "a {name}",
    "number {name} written in {ink} ink",
    "a picture of the number {name}",
    "an image of a handwritten {name}.",
)

# Pen strokes of each digit through control points in a unit box (x right, y down), drawn
# through by Catmull-Rom curves: the "typeface" that the per-image jitter turns into handwriting.
_STROKES: dict[int, tuple[tuple[tuple[float, float], ...], ...]] = {
    1: (((0.36, 0.26), (0.52, 0.1), (0.52, 0.9)),),
    2: (((0.26, 0.3), (0.36, 0.14), (0.55, 0.1), (0.72, 0.22), (0.7, 0.42), (0.5, 0.62), (0.25, 0.9), (0.78, 0.9)),),
    3: (
        (
            (0.25, 0.18),
            (0.5, 0.1),
            (0.72, 0.22),
            (0.68, 0.4),
            (0.46, 0.5),
            (0.72, 0.6),
            (0.74, 0.8),
            (0.5, 0.92),
            (0.25, 0.82),
        ),
    ),
    4: (((0.62, 0.9), (0.62, 0.1), (0.22, 0.66), (0.8, 0.66)),),
    5: (((0.75, 0.1), (0.33, 0.1), (0.29, 0.46), (0.55, 0.42), (0.74, 0.58), (0.72, 0.8), (0.5, 0.92), (0.26, 0.84)),),
    6: (
        (
            (0.7, 0.12),
            (0.45, 0.2),
            (0.3, 0.45),
            (0.28, 0.72),
            (0.45, 0.9),
            (0.68, 0.82),
            (0.7, 0.6),
            (0.5, 0.5),
            (0.3, 0.62),
        ),
    ),
    7: (((0.22, 0.12), (0.78, 0.12), (0.52, 0.55), (0.42, 0.9)),),
}


def _loop(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, turns: float = 1.0, points: int = 9):
  t = start + np.linspace(0.0, 2 * np.pi * turns, points)
  return tuple((cx + rx * np.sin(a), cy - ry * np.cos(a)) for a in t)


_STROKES[0] = (_loop(0.5, 0.5, 0.27, 0.4, points=11),)
_STROKES[8] = (_loop(0.5, 0.29, 0.19, 0.19, start=np.pi, points=9) + _loop(0.5, 0.7, 0.23, 0.21, points=9)[1:],)
_STROKES[9] = (_loop(0.48, 0.33, 0.21, 0.22, start=0.5 * np.pi, points=9) + ((0.67, 0.6), (0.62, 0.9)),)

_INK_WORDS = {"dark": ("dark", "black", "dark"), "light": ("light", "white", "pale")}
_SUPERSAMPLE = 4
_TEXTURE_CONTRAST = 0.15


def _catmull_rom(points: np.ndarray, per_segment: int = 8) -> np.ndarray:
  """A smooth curve through `points` [n, 2] (end points repeated)."""
  p = np.concatenate([points[:1], points, points[-1:]])
  t = np.linspace(0.0, 1.0, per_segment, endpoint=False)[:, None]
  out = []
  for i in range(1, len(p) - 2):
    p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
    out.append(
        0.5 * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
    )
  out.append(points[-1:])
  return np.concatenate(out)


def _ink_alpha(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
  """Anti-aliased [size, size, 1] coverage of one handwritten digit."""
  big = size * _SUPERSAMPLE
  scale = rng.uniform(0.7, 0.92) * size
  angle = np.deg2rad(rng.uniform(-10, 10))
  shear = rng.uniform(-0.2, 0.15)
  squeeze = rng.uniform(0.8, 1.15)  # Narrow or wide handwriting.
  slack = (size - scale) / 2
  centre = size / 2 + rng.uniform(-0.5, 0.5, 2) * slack
  rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
  affine = rotation @ np.array([[squeeze, shear], [0.0, 1.0]])
  width = rng.uniform(0.07, 0.13) * scale * _SUPERSAMPLE
  mask = Image.new("L", (big, big), 0)
  draw = ImageDraw.Draw(mask)
  for stroke in _STROKES[label]:
    control = np.asarray(stroke, np.float64) + rng.normal(0.0, 0.035, (len(stroke), 2))
    curve = _catmull_rom(control) - 0.5
    xy = (curve @ affine.T * scale + centre) * _SUPERSAMPLE
    pts = [tuple(p) for p in xy]
    draw.line(pts, fill=255, width=max(int(round(width)), 1), joint="curve")
    r = width / 2  # Round pen ends.
    for x, y in (pts[0], pts[-1]):
      draw.ellipse((x - r, y - r, x + r, y + r), fill=255)
  mask = mask.resize((size, size), Image.Resampling.BOX)
  return np.asarray(mask, np.float32)[..., None] / 255.0


def draw_example(label: int, size: int, rng: np.random.Generator, background) -> tuple[np.ndarray, str]:
  """One image of digit `label` and its caption; `background(kind, size, rng)` draws the texture."""
  from roclip_jax.data import demo  # Its textures; imported here because demo imports this module.

  bg_kind = demo.BACKGROUNDS[rng.integers(len(demo.BACKGROUNDS))]
  image = background(bg_kind, size, rng)
  level = float(np.mean(image))
  # A faint texture (a third of the shapes set's contrast) and ink that contrasts with it: paper and pen,
  # where the shapes set hides its objects in strong textures.
  image = level + _TEXTURE_CONTRAST * (image - level)
  dark = level > 125
  tone = rng.uniform(0, max(level - 110, 5)) if dark else rng.uniform(min(level + 110, 250), 255)
  ink = np.clip(tone + rng.uniform(-45, 45, 3), 0, 255)
  alpha = _ink_alpha(label, size, rng)
  image = image * (1 - alpha) + ink * alpha
  image += rng.normal(0, 3, image.shape)
  pixels = np.clip(np.round(image), 0, 255).astype(np.uint8)
  shade = "dark" if dark else "light"
  words = _INK_WORDS[shade]
  template = CAPTION_TEMPLATES[rng.integers(len(CAPTION_TEMPLATES))]
  caption = template.format(name=CLASS_NAMES[label], ink=words[rng.integers(len(words))], bg=bg_kind)
  return pixels, _articles(caption)


def _articles(caption: str) -> str:
  return caption.replace("a eight", "an eight")


def possible_captions() -> list[str]:
  """Every caption `draw_example` can write, sorted."""
  from roclip_jax.data import demo

  inks = sorted({w for words in _INK_WORDS.values() for w in words})
  return sorted(
      {
          _articles(t.format(name=name, ink=ink, bg=bg))
          for t in CAPTION_TEMPLATES
          for name in CLASS_NAMES
          for ink in inks
          for bg in demo.BACKGROUNDS
      }
  )
