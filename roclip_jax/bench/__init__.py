"""Benchmarks, each run as `python -m roclip_jax.bench.<name>`, and what they share."""

from roclip_jax import defenses


def synthetic_facts(config) -> defenses.RunFacts:
  """The facts of a benchmark run on synthetic batches: example ids 0..B-1 (B the global batch), and
  one step per epoch."""
  return defenses.RunFacts(num_examples=config.data.batch_size, steps_per_epoch=1)
