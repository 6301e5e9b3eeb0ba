"""The host image augmentation as it was before issue 25, kept as the reference for the fast one.

`augment.apply_params` computes the same function faster: colour ops in place on contiguous planes,
and the blur as banded matrix products instead of scipy's per-line loop. This module keeps the
previous implementation (the shared float formulas of `augment`, one temporary array per step,
`scipy.ndimage.correlate1d` for the blur), so that

* tests/test_augment.py checks the fast path against it, pixel for pixel;
* `python -m roclip_jax.bench.data --compare` times both in the same process, on the same images.

Nothing in training calls it.
"""

from __future__ import annotations

import ml_collections
import numpy as np
import scipy.ndimage

from roclip_jax.data import augment

_JITTER_OPS = (augment.adjust_brightness, augment.adjust_contrast, augment.adjust_saturation, augment.adjust_hue)


def gaussian_blur(img: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
  """torchvision GaussianBlur of a [..., H, W, C] image: separable Gaussian, reflect padding (scipy's
  'mirror'), float64 sums per line, float32 out of each pass."""
  augment.check_blur(img.shape[-3], img.shape[-2], kernel_size)
  kernel = augment.gaussian_kernel1d(kernel_size, float(sigma))
  img = np.asarray(img, np.float32)
  img = scipy.ndimage.correlate1d(img, kernel, axis=-3, mode='mirror')
  return scipy.ndimage.correlate1d(img, kernel, axis=-2, mode='mirror')


def apply_params(image: np.ndarray, params: augment.AugmentParams, out_size: int) -> np.ndarray:
  """The previous `augment.apply_params`: uint8 [H, W, 3] -> uint8 [out_size, out_size, 3]."""
  augment.check_image(image)
  out = augment.flipped_resized_crop(image, params, out_size)
  if not (params.jitter or params.grayscale or params.blur):
    return np.ascontiguousarray(out)
  img = out.astype(np.float32)
  if params.jitter:
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for op in params.jitter_order:
      if factors[op] != augment.JITTER_IDENTITY[op]:  # torchvision skips a switched-off op
        img = _JITTER_OPS[op](img, factors[op])
  if params.grayscale:
    img = augment.to_grayscale(img)
  if params.blur:
    if params.grayscale:
      # Three equal planes: blur one (the same per-line arithmetic) and repeat it.
      plane = gaussian_blur(np.ascontiguousarray(img[..., :1]), params.blur_sigma, augment.blur_kernel_size(out_size))
      img = np.repeat(plane, 3, axis=-1)
    else:
      img = gaussian_blur(img, params.blur_sigma, augment.blur_kernel_size(out_size))
  return np.clip(np.rint(img), 0, 255).astype(np.uint8)


def augment_image(
    image: np.ndarray, rng: np.random.Generator, cfg: ml_collections.ConfigDict, out_size: int
) -> np.ndarray:
  """The previous `augment.augment_image`: the same draws (`augment.sample_params`), applied as before."""
  augment.check_image(image)
  return apply_params(image, augment.sample_params(rng, cfg, image.shape[0], image.shape[1]), out_size)
