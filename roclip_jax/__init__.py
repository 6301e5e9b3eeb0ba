"""roclip_jax: CLIP pre-training in JAX/Flax that stays robust to poisoned data (RoCLIP)."""

__version__ = "0.1.0"
