"""CLIP model towers in Flax NNX, a preset registry, and parameter/FLOP accounting.

cfg = models.preset("ViT-B/32")            # ml_collections.ConfigDict (schema: clip.py)
model = models.build(cfg, rngs=nnx.Rngs(0))
img, txt = model(images_nhwc, tokens, train=True)   # float32, un-normalised
"""

from roclip_jax.models.clip import CLIP
from roclip_jax.models.clip import COMPUTE_DTYPES
from roclip_jax.models.clip import OPTIONAL_DEFAULTS
from roclip_jax.models.clip import attention_impl
from roclip_jax.models.clip import build
from roclip_jax.models.clip import count_params
from roclip_jax.models.clip import flops_per_pair
from roclip_jax.models.clip import mlp_width
from roclip_jax.models.clip import option
from roclip_jax.models.clip import validate_config
from roclip_jax.models.presets import preset
from roclip_jax.models.presets import preset_names
from roclip_jax.models.presets import register
from roclip_jax.models.spec import ModelSpec

__all__ = [
    "CLIP",
    "COMPUTE_DTYPES",
    "ModelSpec",
    "OPTIONAL_DEFAULTS",
    "attention_impl",
    "build",
    "count_params",
    "flops_per_pair",
    "mlp_width",
    "option",
    "validate_config",
    "preset",
    "preset_names",
    "register",
]
