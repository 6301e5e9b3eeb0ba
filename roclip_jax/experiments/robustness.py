"""The robustness benchmark: every defense trained on the same poisoned data.

  python -m roclip_jax.experiments.robustness --config=configs/robustness_demo.py --workdir=DIR

Trains one run per row of `config.experiment.runs` (each a name and config
overrides applied to the shared base config) in `DIR/<name>`, then prints one
table (defense x zero-shot, linear probe, backdoor ASR, targeted-poison
success), writes it to `DIR/results.json` and `DIR/results.md`, and plots ASR
and zero-shot accuracy over training to `DIR/curves.png`.

Each row is keyed by its full config (`DIR/<name>/row_config.json`): a row
whose config is unchanged resumes from its checkpoints, or, once finished, is
not trained again; a row whose config changed is trained anew, and its old
directory is moved aside to `DIR/<name>.stale-<hash>` (nothing is deleted).
The config blocks of defenses a row does not run (a CLIP row's `roclip`) are
not part of its identity (`row_identity`): nothing in the row reads them; nor
are its unset (None) knobs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import host_runtime
from roclip_jax import metrics as metrics_lib
from roclip_jax import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Benchmark config (configs/robustness_demo.py).", lock_config=False)
flags.DEFINE_string("workdir", None, "Directory for every run and the results.")
flags.DEFINE_list("only", [], "Run only these rows (names from config.experiment.runs).")
flags.DEFINE_list(
    "seeds",
    [],
    "Run the whole benchmark once per seed (training and poison seed both set to it), "
    "each in DIR/seed_<s>, and write the mean and standard deviation over seeds to DIR/results.md.",
)
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


def config_key(config: ml_collections.ConfigDict) -> str:
  """A row's identity: its full config, canonically serialised."""
  return json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)


def row_identity(key: str | None) -> str | None:
  """What must be equal for a stored row to be this one: its config (`config_key`) without the config
  blocks of the defenses it does not run, which nothing in it reads, and without its unset (None)
  knobs; so that a new RoCLIP knob, say, does not retrain the CLIP rows, nor, while unset, the RoCLIP
  rows. None for a missing or unreadable key."""
  try:
    config = json.loads(key) if key else None
  except json.JSONDecodeError:
    return None
  if not isinstance(config, dict):
    return None
  unused = {defenses.get(name).config_block for name in defenses.names() if name != config.get("defense")}
  return json.dumps(_without_unset({k: v for k, v in config.items() if k not in unused}), sort_keys=True)


def _without_unset(tree: Any) -> Any:
  """`tree` without its None leaves: an unset knob (a placeholder left None) is the absence of a
  choice, so adding one to a config block, which leaves it unset everywhere, retrains no row."""
  if isinstance(tree, dict):
    return {k: _without_unset(v) for k, v in tree.items() if v is not None}
  return tree


def prepare_run_dir(run_dir: str, key: str) -> bool:
  """Makes `run_dir` hold this config's run; returns whether it already finished.

  A directory written for another config is renamed to `<run_dir>.stale-<hash>`
  (its checkpoints must not be resumed under the new config; nothing is deleted).
  """
  key_file = os.path.join(run_dir, "row_config.json")
  if os.path.isdir(run_dir) and os.listdir(run_dir):
    old_key = None
    if os.path.exists(key_file):
      with open(key_file) as f:
        old_key = f.read()
    old_identity = row_identity(old_key)
    if old_identity is None or old_identity != row_identity(key):
      digest = hashlib.sha256((old_key or "").encode()).hexdigest()[:10]
      stale = f"{run_dir}.stale-{digest}"
      suffix = 0
      while os.path.exists(stale if not suffix else f"{stale}.{suffix}"):
        suffix += 1
      stale = stale if not suffix else f"{stale}.{suffix}"
      os.rename(run_dir, stale)
      logging.warning("%s was trained with another config; moved it to %s and training this row anew.", run_dir, stale)
  os.makedirs(run_dir, exist_ok=True)
  with open(key_file, "w") as f:
    f.write(key)
  return os.path.exists(os.path.join(run_dir, "final_results.json"))


def check_only(config: ml_collections.ConfigDict, only) -> None:
  """--only names rows of the table; a name that is none of them (a typo, or a name with a comma,
  which the flag splits) would otherwise run nothing and say nothing."""
  names = [name for name, _ in config.experiment.runs]
  unknown = [name for name in only if name not in names]
  if unknown:
    raise ValueError(
        f"--only names rows this config does not have: {unknown}. Its rows are {names}; pass a "
        "comma-separated list of those names exactly (a row name cannot contain a comma)."
    )


def run_all(config: ml_collections.ConfigDict, workdir: str, only=()) -> dict[str, dict[str, Any]]:
  check_only(config, only)
  results = {}
  base = copy.deepcopy(config)
  del base.experiment
  for name, overrides in config.experiment.runs:
    if only and name not in only:
      continue
    run_dir = os.path.join(workdir, slug(name))
    done_file = os.path.join(run_dir, "final_results.json")
    run_config = row_config(base, overrides, workdir)
    if prepare_run_dir(run_dir, config_key(run_config)):
      with open(done_file) as f:
        results[name] = json.load(f)
      logging.info("%s: already finished with this config, results read from %s", name, done_file)
      continue
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


def _row_defenses(results: dict[str, dict[str, Any]]):
  """(row name, its defense's class) of each row whose result names a registered defense."""
  return [
      (name, defenses.get(res["defense"])) for name, res in results.items() if res.get("defense") in defenses.names()
  ]


def run_warnings(results: dict[str, dict[str, Any]], workdir: str) -> list[str]:
  """Each trained row's defense's warnings about it (`Defense.run_warnings`: RoCLIP's collapse detector)."""
  notes = []
  for name, defense in _row_defenses(results):
    path = os.path.join(workdir, slug(name))
    if os.path.exists(os.path.join(path, "metrics.jsonl")):
      notes.extend(defense.run_warnings(name, metrics_lib.read_metrics(path)))
  return notes


def format_table(
    results: dict[str, dict[str, Any]], config: ml_collections.ConfigDict, workdir: str | None = None
) -> str:
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
      f"({config.data.demo.get('kind', 'shapes')}, {config.data.demo.num_classes} classes, {config.data.demo.train_per_class}/class train, "
      f"{config.data.demo.test_per_class}/class test), {config.num_epochs} epochs, global batch "
      f"{config.data.batch_size}, model preset with image size {config.model.image.image_size}. "
      f"Zero-shot chance: {100 / config.data.demo.num_classes:.1f}%."
  ]
  if p.backdoor.enabled:
    notes.append(
        f"Backdoor: {p.backdoor.trigger} trigger, target '{p.backdoor.target_class}', "
        f"{p.backdoor.num_poisons} poisoned training pairs ({p.backdoor.selection} selection). "
        "ASR: triggered test images of other classes classified as the target."
    )
  if p.targeted.enabled:
    notes.append(
        f"Targeted poisoning: {p.targeted.num_targets} target images x "
        f"{p.targeted.poisons_per_target} adversarial captions appended. Success: target "
        "classified as its adversarial class."
    )
  rows_by_defense: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # In the order the defenses first appear.
  for name, overrides in config.experiment.runs:
    overrides = dict(overrides)
    if name in results:
      rows_by_defense.setdefault(overrides.get("defense", config.defense), []).append((name, overrides))
  for defense, rows in rows_by_defense.items():
    notes.extend(defenses.get(defense).table_notes(config, rows))
  if workdir is not None:
    notes.extend(run_warnings(results, workdir))
  return "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"


# Panels of curves.png for every row: (metric key, row kind, title); then each defense's own (`Defense.curves`).
CURVES = (("backdoor_asr/asr", "eval", "backdoor ASR (%)"), ("zeroshot/top1", "eval", "zero-shot top-1 (%)"))


def curve_panels(results: dict[str, dict[str, Any]]) -> tuple[tuple[str, str, str], ...]:
  """`CURVES`, then the panels of the rows' defenses (`Defense.curves`), each once, in order."""
  panels = list(CURVES)
  for _, defense in _row_defenses(results):
    panels.extend(p for p in defense.curves if p not in panels)
  return tuple(panels)


def plot_curves(results: dict[str, dict[str, Any]], workdir: str, path: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  panels = curve_panels(results)
  fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
  axes = axes[0]
  for name in results:
    rows = metrics_lib.read_metrics(os.path.join(workdir, slug(name)))
    for ax, (key, kind, title) in zip(axes, panels):
      pts = sorted((r["step"], r[key]) for r in rows if r.get("kind") == kind and key in r)
      if pts:
        ax.plot([s for s, _ in pts], [100 * v for _, v in pts], marker="o", label=name)
      ax.set_title(title)
      ax.set_xlabel("step")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def aggregate_seeds(per_seed: dict[int, dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
  """{seed: {row: results}} -> {row: {metric: {"mean", "std", "min", "max", "values"}}} over the seeds that ran it.

  std is the sample standard deviation (ddof=1; 0 for a single seed).
  """
  rows: dict[str, dict[str, Any]] = {}
  for seed in sorted(per_seed):
    for name, res in per_seed[seed].items():
      entry = rows.setdefault(name, {"defense": res.get("defense"), "seeds": []})
      entry["seeds"].append(seed)
      for key in COLUMNS.values():
        if res.get(key) is not None:
          entry.setdefault(key, {"values": []})["values"].append(float(res[key]))
  for entry in rows.values():
    _summarise(entry)
  return rows


def _summarise(entry: dict[str, Any]) -> None:
  """Adds mean, sample std (ddof=1; 0 for one value), min and max to each metric's "values" in `entry`."""
  for key in COLUMNS.values():
    if key in entry:
      values = np.asarray(entry[key]["values"])
      entry[key].update(
          mean=float(values.mean()),
          std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
          min=float(values.min()),
          max=float(values.max()),
      )


def _stats_table(entries, second: tuple, column, cell, worst: tuple) -> list[str]:
  """Markdown lines of a table of per-seed summaries (`aggregate_seeds` or `control_differences`
  entries): the run, `second` = (header, entry -> text), the seeds, `column(name)` per metric holding
  `cell(stat, entry)`, and `worst` = (header, min -> text) for the worst seed's zero-shot."""
  header = f"| run | {second[0]} | seeds | " + " | ".join(column(c) for c in COLUMNS) + f" | {worst[0]} |"
  lines = [header, "|" + "---|" * (len(COLUMNS) + 4)]
  for name, entry in entries.items():
    cells = ["n/a" if entry.get(key) is None else cell(entry[key], entry) for key in COLUMNS.values()]
    zs = entry.get(COLUMNS["zero-shot top-1"])
    cells.append("n/a" if zs is None else worst[1](zs["min"]))
    seeds = ",".join(str(s) for s in entry["seeds"])
    lines.append(f"| {name} | {second[1](entry)} | {seeds} | " + " | ".join(cells) + " |")
  return lines


def format_seed_table(summary: dict[str, dict[str, Any]], config: ml_collections.ConfigDict) -> str:
  lines = _stats_table(
      summary,
      ("defense", lambda entry: entry.get("defense", "?")),
      lambda c: f"{c} (mean ± std)",
      lambda stat, _: f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}%",
      ("worst-seed zero-shot", lambda low: f"{100 * low:.1f}%"),
  )
  chance = 100 / config.data.demo.num_classes if config.data.source == "demo" else None
  note = f"Mean ± sample standard deviation over seeds (training seed = poison seed = s). " + (
      f"Zero-shot chance: {chance:.1f}%." if chance else ""
  )
  return "\n".join(lines) + "\n\n" + note + "\n"


def controls(config: ml_collections.ConfigDict, rows) -> list[tuple[str, str]]:
  """(row, its fair control) pairs of `config.experiment.controls` whose two rows both ran."""
  pairs = config.experiment.get("controls", ()) or ()
  return [(name, control) for name, control in pairs if name in rows and control in rows]


def control_differences(
    per_seed: dict[int, dict[str, dict[str, Any]]], pairs: list[tuple[str, str]]
) -> dict[str, dict[str, Any]]:
  """Each row minus its fair control, seed by seed: {row: {"control", "seeds", metric: {"values", "mean",
  "std", "min", "max"}}} over the seeds where both ran (std: sample, ddof=1; 0 for one seed)."""
  out = {}
  for name, control in pairs:
    entry = {"control": control, "seeds": []}
    for seed in sorted(per_seed):
      row, ctl = per_seed[seed].get(name), per_seed[seed].get(control)
      if row is None or ctl is None:
        continue
      entry["seeds"].append(seed)
      for key in COLUMNS.values():
        if row.get(key) is not None and ctl.get(key) is not None:
          entry.setdefault(key, {"values": []})["values"].append(float(row[key]) - float(ctl[key]))
    _summarise(entry)
    if entry["seeds"]:
      out[name] = entry
  return out


def format_differences(differences: dict[str, dict[str, Any]]) -> str:
  """The defense-minus-control table (percentage points; mean ± std, and the worst seed's zero-shot)."""
  if not differences:
    return ""

  def cell(stat, entry):  # One seed has no spread to show.
    spread = f" ± {100 * stat['std']:.1f}" if len(entry["seeds"]) > 1 else ""
    return f"{100 * stat['mean']:+.1f}" + spread

  lines = _stats_table(
      differences,
      ("fair control", lambda entry: entry["control"]),
      lambda c: f"Δ {c}",
      cell,
      ("worst-seed Δ zero-shot", lambda low: f"{100 * low:+.1f}"),
  )
  return (
      "\n".join(lines)
      + "\n\nDifferences in percentage points, each row minus its fair control (the same data, seed and "
      + "augmentation without the defense), per seed, then mean ± sample std over seeds.\n"
  )


def run_seeds(config: ml_collections.ConfigDict, workdir: str, seeds, only=()) -> str:
  """The benchmark once per seed in `workdir/seed_<s>`; returns the mean ± std table (also written to disk)."""
  per_seed = {}
  for seed in seeds:
    seed_config = config_lib.override(config, {"seed": int(seed), "poison.seed": int(seed)})
    seed_dir = os.path.join(workdir, f"seed_{seed}")
    os.makedirs(seed_dir, exist_ok=True)
    per_seed[int(seed)] = results = run_all(seed_config, seed_dir, only)
    with open(os.path.join(seed_dir, "results.md"), "w") as f:
      f.write(format_table(results, seed_config, seed_dir))
    plot_curves(results, seed_dir, os.path.join(seed_dir, "curves.png"))
  summary = aggregate_seeds(per_seed)
  differences = control_differences(per_seed, controls(config, summary))
  table = format_seed_table(summary, config)
  if differences:
    table += "\n" + format_differences(differences)
  notes = []
  for seed in sorted(per_seed):
    notes.extend(f"seed {seed}: {n}" for n in run_warnings(per_seed[seed], os.path.join(workdir, f"seed_{seed}")))
  table += "".join(n + "\n" for n in notes)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(
        {"per_seed": {str(k): v for k, v in per_seed.items()}, "summary": summary, "differences": differences},
        f,
        indent=2,
    )
  return table


def start(workdir: str) -> str:
  """Common start of the experiment commands: host settings, compile cache, quiet logs, the absolute workdir."""
  host_runtime.tune()
  if not jax.config.jax_compilation_cache_dir:  # JAX_COMPILATION_CACHE_DIR, when set, wins.
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/roclip_jax/jax_cache"))
  metrics_lib.quiet_library_logs()
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  return workdir


def main(argv) -> None:
  del argv
  config, workdir = FLAGS.config, start(FLAGS.workdir)
  if FLAGS.seeds:
    print("\n" + run_seeds(config, workdir, FLAGS.seeds, FLAGS.only))
    print(f"Written: {workdir}/results.md, results.json; per seed: {workdir}/seed_<s>/")
    return
  results = run_all(config, workdir, FLAGS.only)
  table = format_table(results, config, workdir)
  differences = control_differences({config.seed: results}, controls(config, results))
  if differences:
    table += "\n" + format_differences(differences)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=2)
  plot_curves(results, workdir, os.path.join(workdir, "curves.png"))
  print("\n" + table)
  print(f"Written: {workdir}/results.md, results.json, curves.png")


if __name__ == "__main__":
  app.run(main)
