"""RoCLIP's matching diagnostics of finished runs, averaged over their matching epochs (and seeds).

  python -m roclip_jax.experiments.matching_summary DIR/seed_*/roclip_paper DIR/seed_*/roclip_robust

Runs with the same directory name (a benchmark row over several seeds) form one line: the mean of
each `roclip/*` diagnostic over all their matching epochs (the `kind: "epoch"` rows of
`metrics.jsonl`), the epochs the collapse detector flagged per run, and from each run's
`final_results.json` the backdoor ASR next to the share of *clean* test images classified as the
target (an ASR that only equals that share is a bias toward the target caption, not the trigger).
docs/roclip.md, section 6, quotes its output.
"""

from __future__ import annotations

import collections
import json
import os
import sys

import numpy as np

from roclip_jax import metrics

# (column, metric key, scale, format) of the table, in order.
_COLUMNS = (
    ("same-class matches", "roclip/matched_same_class_frac", 100, "{:.1f}%"),
    ("distinct rows / batch", "roclip/distinct_match_frac", 100, "{:.1f}%"),
    ("largest hub", "roclip/largest_hub", 1, "{:.1f}"),
    ("matched-caption cosine", "roclip/match_similarity", 1, "{:.2f}"),
    ("own-caption cosine", "roclip/own_similarity", 1, "{:.2f}"),
    ("poisoned matched to clean", "roclip/poisoned_matched_clean_frac", 100, "{:.1f}%"),
)


def matching_epochs(run_dir: str) -> list[dict]:
  """The end-of-matching-epoch rows of a run (those that carry the diagnostics)."""
  return [r for r in metrics.read_metrics(run_dir) if r.get("kind") == "epoch" and "roclip/match_similarity" in r]


def summarize(run_dirs: list[str]) -> str:
  """A markdown table, one line per run-directory name, averaged over every matching epoch."""
  groups: dict[str, list[str]] = collections.defaultdict(list)
  for run_dir in run_dirs:
    groups[os.path.basename(os.path.normpath(run_dir))].append(run_dir)
  header = ["run", "runs"] + [c[0] for c in _COLUMNS] + ["epochs flagged", "backdoor ASR (clean images -> target)"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, dirs in groups.items():
    epochs = [row for d in dirs for row in matching_epochs(d)]
    cells = []
    for _, key, scale, fmt in _COLUMNS:
      values = [row[key] for row in epochs if key in row]
      cells.append(fmt.format(scale * float(np.mean(values))) if values else "n/a")
    flagged, attack = [], []
    for d in dirs:
      flagged.append(
          ",".join(str(r["epoch"]) for r in matching_epochs(d) if r.get("roclip/collapse_warning")) or "none"
      )
      final_path = os.path.join(d, "final_results.json")
      if os.path.exists(final_path):
        with open(final_path) as f:
          final = json.load(f)
        attack.append(
            f"{100 * final['backdoor_asr/asr']:.1f}% " f"({100 * final['backdoor_asr/clean_target_rate']:.1f}%)"
        )
    lines.append(
        f"| {name} | {len(dirs)} | " + " | ".join(cells) + f" | {'; '.join(flagged)} | {'; '.join(attack) or 'n/a'} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
  if not argv:
    print(__doc__)
    return 2
  print(summarize(argv))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
