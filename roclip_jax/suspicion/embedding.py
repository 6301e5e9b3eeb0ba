"""A run's training set, rebuilt as the trainer built it and encoded in one streaming pass.

`embed_training_set` runs the eval-mode pass of `roclip_jax.scoring` (SafeCLIP's split runs the
same) over `pipeline.scoring_batches`: each host decodes and encodes its own slice of the examples
and gets the whole global batch's embeddings back. Images are dropped as soon as they are encoded;
what is kept is [N, d] float32 per modality, the ids and poison codes, and the captions (for the
CSV), so host memory is O(N d) plus the captions.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Iterable
from typing import Any

from absl import logging
import jax
import numpy as np

from roclip_jax import scoring
from roclip_jax import sharding as sharding_lib
from roclip_jax import steps as steps_lib
from roclip_jax import train
from roclip_jax.data import metadata as metadata_lib

# Examples per host per batch of the embedding pass.
DEFAULT_BATCH_SIZE = 256


def training_source(config: Any) -> tuple[Any, Any]:
  """The run's training source, rebuilt with the same poisons (by seed), and the image transform
  that stamps the backdoor trigger where the trainer stamped it (None without poisoning)."""

  config = copy.deepcopy(config)
  config.data.num_workers = 0  # Only the source is needed; start no worker processes.
  # Before the defense picks its records: where it trains on a subset (CleanCLIP's clean one), the data
  # worth screening is the poisoned training set the subset was drawn from. workdir=None: writes nothing.
  source, _, transform = train.build_train_source(config, workdir=None)
  return source, transform


@dataclasses.dataclass
class EmbeddedTrainingSet:
  """Every decodable training example of a run, encoded; rows in ascending id order."""

  ids: np.ndarray  # int64 [N]
  captions: list[str]
  image_emb: np.ndarray  # float32 [N, d], unit rows (eval preprocessing, trigger stamped as in training).
  caption_emb: np.ndarray  # float32 [N, d], unit rows.
  poison_codes: np.ndarray  # int8 [N], the records' `poisoned` field (0 clean).
  num_skipped: int  # Undecodable images left out (over all hosts).


def _embeddings(image_emb, caption_emb):
  """The head of the report's pass (`scoring.make_encode_fn`): the unit embeddings themselves."""
  return {"image_emb": image_emb, "caption_emb": caption_emb}


def embed_training_set(
    config: Any, state: Any, batches: Iterable[dict[str, np.ndarray]], num_examples: int | None = None
) -> EmbeddedTrainingSet:
  """Encodes `batches` (this host's `pipeline.scoring_batches`; every host must yield as many) with
  the run's `config` and train `state`. Every host gets every example. Process 0 shows a progress
  bar (examples/s) over `num_examples`, the source's length."""

  mesh = sharding_lib.make_mesh([("data", -1)])  # The mesh `runs.restore` restored the state on.
  encode = scoring.make_encode_fn(steps_lib.ModelSpec.create(config.model), mesh, _embeddings)
  ids, captions, image_emb, caption_emb, codes = [], [], [], [], []
  start = time.perf_counter()
  num_seen = 0
  with metadata_lib.progress_bar(num_examples, "suspicion: embedding pass", enabled=jax.process_index() == 0) as bar:
    for batch in scoring.encoded_batches(
        encode, state.params, state.model_state, batches, mesh, fields=("poisoned",), captions=True
    ):
      ids.append(batch["id"].astype(np.int64))
      image_emb.append(batch["image_emb"].astype(np.float32))
      caption_emb.append(batch["caption_emb"].astype(np.float32))
      codes.append(batch["poisoned"].astype(np.int8))
      captions.extend(str(c) for c in batch["caption"])
      num_seen += len(batch["id"])
      bar.update(len(batch["id"]))  # The global batch: every host's examples.
  if not num_seen:
    raise ValueError("No training image could be decoded; check config.data of the run.")
  num_skipped = int(getattr(batches, "num_skipped", 0))
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

    num_skipped = int(np.sum(multihost_utils.process_allgather(np.int64(num_skipped))))
  ids = np.concatenate(ids)
  order = np.argsort(ids, kind="stable")  # Hosts read strided slices: back to id order.
  seconds = time.perf_counter() - start
  logging.info(
      "Embedding pass: %d examples in %.1f s (%.0f examples/s).", num_seen, seconds, num_seen / max(seconds, 1e-9)
  )
  return EmbeddedTrainingSet(
      ids=ids[order],
      captions=[captions[i] for i in order],
      image_emb=np.concatenate(image_emb)[order],
      caption_emb=np.concatenate(caption_emb)[order],
      poison_codes=np.concatenate(codes)[order],
      num_skipped=num_skipped,
  )
