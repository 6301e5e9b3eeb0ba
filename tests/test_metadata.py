"""Tests of data/metadata.py and the lazy poisoning built on it.

The reference for poisoning is the eager implementation the repository had before the metadata path
(read every record, decide, materialise every poisoned record), kept verbatim below.
"""

import csv
import dataclasses
import importlib.util
import io
import logging
import os
import pickle

import numpy as np
from PIL import Image
import pytest

from roclip_jax import config_lib
from roclip_jax.data import array_record
from roclip_jax.data import convert
from roclip_jax.data import image_ops
from roclip_jax.data import metadata as metadata_lib
from roclip_jax.data import pipeline
from roclip_jax.data import poison
from roclip_jax.data import sources
from roclip_jax.data import templates as templates_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------- the eager reference (pre-metadata code)


def _eager_read_table(base):
  rows = [base[i] for i in range(len(base))]
  return dict(
      ids=np.array([int(r["id"]) for r in rows], np.int64),
      captions=[str(r["caption"]) for r in rows],
      labels=np.array([int(r["label"]) for r in rows], np.int64),
  )


def _eager_matching(captions, name):
  pattern = poison.mentions(name)
  return np.array([i for i, c in enumerate(captions) if pattern.search(c)], np.int64)


def _eager_targeted(table, pool, cfg, seed, first_new_id):
  tc = cfg.targeted
  rng = np.random.default_rng([seed, poison._STREAM_TARGETED])
  labelled = np.flatnonzero(pool.labels >= 0)
  allowed = list(tc.adversarial_classes) or list(pool.class_names)
  picked = rng.choice(labelled, size=tc.num_targets, replace=False)
  records, used, next_id = [], set(), first_new_id
  for index in picked:
    true_class = pool.class_names[int(pool.labels[index])]
    candidates = [c for c in allowed if c != true_class and c not in used]
    adversarial = candidates[int(rng.integers(len(candidates)))]
    used.add(adversarial)
    matches = _eager_matching(table["captions"], adversarial)
    chosen = rng.choice(matches, size=tc.poisons_per_target, replace=False)
    ids = tuple(range(next_id, next_id + tc.poisons_per_target))
    next_id += tc.poisons_per_target
    for new_id, caption_index in zip(ids, chosen):
      records.append(
          {
              "id": np.int64(new_id),
              "image_path": pool.image_paths[index],
              "caption": table["captions"][caption_index],
              "label": np.int64(-1),
              "poisoned": np.int8(poison.TARGETED),
          }
      )
  return records


def _eager_backdoor(table, class_names, cfg, seed):
  bd = cfg.backdoor
  rng = np.random.default_rng([seed, poison._STREAM_BACKDOOR])
  num = round(bd.rate * len(table["ids"])) if bd.rate > 0 else bd.num_poisons
  mentioning = np.zeros(len(table["ids"]), bool)
  mentioning[_eager_matching(table["captions"], bd.target_class)] = True
  if bd.selection == "label_consistent":
    candidates = np.flatnonzero(mentioning)
  else:
    of_target = mentioning.copy()
    if class_names is not None and bd.target_class in class_names:
      of_target |= table["labels"] == list(class_names).index(bd.target_class)
    candidates = np.flatnonzero(~of_target)
  chosen = np.sort(rng.choice(candidates, size=num, replace=False))
  if bd.selection == "label_consistent":
    return {int(i): None for i in chosen}
  if bd.caption_source == "templates":
    pool = [t.format(bd.target_class) for t in templates_lib.OPENAI_IMAGENET_TEMPLATES]
  else:
    pool = [table["captions"][i] for i in np.flatnonzero(mentioning)]
  picks = rng.integers(len(pool), size=num)
  return {int(i): pool[p] for i, p in zip(chosen, picks)}


def eager_poisoning(base, pool, cfg, seed):
  """Every record of the poisoned source, and the (targeted, backdoor) ids, as the old code made them."""
  table = _eager_read_table(base)
  appended, replaced = [], {}
  if cfg.enabled and cfg.targeted.enabled and cfg.targeted.num_targets > 0:
    appended = _eager_targeted(table, pool, cfg, int(seed), int(table["ids"].max()) + 1)
  if cfg.enabled and cfg.backdoor.enabled:
    replaced = _eager_backdoor(table, pool.class_names, cfg, int(seed))
  records = []
  for index in range(len(base)):
    record = dict(base[index])
    if index in replaced:
      if replaced[index] is not None:
        record["caption"] = replaced[index]
      record["poisoned"] = np.int8(poison.BACKDOOR)
    records.append(record)
  records += [dict(r) for r in appended]
  backdoor_ids = tuple(sorted(int(table["ids"][i]) for i in replaced))
  return records, tuple(int(r["id"]) for r in appended), backdoor_ids


def eager_clean_subset(source, num_examples, seed):
  """cleanclip.clean_subset's positions before the metadata path."""
  clean = np.asarray([i for i in range(len(source)) if int(source[i].get("poisoned", 0)) == 0], np.int64)
  if num_examples:
    clean = np.sort(np.random.default_rng([seed, 0xC1EA]).choice(clean, size=num_examples, replace=False))
  return clean


# ------------------------------------------------------------------------------------------ helpers


def records_of(source):
  return [source[i] for i in range(len(source))]


def assert_same_records(got, expected):
  assert len(got) == len(expected)
  for i, (a, b) in enumerate(zip(got, expected)):
    assert a.keys() == b.keys(), i
    for key in a:
      assert type(a[key]) is type(b[key]) and np.array_equal(a[key], b[key]), (i, key, a[key], b[key])


def pixels(record, transform):
  """What the pipeline trains on before resizing: the decoded image with the trigger stamped."""
  image = image_ops.decode_image(record["image_bytes"] if "image_bytes" in record else record["image_path"])
  return image if transform is None else transform(record, image)


def assert_metadata_equal(got: metadata_lib.Metadata, expected: metadata_lib.Metadata):
  np.testing.assert_array_equal(got.ids, expected.ids)
  np.testing.assert_array_equal(got.labels, expected.labels)
  np.testing.assert_array_equal(got.poisoned, expected.poisoned)
  assert list(got.captions) == list(expected.captions)
  assert [got.captions[i] for i in range(len(got))] == list(expected.captions)
  assert got.ids.dtype == np.int64 and got.labels.dtype == np.int64 and got.poisoned.dtype == np.int8


def robustness_demo_config():
  spec = importlib.util.spec_from_file_location("robustness_demo", os.path.join(REPO, "configs", "robustness_demo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(None)


class NoImageAccess:
  """A source whose records cannot be read at all (each would carry an image); only `metadata()` works."""

  def __init__(self, base):
    self._base = base

  def __len__(self):
    return len(self._base)

  def __getitem__(self, index):
    raise AssertionError(f"record {index} was read: the metadata path must not read images")

  def metadata(self):
    return self._base.metadata()


class _RaisingRecords:
  """Stands in for grain's ArrayRecordDataSource: the length is known, any record read fails."""

  def __init__(self, num):
    self._num = num

  def __len__(self):
    return self._num

  def __getitem__(self, index):
    raise AssertionError(f"ArrayRecord record {index} (with its JPEG) was read")


# --------------------------------------------------------------------------------- the demo table


@pytest.fixture(scope="module")
def demo():
  config = robustness_demo_config()
  source = sources.make_source(config.data, split="train")
  held_out = pipeline.labelled_split(config, split="test")
  pool = poison.TargetPool.from_records([held_out.source[i] for i in range(len(held_out.source))], held_out.class_names)
  return config, source, pool


DEMO_VARIANTS = [
    {},  # The `make demo` attack: 18 backdoor poisons (train captions) + 8 targets x 12 captions.
    {
        "poison.backdoor.selection": "label_consistent",
        "poison.backdoor.num_poisons": 40,
        "poison.targeted.enabled": False,
    },
    {
        "poison.backdoor.caption_source": "templates",
        "poison.backdoor.num_poisons": 0,
        "poison.backdoor.rate": 0.01,
        "poison.seed": 5,
    },
]


@pytest.mark.parametrize("overrides", DEMO_VARIANTS)
def test_lazy_poisoning_equals_the_eager_one_on_the_demo_set(demo, overrides):
  config, source, pool = demo
  config = config_lib.override(config, overrides)
  lazy, info = poison.poison_source(source, pool, config.poison, seed=config.poison.seed)
  expected, targeted_ids, backdoor_ids = eager_poisoning(source, pool, config.poison, config.poison.seed)
  assert (info.targeted_ids, info.backdoor_ids) == (targeted_ids, backdoor_ids)
  assert len(info.backdoor_ids) > 0
  got = records_of(lazy)
  assert_same_records(got, expected)
  transform = poison.make_image_transform(config.poison, seed=config.poison.seed)
  for a, b in zip(got, expected):  # Every record's pixels, trigger included.
    np.testing.assert_array_equal(pixels(a, transform), pixels(b, transform))
  # The lazy source's metadata says the same as its records.
  assert_metadata_equal(lazy.metadata(), metadata_lib.read_metadata(lazy, progress=False))


def test_demo_poisoning_reads_no_record_of_the_training_source(demo):
  config, source, pool = demo
  _, reference = poison.poison_source(source, pool, config.poison, seed=config.poison.seed)
  blind = NoImageAccess(source)
  lazy, info = poison.poison_source(blind, pool, config.poison, seed=config.poison.seed)
  assert info == reference
  flags = metadata_lib.poisoned_flags(lazy)
  assert sorted(np.flatnonzero(flags).tolist()) == sorted(
      list(range(len(source), len(lazy))) + list(info.backdoor_ids)
  )  # Demo ids are positions.


def test_clean_subset_and_poisoned_flags_equal_the_full_pass(demo):
  config, source, pool = demo
  lazy, _ = poison.poison_source(source, pool, config.poison, seed=config.poison.seed)
  # SafeSplitter's `poisoned` array before the metadata path.
  expected_flags = np.asarray([int(lazy[i].get("poisoned", 0)) > 0 for i in range(len(lazy))])
  np.testing.assert_array_equal(metadata_lib.poisoned_flags(lazy), expected_flags)
  for num, seed in ((0, 0), (500, 0), (500, 3), (len(lazy) - int(expected_flags.sum()), 1)):
    expected = eager_clean_subset(lazy, num, seed)
    subset = metadata_lib.clean_subset(lazy, num, seed)
    np.testing.assert_array_equal(subset.indices, expected)
    np.testing.assert_array_equal(metadata_lib.clean_indices(lazy.metadata(), num, seed), expected)
    assert [int(subset[i]["id"]) for i in range(0, len(subset), 50)] == [
        int(lazy[int(j)]["id"]) for j in expected[::50]
    ]
  with pytest.raises(ValueError, match="num_clean_examples=.* only .* clean records"):
    metadata_lib.clean_subset(lazy, len(lazy), 0)
  subset = metadata_lib.clean_subset(lazy, 300, 2)
  assert_metadata_equal(subset.metadata(), metadata_lib.read_metadata(subset, progress=False))


def test_csv_metadata_equals_its_records(demo):
  _, source, _ = demo
  assert_metadata_equal(source.metadata(), metadata_lib.read_metadata(source, progress=False))


# ------------------------------------------------------------------- an ArrayRecord set from `convert`

CLASSES = ("cat", "dog", "bird", "boat")


def _image(seed, size=24):
  rng = np.random.default_rng(seed)
  return (rng.uniform(0, 255, (size, size + seed % 5, 3))).astype(np.uint8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
  """60 training pairs converted into 9 shards, and a labelled held-out CSV of 12 images."""
  root = tmp_path_factory.mktemp("ar")
  phrases = (
      "a cat on a mat",
      "my dog in the park",
      "a bird, flying",
      "a boat at sea",
      "a red car",
      "the cat and the dog",
      "concatenate",
      "bird song at dawn",
  )
  for split, num in (("train", 60), ("test", 12)):
    with open(root / f"{split}.csv", "w", newline="") as f:
      writer = csv.writer(f)
      writer.writerow(("image_path", "caption", "label"))
      for i in range(num):
        name = f"{split}_{i}.png"
        Image.fromarray(_image(i + (1000 if split == "test" else 0))).save(root / name)
        writer.writerow((name, f"{phrases[i % len(phrases)]} #{i} ünïcode", i % 4 if i % 7 else ""))
  convert.convert(str(root / "train.csv"), str(root / "shards"), image_size=16, shard_size=7, progress=False)
  held_out = sources.CsvSource(str(root / "test.csv"))
  pool = poison.TargetPool.from_records(records_of(held_out), CLASSES)
  return str(root / "shards"), pool


def _ar_cfg(**overrides):
  cfg = poison.default_config()
  cfg.enabled = True
  return config_lib.override(
      cfg,
      {
          "targeted.enabled": True,
          "targeted.num_targets": 2,
          "targeted.poisons_per_target": 3,
          "backdoor.enabled": True,
          "backdoor.target_class": "boat",
          "backdoor.num_poisons": 5,
          "backdoor.caption_source": "train",
          "backdoor.position": "random",
          **overrides,
      },
  )


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {
            "backdoor.selection": "label_consistent",
            "targeted.enabled": False,
            "backdoor.trigger": "blended",
            "backdoor.num_poisons": 3,
        },
    ],
)
def test_lazy_poisoning_equals_the_eager_one_on_converted_shards(shards, overrides):
  directory, pool = shards
  source = array_record.ArrayRecordSource.from_pattern(directory)
  cfg = _ar_cfg(**overrides)
  lazy, info = poison.poison_source(source, pool, cfg, seed=4)
  expected, targeted_ids, backdoor_ids = eager_poisoning(source, pool, cfg, 4)
  assert (info.targeted_ids, info.backdoor_ids) == (targeted_ids, backdoor_ids)
  assert len(info.backdoor_ids) == cfg.backdoor.num_poisons
  got = records_of(lazy)
  assert_same_records(got, expected)
  transform = poison.make_image_transform(cfg, seed=4)
  for a, b in zip(got, expected):  # Every record's pixels.
    np.testing.assert_array_equal(pixels(a, transform), pixels(b, transform))
  # Pickled into a grain worker, the lazy source reads the same records.
  assert_same_records(records_of(pickle.loads(pickle.dumps(lazy))), expected)


def test_array_record_metadata_reads_no_image_bytes(shards):
  directory, pool = shards
  source = array_record.ArrayRecordSource.from_pattern(directory)
  reference = metadata_lib.read_metadata(source, progress=False)
  cfg = _ar_cfg()
  expected_lazy, expected_info = poison.poison_source(source, pool, cfg, seed=1)
  expected_records = records_of(expected_lazy)

  blind = array_record.ArrayRecordSource.from_pattern(directory)
  blind._records = _RaisingRecords(len(source))  # Any record read (header + JPEG) now fails.
  assert_metadata_equal(blind.metadata(), reference)
  lazy, info = poison.poison_source(blind, pool, cfg, seed=1)
  assert info == expected_info
  meta = lazy.metadata()
  assert list(meta.captions) == [r["caption"] for r in expected_records]
  np.testing.assert_array_equal(meta.poisoned, [int(r["poisoned"]) for r in expected_records])
  np.testing.assert_array_equal(meta.ids, [int(r["id"]) for r in expected_records])
  np.testing.assert_array_equal(metadata_lib.poisoned_flags(lazy), [int(r["poisoned"]) > 0 for r in expected_records])
  np.testing.assert_array_equal(
      metadata_lib.clean_subset(lazy, 20, 9).indices, eager_clean_subset(expected_lazy, 20, 9)
  )


def test_shards_without_an_index_fall_back_loudly_and_index_only_repairs_them(shards, tmp_path, caplog):
  directory, _ = shards
  copy_dir = tmp_path / "old"
  copy_dir.mkdir()
  for name in os.listdir(directory):
    if not name.endswith(array_record.INDEX_SUFFIX):  # A shard set from before the index.
      (copy_dir / name).write_bytes((open(os.path.join(directory, name), "rb")).read())
  reference = array_record.ArrayRecordSource.from_pattern(directory).metadata()
  source = array_record.ArrayRecordSource.from_pattern(str(copy_dir))
  with caplog.at_level(logging.WARNING):
    assert_metadata_equal(source.metadata(), reference)
  assert "FULL PASS" in caplog.text and f"--index_only --output_dir={copy_dir}" in caplog.text

  assert convert.index_shards(str(copy_dir), progress=False) == (9, 9)
  assert convert.index_shards(str(copy_dir), progress=False) == (0, 9)
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    fresh = array_record.ArrayRecordSource.from_pattern(str(copy_dir))
    assert_metadata_equal(fresh.metadata(), reference)
  assert "FULL PASS" not in caplog.text
  # The cache stays out of the pickle grain sends to its workers.
  assert "_metadata" not in pickle.loads(pickle.dumps(fresh)).__dict__

  # A stale index (a shard rewritten without it) is named, with the fix.
  first = sorted(copy_dir.glob("*" + array_record.INDEX_SUFFIX))[0]
  index = array_record.ShardIndex.load(str(first))
  dataclasses.replace(
      index,
      source_ids=index.source_ids[:-1],
      labels=index.labels[:-1],
      poisoned=index.poisoned[:-1],
      captions=metadata_lib.StringColumn(list(index.captions)[:-1]),
  ).save(str(first))
  with pytest.raises(ValueError, match="stale.*--index_only --overwrite_index"):
    array_record.ArrayRecordSource.from_pattern(str(copy_dir)).metadata()


def test_index_holds_the_converter_ids_and_loose_patterns_skip_it(shards):
  directory, _ = shards
  source = array_record.ArrayRecordSource.from_pattern(directory)
  paths = array_record.shard_paths(os.path.join(directory, "shard-*"))  # Also matches .json/.index.npz.
  assert paths == source.paths and all(p.endswith(array_record.SHARD_SUFFIX) for p in paths)
  source_ids = np.concatenate([array_record.ShardIndex.load(array_record.index_path(p)).source_ids for p in paths])
  np.testing.assert_array_equal(source_ids, [int(source[i]["source_id"]) for i in range(len(source))])


# ------------------------------------------------------------------------------------ the columns


def test_string_column_round_trips_unicode_and_empty_strings():
  values = ["", "a cat", "ünïcödé 🐈", "", "x" * 1000]
  column = metadata_lib.StringColumn(values)
  assert list(column) == values and [column[i] for i in range(5)] == values and column[-1] == values[-1]
  with pytest.raises(IndexError):
    column[5]  # pylint: disable=pointless-statement
  joined = metadata_lib.StringColumn.concatenate([column, metadata_lib.StringColumn(["b"]), column])
  assert list(joined) == values + ["b"] + values
  again = metadata_lib.StringColumn.from_blob(column.blob, column.offsets)
  assert list(again) == values
  with pytest.raises(ValueError, match="offsets must rise from 0"):
    metadata_lib.StringColumn.from_blob(column.blob, column.offsets[:-1])
  overlay = metadata_lib.CaptionOverlay(column, {1: "poison"}, ["new"])
  assert list(overlay) == ["", "poison", *values[2:], "new"] == [overlay[i] for i in range(len(overlay))]


def test_metadata_rejects_columns_of_different_lengths():
  with pytest.raises(ValueError, match="one length"):
    metadata_lib.Metadata(ids=np.arange(3), captions=["a", "b"], labels=np.zeros(3), poisoned=np.zeros(3))


@pytest.mark.parametrize("name", ["cat", "ice cream", "kite (bird of prey)", "ü", "dog", "s", "Cat"])
def test_caption_search_equals_the_per_caption_search(name):
  rng = np.random.default_rng(0)
  words = [
      "cat",
      "cats",
      "Cat.",
      "dog",
      "ice",
      "cream",
      "ice cream",
      "kite (bird of prey)",
      "über",
      "ü",
      "s",
      "concatenate",
      "(cat)",
      "",
      "\n",
      "x",
  ]
  # Captions ending in "cat" next to ones starting with "s": a join without separators would see "cats";
  # "an ice" next to "cream cone": a join by spaces would see "ice cream".
  captions = [
      "".join(rng.choice(words, rng.integers(0, 6)).tolist())
      if i % 3
      else " ".join(rng.choice(words, rng.integers(0, 6)).tolist())
      for i in range(3000)
  ]
  captions += ["a cat", "s and more", "", "cat", "s", "an ice", "cream cone"]
  expected = [i for i, c in enumerate(captions) if poison.mentions(name).search(c)]
  got = poison.CaptionSearch(metadata_lib.StringColumn(captions)).matching(name)
  assert got.dtype == np.int64 and got.tolist() == expected
  assert poison.CaptionSearch([]).matching(name).tolist() == []
