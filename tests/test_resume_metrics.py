"""Counts and metrics that must be right across resumes and reruns; benchmark rows keyed by config.

* (RoCLIP's matching-epoch diagnostics after a resume inside a matching epoch: test_train.test_resume_is_exact.)
* The skipped-example count carries across a resume (it is a sum over the global batch in the state).
* Rerunning a finished run writes no second final row and returns the same results.
* The benchmark reruns a row whose config changed (moving the old one aside) and reuses an unchanged one.
"""

import json
import os

import numpy as np
import ml_collections

from roclip_jax import metrics as metrics_lib
from roclip_jax import train
from roclip_jax.experiments import robustness
from tests.helpers import tiny_config, write_corrupt_csv


def _rows(workdir, kind):
  return [r for r in metrics_lib.read_metrics(str(workdir)) if r["kind"] == kind]


def test_skipped_count_carries_across_a_resume(demo_root, tmp_path):
  csv_path = write_corrupt_csv(tmp_path)
  overrides = {
      "data.source": "csv",
      "data.csv_path": str(csv_path),
      "data.batch_size": 8,
      "num_epochs": 3,
      "checkpoint.every_steps": 1000,
  }
  straight = tmp_path / "straight"
  train.train_and_evaluate(tiny_config(demo_root, **overrides), str(straight))
  split = tmp_path / "split"
  train.train_and_evaluate(tiny_config(demo_root, **dict(overrides, max_steps=5)), str(split))
  train.train_and_evaluate(tiny_config(demo_root, **overrides), str(split))
  final_straight, final_split = _rows(straight, "eval")[-1], _rows(split, "eval")[-1]
  assert final_straight["skipped_examples"] >= 4  # Two bad images, read in each of 3 epochs (minus drop_remainder).
  assert final_split["skipped_examples"] == final_straight["skipped_examples"]
  assert _rows(split, "train")[-1]["skipped_examples"] == final_straight["skipped_examples"]


def test_rerunning_a_finished_run_adds_no_row(demo_root, tmp_path):
  config = tiny_config(demo_root, max_steps=3)
  config.evals.zeroshot = dict(type="zeroshot", every_steps=0)
  workdir = tmp_path / "run"
  first = train.train_and_evaluate(config, str(workdir))
  second = train.train_and_evaluate(config, str(workdir))
  finals = [r for r in _rows(workdir, "eval") if r.get("final")]
  assert len(finals) == 1 and len(_rows(workdir, "eval")) == 1
  assert second == first and "zeroshot/top1" in second


def test_benchmark_rows_are_keyed_by_their_full_config(tmp_path):
  base = tiny_config("/nonexistent")
  run_dir = str(tmp_path / "bench" / "row")
  key = robustness.config_key(robustness.row_config(base, {"defense": "roclip"}, str(tmp_path)))
  assert robustness.prepare_run_dir(run_dir, key) is False  # New row.
  with open(os.path.join(run_dir, "final_results.json"), "w") as f:
    json.dump({"zeroshot/top1": 0.5}, f)
  assert robustness.prepare_run_dir(run_dir, key) is True  # Unchanged: reused.
  changed = robustness.config_key(robustness.row_config(base, {"defense": "roclip", "roclip.k": 3}, str(tmp_path)))
  assert changed != key
  assert robustness.prepare_run_dir(run_dir, changed) is False  # Changed: trained anew ...
  assert not os.path.exists(os.path.join(run_dir, "final_results.json"))
  stale = [d for d in os.listdir(tmp_path / "bench") if d.startswith("row.stale-")]
  assert len(stale) == 1  # ... and the old run is kept aside, not deleted.
  with open(tmp_path / "bench" / stale[0] / "final_results.json") as f:
    assert json.load(f) == {"zeroshot/top1": 0.5}
  # A changed value anywhere in the config (not only in the row's overrides) changes the key.
  base.optim.lr = base.optim.lr * 2
  assert robustness.config_key(robustness.row_config(base, {"defense": "roclip"}, str(tmp_path))) != key


def test_benchmark_rows_ignore_the_blocks_of_defenses_they_do_not_run(tmp_path):
  """A CLIP row is reused when only another defense's config block changed, and retrained when its
  own config did; a RoCLIP row is retrained when its roclip block changed."""
  base = tiny_config("/nonexistent")
  clip_dir, roclip_dir = str(tmp_path / "clip"), str(tmp_path / "roclip")
  keys = {
      (name, k): robustness.config_key(robustness.row_config(base, {"defense": name, "roclip.k": k}, str(tmp_path)))
      for name in ("none", "roclip")
      for k in (2, 3)
  }
  for name, run_dir in (("none", clip_dir), ("roclip", roclip_dir)):
    assert robustness.prepare_run_dir(run_dir, keys[name, 2]) is False
    with open(os.path.join(run_dir, "final_results.json"), "w") as f:
      json.dump({"zeroshot/top1": 0.5}, f)
  assert keys["none", 2] != keys["none", 3]  # The stored key is the full config ...
  assert robustness.prepare_run_dir(clip_dir, keys["none", 3]) is True  # ... the CLIP row is the same run,
  assert robustness.prepare_run_dir(roclip_dir, keys["roclip", 3]) is False  # the RoCLIP row is not.
  lr = robustness.config_key(
      robustness.row_config(base, {"defense": "none", "roclip.k": 3, "optim.lr": 2 * base.optim.lr}, str(tmp_path))
  )
  assert robustness.prepare_run_dir(clip_dir, lr) is False
  # A knob added unset (a None placeholder, as a new RoCLIP option arrives) is the same run; set, it is not.
  with open(os.path.join(roclip_dir, "final_results.json"), "w") as f:
    json.dump({"zeroshot/top1": 0.5}, f)
  stored = json.loads(keys["roclip", 3])
  stored["roclip"]["a_new_knob"] = None
  assert robustness.prepare_run_dir(roclip_dir, json.dumps(stored)) is True
  stored["roclip"]["a_new_knob"] = "on"
  assert robustness.prepare_run_dir(roclip_dir, json.dumps(stored)) is False


def test_seed_summary_is_mean_and_sample_std_over_seeds():
  per_seed = {
      0: {
          "CLIP": {"defense": "none", "zeroshot/top1": 0.40, "backdoor_asr/asr": 1.00},
          "RoCLIP": {"defense": "roclip", "zeroshot/top1": 0.20, "backdoor_asr/asr": 0.00},
      },
      1: {
          "CLIP": {"defense": "none", "zeroshot/top1": 0.50, "backdoor_asr/asr": 0.90},
          "RoCLIP": {"defense": "roclip", "zeroshot/top1": 0.30, "backdoor_asr/asr": 0.02},
      },
      2: {"CLIP": {"defense": "none", "zeroshot/top1": 0.45, "backdoor_asr/asr": 0.95}},
  }
  summary = robustness.aggregate_seeds(per_seed)
  clip = summary["CLIP"]["zeroshot/top1"]
  assert summary["CLIP"]["seeds"] == [0, 1, 2] and summary["RoCLIP"]["seeds"] == [0, 1]
  np.testing.assert_allclose(
      [clip["mean"], clip["std"], clip["min"]], [np.mean([0.4, 0.5, 0.45]), np.std([0.4, 0.5, 0.45], ddof=1), 0.4]
  )
  assert "linear_probe/top1" not in summary["CLIP"]  # Never measured: no made-up zero.
  table = robustness.format_seed_table(summary, tiny_config("/nonexistent"))
  assert "| CLIP | none | 0,1,2 | 45.0 ± 5.0% | n/a | 95.0 ± 5.0% | n/a | 40.0% |" in table


def test_control_differences_are_per_seed_differences_over_seeds_where_both_ran():
  per_seed = {
      0: {"CLIP+aug": {"zeroshot/top1": 0.80, "backdoor_asr/asr": 0.90}, "D": {"zeroshot/top1": 0.78}},
      1: {"CLIP+aug": {"zeroshot/top1": 0.70, "backdoor_asr/asr": 0.85}, "D": {"zeroshot/top1": 0.74}},
      2: {"CLIP+aug": {"zeroshot/top1": 0.75}},  # D did not run: seed 2 is left out, not counted as 0.
  }
  config = tiny_config("/nonexistent")
  config.experiment = ml_collections.ConfigDict({"runs": [], "controls": (("D", "CLIP+aug"), ("E", "CLIP+aug"))})
  pairs = robustness.controls(config, {"D": 0, "CLIP+aug": 0})
  assert pairs == [("D", "CLIP+aug")]  # E never ran.
  diff = robustness.control_differences(per_seed, pairs)["D"]
  zs = diff["zeroshot/top1"]
  assert diff["seeds"] == [0, 1] and diff["control"] == "CLIP+aug"
  np.testing.assert_allclose(zs["values"], [-0.02, 0.04], atol=1e-12)
  np.testing.assert_allclose([zs["mean"], zs["std"], zs["min"]], [0.01, np.std([-0.02, 0.04], ddof=1), -0.02])
  assert "backdoor_asr/asr" not in diff  # D's ASR was never measured.
  table = robustness.format_differences({"D": diff})
  assert "| D | CLIP+aug | 0,1 | +1.0 ± 4.2 | n/a | n/a | n/a | -2.0 |" in table


def test_warnings_and_curves_under_the_table_come_from_each_rows_defense(tmp_path):
  """A trained row's warnings (`Defense.run_warnings`: RoCLIP's collapse detector, read from its
  metrics.jsonl) and its defense's curves join the table's notes and panels; other rows add none."""
  epochs = [
      {"kind": "epoch", "epoch": 2, "roclip/collapse_warning": False},
      {"kind": "epoch", "epoch": 4, "roclip/collapse_warning": True, "roclip/collapse_reasons": "hub collapse"},
      {"kind": "epoch", "epoch": 6, "roclip/collapse_warning": True, "roclip/collapse_reasons": "own cosine fell"},
  ]
  for name in ("RoCLIP (paper)", "CLIP+aug"):
    os.makedirs(tmp_path / robustness.slug(name))
    with open(tmp_path / robustness.slug(name) / "metrics.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in epochs)  # The same rows: only RoCLIP's defense reads them.
  results = {"RoCLIP (paper)": {"defense": "roclip"}, "CLIP+aug": {"defense": "none"}, "not run": {}}
  notes = robustness.run_warnings(results, str(tmp_path))
  assert len(notes) == 1
  assert notes[0].startswith("WARNING RoCLIP (paper): the RoCLIP collapse detector fired in matching epoch(s) 4, 6")
  assert "(last: own cosine fell)" in notes[0]
  keys = [key for key, _, _ in robustness.curve_panels(results)]
  assert keys[:2] == [key for key, _, _ in robustness.CURVES] and "roclip/match_similarity" in keys
  assert robustness.curve_panels({"CLIP+aug": {"defense": "none"}}) == robustness.CURVES
