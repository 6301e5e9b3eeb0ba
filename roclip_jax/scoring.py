"""The eval-mode pass over a dataset: every example's unit image and caption embeddings, a batch at a time.

SafeCLIP's per-epoch split (each training example's own-caption cosine) and the suspicion report
(every embedding) run it over `pipeline.scoring_batches`. Each host decodes and encodes its own
slice of the examples; the jitted encoder replicates its outputs, so every host reads the whole
global batch back, its rows in process order (the layout of `sharding.global_batch`). Images never
outlive their batch. `encoder.Encoder` is the in-memory counterpart for arrays a caller already
holds (evaluators, notebooks).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from roclip_jax import losses
from roclip_jax import sharding as sharding_lib
from roclip_jax.data import image_ops

# What a pass keeps of a global batch's unit embeddings (image_emb, caption_emb), computed on device
# inside the jitted pass: the embeddings themselves, or a reduction such as their cosine.
Head = Callable[[jax.Array, jax.Array], dict[str, jax.Array]]


def unit_image_embeddings(model: Any, images: jax.Array) -> jax.Array:
  """[B, d] unit eval-mode embeddings of uint8 `images` [B, S, S, 3] under CLIP's preprocessing
  (`image_ops.normalize`): what evaluation sees. Traceable; the one place that says it, shared by
  this module's pass and the BadCLIP surrogate (`attacks.badclip`)."""
  return losses.l2_normalize(model.encode_image(image_ops.normalize(images), train=False))


def make_encode_fn(spec: Any, mesh: Mesh, head: Head):
  """Jitted `fn(params, model_state, batch) -> dict` on a global batch of `image` (uint8) and `text`
  (tokens): `head(image_emb, caption_emb)` of the eval-mode unit embeddings, plus the batch's other
  fields unchanged. Every output is replicated, so every host can read the whole global batch back."""

  def encode(params, model_state, batch):
    model = spec.merge(params, model_state)
    image_emb = unit_image_embeddings(model, batch["image"])
    caption_emb = losses.l2_normalize(model.encode_text(batch["text"]))
    return {**head(image_emb, caption_emb), **{k: v for k, v in batch.items() if k not in ("image", "text")}}

  return jax.jit(encode, out_shardings=NamedSharding(mesh, P()))


def gather_captions(local: np.ndarray) -> np.ndarray:
  """Every host's [B] caption strings, concatenated in process order (the order in which
  `sharding.global_batch` lays out the hosts' rows): UTF-8 bytes padded to the longest."""
  if jax.process_count() == 1:
    return local
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  encoded = [str(c).encode("utf-8") for c in local]
  width = int(np.max(multihost_utils.process_allgather(np.int32(max(map(len, encoded), default=0))))) or 1
  padded = np.zeros((len(encoded), width), np.uint8)
  for row, text in enumerate(encoded):
    padded[row, : len(text)] = np.frombuffer(text, np.uint8)
  gathered = np.asarray(multihost_utils.process_allgather(padded, tiled=True))
  return np.array([bytes(row).rstrip(b"\0").decode("utf-8") for row in gathered], object)


def encoded_batches(
    encode_fn,
    params,
    model_state,
    batches: Iterable[dict[str, np.ndarray]],
    mesh: Mesh,
    *,
    fields: Sequence[str] = (),
    captions: bool = False,
) -> Iterator[dict[str, np.ndarray]]:
  """`encode_fn`'s outputs (`make_encode_fn`) for each of `batches` (this host's
  `pipeline.scoring_batches`; every host must yield as many), on the host: the whole global batch,
  with `id` (int32) and the integer record `fields` (as int32) beside the head's outputs and, with
  `captions`, every host's caption strings. Rows that hold no example (invalid: past the end of a
  host's slice, or undecodable) are dropped."""
  for local in batches:
    batch = {
        "image": local["image"],
        "text": local["text"],
        "id": np.where(local["valid"], local["id"], -1).astype(np.int32),
        **{name: local[name].astype(np.int32) for name in fields},
    }
    batch = sharding_lib.global_batch(batch, mesh)
    with jax.set_mesh(mesh):
      out = {k: np.asarray(v) for k, v in jax.device_get(encode_fn(params, model_state, batch)).items()}
    if captions:
      out["caption"] = gather_captions(local["caption"])
    keep = out["id"] >= 0
    yield {k: v[keep] for k, v in out.items()}
