"""Image decoding and CLIP's evaluation preprocessing (numpy / PIL).

`normalize` is written with plain array arithmetic so the same function works
on numpy arrays on the host and on jax arrays inside `jax.jit` (the trainer
normalises on device, so the host ships compact uint8 batches).
"""
from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = np.asarray(CLIP_MEAN, np.float32)
_STD = np.asarray(CLIP_STD, np.float32)

# Refuse decompression bombs: PIL only warns between 1x and 2x this limit.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Everything PIL raises for missing, unreadable, truncated or absurd files.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, MemoryError,
                  Image.DecompressionBombError)


def decode_image(path_or_bytes: str | os.PathLike[str] | bytes
                 ) -> np.ndarray | None:
  """Decodes an image file (or encoded bytes) to uint8 RGB [H, W, 3].

  Returns None instead of raising when the file is missing, corrupt,
  truncated or larger than `MAX_IMAGE_PIXELS`, so one bad file in a web-scale
  CSV does not stop training; callers count and log the skip.
  """
  source: Any = (io.BytesIO(path_or_bytes)
                 if isinstance(path_or_bytes, (bytes, bytearray))
                 else path_or_bytes)
  try:
    with Image.open(source) as img:
      width, height = img.size
      if width * height > MAX_IMAGE_PIXELS or width == 0 or height == 0:
        return None
      if img.mode in ("P", "PA"):
        # Palette transparency must go through RGBA before dropping alpha.
        img = img.convert("RGBA")
      rgb = img.convert("RGB")  # Forces the full decode (truncation raises).
      return np.asarray(rgb, np.uint8)
  except _DECODE_ERRORS:
    return None


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """CLIP eval preprocessing: shorter side to `size` (bicubic), centre crop.

  Matches torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` geometry:
  the long side becomes `int(size * long / short)` and the crop offset is
  `round((dim - size) / 2)`.
  """
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"resize_center_crop expects uint8 [H, W, 3], got {image.dtype} "
        f"{image.shape}; decode with decode_image() first.")
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}; check "
                     "config.model.image.image_size.")
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  if height <= width:
    new_h, new_w = size, int(size * width / height)
  else:
    new_h, new_w = int(size * height / width), size
  if (new_h, new_w) != (height, width):
    resized = Image.fromarray(image).resize((new_w, new_h),
                                            Image.Resampling.BICUBIC)
    image = np.asarray(resized, np.uint8)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return image[top:top + size, left:left + size]


def normalize(images: Any) -> Any:
  """uint8 NHWC (numpy or jax) -> float32 NHWC with CLIP's mean/std."""
  return (images.astype(np.float32) / 255.0 - _MEAN) / _STD
