"""The training loop: `train_and_evaluate(config, workdir)`.

Reads top to bottom: setup -> mesh -> data (and poisoning) -> model, optimizer
and state -> steps -> restore -> evaluators -> loop -> final evaluation.
The defense (`config.defense`, a `defenses.Defense`) decides which compiled
step runs in which epoch, which records are trained on, and host-side work at
epoch boundaries; this file names none of them (docs/architecture.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from roclip_jax import checkpoint as checkpoint_lib
from roclip_jax import config_lib
from roclip_jax import defenses
from roclip_jax import encoder as encoder_lib
from roclip_jax import evaluators as evaluators_lib
from roclip_jax import metrics as metrics_lib
from roclip_jax import optim
from roclip_jax import runs
from roclip_jax import sharding as sharding_lib
from roclip_jax import steps as steps_lib
from roclip_jax import weights as weights_lib
from roclip_jax.data import pipeline
from roclip_jax.data import poison as poison_lib
from roclip_jax.data import sources


def build_train_data(config: ml_collections.ConfigDict, workdir: str | None = None):
  """The (possibly poisoned) training data of this host, and the poison record.

  The defense picks the records it trains on (`Defense.train_records`, e.g. a
  clean subset) and the views it reads, from the config: the defense itself is
  built from what this data says (`defenses.RunFacts`). The poison record is
  always returned, for the attack evaluators.
  """
  source, poison_info, image_transform = build_train_source(config, workdir)
  defense = defenses.get(config.defense)
  source, image_transform = defense.train_records(config, source, image_transform)
  train_data = pipeline.make_train_data(
      config,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
      image_transform=image_transform,
      source=source,
      views=defense.views,
      plain_views=defense.plain_views(config),
  )
  return train_data, poison_info


def build_train_source(config: ml_collections.ConfigDict, workdir: str | None = None):
  """The training source with the config's poisons (before a defense picks its records), the poison
  record (None without poisoning) and the image transform that stamps the triggers (None without)."""
  source = sources.make_source(config.data, split="train")
  poison_info, image_transform = None, None
  if config.poison.enabled:
    # Targets come from the held-out labelled split (docs/attacks_and_metrics.md, section 2).
    held_out = pipeline.labelled_split(config, split="test")
    records = [held_out.source[i] for i in range(len(held_out.source))]
    targets = poison_lib.TargetPool.from_records(records, held_out.class_names)
    source, poison_info = poison_lib.poison_source(source, targets, config.poison, seed=config.poison.seed)
    image_transform = poison_lib.make_image_transform(config.poison, seed=config.poison.seed)
    if workdir is not None and jax.process_index() == 0:
      with open(os.path.join(workdir, "poison_info.json"), "w") as f:
        f.write(poison_info.to_json())
  return source, poison_info, image_transform


def load_init_weights(config: ml_collections.ConfigDict, state_shardings: steps_lib.TrainState) -> tuple[dict, dict]:
  """`config.init_from`'s parameters and model state, placed like the train state's.

  A roclip_jax run's workdir gives its latest checkpoint (the architecture and
  loss parameters must match); anything else goes to `weights.load_for_training`.
  """
  path = config.init_from
  if not config_lib.is_run_dir(path):
    return weights_lib.load_for_training(path, config.model, state_shardings.params, state_shardings.model_state)
  run_config, run_state = runs.restore(path)
  mismatches = weights_lib.architecture_mismatches(run_config.model, config.model)
  if mismatches or jax.tree.structure(run_state.params) != jax.tree.structure(state_shardings.params):
    what = "; ".join(mismatches) or "different parameters"
    raise ValueError(
        f"config.init_from={path!r} is a run of another architecture ({what}). Fix: set "
        "config.model to that run's model (its config.json), or start from another run."
    )
  return (
      runs.place(run_state.params, state_shardings.params),
      runs.place(run_state.model_state, state_shardings.model_state),
  )


def make_encoder(config, spec, state: steps_lib.TrainState) -> encoder_lib.Encoder:
  return encoder_lib.Encoder(spec, state.params, state.model_state, context_length=config.model.text.context_length)


def run_evaluators(evaluators, encoder) -> dict[str, float]:
  results = {}
  for ev in evaluators:
    t0 = time.perf_counter()
    results.update(ev.run(encoder))
    logging.info("Evaluator %s took %.1fs", ev.name, time.perf_counter() - t0)
  return results


def dry_run(config: ml_collections.ConfigDict, mesh) -> dict[str, Any]:
  """`config.dry_run`: compiles every step for `mesh`, reports memory and FLOPs per device, trains nothing.

  Reads no data and writes nothing into the workdir: the defense is built without the data's facts
  (no example count, one step per epoch), so a defense with per-example state refuses to run dry.
  """
  defense = defenses.from_config(config, defenses.RunFacts(num_examples=0, steps_per_epoch=1))
  tx, _ = optim.make_optimizer(config.optim, total_steps=1)
  abstract, _ = steps_lib.abstract_train_state(config, mesh, tx, defense)
  specs = sharding_lib.param_specs(abstract.params, mesh, config.sharding_rules, config.fsdp_min_size)
  logging.info("Dry run on mesh %s; sharded parameters:\n%s", dict(mesh.shape), sharding_lib.describe(specs))
  results: dict[str, Any] = {"dry_run": True, "num_devices": mesh.size, "mesh": str(dict(mesh.shape))}
  for name, (_, report) in steps_lib.aot_compile(config, mesh, defense).items():
    if jax.process_index() == 0:
      print(report.summary(), flush=True)
    results.update({f"{name}/{k}": v for k, v in dataclasses.asdict(report).items() if k != "kind"})
  return results


def final_results(workdir: str, step: int) -> dict[str, Any] | None:
  """The final evaluation row a finished run wrote at `step`, or None."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  rows = [
      r
      for r in metrics_lib.read_metrics(workdir)
      if r.get("kind") == "eval" and r.get("final") and r.get("step") == step
  ]
  if not rows:
    return None
  return {k: v for k, v in rows[-1].items() if k not in ("kind", "step", "final", "epoch", "skipped_examples")}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains (resuming from `workdir` if it holds a checkpoint) and evaluates.

  Returns the final evaluation results (plus `step`).
  """
  # -------------------------------------------------------------- setup
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  mesh = sharding_lib.make_mesh(config.mesh)
  config_lib.validate(config, sharding_lib.num_batch_shards(mesh))
  if config.dry_run:
    return dry_run(config, mesh)
  is_main = jax.process_index() == 0
  # Before anything in the workdir is written: a changed config must not overwrite the run's record.
  config_changes = runs.check_rerun(workdir, config)
  writer = metrics_lib.MetricWriter(workdir)
  if config_changes:
    ckpt_dir = os.path.join(workdir, "checkpoints")
    saved_steps = checkpoint_lib.steps_on_disk(ckpt_dir)
    changed = {k: [old, new] for k, (old, new) in config_changes.items()}
    writer.write(saved_steps[-1] if saved_steps else 0, {"config_changes": changed}, kind="config")
    logging.warning("Rerun with changed settings (old -> new), recorded in metrics.jsonl: %s", changed)
  logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), jax.device_count(), jax.process_count())

  # --------------------------------------------------------------- data
  train_data, poison_info = build_train_data(config, workdir)
  steps_per_epoch = train_data.steps_per_epoch  # >= 1: make_train_data rejects smaller sources.
  defense = defenses.from_config(
      config, defenses.RunFacts(num_examples=train_data.num_examples, steps_per_epoch=steps_per_epoch)
  )
  if is_main:
    runs.write(
        workdir,
        config,
        {"num_examples": train_data.num_examples, "steps_per_epoch": steps_per_epoch, "defense": defense.describe()},
    )
  total_steps = config.num_epochs * steps_per_epoch
  last_step = total_steps if config.max_steps < 0 else min(total_steps, config.max_steps)
  logging.info(
      "%d examples, %d steps per epoch, %d epochs, %d steps; defense: %s",
      train_data.num_examples,
      steps_per_epoch,
      config.num_epochs,
      total_steps,
      defense.describe(),
  )

  # ----------------------------------------------- model, optimizer, state
  schedule = defense.learning_rate_schedule(total_steps)
  tx, schedule = optim.make_optimizer(config.optim, total_steps, schedule=schedule)
  spec = steps_lib.ModelSpec.create(config.model)
  abstract_state, state_shardings = steps_lib.abstract_train_state(config, mesh, tx, defense)
  train_steps = steps_lib.make_train_steps(config, mesh, spec, tx, schedule, state_shardings, defense)

  # ------------------------------------------------------------ restore
  ckpt = checkpoint_lib.Checkpointer(
      os.path.join(workdir, "checkpoints"),
      every_steps=config.checkpoint.every_steps,
      max_to_keep=config.checkpoint.max_to_keep,
      async_save=config.checkpoint.async_save,
  )
  # One process falls back past a checkpoint that fails to restore; several stop with the command instead,
  # since each reads only its shards and would decide alone (docs/architecture.md, "Rerunning into a workdir").
  target = checkpoint_lib.abstract_with_shardings(abstract_state, state_shardings)
  latest, state = ckpt.restore_newest(target, train_data.iterator, fall_back=jax.process_count() == 1)
  if latest is not None:
    logging.info("Resumed from step %d in %s", latest, ckpt.directory)
  else:
    state = steps_lib.create_train_state(config, mesh, tx, state_shardings, defense)
    if config.init_from:  # Pretrained weights; the optimizer state stays freshly initialised.
      params, model_state = load_init_weights(config, state_shardings)
      state = state.replace(params=params, model_state=model_state)
      logging.info("Initialised the model from %s", config.init_from)
  start_step = int(jax.device_get(state.step))

  evaluators = evaluators_lib.from_config(config, poison_info=poison_info)
  hooks = defense.epoch_hooks(
      defenses.RunContext(config=config, spec=spec, mesh=mesh, train_data=train_data, state_shardings=state_shardings)
  )

  # --------------------------------------------------------------- loop
  progress = metrics_lib.Progress(
      last_step, start_step, config.data.batch_size, enabled=is_main and config.progress_bar
  )
  stop = checkpoint_lib.StopSignal(first_step=start_step)
  step_metrics = None  # The last step's device metrics: checked for NaN before each save.
  step = start_step
  data_iter = iter(train_data.iterator)
  try:
    while step < last_step:
      epoch = step // steps_per_epoch + 1
      kind = defense.schedule(epoch)
      if step % steps_per_epoch == 0:
        state, epoch_row = hooks.start_epoch(state, epoch, kind)
        if epoch_row is not None:
          writer.write(step, epoch_row, kind="epoch")
      try:
        local_batch = next(data_iter)
      except pipeline.StorageError:
        # After a failed next() the pipeline reports its position from before that batch, so this checkpoint
        # (the state after `step` steps, the data at batch `step`) reads the failed batch again on resume. With
        # several hosts the others wait in a collective, where a (collective) save would hang: there the rerun
        # resumes from the last periodic checkpoint instead.
        if jax.process_count() == 1 and step > start_step:
          ckpt.maybe_save(step, state, train_data.iterator, force=True, metrics=step_metrics)
          ckpt.wait()
        logging.error(
            "Storage fault reading the batch of step %d (error below); stopping. Fix the storage, then "
            "rerun with this workdir: training resumes from step %d.",
            step + 1,
            ckpt.latest_step() or 0,
        )
        raise
      batch = sharding_lib.global_batch(local_batch, mesh)
      with jax.set_mesh(mesh):
        state, step_metrics = train_steps[kind.name](state, batch)
      step += 1
      if step % config.log_every_steps == 0 or step == last_step:
        host_metrics = jax.device_get(step_metrics)
        ckpt.assert_finite(step, host_metrics)
        rate = progress.update(step, loss=f"{host_metrics['loss']:.3f}", epoch=epoch)
        # The row's key stays `mode`: `kind` names the row's type in metrics.jsonl ('train', 'eval', ...).
        writer.write(step, dict(host_metrics, epoch=epoch, mode=kind.name, pairs_per_sec=rate))

      if step % steps_per_epoch == 0 or step == last_step:
        epoch_row = hooks.end_epoch(state, epoch, kind)
        if epoch_row is not None:
          writer.write(step, epoch_row, kind="epoch")

      periodic = [ev for ev in evaluators if step != last_step and ev.is_due(step, last_step)]
      if periodic:
        writer.write(step, dict(run_evaluators(periodic, make_encoder(config, spec, state)), epoch=epoch), kind="eval")

      stopping = stop.should_stop(step)  # Read once: every process saves and stops at this same step.
      ckpt.maybe_save(step, state, train_data.iterator, force=stopping, metrics=step_metrics)
      if stopping:
        ckpt.wait()
        logging.warning("Stopped at step %d on request; the next run with this workdir resumes here.", step)
        return {"step": step, "stopped": True}

    # --------------------------------------------------- final evaluation
    ckpt.maybe_save(step, state, train_data.iterator, force=True, metrics=step_metrics)
    ckpt.wait()  # A failed final save stops the run here, before its final row.
    previous = final_results(workdir, step) if start_step == step else None
    if previous is not None:  # A finished run, rerun: its results stand; no second final row.
      logging.info("The run had already finished at step %d; its final results are in metrics.jsonl.", step)
      return dict(previous, step=step)
    results = run_evaluators(evaluators, make_encoder(config, spec, state))
    skipped = int(jax.device_get(state.stats["skipped_examples"]))
    writer.write(
        step, dict(results, epoch=(step - 1) // steps_per_epoch + 1, skipped_examples=skipped, final=True), kind="eval"
    )
    return dict(results, step=step)
  finally:
    stop.restore_handlers()
    progress.close()
    ckpt.close()
    writer.close()
