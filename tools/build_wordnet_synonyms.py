"""Builds EDA's synonym table (roclip_jax/assets/wordnet_synonyms.json.gz) from a WordNet 3.0 database.

  apt-get install wordnet-base && pip install nltk      # developer machine only
  python tools/build_wordnet_synonyms.py --wordnet_dir=/usr/share/wordnet

The table is what `roclip_jax.data.eda.SynonymTable` reads at run time, so EDA needs no WordNet
install, no NLTK and no lock: the same synonyms on every machine. It holds exactly what EDA can ask
for. EDA's words are lowercase a-z only, and NLTK's `wordnet.synsets(word)` (which EDA's
`get_synonyms` calls) looks a word up through `morphy`: the word itself, suffix rules that only
rewrite letters, and WordNet's exception lists. So the table keeps:

* every exception-list entry whose inflected form is a-z (and its base forms);
* the index entries (lemma -> synsets, per part of speech, in WordNet's sense order) of every a-z
  lemma and of every base form named by a kept exception;
* each referenced synset's lemma names, already cleaned as EDA's `get_synonyms` cleans them.

After writing, it checks the table against NLTK's reader on every a-z lemma of WordNet, every
exception form and common inflections of each lemma, and exits non-zero on the first difference.
The table is derived from WordNet 3.0 (Princeton University); its licence ships beside it
(roclip_jax/assets/WORDNET_LICENSE).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from roclip_jax.data import eda  # noqa: E402  pylint: disable=wrong-import-position

_WORD = re.compile(r'^[a-z]+$')
POS_ORDER = ('n', 'v', 'a', 'r')  # NLTK's POS_LIST: the order `synsets(word)` walks.
_INFLECTIONS = ('s', 'es', 'ies', 'ed', 'ing', 'er', 'est', 'men', 'ves')


def _nltk_reader(wordnet_dir: str):
  """NLTK's reader on a bare WordNet `dict` directory (Debian ships no `lexnames` file)."""
  import io  # pylint: disable=import-outside-toplevel
  import nltk  # pylint: disable=import-outside-toplevel
  from nltk.corpus.reader.wordnet import WordNetCorpusReader  # pylint: disable=import-outside-toplevel

  lexnames = (
      'adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body '
      'noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location '
      'noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process '
      'noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change '
      'verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation '
      'verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather '
      'adj.ppl'
  ).split()
  category = {'noun': 1, 'verb': 2, 'adj': 3, 'adv': 4}

  class Reader(WordNetCorpusReader):

    def open(self, file):
      try:
        return super().open(file)
      except OSError:
        if file != 'lexnames':
          raise
        return io.StringIO(''.join(f'{i:02d}\t{n}\t{category[n.split(".")[0]]}\n' for i, n in enumerate(lexnames)))

    def map_wn(self, version='wordnet'):
      del version

  root = os.path.realpath(wordnet_dir)
  if root not in nltk.data.path:
    nltk.data.path.append(root)
  return Reader(root, omw_reader=None)


def _nltk_synonyms(word: str, reader) -> tuple[str, ...]:
  """EDA's `get_synonyms`, verbatim in effect, on NLTK's reader: the reference the table must match."""
  synonyms = {}
  for synset in reader.synsets(word):
    for lemma in synset.lemmas():
      name = lemma.name().replace('_', ' ').replace('-', ' ').lower()
      synonyms[''.join(c for c in name if c in ' qwertyuiopasdfghjklzxcvbnm')] = None
  synonyms.pop(word, None)
  return tuple(synonyms)


def build(reader) -> dict:
  exceptions = {}
  wanted_lemmas = set()
  for pos in POS_ORDER:
    kept = {form: list(bases) for form, bases in reader._exception_map[pos].items() if _WORD.match(form)}  # pylint: disable=protected-access
    exceptions[pos] = dict(sorted(kept.items()))
    for bases in kept.values():
      wanted_lemmas.update(bases)
  synset_ids: dict[tuple[str, int], int] = {}
  synsets: list[list[str]] = []
  index = {pos: {} for pos in POS_ORDER}
  lemma_map = reader._lemma_pos_offset_map  # pylint: disable=protected-access
  for lemma in sorted(lemma_map):
    if not (_WORD.match(lemma) or lemma in wanted_lemmas):
      continue
    for pos in POS_ORDER:
      offsets = lemma_map[lemma].get(pos)
      if not offsets:
        continue
      ids = []
      for offset in offsets:
        key = (pos, offset)
        if key not in synset_ids:
          synset = reader.synset_from_pos_and_offset(pos, offset)
          synset_ids[key] = len(synsets)
          synsets.append([eda.clean_lemma_name(lemma_.name()) for lemma_ in synset.lemmas()])
        ids.append(synset_ids[key])
      index[pos][lemma] = ids
  return {
      'source': 'WordNet 3.0 (Princeton University); see WORDNET_LICENSE',
      'synsets': ['|'.join(names) for names in synsets],
      'index': index,
      'exceptions': exceptions,
  }


def check(table_path: str, reader) -> int:
  for pos in POS_ORDER:
    if tuple(map(tuple, reader.MORPHOLOGICAL_SUBSTITUTIONS[pos])) != eda.MORPHY_RULES[pos]:
      print(f"eda.MORPHY_RULES[{pos!r}] differs from NLTK's MORPHOLOGICAL_SUBSTITUTIONS", file=sys.stderr)
      return 1
  table = eda.SynonymTable.load(table_path)
  words = set()
  for lemma in reader._lemma_pos_offset_map:  # pylint: disable=protected-access
    if _WORD.match(lemma):
      words.add(lemma)
      words.update(lemma + suffix for suffix in _INFLECTIONS)
  for pos in POS_ORDER:
    words.update(form for form in reader._exception_map[pos] if _WORD.match(form))  # pylint: disable=protected-access
  words.update(['xyzzyq', 'a', 'the'])
  for n, word in enumerate(sorted(words)):
    expected, got = _nltk_synonyms(word, reader), table(word)
    if expected != got:
      print(f'MISMATCH for {word!r}:\n  nltk:  {expected}\n  table: {got}', file=sys.stderr)
      return 1
  print(f'checked {n + 1} words against NLTK: identical')
  return 0


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--wordnet_dir', default='/usr/share/wordnet')
  parser.add_argument('--output', default=os.path.join(REPO, 'roclip_jax', 'assets', 'wordnet_synonyms.json.gz'))
  args = parser.parse_args()
  reader = _nltk_reader(args.wordnet_dir)
  table = build(reader)
  data = json.dumps(table, separators=(',', ':'), sort_keys=False).encode()
  # mtime=0: the same WordNet gives a byte-identical file.
  with open(args.output, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', mtime=0, compresslevel=9) as f:
    f.write(data)
  print(
      f'wrote {args.output}: {len(table["synsets"])} synsets, '
      f'{sum(len(v) for v in table["index"].values())} index entries, {os.path.getsize(args.output)} bytes'
  )
  return check(args.output, reader)


if __name__ == '__main__':
  sys.exit(main())
