"""The robustness benchmark: every defense trained on the same poisoned data.

  python -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py --workdir=DIR

Trains one run per row of `config.experiment.runs` (each a name and config
overrides applied to the shared base config) in `DIR/<name>`, then prints one
table (defense x zero-shot, linear probe, backdoor ASR, targeted-poison
success), writes it to `DIR/results.json` and `DIR/results.md`, and plots ASR
and zero-shot accuracy over training to `DIR/curves.png`. Runs resume from
their checkpoints, and a finished run is not trained again.
"""
from __future__ import annotations

import copy
import json
import os
import re
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from roclip_jax import config_lib

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Benchmark config (configs/robustness_demo.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for every run and the results.")
flags.DEFINE_list("only", [], "Run only these rows (names from config.experiment.runs).")
flags.mark_flags_as_required(["config", "workdir"])

# Column label -> metric key in the final evaluation results.
COLUMNS = {
    "zero-shot top-1": "zeroshot/top1",
    "linear probe top-1": "linear_probe/top1",
    "backdoor ASR": "backdoor_asr/asr",
    "targeted-poison success": "targeted_poison/success_rate",
}


def slug(name: str) -> str:
  return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def row_config(base: ml_collections.ConfigDict, overrides: dict[str, Any], workdir: str) -> ml_collections.ConfigDict:
  """One row's config: `base` with the row's overrides, "{workdir}" in string values filled in."""
  overrides = {k: v.format(workdir=workdir) if isinstance(v, str) else v for k, v in dict(overrides).items()}
  return config_lib.override(base, overrides)


def run_all(config: ml_collections.ConfigDict, workdir: str, only=()) -> dict[str, dict[str, Any]]:
  from roclip_jax import train  # Heavy imports after flag parsing.
  results = {}
  base = copy.deepcopy(config)
  del base.experiment
  for name, overrides in config.experiment.runs:
    if only and name not in only:
      continue
    run_dir = os.path.join(workdir, slug(name))
    done_file = os.path.join(run_dir, "final_results.json")
    if os.path.exists(done_file):
      with open(done_file) as f:
        results[name] = json.load(f)
      logging.info("%s: already finished, results read from %s", name, done_file)
      continue
    run_config = row_config(base, overrides, workdir)
    t0 = time.perf_counter()
    out = train.train_and_evaluate(run_config, run_dir)
    if out.get("stopped"):
      raise SystemExit(f"{name} stopped on a signal; run the same command again to resume.")
    out["train_seconds"] = time.perf_counter() - t0
    out["defense"] = run_config.defense
    with open(done_file, "w") as f:
      json.dump(out, f, indent=2)
    results[name] = out
  return results


def format_table(results: dict[str, dict[str, Any]], config: ml_collections.ConfigDict) -> str:
  header = "| run | defense | " + " | ".join(COLUMNS) + " |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 2)]
  for name, res in results.items():
    cells = []
    for key in COLUMNS.values():
      value = res.get(key)
      cells.append("n/a" if value is None else f"{100 * value:.1f}%")
    lines.append(f"| {name} | {res.get('defense', '?')} | " + " | ".join(cells) + " |")
  p = config.poison
  notes = [
      f"Seeds: training seed {config.seed}, poison seed {p.seed}. Data: built-in demo set "
      f"({config.data.demo.num_classes} classes, {config.data.demo.train_per_class}/class train, "
      f"{config.data.demo.test_per_class}/class test), {config.num_epochs} epochs, global batch "
      f"{config.data.batch_size}, model preset with image size {config.model.image.image_size}. "
      f"Zero-shot chance: {100 / config.data.demo.num_classes:.1f}%.",
  ]
  if p.backdoor.enabled:
    notes.append(f"Backdoor: {p.backdoor.trigger} trigger, target '{p.backdoor.target_class}', "
                 f"{p.backdoor.num_poisons} poisoned training pairs ({p.backdoor.selection} selection). "
                 "ASR: triggered test images of other classes classified as the target.")
  if p.targeted.enabled:
    notes.append(f"Targeted poisoning: {p.targeted.num_targets} target images x "
                 f"{p.targeted.poisons_per_target} adversarial captions appended. Success: target "
                 "classified as its adversarial class.")
  defenses = {dict(o).get("defense") for name, o in config.experiment.runs if name in results}
  if "safeclip" in defenses:
    sc = config.safeclip
    notes.append(f"SafeCLIP: {sc.inmodal_warmup} unimodal warm-up epochs (lr {sc.in_lr:g}), {sc.multimodal_warmup} "
                 f"CLIP epoch(s) at lr {sc.filter_lr:g}, then a Gaussian-mixture safe/risky split every epoch "
                 f"(first: posterior >= {sc.threshold:g}; then +{sc.ratio_step:g} per epoch, at most {sc.max_ratio:g}).")
  for name, overrides in config.experiment.runs:
    overrides = dict(overrides)
    if name in results and overrides.get("defense") == "cleanclip":
      clean = overrides.get("cleanclip.num_clean_examples", config.cleanclip.num_clean_examples) or "all"
      notes.append(f"{name}: starts from the final model of {overrides['init_from'].replace('{workdir}/', '')!r} "
                   f"and fine-tunes it for {overrides.get('num_epochs', config.num_epochs)} epochs on {clean} clean "
                   f"training pairs (lr {overrides.get('optim.lr', config.optim.lr):g}, CLIP + in-modal losses "
                   f"weighted {config.cleanclip.clip_weight:g} / {config.cleanclip.inmodal_weight:g}).")
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


def plot_curves(results: dict[str, dict[str, Any]], workdir: str, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from roclip_jax import metrics as metrics_lib

  fig, axes = plt.subplots(1, 2, figsize=(10, 4))
  for name in results:
    rows = [r for r in metrics_lib.read_metrics(os.path.join(workdir, slug(name))) if r.get("kind") == "eval"]
    for ax, key, title in ((axes[0], "backdoor_asr/asr", "backdoor ASR"), (axes[1], "zeroshot/top1", "zero-shot top-1")):
      pts = sorted((r["step"], r[key]) for r in rows if key in r)
      if pts:
        ax.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
      ax.set_title(title)
      ax.set_xlabel("step")
      ax.set_ylabel("%")
  for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv) -> None:
  del argv
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/roclip_jax/jax_cache"))
  from roclip_jax import metrics
  metrics.quiet_library_logs()
  config, workdir = FLAGS.config, os.path.abspath(FLAGS.workdir)
  os.makedirs(workdir, exist_ok=True)
  results = run_all(config, workdir, FLAGS.only)
  table = format_table(results, config)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot_curves(results, workdir, os.path.join(workdir, "curves.png"))
  print("\n" + table)
  print(f"Written: {workdir}/results.md, results.json, curves.png")


if __name__ == "__main__":
  app.run(main)
