"""Tests of roclip_jax.data.eda: hand-computed cases, multiset checks and WordNet 3.0 facts.

WordNet comes from the table shipped in the package (no system package, no NLTK); the facts it must
reproduce are WordNet 3.0's, written out here by hand.
"""

import collections
import concurrent.futures
import functools
import os
import pickle
import sys

import numpy as np
import pytest

from roclip_jax.data import augment
from roclip_jax.data import eda

# WordNet 3.0 lemmas of the five senses of 'car' (car.n.01 .. car.n.05), minus 'car', in order.
CAR_SYNONYMS = (
    'auto',
    'automobile',
    'machine',
    'motorcar',
    'railcar',
    'railway car',
    'railroad car',
    'gondola',
    'elevator car',
    'cable car',
)


def _config(**overrides):
  cfg = augment.default_config()
  cfg.update(overrides)
  return cfg


def _rng(seed=0):
  return np.random.default_rng(seed)


@pytest.fixture(name='wordnet')
def _wordnet():
  return eda.load_wordnet()


@pytest.mark.parametrize(
    'raw,clean',
    [
        ('A Dog on the BEACH.', 'a dog on the beach'),
        ("It's the dog\u2019s toy", 'its the dogs toy'),
        ('well-known\tfact\nhere', 'well known fact here'),
        ('  3 cats & 2 dogs!!  ', 'cats dogs'),
        ('Caf\u00e9 \u00fcber', 'caf ber'),
        ('<b>bold</b>', 'b bold b'),
        ('1234 ...', ''),
        ('', ''),
    ],
)
def test_preprocess(raw, clean):
  assert eda.preprocess(raw) == clean


def test_random_deletion():
  words = 'a brown dog runs on the wet sand'.split()
  assert eda.random_deletion(words, 0.0, _rng()) == words
  assert eda.random_deletion(['dog'], 1.0, _rng()) == ['dog']
  for seed in range(20):
    survivor = eda.random_deletion(words, 1.0, _rng(seed))  # all dropped: one random word stays
    assert len(survivor) == 1 and survivor[0] in words
  for seed in range(20):
    kept = eda.random_deletion(words, 0.5, _rng(seed))
    iterator = iter(words)
    assert all(w in iterator for w in kept)  # an ordered subsequence


def test_random_swap_keeps_the_words():
  words = 'one two three four five six seven eight nine ten'.split()
  outputs = [eda.random_swap(words, 2, _rng(seed)) for seed in range(30)]
  for out in outputs:
    assert collections.Counter(out) == collections.Counter(words)
    assert sum(a != b for a, b in zip(out, words)) <= 4  # two swaps move at most 4 words
  assert any(out != words for out in outputs)
  assert eda.random_swap(['alone'], 3, _rng()) == ['alone']


def test_get_synonyms_is_wordnet(wordnet):
  assert wordnet('car') == CAR_SYNONYMS
  # NLTK's morphy finds the lemma; only the word itself ('cars') is dropped, as in EDA.
  assert wordnet('cars') == ('car',) + CAR_SYNONYMS
  assert wordnet('xyzzyq') == ()


def test_synonym_replacement_uses_real_synonyms(wordnet):
  seen = set()
  for seed in range(30):
    out = ' '.join(eda.synonym_replacement(['the', 'car'], 1, _rng(seed), wordnet))
    assert out.startswith('the ')  # a stop word is never replaced
    seen.add(out[len('the ') :])
  assert seen <= set(CAR_SYNONYMS) and len(seen) >= 4
  # Every occurrence of the chosen word gets the same synonym.
  out = ' '.join(eda.synonym_replacement(['car', 'and', 'car'], 1, _rng(3), wordnet))
  assert any(out == f'{s} and {s}' for s in CAR_SYNONYMS), out


def test_random_insertion_inserts_the_first_synonym(wordnet):
  # One word: its first WordNet synonym goes to position 0 (EDA never appends at the end).
  assert eda.random_insertion(['car'], 1, _rng(), wordnet) == ['auto', 'car']
  for seed in range(10):
    out = eda.random_insertion(['the', 'car'], 2, _rng(seed), wordnet)
    # 'the' has no synonym; an inserted 'auto' may itself get its first synonym, 'car'.
    inserted = collections.Counter(out) - collections.Counter(['the', 'car'])
    assert sum(inserted.values()) == 2 and set(inserted) <= {'auto', 'car'}, out
    assert out[-1] == 'car'
  # No word has a synonym: nothing is inserted.
  assert eda.random_insertion(['the', 'of'], 1, _rng(), wordnet) == ['the', 'of']


def test_eda_with_only_synonym_replacement(wordnet):
  del wordnet
  cfg = _config(eda_alpha_ri=0.0, eda_alpha_rs=0.0, eda_p_rd=0.0)
  for seed in range(10):
    out = eda.eda('The CAR!', _rng(seed), cfg)
    assert out.startswith('the ') and out[len('the ') :] in CAR_SYNONYMS


def test_eda_swaps_floor_of_a_tenth_of_the_words():
  words = [a + b for a in 'bcdfg' for b in 'aeiouy']  # 30 distinct words
  caption = ' '.join(words)
  cfg = _config(eda_alpha_sr=0.0, eda_alpha_ri=0.0, eda_p_rd=0.0)
  moved = [sum(a != b for a, b in zip(eda.eda(caption, _rng(s), cfg).split(), words)) for s in range(40)]
  assert max(moved) <= 6  # n = floor(0.1 * 30) = 3 swaps
  assert max(moved) > 4  # more than 2 swaps happened


def test_eda_is_deterministic_given_the_rng(wordnet):
  del wordnet
  cfg = _config()
  caption = 'A young girl in a red dress is playing with a small dog in the park.'
  outputs = [eda.eda(caption, _rng(seed), cfg) for seed in range(12)]
  assert outputs == [eda.eda(caption, _rng(seed), cfg) for seed in range(12)]
  assert len(set(outputs)) >= 6
  for out in outputs:
    assert out == eda.preprocess(out) and out  # clean, lowercase, non-empty
  assert eda.eda('...', _rng(), cfg) == ''


def test_eda_pickles_for_grain_workers():
  cfg = _config(eda_alpha_sr=0.0, eda_alpha_ri=0.0, eda_p_rd=0.0)
  fn = pickle.loads(pickle.dumps(functools.partial(eda.eda, cfg=cfg)))
  assert fn('red car', _rng(1)) in ('red car', 'car red')


def test_synonym_table_ships_in_the_package_with_its_licence():
  assets = os.path.dirname(eda.WORDNET_TABLE)
  assert os.path.isfile(eda.WORDNET_TABLE)
  with open(os.path.join(assets, 'WORDNET_LICENSE')) as f:
    assert 'WordNet 3.0 Copyright 2006 by Princeton University' in f.read()
  # Nothing outside the package is read: no NLTK, no WordNet database on the machine.
  assert 'nltk' not in sys.modules


@pytest.mark.parametrize(
    'word,synonym',
    [
        ('geese', 'goose'),  # noun exception list (noun.exc)
        ('ran', 'run'),  # verb exception list (verb.exc)
        ('bigger', 'big'),  # adjective exception list (adj.exc)
        ('boxes', 'box'),  # noun rule xes -> x
        ('walked', 'walk'),  # verb rule ed -> ''
        ('happily', 'merrily'),  # adverb: no rules, the index itself
    ],
)
def test_morphy_finds_the_lemma_as_wordnet_does(wordnet, word, synonym):
  assert synonym in wordnet(word)
  assert word not in wordnet(word)


def test_synonyms_are_thread_safe(wordnet):
  """grain's prefetch threads call EDA concurrently; no lock is needed any more."""
  words = ['car', 'cars', 'star', 'circle', 'blue', 'green', 'square', 'running', 'bigger'] * 20
  reference = eda.SynonymTable.load(eda.WORDNET_TABLE)  # A separate table, filled by one thread.
  expected = [reference(w) for w in words]
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    assert list(pool.map(wordnet, words)) == expected


def test_bad_arguments_raise_clear_errors():
  with pytest.raises(TypeError, match='default_rng'):
    eda.eda('a car', 0, _config())
  with pytest.raises(ValueError, match='eda_p_rd'):
    eda.eda('a car', _rng(), _config(eda_p_rd=1.5))
