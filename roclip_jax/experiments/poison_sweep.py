"""ASR against poison rate: the benchmark's rows retrained at several backdoor poison counts.

  python -m roclip_jax.experiments.poison_sweep --config=configs/robustness_demo.py --workdir=DIR \
      --num_poisons=6,12,18,36,72 --only='CLIP,CLIP+aug,RoCLIP (paper),RoCLIP (robust)'

For each count n, every selected row of `config.experiment.runs` is trained with
`poison.backdoor.num_poisons = n` in `DIR/backdoor_<n>/` (rows resume and are reused exactly as in
`experiments.robustness`); then `DIR/sweep.png` plots backdoor ASR (and zero-shot accuracy) against
the poison rate, one line per row, and `DIR/sweep.md` lists the numbers.
"""

from __future__ import annotations

import json
import os

from absl import app
from absl import flags
import ml_collections

from roclip_jax import config_lib
from roclip_jax.experiments import robustness

FLAGS = flags.FLAGS
# --config, --workdir and --only are the benchmark's own flags (defined by `robustness`).
flags.DEFINE_list("num_poisons", ["6", "12", "18", "36"], "Backdoor poison counts to train at.")


def num_clean_pairs(config: ml_collections.ConfigDict) -> int:
  demo = config.data.demo
  return int(demo.num_classes * demo.train_per_class) if config.data.source == "demo" else 0


def run_sweep(config: ml_collections.ConfigDict, workdir: str, counts, only=()) -> dict[int, dict[str, dict]]:
  results = {}
  for n in sorted(int(c) for c in counts):
    sweep_config = config_lib.override(config, {"poison.backdoor.num_poisons": int(n)})
    results[int(n)] = robustness.run_all(sweep_config, os.path.join(workdir, f"backdoor_{n}"), only)
  return results


def format_sweep(results: dict[int, dict[str, dict]], clean_pairs: int) -> str:
  names = list(dict.fromkeys(name for per_n in results.values() for name in per_n))
  rate = lambda n: f"{100 * n / clean_pairs:.2f}%" if clean_pairs else str(n)
  lines = ["| run | " + " | ".join(f"ASR @ {n} ({rate(n)})" for n in results) + " |", "|" + "---|" * (len(results) + 1)]
  for name in names:
    cells = []
    for per_n in results.values():
      value = per_n.get(name, {}).get("backdoor_asr/asr")
      zs = per_n.get(name, {}).get("zeroshot/top1")
      cells.append("n/a" if value is None else f"{100 * value:.1f}% (zs {100 * zs:.1f}%)")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot_sweep(results: dict[int, dict[str, dict]], clean_pairs: int, path: str) -> None:
  import matplotlib  # pylint: disable=import-outside-toplevel

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = list(dict.fromkeys(name for per_n in results.values() for name in per_n))
  x_of = lambda n: 100 * n / clean_pairs if clean_pairs else n
  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in names:
    for ax, key in zip(axes, ("backdoor_asr/asr", "zeroshot/top1")):
      pts = [
          (x_of(n), 100 * per_n[name][key])
          for n, per_n in sorted(results.items())
          if name in per_n and per_n[name].get(key) is not None
      ]
      if pts:
        ax.plot(*zip(*pts), marker="o", label=name)
  for ax, title in zip(axes, ("backdoor ASR (%)", "zero-shot top-1 (%)")):
    ax.set_title(title)
    ax.set_xlabel("backdoor poison rate (% of clean pairs)" if clean_pairs else "backdoor poisons")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv) -> None:
  del argv
  if FLAGS.seeds:
    raise app.UsageError("The sweep runs one seed: set it with --config=FILE:seed=S,poison_seed=S, not --seeds.")
  config, workdir = FLAGS.config, robustness.start(FLAGS.workdir)
  results = run_sweep(config, workdir, FLAGS.num_poisons, FLAGS.only)
  clean = num_clean_pairs(config)
  table = format_sweep(results, clean)
  with open(os.path.join(workdir, "sweep.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "sweep.json"), "w") as f:
    json.dump({str(k): v for k, v in results.items()}, f, indent=2)
  plot_sweep(results, clean, os.path.join(workdir, "sweep.png"))
  print("\n" + table)
  print(f"Written: {workdir}/sweep.md, sweep.json, sweep.png")


if __name__ == "__main__":
  app.run(main)
