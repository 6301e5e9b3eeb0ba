"""The matching-diagnostics summary averages every matching epoch of every seed of a row."""

import json

from roclip_jax.experiments import matching_summary


def _run(path, epochs, asr, clean_rate):
  path.mkdir(parents=True)
  rows = [{"step": 1, "kind": "train", "loss": 1.0}]  # Not an epoch row: ignored.
  rows += [dict(kind="epoch", step=10 * e, epoch=e, **values) for e, values in epochs]
  rows.append({"step": 99, "kind": "epoch", "epoch": 9})  # An epoch row without diagnostics.
  (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (path / "final_results.json").write_text(
      json.dumps({"backdoor_asr/asr": asr, "backdoor_asr/clean_target_rate": clean_rate})
  )
  return str(path)


def _diag(same, distinct, hub, match, own, poisoned, flagged=0):
  return {
      "roclip/matched_same_class_frac": same,
      "roclip/distinct_match_frac": distinct,
      "roclip/largest_hub": hub,
      "roclip/match_similarity": match,
      "roclip/own_similarity": own,
      "roclip/poisoned_matched_clean_frac": poisoned,
      "roclip/collapse_warning": flagged,
  }


def test_summary_averages_all_matching_epochs_of_all_seeds(tmp_path):
  a = _run(
      tmp_path / "seed_0" / "roclip_x",
      [(2, _diag(0.1, 0.2, 10, 0.5, 0.4, 1.0)), (4, _diag(0.2, 0.1, 30, 0.3, 0.2, 0.5, flagged=1))],
      asr=0.25,
      clean_rate=0.2,
  )
  b = _run(tmp_path / "seed_1" / "roclip_x", [(4, _diag(0.6, 0.3, 20, 0.4, 0.3, 0.0))], asr=0.0, clean_rate=0.0)
  table = matching_summary.summarize([a, b]).splitlines()
  assert len(table) == 3
  # Means over the three matching epochs: same (0.1+0.2+0.6)/3 = 30%, distinct 20%, hub 20,
  # match 0.40, own 0.30, poisoned (1+0.5+0)/3 = 50%; seed 0 flagged epoch 4, seed 1 none.
  assert table[2] == (
      "| roclip_x | 2 | 30.0% | 20.0% | 20.0 | 0.40 | 0.30 | 50.0% | 4; none | " "25.0% (20.0%); 0.0% (0.0%) |"
  )
