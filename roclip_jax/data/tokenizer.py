"""OpenAI CLIP byte-level BPE tokenizer, fully offline.

A re-implementation of OpenAI's `clip/simple_tokenizer.py` (MIT) on top of the
BPE merges file shipped in `roclip_jax/assets/`. Token IDs equal OpenAI's:
vocab of 49,408 entries (256 byte symbols, their 256 end-of-word variants,
48,894 merges, then SOT=49406 and EOT=49407).

We implement the BPE ourselves rather than wrapping `transformers`, because
this object runs per example inside grain workers: it pickles to a few bytes
(workers rebuild it from the asset) and caches the BPE of every word it sees.
With that cache it is faster in the steady state than `CLIPTokenizerFast`
built from the same files (whose Rust pre-tokenizer regex dominates its cost):
1.3-2x the tokens/s on the demo captions, the zero-shot prompts and an
open-vocabulary corpus, single and batched; the Rust one wins only on a cold
cache (`python -m roclip_jax.bench.tokenizer`, docs/methods.md, section 3.3).

Sequence layout follows open_clip: `[SOT] + tokens + [EOT]`, zero-padded to
`context_length`. Over-long texts are truncated so that EOT is always the last
token, which matters because the text tower pools at the argmax token id (EOT
is the largest id). This differs from CyCLIP / the RoCLIP code, whose
truncation can cut EOT off (docs/methods.md, section 3.3).
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
import gzip
import html
import importlib.resources
from typing import Any

import ftfy
import numpy as np
import regex

SOT_TOKEN = "<|startoftext|>"
EOT_TOKEN = "<|endoftext|>"
SOT_ID = 49406
EOT_ID = 49407
VOCAB_SIZE = 49408
_NUM_MERGES = 49152 - 256 - 2  # As in OpenAI's simple_tokenizer.
_BPE_ASSET = "bpe_simple_vocab_16e6.txt.gz"
# Bound on the per-word BPE cache so a long run over a huge vocabulary of
# captions does not grow memory without limit.
_MAX_CACHE_WORDS = 200_000

# OpenAI's pre-tokenisation pattern (applied to lowercased text).
_WORD_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|""" r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_WHITESPACE = regex.compile(r"\s+")


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """Maps each byte to a printable unicode char (GPT-2/CLIP byte-level BPE)."""
  printable = (
      list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
  )
  codes = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      codes.append(256 + extra)
      extra += 1
  return dict(zip(printable, (chr(c) for c in codes)))


def clean_text(text: str) -> str:
  """OpenAI's cleaning: ftfy fix, html unescape twice, collapse spaces, lower."""
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip().lower()


def load_merges() -> list[tuple[str, str]]:
  """Reads the 48,894 BPE merges from the packaged asset."""
  asset = importlib.resources.files("roclip_jax") / "assets" / _BPE_ASSET
  with asset.open("rb") as f:
    lines = gzip.decompress(f.read()).decode("utf-8").split("\n")
  # Line 0 is a "#version" header; OpenAI keeps exactly _NUM_MERGES merges.
  return [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]


def build_vocab(merges: Sequence[tuple[str, str]]) -> list[str]:
  """The token list in id order, exactly as OpenAI builds it."""
  symbols = list(bytes_to_unicode().values())
  vocab = symbols + [s + "</w>" for s in symbols]
  vocab.extend("".join(m) for m in merges)
  vocab.extend([SOT_TOKEN, EOT_TOKEN])
  return vocab


class Tokenizer:
  """Callable CLIP tokenizer: texts -> int32 [N, context_length]."""

  def __init__(self, context_length: int = 77):
    if context_length < 2:
      raise ValueError(
          f"context_length={context_length} cannot hold [SOT] and [EOT]; "
          "set config.model.text.context_length >= 2 (CLIP uses 77)."
      )
    self.context_length = context_length
    merges = load_merges()
    vocab = build_vocab(merges)
    self.encoder: dict[str, int] = {tok: i for i, tok in enumerate(vocab)}
    self.decoder: dict[int, str] = dict(enumerate(vocab))
    self.bpe_ranks: dict[tuple[str, str], int] = {m: i for i, m in enumerate(merges)}
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    self._cache: dict[str, list[int]] = {}

  def __reduce__(self) -> tuple[Any, ...]:
    # Grain workers rebuild the tokenizer from the asset instead of receiving
    # the ~100k-entry dictionaries (and the cache) through a pipe.
    return (get_tokenizer, (self.context_length,))

  def _bpe(self, word: str) -> list[str]:
    """Merges the symbols of one (byte-encoded) word, lowest rank first."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = self.bpe_ranks
    while len(parts) > 1:
      pairs = zip(parts[:-1], parts[1:])
      best = min(pairs, key=lambda p: ranks.get(p, _NUM_MERGES))
      if best not in ranks:
        break
      first, second = best
      merged = []
      i = 0
      while i < len(parts):
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _word_ids(self, word: str) -> list[int]:
    ids = self._cache.get(word)
    if ids is None:
      encoded = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
      if word in (SOT_TOKEN, EOT_TOKEN):
        ids = [self.encoder[word]]
      else:
        ids = [self.encoder[t] for t in self._bpe(encoded)]
      if len(self._cache) >= _MAX_CACHE_WORDS:
        self._cache.clear()
      self._cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of one text, without SOT/EOT (OpenAI `encode`)."""
    ids: list[int] = []
    for word in _WORD_PATTERN.findall(clean_text(text)):
      ids.extend(self._word_ids(word))
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """Inverse of `encode`; SOT/EOT/padding (0 after EOT) are dropped."""
    tokens = []
    for i in ids:
      i = int(i)
      if i == EOT_ID:
        break
      if i == SOT_ID:
        continue
      tokens.append(self.decoder[i])
    text = "".join(tokens)
    raw = bytearray(self.byte_decoder[c] for c in text)
    return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
    """Tokenizes text(s) into int32 [N, context_length], zero-padded."""
    if isinstance(texts, str):
      texts = [texts]
    out = np.zeros((len(texts), self.context_length), np.int32)
    body = self.context_length - 2
    for row, text in enumerate(texts):
      if not isinstance(text, str):
        raise TypeError(
            f"Tokenizer expects str captions, got {type(text).__name__} at "
            f"position {row}; convert captions to str before tokenizing."
        )
      ids = self.encode(text)[:body]
      out[row, 0] = SOT_ID
      out[row, 1 : len(ids) + 1] = ids
      out[row, len(ids) + 1] = EOT_ID
    return out


@functools.cache
def get_tokenizer(context_length: int = 77) -> Tokenizer:
  """The shared tokenizer for a context length (built once per process)."""
  return Tokenizer(context_length)
