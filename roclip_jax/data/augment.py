"""RoCLIP's SimCLR-style image augmentation (docs/methods.md, section 3.1), on host and device.

The original (`utils/augment_image.py`, torchvision on PIL images) applies, in this order:

  1. RandomHorizontalFlip(p=0.5)
  2. RandomResizedCrop(224, scale=(0.08, 1), ratio=(3/4, 4/3), bilinear)
  3. with p=0.8: ColorJitter(brightness=0.5, contrast=0.5, saturation=0.5, hue=0.1),
     its four ops in a random order
  4. RandomGrayscale(p=0.2)
  5. GaussianBlur(kernel 21, sigma ~ U[0.1, 2.0]), always on

Two implementations share one parameter record, `AugmentParams`, so that sampling is
separate from application and both can be given the same parameters:

* Host (numpy + PIL, for grain workers): `augment_image` = `sample_params` + `apply_params`.
  Pure given the `np.random.Generator`; holds no state, so it pickles. Its colour ops run in place
  on float32 planes and its blur as banded matrix products: bit for bit the previous, slower code
  (`augment_reference`), faster (`python -m roclip_jax.bench.data --compare` times both).
* Device (jax.numpy, for the jitted train step): `augment_batch_jax` =
  vmap(`sample_params_jax`) + vmap(`apply_params_jax`).

Deviations from the original (torchvision on PIL images):
* Between the crop and the final rounding the image stays float32; torchvision rounds to uint8
  after every op (PIL images are uint8): under one grey level per op.
* ColorJitter uses the float formulas of torchvision's tensor path (mean grey not rounded,
  continuous hue shift) rather than PIL's 8-bit HSV, whose round trip alone moves saturated
  colours by up to ~7 levels even at hue 0.
* The blur kernel scales with the output size like SimCLR: `blur_kernel_size(out_size)` is the
  largest odd integer <= round(0.1 * out_size), i.e. 21 px at 224 (the original's value), 3 px
  at 32.
* The device version crops + resizes with an explicit antialiased bilinear weight matrix (PIL's
  filter), in float; PIL rounds after each of its two passes.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

# ITU-R 601-2 luma, as PIL's convert('L') and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
_NUM_CROP_TRIES = 10  # torchvision RandomResizedCrop tries this often before a centre crop.
# Order of the ColorJitter ops in `AugmentParams.jitter_order`.
_BRIGHTNESS, _CONTRAST, _SATURATION, _HUE = range(4)
PLACEMENTS = ('host', 'device')


def default_config() -> ml_collections.ConfigDict:
  """`config.augment`: the original's image and EDA settings; both kinds start switched off."""
  return ml_collections.ConfigDict(
      dict(
          image=False,  # Augment training images (RoCLIP's --cross_aug).
          # Where images are augmented: 'host' (grain workers, numpy + PIL) or 'device' (the jitted
          # train step; the host only decodes and resizes to `device_source_size`). See `PLACEMENTS`.
          placement='host',
          # With placement='device': the side of the square image the host delivers (the whole decoded
          # image resized to it); 0 = round(image_size * 8 / 7), 256 at 224.
          device_source_size=0,
          text=False,  # Replace captions by one EDA version (RoCLIP's --cross_aug).
          # The original draws one EDA caption per sample for the whole run; True re-draws each epoch.
          text_resample_per_epoch=False,
          flip_p=0.5,
          crop_scale=(0.08, 1.0),
          crop_ratio=(3 / 4, 4 / 3),
          jitter_p=0.8,
          brightness=0.5,
          contrast=0.5,
          saturation=0.5,
          hue=0.1,
          grayscale_p=0.2,
          blur_p=1.0,
          blur_sigma=(0.1, 2.0),
          # EDA (see roclip_jax/data/eda.py).
          eda_alpha_sr=0.1,
          eda_alpha_ri=0.1,
          eda_alpha_rs=0.1,
          eda_p_rd=0.1,
      )
  )


class AugmentParams(NamedTuple):
  """Random draws for one image; python/numpy scalars on the host, (batched) arrays in jax.

  The crop box is in the coordinates of the image *after* the flip, as in torchvision.
  """

  flip: Any  # bool
  crop_top: Any  # int
  crop_left: Any  # int
  crop_height: Any  # int
  crop_width: Any  # int
  jitter: Any  # bool: apply ColorJitter at all
  jitter_order: Any  # int[4], a permutation of (brightness, contrast, saturation, hue)
  brightness: Any  # float factor, 1 = identity
  contrast: Any  # float factor, 1 = identity
  saturation: Any  # float factor, 1 = identity
  hue: Any  # float shift in turns, 0 = identity
  grayscale: Any  # bool
  blur: Any  # bool
  blur_sigma: Any  # float, pixels


class AugmentSettings(NamedTuple):
  """`config.augment`'s image fields, read and checked (`read_settings`)."""

  flip_p: float
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  jitter_p: float
  brightness: float
  contrast: float
  saturation: float
  hue: float
  grayscale_p: float
  blur_p: float
  blur_sigma: tuple[float, float]


def read_settings(cfg: ml_collections.ConfigDict | AugmentSettings) -> AugmentSettings:
  """Reads and validates the image fields of `cfg` (= `config.augment`); settings pass through.

  A data loader reads them once: a ConfigDict field costs microseconds to read, and the sampling
  functions take either.
  """
  if isinstance(cfg, AugmentSettings):
    return cfg

  def field(name):
    if name not in cfg:
      raise ValueError(
          f'config.augment has no field {name!r}; start from '
          '`config.augment = roclip_jax.data.augment.default_config()`.'
      )
    return cfg[name]

  def probability(name):
    value = float(field(name))
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'config.augment.{name}={value} must be a probability in [0, 1].')
    return value

  def interval(name, low_bound):
    value = field(name)
    if len(value) != 2 or not low_bound < float(value[0]) <= float(value[1]):
      raise ValueError(
          f'config.augment.{name}={tuple(value)} must be a pair (low, high) with '
          f'{low_bound} < low <= high, e.g. {tuple(default_config()[name])}.'
      )
    return float(value[0]), float(value[1])

  def non_negative(name):
    value = float(field(name))
    if value < 0:
      raise ValueError(f'config.augment.{name}={value} must be >= 0 (0 switches it off).')
    return value

  hue = non_negative('hue')
  if hue > 0.5:
    raise ValueError(
        f'config.augment.hue={hue} must lie in [0, 0.5] (a hue shift of more than half a '
        'turn is meaningless; torchvision has the same limit). The original uses 0.1.'
    )
  return AugmentSettings(
      flip_p=probability('flip_p'),
      crop_scale=interval('crop_scale', 0.0),
      crop_ratio=interval('crop_ratio', 0.0),
      jitter_p=probability('jitter_p'),
      brightness=non_negative('brightness'),
      contrast=non_negative('contrast'),
      saturation=non_negative('saturation'),
      hue=hue,
      grayscale_p=probability('grayscale_p'),
      blur_p=probability('blur_p'),
      blur_sigma=interval('blur_sigma', 0.0),
  )


def _factor_range(strength: float) -> tuple[float, float]:
  """torchvision's ColorJitter range for brightness/contrast/saturation."""
  return max(0.0, 1.0 - strength), 1.0 + strength


def _fallback_crop(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int]:
  """torchvision's centre-crop (height, width) when 10 random tries did not fit."""
  in_ratio = width / height
  if in_ratio < ratio[0]:
    return int(round(width / ratio[0])), width
  if in_ratio > ratio[1]:
    return height, int(round(height * ratio[1]))
  return height, width


def blur_kernel_size(out_size: int) -> int:
  """Largest odd integer <= round(0.1 * out_size) (at least 1): 21 at 224, like the original."""
  size = int(0.1 * out_size + 0.5)
  if size % 2 == 0:
    size -= 1
  return max(size, 1)


def _check_out_size(out_size: int) -> None:
  if not isinstance(out_size, (int, np.integer)) or out_size < 1:
    raise ValueError(f'out_size={out_size!r} must be a positive int (the side of the square crop).')


# -------------------------------------------------------------------------------------------------
# Colour ops. Written once for numpy and jax.numpy (picked from the input's type) so that the
# host and the device apply the same formulas. Inputs are uint8 or float in [0, 255] with shape
# [..., H, W, 3]; outputs are float32 in [0, 255].
# -------------------------------------------------------------------------------------------------


def _xp(img) -> Any:
  return np if isinstance(img, np.ndarray) else jnp


def _as_float(img):
  if isinstance(img, np.ndarray):
    return img.astype(np.float32, copy=False)
  return jnp.asarray(img).astype(jnp.float32)


def _channels(img):
  """(red, green, blue) planes; contiguous copies in numpy, where strided math is ~6x slower."""
  if isinstance(img, np.ndarray):
    return tuple(np.ascontiguousarray(np.moveaxis(img, -1, 0)))
  return img[..., 0], img[..., 1], img[..., 2]


def _luma(img):
  red, green, blue = _channels(img)
  return red * _LUMA[0] + green * _LUMA[1] + blue * _LUMA[2]


def adjust_brightness(img, factor):
  """Blend with black: factor * img (torchvision adjust_brightness)."""
  img = _as_float(img)
  return _xp(img).clip(img * factor, 0.0, 255.0)


def adjust_contrast(img, factor):
  """Blend with the image's mean grey level (torchvision adjust_contrast)."""
  img = _as_float(img)
  mean = _luma(img).mean(axis=(-2, -1), keepdims=True)[..., None]
  return _xp(img).clip(factor * img + (1.0 - factor) * mean, 0.0, 255.0)


def adjust_saturation(img, factor):
  """Blend with the image's own grey version (torchvision adjust_saturation)."""
  img = _as_float(img)
  return _xp(img).clip(factor * img + (1.0 - factor) * _luma(img)[..., None], 0.0, 255.0)


def adjust_hue(img, factor):
  """Rotates the HSV hue by `factor` turns, factor in [-0.5, 0.5] (torchvision adjust_hue).

  HSV round trip in closed form: value (max) and chroma (max - min) do not change under a hue
  shift, so only the hue is computed, shifted, and mapped back with the k-formula of HSV->RGB.
  """
  if isinstance(factor, (float, int)) and not -0.5 <= factor <= 0.5:
    raise ValueError(f'hue factor {factor} must lie in [-0.5, 0.5].')
  img = _as_float(img)
  xp = _xp(img)
  red, green, blue = _channels(img)
  value = xp.maximum(xp.maximum(red, green), blue)
  chroma = value - xp.minimum(xp.minimum(red, green), blue)
  # Grey pixels (chroma 0) may take any hue: chroma multiplies it away below.
  inv_chroma = 1.0 / xp.where(chroma > 0, chroma, 1.0)
  red_c, green_c, blue_c = ((value - c) * inv_chroma for c in (red, green, blue))
  hue6 = xp.where(value == red, blue_c - green_c, xp.where(value == green, 2.0 + red_c - blue_c, 4.0 + green_c - red_c))
  hue6 = hue6 + 6.0 * factor  # hue in sixths of a turn
  hue6 = hue6 - 6.0 * xp.floor(hue6 / 6.0)  # wrap to [0, 6); floor is much cheaper than mod

  def channel(n):
    k = n + hue6
    k = xp.where(k >= 6.0, k - 6.0, k)
    return value - chroma * xp.clip(xp.minimum(k, 4.0 - k), 0.0, 1.0)

  return xp.stack([channel(5.0), channel(3.0), channel(1.0)], axis=-1)


def to_grayscale(img):
  """Grey level 0.299 R + 0.587 G + 0.114 B in all three channels (RandomGrayscale)."""
  img = _as_float(img)
  luma = _luma(img)
  return _xp(img).stack([luma, luma, luma], axis=-1)


# Each op's factor that leaves the image unchanged (brightness, contrast, saturation, hue).
JITTER_IDENTITY = (1.0, 1.0, 1.0, 0.0)


def gaussian_kernel1d(kernel_size: int, sigma):
  """torchvision's `_get_gaussian_kernel1d`: exp(-x^2 / 2 sigma^2) on integer offsets, sum 1."""
  xp = np if isinstance(sigma, (float, int, np.floating)) else jnp
  offsets = xp.arange(kernel_size, dtype=xp.float32) - (kernel_size - 1) / 2
  pdf = xp.exp(-0.5 * (offsets / sigma) ** 2)
  return pdf / pdf.sum()


def check_blur(height: int, width: int, kernel_size: int) -> None:
  if kernel_size < 1 or kernel_size % 2 == 0:
    raise ValueError(f'kernel_size={kernel_size} must be a positive odd int.')
  if kernel_size // 2 >= min(height, width):
    raise ValueError(
        f'kernel_size={kernel_size} is too large for a {height}x{width} image '
        '(reflect padding needs kernel_size // 2 < both sides); use blur_kernel_size(out_size).'
    )


# -------------------------------------------------------------------------------------------------
# Host version (numpy + PIL).
# -------------------------------------------------------------------------------------------------


def check_image(image: np.ndarray) -> None:
  if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[-1] != 3:
    shape = getattr(image, 'shape', type(image).__name__)
    raise ValueError(
        f'augment_image expects an RGB image as a numpy uint8 array [H, W, 3], got {shape}. '
        'Decode with PIL `.convert("RGB")` (this also fixes grey and RGBA images).'
    )
  if image.dtype != np.uint8:
    raise ValueError(
        f'augment_image expects dtype uint8 (values 0..255), got {image.dtype}; ' 'augment before converting to float.'
    )
  if min(image.shape[:2]) < 1:
    raise ValueError(f'augment_image got an empty image of shape {image.shape}.')


def sample_crop(
    rng: np.random.Generator, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float]
) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params`: (top, left, crop_height, crop_width)."""
  area = height * width
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(_NUM_CROP_TRIES):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
    crop_width = int(round(math.sqrt(target_area * aspect)))
    crop_height = int(round(math.sqrt(target_area / aspect)))
    if 0 < crop_width <= width and 0 < crop_height <= height:
      top = int(rng.integers(0, height - crop_height + 1))
      left = int(rng.integers(0, width - crop_width + 1))
      return top, left, crop_height, crop_width
  crop_height, crop_width = _fallback_crop(height, width, ratio)
  return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def sample_params(
    rng: np.random.Generator, cfg: ml_collections.ConfigDict | AugmentSettings, height: int, width: int
) -> AugmentParams:
  """Draws every random choice of the pipeline for one [height, width] image."""
  s = read_settings(cfg)
  flip = bool(rng.random() < s.flip_p)
  top, left, crop_height, crop_width = sample_crop(rng, height, width, s.crop_scale, s.crop_ratio)
  return AugmentParams(
      flip=flip,
      crop_top=top,
      crop_left=left,
      crop_height=crop_height,
      crop_width=crop_width,
      jitter=bool(rng.random() < s.jitter_p),
      jitter_order=rng.permutation(4).astype(np.int32),
      brightness=float(rng.uniform(*_factor_range(s.brightness))),
      contrast=float(rng.uniform(*_factor_range(s.contrast))),
      saturation=float(rng.uniform(*_factor_range(s.saturation))),
      hue=float(rng.uniform(-s.hue, s.hue)),
      grayscale=bool(rng.random() < s.grayscale_p),
      blur=bool(rng.random() < s.blur_p),
      blur_sigma=float(rng.uniform(*s.blur_sigma)),
  )


def _resized_crop_image(image: np.ndarray, top: int, left: int, height: int, width: int, out_size: int) -> Image.Image:
  crop = np.ascontiguousarray(image[top : top + height, left : left + width])
  return Image.fromarray(crop).resize((out_size, out_size), Image.Resampling.BILINEAR)


def resized_crop(image: np.ndarray, top: int, left: int, height: int, width: int, out_size: int) -> np.ndarray:
  """Crop then bilinear (antialiased) resize to out_size², with PIL as torchvision does."""
  return np.asarray(_resized_crop_image(image, top, left, height, width, out_size))


def _flipped_resized_crop_image(image: np.ndarray, params: AugmentParams, out_size: int) -> Image.Image:
  _check_out_size(out_size)
  if not params.flip:
    return _resized_crop_image(
        image, params.crop_top, params.crop_left, params.crop_height, params.crop_width, out_size
    )
  # Crop the mirrored box of the unflipped image and flip the small output instead.
  left = image.shape[1] - params.crop_left - params.crop_width
  out = _resized_crop_image(image, params.crop_top, left, params.crop_height, params.crop_width, out_size)
  return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)


def flipped_resized_crop(image: np.ndarray, params: AugmentParams, out_size: int) -> np.ndarray:
  """The flip and the crop + resize of `params`: uint8 [out_size, out_size, 3]."""
  return np.asarray(_flipped_resized_crop_image(image, params, out_size))


# The host colour ops work in place on float32 planes [C, H, W]: a channel is then a contiguous
# array, and no op allocates an image-sized temporary per arithmetic step. Each computes exactly the
# float32 arithmetic of the shared formula above (the same operations in the same order;
# tests/test_augment.py compares them bit for bit), so only the memory traffic changes.


def _luma_plane(planes: np.ndarray) -> np.ndarray:
  return planes[0] * _LUMA[0] + planes[1] * _LUMA[1] + planes[2] * _LUMA[2]


def _brightness_planes(planes: np.ndarray, factor: float) -> np.ndarray:
  np.multiply(planes, factor, out=planes)
  return np.clip(planes, 0.0, 255.0, out=planes)


def _contrast_planes(planes: np.ndarray, factor: float) -> np.ndarray:
  mean = _luma_plane(planes).mean(axis=(-2, -1), keepdims=True)
  np.multiply(planes, factor, out=planes)
  np.add(planes, (1.0 - factor) * mean, out=planes)
  return np.clip(planes, 0.0, 255.0, out=planes)


def _saturation_planes(planes: np.ndarray, factor: float) -> np.ndarray:
  grey = _luma_plane(planes)
  np.multiply(grey, 1.0 - factor, out=grey)
  np.multiply(planes, factor, out=planes)
  np.add(planes, grey, out=planes)
  return np.clip(planes, 0.0, 255.0, out=planes)


# The k-formula's offsets n of the red, green and blue outputs (`adjust_hue`'s `channel(n)`).
_HUE_OFFSETS = np.array([5.0, 3.0, 1.0], np.float32)[:, None, None]


def _hue_planes(planes: np.ndarray, factor: float) -> np.ndarray:
  """`adjust_hue` with its selections as masks: adding a 0/1 mask or copying under it changes no
  selected value, and it costs less than `where` over whole arrays."""
  red, green, blue = planes
  value = np.maximum(np.maximum(red, green), blue)
  chroma = value - np.minimum(np.minimum(red, green), blue)
  inv_chroma = np.divide(1.0, chroma + (chroma == 0))  # 1 / where(chroma > 0, chroma, 1); chroma >= 0.
  shares = value - planes
  shares *= inv_chroma
  red_c, green_c, blue_c = shares
  hue6 = np.add(green_c, 4.0)
  hue6 -= red_c
  branch = np.add(red_c, 2.0)
  branch -= blue_c
  np.copyto(hue6, branch, where=value == green)
  np.subtract(blue_c, green_c, out=branch)
  np.copyto(hue6, branch, where=value == red)  # Last: red wins a tie, as in the nested `where`.
  hue6 += 6.0 * factor
  turns = np.divide(hue6, 6.0)
  np.floor(turns, out=turns)
  turns *= 6.0
  hue6 -= turns
  k = hue6 + _HUE_OFFSETS
  k -= (k >= 6.0) * np.float32(6.0)
  ramp = np.subtract(4.0, k)
  np.minimum(k, ramp, out=ramp)
  np.clip(ramp, 0.0, 1.0, out=ramp)
  ramp *= chroma
  return np.subtract(value, ramp, out=planes)


_JITTER_PLANE_OPS = (_brightness_planes, _contrast_planes, _saturation_planes, _hue_planes)
# OpenBLAS runs a matrix product of at most this many multiply-adds in the calling thread (and splits
# larger ones over its threads): the blur's products stay below it, so a grain worker stays on its core.
_BLAS_SINGLE_THREAD_MACS = 4 * 65536
_MAX_BLUR_BLOCK_ROWS = 16  # Enough rows per product to run at BLAS speed (16 x 224 x 36 at 224 px).


def _blur_block_rows(width: int, radius: int) -> int:
  """Output rows per product of `_correlate_rows`: the most, up to 16, that keep a product
  ([rows, rows + 2r] x [rows + 2r, width]) in the calling thread."""
  rows = _MAX_BLUR_BLOCK_ROWS
  while rows > 1 and rows * width * (rows + 2 * radius) > _BLAS_SINGLE_THREAD_MACS:
    rows -= 1
  return rows


def _correlate_rows(planes: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """float [C, N, W] -> float64 [C, N, W]: `kernel` (odd length) along N, reflect padding.

  The function of scipy.ndimage.correlate1d(mode='mirror') as banded matrix products: the padded
  rows in overlapping windows of `block` + 2r rows (r = the kernel's radius, `block` from
  `_blur_block_rows`), each window multiplied by the same [block, block + 2r] band of weights. A float32 pixel times a float32 weight
  is exact in float64, so the sums differ from scipy's only in their order (see `gaussian_blur_planes`).
  """
  channels, rows, width = planes.shape
  radius = len(kernel) // 2
  block = _blur_block_rows(width, radius)
  blocks = -(-rows // block)
  padded = np.empty((channels, blocks * block + 2 * radius, width), np.float64)
  padded[:, radius : radius + rows] = planes
  padded[:, :radius] = planes[:, 1 : radius + 1][:, ::-1]
  padded[:, radius + rows : 2 * radius + rows] = planes[:, rows - 1 - radius : rows - 1][:, ::-1]
  padded[:, 2 * radius + rows :] = 0.0  # Completes the last window; the rows it gives are dropped.
  # Window i holds padded rows [i * block, i * block + block + 2r): a read-only view, no copy.
  channel_stride, row_stride, column_stride = padded.strides
  windows = np.lib.stride_tricks.as_strided(
      padded,
      (channels, blocks, block + 2 * radius, width),
      (channel_stride, block * row_stride, row_stride, column_stride),
      writeable=False,
  )
  band = np.zeros((block, block + 2 * radius))
  band.reshape(-1)[_band_positions(block, len(kernel))] = np.tile(kernel, block)
  out = np.matmul(band, windows)  # [C, blocks, block, W]
  return out.reshape(channels, blocks * block, width)[:, :rows]


@functools.lru_cache(maxsize=None)
def _band_positions(block: int, kernel_size: int) -> np.ndarray:
  """Flat indices of the kernel's weights in the [block, block + kernel_size - 1] band: row o holds
  the kernel at columns o .. o + kernel_size - 1."""
  rows = np.arange(block)[:, None]
  return (rows * (block + kernel_size - 1) + rows + np.arange(kernel_size)).reshape(-1)


def gaussian_blur_planes(planes: np.ndarray, sigma: float, kernel_size: int) -> np.ndarray:
  """torchvision GaussianBlur of float32 planes [C, H, W] -> float32 [C, H, W]: separable Gaussian,
  reflect padding, along H then W, rounded to float32 after each pass.

  The previous implementation (`augment_reference.gaussian_blur`, scipy) sums the same exact float64
  products in another order, so a result could differ from it only where the two float64 sums (equal
  to within a few of their last bits, 29 bits finer than float32's) fall on either side of a float32
  rounding boundary:
  `python -m roclip_jax.bench.data --compare` counts the differing output values of the whole host
  augmentation, and tests/test_augment.py checks them bit for bit.
  """
  check_blur(planes.shape[-2], planes.shape[-1], kernel_size)
  kernel = gaussian_kernel1d(kernel_size, float(sigma)).astype(np.float64)
  # Outer weights that underflowed to 0 in float32 (at 21 taps, sigma below ~0.7) only add exact
  # zeros to every sum: the band is narrower without them.
  outer = int(np.flatnonzero(kernel)[0])
  kernel = kernel[outer : len(kernel) - outer]
  columns = _correlate_rows(planes, kernel).astype(np.float32)
  # Along W: the same products on the transposed planes.
  return _correlate_rows(columns.swapaxes(1, 2), kernel).astype(np.float32).swapaxes(1, 2)


def apply_params(image: np.ndarray, params: AugmentParams, out_size: int) -> np.ndarray:
  """Applies the drawn augmentation to one uint8 [H, W, 3] image; returns uint8 [out, out, 3]."""
  check_image(image)
  cropped = _flipped_resized_crop_image(image, params, out_size)
  if not (params.jitter or params.grayscale or params.blur):
    return np.asarray(cropped)
  planes = np.asarray(cropped).transpose(2, 0, 1).astype(np.float32, order='C')
  if params.jitter:
    factors = (params.brightness, params.contrast, params.saturation, params.hue)
    for op in params.jitter_order:
      if factors[op] != JITTER_IDENTITY[op]:  # torchvision skips a switched-off op
        planes = _JITTER_PLANE_OPS[op](planes, factors[op])
  if params.grayscale:
    planes = _luma_plane(planes)[None]  # One plane stands for three equal ones (blurred once).
  if params.blur:
    planes = gaussian_blur_planes(planes, params.blur_sigma, blur_kernel_size(out_size))
  np.rint(planes, out=planes)
  np.clip(planes, 0, 255, out=planes)
  bands = [Image.fromarray(plane) for plane in planes.astype(np.uint8)]
  # PIL interleaves the planes faster than a transposing numpy copy.
  return np.asarray(Image.merge('RGB', bands * 3 if len(bands) == 1 else bands))


def augment_image(
    image: np.ndarray, rng: np.random.Generator, cfg: ml_collections.ConfigDict | AugmentSettings, out_size: int
) -> np.ndarray:
  """RoCLIP's image augmentation of one uint8 [H, W, 3] image -> uint8 [out_size, out_size, 3]."""
  check_image(image)
  params = sample_params(rng, cfg, image.shape[0], image.shape[1])
  return apply_params(image, params, out_size)


# -------------------------------------------------------------------------------------------------
# Device version (jax.numpy; vmapped over the batch, jit-able inside the train step).
# -------------------------------------------------------------------------------------------------


def sample_params_jax(key: jax.Array, cfg: ml_collections.ConfigDict, height: int, width: int) -> AugmentParams:
  """`sample_params` for one image from a jax key; vmap over keys for a batch."""
  s = read_settings(cfg)
  keys = jax.random.split(key, 14)
  uniform = jax.random.uniform
  # RandomResizedCrop: all 10 tries at once, the first that fits wins.
  area = height * width
  target_area = area * uniform(keys[0], (_NUM_CROP_TRIES,), minval=s.crop_scale[0], maxval=s.crop_scale[1])
  aspect = jnp.exp(
      uniform(keys[1], (_NUM_CROP_TRIES,), minval=math.log(s.crop_ratio[0]), maxval=math.log(s.crop_ratio[1]))
  )
  try_widths = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
  try_heights = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
  fits = (try_widths > 0) & (try_widths <= width) & (try_heights > 0) & (try_heights <= height)
  first = jnp.argmax(fits)
  any_fits = fits.any()
  fallback_height, fallback_width = _fallback_crop(height, width, s.crop_ratio)
  crop_height = jnp.where(any_fits, try_heights[first], fallback_height)
  crop_width = jnp.where(any_fits, try_widths[first], fallback_width)
  top = jnp.where(any_fits, jax.random.randint(keys[2], (), 0, height - crop_height + 1), (height - crop_height) // 2)
  left = jnp.where(any_fits, jax.random.randint(keys[3], (), 0, width - crop_width + 1), (width - crop_width) // 2)

  def factor(k, strength):
    low, high = _factor_range(strength)
    return uniform(k, (), minval=low, maxval=high)

  return AugmentParams(
      flip=uniform(keys[4], ()) < s.flip_p,
      crop_top=top,
      crop_left=left,
      crop_height=crop_height,
      crop_width=crop_width,
      jitter=uniform(keys[5], ()) < s.jitter_p,
      jitter_order=jax.random.permutation(keys[6], 4).astype(jnp.int32),
      brightness=factor(keys[7], s.brightness),
      contrast=factor(keys[8], s.contrast),
      saturation=factor(keys[9], s.saturation),
      hue=uniform(keys[10], (), minval=-s.hue, maxval=s.hue),
      grayscale=uniform(keys[11], ()) < s.grayscale_p,
      blur=uniform(keys[12], ()) < s.blur_p,
      blur_sigma=uniform(keys[13], (), minval=s.blur_sigma[0], maxval=s.blur_sigma[1]),
  )


def _resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """[out_size, in_size] matrix of PIL's antialiased bilinear resize of in[start:start+length].

  `start` and `length` may be fractional (pixel edges at integers).

  Output pixel o samples the crop at centre start + (o + 0.5) * scale with a triangle filter
  widened by the scale when shrinking (antialiasing); pixels outside the crop get no weight, and
  each row is normalised, as PIL does after `crop`.
  """
  scale = length.astype(jnp.float32) / out_size
  support = jnp.maximum(scale, 1.0)
  centres = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * scale
  pixels = jnp.arange(in_size, dtype=jnp.float32)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(pixels[None, :] + 0.5 - centres[:, None]) / support)
  # Pixels whose centre lies in the box: for an integer box exactly crop-then-resize; a fractional box
  # (device placement maps the crop into a resized image) keeps the straddling pixels half-way in.
  inside = (pixels + 0.5 >= start) & (pixels + 0.5 < start + length)
  masked = jnp.where(inside[None, :], weights, 0.0)
  # A box narrower than a pixel may hold no pixel centre: then the unmasked filter, never 0 / 0.
  weights = jnp.where(masked.sum(axis=1, keepdims=True) > 0, masked, weights)
  return weights / weights.sum(axis=1, keepdims=True)


def resized_crop_jax(image, top, left, height, width, out_size: int) -> jax.Array:
  """`resized_crop` for one [H, W, 3] image with traced box; float32 [out, out, 3]."""
  img = jnp.asarray(image).astype(jnp.float32)
  rows = _resize_weights(top, jnp.asarray(height), img.shape[0], out_size)
  cols = _resize_weights(left, jnp.asarray(width), img.shape[1], out_size)
  highest = jax.lax.Precision.HIGHEST  # bf16/TF32 passes would cost a grey level
  img = jnp.einsum('oh,hwc->owc', rows, img, precision=highest)
  return jnp.einsum('pw,owc->opc', cols, img, precision=highest)


def gaussian_blur_jax(img, sigma, kernel_size: int) -> jax.Array:
  """`gaussian_blur` for one [H, W, C] image with a traced sigma (shifted sums, reflect pad)."""
  check_blur(img.shape[-3], img.shape[-2], kernel_size)
  img = jnp.asarray(img).astype(jnp.float32)
  if kernel_size == 1:
    return img
  kernel = gaussian_kernel1d(kernel_size, jnp.asarray(sigma, jnp.float32))
  pad = kernel_size // 2
  for axis in (0, 1):
    widths = [(0, 0)] * img.ndim
    widths[axis] = (pad, pad)
    padded = jnp.pad(img, widths, mode='reflect')
    size = img.shape[axis]
    img = sum(kernel[t] * jax.lax.slice_in_dim(padded, t, t + size, axis=axis) for t in range(kernel_size))
  return img


def _blend_op_jax(img, kind, factor):
  """Brightness, contrast or saturation, picked by the traced `kind`: all three blend the
  image with a degenerate image (black, mean grey, grey), so one formula covers them."""
  luma = _luma(img)
  degenerate = jnp.where(kind == _CONTRAST, luma.mean(), jnp.where(kind == _SATURATION, luma, 0.0))
  return jnp.clip(factor * img + (1.0 - factor) * degenerate[..., None], 0.0, 255.0)


def _color_jitter_jax(img, params: AugmentParams) -> jax.Array:
  """ColorJitter in the drawn order, without a per-op `lax.switch`.

  Under vmap a switch computes every branch at every position, and XLA's fusion then recomputes
  earlier positions inside later ones (~50x slower on CPU). Instead: the blend ops before the hue
  position, one hue shift, the blend ops after it; an inactive position blends with factor 1
  (exactly the identity).
  """
  order = params.jitter_order
  factors = jnp.stack([params.brightness, params.contrast, params.saturation, params.hue])
  hue_position = jnp.argmax(order == _HUE)

  def blends(x, active):
    for position in range(4):
      kind = order[position]
      on = active[position] & (kind != _HUE)
      x = _blend_op_jax(x, kind, jnp.where(on, factors[kind], 1.0))
    return x

  positions = jnp.arange(4)
  img = blends(img, positions < hue_position)
  img = adjust_hue(img, params.hue)
  return blends(img, positions > hue_position)


def apply_params_jax(image, params: AugmentParams, out_size: int) -> jax.Array:
  """`apply_params` for one [H, W, 3] image with traced params; float32 [out, out, 3] in [0, 255].

  Not rounded: a float model input needs no uint8 step.
  """
  _check_out_size(out_size)
  width = image.shape[1]
  left = jnp.where(params.flip, width - params.crop_left - params.crop_width, params.crop_left)
  img = resized_crop_jax(image, params.crop_top, left, params.crop_height, params.crop_width, out_size)
  img = jnp.where(params.flip, img[:, ::-1], img)

  img = jnp.where(params.jitter, _color_jitter_jax(img, params), img)
  img = jnp.where(params.grayscale, to_grayscale(img), img)
  blurred = gaussian_blur_jax(img, params.blur_sigma, blur_kernel_size(out_size))
  return jnp.where(params.blur, blurred, img)


def augment_batch_jax(
    images, key: jax.Array, cfg: ml_collections.ConfigDict, out_size: int, dtype=jnp.float32
) -> jax.Array:
  """RoCLIP's image augmentation of a batch [B, H, W, 3] on device -> [B, out, out, 3].

  Each image gets its own draws (from `jax.random.split(key, B)`). `dtype=jnp.uint8` rounds like
  the host version; float32 (default) returns unrounded values in [0, 255]. All images share one
  H x W, so the host must deliver fixed-size images (e.g. resized to 256 and centre-cropped).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(
        f'augment_batch_jax expects RGB images [B, H, W, 3], got shape {images.shape}; '
        'batch same-size images (resize on the host first).'
    )
  _check_out_size(out_size)
  batch, height, width, _ = images.shape
  keys = jax.random.split(key, batch)
  params = jax.vmap(lambda k: sample_params_jax(k, cfg, height, width))(keys)
  out = jax.vmap(functools.partial(apply_params_jax, out_size=out_size))(images, params)
  if jnp.dtype(dtype) == jnp.uint8:
    return jnp.clip(jnp.round(out), 0, 255).astype(jnp.uint8)
  return out.astype(dtype)


# -------------------------------------------------------------------------------------------------
# Device placement (`config.augment.placement='device'`): the host draws the parameters exactly as
# the host path does and resizes the decoded image to a fixed square; the train step applies them.
# -------------------------------------------------------------------------------------------------

# Layout of one view's packed parameters (`pack_params`): float32, the crop box in the coordinates
# of the delivered square image, booleans as 0/1.
PACKED_FIELDS = (
    'flip',
    'crop_top',
    'crop_left',
    'crop_height',
    'crop_width',
    'jitter',
    'order0',
    'order1',
    'order2',
    'order3',
    'brightness',
    'contrast',
    'saturation',
    'hue',
    'grayscale',
    'blur',
    'blur_sigma',
)
NUM_PACKED = len(PACKED_FIELDS)


def placement(cfg: ml_collections.ConfigDict) -> str:
  """`cfg.placement` (= `config.augment.placement`, 'host' when absent), checked."""
  value = cfg.get('placement', 'host')
  if value not in PLACEMENTS:
    raise ValueError(
        f"config.augment.placement={value!r} is unknown; use 'host' (grain workers augment with numpy + "
        "PIL) or 'device' (the train step augments; the host only decodes and resizes)."
    )
  return value


def device_source_size(cfg: ml_collections.ConfigDict, image_size: int) -> int:
  """The side of the square image the host delivers with placement='device'."""
  size = int(cfg.get('device_source_size', 0) or 0)
  if size == 0:
    return int(round(image_size * 8 / 7))
  if size < image_size:
    raise ValueError(
        f"config.augment.device_source_size={size} is smaller than the model's image size {image_size}: "
        f'every crop would be upsampled from it. Use 0 (= {round(image_size * 8 / 7)}) or at least {image_size}.'
    )
  return size


def device_views(cfg: ml_collections.ConfigDict, views: int) -> tuple[str, ...]:
  """The image views augmented in the train step: none with placement='host'; else 'image' when
  `cfg.image` and, with two views, 'image2' (the second view is always augmented)."""
  if placement(cfg) != 'device':
    return ()
  return (('image',) if cfg.get('image', False) else ()) + (('image2',) if views == 2 else ())


def params_key(view: str) -> str:
  """The batch key of a device-augmented view's packed parameters, e.g. 'image_augment'."""
  return f'{view}_augment'


def resize_for_device(image: np.ndarray, size: int) -> np.ndarray:
  """The whole uint8 [H, W, 3] image resized (antialiased bicubic, aspect not kept) to [size, size, 3].

  Not the eval centre crop: RandomResizedCrop may pick a box anywhere in the image, so all of it must
  reach the device; `pack_params` maps the box drawn on the original into this square. Bicubic keeps
  more of the detail the crop later enlarges than bilinear (closer to the host path: mean 0.50 vs 0.54
  grey levels at 256 -> 224).
  """
  check_image(image)
  if image.shape[:2] == (size, size):
    return image
  return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))


def pack_params(params: AugmentParams, height: int, width: int, size: int) -> np.ndarray:
  """float32 [NUM_PACKED]: `params`, drawn for a [height, width] image, for its [size, size] resize."""
  row_scale, col_scale = size / height, size / width
  values = (
      params.flip,
      params.crop_top * row_scale,
      params.crop_left * col_scale,
      params.crop_height * row_scale,
      params.crop_width * col_scale,
      params.jitter,
      *params.jitter_order,
      params.brightness,
      params.contrast,
      params.saturation,
      params.hue,
      params.grayscale,
      params.blur,
      params.blur_sigma,
  )
  return np.asarray(values, np.float64).astype(np.float32)


def unpack_params(packed) -> AugmentParams:
  """`pack_params`' inverse for jax arrays [..., NUM_PACKED] (the crop box stays fractional)."""
  if packed.shape[-1] != NUM_PACKED:
    raise ValueError(
        f'packed augmentation parameters have {packed.shape[-1]} values per image, expected {NUM_PACKED} '
        '(augment.pack_params); the pipeline and the train step must come from the same version.'
    )
  field = {name: packed[..., i] for i, name in enumerate(PACKED_FIELDS)}
  flag = lambda name: field[name] > 0.5
  return AugmentParams(
      flip=flag('flip'),
      crop_top=field['crop_top'],
      crop_left=field['crop_left'],
      crop_height=field['crop_height'],
      crop_width=field['crop_width'],
      jitter=flag('jitter'),
      jitter_order=jnp.round(packed[..., 6:10]).astype(jnp.int32),
      brightness=field['brightness'],
      contrast=field['contrast'],
      saturation=field['saturation'],
      hue=field['hue'],
      grayscale=flag('grayscale'),
      blur=flag('blur'),
      blur_sigma=field['blur_sigma'],
  )


def apply_packed_batch_jax(images, packed, out_size: int) -> jax.Array:
  """Device placement's augmentation: uint8 [B, S, S, 3] (`resize_for_device`) and float32 [B,
  NUM_PACKED] (`pack_params`) -> float32 [B, out_size, out_size, 3] in [0, 255], unrounded."""
  if images.ndim != 4 or images.shape[-1] != 3 or packed.shape != (images.shape[0], NUM_PACKED):
    raise ValueError(
        f'apply_packed_batch_jax expects images [B, S, S, 3] and parameters [B, {NUM_PACKED}], got '
        f"{images.shape} and {packed.shape}; batch what the pipeline delivers with placement='device'."
    )
  return jax.vmap(functools.partial(apply_params_jax, out_size=out_size))(images, unpack_params(packed))
