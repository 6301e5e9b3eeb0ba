r"""Tokens/s of the package's CLIP tokenizer against one on `transformers.CLIPTokenizerFast`.

  python -m roclip_jax.bench.tokenizer
  python -m roclip_jax.bench.tokenizer --open_captions=20000 --repeats=5

Both tokenizers give the same int32 [N, context_length] arrays (checked here before timing, and in
`tests/test_tokenizer.py` on every demo caption and hard cases):

* `package`: `roclip_jax.data.tokenizer.Tokenizer`, OpenAI's BPE in Python with a per-word cache;
* `fast`: `FastTokenizer`, the BPE and OpenAI's pre-tokenisation in Hugging Face's Rust `tokenizers`
  through `CLIPTokenizerFast`, built in memory from the same packaged vocabulary and merges.

Corpora (fixed, built offline): every caption the demo dataset can write; the zero-shot prompts
(the 80 ImageNet templates and the demo's own, times the demo class names); and an open-vocabulary
corpus of WordNet words drawn with Zipf frequencies (seeded), whose 80k-word vocabulary exercises the
BPE where the demo's 60 words mostly hit the cache. Each corpus is timed as one batched call and as
one call per caption (what a grain worker does), first on a fresh tokenizer (`cold`: empty caches)
and then again (`warm`, the best of `--repeats`: the steady state of a training run).

Needs `transformers` (requirements-test.txt); the package itself does not.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import gzip
import importlib.resources
import json
import os
import time

from absl import app
from absl import flags
import numpy as np

from roclip_jax.data import demo
from roclip_jax.data import tokenizer as tokenizer_lib
from roclip_jax.data import templates

_OPEN_CAPTIONS = flags.DEFINE_integer("open_captions", 10_000, "Captions in the open-vocabulary corpus.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Warm timings per case; the best is printed.")
_CONTEXT_LENGTH = flags.DEFINE_integer("context_length", 77, "Tokens per row (77 as OpenAI's CLIP).")

_SPECIAL_IDS = {tokenizer_lib.SOT_TOKEN: tokenizer_lib.SOT_ID, tokenizer_lib.EOT_TOKEN: tokenizer_lib.EOT_ID}


class FastTokenizer:
  """The package tokenizer's interface and ids, with the BPE in Rust (`CLIPTokenizerFast`).

  Two steps stay in Python because the Rust pipeline cannot reproduce OpenAI's exactly:
  * the text cleaning (`tokenizer_lib.clean_text`: ftfy, HTML unescaping). The fast tokenizer's
    normalizer is switched off: it lacks both, and its NFC would recompose accents that OpenAI's
    cleaning leaves decomposed (`<b>cafe&#769;</b>`);
  * captions holding the text `<|startoftext|>` or `<|endoftext|>`: OpenAI finds them with its word
    pattern (so `.<|endoftext|>` is the punctuation `.<|` and letters), while the fast tokenizer
    would match them anywhere as special tokens. Such captions are split with OpenAI's pattern.
  """

  def __init__(self, context_length: int = 77):
    try:
      import transformers  # pylint: disable=g-import-not-at-top
    except ImportError as e:
      raise ImportError("FastTokenizer needs transformers: pip install -r requirements-test.txt") from e
    self.context_length = context_length
    merges = tokenizer_lib.load_merges()
    vocab = tokenizer_lib.build_vocab(merges)
    fast = transformers.CLIPTokenizerFast(vocab={token: i for i, token in enumerate(vocab)}, merges=merges)
    self._backend = fast.backend_tokenizer
    self._backend.normalizer = None

  def _has_special(self, text: str) -> bool:
    return tokenizer_lib.SOT_TOKEN in text or tokenizer_lib.EOT_TOKEN in text

  def _encode_words(self, text: str) -> list[int]:
    ids: list[int] = []
    for word in tokenizer_lib._WORD_PATTERN.findall(text):  # pylint: disable=protected-access
      special = _SPECIAL_IDS.get(word)
      # A non-special word cannot hold a whole special token (only the pattern's first two
      # branches match one), so the fast tokenizer keeps it one word.
      ids.extend([special] if special is not None else self._backend.encode(word, add_special_tokens=False).ids)
    return ids

  def encode(self, text: str) -> list[int]:
    text = tokenizer_lib.clean_text(text)
    if self._has_special(text):
      return self._encode_words(text)
    return self._backend.encode(text, add_special_tokens=False).ids

  def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
    if isinstance(texts, str):
      texts = [texts]
    cleaned = [tokenizer_lib.clean_text(text) for text in texts]
    plain = [row for row, text in enumerate(cleaned) if not self._has_special(text)]
    ids_per_row: list[list[int]] = [[] for _ in cleaned]
    if len(plain) == 1:
      ids_per_row[plain[0]] = self._backend.encode(cleaned[plain[0]], add_special_tokens=False).ids
    elif plain:
      # The batched Rust call (threads, no offsets): the fast tokenizer's best case.
      encodings = self._backend.encode_batch_fast([cleaned[row] for row in plain], add_special_tokens=False)
      for row, encoding in zip(plain, encodings):
        ids_per_row[row] = encoding.ids
    for row, text in enumerate(cleaned):
      if self._has_special(text):
        ids_per_row[row] = self._encode_words(text)
    out = np.zeros((len(cleaned), self.context_length), np.int32)
    body = self.context_length - 2
    for row, ids in enumerate(ids_per_row):
      ids = ids[:body]
      out[row, 0] = tokenizer_lib.SOT_ID
      out[row, 1 : len(ids) + 1] = ids
      out[row, len(ids) + 1] = tokenizer_lib.EOT_ID
    return out


def zero_shot_prompts() -> list[str]:
  """The evaluators' prompts on the demo classes: 80 ImageNet templates plus the demo's own."""
  chosen = templates.OPENAI_IMAGENET_TEMPLATES + demo.TEMPLATES
  return [template.format(name) for template in chosen for name in demo.CLASS_NAMES]


def open_vocabulary_captions(count: int, seed: int = 0) -> list[str]:
  """Seeded captions of 6-24 WordNet words with Zipf frequencies, capitalised, some punctuation."""
  asset = importlib.resources.files("roclip_jax") / "assets" / "wordnet_synonyms.json.gz"
  with asset.open("rb") as f:
    synsets = json.loads(gzip.decompress(f.read()))["synsets"]
  words = sorted({word for synset in synsets for lemma in synset.split("|") for word in lemma.split()})
  rng = np.random.default_rng(seed)
  by_rank = rng.permutation(words)
  frequency = 1.0 / (np.arange(len(words)) + 10.0)
  frequency /= frequency.sum()
  endings = (".", "", "!", ", 2019", "?")
  captions = []
  for _ in range(count):
    picked = by_rank[rng.choice(len(words), size=rng.integers(6, 25), p=frequency)]
    captions.append(" ".join(picked).capitalize() + endings[rng.integers(len(endings))])
  return captions


def _seconds(run: Callable[[], object]) -> float:
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def main(argv):
  del argv
  length = _CONTEXT_LENGTH.value
  corpora = {
      "demo captions": demo.possible_captions(),
      "zero-shot prompts": zero_shot_prompts(),
      "open vocabulary": open_vocabulary_captions(_OPEN_CAPTIONS.value),
  }
  makers = {"package": lambda: tokenizer_lib.Tokenizer(length), "fast": lambda: FastTokenizer(length)}
  print(f"{os.cpu_count()} CPU cores; context length {length}; warm = best of {_REPEATS.value}")
  print(
      f"{'corpus':18s} {'captions':>8s} {'call':7s} {'tokenizer':9s} {'cold tokens/s':>13s} "
      f"{'warm tokens/s':>13s} {'warm captions/s':>15s}"
  )
  for name, captions in corpora.items():
    reference = tokenizer_lib.Tokenizer(length)(captions)
    # Tokens per row: SOT, the (truncated) body and EOT; EOT is the row's largest id.
    tokens = int((reference.argmax(-1) + 1).sum())
    for call in ("batched", "single"):
      for label, make in makers.items():
        tokenizer = make()
        if call == "batched":
          run = lambda tokenizer=tokenizer: tokenizer(captions)
        else:
          run = lambda tokenizer=tokenizer: [tokenizer(caption) for caption in captions]
        cold = _seconds(run)
        warm = min(_seconds(run) for _ in range(_REPEATS.value))
        out = run()
        out = out if call == "batched" else np.concatenate(out)
        if not np.array_equal(out, reference):
          raise AssertionError(f"{label} tokenizer disagrees with the package's on {name}.")
        print(
            f"{name:18s} {len(captions):8d} {call:7s} {label:9s} {tokens / cold:13,.0f} "
            f"{tokens / warm:13,.0f} {len(captions) / warm:15,.0f}"
        )


if __name__ == "__main__":
  app.run(main)
