"""grain input pipelines: epoch-exact training batches and in-memory eval sets.

Training chain (per host):

  MapDataset.range(N)[host::hosts]        this host's fixed slice of example ids
    .shuffle(seed)                        a fresh permutation every epoch ...
    .repeat(num_epochs)                   ... because repeat reseeds per epoch
    .map_with_index(_ExampleLoader)       decode -> hook -> augment -> tokenize
    .to_iter_dataset()                    (+ .mp_prefetch(workers))
    _EpochBatchIterDataset                skip corrupt images, batch per epoch

Batching happens last, in the main process, because it must see the whole
stream in order: `mp_prefetch` hands every worker a strided slice of the
stream, so batching inside workers would make batch boundaries (and the
per-epoch remainder) depend on the worker count. Elements are small, so
moving them one by one costs little next to decoding and augmenting them.

Guarantees the trainer relies on:
* Every epoch yields exactly `steps_per_epoch` full batches, never mixing
  epochs, so batch k belongs to epoch `k // steps_per_epoch` (0-based). The
  per-epoch remainder of the host's shuffled slice is dropped.
* An image that fails to decode is skipped; the element stream carries the
  count, and `sum(batch['skipped'])` over an epoch is the number of
  undecodable images in that epoch's share of the host slice. If an epoch
  has more such images than its spare remainder, its last batches are
  topped up by re-reading decodable examples of the same epoch (the only
  case with duplicates inside an epoch).
* `iterator.get_state()` / `set_state()` resume exactly, with or without
  worker processes (for the same worker count).
* Storage faults are not bad data (see `image_ops`): an I/O error reading a
  record or an image that exists is retried with backoff
  (`config.data.io_retries`, `config.data.io_retry_base_seconds`), then
  `next()` raises `StorageError` (also from worker processes). After any
  exception in `next()`, `get_state()` is the state from before that call,
  so a checkpoint saved then reads the failed batch again on resume (and a
  further `next()` retries it).

Two views (`views=2`, for defenses whose steps read a second view, e.g. SafeCLIP and CleanCLIP):
each element also carries `image2` / `text2`, an always-augmented second view
made from the same decoded and `image_transform`-ed raw image and the same
caption, with random streams of their own. View 1 (`image` / `text`) is
exactly what `views = 1` gives. Plain views (`plain_views=True`, for a defense
that judges pairs by the example before augmentation, e.g. RoCLIP's
`gate_views`): each element also carries `image_plain` (the eval crop of the
same `image_transform`-ed image) and `text_plain` (the caption before EDA).

`scoring_batches` is a single in-order, eval-preprocessed pass over this
host's slice (SafeCLIP scores every training pair with it each epoch).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import concurrent.futures
import copy
import dataclasses
import json
import os
from typing import Any

from absl import logging
import grain
import numpy as np

from roclip_jax.data import augment
from roclip_jax.data import demo
from roclip_jax.data import eda
from roclip_jax.data import image_ops
from roclip_jax.data import sources
from roclip_jax.data import tokenizer as tokenizer_lib

# Raised by `next()` on a training iterator (and by the eval and scoring
# loaders) when storage fails even after retries; the trainer stops on it.
StorageError = image_ops.StorageError
ImageTransform = Callable[[dict[str, Any], np.ndarray], np.ndarray]
BATCH_KEYS = ("image", "text", "id", "label", "poisoned", "skipped")
VIEW2_KEYS = ("image2", "text2")  # Added to the batch keys when views == 2.
PLAIN_KEYS = ("image_plain", "text_plain")  # Added with plain_views: the un-augmented views.
_LOG_FIRST_SKIPS = 20  # Then one line per _LOG_SKIP_EVERY skipped images.
_LOG_SKIP_EVERY = 100
# Tags that separate the random streams derived from config.seed.
_SHUFFLE_TAG, _IMAGE_AUG_TAG, _TEXT_AUG_TAG = 1, 2, 3
_IMAGE_VIEW2_TAG, _TEXT_VIEW2_TAG = 4, 5
# Arrays of a worker's element smaller than this are pickled through its queue, not put in shared memory.
_MIN_SHM_BYTES = 4 << 20


def _derived_seed(*entropy: int, bits: int = 32) -> int:
  """A well-mixed seed from a tuple of non-negative ints."""
  words = np.random.SeedSequence([int(e) % 2**63 for e in entropy])
  state = words.generate_state(2, np.uint32)
  value = (int(state[0]) << 32) | int(state[1])
  return value % (2**bits)


def batch_keys(views: int = 1, device_views: tuple[str, ...] = (), plain_views: bool = False) -> tuple[str, ...]:
  """The keys of a training batch with `views` views per example; `device_views` (from
  `augment.device_views`) add each such view's packed augmentation parameters, `plain_views` the
  un-augmented views (`PLAIN_KEYS`)."""
  return (
      BATCH_KEYS
      + (VIEW2_KEYS if views == 2 else ())
      + (PLAIN_KEYS if plain_views else ())
      + tuple(augment.params_key(v) for v in device_views)
  )


def _check_views(views: Any) -> int:
  if views not in (1, 2):
    raise ValueError(
        f"views={views!r} is not supported; set it to 1 (one "
        "view per example) or 2 (an extra augmented view `image2`/`text2`, "
        "for SafeCLIP and CleanCLIP)."
    )
  return int(views)


@dataclasses.dataclass(frozen=True)
class ImageReader:
  """The one decode -> preprocess path: training, evaluation, SafeCLIP's scoring pass and the
  suspicion report all read images through it.

  `decode(record)` reads the record's image (`image_bytes` from ArrayRecord
  shards, an in-memory `image` array from TFDS, else the file `image_path`),
  decodes it and applies `image_transform(record, image)` (the backdoor
  trigger) if given; `eval_image(record)` then applies CLIP's eval
  preprocessing (`image_ops.resize_center_crop` to `image_size`); training
  augments the decoded image instead, when asked to. Bad data (a missing
  file, undecodable bytes) gives None, which callers count as skipped; a
  storage fault is retried (`retries` times, from `base_seconds`, see
  `image_ops.call_with_retries`) and then raises `StorageError`.
  """

  image_size: int = 0  # For `eval_image`.
  image_transform: ImageTransform | None = None
  retries: int = image_ops.IO_RETRIES
  base_seconds: float = image_ops.IO_RETRY_BASE_SECONDS

  @classmethod
  def from_config(
      cls, config: Any, image_transform: ImageTransform | None = None, image_size: int | None = None
  ) -> ImageReader:
    """Retries from `config.data.io_retries` / `io_retry_base_seconds`, size from the model."""
    size = int(config.model.image.image_size) if image_size is None else int(image_size)
    # The defaults are image_ops' constants, which config_lib's defaults are too.
    return cls(
        size,
        image_transform,
        int(config.data.get("io_retries", image_ops.IO_RETRIES)),
        float(config.data.get("io_retry_base_seconds", image_ops.IO_RETRY_BASE_SECONDS)),
    )

  def read_record(self, source: Any, index: int) -> dict[str, Any]:
    """`source[index]`; an OSError there (an ArrayRecord reader, a missing
    shard, a custom source's I/O) is a storage fault, retried."""
    return image_ops.call_with_retries(
        lambda: source[index],
        what=f"record {index} of {source!r}",
        retries=self.retries,
        base_seconds=self.base_seconds,
    )

  def decode(self, record: dict[str, Any]) -> np.ndarray | None:
    """The record's image, uint8 [H, W, 3], with `image_transform` applied; None for bad data."""
    if record.get("image") is not None:
      image = image_ops.as_rgb_uint8(record["image"])
    else:
      # ArrayRecord sources carry the encoded image itself (`image_bytes`).
      encoded = record.get("image_bytes")
      image = image_ops.decode_image(
          encoded if encoded is not None else record["image_path"],
          retries=self.retries,
          retry_base_seconds=self.base_seconds,
          name=_record_name(record),
      )
    if image is not None and self.image_transform is not None:
      image = self.image_transform(record, image)
    return image

  def eval_image(self, record: dict[str, Any]) -> np.ndarray | None:
    """`decode`, then CLIP's eval preprocessing to `image_size`."""
    image = self.decode(record)
    return None if image is None else self.eval_crop(image)

  def eval_crop(self, image: np.ndarray) -> np.ndarray:
    """CLIP's eval preprocessing of a decoded image: resize + centre crop to `image_size`."""
    return image_ops.resize_center_crop(image, self.image_size)


def _record_name(record: dict[str, Any]) -> str:
  """How a log line names a record: its image path, ArrayRecord origin, or id."""
  return record.get("image_path", record.get("origin", f"record {record.get('id', '?')}"))


def host_example_indices(num_examples: int, process_index: int, process_count: int) -> np.ndarray:
  """The example ids host `process_index` reads: a strided, disjoint slice."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is not in " f"[0, process_count={process_count}).")
  return np.arange(process_index, num_examples, process_count, dtype=np.int64)


# ------------------------------------------------------------ per element


class _ExampleLoader:
  """Turns (stream position, example id) into a training element.

  A picklable callable (it runs in grain worker processes). Returns a dict
  with the batch keys, or, for an undecodable image, a small marker dict
  with `_skipped_path`; it never returns None because grain would silently
  drop it and the skip could no longer be counted. With `views=2` it also
  returns `image2` (always image-augmented) and `text2` (always EDA'd); with
  `plain_views` also `image_plain` (CLIP's eval resize + centre crop of the same
  decoded, trigger-stamped image) and `text_plain` (the caption without EDA).
  A storage fault raises `StorageError` (after `io_retries`) instead.

  With `augment.placement='device'` an augmented view is the whole decoded
  image resized to `augment.device_source_size` plus `<view>_augment`, the
  parameters the host path would have drawn at this position (same random
  stream), packed for the train step (`augment.pack_params`).
  """

  def __init__(
      self,
      source: Any,
      *,
      epoch_length: int,
      image_size: int,
      context_length: int,
      seed: int,
      process_index: int,
      augment_cfg: Any,
      image_transform: ImageTransform | None,
      views: int = 1,
      plain_views: bool = False,
      reader: ImageReader = ImageReader(),
  ):
    self._source = source
    # Decodes and stamps the trigger; the size is this loader's (augmentation or eval crop).
    self._reader = dataclasses.replace(reader, image_size=image_size, image_transform=image_transform)
    self._epoch_length = epoch_length
    self._image_size = image_size
    self._tokenizer = tokenizer_lib.get_tokenizer(context_length)
    self._seed = seed
    # Hosts share positions, so the host index goes into the image key.
    self._image_key = _derived_seed(seed, _IMAGE_AUG_TAG, process_index, bits=64)
    self._augment_cfg = augment_cfg
    self._augment_image = bool(augment_cfg.get("image", False))
    self._augment_text = bool(augment_cfg.get("text", False))
    self._resample_text = bool(augment_cfg.get("text_resample_per_epoch", False))
    self._views = _check_views(views)
    self._plain_views = bool(plain_views)
    self._image2_key = _derived_seed(seed, _IMAGE_VIEW2_TAG, process_index, bits=64)
    self._device_views = augment.device_views(augment_cfg, self._views)
    if self._device_views:
      self._device_source_size = augment.device_source_size(augment_cfg, image_size)
    if self._augment_image or self._views == 2:
      # Read (and checked) once here, not per example: the image fields the sampling reads.
      self._augment_settings = augment.read_settings(augment_cfg)

  def _augmented_image(self, raw: np.ndarray, key: int, position: int) -> np.ndarray:
    # Keyed by stream position: differs across epochs, fixed on resume.
    rng = np.random.Generator(np.random.Philox(key=(key << 64) | position))
    return augment.augment_image(raw, rng, self._augment_settings, self._image_size)

  def _device_view(self, raw: np.ndarray, source: np.ndarray, key: int, position: int) -> np.ndarray:
    """The packed parameters `_augmented_image` would draw (same stream) for the train step."""
    rng = np.random.Generator(np.random.Philox(key=(key << 64) | position))
    params = augment.sample_params(rng, self._augment_settings, raw.shape[0], raw.shape[1])
    return augment.pack_params(params, raw.shape[0], raw.shape[1], source.shape[0])

  def _eda_caption(self, caption: str, tag: int, example_id: int, position: int) -> str:
    # One fixed EDA version per caption for the whole run (docs/methods.md,
    # section 3.2), unless resampling per epoch was asked for.
    entropy = [self._seed, tag, example_id]
    if self._resample_text:
      entropy.append(position // self._epoch_length)
    return eda.eda(caption, np.random.default_rng(entropy), self._augment_cfg)

  def __call__(self, position: int, example_index: int) -> dict[str, Any]:
    record = self._reader.read_record(self._source, example_index)
    raw = self._reader.decode(record)
    if raw is None:
      return {"_position": position, "_skipped_path": _record_name(record)}
    device = {}  # view -> packed augmentation parameters, for views augmented in the train step.
    if self._device_views:
      # One resize serves both views.
      source = augment.resize_for_device(raw, self._device_source_size)
    if "image" in self._device_views:
      image = source
      device["image"] = self._device_view(raw, source, self._image_key, position)
    elif self._augment_image:
      image = self._augmented_image(raw, self._image_key, position)
    else:
      image = self._reader.eval_crop(raw)
    example_id = int(record["id"])
    caption = record["caption"]
    if self._augment_text:
      caption = self._eda_caption(caption, _TEXT_AUG_TAG, example_id, position)
    element = {
        "_position": position,
        "image": np.ascontiguousarray(image, np.uint8),
        "text": self._tokenizer(caption)[0],
        "id": np.int64(record["id"]),
        "label": np.int64(record["label"]),
        "poisoned": np.int8(record["poisoned"]),
    }
    if self._views == 2:
      # The second view is always augmented, whatever augment.image/text say.
      if "image2" in self._device_views:
        image2 = source
        device["image2"] = self._device_view(raw, source, self._image2_key, position)
      else:
        image2 = self._augmented_image(raw, self._image2_key, position)
      caption2 = self._eda_caption(record["caption"], _TEXT_VIEW2_TAG, example_id, position)
      element["image2"] = np.ascontiguousarray(image2, np.uint8)
      element["text2"] = self._tokenizer(caption2)[0]
    if self._plain_views:
      # What the example is, before augmentation: a defense judges pairs by it (RoCLIP's gate). A view
      # that is not augmented is its own plain view.
      image_augmented = "image" in self._device_views or self._augment_image
      plain = self._reader.eval_crop(raw) if image_augmented else image
      element["image_plain"] = np.ascontiguousarray(plain, np.uint8)
      element["text_plain"] = self._tokenizer(record["caption"])[0] if self._augment_text else element["text"]
    for view, packed in device.items():
      element[augment.params_key(view)] = packed
    return element


# ------------------------------------------------------ epoch batching


class _EpochBatchIterator(grain.DatasetIterator):
  """Batches the in-order element stream without crossing epochs."""

  def __init__(
      self,
      parent: grain.DatasetIterator,
      *,
      random_access: grain.MapDataset,
      batch_size: int,
      steps_per_epoch: int,
      epoch_length: int,
      num_epochs: int,
      keys: tuple[str, ...] = BATCH_KEYS,
  ):
    super().__init__(parent)
    self._keys = tuple(keys)
    self._random_access = random_access
    self._batch_size = batch_size
    self._steps = steps_per_epoch
    self._epoch_length = epoch_length
    self._num_epochs = num_epochs
    self._next_position = 0  # Stream position of the parent's next element.
    self._batches_emitted = 0
    self._topup_cursor = 0
    self._num_skipped_logged = 0
    # The state from before a `__next__` that raised, else None.
    self._failed_at: dict[str, Any] | None = None

  def _read(self) -> dict[str, Any]:
    element = next(self._parent)
    if element["_position"] != self._next_position:
      raise RuntimeError(
          f"Input stream out of order: expected position "
          f"{self._next_position}, got {element['_position']}. Was the "
          "iterator state restored with a different num_workers?"
      )
    self._next_position += 1
    return element

  def _log_skip(self, path: str) -> None:
    self._num_skipped_logged += 1
    count = self._num_skipped_logged
    if count <= _LOG_FIRST_SKIPS or count % _LOG_SKIP_EVERY == 0:
      logging.warning(
          "Skipping an image that cannot be decoded: %s (%d " "skipped by this iterator so far).", path, count
      )

  def _top_up(self, epoch: int, elements: list[dict[str, Any]]) -> None:
    """Fills a batch from the start of the epoch when images ran short."""
    misses = 0
    while len(elements) < self._batch_size:
      position = epoch * self._epoch_length + (self._topup_cursor % self._epoch_length)
      self._topup_cursor += 1
      element = self._random_access[position]
      if "_skipped_path" in element:
        misses += 1
        if misses >= self._epoch_length:
          raise RuntimeError(
              "No image in this host's share of the dataset can be decoded; "
              "check the image paths and config.data.image_root."
          )
        continue
      elements.append(dict(element, skipped=0))

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._failed_at is not None:
      # The last call failed part-way: start again from before it, so that
      # the failed batch is read again whole.
      self.set_state(self._failed_at)
    if self._batches_emitted >= self._num_epochs * self._steps:
      raise StopIteration
    # Copied: a parent may hand out (and later change) its own state object.
    before = copy.deepcopy(self.get_state())
    try:
      return self._next_batch()
    except BaseException:
      # The failed call consumed part of the batch from the parent, whose own
      # position cannot be trusted after an error (grain's thread prefetch
      # has dropped the failed element; a worker iterator is exhausted). So
      # keep the state from before the call: a checkpoint saved now reads the
      # failed batch again on resume.
      self._failed_at = before
      raise

  def _next_batch(self) -> dict[str, np.ndarray]:
    epoch, step = divmod(self._batches_emitted, self._steps)
    epoch_end = (epoch + 1) * self._epoch_length
    elements: list[dict[str, Any]] = []
    skipped = 0
    while len(elements) < self._batch_size and self._next_position < epoch_end:
      element = self._read()
      if "_skipped_path" in element:
        skipped += 1
        self._log_skip(element["_skipped_path"])
      else:
        elements.append(dict(element, skipped=skipped))
        skipped = 0
    last_of_epoch = step == self._steps - 1
    if last_of_epoch:
      # Consume the dropped remainder now, so its skips count in this epoch
      # and the next batch starts at the next epoch's first element.
      while self._next_position < epoch_end:
        element = self._read()
        if "_skipped_path" in element:
          skipped += 1
          self._log_skip(element["_skipped_path"])
    if len(elements) < self._batch_size:
      self._top_up(epoch, elements)
    elements[-1]["skipped"] += skipped
    if last_of_epoch:
      self._topup_cursor = 0
    self._batches_emitted += 1
    batch = {key: np.stack([e[key] for e in elements]) for key in self._keys}
    batch["skipped"] = batch["skipped"].astype(np.int32)
    return batch

  def get_state(self) -> dict[str, Any]:
    if self._failed_at is not None:
      return copy.deepcopy(self._failed_at)
    return {
        "parent": self._parent.get_state(),
        "next_position": self._next_position,
        "batches_emitted": self._batches_emitted,
        "topup_cursor": self._topup_cursor,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._next_position = int(state["next_position"])
    self._batches_emitted = int(state["batches_emitted"])
    self._topup_cursor = int(state["topup_cursor"])
    self._failed_at = None

  def __str__(self) -> str:
    return f"_EpochBatchIterator(batch_size={self._batch_size}, " f"steps_per_epoch={self._steps})"


class _EpochBatchIterDataset(grain.IterDataset):
  """See `_EpochBatchIterator`."""

  def __init__(self, parent: grain.IterDataset, **kwargs: Any):
    super().__init__(parent)
    self._kwargs = kwargs

  def __iter__(self) -> _EpochBatchIterator:
    return _EpochBatchIterator(self._parent.__iter__(), **self._kwargs)

  def __str__(self) -> str:
    return "_EpochBatchIterDataset"


# ------------------------------------------------------------ public API


@dataclasses.dataclass
class TrainData:
  """A training iterator plus the numbers the trainer needs."""

  iterator: grain.DatasetIterator  # Yields dicts of numpy arrays.
  steps_per_epoch: int
  num_examples: int  # Examples in the source (all hosts together).
  local_batch_size: int
  source: Any  # The record source read (a CsvSource unless one was given).
  num_epochs: int = 1


def make_train_data(
    config: Any,
    *,
    process_index: int = 0,
    process_count: int = 1,
    image_transform: ImageTransform | None = None,
    source: Any | None = None,
    views: int = 1,
    plain_views: bool = False,
) -> TrainData:
  """Builds this host's training iterator.

  Args:
    config: the experiment ConfigDict (reads `seed`, `num_epochs`, `data.*`,
      `model.image.image_size`, `model.text.context_length`, `augment.*`).
    process_index: this host's index (`jax.process_index()`).
    process_count: number of hosts (`jax.process_count()`).
    image_transform: optional `fn(record, uint8 image) -> uint8 image`
      applied to the raw decoded image before augmentation (poisoning hooks
      in here). Must be picklable when `config.data.num_workers > 0`.
    source: optional random-access source of records (`__len__`,
      `__getitem__` -> {'id', 'image_path' or 'image_bytes', 'caption',
      'label', 'poisoned'})
      to read instead of `sources.make_source(config.data)`, e.g. a
      poisoned wrapper around it. Must be picklable when using workers.
    views: views of each example per batch, 1 or 2 (the defense's `views`).
    plain_views: also the un-augmented views `image_plain` uint8 [b, S, S, 3]
      and `text_plain` int32 [b, L] (the defense's `plain_views(config)`).

  Returns:
    `TrainData`; batches are dicts with `image` uint8 [b, S, S, 3], `text`
    int32 [b, L], `id` int64, `label` int64, `poisoned` int8 and `skipped`
    int32, each [b] (b = local batch size). With `views = 2` they also hold `image2` uint8 [b, S, S, 3] and `text2` int32
    [b, L]: a second view of the same example, always image-augmented and
    EDA-augmented (from the same `image_transform`-ed raw image), whatever
    `augment.image` / `augment.text` say. With `augment.placement='device'`
    each augmented view is instead uint8 [b, D, D, 3] (the whole image resized
    to D = `augment.device_source_size`) with its float32 parameters
    `<view>_augment` [b, augment.NUM_PACKED], applied by the train step;
    `batch_keys(views, augment.device_views(config.augment, views))` lists the keys.
  """
  data_cfg = config.data
  if data_cfg.batch_size % process_count:
    raise ValueError(
        f"config.data.batch_size={data_cfg.batch_size} is not divisible by "
        f"the {process_count} processes; pick a multiple of {process_count}."
    )
  local_batch_size = data_cfg.batch_size // process_count
  views = _check_views(views)
  num_epochs = int(config.num_epochs)
  if local_batch_size < 1 or num_epochs < 1:
    raise ValueError(
        f"config.data.batch_size={data_cfg.batch_size} and " f"config.num_epochs={num_epochs} must be positive."
    )
  if config.seed < 0:
    raise ValueError(f"config.seed={config.seed} must be non-negative.")
  if source is None:
    source = sources.make_source(data_cfg, "train")
  host_indices = host_example_indices(len(source), process_index, process_count)
  # Every host must run the same number of steps: size them by the smallest
  # slice, len(source) // process_count.
  steps_per_epoch = (len(source) // process_count) // local_batch_size
  if steps_per_epoch == 0:
    raise ValueError(
        f"The training source has {len(source)} examples, fewer than one "
        f"batch of {local_batch_size} per host; lower config.data.batch_size "
        "or use more data."
    )

  loader = _ExampleLoader(
      source,
      epoch_length=len(host_indices),
      image_size=config.model.image.image_size,
      context_length=config.model.text.context_length,
      seed=config.seed,
      process_index=process_index,
      augment_cfg=config.augment,
      image_transform=image_transform,
      views=views,
      plain_views=plain_views,
      reader=ImageReader.from_config(config),
  )
  dataset = (
      grain.MapDataset.source(host_indices)
      .shuffle(seed=_derived_seed(config.seed, _SHUFFLE_TAG))
      .repeat(num_epochs)
      .map_with_index(loader)
  )

  num_workers = int(data_cfg.get("num_workers", 0) or 0)
  prefetch_batches = max(1, int(data_cfg.get("prefetch_buffer", 2) or 1))
  buffered = prefetch_batches * local_batch_size  # In elements.
  stream = dataset.to_iter_dataset(
      grain.ReadOptions(num_threads=max(1, min(8, os.cpu_count() or 1)), prefetch_buffer_size=buffered)
  )
  if num_workers > 0:
    # grain's default copies every array of every element into a shared-memory segment of its own
    # (created, mapped, page-faulted and unlinked per array): for these small elements (a 224-px image is
    # 150 KB, the tokens 308 bytes) pickling them through the worker's queue cost less CPU in the workers
    # and the trainer (issue 25; docs/performance.md, "The input pipeline"). Bitwise the same elements.
    stream = grain.experimental.WithOptionsIterDataset(
        stream, grain.experimental.DatasetOptions(min_shm_size=_MIN_SHM_BYTES)
    )
    stream = stream.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=num_workers, per_worker_buffer_size=max(1, buffered // num_workers))
    )
  batches = _EpochBatchIterDataset(
      stream,
      random_access=dataset,
      batch_size=local_batch_size,
      steps_per_epoch=steps_per_epoch,
      epoch_length=len(host_indices),
      num_epochs=num_epochs,
      keys=batch_keys(views, augment.device_views(config.augment, views), plain_views),
  )
  return TrainData(
      iterator=iter(batches),
      steps_per_epoch=steps_per_epoch,
      num_examples=len(source),
      local_batch_size=local_batch_size,
      source=source,
      num_epochs=num_epochs,
  )


@dataclasses.dataclass
class EvalSet:
  """A labelled eval split held in memory, eval-preprocessed."""

  images: np.ndarray  # uint8 [N, S, S, 3]
  labels: np.ndarray  # int64 [N]
  captions: list[str]
  ids: np.ndarray  # int64 [N], the source ids
  class_names: list[str]
  templates: list[str]
  num_skipped: int = 0  # Undecodable images left out.


def _read_classes(path: str) -> tuple[list[str], list[str]]:
  try:
    with open(path, encoding="utf-8") as f:
      spec = json.load(f)
  except (OSError, json.JSONDecodeError) as e:
    raise ValueError(
        f"Cannot read the classes file {path!r} ({e}); set "
        "config.data.classes_json to a JSON file with "
        '{"classes": [...], "templates": [...]}.'
    ) from e
  classes = spec.get("classes") if isinstance(spec, dict) else None
  if not classes or not all(isinstance(c, str) for c in classes):
    raise ValueError(f"{path} needs a non-empty list of strings under " '"classes" (class names in label order).')
  templates = spec.get("templates") or list(demo.TEMPLATES)
  if not all(isinstance(t, str) and "{}" in t for t in templates):
    raise ValueError(
        f'{path}: every entry of "templates" must be a string ' "with a '{}' placeholder for the class name."
    )
  return list(classes), list(templates)


@dataclasses.dataclass
class LabelledSplit:
  source: Any  # A CsvSource with a label column.
  class_names: list[str]
  templates: list[str]


def labelled_split(config: Any, split: str = "test") -> LabelledSplit:
  """The records and class names of a labelled split, without decoding images.

  Uses `config.data.eval_csv` + `config.data.classes_json` when set, else the
  demo dataset's split (with its classes.json).
  """
  data_cfg = config.data
  eval_csv = data_cfg.get("eval_csv", "") or ""
  if eval_csv:
    classes_json = data_cfg.get("classes_json", "") or ""
    if not classes_json:
      raise ValueError(
          "config.data.eval_csv is set but config.data."
          "classes_json is empty; point it at a JSON file with "
          '{"classes": [...], "templates": [...]}.'
      )
    source = sources.csv_source_from_config(data_cfg, eval_csv)
  elif data_cfg.source == "demo":
    source = sources.make_source(data_cfg, split)
    classes_json = os.path.join(os.path.dirname(source.path), "classes.json")
  else:
    raise ValueError(
        f"config.data.source={data_cfg.source!r} has no built-in eval split; "
        "set config.data.eval_csv (with a label column) and "
        "config.data.classes_json."
    )
  class_names, templates = _read_classes(classes_json)
  labels = source.labels
  if labels.min() < 0 or labels.max() >= len(class_names):
    raise ValueError(
        f"{source.path} has labels in [{labels.min()}, {labels.max()}] but "
        f"{classes_json} lists {len(class_names)} classes; every row needs a "
        f"label in [0, {len(class_names)}) (config.data.label_key)."
    )
  return LabelledSplit(source=source, class_names=class_names, templates=templates)


def make_eval_arrays(config: Any, split: str = "test") -> EvalSet:
  """Loads a labelled eval split into memory (CLIP eval preprocessing).

  See `labelled_split` for where the split comes from. Undecodable and
  missing images are left out and counted in `num_skipped`; a storage fault
  raises `StorageError` (after `config.data.io_retries`).
  """
  split_data = labelled_split(config, split)
  source, class_names, templates = split_data.source, split_data.class_names, split_data.templates
  reader = ImageReader.from_config(config)
  records = [source[i] for i in range(len(source))]
  with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
    images = list(pool.map(reader.eval_image, records))
  keep = [i for i, image in enumerate(images) if image is not None]
  for i in [i for i, image in enumerate(images) if image is None][:20]:
    logging.warning("Eval split: skipping undecodable image %s", records[i]["image_path"])
  if not keep:
    raise ValueError(f"No image of {source.path} could be decoded; check " "the paths and config.data.image_root.")
  return EvalSet(
      images=np.stack([images[i] for i in keep]),
      labels=np.asarray([records[i]["label"] for i in keep], np.int64),
      captions=[records[i]["caption"] for i in keep],
      ids=np.asarray([records[i]["id"] for i in keep], np.int64),
      class_names=class_names,
      templates=templates,
      num_skipped=len(records) - len(keep),
  )


# ---------------------------------------------------------------- scoring


class ScoringBatches:
  """Iterator over `scoring_batches`; `num_skipped` grows as it goes.

  `num_batches` is known up front and equal on every host; `num_skipped`
  (undecodable images seen so far) is final once the iterator is exhausted.
  """

  def __init__(self, batches: Iterator[dict[str, np.ndarray]], num_batches: int):
    self._batches = batches
    self.num_batches = num_batches
    self.num_skipped = 0

  def __iter__(self) -> ScoringBatches:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._batches)

  def __len__(self) -> int:
    return self.num_batches


def scoring_batches(
    config: Any,
    source: Any,
    *,
    batch_size: int,
    image_transform: ImageTransform | None = None,
    process_index: int = 0,
    process_count: int = 1,
) -> ScoringBatches:
  """One in-order, eval-preprocessed pass over this host's slice of `source`.

  For scoring every training pair (SafeCLIP's per-epoch cosine). Reads the
  ids `host_example_indices(len(source), process_index, process_count)` in
  order, in chunks of `batch_size`: decodes each image (`image_bytes` or
  `image_path`) in a thread pool, applies `image_transform(record, image)`
  if given, then `resize_center_crop` to `config.model.image.image_size` (no
  augmentation); captions are tokenized to `config.model.text.context_length`.

  Every host yields the same number of batches,
  ceil(ceil(len(source) / process_count) / batch_size), each with exactly
  `batch_size` rows (the per-host batch), so the batches can feed a
  collective jitted function. Rows past the end of the slice and rows whose
  image cannot be decoded are invalid: `valid` False, `id` -1 and zeros
  elsewhere; the undecodable ones are counted in the returned iterator's
  `num_skipped`. A storage fault raises `StorageError` (after
  `config.data.io_retries`; see `image_ops`).

  Yields:
    dicts with `image` uint8 [batch_size, S, S, 3], `text` int32
    [batch_size, L], `id` int64, `poisoned` int8, `valid` bool and
    `caption` (the untokenized strings, "" where invalid; a NumPy object
    array), each [batch_size].
  """
  if batch_size < 1:
    raise ValueError(f"scoring_batches needs batch_size >= 1, got " f"{batch_size}.")
  host_indices = host_example_indices(len(source), process_index, process_count)
  per_host = -(-len(source) // process_count)
  num_batches = -(-per_host // batch_size)
  size = int(config.model.image.image_size)
  tokenizer = tokenizer_lib.get_tokenizer(config.model.text.context_length)
  context_length = int(config.model.text.context_length)

  reader = ImageReader.from_config(config, image_transform)

  def load(index: int) -> tuple[dict[str, Any], np.ndarray | None]:
    record = reader.read_record(source, int(index))
    return record, reader.eval_image(record)

  def generate() -> Iterator[dict[str, np.ndarray]]:
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
      for b in range(num_batches):
        chunk = host_indices[b * batch_size : (b + 1) * batch_size]
        batch = {
            "image": np.zeros((batch_size, size, size, 3), np.uint8),
            "text": np.zeros((batch_size, context_length), np.int32),
            "id": np.full((batch_size,), -1, np.int64),
            "poisoned": np.zeros((batch_size,), np.int8),
            "valid": np.zeros((batch_size,), bool),
            "caption": np.full((batch_size,), "", object),
        }
        captions, rows = [], []
        for row, (record, image) in enumerate(pool.map(load, chunk)):
          if image is None:
            result.num_skipped += 1
            if result.num_skipped <= _LOG_FIRST_SKIPS:
              logging.warning("Scoring pass: skipping undecodable image %s", _record_name(record))
            continue
          batch["image"][row] = image
          batch["id"][row] = record["id"]
          batch["poisoned"][row] = record["poisoned"]
          batch["valid"][row] = True
          batch["caption"][row] = str(record["caption"])
          captions.append(record["caption"])
          rows.append(row)
        if captions:
          batch["text"][rows] = tokenizer(captions)
        yield batch

  result = ScoringBatches(generate(), num_batches)
  return result
