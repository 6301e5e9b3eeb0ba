"""EDA caption augmentation (Wei & Zou 2019) as RoCLIP uses it (docs/methods.md, section 3.2).

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
* The result is stripped at both ends (EDA strips one leading space only); tokens are unchanged.
* An empty caption (or one without letters) comes back empty instead of raising.

WordNet comes from a table shipped in the package (`assets/wordnet_synonyms.json.gz`, derived from
WordNet 3.0 with its licence beside it): the same synonyms on every machine, no system package, no
NLTK, no download. It holds exactly what EDA can look up and gives exactly what NLTK's WordNet
reader gives (`SynonymTable`). It is loaded lazily, once per process (about half a second), so
`eda` is cheap to call per example in grain workers, from any thread.
"""

from __future__ import annotations

import functools
import gzip
import json
import os
import re
from typing import Callable, Sequence

import ml_collections
import numpy as np

# EDA's stop-word list (NLTK's English list, plus the empty string), verbatim.
STOP_WORDS = frozenset(
    [
        'i',
        'me',
        'my',
        'myself',
        'we',
        'our',
        'ours',
        'ourselves',
        'you',
        'your',
        'yours',
        'yourself',
        'yourselves',
        'he',
        'him',
        'his',
        'himself',
        'she',
        'her',
        'hers',
        'herself',
        'it',
        'its',
        'itself',
        'they',
        'them',
        'their',
        'theirs',
        'themselves',
        'what',
        'which',
        'who',
        'whom',
        'this',
        'that',
        'these',
        'those',
        'am',
        'is',
        'are',
        'was',
        'were',
        'be',
        'been',
        'being',
        'have',
        'has',
        'had',
        'having',
        'do',
        'does',
        'did',
        'doing',
        'a',
        'an',
        'the',
        'and',
        'but',
        'if',
        'or',
        'because',
        'as',
        'until',
        'while',
        'of',
        'at',
        'by',
        'for',
        'with',
        'about',
        'against',
        'between',
        'into',
        'through',
        'during',
        'before',
        'after',
        'above',
        'below',
        'to',
        'from',
        'up',
        'down',
        'in',
        'out',
        'on',
        'off',
        'over',
        'under',
        'again',
        'further',
        'then',
        'once',
        'here',
        'there',
        'when',
        'where',
        'why',
        'how',
        'all',
        'any',
        'both',
        'each',
        'few',
        'more',
        'most',
        'other',
        'some',
        'such',
        'no',
        'nor',
        'not',
        'only',
        'own',
        'same',
        'so',
        'than',
        'too',
        'very',
        's',
        't',
        'can',
        'will',
        'just',
        'don',
        'should',
        'now',
        '',
    ]
)

_RI_TRIES = 10  # EDA's add_word gives a random word this many tries to have a synonym.
_SWAP_TRIES = 3  # EDA's swap_word redraws the second index this often before giving up.
_NOT_LETTERS = re.compile(r'[^a-z ]')
_SPACES = re.compile(' +')

# EDA's synonyms: a table derived from WordNet 3.0, shipped in the package with WordNet's licence
# (assets/WORDNET_LICENSE); built by tools/build_wordnet_synonyms.py.
WORDNET_TABLE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'assets', 'wordnet_synonyms.json.gz'
)

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
# WordNet, from the table shipped in the package.
# -------------------------------------------------------------------------------------------------

# NLTK's `WordNetCorpusReader.MORPHOLOGICAL_SUBSTITUTIONS` (WordNet's morphy(7WN) detachment rules),
# per part of speech, in the order they are tried.
MORPHY_RULES = {
    'n': (
        ('s', ''),
        ('ses', 's'),
        ('ves', 'f'),
        ('xes', 'x'),
        ('zes', 'z'),
        ('ches', 'ch'),
        ('shes', 'sh'),
        ('men', 'man'),
        ('ies', 'y'),
    ),
    'v': (('s', ''), ('ies', 'y'), ('es', 'e'), ('es', ''), ('ed', 'e'), ('ed', ''), ('ing', 'e'), ('ing', '')),
    'a': (('er', ''), ('est', ''), ('er', 'e'), ('est', 'e')),
    'r': (),
}
_POS_ORDER = ('n', 'v', 'a', 'r')  # The order NLTK's `synsets(word)` walks the parts of speech.


def clean_lemma_name(name: str) -> str:
  """A WordNet lemma name as EDA's `get_synonyms` writes it: '_'/'-' as spaces, lowercase, a-z and spaces."""
  name = name.replace('_', ' ').replace('-', ' ').lower()
  return ''.join(c for c in name if c in ' qwertyuiopasdfghjklzxcvbnm')


class SynonymTable:
  """EDA's `get_synonyms` over a compact WordNet 3.0 table, cached per word.

  `table(word)` equals EDA's `get_synonyms(word)` on NLTK's WordNet reader: the lemma names of
  every synset of every morphy form of `word` (nouns, verbs, adjectives, adverbs, each in WordNet's
  sense order), cleaned, without duplicates, minus the word itself. `tools/build_wordnet_synonyms.py`
  builds the table from a WordNet database and checks this equality on every word WordNet knows
  plus common inflections. Plain dicts and no file handle: safe to call from any thread.
  """

  def __init__(self, table: dict):
    self._synsets = [tuple(entry.split('|')) for entry in table['synsets']]
    self._index = table['index']
    self._exceptions = table['exceptions']
    self._cache: dict[str, tuple[str, ...]] = {}

  @classmethod
  def load(cls, path: str) -> 'SynonymTable':
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      return cls(json.load(f))

  def morphy(self, word: str, pos: str) -> list[str]:
    """NLTK's `_morphy`: the exception list's base forms, else one round of the suffix rules; the
    word itself first; only forms the index knows for `pos`, without repeats."""
    exceptions = self._exceptions[pos]
    if word in exceptions:
      candidates = exceptions[word]
    else:
      candidates = [word[: -len(old)] + new for old, new in MORPHY_RULES[pos] if word.endswith(old)]
    index = self._index[pos]
    return list(dict.fromkeys(form for form in [word] + candidates if form in index))

  def __call__(self, word: str) -> tuple[str, ...]:
    synonyms = self._cache.get(word)
    if synonyms is None:
      names = {}
      for pos in _POS_ORDER:
        for form in self.morphy(word, pos):
          for synset in self._index[pos][form]:
            names.update(dict.fromkeys(self._synsets[synset]))
      names.pop(word, None)
      synonyms = self._cache[word] = tuple(names)
    return synonyms


@functools.lru_cache(maxsize=None)
def load_wordnet() -> SynonymTable:
  """EDA's synonym source: the shipped WordNet table, read once per process (about 0.5 s)."""
  return SynonymTable.load(WORDNET_TABLE)


# -------------------------------------------------------------------------------------------------
# The four operations, on word lists.
# -------------------------------------------------------------------------------------------------


def synonym_replacement(words: Sequence[str], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[str]:
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


def random_insertion(words: Sequence[str], n: int, rng: np.random.Generator, synonyms: Synonyms) -> list[str]:
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
    raise TypeError(f'eda needs a numpy.random.Generator (np.random.default_rng(seed)), got ' f'{type(rng).__name__}.')
  for name in ('eda_alpha_sr', 'eda_alpha_ri', 'eda_alpha_rs', 'eda_p_rd'):
    if name not in cfg:
      raise ValueError(
          f'config.augment has no field {name!r}; start from '
          '`config.augment = roclip_jax.data.augment.default_config()`.'
      )
    if not 0.0 <= cfg[name] <= 1.0:
      raise ValueError(f'config.augment.{name}={cfg[name]} must lie in [0, 1] (0 turns the op ' 'off; EDA uses 0.1).')


def eda(caption: str, rng: np.random.Generator, cfg: ml_collections.ConfigDict) -> str:
  """One EDA version of `caption` (num_aug=1), cleaned like EDA's output."""
  _check(rng, cfg)
  words = preprocess(caption).split()
  if not words:
    return ''
  synonyms = load_wordnet()

  def count(alpha):
    return max(1, int(alpha * len(words)))

  ops = []
  if cfg.eda_alpha_sr > 0:
    ops.append(lambda: synonym_replacement(words, count(cfg.eda_alpha_sr), rng, synonyms))
  if cfg.eda_alpha_ri > 0:
    ops.append(lambda: random_insertion(words, count(cfg.eda_alpha_ri), rng, synonyms))
  if cfg.eda_alpha_rs > 0:
    ops.append(lambda: random_swap(words, count(cfg.eda_alpha_rs), rng))
  if cfg.eda_p_rd > 0:
    ops.append(lambda: random_deletion(words, cfg.eda_p_rd, rng))
  if not ops:
    return ' '.join(words)
  return preprocess(' '.join(ops[rng.integers(len(ops))]()))
