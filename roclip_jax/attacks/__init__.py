"""Attacks that need a model (above `models/`): trigger optimisation against a surrogate CLIP.

The data-only attacks (poison selection, fixed triggers) live in `roclip_jax.data.poison`, which
stamps what these modules produce.
"""
