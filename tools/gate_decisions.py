"""What RoCLIP's own-pair gate decides for a trained run, split by what the data's labels say.

  python tools/gate_decisions.py --workdir=DIR [--step=N] [--batches=12] [--judge=plain]

Opens the run's checkpoint (`roclip_jax.inspect.load`), draws `--batches` training batches through the
run's own pipeline (its poisons and augmentation), and for each pair runs the gated step's lookup on
the checkpointed pool (`RoClip.match`: the run's CSLS and own-example exclusion) and its gate
(`roclip.own_pair_gate`). With the labels the demo data carries, it prints how often the gate passes
clean pairs whose matched pool caption comes from an example of the image's own class and clean
pairs whose match comes from another class, and how often it passes the poisoned pairs; then how far
each group's own caption sits above the pool's typical caption for its image (a z-score over the
pool's cosines), and, among the pairs the gate fails, how many the peers' excuse and the image
tower's side (`roclip.image_evidence`) would excuse and the comparison of contents
(`roclip.content_evidence`) would overrule. The gate reads the views the run's gate read
(`roclip.gate_views`), or those `--judge` names ('augmented', 'plain', 'plain_text'), on the same
batches and checkpoint. docs/roclip.md, section 8 reads the figures: a
label-free gate cannot tell a clean image the model still gets wrong from a poisoned one by this one
decision.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from roclip_jax import defenses
from roclip_jax import inspect as inspect_lib
from roclip_jax import runs
from roclip_jax import sharding as sharding_lib
from roclip_jax import train
from roclip_jax.defenses import roclip

_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def gate_decisions(workdir: str, step: int | None, num_batches: int, judge: str = "run") -> dict[str, np.ndarray]:
  """Per pair of `num_batches` training batches: the gate's decision, whether the match has the image's
  class, whether the pair is poisoned, the own caption's z-score among the pool's cosines, whether its
  peers would excuse a failure (`roclip.excused_by_peers`), whether the image tower sides with the
  own caption (`roclip.image_sides_with_caption`) and whether the comparison of the two contents'
  pool captions passes it (`roclip.content_gate`, as `roclip.content_evidence` runs it)."""
  run = inspect_lib.load(workdir, step=step)
  if run.config.defense != "roclip":
    raise SystemExit(f"{workdir} trained defense={run.config.defense!r}; the gate is RoCLIP's.")
  config = run.config
  if judge != "run":  # The views the gate reads only: the lookup, the batches and the pool are the run's.
    config = config.copy_and_resolve_references()
    config.roclip.gate_views = judge
  defense = defenses.from_config(config, runs.run_facts(runs.read_info(workdir)))
  data, _ = train.build_train_data(config)
  pool, mesh = run.pool, sharding_lib.make_mesh([("data", -1)])
  pool_labels = np.asarray(pool.source_labels)
  lookup = jax.jit(defense.match, static_argnums=3)
  # The views the run's gate judged by (`roclip.gate_views`): the plain ones where its step encoded them.
  judged = defense.step_kinds()["gated"].evidence_views
  image_key, text_key = (f"{key}_plain" if f"{key}_plain" in judged else key for key in ("image", "text"))
  rows = []
  for _ in range(num_batches):
    batch = next(data.iterator)
    zimg = jnp.asarray(run.encoder.encode_images(np.asarray(batch[image_key])))
    ztxt = jnp.asarray(run.encoder.encode_tokens(np.asarray(batch[text_key])))
    with jax.set_mesh(mesh):
      match = lookup(pool, zimg, jnp.asarray(batch["id"], jnp.int32), mesh)
    cosines = np.asarray(zimg @ pool.embeddings.T)  # [B, M]
    own = np.sum(np.asarray(zimg) * np.asarray(ztxt), axis=1)
    keep = roclip.own_pair_gate(ztxt, match, pool)
    excused = np.asarray(roclip.excused_by_peers(ztxt, keep, pool)) > 0
    image_sides = np.asarray(roclip.image_sides_with_caption(zimg, ztxt, match, pool)) > 0
    ids = jnp.asarray(batch["id"], jnp.int32) if defense.settings().exclude_own else None
    contents = np.asarray(roclip.content_gate(zimg, ztxt, match, pool, ids)) > 0
    rows.append(
        dict(
            passed=np.asarray(keep) > 0,
            same_class=pool_labels[np.asarray(match.index)] == np.asarray(batch["label"]),
            poisoned=np.asarray(batch["poisoned"]) > 0,
            own_z=(own - cosines.mean(axis=1)) / cosines.std(axis=1),
            excused=excused,
            image_sides=image_sides,
            contents=contents,
        )
    )
  return {key: np.concatenate([r[key] for r in rows]) for key in rows[0]}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: the latest)")
  parser.add_argument("--batches", type=int, default=12)
  parser.add_argument(
      "--judge", default="run", choices=("run",) + roclip.GATE_VIEWS, help="the views the gate reads (run: the run's)"
  )
  args = parser.parse_args()
  d = gate_decisions(args.workdir, args.step, args.batches, args.judge)
  clean = ~d["poisoned"]
  groups = {
      "clean, match of the image's class": clean & d["same_class"],
      "clean, match of another class": clean & ~d["same_class"],
      "poisoned": d["poisoned"],
  }
  print(f"{clean.sum()} clean and {d['poisoned'].sum()} poisoned pairs from {args.batches} batches of {args.workdir}")
  print(f"clean pairs whose match has the image's class: {100 * d['same_class'][clean].mean():.1f}%")
  print(f"clean pairs the gate passes: {100 * d['passed'][clean].mean():.1f}%")
  failed = clean & ~d["passed"]
  print(f"clean pairs it fails whose match has another class: {100 * (~d['same_class'][failed]).mean():.1f}%")
  for name, mask in groups.items():
    if mask.any():
      f = mask & ~d["passed"]
      print(
          f"{name}, failing the gate: {f.sum()} pairs; excused by peers {100 * d['excused'][f].mean():.1f}%, "
          f"the image tower sides with the own caption {100 * d['image_sides'][f].mean():.1f}%, "
          f"the contents' captions pass it {100 * d['contents'][f].mean():.1f}%"
      )
      quantiles = " / ".join(f"{q:.2f}" for q in np.quantile(d["own_z"][mask], _QUANTILES))
      print(
          f"{name}: {mask.sum()} pairs, passed {100 * d['passed'][mask].mean():.1f}%; own-caption z-score "
          f"(10/25/50/75/90th percentiles) {quantiles}"
      )


if __name__ == "__main__":
  main()
