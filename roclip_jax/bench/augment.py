r"""Throughput of RoCLIP's image augmentation: host (per core) versus on device.

  python -m roclip_jax.bench.augment                      # image sizes 32 and 224
  python -m roclip_jax.bench.augment --image_size 224 --batch 256

The host version (`augment.augment_image`, numpy + PIL) runs in this one process, so its figure is
images/s per core; a grain pipeline with N workers scales it by about N. The device version
(`augment.augment_batch_jax`) is jitted, warmed up, and timed with `block_until_ready` on the
default jax device; so is `apply_packed_batch_jax`, what the train step runs with
`augment.placement='device'` (parameters drawn on the host). Inputs are random uint8 images a bit larger than the output (256 for 224), the
size a host would deliver to the on-device path.
"""

import functools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from roclip_jax.data import augment

_IMAGE_SIZE = flags.DEFINE_multi_integer(
    'image_size', [32, 224], 'Output side(s) of the augmented images; repeat for several.'
)
_BATCH = flags.DEFINE_integer('batch', 256, 'Images per on-device call.')
_HOST_IMAGES = flags.DEFINE_integer('host_images', 200, 'Images the host version augments.')
_DEVICE_REPEATS = flags.DEFINE_integer('device_repeats', 5, 'Timed on-device calls.')
_SOURCE_SCALE = flags.DEFINE_float('source_scale', 256 / 224, 'Input side = round(image_size * source_scale).')


def host_images_per_second(images: np.ndarray, out_size: int, count: int) -> float:
  cfg = augment.default_config()
  rng = np.random.default_rng(0)
  augment.augment_image(images[0], rng, cfg, out_size)  # first-call costs out of the timing
  start = time.perf_counter()
  for i in range(count):
    augment.augment_image(images[i % len(images)], rng, cfg, out_size)
  return count / (time.perf_counter() - start)


def device_placement_images_per_second(images: np.ndarray, out_size: int, repeats: int) -> float:
  """What the train step runs with augment.placement='device': the host's draws, applied on device."""
  cfg = augment.default_config()
  rng = np.random.default_rng(0)
  side = images.shape[1]
  packed = np.stack(
      [augment.pack_params(augment.sample_params(rng, cfg, side, side), side, side, side) for _ in images]
  )
  run = jax.jit(functools.partial(augment.apply_packed_batch_jax, out_size=out_size))
  batch, packed = jax.device_put(images), jax.device_put(packed)
  run(batch, packed).block_until_ready()  # compile + warm-up
  start = time.perf_counter()
  for _ in range(repeats):
    out = run(batch, packed)
  out.block_until_ready()
  return repeats * len(images) / (time.perf_counter() - start)


def device_images_per_second(images: np.ndarray, out_size: int, repeats: int) -> float:
  cfg = augment.default_config()
  run = jax.jit(functools.partial(augment.augment_batch_jax, cfg=cfg, out_size=out_size, dtype=jnp.uint8))
  batch = jax.device_put(images)
  run(batch, jax.random.key(0)).block_until_ready()  # compile + warm-up
  start = time.perf_counter()
  for step in range(repeats):
    out = run(batch, jax.random.key(step + 1))
  out.block_until_ready()
  return repeats * len(images) / (time.perf_counter() - start)


def main(argv):
  del argv
  device = jax.devices()[0]
  print(f'device: {device.platform} ({device.device_kind}), batch {_BATCH.value}')
  verdicts = []
  for out_size in _IMAGE_SIZE.value:
    source = round(out_size * _SOURCE_SCALE.value)
    images = np.random.default_rng(out_size).integers(0, 256, (_BATCH.value, source, source, 3), dtype=np.uint8)
    host = host_images_per_second(images, out_size, _HOST_IMAGES.value)
    dev = device_images_per_second(images, out_size, _DEVICE_REPEATS.value)
    placed = device_placement_images_per_second(images, out_size, _DEVICE_REPEATS.value)
    print(
        f'{source}->{out_size}: host {host:9.1f} img/s per core | '
        f'on-device {dev:9.1f} img/s ({dev / host:.1f}x one host core) | '
        f"placement='device' (host draws, device applies) {placed:9.1f} img/s"
    )
    verdicts.append(
        f'{out_size}px: {"on-device" if dev > host else "host"} ' f'({max(dev, host) / min(dev, host):.1f}x)'
    )
  print(
      f'verdict on {device.platform}: faster per image is '
      + '; '.join(verdicts)
      + ' (host figures are per core: multiply by the grain workers you can afford)'
  )


if __name__ == '__main__':
  app.run(main)
