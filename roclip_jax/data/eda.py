"""EDA caption augmentation (Wei & Zou 2019) as RoCLIP uses it (ROCLIP.md §2.2).

`eda(caption, rng, cfg)` cleans the caption (lowercase, letters and spaces only), then applies ONE
of four operations, picked uniformly:

* SR, synonym replacement: n distinct non-stop-words, each replaced (all its occurrences) by a
  random WordNet synonym;
* RI, random insertion: n times, the first synonym of a random word goes to a random position;
* RS, random swap: n swaps of two random positions;
* RD, random deletion: each word dropped with probability p (one random word kept if none is left),

with n = max(1, floor(alpha * #words)), alpha = p = 0.1. This is EDA's `eda(..., num_aug=1)`:
one candidate per op, shuffled, the first kept. Only the kept op is computed here; the chosen op
and its output have the same distribution.

Deviations from EDA's code, each for determinism or robustness:
* All randomness comes from the given `np.random.Generator`, never from the global `random`.
* EDA orders words and synonyms by iterating Python sets, which depends on PYTHONHASHSEED. Here
  words keep their first-occurrence order (then shuffled by `rng`) and synonyms keep WordNet's
  order, so RI's "first synonym" is the first lemma of the most frequent sense.
* An op whose alpha (or p) is 0 is switched off (as in later EDA versions); in the original
  n = max(1, 0) = 1 still ran it.
* Without a WordNet database SR and RI are switched off (one warning per process), and RS/RD run.
* The result is stripped at both ends (EDA strips one leading space only); tokens are unchanged.
* An empty caption (or one without letters) comes back empty instead of raising.

WordNet is read with NLTK from the first directory that holds one: `cfg.wordnet_dir`,
`$WORDNET_DIR`, `/usr/share/wordnet` (Debian `wordnet-base`), else NLTK's own data. It is loaded
lazily, once per process (about a second), so `eda` is cheap to call per example in grain workers.
"""
from __future__ import annotations

import functools
import io
import os
import re
import warnings
from typing import Callable, Sequence

import ml_collections
import numpy as np
from absl import logging

# EDA's stop-word list (NLTK's English list, plus the empty string), verbatim.
STOP_WORDS = frozenset([
    'i', 'me', 'my', 'myself', 'we', 'our', 'ours', 'ourselves', 'you', 'your', 'yours',
    'yourself', 'yourselves', 'he', 'him', 'his', 'himself', 'she', 'her', 'hers', 'herself',
    'it', 'its', 'itself', 'they', 'them', 'their', 'theirs', 'themselves', 'what', 'which',
    'who', 'whom', 'this', 'that', 'these', 'those', 'am', 'is', 'are', 'was', 'were', 'be',
    'been', 'being', 'have', 'has', 'had', 'having', 'do', 'does', 'did', 'doing', 'a', 'an',
    'the', 'and', 'but', 'if', 'or', 'because', 'as', 'until', 'while', 'of', 'at', 'by', 'for',
    'with', 'about', 'against', 'between', 'into', 'through', 'during', 'before', 'after',
    'above', 'below', 'to', 'from', 'up', 'down', 'in', 'out', 'on', 'off', 'over', 'under',
    'again', 'further', 'then', 'once', 'here', 'there', 'when', 'where', 'why', 'how', 'all',
    'any', 'both', 'each', 'few', 'more', 'most', 'other', 'some', 'such', 'no', 'nor', 'not',
    'only', 'own', 'same', 'so', 'than', 'too', 'very', 's', 't', 'can', 'will', 'just', 'don',
    'should', 'now', '',
])

SYSTEM_WORDNET_DIR = '/usr/share/wordnet'  # Debian/Ubuntu package `wordnet-base`.
_RI_TRIES = 10  # EDA's add_word gives a random word this many tries to have a synonym.
_SWAP_TRIES = 3  # EDA's swap_word redraws the second index this often before giving up.
_NOT_LETTERS = re.compile(r'[^a-z ]')
_SPACES = re.compile(' +')

# The WordNet 3.0 `lexnames` file (lexnames(5WN)), which NLTK's reader requires and Debian's
# `wordnet-base` does not ship: one line "index<TAB>name<TAB>syntactic category" per lexicographer
# file. NLTK only keeps the names.
_LEXNAMES = (
    'adj.all', 'adj.pert', 'adv.all', 'noun.Tops', 'noun.act', 'noun.animal', 'noun.artifact',
    'noun.attribute', 'noun.body', 'noun.cognition', 'noun.communication', 'noun.event',
    'noun.feeling', 'noun.food', 'noun.group', 'noun.location', 'noun.motive', 'noun.object',
    'noun.person', 'noun.phenomenon', 'noun.plant', 'noun.possession', 'noun.process',
    'noun.quantity', 'noun.relation', 'noun.shape', 'noun.state', 'noun.substance', 'noun.time',
    'verb.body', 'verb.change', 'verb.cognition', 'verb.communication', 'verb.competition',
    'verb.consumption', 'verb.contact', 'verb.creation', 'verb.emotion', 'verb.motion',
    'verb.perception', 'verb.possession', 'verb.social', 'verb.stative', 'verb.weather',
    'adj.ppl',
)
_SYNTACTIC_CATEGORY = {'noun': 1, 'verb': 2, 'adj': 3, 'adv': 4}

Synonyms = Callable[[str], Sequence[str]]


def preprocess(text: str) -> str:
  """EDA's `get_only_chars`: lowercase a-z words separated by single spaces."""
  for apostrophe in ("'", '\u2019'):
    text = text.replace(apostrophe, '')
  for separator in ('-', '\t', '\n'):
    text = text.replace(separator, ' ')
  text = _NOT_LETTERS.sub(' ', text.lower())
  return _SPACES.sub(' ', text).strip()


# -------------------------------------------------------------------------------------------------
# WordNet.
# -------------------------------------------------------------------------------------------------


def _wordnet_reader_class():
  """NLTK's WordNetCorpusReader, able to read a bare WordNet 3.0 `dict` directory.

  Built lazily: importing NLTK costs about a second, which processes without text
  augmentation should not pay.
  """
  from nltk.corpus.reader.wordnet import WordNetCorpusReader  # pylint: disable=g-import-not-at-top

  class _BareWordNetReader(WordNetCorpusReader):

    def open(self, file):
      try:
        return super().open(file)
      except OSError:
        if file != 'lexnames':
          raise
        return io.StringIO(''.join(
            f'{i:02d}\t{name}\t{_SYNTACTIC_CATEGORY[name.split(".")[0]]}\n'
            for i, name in enumerate(_LEXNAMES)))

    def map_wn(self, version='wordnet'):
      # Maps synset ids for the multilingual (OMW) data, which EDA never uses; NLTK's version
      # would load a second WordNet (NLTK's own download) to build it.
      del version
      return None

  return _BareWordNetReader


class WordNetSynonyms:
  """EDA's `get_synonyms` on one WordNet, cached per word (a CC3M vocabulary fits easily)."""

  def __init__(self, reader):
    self._reader = reader
    self._cache: dict[str, tuple[str, ...]] = {}

  def __call__(self, word: str) -> tuple[str, ...]:
    synonyms = self._cache.get(word)
    if synonyms is None:
      synonyms = get_synonyms(word, self._reader)
      self._cache[word] = synonyms
    return synonyms


def get_synonyms(word: str, reader) -> tuple[str, ...]:
  """Lemma names of all synsets of `word`, '_'/'-' as spaces, letters only, minus the word itself.

  WordNet order (most frequent sense first), without duplicates.
  """
  synonyms = {}
  for synset in reader.synsets(word):
    for lemma in synset.lemmas():
      name = lemma.name().replace('_', ' ').replace('-', ' ').lower()
      synonyms[''.join(c for c in name if c in ' qwertyuiopasdfghjklzxcvbnm')] = None
  synonyms.pop(word, None)
  return tuple(synonyms)


def _is_wordnet_dir(path: str) -> bool:
  return all(os.path.isfile(os.path.join(path, name)) for name in ('index.noun', 'data.noun'))


def _find_nltk_wordnet():
  """NLTK's own WordNet (`python -m nltk.downloader wordnet`), or None."""
  import nltk  # pylint: disable=g-import-not-at-top
  try:
    return nltk.data.find('corpora/wordnet')
  except LookupError:
    return None


def _open_reader(root):
  import nltk  # pylint: disable=g-import-not-at-top
  if isinstance(root, str):
    root = os.path.realpath(root)
    # NLTK >= 3.9 refuses corpus roots outside nltk.data.path ("Unauthorized path").
    if root not in nltk.data.path:
      nltk.data.path.append(root)
  with warnings.catch_warnings():
    # "The multilingual functions are not available": expected, EDA needs English only.
    warnings.simplefilter('ignore', UserWarning)
    return _wordnet_reader_class()(root, omw_reader=None)


@functools.lru_cache(maxsize=None)
def _cached_load(wordnet_dir: str, env_dir: str) -> WordNetSynonyms | None:
  """Finds and opens WordNet once per process and setting; warns at most once."""
  candidates = [('config.augment.wordnet_dir', wordnet_dir), ('$WORDNET_DIR', env_dir),
                ('Debian wordnet-base', SYSTEM_WORDNET_DIR)]
  looked = []
  for source, path in candidates:
    if not path:
      continue
    if _is_wordnet_dir(path):
      if looked and wordnet_dir:
        logging.warning('WordNet: %s=%r holds no WordNet database (no index.noun/data.noun); '
                        'using %s instead.', candidates[0][0], wordnet_dir, path)
      return WordNetSynonyms(_open_reader(path))
    looked.append(f'{source}={path!r}')
  nltk_root = _find_nltk_wordnet()
  if nltk_root is not None:
    if wordnet_dir:
      logging.warning('WordNet: %s=%r holds no WordNet database; using NLTK data at %s.',
                      candidates[0][0], wordnet_dir, nltk_root)
    return WordNetSynonyms(_open_reader(nltk_root))
  logging.warning(
      'EDA: no WordNet database found (looked in %s and NLTK\'s data path), so synonym '
      'replacement and random insertion are OFF; only random swap and deletion run. Fix: '
      '`apt-get install wordnet-base` (-> %s) or `python -m nltk.downloader wordnet`, or point '
      '--config.augment.wordnet_dir (or $WORDNET_DIR) at a WordNet dict/ directory.',
      ', '.join(looked), SYSTEM_WORDNET_DIR)
  return None


def load_wordnet(wordnet_dir: str = '') -> WordNetSynonyms | None:
  """EDA's synonym source, or None when no WordNet is installed (after one warning)."""
  return _cached_load(wordnet_dir or '', os.environ.get('WORDNET_DIR', ''))


# -------------------------------------------------------------------------------------------------
# The four operations, on word lists.
# -------------------------------------------------------------------------------------------------


def synonym_replacement(words: Sequence[str], n: int, rng: np.random.Generator,
                        synonyms: Synonyms) -> list[str]:
  """SR: up to n distinct non-stop-words, each replaced everywhere by a random synonym."""
  candidates = list(dict.fromkeys(w for w in words if w not in STOP_WORDS))
  new_words = list(words)
  replaced = 0
  for index in rng.permutation(len(candidates)):
    word = candidates[index]
    options = synonyms(word)
    if options:
      synonym = options[rng.integers(len(options))]
      new_words = [synonym if w == word else w for w in new_words]
      replaced += 1
    if replaced >= n:
      break
  # A synonym may hold spaces ('motor vehicle'): split it back into words, as EDA does.
  return ' '.join(new_words).split(' ')


def random_insertion(words: Sequence[str], n: int, rng: np.random.Generator,
                     synonyms: Synonyms) -> list[str]:
  """RI: n times, insert the first synonym of a random word at a random position."""
  new_words = list(words)
  for _ in range(n):
    for attempt in range(1, _RI_TRIES + 1):
      options = synonyms(new_words[rng.integers(len(new_words))])
      # EDA checks the try counter before using what the 10th try found, so only tries 1..9
      # can insert; kept.
      if attempt >= _RI_TRIES:
        break
      if options:
        # EDA draws the position in [0, len - 1]: never after the last word; kept.
        new_words.insert(int(rng.integers(len(new_words))), options[0])
        break
  return new_words


def random_swap(words: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
  """RS: n times, swap two random positions (a swap is skipped after 3 equal redraws)."""
  new_words = list(words)
  for _ in range(n):
    first = second = int(rng.integers(len(new_words)))
    for _ in range(_SWAP_TRIES):
      second = int(rng.integers(len(new_words)))
      if second != first:
        break
    if second != first:
      new_words[first], new_words[second] = new_words[second], new_words[first]
  return new_words


def random_deletion(words: Sequence[str], p: float, rng: np.random.Generator) -> list[str]:
  """RD: drop each word with probability p; keep one random word if none survives."""
  if len(words) == 1:
    return list(words)
  kept = [w for w in words if rng.random() > p]
  if not kept:
    return [words[rng.integers(len(words))]]
  return kept


# -------------------------------------------------------------------------------------------------
# EDA.
# -------------------------------------------------------------------------------------------------


def _check(rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> None:
  if not isinstance(rng, np.random.Generator):
    raise TypeError(f'eda needs a numpy.random.Generator (np.random.default_rng(seed)), got '
                    f'{type(rng).__name__}.')
  for name in ('eda_alpha_sr', 'eda_alpha_ri', 'eda_alpha_rs', 'eda_p_rd'):
    if name not in cfg:
      raise ValueError(f'config.augment has no field {name!r}; start from '
                       '`config.augment = roclip_jax.data.augment.default_config()`.')
    if not 0.0 <= cfg[name] <= 1.0:
      raise ValueError(f'config.augment.{name}={cfg[name]} must lie in [0, 1] (0 turns the op '
                       'off; EDA uses 0.1).')


def eda(caption: str, rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> str:
  """One EDA version of `caption` (num_aug=1), cleaned like EDA's output."""
  _check(rng, cfg)
  words = preprocess(caption).split()
  if not words:
    return ''
  synonyms = load_wordnet(cfg.get('wordnet_dir', ''))

  def count(alpha):
    return max(1, int(alpha * len(words)))

  ops = []
  if synonyms is not None and cfg.eda_alpha_sr > 0:
    ops.append(lambda: synonym_replacement(words, count(cfg.eda_alpha_sr), rng, synonyms))
  if synonyms is not None and cfg.eda_alpha_ri > 0:
    ops.append(lambda: random_insertion(words, count(cfg.eda_alpha_ri), rng, synonyms))
  if cfg.eda_alpha_rs > 0:
    ops.append(lambda: random_swap(words, count(cfg.eda_alpha_rs), rng))
  if cfg.eda_p_rd > 0:
    ops.append(lambda: random_deletion(words, cfg.eda_p_rd, rng))
  if not ops:
    return ' '.join(words)
  return preprocess(' '.join(ops[rng.integers(len(ops))]()))
