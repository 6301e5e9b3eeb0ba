"""Image reading and decoding, and CLIP's evaluation preprocessing (numpy / PIL).

Reading an image separates two kinds of failure:

* Bad data: the bytes are there but are not a decodable image (truncated,
  corrupt, not an image, zero size, a decompression bomb), or the path a CSV
  row names does not exist. `decode_image` returns None; the pipeline skips
  the example and counts it, so one bad file in a web-scale CSV does not stop
  training.
* Storage faults: reading bytes that exist fails (EIO, a stale NFS handle, a
  GCS fuse mount going away, permissions, timeouts; any OSError other than
  "no such file" / "is a directory"), or the host runs out of memory. Such
  a fault says nothing about the example, so skipping it would silently drop
  data (a whole host slice, during an outage). `call_with_retries` retries it
  with exponential backoff and then raises `StorageError`, which stops the
  run (the trainer checkpoints first, so a rerun resumes where it stopped).

`normalize` is written with plain array arithmetic so the same function works
on numpy arrays on the host and on jax arrays inside `jax.jit` (the trainer
normalises on device, so the host ships compact uint8 batches).
"""

from __future__ import annotations

from collections.abc import Callable
import io
import os
import time
from typing import Any, TypeVar

from absl import logging
import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_MEAN = np.asarray(CLIP_MEAN, np.float32)
_STD = np.asarray(CLIP_STD, np.float32)

# Refuse decompression bombs: PIL only warns between 1x and 2x this limit.
MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485

# Everything PIL raises for bytes that are truncated, corrupt or not an image.
# Decoding reads from memory, so an OSError here is about the content, not the
# storage. MemoryError is left out on purpose: it is the host, not the image.
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)
# A path that names nothing readable as a file: bad data, like a corrupt file.
_MISSING_ERRORS = (FileNotFoundError, IsADirectoryError, NotADirectoryError)
# What `call_with_retries` treats as a (possibly transient) storage fault.
STORAGE_FAULTS = (OSError, MemoryError)

# Defaults of config.data.io_retries / io_retry_base_seconds: retries after
# the first failure, waiting base * 2**k before retry k (0.5 s .. 8 s, 15.5 s
# in all), long enough to ride out a mount or network blip.
IO_RETRIES = 5
IO_RETRY_BASE_SECONDS = 0.5
# Module-level so tests can replace the wait without sleeping for real.
_sleep = time.sleep

_T = TypeVar("_T")


class StorageError(RuntimeError):
  """Reading training data failed at the storage layer, even after retries.

  Not an OSError on purpose: nothing that handles OSError (or skips bad data)
  may swallow it. Built from one message string, so it pickles and grain can
  re-raise it from a worker process in the trainer.
  """


def call_with_retries(
    fn: Callable[[], _T], *, what: str, retries: int = IO_RETRIES, base_seconds: float = IO_RETRY_BASE_SECONDS
) -> _T:
  """`fn()`, retried with exponential backoff on `STORAGE_FAULTS`.

  `fn` must raise an OSError or MemoryError only for a storage fault (see the
  module docstring); anything else propagates at once. After `retries`
  retries the last fault becomes a `StorageError` naming `what`, the error
  and the fix.
  """
  retries = max(0, int(retries))
  attempt, waited = 0, 0.0
  while True:
    try:
      return fn()
    except STORAGE_FAULTS as e:
      if attempt >= retries:
        raise StorageError(
            f"Storage fault reading {what}: {type(e).__name__}: {e} (failed "
            f"{attempt + 1} time(s) over {waited:.1f}s of retries). This is "
            "not bad data, so it is not skipped: check the storage mount "
            "(NFS / GCS fuse), its credentials and permissions, and the "
            "network, then rerun with the same workdir; training resumes from "
            "its last checkpoint. config.data.io_retries and "
            "config.data.io_retry_base_seconds set how long to retry."
        ) from e
      delay = float(base_seconds) * 2**attempt
      logging.warning(
          "Storage fault reading %s (attempt %d of %d): %s: %s; " "retrying in %.1fs.",
          what,
          attempt + 1,
          retries + 1,
          type(e).__name__,
          e,
          delay,
      )
      _sleep(delay)
      attempt, waited = attempt + 1, waited + delay


def read_file_bytes(path: str | os.PathLike[str]) -> bytes | None:
  """The bytes of the file at `path`, or None if no such file exists.

  A missing file (or a directory) is bad data; every other OSError (EIO,
  permissions, a stale handle, a timeout) propagates as a storage fault.
  """
  try:
    with open(path, "rb") as f:
      return f.read()
  except _MISSING_ERRORS:
    return None


def decode_image_bytes(data: bytes) -> np.ndarray | None:
  """Decodes encoded image bytes to uint8 RGB [H, W, 3]; None if they are bad.

  None for truncated, corrupt or empty bytes, non-images and images larger
  than `MAX_IMAGE_PIXELS`. MemoryError propagates (a host fault).
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      width, height = img.size
      if width * height > MAX_IMAGE_PIXELS or width == 0 or height == 0:
        return None
      if img.mode in ("P", "PA"):
        # Palette transparency must go through RGBA before dropping alpha.
        img = img.convert("RGBA")
      # convert('RGB') of an RGB image would only copy it.
      rgb = img if img.mode == "RGB" else img.convert("RGB")
      rgb.load()  # Forces the full decode (truncation raises).
      return np.asarray(rgb, np.uint8)
  except _DECODE_ERRORS:
    return None


def decode_image(
    path_or_bytes: str | os.PathLike[str] | bytes,
    *,
    retries: int = IO_RETRIES,
    retry_base_seconds: float = IO_RETRY_BASE_SECONDS,
    name: str = "",
) -> np.ndarray | None:
  """Reads and decodes an image file (or encoded bytes) to uint8 RGB [H, W, 3].

  Returns None for bad data: a missing file, or bytes that are corrupt,
  truncated, empty or larger than `MAX_IMAGE_PIXELS`; callers count and log
  the skip. Raises `StorageError` when reading fails for another reason even
  after `retries` retries with backoff from `retry_base_seconds` (see
  `call_with_retries`); its message names the file, or `name` for bytes.
  """
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    data = bytes(path_or_bytes)
    return call_with_retries(
        lambda: decode_image_bytes(data),
        what=f"the encoded image of {name or 'a record'}",
        retries=retries,
        base_seconds=retry_base_seconds,
    )

  def read_and_decode() -> np.ndarray | None:
    # The bytes are read here, not by PIL, so that an I/O error is told apart
    # from undecodable content.
    data = read_file_bytes(path_or_bytes)
    return None if data is None else decode_image_bytes(data)

  return call_with_retries(
      read_and_decode, what=f"image file {os.fspath(path_or_bytes)!r}", retries=retries, base_seconds=retry_base_seconds
  )


def as_rgb_uint8(image: Any) -> np.ndarray:
  """An in-memory image (e.g. a TFDS feature) as uint8 RGB [H, W, 3]; grayscale is repeated to RGB."""
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim == 3 and image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(f"Expected a uint8 RGB or grayscale image, got {image.dtype} {image.shape}.")
  return image


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """CLIP eval preprocessing: shorter side to `size` (bicubic), centre crop.

  Matches torchvision `Resize(size, BICUBIC)` + `CenterCrop(size)` geometry:
  the long side becomes `int(size * long / short)` and the crop offset is
  `round((dim - size) / 2)`.
  """
  if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8:
    raise ValueError(
        f"resize_center_crop expects uint8 [H, W, 3], got {image.dtype} "
        f"{image.shape}; decode with decode_image() first."
    )
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}; check " "config.model.image.image_size.")
  height, width = image.shape[:2]
  if (height, width) == (size, size):
    return image
  if height <= width:
    new_h, new_w = size, int(size * width / height)
  else:
    new_h, new_w = int(size * height / width), size
  if (new_h, new_w) != (height, width):
    resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
    image = np.asarray(resized, np.uint8)
  top = int(round((new_h - size) / 2.0))
  left = int(round((new_w - size) / 2.0))
  return image[top : top + size, left : left + size]


def normalize(images: Any) -> Any:
  """uint8 NHWC (numpy or jax) -> float32 NHWC with CLIP's mean/std."""
  return (images.astype(np.float32) / 255.0 - _MEAN) / _STD
