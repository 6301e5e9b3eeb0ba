"""Bad configs are rejected before anything is compiled, with the field named."""

import importlib.util
import os

import pytest

from roclip_jax import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=None):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.mark.parametrize("name", ["demo", "vitb32", "rn50", "robustness_demo", "roclip_ablation"])
def test_shipped_configs_are_valid(name):
  config = load_config(name)
  if config.data.source == "csv":
    config.data.csv_path = "/data/train.csv"  # Real-data configs take the path on the command line.
  config_lib.validate(config, num_batch_shards=8)


def test_every_benchmark_row_is_a_valid_config(tmp_path):
  """The rows of `make demo`, as the benchmark builds them (CleanCLIP starts from the CLIP row's run)."""
  from roclip_jax.experiments import robustness

  config = load_config("robustness_demo")
  clip_run = tmp_path / robustness.slug("CLIP")
  (clip_run / "checkpoints").mkdir(parents=True)
  (clip_run / "config.json").write_text("{}")
  base = config_lib.override(config, {})
  del base.experiment
  defenses = {}
  for name, overrides in config.experiment.runs:
    row = robustness.row_config(base, overrides, str(tmp_path))
    config_lib.validate(row, num_batch_shards=8)
    defenses[name] = row.defense
    if row.defense == "cleanclip":
      assert row.init_from == str(clip_run)
  assert set(defenses.values()) == {"none", "roclip", "safeclip", "cleanclip"}


def test_poison_sweep_loads_beside_the_benchmark_and_tabulates_rates():
  """The sweep shares the benchmark's flags (importing both once raised DuplicateFlagError)."""
  from roclip_jax.experiments import poison_sweep, robustness

  config = load_config("robustness_demo", "backdoor=6")
  assert config.poison.backdoor.num_poisons == 6
  clean = poison_sweep.num_clean_pairs(config)
  assert clean == 10 * 500
  results = {
      6: {"CLIP": {"backdoor_asr/asr": 0.25, "zeroshot/top1": 0.5}},
      36: {"CLIP": {"backdoor_asr/asr": 1.0, "zeroshot/top1": 0.4}, "CLIP+aug": {}},
  }
  table = poison_sweep.format_sweep(results, clean).splitlines()
  assert table[0] == "| run | ASR @ 6 (0.12%) | ASR @ 36 (0.72%) |"
  assert table[2] == "| CLIP | 25.0% (zs 50.0%) | 100.0% (zs 40.0%) |"
  assert table[3] == "| CLIP+aug | n/a | n/a |"
  assert robustness.FLAGS["num_poisons"].default == ["6", "12", "18", "36"]


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("defense", "magic", "config.defense"),
        ("data.batch_size", 12, "config.data.batch_size"),
        ("data.source", "s3", "config.data.source"),
        ("optim.lr", -1.0, "config.optim.lr"),
        ("roclip.k", 1, "config.roclip.k"),
        ("defense", "cleanclip", "config.init_from"),
        ("model.image.patch_size", 5, "config.model.image.patch_size"),
    ],
)
def test_invalid_values_name_the_field(field, value, message):
  config = load_config("demo", "defense=roclip")
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace(".", r"\.")):
    config_lib.validate(config, num_batch_shards=8)


def test_sharded_pool_size_must_divide_over_shards():
  config = load_config("demo", "defense=roclip")
  config.roclip.shard_pool = True
  config.roclip.pool_size = 1001
  with pytest.raises(config_lib.ConfigError, match=r"config\.roclip\.pool_size.*1000 or 1008"):
    config_lib.validate(config, num_batch_shards=8)


def test_variant_parsing_casts_and_rejects_unknown_keys():
  v = config_lib.parse_variant("defense=roclip,epochs=3,fast", defense="none", epochs=10, fast=False)
  assert (v.defense, v.epochs, v.fast) == ("roclip", 3, True)
  with pytest.raises(config_lib.ConfigError, match="Unknown config variant 'bogus'"):
    config_lib.parse_variant("bogus=1", defense="none")


def test_dotted_overrides_copy_and_reject_unknown_fields():
  config = load_config("demo")
  changed = config_lib.override(config, {"roclip.k": 3, "augment.image": True})
  assert (changed.roclip.k, changed.augment.image) == (3, True)
  assert (config.roclip.k, config.augment.image) == (2, False)  # The original is untouched.
  with pytest.raises(config_lib.ConfigError, match="'roclip.kk'"):
    config_lib.override(config, {"roclip.kk": 3})


def test_augment_placement_is_validated():
  c = config_lib.base_config()
  c.augment.placement = "gpu"
  with pytest.raises(config_lib.ConfigError, match=r"config\.augment\.placement='gpu' is unknown"):
    config_lib.validate(c)
  c.augment.placement = "device"
  c.augment.device_source_size = c.model.image.image_size - 1
  with pytest.raises(config_lib.ConfigError, match=r"device_source_size=.* is smaller than the model's image size"):
    config_lib.validate(c)
  c.augment.device_source_size = 0
  config_lib.validate(c)
